//! `lastmile bench`: a load generator for any OpenAI-compatible endpoint (lastmile, llama.cpp's
//! `llama-server`, vLLM, ...). It sends streaming chat requests under a workload — fixed lengths,
//! a shared system prompt, or multi-turn conversations whose context grows — at a fixed
//! concurrency (closed loop) or a Poisson arrival rate (open loop), and reports time to first
//! token, inter-token latency and end-to-end latency percentiles, throughput and errors, using the
//! token counts the server reports in `usage`.
#![warn(missing_docs)]

mod client;
mod plot;
mod stats;
mod workload;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;
use tokio::sync::Semaphore;

pub use client::RequestResult;
pub use plot::{latency_throughput_svg, CurvePoint};
pub use stats::{Percentiles, Summary};
pub use workload::{Workload, WorkloadKind};

/// Load-generator failures (per-request failures are counted in the report instead).
#[derive(Debug, Error)]
pub enum BenchError {
    /// The endpoint could not be reached or answered nonsense.
    #[error("endpoint {url}: {message}")]
    Endpoint {
        /// The base URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The settings are inconsistent.
    #[error("invalid benchmark settings: {0}")]
    Config(String),
}

impl BenchError {
    /// A short label for logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Endpoint { .. } => "endpoint",
            Self::Config(_) => "config",
        }
    }
}

/// How requests arrive.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "value")]
pub enum Arrival {
    /// A fixed number of requests in flight (a new one starts when one ends).
    Concurrency(usize),
    /// Poisson arrivals at this many requests per second, however many are in flight.
    Rate(f64),
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Base URL of the server (`http://host:port`, without `/v1`).
    pub url: String,
    /// Model id to request.
    pub model: String,
    /// Arrival process.
    pub arrival: Arrival,
    /// What to send.
    pub workload: Workload,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Show a progress bar.
    pub progress: bool,
    /// One extra request with a prompt of about this many tokens, sent once every stream of the
    /// first wave is generating: how much a long prompt disturbs streams that are decoding.
    /// Reported apart from the workload's requests.
    pub long_prompt: Option<usize>,
}

impl LoadConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), BenchError> {
        match self.arrival {
            Arrival::Concurrency(0) => {
                return Err(BenchError::Config("concurrency must be at least 1".into()))
            }
            Arrival::Rate(r) if !(r > 0.0 && r.is_finite()) => {
                return Err(BenchError::Config(format!(
                    "rate must be positive, got {r}"
                )))
            }
            _ => {}
        }
        self.workload.validate()
    }
}

/// The outcome of one load run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// The arrival process used.
    pub arrival: Arrival,
    /// Aggregates.
    pub summary: Summary,
    /// Every request, in completion order.
    pub requests: Vec<RequestResult>,
    /// The long-prompt request, when the run had one.
    pub long_prompt: Option<RequestResult>,
}

/// Finds the model id a server serves (its first model).
pub async fn discover_model(url: &str) -> Result<String, BenchError> {
    let err = |m: String| BenchError::Endpoint {
        url: url.to_string(),
        message: m,
    };
    let v: serde_json::Value = reqwest::get(format!("{url}/v1/models"))
        .await
        .map_err(|e| err(e.to_string()))?
        .json()
        .await
        .map_err(|e| err(e.to_string()))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| err(format!("no model in /v1/models: {v}")))
}

