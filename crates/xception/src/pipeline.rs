//! From "these weights" to a model ready to run on images, with the preprocessing its reference
//! applies, and the classification answer in one JSON shape: what `classify`, `embed` and
//! `serve` share.

use crate::arch::{Activation, ModelConfig, Network, Pooling, Variant};
use crate::error::{Error, Result};
use crate::labels::Labels;
use crate::model::Prediction;
use crate::preprocess::{Item, Preprocess, Resize};
use crate::runner::{Backend, Runner};
use xception_engine::Precision;
use crate::weights::TensorMap;
use crate::zoo;
use serde::Serialize;
use std::path::PathBuf;

/// Which reference's input pipeline to use when not the model's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreprocessKind {
    Keras,
    Timm,
}

impl PreprocessKind {
    pub fn parse(s: &str) -> Result<PreprocessKind> {
        match s {
            "keras" => Ok(PreprocessKind::Keras),
            "timm" => Ok(PreprocessKind::Timm),
            _ => Err(Error::Config(format!("unknown preprocessing '{s}' (keras or timm)"))),
        }
    }
}

/// The preprocessing asked for, defaulting to the reference's for the variant.
pub fn preprocessing(size: usize, kind: Option<PreprocessKind>, resize: Option<Resize>, variant: Variant) -> Preprocess {
    let reference = Preprocess::default_for(variant, size);
    let chosen = match kind {
        None => reference,
        Some(PreprocessKind::Keras) => Preprocess::Keras { size, resize: Resize::Nearest },
        Some(PreprocessKind::Timm) => match reference {
            Preprocess::Timm { .. } => reference,
            // The Keras graph has no timm config; timm's port of the same weights uses these.
            Preprocess::Keras { .. } => Preprocess::default_for(Variant::LegacyXception, size),
        },
    };
    match resize {
        Some(r) => chosen.with_resize(r),
        None => chosen,
    }
}

/// How to load a model: the command line's model flags, or one model of `serve`'s config.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The variant; read from the weight file when None.
    pub model: Option<Variant>,
    /// A weight file, or named weights (`imagenet`, a registry name) fetched into the cache.
    pub weights: PathBuf,
    /// Never download named weights.
    pub offline: bool,
    /// Show a progress bar while downloading.
    pub progress: bool,
    /// None: the model's default (32 for classifiers, 16 for DeepLabv3+).
    pub output_stride: Option<usize>,
    /// Input size; default: the size a Keras model was built for, else 299.
    pub size: Option<usize>,
    pub resize: Option<Resize>,
    pub preprocess: Option<PreprocessKind>,
    pub backend: Backend,
    /// Engine threads (0: all cores).
    pub threads: usize,
    /// The engine's arithmetic (bf16: opt-in, needs AMX or AVX512-BF16).
    pub precision: Precision,
    /// What to do with the weights' classifier.
    pub head: Head,
    /// Global pooling; default: the model's.
    pub pooling: Option<Pooling>,
}

impl LoadOptions {
    /// Defaults for `weights`: the model's own preprocessing, output stride 32, the engine.
    pub fn new(weights: impl Into<PathBuf>, head: Head) -> LoadOptions {
        LoadOptions {
            model: None,
            weights: weights.into(),
            offline: false,
            progress: false,
            output_stride: None,
            size: None,
            resize: None,
            preprocess: None,
            backend: Backend::Engine,
            threads: 0,
            precision: Precision::F32,
            head,
            pooling: None,
        }
    }
}

/// The classifier in the weights: required (`classify`), dropped (`embed`), or kept if there is
/// one (`serve`, which answers both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    Require,
    Drop,
    IfPresent,
}

/// A loaded model and the preprocessing its inputs get.
pub struct Pipeline {
    pub config: ModelConfig,
    pub runner: Runner,
    pub preprocess: Preprocess,
    /// Class names the weight file records (models `xception train` wrote).
    pub class_names: Option<Vec<String>>,
    /// The weight file read (named weights resolved to their cached file).
    pub weights_path: PathBuf,
}

