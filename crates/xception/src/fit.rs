//! Training the whole network (or its top blocks) on images: from scratch or fine-tuning loaded
//! weights. Images are decoded and augmented on worker threads ahead of the training thread; the
//! network runs in burn's autodiff in the CPU training layout ([`Layout::for_training`]), its
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
    pub augment: Augment,
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

/// A decoded, augmented batch: NHWC pixels and labels.
struct Batch {
    step: usize,
    pixels: Vec<f32>,
    labels: Vec<usize>,
}

/// Decodes and augments the batches of `steps` on worker threads, at most `ahead` batches ahead
/// of the consumer. Each batch's images are decoded in parallel (rayon); results arrive in order.
fn prefetch(ds: &Dataset, eval: Preprocess, augment: Augment, batch_size: usize, seed: u64, steps: std::ops::Range<usize>, steps_per_epoch: usize, ahead: usize) -> std::sync::mpsc::Receiver<Result<Batch>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(ahead);
    let samples = ds.samples.clone();
    std::thread::spawn(move || {
        use rayon::prelude::*;
        let n = samples.len();
        let mut cached: Option<(usize, Vec<usize>)> = None;
        for step in steps {
            let (epoch, b) = (step / steps_per_epoch, step % steps_per_epoch);
            if cached.as_ref().is_none_or(|c| c.0 != epoch) {
                cached = Some((epoch, epoch_order(n, seed, epoch)));
            }
            let order = &cached.as_ref().expect("set above").1;
            let members = &order[b * batch_size..((b + 1) * batch_size).min(n)];
            let images: Result<Vec<Vec<f32>>> = members
                .par_iter()
                .map(|&i| {
                    let img = samples[i].load()?;
                    Ok(augment_image(&img, &eval, &augment, &mut sample_rng(seed, epoch, i)))
                })
                .collect();
            let batch = images.map(|imgs| Batch { step, pixels: imgs.concat(), labels: members.iter().map(|&i| samples[i].label).collect() });
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
        }
    });
    rx
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

/// The moving average of every tensor of the network (running statistics included, as timm's
/// ModelEmaV2 averages the whole state dict).
fn ema_update(ema: &mut TensorMap, current: &TensorMap, decay: f64) {
    let d = decay as f32;
    for (name, t) in &current.tensors {
        let shadow = ema.tensors.get_mut(name).expect("same network");
        for (s, v) in shadow.data.iter_mut().zip(&t.data) {
            *s = d * *s + (1.0 - d) * v;
        }
    }
}

/// What a finished run returns.
pub struct Fitted {
    /// The weights of the best epoch by validation accuracy (the moving average with `ema`).
    pub weights: TensorMap,
    pub history: Vec<EpochMetrics>,
    pub best_epoch: usize,
    pub val: Evaluation,
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
    let mut loss = 0f64;
    for (row, &y) in logits.chunks(classes).zip(&labels) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        loss += lse - row[y] as f64;
    }
    Ok((loss / labels.len().max(1) as f64, evaluate(&logits, &labels, classes)))
}

