//! The model worker: one thread owns the model and turns queued prompts into batched
//! generations (dynamic batching: take what is queued, wait `batch_wait` for more, run).
//!
//! Requests that arrive while a batch runs wait in the bounded queue and form the next batch,
//! so under load the batch size follows the number of concurrent clients (up to
//! `max_batch`). Every row is generated for at most its own `max_new_tokens`: the batch runs to
//! the largest budget and each row is cut to its own (greedy decoding of a row does not depend
//! on the other rows beyond padding-level rounding).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::device::{BackendJob, Target};
use crate::kernels::Kernels;
use crate::model::loader::{load_model, EncodedPrompt};
use crate::model::{GenerateConfig, Sampling};

use super::stats::Stats;
use super::{ServeError, ServeOptions};

/// One queued prompt and where its answer goes.
pub(crate) struct Work {
    pub(crate) encoded: EncodedPrompt,
    pub(crate) max_new_tokens: usize,
    pub(crate) enqueued: Instant,
    pub(crate) reply: oneshot::Sender<Result<Done, String>>,
}

/// A finished generation with its timings.
#[derive(Debug, Clone)]
pub(crate) struct Done {
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_tokens: usize,
    pub(crate) stopped_on_eos: bool,
    /// Enqueued → batch started, ms.
    pub(crate) queue_ms: f64,
    pub(crate) prefill_ms: f64,
    pub(crate) decode_ms: f64,
    pub(crate) batch_size: usize,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue holds `max_queue` requests.
    Full,
    /// The worker has stopped (shutdown, or it failed).
    Stopped,
}

/// The sending side of the bounded queue, with its depth for `/health` and `/metrics`.
pub(crate) struct Queue {
    tx: SyncSender<Work>,
    depth: Arc<AtomicUsize>,
}

impl Queue {
    /// Queues `work` unless the queue is full (never blocks).
    pub(crate) fn submit(&self, work: Work) -> Result<(), Refused> {
        self.depth.fetch_add(1, Ordering::SeqCst);
        self.tx.try_send(work).map_err(|e| {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => Refused::Full,
                TrySendError::Disconnected(_) => Refused::Stopped,
            }
        })
    }

    /// Requests waiting for a batch.
    pub(crate) fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

/// What loading told us.
pub(crate) struct Loaded {
    pub(crate) weights_bytes: u64,
    pub(crate) load_ms: f64,
    pub(crate) max_position_embeddings: usize,
}

/// Starts the worker thread and waits until its model is loaded.
///
/// # Errors
/// [`ServeError::Load`] when the model, adapter or device fails; the thread has ended then.
pub(crate) fn start(
    opts: &ServeOptions,
    stats: Stats,
) -> Result<(Queue, JoinHandle<()>, Loaded), ServeError> {
    let (tx, rx) = mpsc::sync_channel::<Work>(opts.limits.max_queue);
    let depth = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Loaded, String>>();
    let job = WorkerJob {
        model_dir: opts.model.model_dir.clone(),
        adapter_dir: opts.model.adapter_dir.clone(),
        max_batch: opts.limits.max_batch,
        batch_wait: opts.limits.batch_wait,
        rx,
        depth: depth.clone(),
        ready: ready_tx.clone(),
        stats,
    };
    let (device, precision) = (opts.device, opts.precision);
    let handle = std::thread::Builder::new()
        .name("medpipe-model".into())
        .spawn(move || {
            let outcome = crate::device::run_on_as(device, precision, job);
            let failure = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            // Only heard when loading had not reported yet.
            let _ = ready_tx.send(Err(failure));
        })?;
    match ready_rx.recv() {
        Ok(Ok(loaded)) => Ok((Queue { tx, depth }, handle, loaded)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(ServeError::Load(e))
        }
        Err(_) => {
            let _ = handle.join();
            Err(ServeError::Load(
                "the model thread ended while loading".into(),
            ))
        }
    }
}

struct WorkerJob {
    model_dir: std::path::PathBuf,
    adapter_dir: Option<std::path::PathBuf>,
    max_batch: usize,
    batch_wait: std::time::Duration,
    rx: Receiver<Work>,
    depth: Arc<AtomicUsize>,
    ready: mpsc::Sender<Result<Loaded, String>>,
    stats: Stats,
}

impl BackendJob for WorkerJob {
    type Output = ();

    fn run<B: Kernels>(self, device: B::Device, _target: Target) {
        let loaded = match load_model::<B>(&self.model_dir, self.adapter_dir.as_deref(), &device) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.ready.send(Err(format!("{:#}", anyhow::Error::new(e))));
                return;
            }
        };
        let model = loaded.model;
        let _ = self.ready.send(Ok(Loaded {
            weights_bytes: model.resident_weight_bytes(),
            load_ms: loaded.load_ms,
            max_position_embeddings: model.config().text.max_position_embeddings,
        }));
        while let Some(batch) = self.next_batch() {
            self.stats.batch_formed(batch.len());
            let started = Instant::now();
            let cfg = GenerateConfig {
                max_new_tokens: batch.iter().map(|w| w.max_new_tokens).max().unwrap_or(1),
                sampling: Sampling::Greedy,
                seed: 0,
                eos_token_ids: None,
            };
            let requests: Vec<_> = batch.iter().map(|w| w.encoded.request(&device)).collect();
            // A panic in the model must not take the server down with it: the batch gets an
            // error, the next batch runs.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // A row whose client has gone (timed out, disconnected) stops early.
                model.generate_cancellable(&requests, &cfg, &device, &|row| {
                    batch[row].reply.is_closed()
                })
            }));
            let outcome = match result {
                Ok(Ok(g)) => Ok(g),
                Ok(Err(e)) => Err(format!("generation failed: {e}")),
                Err(_) => Err("generation panicked (see the server log)".to_string()),
            };
            let busy_s = started.elapsed().as_secs_f64();
            match outcome {
                Ok(gens) => {
                    let mut new_tokens = 0;
                    for (w, g) in batch.into_iter().zip(gens) {
                        let mut tokens = g.tokens;
                        tokens.truncate(w.max_new_tokens);
                        new_tokens += tokens.len();
                        let eos = &model.config().tokens.eos_token_ids;
                        let done = Done {
                            stopped_on_eos: tokens.last().is_some_and(|t| eos.contains(t)),
                            tokens,
                            prompt_tokens: g.prompt_tokens,
                            queue_ms: started.duration_since(w.enqueued).as_secs_f64() * 1e3,
                            prefill_ms: g.prefill_ms,
                            decode_ms: g.decode_ms,
                            batch_size: g.batch_size,
                        };
                        let _ = w.reply.send(Ok(done));
                    }
                    self.stats.generated(new_tokens, busy_s);
                }
                Err(e) => {
                    tracing::error!(error = %e, "batch failed");
                    for w in batch {
                        let _ = w.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

impl WorkerJob {
    /// The next batch: blocks for one request, then takes what is queued, waiting at most
    /// `batch_wait` for more, up to `max_batch`. `None` once the queue is closed and empty.
    /// Requests whose client has gone (timed out, disconnected) are dropped here.
    fn next_batch(&self) -> Option<Vec<Work>> {
        loop {
            let first = self.rx.recv().ok()?;
            let deadline = Instant::now() + self.batch_wait;
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        match self.rx.recv_timeout(deadline - now) {
                            Ok(w) => batch.push(w),
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                                break
                            }
                        }
                    }
                }
            }
            self.depth.fetch_sub(batch.len(), Ordering::SeqCst);
            batch.retain(|w| !w.reply.is_closed());
            if !batch.is_empty() {
                return Some(batch);
            }
        }
    }
}
