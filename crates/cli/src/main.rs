//! The `lastmile` binary: argument parsing and wiring only.

mod disagg;
mod engine_bench;
mod etcd;
mod fleet;
mod load_bench;
mod mcp_stdio;
mod model_args;
mod sandboxes;
mod serverless;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use lastmile_engine::{EngineHandle, GenerateRequest, GenerationEvent, SamplingParams};
use lastmile_models::ensure_default_model;
use model_args::model_id_from_path;
pub use model_args::{KernelTier, ModelArgs};

/// lastmile: serve LLMs with an OpenAI-compatible API from one binary.
#[derive(Parser)]
#[command(name = "lastmile", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over HTTP with the OpenAI API (fetches the default model on first use).
    /// Also a gateway's worker: internal API, load report, KV event stream.
    #[command(visible_alias = "worker")]
    Serve(ServeArgs),
    /// Complete a raw prompt (no chat template) and print the text.
    Generate(GenerateArgs),
    /// Manage models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Load-test an OpenAI-compatible server (ours, llama.cpp's, vLLM's): latency percentiles,
    /// throughput, JSON and an SVG curve; --compare runs two servers side by side.
    Bench(load_bench::LoadBenchArgs),
    /// Measure the engine's prefill and decode speed (JSON with --json).
    EngineBench(engine_bench::EngineBenchArgs),
    /// Run the gateway: one OpenAI/Anthropic endpoint spreading requests over running workers
    /// (`lastmile serve` processes), with health checks, retries and circuit breakers.
    Gateway(GatewayArgs),
    /// Serve agent sandboxes alone, behind E2B's API (the official `e2b` SDKs work with
    /// E2B_API_URL and E2B_SANDBOX_URL pointing here): isolated environments where agents run
    /// commands and code, with files, limits and timeouts. `serve --config` and `gateway` serve
    /// the same API beside the model API with --sandboxes.
    Sandbox(sandboxes::SandboxServerArgs),
    /// MCP over stdio, for hosts that launch MCP servers as processes: bridges to a lastmile
    /// server's /mcp (its sandboxes as tools), with LASTMILE_API_KEY as the key.
    Mcp(mcp_stdio::McpArgs),
    /// The agent inside a sandbox (started by lastmile itself).
    #[command(hide = true)]
    SandboxAgent,
}

/// Who may call: API keys, the admin key, the usage ledger, and the rule against serving an
/// open API beyond this machine.
#[derive(Args, Clone)]
pub struct AccessArgs {
    /// Admin key (or LASTMILE_ADMIN_KEY): guards /admin, and turns keys on: every API request
    /// then needs a key created with POST /admin/keys (sent as `Authorization: Bearer KEY` or
    /// `x-api-key: KEY`), with its own requests- and tokens-per-minute quotas. Without it the API
    /// is open, which is allowed only on a loopback address unless --insecure.
    #[arg(long, env = "LASTMILE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// SQLite database of API keys and usage per key, deployment and minute (default:
    /// $LASTMILE_HOME/lastmile.db).
    #[arg(long)]
    pub usage_db: Option<PathBuf>,
    /// Listen on a non-loopback address with no API keys: anyone who reaches the port can use
    /// the API (e.g. a worker on a private network behind a gateway).
    #[arg(long)]
    pub insecure: bool,
    /// Key (or LASTMILE_METRICS_KEY) that opens the gateway's /metrics, which names keys and
    /// workers. With keys on, the admin key opens it too; with neither, /metrics is open.
    #[arg(long, env = "LASTMILE_METRICS_KEY", hide_env_values = true)]
    pub metrics_key: Option<String>,
    /// Requests one API key may have in flight at once (beyond: 429 naming the limit).
    #[arg(long, default_value_t = lastmile_gateway::DEFAULT_MAX_IN_FLIGHT_PER_KEY)]
    pub key_max_in_flight: u64,
    /// Name the worker that answered each request in an `x-lastmile-worker` response header
    /// (it shows the workers' addresses; for debugging).
    #[arg(long)]
    pub debug_headers: bool,
}

/// Admin keys shorter than this are warned about.
const SHORT_ADMIN_KEY: usize = 16;