/// Waits until `GET {url}/health` answers 200.
pub async fn wait_healthy(url: &str, within: Duration) -> Result<(), BenchError> {
    let deadline = Instant::now() + within;
    let client = reqwest::Client::new();
    while Instant::now() < deadline {
        if let Ok(r) = client
            .get(format!("{url}/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(BenchError::Endpoint {
        url: url.to_string(),
        message: format!("not healthy within {within:?}"),
    })
}

/// Runs the load and gathers the report.
pub async fn run_load(config: &LoadConfig) -> Result<LoadReport, BenchError> {
    config.validate()?;
    let client = reqwest::Client::builder()
        // A fresh connection per request: some servers (llama-server) drop idle keep-alive
        // connections, and a reused dead connection would count as a server error.
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| BenchError::Config(e.to_string()))?;
    let plan = config.workload.plan();
    let total_requests: usize = plan.iter().map(|c| c.turns.len()).sum();
    let bar = progress_bar(config, total_requests);
    let started = Instant::now();
    let results = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(total_requests)));
    // Conversations are the unit of scheduling: their turns run in order, each turn one request.
    let slots = match config.arrival {
        Arrival::Concurrency(n) => Some(Arc::new(Semaphore::new(n))),
        Arrival::Rate(_) => None,
    };
    let mut rng = workload::Rng::new(config.workload.seed ^ 0x5EED);
    let first_tokens = Arc::new(AtomicUsize::new(0));
    let workload_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runner = ConversationRunner {
        client,
        results: results.clone(),
        bar: bar.clone(),
        slots,
        first_tokens,
        url: config.url.clone(),
        model: config.model.clone(),
        timeout: config.timeout,
        max_tokens: config.workload.output_tokens,
    };
    let long_prompt = config.long_prompt.map(|tokens| {
        // Once every stream of the first wave is generating, one long prompt arrives.
        let wave = match config.arrival {
            Arrival::Concurrency(n) => n.min(plan.len()),
            Arrival::Rate(_) => 1,
        };
        let messages = vec![serde_json::json!({
            "role": "user", "content": config.workload.long_prompt(tokens),
        })];
        runner.spawn_long_prompt(messages, wave, workload_done.clone())
    });
    let mut tasks = Vec::new();
    for conv in plan {
        if let Arrival::Rate(r) = config.arrival {
            let gap = -(1.0 - rng.next_f64()).ln() / r;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
        tasks.push(tokio::spawn(runner.clone().run(conv)));
    }
    for t in tasks {
        let _ = t.await;
    }
    workload_done.store(true, Ordering::Relaxed);
    let long_prompt = match long_prompt {
        Some(t) => t.await.ok().flatten(),
        None => None,
    };
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let requests = std::mem::take(&mut *results.lock().await);
    let summary = Summary::from_results(&requests, wall);
    Ok(LoadReport {
        arrival: config.arrival,
        summary,
        requests,
        long_prompt,
    })
}

/// The progress bar of a run of `total` requests (hidden unless `config.progress`).
fn progress_bar(config: &LoadConfig, total: usize) -> indicatif::ProgressBar {
    if !config.progress {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} requests ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(format!("{:?}", config.arrival));
    b
}

/// What every conversation of a run shares: the client, where results go, the concurrency
/// slots, and the request settings.
#[derive(Clone)]
struct ConversationRunner {
    client: reqwest::Client,
    results: Arc<tokio::sync::Mutex<Vec<RequestResult>>>,
    bar: indicatif::ProgressBar,
    slots: Option<Arc<Semaphore>>,
    first_tokens: Arc<AtomicUsize>,
    url: String,
    model: String,
    timeout: Duration,
    max_tokens: usize,
}

impl ConversationRunner {
    /// Spawns the long-prompt request (`messages`): it waits until `wave` streams have had their
    /// first content, then sends; `None` if the workload is `done` first.
    fn spawn_long_prompt(
        &self,
        messages: Vec<serde_json::Value>,
        wave: usize,
        done: Arc<std::sync::atomic::AtomicBool>,
    ) -> tokio::task::JoinHandle<Option<RequestResult>> {
        let (client, first_tokens) = (self.client.clone(), self.first_tokens.clone());
        let (url, model, timeout) = (self.url.clone(), self.model.clone(), self.timeout);
        tokio::spawn(async move {
            while first_tokens.load(Ordering::Relaxed) < wave {
                if done.load(Ordering::Relaxed) {
                    // The workload ended (failed) before its streams were all generating.
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let req = client::ChatRequest {
                url: &url,
                model: &model,
                messages: &messages,
                max_tokens: 8,
                timeout,
                first_tokens: None,
            };
            Some(client::stream_chat(&client, &req).await)
        })
    }

    /// Runs `conv`'s turns in order, each as one request (holding a slot while it runs) that
    /// sees the replies before it.
    async fn run(self, conv: workload::ConversationPlan) {
        let mut messages: Vec<serde_json::Value> = Vec::new();
        if let Some(system) = &conv.system {
            messages.push(serde_json::json!({"role": "system", "content": system}));
        }
        for user in conv.turns {
            messages.push(serde_json::json!({"role": "user", "content": user}));
            let permit = match &self.slots {
                Some(s) => Some(s.clone().acquire_owned().await),
                None => None,
            };
            let req = client::ChatRequest {
                url: &self.url,
                model: &self.model,
                messages: &messages,
                max_tokens: self.max_tokens,
                timeout: self.timeout,
                first_tokens: Some(&self.first_tokens),
            };
            let r = client::stream_chat(&self.client, &req).await;
            drop(permit);
            let reply = r.text.clone();
            self.results.lock().await.push(r);
            self.bar.inc(1);
            messages.push(serde_json::json!({"role": "assistant", "content": reply}));
        }
    }
}
