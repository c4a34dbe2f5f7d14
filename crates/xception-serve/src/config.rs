//! What `xception serve` runs: the models, the address and the limits, from a TOML file and the
//! command line.
//!
//! ```toml
//! addr = "127.0.0.1:8080"
//! token_file = "/run/secrets/xception-token"   # optional bearer token for /v1/*
//!
//! [limits]
//! max_body_bytes = 20971520
//! max_pixels = 50000000
//!
//! [[model]]
//! name = "kitchen"
//! weights = "kitchenware.keras"
//! max_batch = 8
//! max_wait_ms = 5
//! queue = 64
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};
use xception::pipeline::{Head, LoadOptions, PreprocessKind};
use xception::Precision;
use xception::{Backend, Error, Pooling, Resize, Result, Variant};

/// The whole server.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    #[serde(default = "default_addr")]
    pub addr: String,
    /// A file holding the bearer token required on /v1/* (also XCEPTION_SERVE_TOKEN).
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, rename = "model")]
    pub models: Vec<ModelEntry>,
}

fn default_addr() -> String {
    "127.0.0.1:8080".into()
}

/// Per-request limits, applied before any work is done for the request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body (bytes); larger ones get 413 before they are read in full.
    pub max_body_bytes: usize,
    /// Largest image (width x height) a header may declare; refused before decoding.
    pub max_pixels: u64,
    /// Longest a decode + preprocess may take.
    pub decode_timeout_ms: u64,
    /// Longest a request may wait for its inference, queueing included.
    pub inference_timeout_ms: u64,
    /// Images decoded at once (0: one per core); more wait their turn.
    pub decode_concurrency: usize,
    /// On SIGTERM, how long in-flight requests get before the process exits anyway.
    pub shutdown_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body_bytes: 20 << 20,
            max_pixels: 50_000_000,
            decode_timeout_ms: 10_000,
            inference_timeout_ms: 30_000,
            decode_concurrency: 0,
            shutdown_timeout_ms: 30_000,
        }
    }
}

/// One served model and its batching.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The name requests use (`?model=`); default: the variant's.
    pub name: Option<String>,
    /// Weight file or named weights, as `classify --weights` takes.
    pub weights: PathBuf,
    /// Variant; read from the weight file when omitted.
    pub model: Option<String>,
    /// Class names: `imagenet`, `voc` or a file with one per line (default: imagenet for 1000
    /// classes, voc for a 21-class segmentation model).
    pub labels: Option<String>,
    /// Input size (default: the weights' Keras size, else 299; 513 for segmentation).
    pub size: Option<usize>,
    pub preprocess: Option<String>,
    pub resize: Option<String>,
    /// Output stride; default: the model's (32 for classifiers, 16 for DeepLabv3+).
    pub output_stride: Option<usize>,
    /// Engine threads (0: all cores).
    #[serde(default)]
    pub threads: usize,
    /// The engine's arithmetic: `f32` (default) or `bf16` (AMX tiles or AVX512-BF16; see `classify --precision`).
    pub precision: Option<String>,
    /// Most requests run in one forward pass (1: no batching).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long the first request of a batch waits for others.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Requests waiting for inference beyond which new ones get 503.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_max_batch() -> usize {
    8
}
fn default_max_wait_ms() -> u64 {
    5
}
fn default_queue() -> usize {
    64
}

impl ModelEntry {
    /// A model entry with the defaults above.
    pub fn new(weights: PathBuf) -> ModelEntry {
        ModelEntry {
            name: None,
            weights,
            model: None,
            labels: None,
            size: None,
            preprocess: None,
            resize: None,
            output_stride: None,
            threads: 0,
            precision: None,
            max_batch: default_max_batch(),
            max_wait_ms: default_max_wait_ms(),
            queue: default_queue(),
        }
    }

    /// How [`xception::pipeline::Pipeline::load`] loads it: one model answers both classify
    /// (when the weights have a classifier) and embed.
    pub fn load_options(&self, offline: bool) -> Result<LoadOptions> {
        let mut o = LoadOptions::new(self.weights.clone(), Head::IfPresent);
        o.model = self.model.as_deref().map(Variant::parse).transpose()?;
        o.offline = offline;
        o.output_stride = self.output_stride;
        o.size = self.size;
        o.resize = self.resize.as_deref().map(Resize::parse).transpose()?;
        o.preprocess = self.preprocess.as_deref().map(PreprocessKind::parse).transpose()?;
        o.backend = Backend::Engine;
        o.threads = self.threads;
        o.precision = match self.precision.as_deref() {
            None => Precision::F32,
            Some(p) => Precision::parse(p).ok_or_else(|| Error::Config(format!("precision '{p}': f32, bf16, bf16x3 or int8")))?,
        };
        o.pooling = None::<Pooling>;
        Ok(o)
    }
}

