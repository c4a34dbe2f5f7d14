//! Transfer learning on a frozen backbone (its BatchNorms in inference mode, as Keras transfer
//! learning runs them): every image is embedded once by the fast engine, then the classifier head
//! trains on the cached features through burn's autodiff and optimizers. Checkpoints are written
//! atomically after every epoch (head weights, optimizer state, epoch; the data order of each
//! epoch derives from the seed and the epoch number), so `--resume` continues the same sequence.

use crate::arch::{Activation, DenseSpec};
use crate::data::{Dataset, Rng};
use crate::error::{Error, Result};
use crate::pipeline::Pipeline;
use crate::weights::{HostTensor, TensorMap};
use burn::module::{Module, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, GradientsParams, RmsPropConfig, SgdConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::path::{Path, PathBuf};

/// Parameter ids of the head's layer `i`: fixed, because the optimizer keys its saved state by
/// them and a resumed run must find its moments again.
fn param_ids(i: usize) -> (ParamId, ParamId) {
    const BASE: u64 = 0x4845_4144_0000_0000;
    (ParamId::from(BASE + 2 * i as u64), ParamId::from(BASE + 2 * i as u64 + 1))
}

/// The classifier head: dense layers, ReLU between them, logits out.
#[derive(Module, Debug)]
pub struct Head {
    layers: Vec<Linear>,
}

impl Head {
    /// PyTorch's default Linear initialisation, U(-1/sqrt(in), 1/sqrt(in)) for weights and
    /// biases, drawn from the seeded stream so a run is reproducible.
    fn new(features: usize, hidden: &[usize], classes: usize, seed: u64, device: &Device) -> Head {
        let widths: Vec<usize> = std::iter::once(features).chain(hidden.iter().copied()).chain(std::iter::once(classes)).collect();
        let mut rng = Rng(seed ^ 0x5EED_F4EA);
        let mut uniform = |n: usize, bound: f64| -> Vec<f32> {
            (0..n).map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound).map(|v| v as f32).collect()
        };
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let (n_in, n_out) = (w[0], w[1]);
                let bound = 1.0 / (n_in as f64).sqrt();
                let (wid, bid) = param_ids(i);
                let mut layer = LinearConfig::new(n_in, n_out).init(device);
                layer.weight = Param::initialized(wid, Tensor::<2>::from_data(TensorData::new(uniform(n_in * n_out, bound), [n_in, n_out]), device).require_grad());
                layer.bias = Some(Param::initialized(bid, Tensor::<1>::from_data(TensorData::new(uniform(n_out, bound), [n_out]), device).require_grad()));
                layer
            })
            .collect();
        Head { layers }
    }

    fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }

    /// Our canonical head tensors: `head.{i}.weight` (out, in), `head.{i}.bias`, as Keras
    /// transfer heads import.
    fn tensors(&self) -> Vec<(String, HostTensor)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let w = layer.weight.val(); // burn keeps (in, out)
            let [n_in, n_out] = w.dims();
            let data: Vec<f32> = w.transpose().into_data().try_to_vec::<f32>().expect("f32 weights");
            out.push((format!("head.{i}.weight"), HostTensor::new(vec![n_out, n_in], data)));
            let b = layer.bias.as_ref().expect("linear with bias").val();
            out.push((format!("head.{i}.bias"), HostTensor::new(vec![n_out], b.into_data().try_to_vec::<f32>().expect("f32 bias"))));
        }
        out
    }

    fn load(mut self, map: &TensorMap, device: &Device) -> Result<Head> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let [n_in, n_out] = layer.weight.val().dims();
            let get = |name: String, len: usize| -> Result<Vec<f32>> {
                let t = map.get(&name).ok_or_else(|| Error::Weights { source_name: map.source.clone(), message: format!("checkpoint lacks '{name}'") })?;
                if t.data.len() != len {
                    return Err(Error::Weights { source_name: map.source.clone(), message: format!("'{name}' has {} values, expected {len}", t.data.len()) });
                }
                Ok(t.data.clone())
            };
            let w = get(format!("head.{i}.weight"), n_in * n_out)?;
            // (out, in) on file -> burn's (in, out), transposed on the host so the tensor is
            // contiguous exactly like one the optimizer produced (a strided view multiplies in
            // another order and a resumed run would drift in the last bits).
            let w: Vec<f32> = (0..n_in * n_out).map(|k| w[(k % n_out) * n_in + k / n_out]).collect();
            let w = Tensor::<2>::from_data(TensorData::new(w, [n_in, n_out]), device);
            let (wid, bid) = param_ids(i);
            layer.weight = Param::initialized(wid, w.require_grad());
            let b = get(format!("head.{i}.bias"), n_out)?;
            layer.bias = Some(Param::initialized(bid, Tensor::<1>::from_data(TensorData::new(b, [n_out]), device).require_grad()));
        }
        Ok(self)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// AdamW: beta1 0.9, beta2 0.999, epsilon 1e-8 (PyTorch's; burn's default is 1e-5).
    AdamW,
    /// SGD with momentum, dampening 0 (PyTorch's; burn's default is 0.1).
    Sgd { momentum: f64, nesterov: bool },
    /// RMSprop, PyTorch's form: grad / (sqrt(mean square) + eps) (burn's defaults, momentum 0.9 and
    /// eps 1e-5, are not PyTorch's 0 and 1e-8: all three are given).
    RmsProp { alpha: f64, momentum: f64, epsilon: f64 },
    /// RMSprop in TensorFlow's and Keras' form ([`crate::rmsprop_tf`]): epsilon inside the square
    /// root (Keras' default 1e-7; the paper's JFT runs used TF's RMSProp with epsilon 1.0),
    /// decoupled weight decay.
    RmsPropTf { rho: f64, momentum: f64, epsilon: f64 },
}

