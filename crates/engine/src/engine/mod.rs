//! The engine: one model and its KV pool on a dedicated OS thread. Requests arrive on a bounded
//! channel; each carries the sender for its output events; a dropped receiver cancels the request
//! and frees its blocks at the next step.

mod closing;
mod device;
mod disk;
mod draft;
mod handoff;
mod pacing;
mod plan;
mod profile;
mod scheduler;
mod speculate;
mod tiers;

pub use device::{Device, DeviceReport};
pub use speculate::{DraftSource, Speculation};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use lastmile_protocol::KvEvent;
use tokio::sync::broadcast;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::chat_template::ChatTemplate;
use crate::constraint::{Grammar, GrammarCompiler, GrammarSpec};
use crate::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::kv_disk::{DiskTier, KvDiskConfig};
use crate::kv_transfer::{KvBlock, KvLayout};
use crate::loader::LoadedModel;
use crate::sampler::SamplingParams;
use crate::tokenizer::TextTokenizer;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Compute threads (the engine thread included).
    pub threads: usize,
    /// Memory for the KV cache, in MiB (at least one full context is always reserved).
    pub kv_cache_mib: usize,
    /// Exact KV capacity in tokens, overriding `kv_cache_mib` and the one-context minimum
    /// (requests that cannot fit are refused).
    pub kv_cache_tokens: Option<usize>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most tokens computed in one step (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Most prompt tokens computed in a step that also decodes (a hard cap on top of
    /// `itl_target_ms`).
    pub prefill_chunk_while_decoding: usize,
    /// How long a step that decodes other streams may take, in milliseconds, when it also carries
    /// prefill chunks: the scheduler sizes each chunk from the measured cost of decode steps and
    /// of prompt tokens so that the decoding streams' inter-token latency stays near this.
    /// `None`: twice the measured decode-only step, at least 30 ms.
    pub itl_target_ms: Option<f64>,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting; beyond it `submit` fails with `Overloaded`.
    pub max_waiting: usize,
    /// Reuse the KV blocks of prompts' cached prefixes.
    pub prefix_cache: bool,
    /// Speculative decoding for requests that do not choose (off by default). A `Default`
    /// source means the draft model when the engine has one, else prompt lookup.
    pub speculation: Speculation,
    /// A KV tier on disk below the prefix cache (needs `prefix_cache`): evicted blocks are
    /// saved there and read back on a prefix hit, across restarts.
    pub kv_disk: Option<KvDiskConfig>,
    /// Where the forward pass runs and the KV cache lives.
    pub device: Device,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kv_cache_mib: 1024,
            kv_cache_tokens: None,
            block_size: 16,
            max_batch_tokens: 512,
            prefill_chunk_while_decoding: 256,
            itl_target_ms: None,
            max_running: 64,
            max_waiting: 1024,
            prefix_cache: true,
            speculation: Speculation::OFF,
            kv_disk: None,
            device: Device::Cpu,
        }
    }
}

impl EngineConfig {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.threads == 0
            || self.block_size == 0
            || self.max_batch_tokens == 0
            || self.max_running == 0
            || self.prefill_chunk_while_decoding == 0
            || self
                .itl_target_ms
                .is_some_and(|t| !(t > 0.0 && t.is_finite()))
        {
            return Err(EngineError::InvalidSettings(format!(
                "engine settings must be positive: {self:?}"
            )));
        }
        if self.kv_disk.is_some() && !self.prefix_cache {
            return Err(EngineError::InvalidSettings(
                "a KV tier on disk needs the prefix cache (it keeps what the cache evicts)".into(),
            ));
        }
        Ok(())
    }
}

/// A generation request in token space.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop strings (never emitted).
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Report each generated token's log probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Report each prompt token's log probability (after the first) and this many alternatives.
    /// The prompt is then computed in full (no prefix-cache reuse). With `max_tokens` 0 nothing
    /// is generated: the request only scores its prompt.
    pub prompt_logprobs: Option<usize>,
    /// Output constraint; generation ends when the grammar is complete. Near `max_tokens` the
    /// output turns to a short completion of the grammar when that is all the budget leaves
    /// room for, so it still parses (the finish reason stays `Length`).
    pub grammar: Option<Grammar>,
    /// Speculative decoding for this request (`None`: the engine's default). The output is the
    /// same with and without it, greedy or sampled with a seed: only its speed changes.
    pub speculation: Option<Speculation>,
}