impl ServeConfig {
    /// Reads a TOML config; unknown keys are errors, so typos do not pass silently.
    pub fn read(path: &Path) -> Result<ServeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::file(path, format!("invalid serve config: {e}")))
    }

    /// A config with no models yet.
    pub fn empty() -> ServeConfig {
        ServeConfig { addr: default_addr(), token_file: None, limits: Limits::default(), models: Vec::new() }
    }

    /// Checks what can be checked before loading anything; every message names the model.
    pub fn validate(&self) -> Result<()> {
        if self.models.is_empty() {
            return Err(Error::Config("no model to serve: give --weights or a config with [[model]] entries".into()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let what = m.name.clone().unwrap_or_else(|| format!("model #{}", i + 1));
            if m.max_batch == 0 || m.queue == 0 {
                return Err(Error::Config(format!("{what}: max_batch and queue must be at least 1")));
            }
            if let Some(p) = m.precision.as_deref().filter(|p| Precision::parse(p).is_none()) {
                return Err(Error::Config(format!("{what}: precision '{p}': f32, bf16, bf16x3 or int8")));
            }
            if let Some(name) = &m.name {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    return Err(Error::Config(format!("{what}: a model name uses letters, digits, '-', '_' and '.' only")));
                }
                if !names.insert(name.clone()) {
                    return Err(Error::Config(format!("two models are named '{name}'")));
                }
            }
            m.load_options(false)?;
        }
        let l = &self.limits;
        if l.max_body_bytes == 0 || l.max_pixels == 0 || l.decode_timeout_ms == 0 || l.inference_timeout_ms == 0 {
            return Err(Error::Config("limits must be positive".into()));
        }
        Ok(())
    }

    /// The bearer token: XCEPTION_SERVE_TOKEN, else the token file's first line.
    pub fn token(&self) -> Result<Option<String>> {
        let token = match (std::env::var("XCEPTION_SERVE_TOKEN").ok(), &self.token_file) {
            (Some(t), _) => t,
            (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?.lines().next().unwrap_or("").to_string(),
            (None, None) => return Ok(None),
        };
        let token = token.trim().to_string();
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Error::Config("the bearer token is empty or holds spaces or non-ASCII characters".into()));
        }
        Ok(Some(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_models_and_limits_and_refuses_unknown_keys() {
        let c: ServeConfig = toml::from_str(
            "addr = '0.0.0.0:9000'\n[limits]\nmax_pixels = 1000\n[[model]]\nname = 'a'\nweights = 'a.safetensors'\nmax_batch = 4\n[[model]]\nweights = 'b.keras'\n",
        )
        .unwrap();
        assert_eq!(c.addr, "0.0.0.0:9000");
        assert_eq!(c.limits.max_pixels, 1000);
        assert_eq!(c.limits.max_body_bytes, Limits::default().max_body_bytes);
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[0].max_batch, 4);
        assert_eq!(c.models[1].max_batch, 8);
        c.validate().unwrap();
        let err = toml::from_str::<ServeConfig>("[[model]]\nweights = 'a'\nmax_bach = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_bach"), "{err}");
    }

    #[test]
    fn the_readme_example_is_a_valid_config() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
        let block = readme.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("README has a toml block");
        let c: ServeConfig = toml::from_str(block).unwrap();
        c.validate().unwrap();
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[1].precision.as_deref(), Some("bf16"));
        let d = Limits::default();
        assert_eq!((c.limits.max_body_bytes, c.limits.max_pixels, c.limits.inference_timeout_ms), (d.max_body_bytes, d.max_pixels, d.inference_timeout_ms), "README shows the defaults");
    }

    #[test]
    fn validation_names_the_model() {
        let mut c = ServeConfig::empty();
        assert!(c.validate().unwrap_err().to_string().contains("no model"));
        let mut m = ModelEntry::new("w.safetensors".into());
        m.name = Some("x".into());
        c.models = vec![m.clone(), m.clone()];
        assert!(c.validate().unwrap_err().to_string().contains("two models are named 'x'"));
        m.precision = Some("fp16".into());
        c.models = vec![m.clone()];
        assert!(c.validate().unwrap_err().to_string().contains("x: precision 'fp16': f32, bf16, bf16x3 or int8"));
        m.precision = None;
        m.queue = 0;
        c.models = vec![m];
        assert!(c.validate().unwrap_err().to_string().contains("x: max_batch and queue"));
    }
}
