//! `lastmile serve --config deployments.yaml`: the deployments in the file behind one gateway,
//! each scaled by the controller between its `min_replicas` and `max_replicas` worker processes
//! (this binary, `serve` on free local ports), scaling to zero when idle and back on the first
//! request, which the gateway's activator holds meanwhile. The admin API (`/admin/deployments`)
//! shows each deployment's replicas. `serve --workers N` runs here too, as one deployment of
//! fixed size ([`run_deployments`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lastmile_control::controller::{Balancer, Controller, ControllerConfig, Load};
use lastmile_control::deployments::{DeploymentSpec, Deployments};
use lastmile_control::supervisor::{LocalProcesses, ReplicaSpec};
use lastmile_gateway::{DeploymentRoute, GatewayConfig, GatewayHandle};
use lastmile_models::ensure_default_model;

use crate::ServeArgs;

/// The gateway as the controller's front door.
struct GatewayBalancer(GatewayHandle);

impl Balancer for GatewayBalancer {
    fn load(&self, deployment: &str) -> Load {
        let l = self.0.load(deployment);
        Load {
            in_flight: l.in_flight,
            held: l.held,
            ttft_p90: l.ttft_p90,
            itl_p90: l.itl_p90,
            arrivals: l.arrivals,
        }
    }

    fn replica_ready(&self, deployment: &str, url: &str) {
        self.0.add_replica(url, deployment);
    }

    fn replica_gone(&self, _deployment: &str, url: &str) {
        self.0.remove_replica(url);
    }

    fn replicas_starting(&self, deployment: &str, n: usize) {
        self.0.replicas_starting(deployment, n);
    }
}

/// Where a deployment's model is: the default model (fetched once, here), or a path taken
/// relative to the deployments file.
fn resolve_model(model: Option<&Path>, config: &Path, name: &str) -> Result<PathBuf> {
    let Some(model) = model else {
        return ensure_default_model().context("fetching the default model");
    };
    let path = if model.is_relative() {
        config.parent().unwrap_or(Path::new(".")).join(model)
    } else {
        model.to_path_buf()
    };
    if !path.exists() {
        bail!(
            "{}: deployment `{name}`: model {} does not exist",
            config.display(),
            path.display()
        );
    }
    Ok(path)
}

/// Serves the deployments of `config` until Ctrl-C or SIGTERM, then stops every replica.
pub(crate) fn serve_deployments(args: ServeArgs, config: &Path) -> Result<()> {
    let deployments = Deployments::load(config)?;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mut specs = Vec::with_capacity(deployments.list.len());
    for d in &deployments.list {
        let model = resolve_model(d.model.as_deref(), config, &d.name)?;
        let threads = d.threads.unwrap_or((cores / d.max_replicas).max(1));
        let replica = ReplicaSpec {
            deployment: d.name.clone(),
            model,
            threads,
            args: d.args.clone(),
        };
        specs.push((d.clone(), replica));
    }
    let names: Vec<String> = deployments
        .list
        .iter()
        .map(|d| {
            format!(
                "`{}` ({}..={} replicas)",
                d.name, d.min_replicas, d.max_replicas
            )
        })
        .collect();
    run_deployments(args, specs, &format!("serving {}", names.join(", ")))
}

/// Serves `deployments` behind one gateway, each run by the controller, until Ctrl-C or
/// SIGTERM, then stops every replica; `banner` says what is served.
pub(crate) fn run_deployments(
    args: ServeArgs,
    specs: Vec<(DeploymentSpec, ReplicaSpec)>,
    banner: &str,
) -> Result<()> {
    let mut gateway = GatewayConfig::new(Vec::new());
    gateway.max_body_bytes = args.max_body_bytes;
    args.access.configure(&mut gateway);
    gateway.deployments = specs
        .iter()
        .map(|(d, _)| DeploymentRoute {
            name: d.name.clone(),
            policy: d.routing,
            queue: d.queue,
            hold_timeout: d.hold_timeout,
            capacity_per_replica: d.autoscaling.target_concurrency,
        })
        .collect();
    let exe = std::env::current_exe().context("locating the lastmile binary")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (listener, addr) = crate::bind(&args.host, args.port).await?;
        let sandboxes = args.sandboxes.then(|| args.sandbox.start()).transpose()?;
        let handle = GatewayHandle::build(gateway).await?;
        let sandbox_admin = match &sandboxes {
            Some(s) => crate::sandboxes::attach(
                &handle,
                s.clone(),
                listener.local_addr().ok(),
                &args.sandbox,
            ),
            None => axum::Router::new(),
        };
        let controller = Controller::start(
            specs,
            Arc::new(LocalProcesses::new(exe)),
            Arc::new(GatewayBalancer(handle.clone())),
            ControllerConfig::default(),
        );
        let c = controller.clone();
        handle.on_demand(move |d| c.wake(d));
        let c = controller.clone();
        handle.extra_metrics(move || c.metrics());
        eprintln!(
            "lastmile: http://{addr}: {banner} (OpenAI API at /v1, admin at /admin/deployments)"
        );
        crate::announce_listening(&addr);
        let served = handle
            .serve(
                listener,
                lastmile_control::admin::router(controller.clone()).merge(sandbox_admin),
                crate::shutdown_signal(),
            )
            .await;
        controller.shutdown().await;
        if let Some(s) = sandboxes {
            s.shutdown().await;
        }
        served?;
        Ok(())
    })
}