impl GenerateRequest {
    /// A request for `max_tokens` tokens after `prompt`, with no stop strings, logprobs or grammar.
    pub fn new(prompt: Vec<u32>, sampling: SamplingParams, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling,
            max_tokens,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            grammar: None,
            speculation: None,
        }
    }
}

/// A generated token's log probability under the model, and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Natural log of the chosen token's probability (before penalties, biases and grammars).
    pub logprob: f32,
    /// The most likely tokens at this position with their log probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What a request's stream yields.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// A generated token and the text it completed (may be empty while text is held back).
    Token {
        /// Token id.
        id: u32,
        /// New text.
        text: String,
        /// Log probabilities, when the request asked for them.
        logprobs: Option<TokenLogprobs>,
    },
    /// The end of the sequence.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Text released at the end (held back for a stop string that did not complete).
        text: String,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
        /// The stop string that ended generation, if one did.
        stop_sequence: Option<String>,
    },
    /// Log probabilities of prompt tokens (token id and its logprobs), in prompt order from
    /// the second token on; only for requests with `prompt_logprobs`, before any `Token`.
    PromptLogprobs(Vec<(u32, TokenLogprobs)>),
    /// The engine failed this request; the error says why (overload, KV capacity, a grammar
    /// fault, an internal error), so a server can answer with the right status.
    Failed(Arc<EngineError>),
}

/// The receiving end of one request; dropping it cancels the request.
pub struct GenerationStream {
    rx: UnboundedReceiver<GenerationEvent>,
}

impl GenerationStream {
    /// The next event, or `None` once the stream is over.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.rx.recv().await
    }

    /// Blocking variant for non-async callers.
    pub fn blocking_next(&mut self) -> Option<GenerationEvent> {
        self.rx.blocking_recv()
    }
}

/// Live counters shared between the engine thread and its handles.
#[derive(Default, Debug)]
pub struct EngineStats {
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Requests waiting to start (queued by the engine thread, or sent to it and not yet seen).
    pub waiting: AtomicUsize,
    /// KV blocks in use.
    pub kv_blocks_used: AtomicUsize,
    /// KV blocks in the pool.
    pub kv_blocks_total: AtomicUsize,
    /// Prompt tokens computed (including recomputation after preemption).
    pub prefill_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Sequences preempted for lack of KV blocks.
    pub preemptions: AtomicU64,
    /// Engine steps run.
    pub steps: AtomicU64,
    /// KV blocks indexed by the prefix cache.
    pub kv_blocks_cached: AtomicUsize,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_query_tokens: AtomicU64,
    /// Prompt tokens found there (not recomputed).
    pub prefix_hit_tokens: AtomicU64,
    /// Prompt tokens still to compute: waiting requests' whole prompts and running sequences'
    /// unfinished prefills (a load signal for routers).
    pub queued_prefill_tokens: AtomicUsize,
    /// When the engine loop last went round ([`EngineStats::now_ms`]'s clock).
    pub loop_at_ms: AtomicU64,
    /// Draft tokens verified (speculative decoding).
    pub draft_tokens: AtomicU64,
    /// Draft tokens kept: generated at the cost of a row in another token's step.
    pub accepted_draft_tokens: AtomicU64,
    /// KV blocks held under leases for other engines to read (disaggregation).
    pub kv_blocks_held: AtomicUsize,
    /// KV blocks read out for other engines.
    pub kv_blocks_exported: AtomicU64,
    /// KV blocks received from other engines and stored in the prefix cache.
    pub kv_blocks_imported: AtomicU64,
    /// KV blocks in the disk tier.
    pub kv_disk_blocks: AtomicUsize,
    /// Bytes of block files in the disk tier.
    pub kv_disk_bytes: AtomicU64,
    /// Prompt blocks missing from memory that the disk tier had (read back, not recomputed).
    pub kv_disk_hit_blocks: AtomicU64,
    /// Prompt blocks missing from memory that the disk tier did not have either.
    pub kv_disk_miss_blocks: AtomicU64,
    /// Bytes written to the disk tier.
    pub kv_disk_written_bytes: AtomicU64,
    /// Bytes read back from the disk tier.
    pub kv_disk_read_bytes: AtomicU64,
    /// Evicted blocks not saved because the disk tier's writer was behind.
    pub kv_disk_dropped_blocks: AtomicU64,
    /// Disk tier writes and reads that failed (the block is recomputed).
    pub kv_disk_errors: AtomicU64,
}

