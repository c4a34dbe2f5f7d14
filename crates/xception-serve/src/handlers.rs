//! The endpoints: reading a request's image, running it through its model's queue, and
//! answering in the same JSON shapes as the command line.

use crate::batcher::{Job, JobError, Output};
use crate::body;
use crate::error::ApiError;
use crate::{App, ModelName, ServedModel, OPENAPI};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use xception::engine::Activations;
use xception::pipeline::{self, ClassifyOutput};
use xception::{Item, Preprocess};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    model: Option<String>,
    top_k: Option<String>,
    /// /v1/segment: `png` (the mask, default) or `json`.
    format: Option<String>,
}

pub type QueryResult = Result<Query<Params>, axum::extract::rejection::QueryRejection>;

fn params(q: QueryResult) -> Result<Params, ApiError> {
    q.map(|q| q.0).map_err(|e| ApiError::bad_request(e.body_text()))
}

/// What a request asks of its model.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Task {
    Classify,
    Embed,
    Segment,
}

/// A decoded request: the network input, and for segmentation where the image sits in it.
struct Decoded {
    item: Item,
    /// The image's own width and height.
    original: (usize, usize),
    /// Height and width of the part of the input the image covers.
    content: (usize, usize),
}

/// The model's answer with what the handler needs to shape it.
struct Answer<'a> {
    model: &'a ServedModel,
    output: Output,
    decoded_original: (usize, usize),
    content: (usize, usize),
    top_k: Option<usize>,
    format: Option<String>,
}

/// Reads, decodes and runs one request. The body is read before anything is refused, so every
/// refusal reaches the client.
async fn infer(app: &App, q: QueryResult, req: Request, task: Task) -> Result<Answer<'_>, ApiError> {
    let request = body::read(req, app.limits.max_body_bytes).await?;
    let params = params(q)?;
    if task != Task::Classify && (params.top_k.is_some() || request.top_k.is_some()) {
        return Err(ApiError::bad_request("top_k applies to /v1/classify only"));
    }
    if task != Task::Segment && params.format.is_some() {
        return Err(ApiError::bad_request("format applies to /v1/segment only"));
    }
    if let Some(f) = params.format.as_deref().filter(|f| !["png", "json"].contains(f)) {
        return Err(ApiError::bad_request(format!("format '{f}' is not png or json")));
    }
    let query_top_k = params.top_k.as_deref().map(body::parse_top_k).transpose()?;
    let model = app.model(request.model.as_deref().or(params.model.as_deref()))?;
    let segmenter = model.config.segmentation.is_some();
    match task {
        Task::Classify if model.config.classes().is_none() => {
            return Err(ApiError::bad_request(format!("model '{}' has no classifier; POST /v1/embed for its features", model.name)))
        }
        Task::Segment if !segmenter => return Err(ApiError::bad_request(format!("model '{}' is not a segmentation model", model.name))),
        Task::Embed if segmenter => return Err(ApiError::bad_request(format!("model '{}' is a segmentation model; POST /v1/segment", model.name))),
        _ => {}
    }
    let top_k = request.top_k.or(query_top_k);
    if request.image.is_empty() {
        return Err(ApiError::bad_image("the request holds no image bytes"));
    }
    let decoded = decode(app, model, request.image, request.input).await?;
    let deadline = Instant::now() + Duration::from_millis(app.limits.inference_timeout_ms);
    let (reply, answer) = oneshot::channel();
    model.batcher.submit(Job { item: decoded.item, deadline, reply }).map_err(|_| ApiError::queue_full(&model.name))?;
    let timed_out = || ApiError::timeout(format!("model '{}': no result within {} ms", model.name, app.limits.inference_timeout_ms));
    let output = match tokio::time::timeout_at(deadline.into(), answer).await {
        Err(_) | Ok(Ok(Err(JobError::Expired))) => return Err(timed_out()),
        Ok(Err(_)) => return Err(ApiError::internal(format!("model '{}': the inference thread stopped", model.name))),
        Ok(Ok(Err(JobError::Failed(m)))) => return Err(ApiError::internal(m)),
        Ok(Ok(Ok(output))) => output,
    };
    Ok(Answer { model, output, decoded_original: decoded.original, content: decoded.content, top_k, format: params.format })
}

