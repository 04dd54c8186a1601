//! Routes, request bodies and errors of `medpipe serve`.
//!
//! A request body is multipart (`image` file fields, optional `prompt` and `max_new_tokens`
//! text fields) or JSON (`{"images": [base64 or data: URL], "prompt", "max_new_tokens"}`).
//! Everything a client can get wrong is answered 4xx with `{"error": {"status", "code",
//! "message"}}` naming the problem; 5xx is left for the server's own failures (503 when the
//! queue is full, 504 on timeout, 500 when generation fails).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Multipart, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::worker::{Done, Refused, Work};
use super::AppState;
use crate::metrics::answer::{parse_answer, ParseStatus};
use crate::model::processor::ImageInput;

/// The demo page, embedded so the binary serves it with no file beside it.
const PAGE: &str = include_str!("page.html");
/// The prompt of `/v1/extract`: the one the model was fine-tuned and evaluated with.
pub(crate) const EXTRACT_PROMPT: &str = crate::data::sample::PROMPT;
/// Longest free prompt of `/v1/analyze`, characters (the token limit is checked after).
const MAX_PROMPT_CHARS: usize = 8_000;

type Shared = Arc<AppState>;

/// Every route, with the body limit and the request counter around them.
pub(crate) fn router(state: Shared) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/benchmark", get(benchmark))
        .route("/v1/extract", post(extract))
        .route("/v1/analyze", post(analyze))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// A client or server error as JSON.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {
            "status": self.status.as_u16(),
            "code": self.code,
            "message": self.message,
        }}));
        let mut r = (self.status, body).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// Counts every answer by route and status; times the model endpoints.
async fn count(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let t = Instant::now();
    let response = next.run(req).await;
    // The latency histogram is of answers: a refusal in a millisecond would hide slow ones.
    let timed =
        response.status().is_success() && (endpoint == "/v1/extract" || endpoint == "/v1/analyze");
    state.stats.request(
        &endpoint,
        response.status().as_u16(),
        t.elapsed().as_secs_f64(),
        timed,
    );
    response
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no route {} {} (see /openapi.json)",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn openapi() -> Json<Value> {
    Json(super::openapi::document())
}

async fn health(State(state): State<Shared>) -> Json<Value> {
    let (rss, peak) = crate::bench::memory::rss_bytes().unwrap_or((0, 0));
    let (batches, mean_batch) = state.stats.batches();
    let l = &state.limits;
    Json(json!({
        "status": "ok",
        "model": state.info,
        "memory": {"rss_bytes": rss, "peak_rss_bytes": peak, "weights_bytes": state.info.weights_bytes},
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "queue_depth": state.queue.depth(),
        "batches": batches,
        "mean_batch_size": mean_batch,
        "workspace": state.workspace.as_ref().map(|w| w.display().to_string()),
        "limits": {
            "max_batch": l.max_batch,
            "batch_wait_ms": l.batch_wait.as_secs_f64() * 1e3,
            "max_queue": l.max_queue,
            "max_new_tokens": l.max_new_tokens,
            "max_images": l.max_images,
            "max_body_bytes": l.max_body_bytes,
            "max_image_pixels": l.max_image_pixels,
            "request_timeout_s": l.request_timeout.as_secs_f64(),
        },
    }))
}

async fn metrics(State(state): State<Shared>) -> Response {
    let text = state
        .stats
        .render(state.queue.depth(), state.started.elapsed().as_secs_f64());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn benchmark(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    let Some(ws) = state.workspace.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_workspace",
            "this server was started without --workspace, so it has no report to show",
        ));
    };
    tokio::task::spawn_blocking(move || super::source::workspace_figures(&ws))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "no_report", e.to_string()))
}

/// A request body once read, before any image is decoded.
#[derive(Debug, Default)]
struct Body {
    /// (name for errors, encoded bytes)
    images: Vec<(String, Vec<u8>)>,
    prompt: Option<String>,
    max_new_tokens: Option<usize>,
}

/// The JSON form of a request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBody {
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    max_new_tokens: Option<usize>,
}

