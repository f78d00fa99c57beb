//! `rediss://` with a password in the URL, against a TLS-only redis-server of our own with a
//! throwaway CA.
//!
//! The client trusts the system roots, so the CA is handed over through `SSL_CERT_FILE`. That
//! must not leak into other tests, so the test re-runs itself in a child process with the
//! variable set (selected by [`WORKER_ENV`]).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use resync_locks::{LockConfig, LockError, Locker, Release};
use resync_testkit::unique_name;

use crate::support::{OwnRedis, TempDir, expect_success, spawn_self, test_name, within};

/// Set in the child: the `rediss://` URL (with password) to use.
const WORKER_ENV: &str = "RESYNC_LOCKS_TLS_URL";
const PASSWORD: &str = "s3cret-pass";
const HANG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn tls_with_password_from_the_url() {
    match std::env::var(WORKER_ENV) {
        Ok(url) => use_tls_redis(&url).await,
        Err(_) => run_against_own_tls_redis().await,
    }
}

async fn run_against_own_tls_redis() {
    let dir = TempDir::new("lk-tls");
    make_certificates(dir.path());
    let file = |name: &str| dir.path().join(name).display().to_string();
    let redis = OwnRedis::start_tls(vec![
        "--tls-cert-file".into(),
        file("server.pem"),
        "--tls-key-file".into(),
        file("server.key"),
        "--tls-ca-cert-file".into(),
        file("ca.pem"),
        "--tls-auth-clients".into(),
        "no".into(),
        "--requirepass".into(),
        PASSWORD.into(),
    ])
    .await;
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}", redis.port());
    let ca = file("ca.pem");

    let name = test_name(module_path!(), "tls_with_password_from_the_url");
    let child = spawn_self(&name, &[(WORKER_ENV, url.as_str()), ("SSL_CERT_FILE", ca.as_str())]);
    within(HANG, "tls worker", expect_success(child, "tls worker")).await;
}

async fn use_tls_redis(url: &str) {
    let config = LockConfig { op_timeout: Duration::from_secs(5), ..LockConfig::default() };
    let locker = Locker::connect(url, config.clone()).await.expect("connect over TLS with password");
    let key = unique_name("lk");
    let guard = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");
    guard.renew().await.expect("renew over TLS");
    assert!(locker.try_acquire(&key).await.expect("redis").is_none());
    assert_eq!(guard.release().await.expect("release"), Release::Released);

    let wrong = url.replace(PASSWORD, "wrong-password");
    let err = Locker::connect(&wrong, config).await.expect_err("wrong password is refused");
    assert!(matches!(err, LockError::Connect { .. }), "got {err:?}");
    assert!(!err.to_string().contains("wrong-password"), "password leaked into: {err}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, via the openssl CLI.
fn make_certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=resync-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        ],
    );
    openssl(
        dir,
        &[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write extensions");
    openssl(
        dir,
        &[&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "server.ext",
        ]],
    );
}

fn openssl(dir: &Path, args: &[&[&str]]) {
    let output = Command::new("openssl")
        .args(args.concat())
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (is it installed?): {e}"));
    assert!(output.status.success(), "openssl failed: {}", String::from_utf8_lossy(&output.stderr));
}