/// Decodes and preprocesses on the blocking pool, at most `decode_concurrency` at once; an
/// image whose header declares too many pixels is refused before its pixels are decoded.
async fn decode(app: &App, model: &ServedModel, bytes: axum::body::Bytes, input: String) -> Result<Decoded, ApiError> {
    let max_pixels = app.limits.max_pixels;
    let preprocess = model.preprocess;
    let (segmenter, size) = (model.config.segmentation.is_some(), model.input_size);
    let work = async {
        let permit = app.decode_slots.acquire().await.map_err(|_| ApiError::internal("decoder pool closed"))?;
        let task = tokio::task::spawn_blocking(move || -> Result<Decoded, ApiError> {
            let source = Path::new(&input);
            // The same guard decode_image applies, run first so its refusal is told apart (413).
            let (w, h) = xception::preprocess::image_dimensions(&bytes, source).map_err(|e| ApiError::bad_image(e.to_string()))?;
            xception::preprocess::check_declared_size(w, h, max_pixels, source).map_err(|e| ApiError::image_too_large(e.to_string()))?;
            let img = xception::preprocess::decode_image(&bytes, source, max_pixels).map_err(|e| ApiError::bad_image(e.to_string()))?;
            let original = (img.width() as usize, img.height() as usize);
            if segmenter {
                let fitted = xception::segment::fit(&img, size);
                let item = Item { name: input, height: size, width: size, data: fitted.data };
                return Ok(Decoded { item, original, content: (fitted.content_h, fitted.content_w) });
            }
            let s = preprocess.size();
            Ok(Decoded { item: Item { name: input, height: s, width: s, data: preprocess.apply(&img) }, original, content: (s, s) })
        });
        let result = task.await.map_err(|_| ApiError::internal("the image decoder panicked"));
        drop(permit);
        result?
    };
    tokio::time::timeout(Duration::from_millis(app.limits.decode_timeout_ms), work)
        .await
        .map_err(|_| ApiError::timeout(format!("decoding took longer than {} ms", app.limits.decode_timeout_ms)))?
}

pub(crate) fn with_model(mut response: Response, model: &ServedModel) -> Response {
    response.extensions_mut().insert(ModelName(model.name.clone()));
    if let Ok(v) = HeaderValue::from_str(&model.name) {
        response.headers_mut().insert("x-model", v);
    }
    response
}

pub async fn classify(State(app): State<Arc<App>>, q: QueryResult, req: Request) -> Result<Response, ApiError> {
    let answer = infer(&app, q, req, Task::Classify).await?;
    let (model, top_k) = (answer.model, answer.top_k);
    let Output::Prediction(prediction) = answer.output else { return Err(ApiError::internal("a classifier returned a segmentation")) };
    let classes = model.config.classes().unwrap_or(1);
    let k = top_k.unwrap_or(5).min(classes);
    let results = pipeline::classify(&model.config, vec![prediction], &model.labels, k).map_err(|e| ApiError::internal(e.to_string()))?;
    let out = ClassifyOutput { model: model.config.name(), weights: model.weights.clone(), results };
    Ok(with_model(Json(out).into_response(), model))
}

#[derive(Serialize)]
struct EmbedResult {
    input: String,
    embedding: Vec<f32>,
}

#[derive(Serialize)]
struct EmbedOutput {
    model: String,
    weights: String,
    pooling: String,
    dim: usize,
    results: Vec<EmbedResult>,
}

pub async fn embed(State(app): State<Arc<App>>, q: QueryResult, req: Request) -> Result<Response, ApiError> {
    let answer = infer(&app, q, req, Task::Embed).await?;
    let model = answer.model;
    let Output::Prediction(prediction) = answer.output else { return Err(ApiError::internal("an embedding model returned a segmentation")) };
    let out = EmbedOutput {
        model: model.config.name(),
        weights: model.weights.clone(),
        pooling: format!("{:?}", model.config.pooling).to_lowercase(),
        dim: prediction.pooled.len(),
        results: vec![EmbedResult { input: prediction.name, embedding: prediction.pooled }],
    };
    Ok(with_model(Json(out).into_response(), model))
}

#[derive(Serialize)]
struct SegmentClass {
    index: usize,
    label: String,
    fraction: f64,
}