/// Reads a multipart or JSON body (413 past the size limit, 415 for another content type).
async fn read_body(state: &Shared, req: Request) -> Result<Body, ApiError> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ctype.starts_with("multipart/form-data") {
        let limit = state.limits.max_body_bytes;
        let mut mp = Multipart::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), "bad_multipart", e.body_text()))?;
        let multipart_error = |e: axum::extract::multipart::MultipartError| {
            rejection(e.status(), "bad_multipart", e.body_text(), limit)
        };
        let mut body = Body::default();
        loop {
            let field = mp.next_field().await.map_err(multipart_error)?;
            let Some(field) = field else { break };
            let name = field.name().unwrap_or("").to_string();
            match name.as_str() {
                "image" | "images" => {
                    let label = field
                        .file_name()
                        .map_or_else(|| format!("upload #{}", body.images.len()), str::to_string);
                    let bytes = field.bytes().await.map_err(multipart_error)?;
                    body.images.push((label, bytes.to_vec()));
                }
                "prompt" => body.prompt = Some(field.text().await.map_err(multipart_error)?),
                "max_new_tokens" => {
                    let t = field.text().await.map_err(multipart_error)?;
                    body.max_new_tokens = Some(t.trim().parse().map_err(|_| {
                        ApiError::bad(
                            "bad_field",
                            format!("max_new_tokens `{t}` is not a whole number"),
                        )
                    })?);
                }
                other => {
                    return Err(ApiError::bad(
                        "unknown_field",
                        format!(
                            "unknown form field `{other}` (expected image, prompt, max_new_tokens)"
                        ),
                    ))
                }
            }
        }
        Ok(body)
    } else if ctype.starts_with("application/json") {
        let limit = state.limits.max_body_bytes;
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| rejection(e.status(), "bad_body", e.body_text(), limit))?;
        if bytes.is_empty() {
            return Err(ApiError::bad("empty_body", "the request body is empty"));
        }
        let j: JsonBody = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad("bad_json", format!("the JSON body does not read: {e}")))?;
        let images = j
            .images
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // A data: URL (what a browser's FileReader gives) or bare base64.
                let b64 = s.split_once(";base64,").map_or(s.as_str(), |(_, b)| b);
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map(|b| (format!("images[{i}]"), b))
                    .map_err(|e| {
                        ApiError::bad("bad_base64", format!("images[{i}] is not base64: {e}"))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Body {
            images,
            prompt: j.prompt,
            max_new_tokens: j.max_new_tokens,
        })
    } else if ctype.is_empty() {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "no_content_type",
            "no Content-Type: send multipart/form-data (image files) or application/json (base64 images)",
        ))
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "wrong_content_type",
            format!("Content-Type `{ctype}` is not accepted: send multipart/form-data or application/json"),
        ))
    }
}

/// A body axum could not read: 413 names the limit, anything else keeps axum's reason.
fn rejection(status: StatusCode, code: &'static str, text: String, limit: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "too_large",
            format!(
                "the request body is larger than this server's limit of {} MB (--max-body-mb)",
                limit / (1024 * 1024)
            ),
        )
    } else {
        ApiError::new(status, code, text)
    }
}

/// One item of an answer, as the evaluate stage reads it.
#[derive(Debug, Serialize)]
struct ItemOut {
    term: String,
    value: String,
    unit: String,
}

async fn extract(State(state): State<Shared>, req: Request) -> Result<Json<Value>, ApiError> {
    let body = read_body(&state, req).await?;
    if body.prompt.is_some() {
        return Err(ApiError::bad(
            "unknown_field",
            "/v1/extract uses the extraction prompt the model was trained with; send free prompts to /v1/analyze",
        ));
    }
    if body.images.is_empty() {
        return Err(ApiError::bad(
            "no_image",
            "send at least one document image",
        ));
    }
    answer(state, body, EXTRACT_PROMPT.to_string()).await
}

async fn analyze(State(state): State<Shared>, req: Request) -> Result<Json<Value>, ApiError> {
    let mut body = read_body(&state, req).await?;
    let prompt = body.prompt.take().unwrap_or_default();
    if prompt.trim().is_empty() {
        return Err(ApiError::bad("no_prompt", "send a non-empty `prompt`"));
    }
    if prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::bad(
            "prompt_too_long",
            format!("the prompt has more than {MAX_PROMPT_CHARS} characters"),
        ));
    }
    answer(state, body, prompt).await
}

