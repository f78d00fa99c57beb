//! Connection URLs without their passwords, for logs and error messages.
//!
//! Owns the one rule every crate uses to show a broker, Redis or database URL it was given:
//! the user name stays (it tells an operator which account was tried), the password becomes
//! `***`. It does not parse or validate URLs; each client library does that and reports its
//! own errors.

/// `scheme://user:***@host...` for a URL with credentials, the URL unchanged without.
///
/// The last `@` ends the credentials, so a password holding an unencoded `@` is still hidden.
pub fn redact_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}://{user}:***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_hidden_and_the_user_kept() {
        assert_eq!(redact_password("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact_password("postgres://app:p@ss@db/test"), "postgres://app:***@db/test");
    }

    #[test]
    fn a_password_without_a_user_is_hidden() {
        assert_eq!(redact_password("rediss://:s3cret@cache:6380/0"), "rediss://:***@cache:6380/0");
    }

    #[test]
    fn urls_without_credentials_are_unchanged() {
        assert_eq!(redact_password("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_password("not a url"), "not a url");
    }
}