impl AccessArgs {
    /// Refuses an empty or blank admin key (`--admin-key ""`, or `LASTMILE_ADMIN_KEY` set to
    /// an unset shell variable), which would otherwise leave the API and `/admin` open while
    /// looking keyed; warns about a short one.
    pub fn check_admin_key(&self) -> Result<()> {
        let Some(key) = &self.admin_key else {
            return Ok(());
        };
        if key.trim().is_empty() {
            anyhow::bail!(
                "the admin key (--admin-key or LASTMILE_ADMIN_KEY) is empty: give a long random \
                 key (e.g. `openssl rand -hex 32`), or leave both unset for an open API on a \
                 loopback address"
            );
        }
        if key.len() < SHORT_ADMIN_KEY {
            tracing::warn!(
                "the admin key is only {} bytes long: anyone who guesses it controls every API \
                 key; use at least {SHORT_ADMIN_KEY} random bytes (e.g. `openssl rand -hex 32`)",
                key.len()
            );
        }
        Ok(())
    }

    /// Refuses an open API on a non-loopback `host` unless --insecure, and a blank admin key.
    pub fn check_exposure(&self, host: &str, keys_possible: bool) -> Result<()> {
        self.check_admin_key()?;
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let keyed = keys_possible && self.admin_key.is_some();
        if loopback || keyed || self.insecure {
            return Ok(());
        }
        let how = if keys_possible {
            "give it --admin-key (every request then needs an API key)"
        } else {
            "put it behind `lastmile serve --config` or `lastmile gateway` with --admin-key"
        };
        anyhow::bail!(
            "refusing to serve an open API on {host} (reachable from other machines): {how}, or \
             pass --insecure to serve it open anyway"
        )
    }

    /// Applies these settings to a gateway: tenants, the metrics key, debug headers.
    pub fn configure(&self, config: &mut lastmile_gateway::GatewayConfig) {
        config.tenants = Some(self.tenants());
        config.metrics_key = self.metrics_key.clone();
        config.debug_headers = self.debug_headers;
    }

    /// The tenants settings: the ledger (always kept) and the admin key, if any.
    pub fn tenants(&self) -> lastmile_gateway::TenantsConfig {
        let db = self
            .usage_db
            .clone()
            .unwrap_or_else(|| lastmile_models::lastmile_home().join("lastmile.db"));
        let mut t = lastmile_gateway::TenantsConfig::new(db);
        t.admin_key = self.admin_key.clone();
        t.max_in_flight_per_key = self.key_max_in_flight;
        t
    }
}

#[derive(Args)]
struct GatewayArgs {
    #[command(flatten)]
    access: AccessArgs,
    /// A worker's base URL, e.g. http://127.0.0.1:8081 (repeat for each worker).
    #[arg(long = "worker", required_unless_present = "etcd")]
    workers: Vec<String>,
    /// Find workers in etcd (client URLs, comma-separated): every `lastmile serve --etcd`
    /// registered under --etcd-prefix joins the rotation, and leaves it when it stops or dies.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix workers register under in etcd.
    #[arg(long, default_value = lastmile_discovery::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Workers from etcd join only if their address is in one of these (comma-separated CIDR
    /// networks, addresses or host names: `10.0.0.0/8,worker-3.internal`). Without it any
    /// registered address joins, and whoever can write to etcd receives prompts.
    #[arg(long, value_delimiter = ',', requires = "etcd")]
    worker_allow: Vec<lastmile_gateway::WorkerAllow>,
    #[command(flatten)]
    etcd_access: etcd::EtcdAccess,
    /// Routing policy: round_robin, random, least_loaded, or kv_aware (to the worker already
    /// holding the longest prefix of the prompt, weighed against load).
    #[arg(long, default_value = "round_robin", value_parser = policy_parser())]
    policy: lastmile_router::PolicyKind,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: a free one, picked by the system). Once listening, the server
    /// prints `lastmile: listening on http://HOST:PORT` (the port it got) as one line on stdout.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// How often each worker's /health is polled, in milliseconds.
    #[arg(long, default_value_t = 200)]
    health_interval_ms: u64,
    /// How long a worker may hold a request without a byte of answer (head, or next chunk of a
    /// stream) before the gateway looks at its health, in milliseconds: from then on a worker
    /// whose health check fails (hung, stopped, its engine stalled) loses the request to another
    /// worker (or, mid-stream, the client gets a final error event). Healthy slow workers keep it.
    #[arg(long, default_value_t = 10_000)]
    worker_timeout_ms: u64,
    /// kv_aware: weight of a worker's load (a running or waiting request counts as 32 prompt
    /// tokens) against the prompt tokens its cache saves; 0 routes on cache overlap alone.
    #[arg(long, default_value_t = 1.0)]
    kv_balance: f64,
    /// kv_aware: seconds a worker's KV event feed may stay silent (the worker sends a
    /// keep-alive every third of it) before the gateway drops that worker's prefix index and
    /// subscribes afresh: a link that died without a word does not leave the index stale.
    #[arg(long, default_value_t = 15.0)]
    kv_events_idle_secs: f64,
    /// Also serve agent sandboxes (E2B's API) on this port, behind the same keys.
    #[arg(long)]
    sandboxes: bool,
    #[command(flatten)]
    sandbox: sandboxes::SandboxOptions,
    #[command(flatten)]
    disagg: disagg::GatewayDisaggArgs,
}

