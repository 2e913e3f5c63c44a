//! `lastmile serve --workers N`: N local worker processes (this binary, `serve` on free ports)
//! behind an in-process gateway routing `kv_aware`, all in one command and with no external
//! service. The workers are killed when the gateway stops, and die with it if it is killed;
//! they are started by `lastmile_control::launcher`, without this process's secrets.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lastmile_engine::fetch::ensure_default_model;

use lastmile_engine::fetch::DEFAULT_MODEL_ID;

use crate::{model_id_from_path, run_gateway, ServeArgs};

/// Worker processes, killed on drop.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs the fleet until Ctrl-C.
pub(crate) fn serve_fleet(args: ServeArgs) -> Result<()> {
    let n = args.workers;
    // Fetch the model once, here, rather than in every worker at the same time.
    let (path, id) = match &args.model.model {
        Some(p) => (p.clone(), model_id_from_path(p)),
        None => (ensure_default_model()?, DEFAULT_MODEL_ID.to_string()),
    };
    let name = args.served_model_name.clone().unwrap_or(id);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = args.model.threads.unwrap_or((cores / n).max(1));
    let exe = std::env::current_exe().context("locating the lastmile binary")?;
    let m = &args.model;
    let mut workers = Workers(Vec::with_capacity(n));
    let mut urls = Vec::with_capacity(n);
    for _ in 0..n {
        let port = free_port()?;
        let mut cmd = lastmile_control::launcher::worker_command(&exe);
        cmd.arg("serve")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--model")
            .arg(&path)
            .args(["--served-model-name", &name])
            .args(["--threads", &threads.to_string()])
            .args(["--kv-cache-mib", &m.kv_cache_mib.to_string()])
            .args(["--max-batch-tokens", &m.max_batch_tokens.to_string()])
            .args(["--max-running", &m.max_running.to_string()])
            .args(["--prefill-chunk", &m.prefill_chunk.to_string()])
            .args(["--max-waiting", &m.max_waiting.to_string()])
            .args(["--max-body-bytes", &args.max_body_bytes.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if m.no_prefix_cache {
            cmd.arg("--no-prefix-cache");
        }
        if let Some(t) = m.itl_target_ms {
            cmd.args(["--itl-target-ms", &t.to_string()]);
        }
        workers.0.push(cmd.spawn().context("starting a worker")?);
        urls.push(format!("http://127.0.0.1:{port}"));
    }
    // A worker listens once its model is loaded.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (i, url) in urls.iter().enumerate() {
        let addr = url.trim_start_matches("http://");
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = workers.0[i].try_wait() {
                bail!("worker {i} exited before it was ready ({status})");
            }
            if Instant::now() > deadline {
                bail!("worker {i} was not ready within 120 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut config = lastmile_gateway::GatewayConfig::new(urls);
    config.policy = lastmile_router::PolicyKind::KvAware;
    config.max_body_bytes = args.max_body_bytes;
    args.access.configure(&mut config);
    let banner = format!(
        "serving `{name}` through a kv_aware gateway over {n} worker processes ({threads} threads \
         each)"
    );
    run_gateway(&args.host, args.port, config, &banner, None)?;
    drop(workers);
    Ok(())
}