/// Trains `net` (its classifier sized for the data's classes) from `init` on `train`,
/// validating on `val` at each epoch's end; checkpoints under `run/checkpoints`, the log in
/// `run/metrics.jsonl`. With `resume`, continues from the newest intact checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn fit(net: &Network, init: &TensorMap, train: &Dataset, val: &Dataset, eval: &Preprocess, cfg: &FitConfig, run: &Path, resume: bool, threads: usize, progress: &indicatif::ProgressBar) -> Result<Fitted> {
    if train.samples.is_empty() || val.samples.is_empty() {
        return Err(Error::Config("training needs images in both the training and the validation split".into()));
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
    let n = train.samples.len();
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
                    history = read_history(&metrics_path)?.into_iter().filter(|h| h.epoch <= done_epochs).collect();
                    start = step;
                    break;
                }
                Err(e @ Error::Config(_)) => return Err(e),
                Err(e) => eprintln!("warning: skipping damaged checkpoint {}: {e}", path.display()),
            }
        }
    }
    let loss_fn = CrossEntropyLossConfig::new().with_smoothing((opt.label_smoothing > 0.0).then_some(opt.label_smoothing as f32)).init(&device);
    let size = eval.size();
    progress.set_length((last_step * opt.batch_size).min(last_step / steps_per_epoch * n + (last_step % steps_per_epoch) * opt.batch_size) as u64);
    progress.set_position((start * opt.batch_size).min(n * (start / steps_per_epoch) + (start % steps_per_epoch) * opt.batch_size) as u64);
    progress.reset_eta();
    let batches = prefetch(train, eval.clone(), cfg.augment.clone(), opt.batch_size, opt.seed, start..last_step, steps_per_epoch, 3);
    let head_ids: Vec<ParamId> = model.head.iter().flat_map(|l| [l.weight.id, l.bias.id]).collect();
    // The running figures of the epoch under way (restored mid-epoch from the checkpoint).
    let EpochSums { mut loss_sum, mut correct, mut seen } = resumed_sums;
    let mut epoch_started = std::time::Instant::now();

    for step in start..last_step {
        let batch = batches.recv().map_err(|_| Error::Config("the data loader stopped".into()))??;
        debug_assert_eq!(batch.step, step);
        let bn = batch.labels.len();
        let lr = opt.lr_at(step, total, steps_per_epoch);
        let x = Tensor::<4>::from_data(TensorData::new(batch.pixels, [bn, size, size, 3]), &device).permute([0, 3, 1, 2]);
        let y = Tensor::<1, Int>::from_data(TensorData::new(batch.labels.iter().map(|&v| v as i64).collect::<Vec<_>>(), [bn]), &device);
        let dropout = (cfg.dropout > 0.0).then_some((cfg.dropout, opt.seed ^ 0xD0D0_0000 ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let logits = model.classify(model.pool_train(x, layout, cfg.frozen_stages, dropout)?)?;
        let loss = loss_fn.forward(logits.clone(), y.clone());
        let value: f32 = loss.clone().into_scalar();
        if !value.is_finite() {
            return Err(Error::Config(format!("step {}: the loss became {value}; lower --lr", step + 1)));
        }
        correct += logits.argmax(1).squeeze::<1>().equal(y).int().sum().into_scalar::<i64>() as usize;
        loss_sum += value as f64 * bn as f64;
        seen += bn;
        let mut grads = loss.backward();
        let mut head_grads = GradientsParams::from_params(&mut grads, &model, &head_ids);
        let mut backbone_grads = GradientsParams::from_grads(grads, &model);
        if let Some(max_norm) = opt.clip_grad_norm {
            clip_global_norm(&model, &mut [&mut head_grads, &mut backbone_grads], max_norm);
        }
        model = optim.head.step(lr, model, head_grads);
        if !backbone_grads.is_empty() {
            model = optim.backbone.step(lr * cfg.backbone_lr_scale, model, backbone_grads);
        }
        if let (Some(e), Some(d)) = (ema.as_mut(), opt.ema) {
            ema_update(e, &model.to_tensor_map(), d);
        }
        progress.inc(bn as u64);
        let done = step + 1;
        progress.set_message(format!("epoch {}/{} loss {:.4} acc {:.1}% lr {lr:.3e}", step / steps_per_epoch + 1, opt.epochs, loss_sum / seen as f64, 100.0 * correct as f64 / seen as f64));
        let epoch_end = done % steps_per_epoch == 0;
        if epoch_end {
            let epoch = done / steps_per_epoch;
            let weights = ema.clone().unwrap_or_else(|| model.to_tensor_map());
            let (val_loss, val_eval) = validate(net, &weights, val, eval, threads)?;
            history.push(EpochMetrics {
                epoch,
                lr,
                train_loss: loss_sum / seen.max(1) as f64,
                train_accuracy: correct as f64 / seen.max(1) as f64,
                val_loss,
                val_accuracy: val_eval.top1,
                seconds: epoch_started.elapsed().as_secs_f64(),
            });
            let line = format!("epoch {epoch}: train loss {:.4} acc {:.2}%, val loss {val_loss:.4} acc {:.2}%", loss_sum / seen.max(1) as f64, 100.0 * correct as f64 / seen.max(1) as f64, 100.0 * val_eval.top1);
            // A hidden bar (no terminal) swallows println: the log line goes to stderr then.
            if progress.is_hidden() {
                eprintln!("{line}");
            } else {
                progress.println(line);
            }
            let lines: String = history.iter().map(|h| serde_json::to_string(h).expect("plain numbers") + "\n").collect();
            crate::atomic::write(&metrics_path, lines.as_bytes())?;
            (loss_sum, correct, seen) = (0.0, 0, 0);
            epoch_started = std::time::Instant::now();
        }
        if epoch_end || (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) || done == last_step {
            let sums = EpochSums { loss_sum, correct, seen };
            save_checkpoint(&checkpoints, done, &model, ema.as_ref(), &optim, &history, steps_per_epoch, opt.keep_checkpoints, &sums)?;
        }
    }
    // The best epoch by validation accuracy (the earliest among ties); a run stopped before its
    // first epoch ended exports its last step.
    let best = history.iter().max_by(|a, b| a.val_accuracy.total_cmp(&b.val_accuracy).then(b.epoch.cmp(&a.epoch))).map(|m| m.epoch);
    let best_step = best.map_or(last_step, |e| e * steps_per_epoch);
    let map = TensorMap::read_safetensors(&checkpoints.join(checkpoint_name(best_step)))?;
    let weights = strip_prefix(&map, if opt.ema.is_some() { "ema." } else { "" });
    let (_, val_eval) = validate(net, &weights, val, eval, threads)?;
    Ok(Fitted { weights, history, best_epoch: best.unwrap_or(0), val: val_eval, steps: last_step })
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

/// PyTorch's clip_grad_norm_ over both parameter groups together.
fn clip_global_norm(model: &Xception, groups: &mut [&mut GradientsParams], max_norm: f64) {
    let ids = model.param_shapes();
    let mut total = 0f64;
    for g in groups.iter() {
        for &(id, rank) in &ids {
            total += match rank {
                1 => g.get::<1>(id).map_or(0.0, |t| t.powi_scalar(2).sum().into_scalar::<f32>() as f64),
                2 => g.get::<2>(id).map_or(0.0, |t| t.powi_scalar(2).sum().into_scalar::<f32>() as f64),
                _ => g.get::<4>(id).map_or(0.0, |t| t.powi_scalar(2).sum().into_scalar::<f32>() as f64),
            };
        }
    }
    let coef = (max_norm / (total.sqrt() + 1e-6)).min(1.0);
    if coef >= 1.0 {
        return;
    }
    for g in groups.iter_mut() {
        for &(id, rank) in &ids {
            match rank {
                1 => {
                    if let Some(t) = g.remove::<1>(id) {
                        g.register(id, t * coef)
                    }
                }
                2 => {
                    if let Some(t) = g.remove::<2>(id) {
                        g.register(id, t * coef)
                    }
                }
                _ => {
                    if let Some(t) = g.remove::<4>(id) {
                        g.register(id, t * coef)
                    }
                }
            }
        }
    }
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
}

impl EpochSums {
    fn to_metadata(&self, map: &mut TensorMap) {
        // Rust prints f64 so that it parses back to the same bits.
        map.metadata.insert("epoch_sums".into(), format!("{},{},{}", self.loss_sum, self.correct, self.seen));
    }

    fn from_metadata(map: &TensorMap) -> EpochSums {
        let parts: Vec<&str> = map.metadata.get("epoch_sums").map_or(vec![], |s| s.split(',').collect());
        match parts[..] {
            [l, c, n] => EpochSums { loss_sum: l.parse().unwrap_or(0.0), correct: c.parse().unwrap_or(0), seen: n.parse().unwrap_or(0) },
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
    let best = history.iter().max_by(|a, b| a.val_accuracy.total_cmp(&b.val_accuracy).then(b.epoch.cmp(&a.epoch))).map(|m| m.epoch * steps_per_epoch);
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
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.strip_suffix(".safetensors")).and_then(|s| s.parse::<usize>().ok()) {
            if p.with_extension("optim").is_file() {
                found.push((step, p));
            }
        }
    }
    found.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(found)
}

fn read_history(path: &Path) -> Result<Vec<EpochMetrics>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).map_err(|e| Error::file(path, format!("bad metrics line: {e}")))).collect()
}