/// `--policy`: one of the routing policies' names (listed by `--help`), as the policy.
fn policy_parser() -> impl clap::builder::TypedValueParser<Value = lastmile_router::PolicyKind> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(lastmile_router::PolicyKind::ALL.map(|p| p.name()))
        .try_map(|name| name.parse::<lastmile_router::PolicyKind>())
}

fn gateway(args: GatewayArgs) -> Result<()> {
    args.access.check_exposure(&args.host, true)?;
    let mut config = lastmile_gateway::GatewayConfig::new(args.workers.clone());
    args.access.configure(&mut config);
    if !args.etcd.is_empty() {
        config.etcd = Some(lastmile_gateway::EtcdDiscovery {
            client: args.etcd_access.config(args.etcd.clone()),
            prefix: args.etcd_prefix.clone(),
            allow: args.worker_allow.clone(),
        });
    }
    config.policy = args.policy;
    config.health_interval = std::time::Duration::from_millis(args.health_interval_ms);
    config.worker_timeout = std::time::Duration::from_millis(args.worker_timeout_ms);
    config.kv_balance = args.kv_balance;
    config.kv_events_idle = std::time::Duration::try_from_secs_f64(args.kv_events_idle_secs)
        .map_err(|e| anyhow::anyhow!("--kv-events-idle-secs: {e}"))?;
    config.disagg = args.disagg.routing(args.policy)?;
    let banner = format!(
        "gateway over {} worker(s){}, policy {}",
        config.workers.len(),
        if args.etcd.is_empty() {
            String::new()
        } else {
            format!(" and those registered in etcd under {}", args.etcd_prefix)
        },
        args.policy.name()
    );
    let sandbox = args.sandboxes.then_some(&args.sandbox);
    run_gateway(&args.host, args.port, config, &banner, sandbox)
}

/// Serves a gateway on host:port (with sandboxes when given their options) until Ctrl-C or
/// SIGTERM.
fn run_gateway(
    host: &str,
    port: u16,
    config: lastmile_gateway::GatewayConfig,
    banner: &str,
    sandbox: Option<&sandboxes::SandboxOptions>,
) -> Result<()> {
    config.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let svc = sandbox.map(|s| s.start()).transpose()?;
        let (listener, addr) = bind(host, port).await?;
        let handle = lastmile_gateway::GatewayHandle::build(config).await?;
        let admin = match (&svc, sandbox) {
            (Some(s), Some(opts)) => {
                sandboxes::attach(&handle, s.clone(), listener.local_addr().ok(), opts)
            }
            _ => axum::Router::new(),
        };
        eprintln!("lastmile: http://{addr}: {banner}");
        announce_listening(&addr);
        let served = handle.serve(listener, admin, shutdown_signal()).await;
        if let Some(s) = svc {
            s.shutdown().await;
        }
        served?;
        Ok(())
    })
}

/// Listens on host:port (port 0: one the system picks); returns the listener and the address
/// as text, with the port it got.
pub(crate) async fn bind(host: &str, port: u16) -> Result<(tokio::net::TcpListener, String)> {
    let wanted = format!("{host}:{port}");
    let listener = tokio::net::TcpListener::bind(&wanted)
        .await
        .with_context(|| format!("binding {wanted}"))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("reading the address bound for {wanted}"))?;
    // Keep the host as given (`localhost` stays readable); an IP address is written by
    // `SocketAddr` (IPv6 in brackets).
    let addr = match host.parse::<std::net::IpAddr>() {
        Ok(_) => bound.to_string(),
        Err(_) => format!("{host}:{}", bound.port()),
    };
    Ok((listener, addr))
}

/// Says on stdout, in the one line launchers wait for (`lastmile_control::launcher`, the
/// benchmark scripts), that this server listens at `addr`: called once, just before serving.
pub(crate) fn announce_listening(addr: &str) {
    println!(
        "{}",
        lastmile_control::launcher::listening_line(&format!("http://{addr}"))
    );
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download and verify the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the cache.
    Pull,
}