/// How the learning rate moves after the linear warm-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// Cosine decay to 0 over the run (PyTorch's CosineAnnealingLR, eta_min 0).
    Cosine,
    /// The paper's: multiplied by `rate` every `every` epochs (0.94 every 2; PyTorch's StepLR).
    StepExp { every: usize, rate: f64 },
    /// (1 - t/T)^power (DeepLab's "poly", power 0.9; PyTorch's PolynomialLR).
    Poly { power: f64 },
    Constant,
}

/// How the head trains.
#[derive(Clone, Debug)]
pub struct HeadConfig {
    /// Widths of hidden layers (ReLU), empty for one dense layer.
    pub hidden: Vec<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    pub optimizer: OptimizerKind,
    pub schedule: Schedule,
    /// Linear warm-up over this many epochs, then the schedule.
    pub warmup_epochs: usize,
    pub seed: u64,
    /// Epoch checkpoints kept besides the best one.
    pub keep_checkpoints: usize,
    /// Clip the gradients' global L2 norm to this (PyTorch's clip_grad_norm_).
    pub clip_grad_norm: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay, and validate and
    /// export it (the paper evaluated with Polyak averaging): ema = d * ema + (1 - d) * weights
    /// after every step.
    pub ema: Option<f64>,
}

/// The moving average of the head's weights (host copies, updated after every step).
struct Ema {
    decay: f64,
    map: TensorMap,
}

impl Ema {
    fn new(decay: f64, head: &Head) -> Ema {
        let mut map = TensorMap::new("ema");
        for (name, t) in head.tensors() {
            map.insert(name, t);
        }
        Ema { decay, map }
    }

    /// From a checkpoint's `ema.*` tensors.
    fn from_checkpoint(decay: f64, checkpoint: &TensorMap) -> Result<Ema> {
        let mut map = TensorMap::new("ema");
        for (name, t) in &checkpoint.tensors {
            if let Some(own) = name.strip_prefix("ema.") {
                map.insert(own.to_string(), t.clone());
            }
        }
        if map.tensors.is_empty() {
            // A configuration mismatch, not damage: the caller must not fall back past it.
            return Err(Error::Config(format!("{}: the checkpoint holds no moving average (ema.*); the run was started without --ema", checkpoint.source)));
        }
        Ok(Ema { decay, map })
    }

    fn update(&mut self, head: &Head) {
        ema_blend(&mut self.map, head.tensors().iter().map(|(n, t)| (n, t)), self.decay);
    }
}