impl EngineStats {
    /// Milliseconds on the clock `loop_at_ms` is kept in (monotonic, from the first call in
    /// this process).
    pub fn now_ms() -> u64 {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
    }

    /// How long the engine has had work without its loop going round (`None` while it has
    /// none): a step that never ends, a wedged thread.
    pub fn stalled_for(&self) -> Option<std::time::Duration> {
        let busy = self.running.load(Ordering::Relaxed) + self.waiting.load(Ordering::Relaxed);
        (busy > 0).then(|| {
            let since = Self::now_ms().saturating_sub(self.loop_at_ms.load(Ordering::Relaxed));
            std::time::Duration::from_millis(since)
        })
    }
}

/// Facts about the served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Context length in tokens.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Architecture name.
    pub arch: String,
    /// Weight bytes read per generated token.
    pub weight_bytes_per_token: usize,
    /// KV capacity in tokens.
    pub kv_capacity_tokens: usize,
    /// Tokens per KV block (the unit of prefix caching and of KV event hashes).
    pub block_size: usize,
    /// Seconds the model took to load.
    pub load_seconds: f64,
    /// Where it runs.
    pub device: DeviceReport,
    /// The draft model, when the engine has one.
    pub draft: Option<DraftInfo>,
}

/// Facts about an engine's draft model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftInfo {
    /// Architecture name.
    pub arch: String,
    /// Decoder blocks.
    pub layers: usize,
    /// Weight bytes read per draft token.
    pub weight_bytes_per_token: usize,
}

pub(crate) struct Submission {
    pub(crate) request: GenerateRequest,
    pub(crate) tx: UnboundedSender<GenerationEvent>,
}

/// A prompt's cached blocks held under a lease ([`EngineHandle::hold_prefix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldPrefix {
    /// The lease, for [`EngineHandle::release_prefix`].
    pub lease: u64,
    /// Full blocks held: the prompt's longest cached prefix.
    pub blocks: usize,
}

/// What an import of blocks did ([`EngineHandle::import_blocks`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportOutcome {
    /// Blocks written and registered in the prefix cache.
    pub stored: usize,
    /// Blocks the cache held already.
    pub present: usize,
    /// Blocks not stored for lack of free blocks.
    pub no_room: usize,
    /// Blocks refused (and every block after the first refused): their tokens or routing hash
    /// are not the prompt's, or their values are not a block's size.
    pub refused: usize,
}

/// What the engine thread is asked to do.
pub(crate) enum Command {
    /// Run a generation.
    Generate(Box<Submission>),
    /// Hold a prompt's cached blocks under a new lease and copy them out.
    Hold {
        prompt: Vec<u32>,
        reply: tokio::sync::oneshot::Sender<(HeldPrefix, Vec<KvBlock>)>,
    },
    /// End a lease.
    Release { lease: u64 },
    /// Store blocks `first..` of `prompt`, received from another engine.
    Import {
        prompt: Vec<u32>,
        first: usize,
        blocks: Vec<KvBlock>,
        reply: tokio::sync::oneshot::Sender<ImportOutcome>,
    },
    /// Save every cached block the disk tier lacks; reply with how many, and a receiver that
    /// resolves once they are written.
    Persist {
        reply: tokio::sync::oneshot::Sender<(usize, tokio::sync::oneshot::Receiver<()>)>,
    },
}