#[derive(Serialize)]
struct SegmentOutput {
    model: String,
    weights: String,
    input: String,
    width: usize,
    height: usize,
    classes: Vec<SegmentClass>,
    /// The palette mask PNG, base64.
    mask_png: String,
}

/// The class map at the image's own size: a palette PNG (pixel = class, VOC colours), or JSON
/// with the classes' pixel fractions and the same PNG in base64 (`?format=json`).
pub async fn segment(State(app): State<Arc<App>>, q: QueryResult, req: Request) -> Result<Response, ApiError> {
    let answer = infer(&app, q, req, Task::Segment).await?;
    let model = answer.model;
    let Output::Segmentation(logits) = answer.output else { return Err(ApiError::internal("a segmentation model returned no class map")) };
    let ((width, height), (content_h, content_w)) = (answer.decoded_original, answer.content);
    let classes = model.config.segmentation.as_ref().map_or(1, |s| s.num_classes);
    let shaped = tokio::task::spawn_blocking(move || mask_png(&logits, content_h, content_w, width, height, classes))
        .await
        .map_err(|_| ApiError::internal("building the mask panicked"))??;
    let (png, fractions) = shaped;
    let response = if answer.format.as_deref() == Some("json") {
        let classes = fractions
            .iter()
            .enumerate()
            .filter(|(_, &f)| f > 0.0)
            .map(|(index, &fraction)| SegmentClass { index, label: model.labels.name(index), fraction })
            .collect();
        let out = SegmentOutput {
            model: model.config.name(),
            weights: model.weights.clone(),
            input: "request".into(),
            width,
            height,
            classes,
            mask_png: base64::engine::general_purpose::STANDARD.encode(&png),
        };
        Json(out).into_response()
    } else {
        ([(header::CONTENT_TYPE, HeaderValue::from_static("image/png"))], png).into_response()
    };
    Ok(with_model(response, model))
}

fn mask_png(logits: &Activations, content_h: usize, content_w: usize, width: usize, height: usize, classes: usize) -> Result<(Vec<u8>, Vec<f64>), ApiError> {
    let mask = xception::segment::label_map(logits, content_h, content_w, height, width);
    let png = xception::segment::encode_mask_png(&mask, width, height, &xception::segment::voc_palette()).map_err(ApiError::internal)?;
    Ok((png, xception::segment::class_fractions(&mask, classes)))
}

pub async fn list_models(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let models = app.models().ok_or_else(|| ApiError::not_ready("models are still loading"))?;
    let list: Vec<serde_json::Value> = models
        .iter()
        .map(|m| {
            let (preprocess, resize) = match m.preprocess {
                Preprocess::Keras { resize, .. } => ("keras", resize),
                Preprocess::Timm { resize, .. } => ("timm", resize),
            };
            let task = if m.config.segmentation.is_some() { "segment" } else if m.config.classes().is_some() { "classify" } else { "embed" };
            serde_json::json!({
                "name": m.name, "model": m.config.name(), "task": task, "weights": m.weights,
                "input_size": m.input_size, "preprocess": preprocess, "resize": format!("{resize:?}").to_lowercase(),
                "classes": m.config.classes(), "output_stride": m.config.output_stride,
                "max_batch": m.max_batch, "max_wait_ms": m.max_wait_ms, "queue": m.queue, "queue_depth": m.batcher.depth(),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "models": list })).into_response())
}

pub async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

pub async fn readyz(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    if app.ready() {
        return Ok(Json(serde_json::json!({"status": "ready"})).into_response());
    }
    Err(ApiError::not_ready(if app.shutting_down() { "the server is shutting down" } else { "models are still loading" }))
}

pub async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], app.metrics.encode()).into_response()
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

pub async fn not_found(State(app): State<Arc<App>>, req: Request) -> ApiError {
    let e = ApiError::not_found(format!("no endpoint at {}; see /openapi.json", req.uri().path()));
    body::discard(req.into_body(), app.limits.max_body_bytes).await;
    e
}

pub async fn method_not_allowed(State(app): State<Arc<App>>, req: Request) -> ApiError {
    let e = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{} is not allowed on {}", req.method(), req.uri().path()));
    body::discard(req.into_body(), app.limits.max_body_bytes).await;
    e
}
