//! `xception serve`: the fast engine behind HTTP.
//!
//! Requests are decoded on a bounded pool of blocking threads (never on the async workers),
//! queued per model, and batched by one inference thread per model ([`batcher`]). Every limit
//! answers before work is spent: body size (413) before the body is read in full, declared
//! pixel count (413) before decoding, queue length (503 + Retry-After) before queueing.

pub mod batcher;
pub mod body;
pub mod config;
pub mod error;
mod handlers;
pub mod metrics;

use crate::batcher::{Batcher, Batching};
use crate::config::{Limits, ServeConfig};
use crate::error::{ApiError, ErrorCode};
use crate::handlers::{classify, embed, healthz, list_models, method_not_allowed, metrics_text, not_found, openapi, readyz};
use crate::metrics::{EndpointLabels, Metrics, RequestLabels};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use xception::pipeline::Pipeline;
use xception::{Labels, ModelConfig, Preprocess};

/// The OpenAPI 3 description of every endpoint, served at /openapi.json.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// One model being served.
pub struct ServedModel {
    pub name: String,
    pub weights: String,
    pub config: ModelConfig,
    pub preprocess: Preprocess,
    /// The network's input size (segmentation models: the square images are fitted into).
    pub input_size: usize,
    pub labels: Labels,
    pub batcher: Batcher,
    pub max_batch: usize,
    pub max_wait_ms: u64,
    pub queue: usize,
}

/// What every handler shares.
pub struct App {
    pub limits: Limits,
    token: Option<String>,
    pub metrics: Arc<Metrics>,
    models: OnceLock<Vec<ServedModel>>,
    shutting_down: AtomicBool,
    pub(crate) decode_slots: Semaphore,
    next_request_id: AtomicU64,
}

impl App {
    fn new(limits: Limits, token: Option<String>) -> App {
        let slots = if limits.decode_concurrency == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { limits.decode_concurrency };
        App {
            limits,
            token,
            metrics: Arc::new(Metrics::new()),
            models: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            decode_slots: Semaphore::new(slots),
            next_request_id: AtomicU64::new(1),
        }
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub(crate) fn models(&self) -> Option<&Vec<ServedModel>> {
        self.models.get()
    }

    pub(crate) fn ready(&self) -> bool {
        self.models.get().is_some() && !self.shutting_down.load(Ordering::SeqCst)
    }

    /// The model a request names, or the first one served.
    pub(crate) fn model(&self, name: Option<&str>) -> Result<&ServedModel, ApiError> {
        let models = self.models.get().ok_or_else(|| ApiError::not_ready("models are still loading"))?;
        match name {
            None => Ok(&models[0]),
            Some(n) => models.iter().find(|m| m.name == n).ok_or_else(|| {
                let known: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
                ApiError::not_found(format!("no model named '{n}' (served: {})", known.join(", ")))
            }),
        }
    }
}

/// Loads every model, binds, serves until SIGTERM/SIGINT, then lets in-flight requests finish
/// (for at most `limits.shutdown_timeout_ms`). `on_listening` gets the bound address as soon as
/// the socket is open (port 0 picks a free one); models load after that, and /readyz answers 200
/// once they have.
pub fn run(config: ServeConfig, offline: bool, on_listening: impl FnOnce(std::net::SocketAddr)) -> xception::Result<()> {
    config.validate()?;
    let token = config.token()?;
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("serve")
        .build()
        .map_err(|e| xception::Error::Config(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(serve(config, token, offline, on_listening))
}

async fn serve(config: ServeConfig, token: Option<String>, offline: bool, on_listening: impl FnOnce(std::net::SocketAddr)) -> xception::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.addr)
        .await
        .map_err(|e| xception::Error::Config(format!("cannot listen on {}: {e}", config.addr)))?;
    let addr = listener.local_addr().map_err(|e| xception::Error::Config(format!("listening socket: {e}")))?;
    let app = Arc::new(App::new(config.limits.clone(), token));
    tracing::info!(%addr, auth = app.token.is_some(), "listening; loading models");
    on_listening(addr);

    let stop = Arc::new(tokio::sync::Notify::new());
    let stopping = {
        let (app, stop) = (app.clone(), stop.clone());
        async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = stop.notified() => {}
            }
            app.shutting_down.store(true, Ordering::SeqCst);
            tracing::info!("shutting down: refusing new connections, finishing requests in flight");
        }
    };
    let stopped = Arc::new(tokio::sync::Notify::new());
    let mut server = {
        let (router, stopped) = (router(app.clone()), stopped.clone());
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    stopping.await;
                    stopped.notify_one();
                })
                .await
        })
    };

    // Models load while the socket already answers /healthz (and /readyz with 503).
    let loading = {
        let (app, config) = (app.clone(), config.clone());
        tokio::task::spawn_blocking(move || load_models(&app, &config, offline))
    };
    let workers = match loading.await {
        Ok(Ok(workers)) => workers,
        failed => {
            let e = match failed {
                Ok(Err(e)) => e,
                _ => xception::Error::Config("loading the models panicked".into()),
            };
            tracing::error!(error = %e, "cannot load the models");
            stop.notify_one();
            let _ = server.await;
            return Err(e);
        }
    };
    tracing::info!(models = workers.len(), "ready");

    let grace = Duration::from_millis(config.limits.shutdown_timeout_ms);
    let finished = tokio::select! {
        r = &mut server => { r.ok().and_then(|r| r.ok()); true }
        _ = async { stopped.notified().await; tokio::time::sleep(grace).await } => false,
    };
    if !finished {
        tracing::warn!(grace_ms = config.limits.shutdown_timeout_ms, "requests still in flight after the shutdown grace period; exiting anyway");
        return Ok(());
    }
    // The queues are empty now; dropping the last handle on them ends each inference thread.
    if let Ok(app) = Arc::try_unwrap(app) {
        drop(app);
        for w in workers {
            let _ = w.join();
        }
    }
    tracing::info!("stopped");
    Ok(())
}

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
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Structured logs: one JSON object per line on stderr.
fn init_logging() {
    let _ = tracing_subscriber::fmt().json().with_writer(std::io::stderr).with_target(false).with_current_span(false).try_init();
}