/// Validates, preprocesses, queues, waits, and shapes the answer.
async fn answer(state: Shared, body: Body, prompt: String) -> Result<Json<Value>, ApiError> {
    let received = Instant::now();
    let l = &state.limits;
    if body.images.len() > l.max_images {
        return Err(ApiError::bad(
            "too_many_images",
            format!(
                "{} images sent; this server takes at most {} per request",
                body.images.len(),
                l.max_images
            ),
        ));
    }
    let max_new_tokens = body.max_new_tokens.unwrap_or(l.max_new_tokens);
    if max_new_tokens == 0 || max_new_tokens > l.max_new_tokens {
        return Err(ApiError::bad(
            "bad_max_new_tokens",
            format!(
                "max_new_tokens {max_new_tokens} is outside 1..={} (this server's limit)",
                l.max_new_tokens
            ),
        ));
    }
    let st = state.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let images: Vec<ImageInput> = body
            .images
            .into_iter()
            .map(|(name, bytes)| ImageInput::Encoded { name, bytes })
            .collect();
        st.encoder.encode(&images, &prompt)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(input_error)?;
    let max_pos = state.info.max_position_embeddings;
    let prompt_tokens = encoded.input_ids.len();
    if prompt_tokens + max_new_tokens > max_pos {
        return Err(ApiError::bad(
            "context_exceeded",
            format!(
                "the prompt is {prompt_tokens} tokens (images included); with max_new_tokens {max_new_tokens} it exceeds the model's context of {max_pos} tokens: send smaller or fewer images, a shorter prompt, or fewer new tokens"
            ),
        ));
    }
    let preprocess_ms = received.elapsed().as_secs_f64() * 1e3;
    let (tx, rx) = tokio::sync::oneshot::channel();
    state
        .queue
        .submit(Work {
            encoded,
            max_new_tokens,
            enqueued: Instant::now(),
            reply: tx,
        })
        .map_err(|r| match r {
            Refused::Full => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                format!(
                    "{} requests are already waiting; retry shortly",
                    state.limits.max_queue
                ),
            ),
            Refused::Stopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "the server is shutting down",
            ),
        })?;
    let remaining = l.request_timeout.saturating_sub(received.elapsed());
    let done: Done = match tokio::time::timeout(remaining, rx).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "no answer within {:.0} s (--timeout-s)",
                    l.request_timeout.as_secs_f64()
                ),
            ))
        }
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "the model worker stopped before answering",
            ))
        }
        Ok(Ok(Err(e))) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "generation_failed",
                e,
            ))
        }
        Ok(Ok(Ok(d))) => d,
    };
    let text = state.encoder.prompts().decode(&done.tokens).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "decode_failed",
            e.to_string(),
        )
    })?;
    let parsed = parse_answer(&text);
    let items: Vec<ItemOut> = parsed
        .items
        .into_iter()
        .map(|i| ItemOut {
            term: i.term,
            value: i.value,
            unit: i.unit.unwrap_or_default(),
        })
        .collect();
    let generation_ms = done.prefill_ms + done.decode_ms;
    Ok(Json(json!({
        "items": items,
        "parse_status": match parsed.status {
            ParseStatus::Clean => "clean",
            ParseStatus::Recovered => "recovered",
            ParseStatus::Unparseable => "unparseable",
        },
        "raw_answer": text,
        "timings": {
            "preprocess_ms": preprocess_ms,
            "queue_ms": done.queue_ms,
            "prefill_ms": done.prefill_ms,
            "decode_ms": done.decode_ms,
            "total_ms": received.elapsed().as_secs_f64() * 1e3,
        },
        "tokens": {
            "prompt": done.prompt_tokens,
            "new": done.tokens.len(),
            "stopped_on_eos": done.stopped_on_eos,
            "per_s": if generation_ms > 0.0 { done.tokens.len() as f64 / (generation_ms / 1e3) } else { 0.0 },
        },
        "batch_size": done.batch_size,
        "variant": state.info.variant,
    })))
}

/// An image or prompt the processor or tokenizer refused: the client's problem, named.
fn input_error(e: crate::model::loader::LoadError) -> ApiError {
    use crate::model::loader::LoadError;
    use crate::model::processor::ProcessorError;
    let code = match &e {
        LoadError::Processor(ProcessorError::ImageTooLarge { .. }) => Some("image_too_large"),
        LoadError::Processor(
            ProcessorError::DecodeImage { .. } | ProcessorError::OpenImage { .. },
        ) => Some("not_an_image"),
        LoadError::Processor(ProcessorError::Geometry { .. }) => Some("bad_image_shape"),
        LoadError::Processor(_) | LoadError::Prompt(_) => Some("bad_input"),
        _ => None,
    };
    // The error and its sources, `: `-joined: the upload's name and the reason.
    let message = format!("{:#}", anyhow::Error::new(e));
    match code {
        Some(code) => ApiError::bad(code, message),
        None => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
    }
}