/// How long each stage of a start took, in milliseconds.
pub type StageTimes = Vec<(String, f64)>;

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    access: AccessArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: a free one, picked by the system). Once listening, the server
    /// prints `lastmile: listening on http://HOST:PORT` (the port it got) as one line on stdout.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model id clients must send (default: the default model's id, or the file name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Largest accepted request body, in bytes (larger ones get 413).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Run this many worker processes behind a kv_aware gateway on --port (1: no gateway): a
    /// deployment of fixed size run by the controller (a worker that crashes is replaced;
    /// /admin/deployments shows them). --threads is then per worker (default: the cores
    /// divided among the workers).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Register this worker in etcd (client URLs, comma-separated) so that gateways started with
    /// --etcd find it: under a lease kept alive every third of --etcd-ttl, revoked on shutdown
    /// (before in-flight requests drain), expired when the process dies.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix to register under.
    #[arg(long, default_value = lastmile_discovery::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Lease TTL in seconds: how long a dead worker stays listed.
    #[arg(long, default_value_t = 3)]
    etcd_ttl: u64,
    #[command(flatten)]
    etcd_access: etcd::EtcdAccess,
    /// URL gateways reach this worker at (default: http://HOST:PORT; required when listening on
    /// a wildcard address).
    #[arg(long)]
    advertise_url: Option<String>,
    /// Serve the deployments declared in this YAML file behind one gateway on --port: each runs
    /// between its min_replicas (0: scales to zero when idle) and max_replicas worker processes,
    /// scaled on load; a request at zero replicas waits while one starts. See
    /// docs/deployments.md. The model options above are then ignored (each deployment names its
    /// model and threads; `args` passes other options to its replicas).
    #[arg(long, conflicts_with_all = ["workers", "etcd"])]
    config: Option<PathBuf>,
    /// With --config: also serve agent sandboxes (E2B's API) on --port, behind the same keys.
    #[arg(long, requires = "config")]
    sandboxes: bool,
    #[command(flatten)]
    sandbox: sandboxes::SandboxOptions,
    #[command(flatten)]
    disagg: disagg::DisaggArgs,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The raw prompt to complete.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed for sampling.
    #[arg(long)]
    seed: Option<u64>,
}

/// When `main` began (for the startup breakdown `serve` reports).
static PROCESS_START: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

