//! The command line of disaggregated prefill and decode: a worker's role and the token it shares
//! with the gateway, and the gateway's settings for when prompts go to prefill workers.

use anyhow::Result;
use clap::Args;

/// A worker's part in disaggregated prefill and decode.
#[derive(Args)]
pub struct DisaggArgs {
    /// What this worker does behind a gateway: `both` serves whole requests; `prefill` only
    /// computes prompts for decode workers (it gets no client requests); `decode` generates,
    /// taking prompts computed by a prefill worker when the gateway decides so (and computing
    /// them itself otherwise). Registered in etcd and reported by /health. Prefill and decode
    /// need --internal-token. See docs/disaggregation.md.
    #[arg(long, default_value = "both", value_parser = role_parser())]
    pub role: lastmile_protocol::WorkerRole,
    /// The secret gateways and workers share for KV transfer (also LASTMILE_INTERNAL_TOKEN):
    /// internal KV endpoints refuse callers without it, and a decode worker pulls blocks only
    /// when the request carries it. Without it, KV transfer is off on this worker.
    #[arg(long, env = "LASTMILE_INTERNAL_TOKEN", hide_env_values = true)]
    internal_token: Option<String>,
    /// How long a prefill worker holds a prompt's blocks for the decode worker, in
    /// milliseconds, when nobody releases them first.
    #[arg(long, default_value_t = 30_000)]
    kv_lease_ms: u64,
    /// Test hook: corrupt every KV block this worker sends (receivers must notice).
    #[arg(long, hide = true)]
    test_corrupt_kv: bool,
}

impl DisaggArgs {
    pub fn config(&self) -> lastmile_worker::DisaggConfig {
        lastmile_worker::DisaggConfig {
            role: self.role,
            internal_token: self.internal_token.clone().filter(|t| !t.is_empty()),
            lease: std::time::Duration::from_millis(self.kv_lease_ms),
            corrupt_sent_blocks: self.test_corrupt_kv,
            ..Default::default()
        }
    }

    /// Refuses a split role without the token that makes KV transfer possible.
    pub fn check(&self) -> Result<()> {
        if self.role != lastmile_protocol::WorkerRole::Both
            && self.config().internal_token.is_none()
        {
            anyhow::bail!(
                "--role {} needs --internal-token (or LASTMILE_INTERNAL_TOKEN), shared with the \
                 gateway and the other workers",
                self.role
            );
        }
        Ok(())
    }
}

/// `--role`: one of the worker roles' names.
fn role_parser() -> impl clap::builder::TypedValueParser<Value = lastmile_protocol::WorkerRole> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(lastmile_protocol::WorkerRole::ALL.map(|r| r.name()))
        .try_map(|name| name.parse::<lastmile_protocol::WorkerRole>())
}

/// The gateway's disaggregation settings.
#[derive(Args)]
pub struct GatewayDisaggArgs {
    /// Disaggregated prefill and decode (needs --policy kv_aware): the secret shared with the
    /// workers (also LASTMILE_INTERNAL_TOKEN). With it, a request whose decode worker would
    /// compute at least --disagg-min-tokens prompt tokens has a `--role prefill` worker compute
    /// them first; see docs/disaggregation.md.
    #[arg(long, env = "LASTMILE_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// Disaggregate only prompts of which the decode worker holds fewer than all but this many
    /// tokens (shorter uncached parts are computed where they decode).
    #[arg(long, default_value_t = 512)]
    pub disagg_min_tokens: usize,
    /// A prefill worker with this many prompt tokens queued is saturated: prompts then stay on
    /// their decode worker.
    #[arg(long, default_value_t = 8192)]
    pub disagg_max_prefill_queue: usize,
    /// How long to wait for a prefill worker, in milliseconds, before the decode worker computes
    /// the prompt itself.
    #[arg(long, default_value_t = 30_000)]
    pub prefill_timeout_ms: u64,
}

impl GatewayDisaggArgs {
    /// The disaggregation settings, with --internal-token (routing by `policy`).
    pub fn routing(
        &self,
        policy: lastmile_router::PolicyKind,
    ) -> Result<Option<lastmile_gateway::DisaggRouting>> {
        let Some(token) = self.internal_token.clone().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        if policy != lastmile_router::PolicyKind::KvAware {
            anyhow::bail!(
                "disaggregation (--internal-token) needs --policy kv_aware: the gateway builds \
                 each prompt to know how much of it a decode worker would compute"
            );
        }
        Ok(Some(lastmile_gateway::DisaggRouting {
            min_uncached_tokens: self.disagg_min_tokens,
            max_prefill_queue_tokens: self.disagg_max_prefill_queue,
            prefill_timeout: std::time::Duration::from_millis(self.prefill_timeout_ms),
            ..lastmile_gateway::DisaggRouting::new(token)
        }))
    }
}
