//! A secured etcd, real: authentication (users, passwords, tokens that expire) and TLS with
//! client certificates. Workers register and the gateway follows them only with the right
//! credentials; wrong ones fail with etcd's reason; expired tokens are renewed unnoticed.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{freezable_proxy, gateway, EtcdServer};
use lastmile_discovery::{Etcd, EtcdConfig, Registration, WorkerInfo, DEFAULT_PREFIX};
use lastmile_gateway::{EtcdDiscovery, GatewayConfig};
use serde_json::{json, Value};

fn info(url: &str) -> WorkerInfo {
    WorkerInfo {
        url: url.to_string(),
        model: common::MODEL.to_string(),
        role: "both".to_string(),
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Turns authentication on: `root`, and `worker` allowed to read and write the worker prefix
/// only (etcd's JSON API, as `etcdctl` would).
async fn enable_auth(url: &str) {
    let end = "/lastmile/workers0"; // the key after every key of the prefix
    let calls = [
        ("role/add", json!({"name": "root"})),
        ("user/add", json!({"name": "root", "password": "root-pw"})),
        ("user/grant", json!({"user": "root", "role": "root"})),
        ("role/add", json!({"name": "lastmile"})),
        (
            "role/grant",
            json!({"name": "lastmile", "perm": {"permType": "READWRITE",
                "key": b64(DEFAULT_PREFIX), "range_end": b64(end)}}),
        ),
        (
            "user/add",
            json!({"name": "worker", "password": "worker-pw"}),
        ),
        ("user/grant", json!({"user": "worker", "role": "lastmile"})),
        ("enable", json!({})),
    ];
    for (path, body) in calls {
        let v: Value = reqwest::Client::new()
            .post(format!("{url}/v3/auth/{path}"))
            .json(&body)
            .send()
            .await
            .expect("etcd")
            .json()
            .await
            .expect("json");
        assert!(v.get("error").is_none(), "{path}: {v}");
    }
}

fn with_user(url: &str, user: &str, password: &str) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![url.to_string()]);
    c.user = Some((user.into(), password.into()));
    c
}

async fn workers_listed(gw: &str) -> u64 {
    let h: Value = reqwest::get(format!("{gw}/health"))
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    h["workers"].as_u64().unwrap_or(0)
}

