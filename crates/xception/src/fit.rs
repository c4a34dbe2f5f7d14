//! Training the whole network (or its top blocks) on images, for classification or (DeepLabv3+)
//! segmentation: from scratch or fine-tuning loaded weights. Images are decoded and augmented on
//! worker threads ahead of the training thread; the network runs in burn's autodiff in the CPU training layout ([`Layout::for_training`]), its
//! BatchNorms in training mode with the flavour's momentum, frozen leading stages in inference
//! mode. Checkpoints are written atomically every `checkpoint_every` steps and at each epoch's
//! end; everything random (data order, crops, flips, dropout) is a function of the seed and the
//! step, so `--resume` continues the exact sequence an uninterrupted run takes.

use crate::arch::{Network, Op, TensorRole};
use crate::data::{Dataset, Rng};
use crate::error::{Error, Result};
use crate::model::Layout;
use crate::preprocess::{pil_resize, Preprocess, Resize};
use crate::train::{evaluate, EpochMetrics, Evaluation, HeadConfig};
use crate::weights::{HostTensor, TensorMap};
use crate::Xception;
use burn::module::ParamId;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// Training-time augmentation (torchvision's RandomResizedCrop and RandomHorizontalFlip).
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Area fraction range of the random crop (torchvision's default (0.08, 1)); None: the eval
    /// transform (resize and centre crop).
    pub crop_scale: Option<(f64, f64)>,
    /// Aspect-ratio range of the crop (default (3/4, 4/3)).
    pub crop_ratio: (f64, f64),
    pub hflip: bool,
}

impl Default for Augment {
    fn default() -> Augment {
        Augment { crop_scale: Some((0.08, 1.0)), crop_ratio: (3.0 / 4.0, 4.0 / 3.0), hflip: true }
    }
}

/// How the network trains. The optimizer, schedule, smoothing, clipping, EMA and checkpoint
/// settings are the head trainer's ([`HeadConfig`]; its `hidden` is unused here).
#[derive(Clone, Debug)]
pub struct FitConfig {
    pub opt: HeadConfig,
    /// Dropout before the classifier (the paper's 0.5).
    pub dropout: f64,
    /// Leading stages (stem, then blocks in order) kept frozen: BatchNorm in inference mode, no
    /// gradients. 0 trains everything.
    pub frozen_stages: usize,
    /// Learning rate of the backbone relative to the classifier's (fine-tuning: e.g. 0.1).
    pub backbone_lr_scale: f64,
    /// Also checkpoint every this many steps (0: at epoch ends only).
    pub checkpoint_every: usize,
    /// Stop after this many steps in total (tests and benchmarks); None: run every epoch.
    pub max_steps: Option<usize>,
}

