//! Names of topics and queues, shared by everything that publishes, consumes or provisions, so
//! they agree without configuration: one topic per (domain, stream), one queue per (service,
//! stream), each optionally prefixed by a namespace (an environment, a tenant, a test).

use crate::envelope::Stream;

/// `[<namespace>-]<domain>-<stream>`, e.g. `listing-live`.
pub fn topic_name(namespace: Option<&str>, domain: &str, stream: Stream) -> String {
    prefixed(namespace, &format!("{domain}-{stream}"))
}

/// `[<namespace>-]<service>-<stream>`, e.g. `channel-sync-resync`.
pub fn queue_name(namespace: Option<&str>, service: &str, stream: Stream) -> String {
    prefixed(namespace, &format!("{service}-{stream}"))
}

fn prefixed(namespace: Option<&str>, name: &str) -> String {
    match namespace.filter(|n| !n.is_empty()) {
        Some(ns) => format!("{ns}-{name}"),
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_namespace_domain_and_stream() {
        assert_eq!(topic_name(None, "listing", Stream::Live), "listing-live");
        assert_eq!(queue_name(Some("staging"), "search", Stream::Resync), "staging-search-resync");
        assert_eq!(topic_name(Some(""), "listing", Stream::Resync), "listing-resync");
    }
}