async fn until_listed(gw: &str, n: u64, within: Duration) {
    let start = Instant::now();
    while workers_listed(gw).await != n {
        assert!(start.elapsed() < within, "the gateway never listed {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway following the workers in etcd through `client`, once it lists the one registered.
async fn etcd_gateway(client: EtcdConfig) -> String {
    let mut config = GatewayConfig::new(Vec::new());
    config.etcd = Some(EtcdDiscovery {
        client,
        prefix: DEFAULT_PREFIX.to_string(),
        allow: Vec::new(),
    });
    let gw = gateway(config);
    until_listed(&gw, 1, Duration::from_secs(10)).await;
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_right_credentials_reach_an_etcd_with_authentication() {
    // Tokens live 1 s here, so that every call below outlives a few of them.
    let server =
        EtcdServer::start_with(&["--auth-token-ttl", "1"], "http", reqwest::Client::new()).await;
    enable_auth(&server.url).await;

    // No credentials, a wrong password, a user without the right: each refused, saying why.
    let anonymous = Etcd::new(vec![server.url.clone()]);
    let err = Registration::start(anonymous, DEFAULT_PREFIX, info("http://127.0.0.1:9"), 2)
        .await
        .err()
        .expect("anonymous writes are refused");
    assert!(err.to_string().contains("user name is empty"), "{err}");
    let wrong = Etcd::connect(&with_user(&server.url, "worker", "nope")).expect("client");
    let err = wrong
        .list(DEFAULT_PREFIX)
        .await
        .expect_err("a wrong password");
    assert!(err.to_string().contains("authentication failed"), "{err}");

    // The right ones: the worker registers, the gateway (its own credentials) follows it.
    let etcd = Etcd::connect(&with_user(&server.url, "worker", "worker-pw")).expect("client");
    let reg = Registration::start(etcd.clone(), DEFAULT_PREFIX, info("http://127.0.0.1:9"), 2)
        .await
        .expect("registering with credentials");
    let mut client = with_user(&server.url, "worker", "worker-pw");
    client.watch_idle = Duration::from_millis(700);
    let gw = etcd_gateway(client).await;

    // Across several token lifetimes the lease is kept alive (every 0.67 s, renewing the token
    // when etcd says it expired) and the gateway, re-watching after 0.7 s of quiet, keeps it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, kvs) = etcd
        .list(DEFAULT_PREFIX)
        .await
        .expect("listing after tokens expired");
    assert_eq!(kvs.len(), 1, "the registration lived on: {kvs:?}");
    assert_eq!(workers_listed(&gw).await, 1);

    // A client idle past its token's life: etcd says the token is invalid, and the client
    // fetches a new one and goes on.
    let idle = Etcd::connect(&with_user(&server.url, "worker", "worker-pw")).expect("client");
    idle.list(DEFAULT_PREFIX).await.expect("first listing");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, kvs) = idle
        .list(DEFAULT_PREFIX)
        .await
        .expect("listing with an expired token");
    assert_eq!(kvs.len(), 1);

    // The gateway follows a departure as before.
    reg.deregister().await.expect("deregistering");
    until_listed(&gw, 0, Duration::from_secs(5)).await;
}

/// Runs openssl; panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, signed by that CA; and
/// another CA that signed nothing.
fn certificates() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lastmile-etcd-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    // Extensions make X.509 v3 certificates (rustls takes no other).
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for ca in ["ca", "other-ca"] {
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ],
        );
    }
    for name in ["server", "client"] {
        openssl(
            &dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        let mut sign = vec![
            "x509",
            "-req",
            "-days",
            "2",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-in",
        ];
        let (csr, crt, ext) = (
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        sign.extend([csr.as_str(), "-out", crt.as_str(), "-extfile", ext.as_str()]);
        openssl(&dir, &sign);
    }
    dir
}

fn tls_config(url: &str, dir: &Path, ca: &str, client_cert: bool) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![url.to_string()]);
    c.ca = Some(dir.join(ca));
    if client_cert {
        c.cert = Some((dir.join("client.crt"), dir.join("client.key")));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_needs_the_ca_and_a_client_certificate() {
    let dir = certificates();
    let p = |f: &str| dir.join(f).display().to_string();
    let (ca, crt, key) = (p("ca.crt"), p("server.crt"), p("server.key"));
    let mut identity = std::fs::read(dir.join("client.crt")).expect("cert");
    identity.extend(std::fs::read(dir.join("client.key")).expect("key"));
    let probe = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca).expect("ca")).expect("pem"),
        )
        .identity(reqwest::Identity::from_pem(&identity).expect("identity"))
        .build()
        .expect("probe client");
    let server = EtcdServer::start_with(
        &[
            "--cert-file",
            &crt,
            "--key-file",
            &key,
            "--trusted-ca-file",
            &ca,
            "--client-cert-auth",
        ],
        "https",
        probe,
    )
    .await;
    assert!(server.url.starts_with("https://"));

    // Without the client certificate, or trusting another CA: no connection.
    for (config, why) in [
        (
            tls_config(&server.url, &dir, "ca.crt", false),
            "no client certificate",
        ),
        (
            tls_config(&server.url, &dir, "other-ca.crt", true),
            "an unknown server CA",
        ),
    ] {
        let etcd = Etcd::connect(&config).expect("client");
        let err = etcd.list(DEFAULT_PREFIX).await.expect_err(why);
        assert_eq!(err.error_type(), "unreachable", "{why}: {err}");
    }
    // Plain HTTP to the TLS port: refused too.
    let plain = Etcd::new(vec![server.url.replace("https://", "http://")]);
    assert!(plain.list(DEFAULT_PREFIX).await.is_err());

    // With both: a worker registers and the gateway follows it over TLS.
    let good = tls_config(&server.url, &dir, "ca.crt", true);
    let etcd = Etcd::connect(&good).expect("client");
    let _reg = Registration::start(etcd, DEFAULT_PREFIX, info("http://127.0.0.1:9"), 5)
        .await
        .expect("registering over TLS");
    etcd_gateway(good).await;

    // A certificate path that does not exist stops the start with its name.
    let mut missing = tls_config(&server.url, &dir, "ca.crt", true);
    missing.ca = Some(dir.join("nope.crt"));
    let err = Etcd::connect(&missing).err().expect("a missing CA file");
    assert!(err.to_string().contains("nope.crt"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker registered in a fresh etcd, and a gateway that follows it through
/// `freezable_proxy(.., swallow)` with a one-second watch idle limit, once it lists the worker:
/// the etcd (kept alive), the registration, the gateway's URL and the proxy's freeze switch.
async fn gateway_behind_proxy(
    swallow: fn(&[u8]) -> bool,
) -> (
    EtcdServer,
    Registration,
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let server = EtcdServer::start().await;
    let target = server
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address");
    let (proxied, frozen) = freezable_proxy(target, swallow).await;
    let etcd = Etcd::new(vec![server.url.clone()]);
    let reg = Registration::start(etcd, DEFAULT_PREFIX, info("http://127.0.0.1:9"), 5)
        .await
        .expect("register");
    let mut client = EtcdConfig::new(vec![proxied]);
    client.watch_idle = Duration::from_secs(1);
    let gw = etcd_gateway(client).await;
    (server, reg, gw, frozen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_went_silent_is_replaced() {
    let (_etcd, reg, gw, frozen) = gateway_behind_proxy(|_| false).await;
    // The gateway's watch connection goes silent; then the worker leaves. A gateway that waited
    // on that watch forever would list the worker forever; this one gives the quiet watch up,
    // lists again over a new connection and sees it gone.
    frozen.store(true, std::sync::atomic::Ordering::Relaxed);
    reg.deregister().await.expect("deregister");
    until_listed(&gw, 0, Duration::from_secs(10)).await;
}

/// Regression: a watch request that went into a dead connection (here: one that carries the
/// listing but swallows every watch request) left the follower waiting for the reply's headers
/// forever, past the idle limit (which timed only the stream), so the gateway never saw a
/// worker leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_request_without_a_reply_is_given_up() {
    let (_etcd, reg, gw, _) =
        gateway_behind_proxy(|request| request.windows(9).any(|w| w == b"/v3/watch")).await;
    reg.deregister().await.expect("deregister");
    until_listed(&gw, 0, Duration::from_secs(10)).await;
}