fn main() -> Result<()> {
    // Inside a sandbox, before anything else: every sandbox start waits for this.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "sandbox-agent")
    {
        sandboxes::agent();
    }
    std::sync::LazyLock::force(&PROCESS_START);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rmcp logs each MCP session's start and end at info: one line per request
                // for stateless (2026-07-28) clients.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Generate(args) => generate(args),
        Command::Models {
            command: ModelsCommand::Pull,
        } => {
            let path = ensure_default_model()?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Bench(args) => load_bench::run(args),
        Command::EngineBench(args) => engine_bench::run(args),
        Command::Gateway(args) => gateway(args),
        Command::Sandbox(args) => sandboxes::serve(args),
        Command::SandboxAgent => sandboxes::agent(),
        Command::Mcp(args) => mcp_stdio::run(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if let Some(config) = args.config.clone() {
        args.access.check_exposure(&args.host, true)?;
        return serverless::serve_deployments(args, &config);
    }
    check_serve_args(&args)?;
    if args.workers > 1 {
        return fleet::serve_fleet(args);
    }
    let (engine, id, mut startup_ms) = args.model.start_engine_timed()?;
    startup_ms.push((
        "main to ready".into(),
        PROCESS_START.elapsed().as_secs_f64() * 1e3,
    ));
    let config = lastmile_worker::ServerConfig {
        model_id: args.served_model_name.clone().unwrap_or(id),
        max_body_bytes: args.max_body_bytes,
        startup_ms,
        disagg: args.disagg.config(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (listener, addr) = bind(&args.host, args.port).await?;
        tracing::info!("serving {} on http://{addr}", config.model_id);
        eprintln!(
            "lastmile: serving `{}` on http://{addr} (OpenAI API at /v1)",
            config.model_id
        );
        announce_listening(&addr);
        let registration = register_in_etcd(&args, &addr, &config.model_id).await?;
        let shutdown = async move {
            shutdown_signal().await;
            // Out of every gateway's rotation first, then let in-flight requests finish.
            if let Some(r) = registration {
                if let Err(e) = r.deregister().await {
                    tracing::warn!("leaving etcd: {e}");
                }
            }
        };
        warm_grammars_in_background(&engine)?;
        lastmile_worker::serve(listener, engine.clone(), config, shutdown).await?;
        persist_kv(&engine).await;
        Ok(())
    })
}

/// Saves the prefix cache's blocks to the disk tier (where there is one) as the server stops,
/// so that the next process on the directory finds them.
async fn persist_kv(engine: &EngineHandle) {
    let started = std::time::Instant::now();
    match engine.persist_kv().await {
        Ok(0) => {}
        Ok(n) => eprintln!(
            "lastmile: saved {n} KV blocks to the disk tier in {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => tracing::warn!("saving the KV cache to disk: {e}"),
    }
}

/// Refuses `serve` options that do not go together.
fn check_serve_args(args: &ServeArgs) -> Result<()> {
    // A single worker has no keys of its own (a gateway in front of it does).
    let keys_possible = args.workers > 1;
    args.access.check_exposure(&args.host, keys_possible)?;
    if args.access.admin_key.is_some() && !keys_possible {
        anyhow::bail!(
            "--admin-key needs a gateway: use `lastmile serve --config` or `--workers N`, or \
             `lastmile gateway`"
        );
    }
    if args.access.metrics_key.is_some() && !keys_possible {
        anyhow::bail!(
            "--metrics-key guards a gateway's /metrics: use `lastmile serve --config` or \
             `--workers N`, or `lastmile gateway`"
        );
    }
    if args.workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    args.disagg.check()?;
    if args.workers > 1 && args.disagg.role != lastmile_protocol::WorkerRole::Both {
        anyhow::bail!("--role applies to one worker: start each with its own `lastmile serve`");
    }
    if args.workers > 1 && !args.etcd.is_empty() {
        anyhow::bail!(
            "--etcd registers one worker: start each worker with its own `lastmile serve --etcd`"
        );
    }
    Ok(())
}

/// Registers this worker (listening at `addr`, serving `model`) in etcd under a lease, with
/// `--etcd`; `None` without.
async fn register_in_etcd(
    args: &ServeArgs,
    addr: &str,
    model: &str,
) -> Result<Option<lastmile_discovery::Registration>> {
    if args.etcd.is_empty() {
        return Ok(None);
    }
    let url = match &args.advertise_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if args.host == "0.0.0.0" || args.host == "::" => anyhow::bail!(
            "listening on {} needs --advertise-url for etcd (how gateways reach this worker)",
            args.host
        ),
        None => format!("http://{addr}"),
    };
    let info = lastmile_discovery::WorkerInfo {
        url: url.clone(),
        model: model.to_string(),
        role: args.disagg.role.name().into(),
    };
    let etcd = lastmile_discovery::Etcd::connect(&args.etcd_access.config(args.etcd.clone()))?;
    let r = lastmile_discovery::Registration::start(etcd, &args.etcd_prefix, info, args.etcd_ttl)
        .await
        .context("registering with etcd")?;
    eprintln!(
        "lastmile: registered {url} in etcd under {}",
        args.etcd_prefix
    );
    Ok(Some(r))
}

/// Structured output and tool calls need a vocabulary index: built while idle, at the lowest
/// priority, so that a replica started for a burst serves the burst first.
fn warm_grammars_in_background(engine: &lastmile_engine::EngineHandle) -> Result<()> {
    let warm = engine.clone();
    std::thread::Builder::new()
        .name("lastmile-grammar-warmup".into())
        .spawn(move || {
            lower_this_threads_priority();
            if let Err(e) = warm.warm_grammars() {
                tracing::warn!("structured output is unavailable for this model: {e}");
            }
        })?;
    Ok(())
}

/// Makes the calling thread the last to get a core (nice 19): background work that must not
/// compete with requests.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes that
    // thread's nice value (Linux applies PRIO_PROCESS to a single thread given its tid).
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

/// Resolves on Ctrl-C or SIGTERM (what `kill` and Kubernetes send), so in-flight requests
/// finish and `serve --workers` stops its worker processes.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
}

fn generate(args: GenerateArgs) -> Result<()> {
    use std::io::Write;
    let (engine, _) = args.model.start_engine()?;
    let prompt = engine.tokenizer().encode_prompt(&args.prompt)?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let mut stream = engine.submit(GenerateRequest {
        prompt,
        sampling,
        max_tokens: args.max_tokens,
        stop: vec![],
        ignore_eos: false,
        logprobs: None,
        prompt_logprobs: None,
        grammar: None,
        speculation: None,
    })?;
    let mut out = std::io::stdout().lock();
    write!(out, "{}", args.prompt)?;
    while let Some(ev) = stream.blocking_next() {
        match ev {
            GenerationEvent::Token { text, .. } => {
                write!(out, "{text}")?;
                out.flush()?;
            }
            GenerationEvent::Finished { text, .. } => {
                writeln!(out, "{text}")?;
                break;
            }
            GenerationEvent::PromptLogprobs(_) => {}
            GenerationEvent::Failed(e) => anyhow::bail!("generation failed: {e}"),
        }
    }
    Ok(())
}