/// One step of a moving average: every `shadow` tensor named in `current` becomes
/// decay * shadow + (1 - decay) * current.
pub(crate) fn ema_blend<'a>(shadow: &mut TensorMap, current: impl IntoIterator<Item = (&'a String, &'a HostTensor)>, decay: f64) {
    let d = decay as f32;
    for (name, t) in current {
        let s = shadow.tensors.get_mut(name).expect("the moving average covers the same tensors");
        for (a, v) in s.data.iter_mut().zip(&t.data) {
            *a = d * *a + (1.0 - d) * v;
        }
    }
}

impl Default for HeadConfig {
    fn default() -> HeadConfig {
        HeadConfig {
            hidden: vec![],
            epochs: 30,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 1e-4,
            label_smoothing: 0.1,
            optimizer: OptimizerKind::AdamW,
            schedule: Schedule::Cosine,
            warmup_epochs: 1,
            seed: 0,
            keep_checkpoints: 2,
            clip_grad_norm: None,
            ema: None,
        }
    }
}

impl HeadConfig {
    /// The learning rate at `step` of `total` (linear warm-up, then the schedule, which counts
    /// steps from the end of the warm-up; the step-exponential one counts whole epochs).
    pub fn lr_at(&self, step: usize, total: usize, steps_per_epoch: usize) -> f64 {
        let warmup = self.warmup_epochs * steps_per_epoch;
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        match self.schedule {
            Schedule::Cosine => 0.5 * self.lr * (1.0 + (std::f64::consts::PI * t).cos()),
            Schedule::StepExp { every, rate } => self.lr * rate.powi((((step - warmup) / steps_per_epoch.max(1)) / every.max(1)) as i32),
            Schedule::Poly { power } => self.lr * (1.0 - t).max(0.0).powf(power),
            Schedule::Constant => self.lr,
        }
    }
}

/// Pooled features of a set of images: (N, C) row-major, decoded on all cores, run on the engine.
pub struct Features {
    pub data: Vec<f32>,
    pub dim: usize,
    pub labels: Vec<usize>,
}

/// Runs every image of `ds` through the model, `batch` at a time (each batch decoded in
/// parallel on all cores first).
pub fn run_dataset(pipeline: &Pipeline, ds: &Dataset, batch: usize, progress: &indicatif::ProgressBar) -> Result<Vec<crate::Prediction>> {
    use rayon::prelude::*;
    let mut out = Vec::with_capacity(ds.samples.len());
    for chunk in ds.samples.chunks(batch.max(1)) {
        let items: Vec<crate::Item> = chunk
            .par_iter()
            .map(|s| {
                let img = s.load()?;
                let size = pipeline.preprocess.size();
                Ok(crate::Item { name: s.path.display().to_string(), height: size, width: size, data: pipeline.preprocess.apply(&img) })
            })
            .collect::<Result<_>>()?;
        out.extend(pipeline.predict(&items, items.len())?);
        progress.inc(chunk.len() as u64);
    }
    Ok(out)
}

/// The pooled features of every image of `ds`.
pub fn embed(pipeline: &Pipeline, ds: &Dataset, batch: usize, progress: &indicatif::ProgressBar) -> Result<Features> {
    let predictions = run_dataset(pipeline, ds, batch, progress)?;
    let dim = predictions.first().map_or(0, |p| p.pooled.len());
    let data = predictions.into_iter().flat_map(|p| p.pooled).collect();
    Ok(Features { data, dim, labels: ds.samples.iter().map(|s| s.label).collect() })
}

/// One epoch's figures, as `metrics.jsonl` records them.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    /// Classification: top-1; segmentation: pixel accuracy.
    pub val_accuracy: f64,
    /// Segmentation: mean IoU over the classes present (what selects the best epoch there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_miou: Option<f64>,
    pub seconds: f64,
}

/// Accuracy figures of logits against labels.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Evaluation {
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<f64>,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<usize>>,
}

