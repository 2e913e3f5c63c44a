//! Agent sandboxes in the binary: `lastmile sandbox` (a sandbox-only server), `--sandboxes`
//! on `serve --config` and `gateway` (the same API on the model API's port, with the same
//! keys), and the hidden `sandbox-agent` that runs inside each sandbox.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use lastmile_gateway::{CallerId, GatewayHandle};
use lastmile_sandbox::{AgentCommand, SandboxConfig, SandboxService};

/// Sandbox options shared by every command that can serve them.
#[derive(Args, Clone, Debug)]
pub struct SandboxOptions {
    /// Isolation backend: bwrap (Linux namespaces + seccomp + cgroups; needs bubblewrap) or
    /// firecracker (a microVM per sandbox; needs /dev/kvm that boots guests).
    #[arg(long, default_value = "bwrap")]
    pub sandbox_backend: lastmile_sandbox::BackendKind,
    /// Run sandboxes even where the host lacks memory, pids or cpu cgroup controllers (their
    /// limits then do not hold).
    #[arg(long)]
    pub sandbox_no_limits: bool,
    /// Lifetime of a sandbox created without `timeout`, in seconds.
    #[arg(long, default_value_t = 300)]
    pub sandbox_default_timeout: u64,
    /// Longest lifetime a client may ask for, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub sandbox_max_timeout: u64,
    /// Live sandboxes per API key.
    #[arg(long, default_value_t = 20)]
    pub sandbox_max_per_key: usize,
    /// CPU cores per API key, over its live sandboxes.
    #[arg(long, default_value_t = 16.0)]
    pub sandbox_key_cpus: f64,
    /// Memory per API key over its live sandboxes, MiB.
    #[arg(long, default_value_t = 16_384)]
    pub sandbox_key_memory_mib: u64,
    /// Live sandboxes on this server, all keys together.
    #[arg(long, default_value_t = 1000)]
    pub sandbox_max: usize,
    /// More templates (YAML: `templates: [{name, rootfs, cpus, memory_mb, disk_mb, pids,
    /// start_cmd, code_interpreter, aliases}]`); one named like a built-in replaces it. See
    /// docs/sandboxes.md.
    #[arg(long)]
    pub sandbox_templates: Option<std::path::PathBuf>,
    /// Offer internet access to sandboxes created with `allow_internet_access=True` (through
    /// slirp4netns, behind an nftables filter: the host's loopback and addresses, private,
    /// link-local and reserved ranges and IPv6 are always refused). Needs the slirp4netns and
    /// nftables packages.
    #[arg(long)]
    pub sandbox_egress: bool,
    /// Ranges sandboxes may reach although they are refused by default (an internal package
    /// mirror: `10.1.2.3/32`), comma-separated IPv4 CIDR blocks.
    #[arg(long, value_delimiter = ',', requires = "sandbox_egress")]
    pub sandbox_egress_allow: Vec<lastmile_sandbox::backend::egress::Ipv4Net>,
    /// firecracker backend: the guest kernel (an uncompressed vmlinux).
    #[arg(long)]
    pub sandbox_kernel: Option<std::path::PathBuf>,
    /// firecracker backend: the guest root image (ext4, mounted read-only), with lastmile at
    /// /usr/bin/lastmile (the guest's first process is its sandbox agent) and python3.
    #[arg(long)]
    pub sandbox_rootfs_image: Option<std::path::PathBuf>,
    /// firecracker backend: the firecracker executable.
    #[arg(long, default_value = "firecracker")]
    pub sandbox_firecracker: std::path::PathBuf,
    /// Serve the official MCP conformance suite's fixtures at /mcp beside the real tools (the
    /// `test_*` tools, `test://` resources and prompts it calls by name). For running the suite;
    /// some of them ask the client for a model answer or the user's input.
    #[arg(long)]
    pub mcp_conformance_fixtures: bool,
}