/// torchvision `RandomResizedCrop.get_params`: ten tries at an area in `scale` and a
/// log-uniform aspect ratio in `ratio`, then the centre crop clamped to the ratio range.
fn random_crop_box(w: u32, h: u32, scale: (f64, f64), ratio: (f64, f64), rng: &mut Rng) -> (u32, u32, u32, u32) {
    let area = (w * h) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * (scale.0 + (scale.1 - scale.0) * rng.uniform());
        let aspect = (lr0 + (lr1 - lr0) * rng.uniform()).exp();
        let cw = (target * aspect).sqrt().round() as u32;
        let ch = (target / aspect).sqrt().round() as u32;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let x = (rng.uniform() * (w - cw + 1) as f64) as u32;
            let y = (rng.uniform() * (h - ch + 1) as f64) as u32;
            return (x, y, cw, ch);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, (w as f64 / ratio.0).round() as u32)
    } else if in_ratio > ratio.1 {
        ((h as f64 * ratio.1).round() as u32, h)
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// One training image: augmented per `augment` with the stream `rng`, normalised as `eval`.
pub fn augment_image(img: &RgbImage, eval: &Preprocess, augment: &Augment, rng: &mut Rng) -> Vec<f32> {
    let size = eval.size() as u32;
    let mut out = match augment.crop_scale {
        Some(scale) => {
            let (x, y, cw, ch) = random_crop_box(img.width(), img.height(), scale, augment.crop_ratio, rng);
            let crop = image::imageops::crop_imm(img, x, y, cw, ch).to_image();
            pil_resize(&crop, size, size, Resize::Bilinear)
        }
        None => return eval.apply(&if augment.hflip && rng.uniform() < 0.5 { image::imageops::flip_horizontal(img) } else { img.clone() }),
    };
    if augment.hflip && rng.uniform() < 0.5 {
        out = image::imageops::flip_horizontal(&out);
    }
    eval.normalize(&out)
}

/// The stream of sample `index` in `epoch` (independent of batching and threads).
fn sample_rng(seed: u64, epoch: usize, index: usize) -> Rng {
    Rng(seed ^ 0xA55A_0000_0000_0000 ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// The order of epoch `epoch` (the head trainer's rule: seed and epoch alone).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng(seed ^ (epoch as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)).shuffle(&mut order);
    order
}

/// A decoded, augmented batch: NHWC pixels and targets (one class per image, or one per pixel).
struct Batch {
    step: usize,
    images: usize,
    pixels: Vec<f32>,
    targets: Vec<i64>,
}

/// Decodes and augments the batches of `steps` on worker threads, at most `ahead` batches ahead
/// of the consumer. Each batch's images are decoded in parallel (rayon); results arrive in order.
fn prefetch<T: Task>(task: std::sync::Arc<T>, batch_size: usize, seed: u64, steps: std::ops::Range<usize>, steps_per_epoch: usize, ahead: usize) -> std::sync::mpsc::Receiver<Result<Batch>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(ahead);
    std::thread::spawn(move || {
        use rayon::prelude::*;
        let n = task.train_len();
        let mut cached: Option<(usize, Vec<usize>)> = None;
        for step in steps {
            let (epoch, b) = (step / steps_per_epoch, step % steps_per_epoch);
            if cached.as_ref().is_none_or(|c| c.0 != epoch) {
                cached = Some((epoch, epoch_order(n, seed, epoch)));
            }
            let order = &cached.as_ref().expect("set above").1;
            let members = &order[b * batch_size..((b + 1) * batch_size).min(n)];
            let samples: Result<Vec<(Vec<f32>, Vec<i64>)>> = members.par_iter().map(|&i| task.sample(i, &mut sample_rng(seed, epoch, i))).collect();
            let batch = samples.map(|s| {
                let (pixels, targets): (Vec<Vec<f32>>, Vec<Vec<i64>>) = s.into_iter().unzip();
                Batch { step, images: members.len(), pixels: pixels.concat(), targets: targets.concat() }
            });
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// How one training pass runs the network.
pub struct Pass {
    pub layout: Layout,
    pub frozen_stages: usize,
    /// Dropout before the classifier: (rate, seed of this step's mask).
    pub dropout: Option<(f64, u64)>,
    pub label_smoothing: f64,
}

/// One validation's figures.
pub struct Validation {
    pub loss: f64,
    /// Classification top-1 / segmentation pixel accuracy, per-class figures (accuracy / IoU,
    /// NaN for absent classes) and the confusion matrix.
    pub eval: Evaluation,
    /// Segmentation: mean IoU.
    pub miou: Option<f64>,
}

impl Validation {
    /// What picks the best epoch: mean IoU for segmentation, top-1 otherwise.
    pub fn score(&self) -> f64 {
        self.miou.unwrap_or(self.eval.top1)
    }
}

/// What a run learns: how a sample becomes an input and targets, the loss, and validation.
pub trait Task: Send + Sync + 'static {
    /// Number of training samples.
    fn train_len(&self) -> usize;
    /// Training sample `i` augmented with the stream `rng`: the input (size x size x 3) and its
    /// targets (one class, or one per pixel with 255 ignored).
    fn sample(&self, i: usize, rng: &mut Rng) -> Result<(Vec<f32>, Vec<i64>)>;
    fn input_size(&self) -> usize;
    /// The batch's mean loss, and how many targets were predicted right out of how many counted.
    fn loss(&self, model: &Xception, x: Tensor<4>, targets: Vec<i64>, pass: &Pass) -> Result<(Tensor<1>, usize, usize)>;
    /// Scores `weights` (the network `net` was trained as) on the held-out data.
    fn validate(&self, net: &Network, weights: &TensorMap, threads: usize) -> Result<Validation>;
}

/// Image classification on a [`Dataset`].
pub struct Classify {
    pub train: Dataset,
    pub val: Dataset,
    /// The eval transform (also the normalisation after augmentation).
    pub eval: Preprocess,
    pub augment: Augment,
}

impl Task for Classify {
    fn train_len(&self) -> usize {
        self.train.samples.len()
    }

    fn sample(&self, i: usize, rng: &mut Rng) -> Result<(Vec<f32>, Vec<i64>)> {
        let s = &self.train.samples[i];
        Ok((augment_image(&s.load()?, &self.eval, &self.augment, rng), vec![s.label as i64]))
    }

    fn input_size(&self) -> usize {
        self.eval.size()
    }

    fn loss(&self, model: &Xception, x: Tensor<4>, targets: Vec<i64>, pass: &Pass) -> Result<(Tensor<1>, usize, usize)> {
        classification_loss(model, x, targets, pass)
    }

    fn validate(&self, net: &Network, weights: &TensorMap, threads: usize) -> Result<Validation> {
        let (loss, eval) = validate(net, weights, &self.val, &self.eval, threads)?;
        Ok(Validation { loss, eval, miou: None })
    }
}

/// Mean (label-smoothed) cross-entropy of the classifier on an NCHW batch in training mode, and
/// how many of the `targets` were predicted right.
fn classification_loss(model: &Xception, x: Tensor<4>, targets: Vec<i64>, pass: &Pass) -> Result<(Tensor<1>, usize, usize)> {
    let device = x.device();
    let n = targets.len();
    let y = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
    let logits = model.classify(model.pool_train(x, pass.layout, pass.frozen_stages, pass.dropout)?)?;
    let smoothing = (pass.label_smoothing > 0.0).then_some(pass.label_smoothing as f32);
    let loss = CrossEntropyLossConfig::new().with_smoothing(smoothing).init(&device).forward(logits.clone(), y.clone());
    let correct = logits.argmax(1).squeeze::<1>().equal(y).int().sum().into_scalar::<i64>() as usize;
    Ok((loss, correct, n))
}

/// -log softmax(row)[y], in f64.
fn nll(row: &[f32], y: usize) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() - row[y] as f64
}

/// DeepLabv3+ training on VOC-style samples: DeepLab's augmentation (random scale, a crop padded
/// with the mean pixel and the ignore label, a random mirror), per-pixel cross-entropy over the
/// labelled pixels; validation fits each image as `segment` does and scores mean IoU, optionally
/// at another output stride (DeepLab trains at 16 and evaluates at 8).
pub struct Segment {
    pub train: Vec<crate::segdata::SegSample>,
    pub val: Vec<crate::segdata::SegSample>,
    pub crop: usize,
    /// Random scale range (DeepLab: 0.5 to 2.0).
    pub scale: (f64, f64),
    pub hflip: bool,
    /// Input size of validation (images shrink to fit it, as `segment --size`).
    pub eval_size: usize,
    /// Output stride validation runs at.
    pub eval_output_stride: usize,
    /// Classes of the network; a mask value beyond them (other than 255) is an error.
    pub classes: usize,
}

/// Nearest-neighbour resize of a class mask (labels must not blend).
fn resize_mask(mask: &[u8], w: usize, h: usize, nw: usize, nh: usize) -> Vec<u8> {
    let mut out = vec![0u8; nw * nh];
    for y in 0..nh {
        let sy = ((y as f64 + 0.5) * h as f64 / nh as f64) as usize;
        for x in 0..nw {
            let sx = ((x as f64 + 0.5) * w as f64 / nw as f64) as usize;
            out[y * nw + x] = mask[sy.min(h - 1) * w + sx.min(w - 1)];
        }
    }
    out
}

impl Task for Segment {
    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn sample(&self, i: usize, rng: &mut Rng) -> Result<(Vec<f32>, Vec<i64>)> {
        let s = &self.train[i];
        let (img, mask) = s.load()?;
        if let Some(bad) = mask.iter().find(|&&v| v != crate::segdata::IGNORE && v as usize >= self.classes) {
            return Err(Error::file(&s.mask, format!("holds class value {bad}, but the model has {} classes (0..{}, 255 = ignore)", self.classes, self.classes - 1)));
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let scale = self.scale.0 + (self.scale.1 - self.scale.0) * rng.uniform();
        let (nw, nh) = (((w as f64 * scale).round() as usize).max(1), ((h as f64 * scale).round() as usize).max(1));
        let img = pil_resize(&img, nw as u32, nh as u32, Resize::Bilinear);
        let mask = resize_mask(&mask, w, h, nw, nh);
        let crop = self.crop;
        let x0 = (rng.uniform() * (nw.max(crop) - crop + 1) as f64) as usize;
        let y0 = (rng.uniform() * (nh.max(crop) - crop + 1) as f64) as usize;
        let flip = self.hflip && rng.uniform() < 0.5;
        // Outside the scaled image: the mean pixel (0 after DeepLab's 2/255 x - 1) and IGNORE.
        let mut pixels = vec![0f32; crop * crop * 3];
        let mut labels = vec![crate::segdata::IGNORE as i64; crop * crop];
        for y in 0..crop {
            let sy = y0 + y;
            if sy >= nh {
                continue;
            }
            for x in 0..crop {
                let sx = x0 + if flip { crop - 1 - x } else { x };
                if sx >= nw {
                    continue;
                }
                let p = img.get_pixel(sx as u32, sy as u32).0;
                for c in 0..3 {
                    pixels[(y * crop + x) * 3 + c] = p[c] as f32 / 127.5 - 1.0;
                }
                labels[y * crop + x] = mask[sy * nw + sx] as i64;
            }
        }
        Ok((pixels, labels))
    }

    fn input_size(&self) -> usize {
        self.crop
    }

    fn loss(&self, model: &Xception, x: Tensor<4>, targets: Vec<i64>, pass: &Pass) -> Result<(Tensor<1>, usize, usize)> {
        let device = x.device();
        let logits = model.segment_train(x, pass.layout)?; // N, K, H, W
        let [n, k, h, w] = logits.dims();
        let logp = burn::tensor::activation::log_softmax(logits.permute([0, 2, 3, 1]).reshape([n * h * w, k]), 1);
        let valid: Vec<f32> = targets.iter().map(|&t| (t != crate::segdata::IGNORE as i64) as u8 as f32).collect();
        let counted = valid.iter().filter(|&&v| v > 0.0).count();
        let index: Vec<i64> = targets.iter().map(|&t| if t == crate::segdata::IGNORE as i64 { 0 } else { t }).collect();
        let index = Tensor::<2, Int>::from_data(TensorData::new(index, [n * h * w, 1]), &device);
        let valid = Tensor::<2>::from_data(TensorData::new(valid, [n * h * w, 1]), &device);
        let picked = logp.clone().gather(1, index.clone()) * valid.clone();
        let loss = picked.sum().neg() / counted.max(1) as f64;
        let right = logp.argmax(1).equal(index).float() * valid;
        let correct = right.sum().into_scalar::<f32>() as usize;
        Ok((loss, correct, counted))
    }

    fn validate(&self, net: &Network, weights: &TensorMap, threads: usize) -> Result<Validation> {
        let mut config = net.config.clone();
        config.output_stride = self.eval_output_stride;
        let net = Network::build(&config)?;
        let classes = net.segmentation.as_ref().map(|s| s.num_classes).ok_or_else(|| Error::Config("validation needs a segmentation network".into()))?;
        let runner = crate::runner::Runner::new(crate::runner::Backend::Engine, net, weights, threads)?;
        let mut confusion = crate::segdata::Confusion::new(classes);
        let (mut loss, mut counted) = (0f64, 0usize);
        for s in &self.val {
            let (img, truth) = s.load()?;
            let (w, h) = (img.width(), img.height());
            let fitted = crate::segment::fit(&img, self.eval_size);
            let logits = runner.segment(&fitted.data, self.eval_size, self.eval_size)?;
            confusion.add(&truth, &crate::segment::label_map(&logits, fitted.content_h, fitted.content_w, h as usize, w as usize), &s.mask)?;
            // The loss at the network's input resolution, over the part the image covers, against
            // the mask resized there (nearest).
            let small = resize_mask(&truth, w as usize, h as usize, fitted.content_w, fitted.content_h);
            for y in 0..fitted.content_h {
                for x in 0..fitted.content_w {
                    let t = small[y * fitted.content_w + x];
                    if t == crate::segdata::IGNORE {
                        continue;
                    }
                    loss += nll(&logits.data[(y * logits.w + x) * logits.c..][..logits.c], t as usize);
                    counted += 1;
                }
            }
        }
        let iou = confusion.iou();
        let eval = Evaluation { top1: confusion.pixel_accuracy(), top5: f64::NAN, per_class: iou.iter().map(|v| v.unwrap_or(f64::NAN)).collect(), confusion: confusion.matrix() };
        Ok(Validation { loss: loss / counted.max(1) as f64, eval, miou: Some(confusion.mean_iou()) })
    }
}

/// Fresh weights for training from scratch, timm's initialisation: convs Kaiming-normal with
/// fan-out (std sqrt(2 / (out_channels / groups * k * k))), BatchNorm weight 1 and bias 0,
/// running statistics 0 and 1, dense layers PyTorch's U(+-1/sqrt(in)); drawn from `seed`.
pub fn init_weights(net: &Network, seed: u64) -> TensorMap {
    let mut rng = Rng(seed ^ 0x1417_0000_0000_0001);
    let mut map = TensorMap::new("init");
    let fan_out: std::collections::HashMap<String, usize> = net
        .ops()
        .filter_map(|op| match op {
            Op::Conv(c) => Some((format!("{}.weight", c.key), c.out_channels / c.groups * c.kernel * c.kernel)),
            _ => None,
        })
        .collect();
    for spec in net.tensors() {
        let n = spec.numel();
        let data: Vec<f32> = match spec.role {
            TensorRole::ConvWeight => {
                let std = (2.0 / fan_out[&spec.name] as f64).sqrt();
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            }
            TensorRole::LinearWeight | TensorRole::LinearBias => {
                let bound = 1.0 / (spec.fan_in as f64).sqrt();
                (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
            }
            TensorRole::NormWeight | TensorRole::NormRunningVar => vec![1.0; n],
            TensorRole::ConvBias | TensorRole::NormBias | TensorRole::NormRunningMean => vec![0.0; n],
        };
        map.insert(spec.name.clone(), HostTensor::new(spec.shape.clone(), data));
    }
    map
}

/// Optimizer state of both parameter groups, stored as one file: 8-byte length, then the head's
/// bytes, then the backbone's.
struct Optimizers {
    head: burn::optim::ModuleOptimizer,
    backbone: burn::optim::ModuleOptimizer,
}

impl Optimizers {
    fn new(cfg: &HeadConfig) -> Optimizers {
        Optimizers { head: crate::train::new_optimizer(cfg), backbone: crate::train::new_optimizer(cfg) }
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let err = |e| Error::Config(format!("saving the optimizer state: {e:?}"));
        let head = self.head.into_bytes().map_err(err)?;
        let backbone = self.backbone.into_bytes().map_err(err)?;
        let mut out = (head.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&head);
        out.extend_from_slice(&backbone);
        Ok(out)
    }

    fn from_bytes(cfg: &HeadConfig, bytes: Vec<u8>, path: &Path) -> Result<Optimizers> {
        let bad = |m: String| Error::file(path, format!("optimizer state: {m}"));
        let len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize).ok_or_else(|| bad("truncated".into()))?;
        if bytes.len() < 8 + len {
            return Err(bad("truncated".into()));
        }
        let load = |b: &[u8]| crate::train::new_optimizer(cfg).from_bytes(burn::tensor::Bytes::from_bytes_vec(b.to_vec())).map_err(|e| bad(format!("{e:?}")));
        Ok(Optimizers { head: load(&bytes[8..8 + len])?, backbone: load(&bytes[8 + len..])? })
    }
}

/// What a finished run returns.
pub struct Fitted {
    /// The weights of the best epoch by validation accuracy (the moving average with `ema`).
    pub weights: TensorMap,
    pub history: Vec<EpochMetrics>,
    pub best_epoch: usize,
    pub val: Validation,
    pub steps: usize,
}

/// Accuracy of `weights` on `ds` with the fast engine and the eval transform; also the mean
/// cross-entropy.
pub fn validate(net: &Network, weights: &TensorMap, ds: &Dataset, eval: &Preprocess, threads: usize) -> Result<(f64, Evaluation)> {
    use rayon::prelude::*;
    let runner = crate::runner::Runner::new(crate::runner::Backend::Engine, net.clone(), weights, threads)?;
    let classes = net.config.classes().ok_or_else(|| Error::Config("validation needs a classifier".into()))?;
    let mut logits = Vec::with_capacity(ds.samples.len() * classes);
    for chunk in ds.samples.chunks(32) {
        let items: Vec<crate::Item> = chunk
            .par_iter()
            .map(|s| Ok(crate::Item { name: s.path.display().to_string(), height: eval.size(), width: eval.size(), data: eval.apply(&s.load()?) }))
            .collect::<Result<_>>()?;
        for p in runner.predict(&items, items.len())? {
            logits.extend(p.logits.expect("classifier"));
        }
    }
    let labels: Vec<usize> = ds.samples.iter().map(|s| s.label).collect();
    let loss: f64 = logits.chunks(classes).zip(&labels).map(|(row, &y)| nll(row, y)).sum();
    Ok((loss / labels.len().max(1) as f64, evaluate(&logits, &labels, classes)))
}

/// Trains `net` (its classifier sized for the data's classes) from `init` on `train`,
/// validating on `val` at each epoch's end; checkpoints under `run/checkpoints`, the log in
/// `run/metrics.jsonl`. With `resume`, continues from the newest intact checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn fit<T: Task>(net: &Network, init: &TensorMap, task: std::sync::Arc<T>, cfg: &FitConfig, run: &Path, resume: bool, threads: usize, progress: &indicatif::ProgressBar) -> Result<Fitted> {
    if task.train_len() == 0 {
        return Err(Error::Config("training needs images in the training split".into()));
    }
    let opt = &cfg.opt;
    let device = crate::device::default_device().autodiff();
    let layout = Layout::for_training();
    let mut model = Xception::from_weights(net.clone(), init, &device)?.with_stable_ids();
    let mut optim = Optimizers::new(opt);
    let mut ema = opt.ema.map(|_| model.to_tensor_map());
    let checkpoints = run.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).map_err(|e| Error::io(&checkpoints, e))?;
    let metrics_path = run.join("metrics.jsonl");
    let mut history: Vec<EpochMetrics> = Vec::new();
    let n = task.train_len();
    let steps_per_epoch = n.div_ceil(opt.batch_size);
    let total = steps_per_epoch * opt.epochs;
    let last_step = cfg.max_steps.map_or(total, |m| m.min(total));
    let mut start = 0;
    let mut resumed_sums = EpochSums::default();
    if resume {
        for (step, path) in checkpoints_newest_first(&checkpoints)? {
            let loaded = (|| -> Result<(Xception, Optimizers, Option<TensorMap>, EpochSums)> {
                let map = TensorMap::read_safetensors(&path)?;
                let weights = strip_prefix(&map, "");
                let m = Xception::from_weights(net.clone(), &weights, &device)?.with_stable_ids();
                let state_path = path.with_extension("optim");
                let bytes = std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
                let o = Optimizers::from_bytes(opt, bytes, &state_path)?;
                let e = match opt.ema {
                    Some(_) => {
                        let e = strip_prefix(&map, "ema.");
                        if e.tensors.is_empty() {
                            return Err(Error::Config(format!("{}: the checkpoint holds no moving average (ema.*); the run was started without --ema", path.display())));
                        }
                        Some(e)
                    }
                    None => None,
                };
                Ok((m, o, e, EpochSums::from_metadata(&map)))
            })();
            match loaded {
                Ok((m, o, e, sums)) => {
                    (model, optim, ema) = (m, o, e);
                    resumed_sums = sums;
                    let done_epochs = step / steps_per_epoch;
                    history = crate::train::read_history(&metrics_path)?.into_iter().filter(|h| h.epoch <= done_epochs).collect();
                    start = step;
                    break;
                }
                Err(e @ Error::Config(_)) => return Err(e),
                Err(e) => eprintln!("warning: skipping damaged checkpoint {}: {e}", path.display()),
            }
        }
    }
    let size = task.input_size();
    // Images trained on before `step` (an epoch's last batch may be short).
    let images_before = |step: usize| (step / steps_per_epoch * n + step % steps_per_epoch * opt.batch_size) as u64;
    progress.set_length(images_before(last_step));
    progress.set_position(images_before(start));
    progress.reset_eta();
    let batches = prefetch(task.clone(), opt.batch_size, opt.seed, start..last_step, steps_per_epoch, 3);
    let head_ids: Vec<ParamId> = model.head.iter().flat_map(|l| [l.weight.id, l.bias.id]).collect();
    // The running figures of the epoch under way (restored mid-epoch from the checkpoint).
    let EpochSums { mut loss_sum, mut correct, mut seen, mut counted_total } = resumed_sums;
    let mut epoch_started = std::time::Instant::now();

    for step in start..last_step {
        let batch = batches.recv().map_err(|_| Error::Config("the data loader stopped".into()))??;
        debug_assert_eq!(batch.step, step);
        let bn = batch.images;
        let lr = opt.lr_at(step, total, steps_per_epoch);
        let x = Tensor::<4>::from_data(TensorData::new(batch.pixels, [bn, size, size, 3]), &device).permute([0, 3, 1, 2]);
        let pass = Pass {
            layout,
            frozen_stages: cfg.frozen_stages,
            dropout: (cfg.dropout > 0.0).then_some((cfg.dropout, opt.seed ^ 0xD0D0_0000 ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))),
            label_smoothing: opt.label_smoothing,
        };
        let (loss, right, counted) = task.loss(&model, x, batch.targets, &pass)?;
        let value: f32 = loss.clone().into_scalar();
        if !value.is_finite() {
            return Err(Error::Config(format!("step {}: the loss became {value}; lower --lr", step + 1)));
        }
        correct += right;
        loss_sum += value as f64 * bn as f64;
        seen += bn;
        counted_total += counted;
        let mut grads = loss.backward();
        let mut head_grads = GradientsParams::from_params(&mut grads, &model, &head_ids);
        let mut backbone_grads = GradientsParams::from_grads(grads, &model);
        if let Some(max_norm) = opt.clip_grad_norm {
            crate::train::clip_global_norm(&model.param_shapes(), &mut [&mut head_grads, &mut backbone_grads], max_norm);
        }
        model = optim.head.step(lr, model, head_grads);
        if !backbone_grads.is_empty() {
            model = optim.backbone.step(lr * cfg.backbone_lr_scale, model, backbone_grads);
        }
        // The moving average of every tensor (running statistics included, as timm's ModelEmaV2
        // averages the whole state dict).
        if let (Some(e), Some(d)) = (ema.as_mut(), opt.ema) {
            crate::train::ema_blend(e, &model.to_tensor_map().tensors, d);
        }
        progress.inc(bn as u64);
        let done = step + 1;
        progress.set_message(format!("epoch {}/{} loss {:.4} acc {:.1}% lr {lr:.3e}", step / steps_per_epoch + 1, opt.epochs, loss_sum / seen as f64, 100.0 * correct as f64 / counted_total.max(1) as f64));
        let epoch_end = done % steps_per_epoch == 0;
        if epoch_end {
            let epoch = done / steps_per_epoch;
            let weights = ema.clone().unwrap_or_else(|| model.to_tensor_map());
            let v = task.validate(net, &weights, threads)?;
            let (train_loss, train_accuracy) = (loss_sum / seen.max(1) as f64, correct as f64 / counted_total.max(1) as f64);
            history.push(EpochMetrics { epoch, lr, train_loss, train_accuracy, val_loss: v.loss, val_accuracy: v.eval.top1, val_miou: v.miou, seconds: epoch_started.elapsed().as_secs_f64() });
            let miou = v.miou.map_or(String::new(), |m| format!(", mIoU {:.2}%", 100.0 * m));
            let line = format!("epoch {epoch}: train loss {train_loss:.4} acc {:.2}%, val loss {:.4} acc {:.2}%{miou}", 100.0 * train_accuracy, v.loss, 100.0 * v.eval.top1);
            // A hidden bar (no terminal) swallows println: the log line goes to stderr then.
            if progress.is_hidden() {
                eprintln!("{line}");
            } else {
                progress.println(line);
            }
            let lines: String = history.iter().map(|h| serde_json::to_string(h).expect("plain numbers") + "\n").collect();
            crate::atomic::write(&metrics_path, lines.as_bytes())?;
            (loss_sum, correct, seen, counted_total) = (0.0, 0, 0, 0);
            epoch_started = std::time::Instant::now();
        }
        if epoch_end || (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) || done == last_step {
            let sums = EpochSums { loss_sum, correct, seen, counted_total };
            save_checkpoint(&checkpoints, done, &model, ema.as_ref(), &optim, &history, steps_per_epoch, opt.keep_checkpoints, &sums)?;
        }
    }
    // The best epoch by validation accuracy (the earliest among ties); a run stopped before its
    // first epoch ended exports its last step.
    let best = best_epoch(&history);
    let best_step = best.map_or(last_step, |e| e * steps_per_epoch);
    let map = TensorMap::read_safetensors(&checkpoints.join(checkpoint_name(best_step)))?;
    let weights = strip_prefix(&map, if opt.ema.is_some() { "ema." } else { "" });
    let val = task.validate(net, &weights, threads)?;
    Ok(Fitted { weights, history, best_epoch: best.unwrap_or(0), val, steps: last_step })
}

/// The epoch with the best validation score (mean IoU, else accuracy), the earliest among ties.
fn best_epoch(history: &[EpochMetrics]) -> Option<usize> {
    let score = |m: &EpochMetrics| m.val_miou.unwrap_or(m.val_accuracy);
    history.iter().max_by(|a, b| score(a).total_cmp(&score(b)).then(b.epoch.cmp(&a.epoch))).map(|m| m.epoch)
}

/// The tensors of `map` under `prefix`, renamed without it ("" takes those without a dot-prefix
/// of the EMA kind).
fn strip_prefix(map: &TensorMap, prefix: &str) -> TensorMap {
    let mut out = TensorMap::new(map.source.clone());
    for (name, t) in &map.tensors {
        match prefix {
            "" if !name.starts_with("ema.") => out.insert(name.clone(), t.clone()),
            "" => {}
            p => {
                if let Some(own) = name.strip_prefix(p) {
                    out.insert(own.to_string(), t.clone());
                }
            }
        }
    }
    out
}

fn checkpoint_name(step: usize) -> String {
    format!("step-{step:08}.safetensors")
}

/// The training loss and accuracy sums of the epoch under way, kept in mid-epoch checkpoints
/// so a resumed epoch logs the figures an uninterrupted one does.
#[derive(Default)]
struct EpochSums {
    loss_sum: f64,
    correct: usize,
    seen: usize,
    /// Targets counted for the accuracy (images, or labelled pixels).
    counted_total: usize,
}

impl EpochSums {
    fn to_metadata(&self, map: &mut TensorMap) {
        // Rust prints f64 so that it parses back to the same bits.
        map.metadata.insert("epoch_sums".into(), format!("{},{},{},{}", self.loss_sum, self.correct, self.seen, self.counted_total));
    }

    fn from_metadata(map: &TensorMap) -> EpochSums {
        let parts: Vec<&str> = map.metadata.get("epoch_sums").map_or(vec![], |s| s.split(',').collect());
        match parts[..] {
            [l, c, n, k] => EpochSums { loss_sum: l.parse().unwrap_or(0.0), correct: c.parse().unwrap_or(0), seen: n.parse().unwrap_or(0), counted_total: k.parse().unwrap_or(0) },
            _ => EpochSums::default(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(dir: &Path, step: usize, model: &Xception, ema: Option<&TensorMap>, optim: &Optimizers, history: &[EpochMetrics], steps_per_epoch: usize, keep: usize, sums: &EpochSums) -> Result<()> {
    let mut map = model.to_tensor_map();
    map.source = format!("checkpoint step {step}");
    for (name, t) in ema.iter().flat_map(|e| &e.tensors) {
        map.insert(format!("ema.{name}"), t.clone());
    }
    map.metadata.insert("step".into(), step.to_string());
    sums.to_metadata(&mut map);
    map.metadata.insert("model".into(), model.net.config.name());
    let weights = dir.join(checkpoint_name(step));
    // The optimizer state first: a checkpoint counts once its weights file exists.
    crate::atomic::write(&weights.with_extension("optim"), &optim.to_bytes()?)?;
    map.write_safetensors(&weights)?;
    // Keep the newest `keep` and the best epoch's.
    let best = best_epoch(history).map(|e| e * steps_per_epoch);
    for (old, path) in checkpoints_newest_first(dir)?.into_iter().skip(keep.max(1)) {
        if Some(old) != best {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(path.with_extension("optim"));
        }
    }
    Ok(())
}

/// Checkpoints (weights and optimizer state both present), newest first.
fn checkpoints_newest_first(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    crate::train::numbered_checkpoints(dir, "step-")
}

/// Seconds of each of `runs` training steps (forward, backward, SGD step; after one warm-up
/// step) of `net` on a constant batch of `batch` images of `size` x `size`, deterministic
/// weights, in the CPU training layout. For `xception bench --train`.
pub fn bench_steps(net: &Network, batch: usize, size: usize, runs: usize) -> Result<Vec<f64>> {
    let device = crate::device::default_device().autodiff();
    let weights = crate::weights::deterministic(net);
    let mut model = Xception::from_weights(net.clone(), &weights, &device)?;
    let cfg = HeadConfig { optimizer: crate::train::OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, ..HeadConfig::default() };
    let mut optim = crate::train::new_optimizer(&cfg);
    let classes = net.config.classes().ok_or_else(|| Error::Config("training benchmarks need a classifier".into()))?;
    let pass = Pass { layout: Layout::for_training(), frozen_stages: 0, dropout: None, label_smoothing: 0.0 };
    let mut times = Vec::new();
    for run in 0..=runs {
        let started = std::time::Instant::now();
        let x = Tensor::<4>::from_data(TensorData::new(vec![0.1f32; batch * 3 * size * size], [batch, 3, size, size]), &device);
        let targets = (0..batch).map(|i| (i % classes) as i64).collect();
        let (loss, _, _) = classification_loss(&model, x, targets, &pass)?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
        // Wait for the last update to land before stopping the clock.
        let _ = model.convs[0].weight.val().into_data();
        if run > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}