fn load_models(app: &App, config: &ServeConfig, offline: bool) -> xception::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut models = Vec::new();
    let mut workers = Vec::new();
    for entry in &config.models {
        let started = Instant::now();
        let pipeline = Pipeline::load(&entry.load_options(offline)?)?;
        let config = pipeline.config.clone();
        let name = entry.name.clone().unwrap_or_else(|| config.name());
        if models.iter().any(|m: &ServedModel| m.name == name) {
            return Err(xception::Error::Config(format!("two models are named '{name}': give each a `name`")));
        }
        let seg_classes = config.segmentation.as_ref().map(|s| s.num_classes);
        let labels = match entry.labels.as_deref() {
            Some("imagenet") => Labels::imagenet(),
            Some("voc") => Labels::voc(),
            Some(file) => Labels::from_file(Path::new(file))?,
            None if config.classes() == Some(1000) => Labels::imagenet(),
            None if seg_classes == Some(21) => Labels::voc(),
            None => Labels::numbered(),
        };
        let preprocess = pipeline.preprocess;
        let input_size = if seg_classes.is_some() { entry.size.unwrap_or(513) } else { preprocess.size() };
        let batching = Batching { max_batch: entry.max_batch, max_wait: Duration::from_millis(entry.max_wait_ms), queue: entry.queue };
        let (batcher, worker) = Batcher::start(&name, pipeline, batching, app.metrics.clone())
            .map_err(|e| xception::Error::Config(format!("cannot start the inference thread of '{name}': {e}")))?;
        tracing::info!(model = %name, variant = %config.name(), weights = %entry.weights.display(), seconds = started.elapsed().as_secs_f64(), "model loaded");
        workers.push(worker);
        models.push(ServedModel {
            name,
            weights: entry.weights.display().to_string(),
            config,
            preprocess,
            input_size,
            labels,
            batcher,
            max_batch: entry.max_batch,
            max_wait_ms: entry.max_wait_ms,
            queue: entry.queue,
        });
    }
    let _ = app.models.set(models);
    Ok(workers)
}

fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/classify", post(classify))
        .route("/v1/embed", post(embed))
        .route("/v1/segment", post(handlers::segment))
        .route("/v1/models", get(list_models))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// The model a response was computed with, for the request log.
#[derive(Clone)]
pub(crate) struct ModelName(pub(crate) String);

/// Counts, times and logs every request; echoes (or assigns) its X-Request-Id.
async fn observe(State(app): State<Arc<App>>, matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)))
        .map(str::to_string)
        .unwrap_or_else(|| app.next_request_id.fetch_add(1, Ordering::Relaxed).to_string());
    let mut response = next.run(req).await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    app.metrics.requests.get_or_create(&RequestLabels { endpoint: endpoint.clone(), status }).inc();
    app.metrics.latency.get_or_create(&EndpointLabels { endpoint }).observe(seconds);
    let error = response.extensions().get::<ErrorCode>().map(|c| c.0);
    if let Some(code) = error {
        app.metrics.error(code);
    }
    let model = response.extensions().get::<ModelName>().map(|m| m.0.clone());
    tracing::info!(id = %id, method = %method, path = %path, status, ms = seconds * 1e3, model, error, "request");
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Bearer-token check for /v1/*, in constant time.
async fn require_token(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        let same = given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if !same {
            body::discard(req.into_body(), app.limits.max_body_bytes).await;
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