pub fn evaluate(logits: &[f32], labels: &[usize], classes: usize) -> Evaluation {
    let mut confusion = vec![vec![0usize; classes]; classes];
    let (mut top1, mut top5) = (0usize, 0usize);
    for (row, &y) in logits.chunks(classes).zip(labels) {
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        top1 += (order[0] == y) as usize;
        top5 += order.iter().take(5).any(|&c| c == y) as usize;
        confusion[y][order[0]] += 1;
    }
    let n = labels.len().max(1) as f64;
    let per_class = confusion.iter().enumerate().map(|(c, row)| row[c] as f64 / row.iter().sum::<usize>().max(1) as f64).collect();
    Evaluation { top1: top1 as f64 / n, top5: top5 as f64 / n, per_class, confusion }
}

/// The trained head and where the run left it.
pub struct Trained {
    pub head_tensors: Vec<(String, HostTensor)>,
    pub head_spec: Vec<DenseSpec>,
    pub history: Vec<EpochMetrics>,
    pub best_epoch: usize,
    pub val: Evaluation,
}


/// Trains the head on `train`, validating on `val` after every epoch; checkpoints under
/// `run/checkpoints`, the log in `run/metrics.jsonl`. With `resume`, continues from the latest
/// checkpoint there.
pub fn train_head(train: &Features, val: &Features, classes: usize, cfg: &HeadConfig, run: &Path, resume: bool, progress: &indicatif::ProgressBar) -> Result<Trained> {
    if train.labels.is_empty() || val.labels.is_empty() {
        return Err(Error::Config("training needs images in both the training and the validation split".into()));
    }
    let device = crate::device::default_device().autodiff();
    let dim = train.dim;
    let mut head = Head::new(dim, &cfg.hidden, classes, cfg.seed, &device);
    let mut optim = new_optimizer(cfg);
    let checkpoints = run.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).map_err(|e| Error::io(&checkpoints, e))?;
    let metrics_path = run.join("metrics.jsonl");
    let mut history: Vec<EpochMetrics> = Vec::new();
    let mut start_epoch = 0;
    let mut ema = cfg.ema.map(|d| Ema::new(d, &head));
    if resume {
        // The newest checkpoint that reads back whole; a damaged one is reported and skipped.
        for (epoch, path) in checkpoints_newest_first(&checkpoints)? {
            let loaded = (|| -> Result<(Head, burn::optim::ModuleOptimizer, Option<Ema>)> {
                let map = TensorMap::read_safetensors(&path)?;
                let h = Head::new(dim, &cfg.hidden, classes, cfg.seed, &device).load(&map, &device)?;
                let state_path = path.with_extension("optim");
                let bytes = std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
                let o = new_optimizer(cfg)
                    .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
                    .map_err(|e| Error::file(&state_path, format!("optimizer state: {e:?}")))?;
                let e = cfg.ema.map(|d| Ema::from_checkpoint(d, &map)).transpose()?;
                Ok((h, o, e))
            })();
            match loaded {
                Ok((h, o, e)) => {
                    (head, optim, ema) = (h, o, e);
                    history = read_history(&metrics_path)?.into_iter().filter(|m| m.epoch <= epoch).collect();
                    start_epoch = epoch;
                    break;
                }
                Err(e @ Error::Config(_)) => return Err(e),
                Err(e) => eprintln!("warning: skipping damaged checkpoint of epoch {epoch}: {e}"),
            }
        }
    }
    let n = train.labels.len();
    let steps_per_epoch = n.div_ceil(cfg.batch_size);
    let total = steps_per_epoch * cfg.epochs;
    let loss_fn = CrossEntropyLossConfig::new().with_smoothing((cfg.label_smoothing > 0.0).then_some(cfg.label_smoothing as f32)).init(&device);
    progress.set_length((cfg.epochs * n) as u64);
    progress.set_position((start_epoch * n) as u64);
    for epoch in start_epoch..cfg.epochs {
        let started = std::time::Instant::now();
        // The order of every epoch follows from the seed alone: a resumed run sees the same.
        let mut order: Vec<usize> = (0..n).collect();
        Rng(cfg.seed ^ (epoch as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)).shuffle(&mut order);
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        let mut lr = cfg.lr;
        for (b, batch) in order.chunks(cfg.batch_size).enumerate() {
            lr = cfg.lr_at(epoch * steps_per_epoch + b, total, steps_per_epoch);
            let x: Vec<f32> = batch.iter().flat_map(|&i| train.data[i * dim..][..dim].iter().copied()).collect();
            let y: Vec<usize> = batch.iter().map(|&i| train.labels[i]).collect();
            let (next, value, right) = train_step(head, &mut optim, &loss_fn, &x, &y, lr, cfg.clip_grad_norm, &device);
            if !value.is_finite() {
                return Err(Error::Config(format!("epoch {}: the loss became {value}; lower --lr", epoch + 1)));
            }
            head = next;
            if let Some(e) = ema.as_mut() {
                e.update(&head);
            }
            loss_sum += value as f64 * batch.len() as f64;
            correct += right;
            progress.inc(batch.len() as u64);
        }
        let (val_loss, val_eval) = match &ema {
            Some(e) => validate(&Head::new(dim, &cfg.hidden, classes, cfg.seed, &device).load(&e.map, &device)?, val, classes, &device, cfg.label_smoothing),
            None => validate(&head, val, classes, &device, cfg.label_smoothing),
        };
        let m = EpochMetrics {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / n as f64,
            train_accuracy: correct as f64 / n as f64,
            val_loss,
            val_accuracy: val_eval.top1,
            val_miou: None,
            seconds: started.elapsed().as_secs_f64(),
        };
        progress.set_message(format!("epoch {}/{}: loss {:.4}, train {:.1}%, val {:.1}%", m.epoch, cfg.epochs, m.train_loss, 100.0 * m.train_accuracy, 100.0 * m.val_accuracy));
        history.push(m);
        // The log first, then the checkpoint: a run killed between the two resumes from the
        // previous checkpoint and redoes this epoch, while the other order would lose its line.
        let lines: String = history.iter().map(|h| serde_json::to_string(h).expect("plain numbers") + "\n").collect();
        crate::atomic::write(&metrics_path, lines.as_bytes())?;
        save_checkpoint(&checkpoints, epoch + 1, &head, ema.as_ref().map(|e| &e.map), &optim, &history, cfg.keep_checkpoints)?;
    }
    // The best epoch by validation accuracy (the earliest among ties).
    let best = history.iter().max_by(|a, b| a.val_accuracy.total_cmp(&b.val_accuracy).then(b.epoch.cmp(&a.epoch))).map(|m| m.epoch).unwrap_or(cfg.epochs);
    let best_checkpoint = TensorMap::read_safetensors(&checkpoints.join(format!("epoch-{best:04}.safetensors")))?;
    let best_weights = match cfg.ema {
        Some(d) => Ema::from_checkpoint(d, &best_checkpoint)?.map,
        None => best_checkpoint,
    };
    let best_head = Head::new(dim, &cfg.hidden, classes, cfg.seed, &device).load(&best_weights, &device)?;
    let (_, val_eval) = validate(&best_head, val, classes, &device, cfg.label_smoothing);
    let mut head_spec: Vec<DenseSpec> = cfg.hidden.iter().map(|&units| DenseSpec { units, activation: Activation::Relu }).collect();
    head_spec.push(DenseSpec { units: classes, activation: Activation::Softmax });
    Ok(Trained { head_tensors: best_head.tensors(), head_spec, history, best_epoch: best, val: val_eval })
}

