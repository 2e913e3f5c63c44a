//! Security regressions met by an operator starting the binary (real processes, the default
//! model): a blank admin key is refused at start and a short one warned about; the admin key
//! in the environment (`LASTMILE_ADMIN_KEY`, the documented alternative to the flag) reaches
//! neither the replicas of `serve --config` nor the children of `serve --workers N`, and those
//! children die with their parent; a crafted model file is refused with an error, not a panic.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{api_key, listening, start_listening, wait_healthy, Proc, BIN};
use serde_json::Value;

const ADMIN: &str = "an-admin-key-long-enough-for-tests";

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lastmile-security-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A deployments file with one deployment of the default model kept at one replica.
fn one_replica_config(dir: &std::path::Path) -> PathBuf {
    let config = dir.join("deployments.yaml");
    std::fs::write(
        &config,
        "deployments:\n  - name: smol\n    min_replicas: 1\n    threads: 1\n",
    )
    .expect("write config");
    config
}

/// Runs `lastmile ARGS` with `env` added; returns its exit status and stderr once it exits,
/// or `None` (after killing it) if it is still running after 20 s: it started serving.
fn run_until_exit(args: &[&str], env: &[(&str, &str)]) -> Option<(i32, String)> {
    // A folder of its own: tests run in parallel, and `temp_dir` starts its folder afresh.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = temp_dir(&format!("exit-{run}"));
    let log = dir.join("stderr.log");
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--usage-db")
        .arg(dir.join("usage.db"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Proc(cmd.spawn().expect("starting lastmile"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.0.try_wait().expect("wait") {
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            return Some((status.code().unwrap_or(-1), stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_blank_admin_key_is_refused_at_start() {
    let dir = temp_dir("blank");
    let config = one_replica_config(&dir);
    let config = config.to_str().expect("utf-8 path");
    let port = "0".to_string();
    /// What is started, its arguments, and its extra environment.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let cases: [Case; 4] = [
        (
            "gateway --admin-key \"\"",
            vec![
                "gateway",
                "--worker",
                "http://127.0.0.1:9",
                "--port",
                &port,
                "--admin-key",
                "",
            ],
            vec![],
        ),
        (
            "gateway on 0.0.0.0 with LASTMILE_ADMIN_KEY=",
            vec![
                "gateway",
                "--worker",
                "http://127.0.0.1:9",
                "--host",
                "0.0.0.0",
                "--port",
                &port,
            ],
            vec![("LASTMILE_ADMIN_KEY", "")],
        ),
        (
            "serve --config --admin-key \"   \"",
            vec![
                "serve",
                "--config",
                config,
                "--port",
                &port,
                "--admin-key",
                "   ",
            ],
            vec![],
        ),
        (
            "serve --config with LASTMILE_ADMIN_KEY=",
            vec!["serve", "--config", config, "--port", &port],
            vec![("LASTMILE_ADMIN_KEY", "")],
        ),
    ];
    for (what, args, env) in cases {
        let Some((code, stderr)) = run_until_exit(&args, &env) else {
            panic!("{what}: started serving with a blank admin key");
        };
        assert_ne!(code, 0, "{what}: {stderr}");
        assert!(
            stderr.contains("admin key") && stderr.contains("empty"),
            "{what}: the error names the empty admin key: {stderr}"
        );
    }
}

#[test]
fn a_short_admin_key_is_warned_about() {
    let port = "0".to_string();
    let mut child = Proc(
        Command::new(BIN)
            .args(["gateway", "--worker", "http://127.0.0.1:9", "--port", &port])
            .args([
                "--usage-db",
                &temp_dir("short").join("usage.db").to_string_lossy(),
            ])
            .env("LASTMILE_ADMIN_KEY", "hunter2")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting lastmile"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains("admin key is only 7 bytes") {
            return;
        }
        seen.push(line);
    }
    panic!("no warning about the 7-byte admin key; stderr: {seen:#?}");
}

/// Admin GET of `path` with the admin key.
async fn admin_get(url: &str, path: &str) -> Option<Value> {
    reqwest::Client::new()
        .get(format!("{url}{path}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_key_in_the_environment_does_not_reach_replicas() {
    let dir = temp_dir("env-replicas");
    let config = one_replica_config(&dir);
    let log = dir.join("serve.log");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"])
        .arg(&config)
        .arg("--usage-db")
        .arg(dir.join("usage.db"))
        .env("LASTMILE_ADMIN_KEY", ADMIN)
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(&log).expect("log"));
    let (_server, url) = listening(cmd);
    wait_healthy(&url).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = admin_get(&url, "/admin/deployments/smol").await;
        let status = status.as_ref().map(|s| &s["status"]);
        if status.is_some_and(|s| s["ready"] == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never became ready: {status:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Keys are on: the API needs a key, which the admin key (from the environment) creates.
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "smol", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
}

/// The ids of the processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`: the command name may hold spaces, the rest does not.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        if after.split_whitespace().nth(1) == Some(&pid.to_string()) {
            out.push(child);
        }
    }
    out
}

/// Whether process `pid` is gone (or a zombie: dead, not yet reaped).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Process `pid`'s command line, its arguments split.
fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `lastmile ARGS --usage-db USAGE_DB` started by the launcher with `env`, its output in
/// `dir/lastmile.log`.
#[cfg(target_os = "linux")]
fn launch_logged(
    dir: &std::path::Path,
    args: &[&str],
    usage_db: &std::path::Path,
    env: &[(&str, &str)],
) -> lastmile_control::launcher::LaunchedWorker {
    use lastmile_control::launcher::{Launch, Output};
    let db = usage_db.to_str().expect("utf-8 temp dir");
    let mut launch = Launch::new(BIN, args.iter().copied().chain(["--usage-db", db]))
        .output(Output::LogFile(dir.join("lastmile.log")))
        .env("RUST_LOG", "warn");
    for (name, value) in env {
        launch = launch.env(name, value);
    }
    launch.spawn().expect("starting lastmile")
}

/// `serve --workers 2` is a deployment of two replicas run by the controller, each started by
/// the launcher (`--port 0`, the port it reports): the gateway, itself started with `--port 0`
/// through the launcher, puts both in rotation; neither inherits the admin key, and both die
/// with their parent when it is killed with SIGKILL.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_children_inherit_no_secret_and_die_with_their_parent() {
    use lastmile_control::launcher::Stop;
    let dir = temp_dir("workers");
    let usage_db = dir.join("usage.db");
    let args = ["serve", "--workers", "2", "--threads", "1"];
    let parent = launch_logged(&dir, &args, &usage_db, &[("LASTMILE_ADMIN_KEY", ADMIN)]);
    let url = parent
        .listening(Duration::from_secs(60))
        .await
        .expect("the gateway reports its port");
    let deadline = Instant::now() + Duration::from_secs(120);
    let name = lastmile_models::DEFAULT_MODEL_ID;
    loop {
        let status = admin_get(&url, &format!("/admin/deployments/{name}")).await;
        let status = status.as_ref().map(|s| &s["status"]);
        if status.is_some_and(|s| s["ready"] == 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the two workers never became ready: {status:?}\n{}",
            parent.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let children = children_of(parent.pid());
    assert_eq!(children.len(), 2, "two worker processes: {children:?}");
    for c in &children {
        let environ = std::fs::read(format!("/proc/{c}/environ")).expect("environ");
        let leaked = environ
            .split(|b| *b == 0)
            .any(|var| var.starts_with(b"LASTMILE_ADMIN_KEY="));
        assert!(!leaked, "worker {c} inherited LASTMILE_ADMIN_KEY");
        let args = cmdline(*c);
        assert!(
            args.windows(2).any(|w| w == ["--port", "0"]),
            "worker {c} was not started with --port 0: {args:?}"
        );
    }
    // kill -9 of the parent: no orphans.
    parent.stop(Stop::Kill);
    let how = tokio::time::timeout(Duration::from_secs(10), parent.exited())
        .await
        .expect("the parent dies");
    assert!(
        how.contains("SIGKILL") || how.contains("signal: 9"),
        "{how}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !children.iter().all(|c| is_dead(*c)) {
        assert!(
            Instant::now() < deadline,
            "workers outlived their parent: {children:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A GGUF v3 header with `general.alignment` = 0 (candle divides by it) and no tensors.
fn zero_alignment_gguf() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "llama");
    string(&mut b, "general.alignment");
    b.extend(4u32.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b
}

#[test]
fn a_model_file_with_zero_alignment_is_refused_without_a_panic() {
    let dir = temp_dir("gguf");
    let model = dir.join("zero-alignment.gguf");
    std::fs::write(&model, zero_alignment_gguf()).expect("write model");
    let out = Command::new(BIN)
        .args(["generate", "--prompt", "Hi", "--model"])
        .arg(&model)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run lastmile");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("general.alignment"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A gateway subscribed to a worker's KV event feed must not hold the worker's graceful
/// shutdown open: the feed ends when shutdown starts (it used to stream forever, so SIGTERM
/// never finished).
#[tokio::test]
async fn a_worker_with_a_kv_event_subscriber_still_shuts_down() {
    use futures::StreamExt;
    let (mut worker, url) = start_listening(&["serve", "--threads", "1"]);
    wait_healthy(&url).await;
    let feed = reqwest::get(format!("{url}/v1/kv/events"))
        .await
        .expect("subscribe");
    assert_eq!(feed.status(), 200);
    let mut feed = feed.bytes_stream();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(worker.0.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = loop {
        if let Some(s) = worker.0.try_wait().expect("wait") {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(15) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.is_some(),
        "the worker did not finish shutting down within 15 s"
    );
    // The subscriber saw its feed end cleanly.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(item) = feed.next().await {
            if item.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(ended, Ok(true));
}

/// An open API (no admin key) on an address other machines reach is refused at start, for the
/// model gateway and for the sandbox server alike (sandboxes run code: open would be worse).
#[test]
fn an_open_api_on_a_public_address_is_refused() {
    let port = "0".to_string();
    for args in [
        vec![
            "gateway",
            "--worker",
            "http://127.0.0.1:9",
            "--host",
            "0.0.0.0",
            "--port",
            &port,
        ],
        vec!["sandbox", "--host", "0.0.0.0", "--port", &port],
    ] {
        let (code, stderr) = run_until_exit(&args, &[]).expect("it must not start serving");
        assert_ne!(code, 0, "{args:?}");
        assert!(
            stderr.contains("refusing to serve an open API"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn etcd_credentials_and_certificates_are_checked_at_start() {
    let port = "0".to_string();
    let base = ["gateway", "--etcd", "https://127.0.0.1:9", "--port", &port];
    // A certificate file that is not there: named, before anything is served.
    let mut args = base.to_vec();
    args.extend(["--etcd-ca", "/nonexistent/etcd-ca.pem"]);
    let (code, stderr) = run_until_exit(&args, &[]).expect("it must not start serving");
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/etcd-ca.pem"), "{stderr}");
    // A user without a password (an unset LASTMILE_ETCD_PASSWORD): refused, not anonymous.
    let mut args = base.to_vec();
    args.extend(["--etcd-user", "worker"]);
    let (code, stderr) = run_until_exit(&args, &[]).expect("it must not start serving");
    assert_ne!(code, 0);
    assert!(stderr.contains("--etcd-password"), "{stderr}");
}

#[test]
fn an_unknown_routing_policy_is_refused_with_the_choices() {
    let port = "0".to_string();
    let args = [
        "gateway",
        "--worker",
        "http://127.0.0.1:9",
        "--port",
        &port,
        "--policy",
        "fastest",
    ];
    let (code, stderr) = run_until_exit(&args, &[]).expect("refused at once, not served");
    assert_eq!(code, 2, "a usage error: {stderr}");
    assert!(
        stderr.contains("invalid value 'fastest'")
            && stderr.contains("round_robin, random, least_loaded, kv_aware"),
        "{stderr}"
    );
}

/// Every process descended from `pid` (children, their children, ...).
fn descendants_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for c in children_of(p) {
            out.push(c);
            frontier.push(c);
        }
    }
    out
}

/// A sandbox — bubblewrap and everything it runs — goes when lastmile is killed outright,
/// leaving nothing running. (Sandboxes run as an unprivileged user when lastmile is root; that
/// their parent-death signal is armed after the switch of user, which clears it, is tested in
/// `lastmile-process`.)
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_die_with_lastmile_when_it_is_killed_outright() {
    use lastmile_control::launcher::Stop;
    let dir = temp_dir("sandboxes");
    let usage_db = dir.join("usage.db");
    let args = [
        "gateway",
        "--worker",
        "http://127.0.0.1:9",
        "--sandboxes",
        "--admin-key",
        ADMIN,
    ];
    let parent = launch_logged(&dir, &args, &usage_db, &[]);
    let url = parent
        .listening(Duration::from_secs(60))
        .await
        .expect("the gateway reports its port");
    let key = api_key(&url, ADMIN, "agent").await;
    let created: Value = reqwest::Client::new()
        .post(format!("{url}/v2/sandboxes"))
        .header("X-API-KEY", &key)
        .json(&serde_json::json!({"templateID": "base", "timeout": 120}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("created json");
    assert!(created["sandboxID"].is_string(), "{created}");
    let family = descendants_of(parent.pid());
    assert!(
        family
            .iter()
            .any(|p| cmdline(*p).first().is_some_and(|a| a.ends_with("bwrap"))),
        "a bubblewrap process runs the sandbox: {:?}",
        family.iter().map(|p| cmdline(*p)).collect::<Vec<_>>()
    );
    parent.stop(Stop::Kill);
    tokio::time::timeout(Duration::from_secs(10), parent.exited())
        .await
        .expect("the parent dies");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<Vec<String>> = family
            .iter()
            .filter(|p| !is_dead(**p))
            .map(|p| cmdline(*p))
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox processes outlived lastmile: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
