//! `medpipe serve`: the extraction API and its demo page.
//!
//! One model runs on one worker thread ([`worker`]); HTTP handlers ([`api`]) decode and
//! preprocess uploads on tokio's blocking pool, then queue the encoded prompt. The worker takes
//! whatever is queued (up to `max_batch`, waiting at most `batch_wait` for company) and runs
//! it as one batched generation, so concurrent clients share prefill and decode steps. The
//! queue is bounded: when it is full a request is answered 503 with `Retry-After`, so memory
//! never grows with the load.
//!
//! - [`source`]: which checkpoint to serve (a directory, builtin:tiny, or a workspace's
//!   recommended variant) and the workspace figures for `/v1/benchmark`;
//! - [`api`]: routes, request bodies (multipart or JSON with base64), errors as 4xx JSON;
//! - [`stats`]: the Prometheus counters behind `/metrics`;
//! - [`openapi`]: the API description served at `/openapi.json`;
//! - `page.html`: the demo page at `/`, embedded at compile time (no CDN).

mod api;
pub mod openapi;
pub mod source;
mod stats;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::{Device, Precision};
use crate::model::loader::InputEncoder;

pub use source::{ModelChoice, SourceError};

/// Limits that keep one server's memory and latency bounded.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Requests generated together at most.
    pub max_batch: usize,
    /// How long the worker waits for more requests to join a batch.
    pub batch_wait: Duration,
    /// Requests waiting (not yet in a batch) at most; more are answered 503.
    pub max_queue: usize,
    /// New tokens a request may ask for at most (and the default when it asks for none).
    pub max_new_tokens: usize,
    /// Images per request at most.
    pub max_images: usize,
    /// Largest request body, bytes (413 above it).
    pub max_body_bytes: usize,
    /// Largest decoded image, pixels from its header (the CLI's decompression-bomb limit).
    pub max_image_pixels: u64,
    /// A request not answered within this time gets 504.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch: 16,
            batch_wait: Duration::from_millis(10),
            max_queue: 64,
            max_new_tokens: 128,
            max_images: 4,
            max_body_bytes: 20 * 1024 * 1024,
            max_image_pixels: crate::model::processor::DEFAULT_MAX_INPUT_PIXELS,
            request_timeout: Duration::from_secs(120),
        }
    }
}

impl Limits {
    /// Checks that every limit can admit at least one request.
    ///
    /// # Errors
    /// The flag name and why, for a zero limit.
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            ("--max-batch", self.max_batch as u64),
            ("--max-queue", self.max_queue as u64),
            ("--max-new-tokens", self.max_new_tokens as u64),
            ("--max-images", self.max_images as u64),
            ("--max-body-mb", self.max_body_bytes as u64),
            ("--max-image-pixels", self.max_image_pixels),
            ("--timeout-s", self.request_timeout.as_millis() as u64),
        ];
        match checks.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(format!("{name} must be at least 1")),
            None => Ok(()),
        }
    }
}

/// Everything `medpipe serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// What to serve.
    pub model: ModelChoice,
    pub device: Device,
    pub precision: Precision,
    /// Address to listen on (port 0: any free port, printed at start).
    pub addr: SocketAddr,
    pub limits: Limits,
    /// The workspace whose reports `/v1/benchmark` and the model card show.
    pub workspace: Option<std::path::PathBuf>,
}

/// Errors before the server accepts its first request.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error("reading the tokenizer and image processor of {dir}")]
    Encoder {
        dir: std::path::PathBuf,
        #[source]
        source: Box<crate::model::loader::LoadError>,
    },
    #[error("loading the model: {0}")]
    Load(String),
    #[error("listening on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed")]
    Io(#[from] std::io::Error),
}

/// What handlers share.
pub(crate) struct AppState {
    pub(crate) encoder: InputEncoder,
    pub(crate) queue: worker::Queue,
    pub(crate) limits: Limits,
    pub(crate) info: ServerInfo,
    pub(crate) stats: stats::Stats,
    pub(crate) started: Instant,
    pub(crate) workspace: Option<std::path::PathBuf>,
}

/// What `/health` says about the model, fixed at start.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ServerInfo {
    /// The `--model` / workspace description.
    pub(crate) model: String,
    /// `base`, `nf4`, `nf4+adapter`, or `custom` for a directory given by hand.
    pub(crate) variant: String,
    /// Why this variant (the workspace's recommendation, or the flag).
    pub(crate) chosen_because: String,
    pub(crate) model_dir: String,
    pub(crate) adapter_dir: Option<String>,
    pub(crate) device: String,
    pub(crate) dtype: String,
    /// Model weights resident on the device, bytes.
    pub(crate) weights_bytes: u64,
    /// Files → model ready, ms.
    pub(crate) load_ms: f64,
    /// Prompt plus new tokens the model can hold.
    pub(crate) max_position_embeddings: usize,
}

/// Binds `opts.addr`, loads the model, calls `on_listening` with the bound address (the
/// CLI prints it), and serves until SIGTERM or Ctrl-C; then stops accepting, lets in-flight
/// requests finish, and returns.
///
/// # Errors
/// Bad limits, a model or tokenizer that does not load, an address that cannot be bound.
pub fn serve(opts: ServeOptions, on_listening: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    opts.limits.validate().map_err(ServeError::Invalid)?;
    // Bound before the model loads: a busy port is reported in a second, not after a 7B load.
    let listener = std::net::TcpListener::bind(opts.addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| ServeError::Bind {
            addr: opts.addr,
            source,
        })?;
    let encoder = InputEncoder::from_dir(&opts.model.encoder_dir)
        .map_err(|source| ServeError::Encoder {
            dir: opts.model.encoder_dir.clone(),
            source: Box::new(source),
        })?
        .with_max_input_pixels(opts.limits.max_image_pixels);
    let stats = stats::Stats::default();
    let (queue, handle, loaded) = worker::start(&opts, stats.clone())?;
    let info = ServerInfo {
        model: opts.model.label.clone(),
        variant: opts.model.variant.clone(),
        chosen_because: opts.model.reason.clone(),
        model_dir: opts.model.model_dir.display().to_string(),
        adapter_dir: opts
            .model
            .adapter_dir
            .as_ref()
            .map(|d| d.display().to_string()),
        device: opts.device.to_string(),
        dtype: opts.precision.to_string(),
        weights_bytes: loaded.weights_bytes,
        load_ms: loaded.load_ms,
        max_position_embeddings: loaded.max_position_embeddings,
    };
    let state = Arc::new(AppState {
        encoder,
        queue,
        limits: opts.limits.clone(),
        info,
        stats,
        started: Instant::now(),
        workspace: opts.workspace.clone(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("medpipe-http")
        .build()?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        on_listening(listener.local_addr()?);
        axum::serve(listener, api::router(state.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        Ok::<(), ServeError>(())
    });
    // Every handler has returned: closing the queue lets the worker finish its batch and exit.
    drop(state);
    runtime.shutdown_timeout(Duration::from_secs(5));
    let _ = handle.join();
    served
}

/// Resolves on SIGTERM (what `kill` and container runtimes send) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: draining in-flight requests");
}