/// One optimisation step on a batch: forward, label-smoothed cross-entropy (mean), backward,
/// optimizer step. Returns the stepped head, the loss and how many predictions were right.
#[allow(clippy::too_many_arguments)]
fn train_step(head: Head, optim: &mut burn::optim::ModuleOptimizer, loss_fn: &burn::nn::loss::CrossEntropyLoss, x: &[f32], y: &[usize], lr: f64, clip: Option<f64>, device: &Device) -> (Head, f32, usize) {
    let n = y.len();
    let x = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, x.len() / n]), device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(y.iter().map(|&v| v as i64).collect::<Vec<_>>(), [n]), device);
    let logits = head.forward(x);
    let loss = loss_fn.forward(logits.clone(), y.clone());
    let value: f32 = loss.clone().into_scalar();
    let correct = logits.argmax(1).squeeze::<1>().equal(y).int().sum().into_scalar::<i64>() as usize;
    let mut grads = GradientsParams::from_grads(loss.backward(), &head);
    if let Some(max_norm) = clip {
        let ids: Vec<(ParamId, usize)> = head.layers.iter().flat_map(|l| [(l.weight.id, 2), (l.bias.as_ref().expect("bias").id, 1)]).collect();
        clip_global_norm(&ids, &mut [&mut grads], max_norm);
    }
    (optim.step(lr, head, grads), value, correct)
}