impl Pipeline {
    /// Reads the weights (fetching named ones), builds the model they fit, checks every tensor.
    pub fn load(opts: &LoadOptions) -> Result<Pipeline> {
        let given = opts.weights.to_string_lossy();
        let (path, entry) = if opts.weights.exists() || !zoo::is_name(&given) {
            (opts.weights.clone(), None)
        } else {
            let entry = zoo::lookup(&given, opts.model, opts.head != Head::Drop)?;
            let fetch = zoo::FetchOptions { offline: opts.offline, progress: opts.progress, cache: None };
            (zoo::fetch(entry, &fetch)?, Some(entry))
        };
        let weights = TensorMap::read(&path)?;
        let mut config = weights.infer_config(opts.model.or(entry.map(|e| e.model)))?;
        if opts.head == Head::Require && !config.include_top {
            return Err(Error::Config(format!(
                "{}: the weights have no classifier ({}.weight); use `xception embed` for features",
                opts.weights.display(),
                config.variant.classifier_key()
            )));
        }
        config.include_top = config.include_top && opts.head != Head::Drop;
        if let Some(os) = opts.output_stride {
            config.output_stride = os;
        }
        if let Some(p) = opts.pooling {
            config.pooling = p;
        }
        let net = Network::build(&config)?;
        let runner = Runner::with_precision(opts.backend, net, &weights, opts.threads, opts.precision)?;
        let size = match (opts.size, weights.input_size()) {
            (Some(s), _) => s,
            (None, Some((h, w))) if h == w => h,
            _ => 299,
        };
        let mut preprocess = preprocessing(size, opts.preprocess, opts.resize, config.variant);
        if let (Some(crop), Preprocess::Timm { crop_pct, .. }) = (entry.and_then(|e| e.crop_pct), &mut preprocess) {
            *crop_pct = crop; // the evaluation crop these weights were published with
        }
        let class_names = match weights.metadata.get("classes") {
            Some(json) => Some(serde_json::from_str(json).map_err(|e| Error::file(&path, format!("metadata 'classes' is not a list of names: {e}")))?),
            None => None,
        };
        Ok(Pipeline { config, runner, preprocess, class_names, weights_path: path })
    }

    /// The class names: the file's own, else ImageNet's for 1000 classes, else `class N`.
    pub fn default_labels(&self) -> Labels {
        match &self.class_names {
            Some(names) => Labels::from_names(names.clone()),
            None if self.config.classes() == Some(1000) => Labels::imagenet(),
            None if self.config.segmentation.as_ref().is_some_and(|s| s.num_classes == 21) => Labels::voc(),
            None => Labels::numbered(),
        }
    }

    /// Top-`k` classes of each prediction (see [`classify`]).
    pub fn classify(&self, predictions: Vec<Prediction>, labels: &Labels, k: usize) -> Result<Vec<ClassifyResult>> {
        classify(&self.config, predictions, labels, k)
    }

    /// Runs preprocessed inputs in batches of at most `batch_size`.
    pub fn predict(&self, items: &[Item], batch_size: usize) -> Result<Vec<Prediction>> {
        self.runner.predict(items, batch_size)
    }
}

/// Top-`k` classes of each prediction of a model built from `config`, with probabilities from
/// the model's own output activation (softmax, or sigmoid for a multi-label Keras head).
pub fn classify(config: &ModelConfig, predictions: Vec<Prediction>, labels: &Labels, k: usize) -> Result<Vec<ClassifyResult>> {
    let sigmoid = config.custom_head.as_ref().and_then(|h| h.last()).is_some_and(|d| d.activation == Activation::Sigmoid);
    predictions
        .into_iter()
        .map(|p| {
            let logits = p.logits.ok_or_else(|| Error::Config(format!("{}: the model has no classifier", config.variant)))?;
            let probs = if sigmoid { logits.iter().map(|&v| 1.0 / (1.0 + (-v as f64).exp())).collect() } else { softmax(&logits) };
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let top = order.into_iter().take(k).map(|i| TopClass { index: i, label: labels.name(i), probability: probs[i] }).collect();
            Ok(ClassifyResult { input: p.name, logits, top })
        })
        .collect()
}

/// One class of a top-k answer.
#[derive(Clone, Debug, Serialize)]
pub struct TopClass {
    pub index: usize,
    pub label: String,
    pub probability: f64,
}

/// One input's classification: all logits and the top classes.
#[derive(Clone, Debug, Serialize)]
pub struct ClassifyResult {
    pub input: String,
    pub logits: Vec<f32>,
    pub top: Vec<TopClass>,
}

/// `classify --json`'s answer, and `POST /v1/classify`'s.
#[derive(Clone, Debug, Serialize)]
pub struct ClassifyOutput {
    pub model: String,
    pub weights: String,
    pub results: Vec<ClassifyResult>,
}

/// Probabilities in double precision, shifted by the maximum so large logits cannot overflow.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let exp: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}
