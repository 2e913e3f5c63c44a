//! `lastmile serve --workers N`: one deployment of fixed size N (`DeploymentSpec::fixed`: no
//! scaling, never to zero) run by the controller, as `serve --config` runs its deployments:
//! N local worker processes (this binary, `serve --port 0`, started by
//! `lastmile_control::launcher` without this process's secrets and dying with it) behind an
//! in-process gateway routing `kv_aware`, all in one command and with no external service. A
//! worker that crashes is replaced; requests that arrive before a worker is ready are held.

use anyhow::{Context, Result};
use lastmile_control::deployments::DeploymentSpec;
use lastmile_control::supervisor::ReplicaSpec;
use lastmile_models::{ensure_default_model, DEFAULT_MODEL_ID};

use crate::{model_id_from_path, ServeArgs};

/// Runs the fleet until Ctrl-C or SIGTERM.
pub(crate) fn serve_fleet(args: ServeArgs) -> Result<()> {
    let n = args.workers;
    // Fetch the model once, here, rather than in every worker at the same time.
    let (path, id) = match &args.model.model {
        Some(p) => (p.clone(), model_id_from_path(p)),
        None => (
            ensure_default_model().context("fetching the default model")?,
            DEFAULT_MODEL_ID.to_string(),
        ),
    };
    let name = args.served_model_name.clone().unwrap_or(id);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = args.model.threads.unwrap_or((cores / n).max(1));
    let m = &args.model;
    let mut worker_args: Vec<String> = [
        ("--kv-cache-mib", m.kv_cache_mib.to_string()),
        ("--max-batch-tokens", m.max_batch_tokens.to_string()),
        ("--max-running", m.max_running.to_string()),
        ("--prefill-chunk", m.prefill_chunk.to_string()),
        ("--max-waiting", m.max_waiting.to_string()),
        ("--max-body-bytes", args.max_body_bytes.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    if m.no_prefix_cache {
        worker_args.push("--no-prefix-cache".into());
    }
    if let Some(t) = m.itl_target_ms {
        worker_args.extend(["--itl-target-ms".into(), t.to_string()]);
    }
    // What each worker computes with, as this command was told.
    if let Some(tier) = clap::ValueEnum::to_possible_value(&m.kernels) {
        worker_args.extend(["--kernels".into(), tier.get_name().to_string()]);
    }
    worker_args.extend([
        "--speculative-max-draft".into(),
        m.speculative_max_draft.to_string(),
        "--speculative-ngram".into(),
        m.speculative_ngram.to_string(),
        "--device".into(),
        m.device.to_string(),
    ]);
    if let Some(draft) = &m.draft_model {
        worker_args.extend(["--draft-model".into(), draft.to_string_lossy().into_owned()]);
    }
    if let Some(dir) = &m.kv_disk_dir {
        // Each worker takes its own slot under the one directory.
        worker_args.extend([
            "--kv-disk-dir".into(),
            dir.to_string_lossy().into_owned(),
            "--kv-disk-gib".into(),
            m.kv_disk_gib.to_string(),
        ]);
    }
    let mut deployment = DeploymentSpec::fixed(&name, Some(path.clone()), n);
    deployment.threads = Some(threads);
    deployment.args = worker_args.clone();
    let replica = ReplicaSpec {
        deployment: name.clone(),
        model: path,
        threads,
        args: worker_args,
    };
    let banner = format!(
        "serving `{name}` through a kv_aware gateway over {n} worker processes ({threads} threads \
         each)"
    );
    crate::serverless::run_deployments(args, vec![(deployment, replica)], &banner)
}