/// Refuses a draft model whose tokens are not the served model's: its guesses would be ids of
/// other text.
fn same_tokenizer(served: &LoadedModel, draft: &LoadedModel) -> Result<()> {
    let (a, b) = (&served.tokenizer, &draft.tokenizer);
    let vocab = (served.model.config.vocab, draft.model.config.vocab);
    if vocab.0 != vocab.1 || a.pieces() != b.pieces() {
        return Err(EngineError::InvalidSettings(format!(
            "the draft model's tokenizer is not the served model's (vocabularies of {} and {} \
             tokens{}): a draft model must come from the same family",
            vocab.1,
            vocab.0,
            if vocab.0 == vocab.1 {
                ", different pieces"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Command>,
    layout: KvLayout,
    info: Arc<ModelInfo>,
    stats: Arc<EngineStats>,
    tokenizer: Arc<TextTokenizer>,
    template: Arc<ChatTemplate>,
    max_waiting: usize,
    kv_events: broadcast::Sender<KvEvent>,
    cached: CachedBlocks,
    grammars: Arc<GrammarCompiler>,
}

/// The hashes of the blocks in the prefix cache and the disk tier, kept by the engine thread as
/// it publishes each event, so that a follower of the event stream can start from a snapshot.
pub(crate) type CachedBlocks = Arc<std::sync::Mutex<tiers::CachedRoutes>>;

impl EngineHandle {
    /// Starts the engine thread for a loaded model.
    pub fn start(loaded: LoadedModel, config: EngineConfig) -> Result<Self> {
        Self::start_with_draft(loaded, None, config)
    }

    /// Starts the engine thread for a loaded model and, if given, a draft model for speculative
    /// decoding: a smaller model with the same tokenizer, run on the CPU beside it, whose greedy
    /// guesses the served model verifies (requests whose `speculation` source is
    /// `DraftModel`, and those that do not choose). Refused when the tokenizers differ.
    pub fn start_with_draft(
        loaded: LoadedModel,
        draft: Option<LoadedModel>,
        config: EngineConfig,
    ) -> Result<Self> {
        config.validate()?;
        if let Some(d) = &draft {
            same_tokenizer(&loaded, d)?;
        }
        let draft_info = draft.as_ref().map(|d| DraftInfo {
            arch: d.model.config.arch.clone(),
            layers: d.model.config.layers,
            weight_bytes_per_token: d.model.weights.bytes_per_token(),
        });
        let draft = draft.map(|d| d.model);
        let LoadedModel {
            model,
            tokenizer,
            template,
            load_seconds,
            ..
        } = loaded;
        let c = &model.config;
        let per_token = KvCache::bytes_per_token(c.layers, c.kv_dim());
        let want_tokens = (config.kv_cache_mib << 20) / per_token.max(1);
        let tokens = config
            .kv_cache_tokens
            .unwrap_or_else(|| want_tokens.max(c.context_length + config.block_size));
        let num_blocks = tokens.div_ceil(config.block_size);
        let (executor, device) =
            device::Executor::new(&model, config.device, num_blocks, config.block_size)?;
        let info = Arc::new(ModelInfo {
            context_length: c.context_length,
            vocab_size: c.vocab,
            arch: c.arch.clone(),
            weight_bytes_per_token: model.weights.bytes_per_token(),
            kv_capacity_tokens: num_blocks * config.block_size,
            block_size: config.block_size,
            load_seconds,
            device,
            draft: draft_info,
        });
        let layout = KvLayout {
            model: model_fingerprint(&model.config, info.weight_bytes_per_token),
            layers: c.layers as u32,
            kv_dim: c.kv_dim() as u32,
            block_size: config.block_size as u32,
        };
        let stats = Arc::new(EngineStats::default());
        stats.kv_blocks_total.store(num_blocks, Ordering::Relaxed);
        let cached = CachedBlocks::default();
        let disk = match &config.kv_disk {
            Some(d) => {
                let mut on_disk = layout;
                on_disk.model = lastmile_protocol::block_hash(
                    Some(layout.model),
                    &name_words(&format!("{:016x}", model.weights.fingerprint())),
                );
                let mut tier = DiskTier::open(d, on_disk)?;
                let mut c = cached.lock().unwrap_or_else(|e| e.into_inner());
                for e in tier.take_changes() {
                    c.apply(tiers::Tier::Disk, e);
                }
                stats.kv_disk_blocks.store(tier.blocks(), Ordering::Relaxed);
                stats
                    .kv_disk_bytes
                    .store(tier.used_bytes(), Ordering::Relaxed);
                tracing::info!(
                    "KV disk tier at {}: {} blocks found",
                    tier.slot().display(),
                    tier.blocks()
                );
                Some(tier)
            }
            None => None,
        };
        let tokenizer = Arc::new(tokenizer);
        let (tx, rx) = sync_channel(config.max_waiting);
        let thread_stats = stats.clone();
        let thread_tok = tokenizer.clone();
        let max_waiting = config.max_waiting;
        let (kv_events, _) = broadcast::channel(4096);
        let thread_events = kv_events.clone();
        let thread_cached = cached.clone();
        std::thread::Builder::new()
            .name("lastmile-engine".into())
            .spawn(move || {
                let mut s = scheduler::Scheduler::new(
                    model,
                    thread_tok,
                    config,
                    scheduler::Shared {
                        num_blocks,
                        stats: thread_stats,
                        kv_events: thread_events,
                        cached: thread_cached,
                        disk,
                        executor,
                        draft,
                    },
                );
                s.run(rx);
            })
            .map_err(|e| EngineError::io("spawning the engine thread", e))?;
        Ok(Self {
            tx,
            layout,
            info,
            stats,
            grammars: Arc::new(GrammarCompiler::new(tokenizer.clone())),
            tokenizer,
            template: Arc::new(template),
            max_waiting,
            kv_events,
            cached,
        })
    }

    /// Queues a request; its events arrive on the returned stream.
    pub fn submit(&self, request: GenerateRequest) -> Result<GenerationStream> {
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let vocab = self.info.vocab_size;
        if let Some(&token) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::TokenOutOfVocab { token, vocab });
        }
        let by_model = request
            .speculation
            .is_some_and(|s| s.source == DraftSource::DraftModel && s.max_draft > 0);
        if by_model && self.info.draft.is_none() {
            return Err(EngineError::NoDraftModel);
        }
        let total = request.prompt.len() + request.max_tokens;
        if total > self.info.context_length {
            return Err(EngineError::ContextExceeded {
                prompt: request.prompt.len(),
                max_tokens: request.max_tokens,
                context: self.info.context_length,
            });
        }
        let capacity = self.info.kv_capacity_tokens;
        if total > capacity {
            return Err(EngineError::KvCapacityExceeded {
                needed: total,
                capacity,
            });
        }
        let queue_full = EngineError::QueueFull {
            limit: self.max_waiting,
        };
        if self.stats.waiting.load(Ordering::Relaxed) >= self.max_waiting {
            return Err(queue_full);
        }
        let (tx, rx) = unbounded_channel();
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        match self
            .tx
            .try_send(Command::Generate(Box::new(Submission { request, tx })))
        {
            Ok(()) => Ok(GenerationStream { rx }),
            Err(e) => {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => queue_full,
                    TrySendError::Disconnected(_) => EngineError::Stopped,
                })
            }
        }
    }

    /// How this engine's KV blocks travel ([`crate::kv_transfer`]): its model's fingerprint
    /// mixed with `served_as` (the name it is served under), its shape and block size.
    pub fn kv_layout(&self, served_as: &str) -> KvLayout {
        let mut layout = self.layout;
        layout.model = lastmile_protocol::block_hash(Some(layout.model), &name_words(served_as));
        layout
    }

    /// Sends a KV command to the engine thread and waits for its reply.
    async fn ask<T>(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Command,
    ) -> Result<T> {
        self.send(command)?.await.map_err(|_| EngineError::Stopped)
    }

    /// Sends a KV command to the engine thread now; its reply comes on the returned receiver.
    fn send<T>(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Command,
    ) -> Result<tokio::sync::oneshot::Receiver<T>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx.try_send(command(reply)).map_err(|e| match e {
            TrySendError::Full(_) => EngineError::QueueFull {
                limit: self.max_waiting,
            },
            TrySendError::Disconnected(_) => EngineError::Stopped,
        })?;
        Ok(answer)
    }

    /// Holds the longest cached prefix of `prompt` (its full blocks) under a new lease, so that
    /// eviction cannot take it before [`EngineHandle::release_prefix`], and copies the held blocks
    /// out in the same command: a reader of the copy never waits for the engine's steps (each of
    /// which, on a busy prefill engine, is a long chunk of some other prompt).
    pub async fn hold_prefix(&self, prompt: Vec<u32>) -> Result<(HeldPrefix, Vec<KvBlock>)> {
        self.ask(|reply| Command::Hold { prompt, reply }).await
    }

    /// Ends a lease (a lease not live is ignored).
    pub fn release_prefix(&self, lease: u64) -> Result<()> {
        self.tx
            .try_send(Command::Release { lease })
            .map_err(|_| EngineError::Stopped)
    }

    /// Stores blocks received from another engine: `blocks[j]` is full block `first + j` of
    /// `prompt`, checked against the prompt's own tokens and routing hashes (a block that is not
    /// the prompt's is refused with all after it), registered in the prefix cache under this
    /// engine's keys, so a request with this prompt finds them cached. When it returns, the
    /// stored blocks are in [`EngineHandle::cached_blocks`] and announced on the KV event stream.
    pub async fn import_blocks(
        &self,
        prompt: Vec<u32>,
        first: usize,
        blocks: Vec<KvBlock>,
    ) -> Result<ImportOutcome> {
        self.queue_import(prompt, first, blocks)?.await
    }

    /// [`EngineHandle::import_blocks`], queued now; the returned future waits for the outcome.
    /// The engine takes every queued command between two steps, in the order sent: a receiver
    /// that queues each batch as it arrives and reads on waits out one step, not one per batch.
    pub fn queue_import(
        &self,
        prompt: Vec<u32>,
        first: usize,
        blocks: Vec<KvBlock>,
    ) -> Result<impl std::future::Future<Output = Result<ImportOutcome>> + use<>> {
        let answer = self.send(|reply| Command::Import {
            prompt,
            first,
            blocks,
            reply,
        })?;
        Ok(async move { answer.await.map_err(|_| EngineError::Stopped) })
    }

    /// Saves every block of the prefix cache that the disk tier lacks (the most recently used
    /// last, so they are the last the tier's bound trims), and waits until they are written:
    /// what a replica does before it stops, so that its successor finds its prefixes (a
    /// successor starting meanwhile waits for the slot rather than take an empty one). Returns
    /// how many blocks it wrote (0 without a disk tier).
    pub async fn persist_kv(&self) -> Result<usize> {
        let (written, done) = self.ask(|reply| Command::Persist { reply }).await?;
        done.await.map_err(|_| EngineError::Stopped)?;
        Ok(written)
    }

    /// The model's facts.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Live counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// A live feed of blocks entering and leaving the prefix cache (from now on; a subscriber
    /// that lags by more than 4096 events is told so by the channel).
    pub fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEvent> {
        self.kv_events.subscribe()
    }

    /// The hashes of every block in the prefix cache now. Subscribe to the events first, then
    /// take this snapshot, then apply the events that follow: the result is exact (applying a
    /// store or a removal twice changes nothing).
    pub fn cached_blocks(&self) -> Vec<u64> {
        let set = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        set.hashes()
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The tokenizer and chat template, shared (to build prompts off the engine's handle).
    pub fn prompt_parts(&self) -> (Arc<TextTokenizer>, Arc<ChatTemplate>) {
        (self.tokenizer.clone(), self.template.clone())
    }

    /// Compiles an output constraint for a request. CPU-bound (milliseconds for a schema, about
    /// 0.2 s the first time, when the vocabulary index is built): call it from a
    /// blocking thread. An invalid schema, pattern or grammar is an [`EngineError::Grammar`].
    pub fn compile_grammar(&self, spec: &GrammarSpec) -> Result<Grammar> {
        self.grammars.compile(spec)
    }

    /// Builds the vocabulary index grammars need (about 0.2 s of one core for a 49k
    /// vocabulary), so that the first structured-output or tool request does not wait for it.
    /// Blocking; servers call it from a background thread once they are listening.
    pub fn warm_grammars(&self) -> Result<()> {
        self.grammars.warm()
    }
}

/// A fingerprint of a model's shape and weights' size: engines whose KV blocks are
/// interchangeable agree on it (the served name is mixed in by [`EngineHandle::kv_layout`]).
fn model_fingerprint(c: &crate::model::ModelConfig, weight_bytes: usize) -> u64 {
    let words = [
        c.layers,
        c.kv_dim(),
        c.vocab,
        c.context_length,
        weight_bytes,
        c.rope_base.to_bits() as usize,
        c.head_dim,
    ];
    let mut all = name_words(&c.arch);
    all.extend(
        words
            .iter()
            .flat_map(|w| [*w as u32, (*w as u64 >> 32) as u32]),
    );
    lastmile_protocol::block_hash(None, &all)
}

/// A string as words for [`lastmile_protocol::block_hash`].
fn name_words(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_with_work_that_does_not_go_round_is_stalled() {
        let st = EngineStats::default();
        st.loop_at_ms
            .store(EngineStats::now_ms(), Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(st.stalled_for(), None, "no work: never stalled");
        st.waiting.store(1, Ordering::Relaxed);
        assert!(st.stalled_for().unwrap() >= std::time::Duration::from_millis(30));
        st.loop_at_ms
            .store(EngineStats::now_ms(), Ordering::Relaxed);
        assert!(st.stalled_for().unwrap() < std::time::Duration::from_millis(30));
    }
}