/// Scales all gradients together so their joint L2 norm is at most `max_norm`, as PyTorch's
/// clip_grad_norm_ does (coefficient max_norm / (norm + 1e-6), capped at 1), over every
/// parameter `(id, rank)` in `ids` across all `groups`. burn's own clipping works per tensor.
pub(crate) fn clip_global_norm(ids: &[(ParamId, usize)], groups: &mut [&mut GradientsParams], max_norm: f64) {
    fn squares<const D: usize>(g: &GradientsParams, id: ParamId) -> f64 {
        g.get::<D>(id).map_or(0.0, |t| t.powi_scalar(2).sum().into_scalar::<f32>() as f64)
    }
    fn scale<const D: usize>(g: &mut GradientsParams, id: ParamId, coef: f64) {
        if let Some(t) = g.remove::<D>(id) {
            g.register(id, t * coef);
        }
    }
    let mut total = 0f64;
    for g in groups.iter() {
        for &(id, rank) in ids {
            total += match rank {
                1 => squares::<1>(g, id),
                2 => squares::<2>(g, id),
                _ => squares::<4>(g, id),
            };
        }
    }
    let coef = (max_norm / (total.sqrt() + 1e-6)).min(1.0);
    if coef >= 1.0 {
        return;
    }
    for g in groups.iter_mut() {
        for &(id, rank) in ids {
            match rank {
                1 => scale::<1>(g, id, coef),
                2 => scale::<2>(g, id, coef),
                _ => scale::<4>(g, id, coef),
            }
        }
    }
}

/// After one step of [`head_steps`].
pub struct Step {
    pub loss: f32,
    /// (out, in)
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    /// The moving average's (weight, bias), with `cfg.ema`.
    pub ema: Option<(Vec<f32>, Vec<f32>)>,
}

/// Steps of a one-layer head from weights `w` (out, in) and `b`, one per batch at a constant
/// `lr`, exactly as training takes them. For the conformance test against torch.optim.
pub fn head_steps(w: &[f32], b: &[f32], batches: &[Vec<f32>], y: &[usize], cfg: &HeadConfig, lr: f64) -> Vec<Step> {
    let device = crate::device::default_device().autodiff();
    let (n_out, n_in) = (b.len(), w.len() / b.len());
    let mut map = TensorMap::new("head_steps");
    map.insert("head.0.weight".to_string(), HostTensor::new(vec![n_out, n_in], w.to_vec()));
    map.insert("head.0.bias".to_string(), HostTensor::new(vec![n_out], b.to_vec()));
    let mut head = Head::new(n_in, &[], n_out, 0, &device).load(&map, &device).expect("shapes match");
    let mut optim = new_optimizer(cfg);
    let loss_fn = CrossEntropyLossConfig::new().with_smoothing((cfg.label_smoothing > 0.0).then_some(cfg.label_smoothing as f32)).init(&device);
    let mut ema = cfg.ema.map(|d| Ema::new(d, &head));
    let mut out = Vec::new();
    for x in batches {
        let (next, loss, _) = train_step(head, &mut optim, &loss_fn, x, y, lr, cfg.clip_grad_norm, &device);
        head = next;
        if let Some(e) = ema.as_mut() {
            e.update(&head);
        }
        let t = head.tensors();
        let ema = ema.as_ref().map(|e| (e.map.tensors["head.0.weight"].data.clone(), e.map.tensors["head.0.bias"].data.clone()));
        out.push(Step { loss, weight: t[0].1.data.clone(), bias: t[1].1.data.clone(), ema });
    }
    out
}

