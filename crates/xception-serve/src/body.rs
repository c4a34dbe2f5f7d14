//! The three ways a request carries its image: the raw bytes (`image/jpeg`, `image/png`,
//! `image/webp`, `application/octet-stream`), a `multipart/form-data` form with an `image`
//! (or `file`) field, or JSON `{"image": "<base64>"}`. Options (`model`, `top_k`) come from the
//! query string, the form or the JSON object.

use crate::error::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use base64::Engine as _;
use serde::Deserialize;

/// One image and the options that came with it.
#[derive(Debug, Default)]
pub struct ImageRequest {
    pub image: Bytes,
    /// What the answer calls the input: the uploaded file's name, else "request".
    pub input: String,
    pub model: Option<String>,
    pub top_k: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    /// Base64 (standard alphabet, padding optional), or a `data:image/...;base64,` URL.
    image: String,
    model: Option<String>,
    top_k: Option<usize>,
    name: Option<String>,
}

const ACCEPTED: &str = "image/jpeg, image/png, image/webp, application/octet-stream, multipart/form-data or application/json";

/// Reads the body (at most `limit` bytes) and takes the image out of it.
pub async fn read(req: Request, limit: usize) -> Result<ImageRequest, ApiError> {
    let declared = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.saturating_mul(DRAIN_FACTOR) as u64) {
        return Err(ApiError::body_too_large(limit)); // not worth reading at all
    }
    let content_type = req.headers().get(CONTENT_TYPE).map(|v| v.to_str().map(str::to_string));
    let (parts, body) = req.into_parts();
    // Read first, refuse after: a refusal sent while the client is still sending would reach it
    // as a reset connection.
    let bytes = read_limited(body, limit).await?;
    let content_type = match content_type {
        None => return Err(ApiError::unsupported_media_type(format!("no Content-Type; send {ACCEPTED}"))),
        Some(v) => v.map_err(|_| ApiError::unsupported_media_type("Content-Type is not ASCII"))?,
    };
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match mime.as_str() {
        "image/jpeg" | "image/png" | "image/webp" | "application/octet-stream" => {
            Ok(ImageRequest { image: bytes, input: "request".into(), ..Default::default() })
        }
        "application/json" => {
            let r: JsonRequest = serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
            let encoded = match r.image.split_once(";base64,") {
                Some((prefix, data)) if prefix.starts_with("data:") => data,
                _ => r.image.as_str(),
            };
            let image = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(encoded.trim_end_matches('=').as_bytes())
                .map_err(|e| ApiError::bad_request(format!("field 'image' is not valid base64: {e}")))?;
            Ok(ImageRequest { image: image.into(), input: r.name.unwrap_or_else(|| "request".into()), model: r.model, top_k: r.top_k })
        }
        "multipart/form-data" => {
            let req = Request::from_parts(parts, Body::from(bytes));
            let mut form = Multipart::from_request(req, &()).await.map_err(|e| ApiError::bad_request(format!("invalid multipart form: {}", e.body_text())))?;
            let mut out = ImageRequest { input: "request".into(), ..Default::default() };
            let mut found = false;
            while let Some(field) = form.next_field().await.map_err(|e| ApiError::bad_request(format!("invalid multipart form: {}", e.body_text())))? {
                let name = field.name().unwrap_or("").to_string();
                let file_name = field.file_name().map(str::to_string);
                let data = field.bytes().await.map_err(|e| ApiError::bad_request(format!("multipart field '{name}': {}", e.body_text())))?;
                let text = || String::from_utf8(data.to_vec()).map_err(|_| ApiError::bad_request(format!("multipart field '{name}' is not UTF-8 text")));
                match name.as_str() {
                    "image" | "file" => {
                        if found {
                            return Err(ApiError::bad_request("one image per request: the form has two image fields"));
                        }
                        found = true;
                        out.image = data.clone();
                        if let Some(f) = file_name.filter(|f| !f.is_empty()) {
                            out.input = f;
                        }
                    }
                    "model" => out.model = Some(text()?),
                    "top_k" => out.top_k = Some(parse_top_k(&text()?)?),
                    other => return Err(ApiError::bad_request(format!("unknown multipart field '{other}' (expected image, model, top_k)"))),
                }
            }
            if !found {
                return Err(ApiError::bad_request("the multipart form has no 'image' field"));
            }
            Ok(out)
        }
        _ => Err(ApiError::unsupported_media_type(format!("Content-Type '{mime}' is not accepted; send {ACCEPTED}"))),
    }
}

/// The body, at most `limit` bytes. A larger one is still read (and dropped) up to
/// [`DRAIN_FACTOR`] times the limit, so the client, which is still sending, gets to read the
/// 413 instead of a reset connection; past that the connection is simply closed.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        seen = seen.saturating_add(data.len());
        if seen > limit.saturating_mul(DRAIN_FACTOR) {
            break;
        }
        if seen <= limit {
            kept.extend_from_slice(&data);
        }
    }
    if seen > limit {
        return Err(ApiError::body_too_large(limit));
    }
    Ok(kept.into())
}

/// Reads and drops a body that will not be used (a request refused before its body was looked
/// at), so the client can read the refusal instead of meeting a reset connection.
pub async fn discard(body: Body, limit: usize) {
    let _ = read_limited(body, limit).await;
}

/// How far past the limit an oversized body is drained before the connection is dropped.
const DRAIN_FACTOR: usize = 4;

pub fn parse_top_k(s: &str) -> Result<usize, ApiError> {
    match s.trim().parse::<usize>() {
        Ok(k) if k >= 1 => Ok(k),
        _ => Err(ApiError::bad_request(format!("top_k '{s}' is not a positive integer"))),
    }
}