impl SandboxOptions {
    /// Starts the service (proving the backend works on this host).
    pub fn start(&self) -> Result<Arc<SandboxService>> {
        let exe = std::env::current_exe().context("locating the lastmile binary")?;
        let mut c = SandboxConfig::new(AgentCommand {
            path: exe,
            args: vec!["sandbox-agent".into()],
        });
        c.backend = self.sandbox_backend;
        c.require_limits = !self.sandbox_no_limits;
        c.service.default_timeout = std::time::Duration::from_secs(self.sandbox_default_timeout);
        c.service.max_timeout = std::time::Duration::from_secs(self.sandbox_max_timeout);
        c.service.per_key = lastmile_sandbox::KeyLimits {
            sandboxes: self.sandbox_max_per_key,
            cpus: self.sandbox_key_cpus,
            memory_mb: self.sandbox_key_memory_mib,
        };
        c.service.max_sandboxes = self.sandbox_max;
        c.firecracker.kernel = self.sandbox_kernel.clone();
        c.firecracker.rootfs = self.sandbox_rootfs_image.clone();
        c.firecracker.program = self.sandbox_firecracker.clone();
        c.egress = self
            .sandbox_egress
            .then(|| self.sandbox_egress_allow.clone());
        if let Some(path) = &self.sandbox_templates {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            c.service.templates =
                lastmile_sandbox::template::with_file(&text, &path.display().to_string())?;
        }
        Ok(lastmile_sandbox::start(c)?)
    }
}

/// Puts the sandbox API (E2B's, and MCP's at `/mcp`) on `handle`'s port, behind its keys, with
/// its metrics and an `/admin/sandboxes` route (returned, to be served with the gateway's admin
/// routes).
///
/// With `models` (the server's own address, where it also serves models), MCP's `chat` and
/// `list_models` tools reach them over loopback with the caller's key.
pub fn attach(
    handle: &GatewayHandle,
    svc: Arc<SandboxService>,
    models: Option<std::net::SocketAddr>,
    opts: &SandboxOptions,
) -> axum::Router {
    let h = handle.clone();
    let auth: lastmile_sandbox::e2b::Authenticate = Arc::new(move |headers| {
        Ok(match h.caller(headers)? {
            CallerId::Open => "-".to_string(),
            CallerId::Admin => lastmile_sandbox::service::ADMIN.to_string(),
            CallerId::Key(id) => id,
        })
    });
    let s = svc.clone();
    handle.extra_metrics(move || lastmile_sandbox::metrics::render(&s));
    let s = svc.clone();
    // MCP at /mcp: the same sandboxes as tools, behind the same keys.
    let models = models.map(|mut a| {
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        format!("http://{a}")
    });
    let mcp = lastmile_mcp::router(
        svc.clone(),
        auth.clone(),
        models,
        opts.mcp_conformance_fixtures,
    );
    handle.wrap_router(move |app| lastmile_sandbox::e2b::wrap(app.merge(mcp), s, auth));
    lastmile_sandbox::e2b::admin_router(svc)
}

/// `lastmile sandbox`: the sandbox API alone.
#[derive(Args)]
pub struct SandboxServerArgs {
    #[command(flatten)]
    pub access: crate::AccessArgs,
    #[command(flatten)]
    pub sandbox: SandboxOptions,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: a free one, picked by the system). Once listening, the server
    /// prints `lastmile: listening on http://HOST:PORT` (the port it got) as one line on stdout.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
}

/// Runs `lastmile sandbox` until Ctrl-C or SIGTERM; every sandbox ends with it.
pub fn serve(args: SandboxServerArgs) -> Result<()> {
    args.access.check_exposure(&args.host, true)?;
    let mut config = lastmile_gateway::GatewayConfig::new(Vec::new());
    config.allow_no_workers = true;
    config.tenants = Some(args.access.tenants());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let svc = args.sandbox.start()?;
        let (listener, addr) = crate::bind(&args.host, args.port).await?;
        let handle = GatewayHandle::build(config).await?;
        let admin = attach(&handle, svc.clone(), None, &args.sandbox);
        eprintln!(
            "lastmile: http://{addr}: sandboxes ({}); E2B SDKs: E2B_API_URL=E2B_SANDBOX_URL=http://{addr}",
            svc.backend()
        );
        crate::announce_listening(&addr);
        let served = handle.serve(listener, admin, crate::shutdown_signal()).await;
        svc.shutdown().await;
        served?;
        Ok(())
    })
}

/// `lastmile sandbox-agent`: the agent inside a sandbox (started by the backend, not by hand):
/// on its stdin and stdout, or in a microVM `--vsock PORT` (with `--init` as the guest's first
/// process).
pub fn agent() -> ! {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let code = match args.iter().position(|a| a == "--vsock") {
        Some(i) => {
            let port = args
                .get(i + 1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(lastmile_sandbox::agent::VSOCK_PORT);
            lastmile_sandbox::agent::run_vsock(port, args.iter().any(|a| a == "--init"))
        }
        None => lastmile_sandbox::agent::run(),
    };
    std::process::exit(code)
}