/// The optimizer with every setting that differs between burn and PyTorch given explicitly.
pub(crate) fn new_optimizer(cfg: &HeadConfig) -> burn::optim::ModuleOptimizer {
    match cfg.optimizer {
        OptimizerKind::AdamW => AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(cfg.weight_decay as f32).init(),
        OptimizerKind::Sgd { momentum, nesterov } => SgdConfig::new()
            .with_momentum(Some(MomentumConfig { momentum, dampening: 0.0, nesterov }))
            .with_weight_decay((cfg.weight_decay > 0.0).then(|| WeightDecayConfig::new(cfg.weight_decay as f32)))
            .init(),
        OptimizerKind::RmsProp { alpha, momentum, epsilon } => RmsPropConfig::new()
            .with_alpha(alpha as f32)
            .with_momentum(momentum as f32)
            .with_epsilon(epsilon as f32)
            .with_centered(false)
            .with_weight_decay((cfg.weight_decay > 0.0).then(|| WeightDecayConfig::new(cfg.weight_decay as f32)))
            .init(),
        OptimizerKind::RmsPropTf { rho, momentum, epsilon } => burn::optim::ModuleOptimizer::from(crate::rmsprop_tf::TfRmsProp { rho, momentum, epsilon, weight_decay: cfg.weight_decay }),
    }
}

fn validate(head: &Head, val: &Features, classes: usize, device: &Device, smoothing: f64) -> (f64, Evaluation) {
    let n = val.labels.len();
    let x = Tensor::<2>::from_data(TensorData::new(val.data.clone(), [n, val.dim]), device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(val.labels.iter().map(|&l| l as i64).collect::<Vec<_>>(), [n]), device);
    let logits = head.forward(x);
    let loss_fn = CrossEntropyLossConfig::new().with_smoothing((smoothing > 0.0).then_some(smoothing as f32)).init(device);
    let loss: f32 = loss_fn.forward(logits.clone(), y).into_scalar();
    let values: Vec<f32> = logits.into_data().try_to_vec::<f32>().expect("f32 logits");
    (loss as f64, evaluate(&values, &val.labels, classes))
}

fn save_checkpoint(dir: &Path, epoch: usize, head: &Head, ema: Option<&TensorMap>, optim: &burn::optim::ModuleOptimizer, history: &[EpochMetrics], keep: usize) -> Result<()> {
    let mut map = TensorMap::new(format!("checkpoint epoch {epoch}"));
    for (name, t) in head.tensors() {
        map.insert(name, t);
    }
    for (name, t) in ema.iter().flat_map(|e| &e.tensors) {
        map.insert(format!("ema.{name}"), t.clone());
    }
    map.metadata.insert("epoch".into(), epoch.to_string());
    let weights = dir.join(format!("epoch-{epoch:04}.safetensors"));
    // The optimizer state first: a checkpoint counts once its weights file exists.
    let state = optim.into_bytes().map_err(|e| Error::Config(format!("saving the optimizer state: {e:?}")))?;
    crate::atomic::write(&weights.with_extension("optim"), &state)?;
    map.write_safetensors(&weights)?;
    // Keep the last `keep` and the best.
    let best = history.iter().max_by(|a, b| a.val_accuracy.total_cmp(&b.val_accuracy).then(b.epoch.cmp(&a.epoch))).map(|m| m.epoch);
    for old in history.iter().map(|m| m.epoch).filter(|&e| e + keep <= epoch && Some(e) != best) {
        let p = dir.join(format!("epoch-{old:04}.safetensors"));
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(p.with_extension("optim"));
    }
    Ok(())
}

/// Checkpoints (weights and optimizer state both present), newest first.
fn checkpoints_newest_first(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    numbered_checkpoints(dir, "epoch-")
}

/// Files `<prefix><number>.safetensors` in `dir` with their `.optim` beside them, by number,
/// newest first.
pub(crate) fn numbered_checkpoints(dir: &Path, prefix: &str) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(number) = name.strip_prefix(prefix).and_then(|s| s.strip_suffix(".safetensors")).and_then(|s| s.parse::<usize>().ok()) {
            if p.with_extension("optim").is_file() {
                found.push((number, p));
            }
        }
    }
    found.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(found)
}

pub(crate) fn read_history(path: &Path) -> Result<Vec<EpochMetrics>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).map_err(|e| Error::file(path, format!("bad metrics line: {e}")))).collect()
}
