//! `xception train` (transfer learning on a frozen backbone; fine-tuning the top blocks or the
//! whole network; training from scratch) and `xception eval`.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use xception::arch::{ModelConfig, Network, Variant};
use xception::data::{self, Data, Dataset};
use xception::pipeline::{Head, LoadOptions, Pipeline};
use xception::train::{evaluate, train_head, Evaluation, Features, HeadConfig, OptimizerKind, Schedule};
use xception::TensorMap;

#[derive(Args)]
pub struct TrainArgs {
    /// Images: a folder of class folders (with train/ and val/ inside, or split by --val-split),
    /// or a CSV of `path,label` lines (paths relative to the CSV); IDX files (Fashion-MNIST).
    /// `--task segment`: a VOC or Cityscapes-style tree (its train and val splits).
    #[arg(long)]
    data: PathBuf,
    /// classify, or segment (a DeepLabv3+ model, e.g. --model deeplabv3plus_xception65).
    #[arg(long, default_value = "classify", value_parser = ["classify", "segment"])]
    task: String,
    /// Segmentation: classes of the masks (VOC: 21, background included).
    #[arg(long, default_value_t = 21)]
    num_classes: usize,
    /// Segmentation: training crop (DeepLab: 513).
    #[arg(long, default_value_t = 513)]
    crop: usize,
    /// Segmentation: random scale range of the training images, `min,max`.
    #[arg(long, default_value = "0.5,2.0")]
    scale_range: String,
    /// Segmentation: output stride while training (DeepLab: 16).
    #[arg(long, default_value_t = 16)]
    output_stride: usize,
    /// Segmentation: output stride of validation (DeepLab evaluates at 8).
    #[arg(long, default_value_t = 8)]
    eval_output_stride: usize,
    /// Segmentation: validation input size (images shrink to fit it, as `segment --size`).
    #[arg(long, default_value_t = 513)]
    eval_size: usize,
    /// Starting weights (any file `classify` takes, or named weights); their classifier is
    /// replaced by one for the data's classes. Without it the network trains from scratch
    /// (timm's initialisation; needs --model).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Any variant, or `xception_tiny` (see `xception info --model xception_tiny`).
    #[arg(long)]
    model: Option<String>,
    /// Run directory: final.safetensors, checkpoints/, metrics.jsonl, summary.json, confusion.png.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate (after warm-up) [default: 1e-3; paper recipe 0.045].
    #[arg(long)]
    lr: Option<f64>,
    /// adamw (betas 0.9/0.999, eps 1e-8), sgd (momentum, dampening 0), rmsprop (PyTorch's form)
    /// or rmsprop-tf (TensorFlow/Keras' form: epsilon inside the square root, decoupled weight
    /// decay) [default: adamw; paper recipe sgd].
    #[arg(long, value_parser = ["adamw", "sgd", "rmsprop", "rmsprop-tf"])]
    optimizer: Option<String>,
    /// SGD / RMSprop momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long)]
    nesterov: bool,
    /// RMSprop smoothing constant (PyTorch's alpha; TF's decay, Keras' rho).
    #[arg(long, default_value_t = 0.99)]
    rms_alpha: f64,
    /// RMSprop epsilon: added to sqrt(mean square) (rmsprop), or under the root (rmsprop-tf; Keras'
    /// default is 1e-7, TF1's 1e-10).
    #[arg(long, default_value_t = 1e-8)]
    rms_eps: f64,
    /// After warm-up: cosine (to 0), step (x --decay-rate every --decay-every epochs: the paper's
    /// 0.94 every 2), poly ((1 - t/T)^--poly-power) or constant [default: cosine; paper recipe step].
    #[arg(long, value_parser = ["cosine", "step", "poly", "constant"])]
    schedule: Option<String>,
    #[arg(long, default_value_t = 2)]
    decay_every: usize,
    #[arg(long, default_value_t = 0.94)]
    decay_rate: f64,
    #[arg(long, default_value_t = 0.9)]
    poly_power: f64,
    /// [default: 1e-4; paper recipe 1e-5]
    #[arg(long)]
    weight_decay: Option<f64>,
    /// [default: 0.1; paper recipe 0]
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Clip the gradients' global L2 norm (as PyTorch's clip_grad_norm_).
    #[arg(long)]
    clip_grad_norm: Option<f64>,
    /// Validate and export an exponential moving average of the weights with this decay
    /// (e.g. 0.999; the paper evaluated with Polyak averaging).
    #[arg(long)]
    ema: Option<f64>,
    /// [default: 1; paper recipe 0]
    #[arg(long)]
    warmup_epochs: Option<usize>,
    /// Hidden layers of the head (ReLU), e.g. `--hidden 256`; none: one dense layer.
    #[arg(long, value_delimiter = ',')]
    hidden: Vec<usize>,
    /// Fraction of each class held out for validation when --data is not split already.
    #[arg(long, default_value_t = 0.2)]
    val_split: f64,
    /// Seeds the split and every epoch's order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Input size (default: the backbone's).
    #[arg(long)]
    size: Option<usize>,
    /// What stays frozen: `backbone` (with --weights: the head alone trains, on features the
    /// engine computes once, unless --unfreeze-top is given) or `none` (the whole network trains
    /// on augmented images; the default without --weights).
    #[arg(long, value_parser = ["backbone", "none"])]
    freeze: Option<String>,
    /// Fine-tuning: also train the last K stages of the backbone (blocks, counted from the top),
    /// their BatchNorms in training mode, the rest frozen in inference mode.
    #[arg(long)]
    unfreeze_top: Option<usize>,
    /// Learning rate of the trained backbone relative to the classifier's.
    #[arg(long, default_value_t = 1.0)]
    backbone_lr_scale: f64,
    /// Dropout before the classifier [default: 0; paper recipe 0.5]. Whole-network training only.
    #[arg(long)]
    dropout: Option<f64>,
    /// Random-resized-crop area range, `min,max` (torchvision's 0.08,1); `none`: no cropping
    /// (resize and centre crop as at evaluation). Whole-network training only.
    #[arg(long, default_value = "0.08,1")]
    crop_scale: String,
    /// No random horizontal flips.
    #[arg(long)]
    no_flip: bool,
    /// Also checkpoint every N steps (besides each epoch's end).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: usize,
    /// Stop after N steps in total (a short run of a longer schedule).
    #[arg(long)]
    max_steps: Option<usize>,
    /// `paper`: the Xception paper's ImageNet settings (SGD momentum 0.9, lr 0.045 x0.94 every 2
    /// epochs, weight decay 1e-5, dropout 0.5, Polyak averaging as an EMA of decay 0.9999, no
    /// label smoothing, no warm-up); options given explicitly still win.
    #[arg(long, value_parser = ["paper"])]
    recipe: Option<String>,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long)]
    offline: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Labelled images (as `train --data`; a split tree is evaluated on its val/ or test/ part);
    /// for `--task segment`, a VOC or Cityscapes-style tree.
    #[arg(long)]
    data: PathBuf,
    /// classify: top-1/top-5 accuracy; segment: mean IoU of a DeepLabv3+ model.
    #[arg(long, default_value = "classify", value_parser = ["classify", "segment"])]
    task: String,
    /// The split a segmentation tree is evaluated on (ImageSets/Segmentation/<split>.txt).
    #[arg(long, default_value = "val")]
    split: String,
    /// Segmentation: output stride 16 or 8 (default: the model's).
    #[arg(long)]
    output_stride: Option<usize>,
    /// Segmentation: average class probabilities over these input scales, e.g.
    /// `0.5,0.75,1.0,1.25,1.5,1.75` (DeepLab's multi-scale evaluation).
    #[arg(long, value_delimiter = ',', default_value = "1.0")]
    scales: Vec<f64>,
    /// Segmentation: also average over each scale's left-right mirror image.
    #[arg(long)]
    flip: bool,
    /// A classifier: a model `train` wrote, or any weights `classify` takes.
    #[arg(long)]
    weights: PathBuf,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    size: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write the confusion matrix as a PNG (rows: true class, columns: predicted).
    #[arg(long)]
    confusion: Option<PathBuf>,
    #[arg(long)]
    offline: bool,
    #[arg(long)]
    json: bool,
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}").expect("valid template").progress_chars("=> "));
    bar.set_prefix(what.to_string());
    bar
}

fn load(weights: &Path, model: &Option<String>, head: Head, size: Option<usize>, threads: usize, offline: bool) -> Result<Pipeline> {
    let mut options = LoadOptions::new(weights.to_path_buf(), head);
    options.model = model.as_deref().map(Variant::parse).transpose()?;
    options.size = size;
    options.threads = threads;
    options.offline = offline;
    options.progress = true;
    Ok(Pipeline::load(&options)?)
}

/// Features of one split, reused from `dir` when the same backbone saw the same images.
fn cached_features(pipeline: &Pipeline, ds: &Dataset, dir: &Path, split: &str) -> Result<Features> {
    use sha2::Digest;
    let meta = std::fs::metadata(&pipeline.weights_path).with_context(|| pipeline.weights_path.display().to_string())?;
    let mut h = sha2::Sha256::new();
    h.update(format!("{}|{}|{:?}|{:?}|{:?}\n", pipeline.weights_path.display(), meta.len(), meta.modified().ok(), pipeline.preprocess, pipeline.config.name()));
    for s in &ds.samples {
        h.update(format!("{}|{}\n", s.path.display(), s.label));
    }
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let (npy, key_file) = (dir.join(format!("{split}.npy")), dir.join(format!("{split}.key")));
    if std::fs::read_to_string(&key_file).is_ok_and(|k| k.trim() == key) {
        if let Ok((shape, data)) = xception::npy::read_f32(&npy) {
            if shape.len() == 2 && shape[0] == ds.samples.len() {
                return Ok(Features { data, dim: shape[1], labels: ds.samples.iter().map(|s| s.label).collect() });
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let bar = progress(ds.samples.len(), &format!("embed {split}"));
    let f = xception::train::embed(pipeline, ds, 16, &bar)?;
    bar.finish_and_clear();
    xception::npy::write_f32(&npy, &[ds.samples.len(), f.dim], &f.data)?;
    std::fs::write(&key_file, &key).with_context(|| key_file.display().to_string())?;
    Ok(f)
}

/// Rows: true class, columns: predicted; each row shaded by its share (white 0 .. dark blue 1).
fn confusion_png(path: &Path, confusion: &[Vec<usize>]) -> Result<()> {
    let k = confusion.len();
    let cell = (720 / k.max(1)).clamp(4, 48) as u32;
    let mut img = image::RgbImage::from_pixel(cell * k as u32 + 1, cell * k as u32 + 1, image::Rgb([200, 200, 200]));
    for (t, row) in confusion.iter().enumerate() {
        let total = row.iter().sum::<usize>().max(1) as f32;
        for (p, &n) in row.iter().enumerate() {
            let v = n as f32 / total;
            let colour = image::Rgb([(255.0 * (1.0 - v)) as u8, (255.0 * (1.0 - 0.8 * v)) as u8, 255]);
            for y in 1..cell {
                for x in 1..cell {
                    img.put_pixel(p as u32 * cell + x, t as u32 * cell + y, colour);
                }
            }
        }
    }
    Ok(xception::segment::write_png(path, &img)?)
}

/// The optimisation settings: the options given, else the recipe's, else our defaults.
fn head_config(args: &TrainArgs) -> HeadConfig {
    let paper = args.recipe.as_deref() == Some("paper");
    HeadConfig {
        hidden: args.hidden.clone(),
        epochs: args.epochs,
        batch_size: args.batch_size.max(1),
        lr: args.lr.unwrap_or(if paper { 0.045 } else { 1e-3 }),
        weight_decay: args.weight_decay.unwrap_or(if paper { 1e-5 } else { 1e-4 }),
        label_smoothing: args.label_smoothing.unwrap_or(if paper { 0.0 } else { 0.1 }),
        optimizer: match args.optimizer.as_deref().unwrap_or(if paper { "sgd" } else { "adamw" }) {
            "sgd" => OptimizerKind::Sgd { momentum: args.momentum, nesterov: args.nesterov },
            "rmsprop" => OptimizerKind::RmsProp { alpha: args.rms_alpha, momentum: args.momentum, epsilon: args.rms_eps },
            "rmsprop-tf" => OptimizerKind::RmsPropTf { rho: args.rms_alpha, momentum: args.momentum, epsilon: args.rms_eps },
            _ => OptimizerKind::AdamW,
        },
        schedule: match args.schedule.as_deref().unwrap_or(if paper { "step" } else { "cosine" }) {
            "step" => Schedule::StepExp { every: args.decay_every, rate: args.decay_rate },
            "poly" => Schedule::Poly { power: args.poly_power },
            "constant" => Schedule::Constant,
            _ => Schedule::Cosine,
        },
        warmup_epochs: args.warmup_epochs.unwrap_or(if paper { 0 } else { 1 }),
        seed: args.seed,
        keep_checkpoints: 2,
        clip_grad_norm: args.clip_grad_norm,
        ema: args.ema.or(paper.then_some(0.9999)),
    }
}

pub fn train(args: TrainArgs) -> Result<()> {
    let started = std::time::Instant::now();
    if args.task == "segment" {
        return train_segment(&args, started);
    }
    let (train_ds, val_ds) = match data::open(&args.data)? {
        Data::One(ds) => ds.split(args.val_split, args.seed)?,
        Data::Split { train, val } => (train, val),
    };
    let classes = train_ds.classes.len();
    if classes < 2 {
        bail!("{}: found {classes} class; training needs at least two", args.data.display());
    }
    let checkpoints = args.out.join("checkpoints");
    if !args.resume && std::fs::read_dir(&checkpoints).is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} already holds a training run; pass --resume to continue it, or choose another --out", args.out.display());
    }
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let cfg = head_config(&args);
    let whole = args.weights.is_none() || args.freeze.as_deref() == Some("none") || args.unfreeze_top.is_some();
    if args.weights.is_none() && args.freeze.as_deref() == Some("backbone") {
        bail!("--freeze backbone needs --weights (a frozen backbone must come from somewhere)");
    }
    if whole {
        return train_whole(&args, cfg, train_ds, val_ds, started);
    }
    let weights = args.weights.clone().expect("checked above");
    let pipeline = load(&weights, &args.model, Head::Drop, args.size, args.threads, args.offline)?;
    eprintln!(
        "{} images ({} train, {} val), {classes} classes; backbone {} at {}x{}",
        train_ds.samples.len() + val_ds.samples.len(),
        train_ds.samples.len(),
        val_ds.samples.len(),
        pipeline.config.name(),
        pipeline.preprocess.size(),
        pipeline.preprocess.size()
    );
    let features = args.out.join("features");
    let train_f = cached_features(&pipeline, &train_ds, &features, "train")?;
    let val_f = cached_features(&pipeline, &val_ds, &features, "val")?;
    let embed_seconds = started.elapsed().as_secs_f64();

    let bar = progress(0, "train");
    let trained = train_head(&train_f, &val_f, classes, &cfg, &args.out, args.resume, &bar)?;
    bar.finish_and_clear();

    // The final model: the backbone's tensors and the new head, loadable by classify and serve.
    let mut config = ModelConfig::new(pipeline.config.variant);
    config.pooling = pipeline.config.pooling;
    config.custom_head = Some(trained.head_spec.clone());
    let net = Network::build(&config)?;
    let backbone = TensorMap::read(&pipeline.weights_path)?;
    let mut out = TensorMap::new("xception train");
    let head: std::collections::BTreeMap<String, xception::HostTensor> = trained.head_tensors.iter().cloned().collect();
    for spec in net.tensors() {
        let t = head.get(&spec.name).or_else(|| backbone.get(&spec.name)).with_context(|| format!("{}: no tensor '{}'", pipeline.weights_path.display(), spec.name))?;
        out.insert(spec.name.clone(), t.clone());
    }
    let size = pipeline.preprocess.size();
    out.metadata.insert("model".into(), config.variant.name().into());
    out.metadata.insert("head".into(), serde_json::to_string(&trained.head_spec)?);
    out.metadata.insert("pooling".into(), format!("{:?}", config.pooling).to_lowercase());
    out.metadata.insert("input_size".into(), format!("{size},{size}"));
    out.metadata.insert("classes".into(), serde_json::to_string(&train_ds.classes)?);
    out.check(&net)?;
    let final_path = args.out.join("final.safetensors");
    out.write_safetensors(&final_path)?;
    confusion_png(&args.out.join("confusion.png"), &trained.val.confusion)?;

    let best = &trained.history[trained.best_epoch - 1];
    let summary = serde_json::json!({
        "model": final_path.display().to_string(), "backbone": pipeline.config.name(), "weights": weights.display().to_string(),
        "classes": train_ds.classes, "train_images": train_ds.samples.len(), "val_images": val_ds.samples.len(),
        "best_epoch": trained.best_epoch, "epochs": args.epochs,
        "val_top1": trained.val.top1, "val_top5": trained.val.top5,
        "val_per_class": per_class(&train_ds.classes, &trained.val.per_class),
        "train_accuracy_at_best": best.train_accuracy, "embed_seconds": embed_seconds, "seconds": started.elapsed().as_secs_f64(),
    });
    report(&args.out, &summary, args.json, || {
        println!(
            "{}: validation top-1 {:.2}% (epoch {} of {}), top-5 {:.2}%; {:.0} s ({:.0} s embedding)",
            final_path.display(),
            100.0 * trained.val.top1,
            trained.best_epoch,
            args.epochs,
            100.0 * trained.val.top5,
            started.elapsed().as_secs_f64(),
            embed_seconds
        );
        print_per_class(&train_ds.classes, &trained.val.per_class);
    })
}

/// Per-class accuracies by class name, for summary.json.
fn per_class(classes: &[String], values: &[f64]) -> serde_json::Map<String, serde_json::Value> {
    classes.iter().zip(values).map(|(c, a)| (c.clone(), serde_json::Value::from(*a))).collect()
}

fn print_per_class(classes: &[String], values: &[f64]) {
    for (c, a) in classes.iter().zip(values) {
        println!("  {c:<24} {:>6.2}%", 100.0 * a);
    }
}

/// Writes `RUN/summary.json` (atomically, like every file of a run) and prints the summary: as
/// one JSON line with `--json`, else by `human`.
fn report(out: &Path, summary: &serde_json::Value, json: bool, human: impl FnOnce()) -> Result<()> {
    xception::atomic::write(&out.join("summary.json"), serde_json::to_string_pretty(summary)?.as_bytes())?;
    if json {
        println!("{summary}");
    } else {
        human();
    }
    Ok(())
}

/// Mean IoU over a segmentation tree: each image fitted as `segment` fits it, its class map at
/// the mask's size scored against the mask (255 ignored).
fn eval_segment(args: &EvalArgs) -> Result<()> {
    use xception::segdata::Confusion;
    use xception::segment::{fit, label_map, label_map_multiscale};
    let samples = xception::segdata::open(&args.data, &args.split)?;
    let mut options = LoadOptions::new(args.weights.clone(), Head::IfPresent);
    options.model = args.model.as_deref().map(|m| Variant::parse(m.strip_prefix(xception::arch::deeplab::PREFIX).unwrap_or(m))).transpose()?;
    options.output_stride = args.output_stride;
    options.threads = args.threads;
    options.offline = args.offline;
    let pipeline = Pipeline::load(&options)?;
    let seg = pipeline.config.segmentation.clone().with_context(|| format!("{}: {} is not a segmentation model", args.weights.display(), pipeline.config.name()))?;
    let size = args.size.unwrap_or(513);
    let mut confusion = Confusion::new(seg.num_classes);
    let bar = progress(samples.len(), "eval");
    for s in &samples {
        let (img, truth) = s.load()?;
        let (w, h) = (img.width(), img.height());
        let predicted = if args.scales == [1.0] && !args.flip {
            let fitted = fit(&img, size);
            let logits = pipeline.runner.segment(&fitted.data, size, size)?;
            label_map(&logits, fitted.content_h, fitted.content_w, h as usize, w as usize)
        } else {
            label_map_multiscale(&img, size, &args.scales, args.flip, |data, s| pipeline.runner.segment(data, s, s))?
        };
        confusion.add(&truth, &predicted, &s.mask)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let names = pipeline.default_labels();
    let iou = confusion.iou();
    if args.json {
        let per_class: serde_json::Map<String, serde_json::Value> = iou.iter().enumerate().map(|(c, v)| (names.name(c), serde_json::json!(v))).collect();
        let out = serde_json::json!({"images": samples.len(), "miou": confusion.mean_iou(), "pixel_accuracy": confusion.pixel_accuracy(), "per_class_iou": per_class, "output_stride": pipeline.config.output_stride, "input_size": size, "scales": args.scales, "flip": args.flip});
        println!("{out}");
    } else {
        println!("{} images at output stride {}: mean IoU {:.2}%, pixel accuracy {:.2}%", samples.len(), pipeline.config.output_stride, 100.0 * confusion.mean_iou(), 100.0 * confusion.pixel_accuracy());
        for (c, v) in iou.iter().enumerate() {
            match v {
                Some(v) => println!("  {:<24} {:>6.2}%", names.name(c), 100.0 * v),
                None => println!("  {:<24}      -  (absent)", names.name(c)),
            }
        }
    }
    Ok(())
}

pub fn eval(args: EvalArgs) -> Result<()> {
    if args.task == "segment" {
        return eval_segment(&args);
    }
    let ds = match data::open(&args.data)? {
        Data::One(ds) => ds,
        Data::Split { val, .. } => val,
    };
    let pipeline = load(&args.weights, &args.model, Head::Require, args.size, args.threads, args.offline)?;
    let classes = pipeline.config.classes().expect("Head::Require keeps the classifier");
    // The data's class names to the model's indices: by name when the model records names.
    let mapping: Vec<usize> = match &pipeline.class_names {
        Some(names) => ds
            .classes
            .iter()
            .map(|c| names.iter().position(|n| n == c).with_context(|| format!("{}: class '{c}' is not one of the model's {names:?}", args.data.display())))
            .collect::<Result<_>>()?,
        None if ds.classes.len() == classes => (0..classes).collect(),
        None => bail!("{} has {} classes, the model {classes}, and the model records no class names", args.data.display(), ds.classes.len()),
    };
    let bar = progress(ds.samples.len(), "eval");
    let predictions = xception::train::run_dataset(&pipeline, &ds, args.batch_size, &bar)?;
    bar.finish_and_clear();
    let logits: Vec<f32> = predictions.into_iter().flat_map(|p| p.logits.expect("classifier")).collect();
    let labels: Vec<usize> = ds.samples.iter().map(|s| mapping[s.label]).collect();
    let e: Evaluation = evaluate(&logits, &labels, classes);
    let names = pipeline.default_labels();
    if let Some(path) = &args.confusion {
        confusion_png(path, &e.confusion)?;
    }
    if args.json {
        let per_class: serde_json::Map<String, serde_json::Value> = (0..classes).map(|c| (names.name(c), e.per_class[c].into())).collect();
        let out = serde_json::json!({"images": labels.len(), "top1": e.top1, "top5": e.top5, "per_class": per_class, "confusion": e.confusion});
        println!("{out}");
    } else {
        println!("{} images: top-1 {:.2}%, top-5 {:.2}%", labels.len(), 100.0 * e.top1, 100.0 * e.top5);
        for c in 0..classes {
            println!("  {:<24} {:>6.2}%  ({} images)", names.name(c), 100.0 * e.per_class[c], e.confusion[c].iter().sum::<usize>());
        }
    }
    Ok(())
}

/// Training the whole network, or its top blocks, on augmented images (`fit`).
fn train_whole(args: &TrainArgs, cfg: HeadConfig, train_ds: Dataset, val_ds: Dataset, started: std::time::Instant) -> Result<()> {
    use xception::fit::{fit, Augment, Classify, FitConfig};
    use xception::preprocess::Preprocess;
    let classes = train_ds.classes.len();
    if args.freeze.as_deref() == Some("none") && args.unfreeze_top.is_some() {
        bail!("--unfreeze-top K trains the top K stages of a frozen backbone; it contradicts --freeze none");
    }
    let (variant, pretrained, eval) = match &args.weights {
        Some(w) => {
            let pipeline = load(w, &args.model, Head::Drop, args.size, args.threads, args.offline)?;
            (pipeline.config.variant, Some(TensorMap::read(&pipeline.weights_path)?), pipeline.preprocess)
        }
        None => {
            let name = args.model.as_deref().context("training from scratch needs --model (e.g. --model xception_tiny)")?;
            let v = Variant::parse(name)?;
            let size = args.size.unwrap_or(if v == Variant::XceptionTiny { 64 } else { 299 });
            (v, None, Preprocess::default_for(v, size))
        }
    };
    let paper = args.recipe.as_deref() == Some("paper");
    let dropout = args.dropout.unwrap_or(if paper { 0.5 } else { 0.0 });
    let mut config = ModelConfig::new(variant);
    config.num_classes = classes;
    config.drop_rate = dropout;
    let net = Network::build(&config)?;
    let init = starting_weights(&net, pretrained.as_ref(), args.seed)?;
    let stages = 1 + net.blocks.len();
    let frozen_stages = match (args.weights.is_some(), args.unfreeze_top) {
        (true, Some(k)) => stages.saturating_sub(k),
        _ => 0,
    };
    let crop_scale = match args.crop_scale.as_str() {
        "none" => None,
        s => match parse_range(s, "--crop-scale")? {
            (_, b) if b > 1.0 => bail!("--crop-scale '{s}': the area fraction cannot exceed 1"),
            range => Some(range),
        },
    };
    let augment = Augment { crop_scale, hflip: !args.no_flip, ..Augment::default() };
    let fit_cfg = FitConfig {
        opt: cfg,
        dropout,
        frozen_stages,
        backbone_lr_scale: args.backbone_lr_scale,
        checkpoint_every: args.checkpoint_every,
        max_steps: args.max_steps,
    };
    let size = eval.size();
    eprintln!(
        "{} images ({} train, {} val), {classes} classes; {} at {size}x{size} {}, {} of {stages} stages trained",
        train_ds.samples.len() + val_ds.samples.len(),
        train_ds.samples.len(),
        val_ds.samples.len(),
        variant,
        if pretrained.is_some() { "from the given weights" } else { "from scratch" },
        stages - frozen_stages
    );
    let bar = progress(0, "train");
    let task = std::sync::Arc::new(Classify { train: train_ds.clone(), val: val_ds.clone(), eval, augment });
    let fitted = fit(&net, &init, task, &fit_cfg, &args.out, args.resume, args.threads, &bar)?;
    bar.finish_and_clear();
    let fitted_val = &fitted.val.eval;

    let mut out = fitted.weights.clone();
    out.source = "xception train".into();
    out.metadata.insert("model".into(), variant.name().into());
    out.metadata.insert("input_size".into(), format!("{size},{size}"));
    out.metadata.insert("classes".into(), serde_json::to_string(&train_ds.classes)?);
    out.check(&net)?;
    let final_path = args.out.join("final.safetensors");
    out.write_safetensors(&final_path)?;
    confusion_png(&args.out.join("confusion.png"), &fitted_val.confusion)?;
    crate::plot::curves(&args.out.join("curves.png"), &fitted.history)?;
    let summary = serde_json::json!({
        "model": final_path.display().to_string(), "variant": variant.name(), "weights": args.weights.as_ref().map(|w| w.display().to_string()),
        "classes": train_ds.classes, "train_images": train_ds.samples.len(), "val_images": val_ds.samples.len(),
        "input_size": size, "trained_stages": stages - frozen_stages, "stages": stages, "steps": fitted.steps,
        "best_epoch": fitted.best_epoch, "epochs": args.epochs, "val_top1": fitted_val.top1, "val_top5": fitted_val.top5,
        "val_per_class": per_class(&train_ds.classes, &fitted_val.per_class),
        "seconds": started.elapsed().as_secs_f64(),
    });
    report(&args.out, &summary, args.json, || {
        println!(
            "{}: validation top-1 {:.2}% (epoch {} of {}), top-5 {:.2}%; {:.0} s",
            final_path.display(),
            100.0 * fitted_val.top1,
            fitted.best_epoch,
            args.epochs,
            100.0 * fitted_val.top5,
            started.elapsed().as_secs_f64()
        );
        print_per_class(&train_ds.classes, &fitted_val.per_class);
    })
}

/// Fresh weights for `net` (timm's initialisation, seeded), with every backbone tensor taken from
/// `pretrained` when given (the classifier and a segmentation head always start fresh).
fn starting_weights(net: &Network, pretrained: Option<&TensorMap>, seed: u64) -> Result<TensorMap> {
    let mut init = xception::fit::init_weights(net, seed);
    let Some(p) = pretrained else { return Ok(init) };
    let fresh: Vec<String> = net.head.iter().map(|h| format!("{}.", h.key)).chain(["aspp.", "decoder.", "logits."].map(String::from)).collect();
    for spec in net.tensors().into_iter().filter(|t| !fresh.iter().any(|k| t.name.starts_with(k))) {
        let t = p.get(&spec.name).with_context(|| format!("{}: no tensor '{}' for {}", p.source, spec.name, net.config.name()))?;
        if t.shape != spec.shape {
            bail!("{}: tensor '{}' has shape {:?}, {} expects {:?}", p.source, spec.name, t.shape, net.config.name(), spec.shape);
        }
        init.insert(spec.name.clone(), t.clone());
    }
    Ok(init)
}

fn parse_range(s: &str, what: &str) -> Result<(f64, f64)> {
    let v: Vec<f64> = s.split(',').map(|x| x.trim().parse::<f64>()).collect::<std::result::Result<_, _>>().with_context(|| format!("{what} '{s}': expected min,max"))?;
    match v[..] {
        [a, b] if 0.0 < a && a <= b => Ok((a, b)),
        _ => bail!("{what} '{s}': expected min,max with 0 < min <= max"),
    }
}

/// DeepLabv3+ training on a VOC or Cityscapes-style tree.
fn train_segment(args: &TrainArgs, started: std::time::Instant) -> Result<()> {
    use xception::fit::{fit, FitConfig, Segment};
    let name = args.model.as_deref().context("segmentation training needs --model (e.g. deeplabv3plus_xception65)")?;
    let backbone = Variant::parse(name.strip_prefix(xception::arch::deeplab::PREFIX).unwrap_or(name))?;
    let config = xception::arch::Segmentation::config(backbone, args.num_classes, args.output_stride)?;
    let net = Network::build(&config)?;
    let train = xception::segdata::open(&args.data, "train")?;
    let val = xception::segdata::open(&args.data, "val")?;
    if train.is_empty() || val.is_empty() {
        bail!("{}: segmentation training needs images in both its train and val lists", args.data.display());
    }
    let checkpoints = args.out.join("checkpoints");
    if !args.resume && std::fs::read_dir(&checkpoints).is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} already holds a training run; pass --resume to continue it, or choose another --out", args.out.display());
    }
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let pretrained = match &args.weights {
        Some(w) => {
            let pipeline = load(w, &Some(backbone.name().to_string()), Head::Drop, None, args.threads, args.offline)?;
            Some(TensorMap::read(&pipeline.weights_path)?)
        }
        None => None,
    };
    let init = starting_weights(&net, pretrained.as_ref(), args.seed)?;
    let mut opt = head_config(args);
    // DeepLab's recipe where the user said nothing: momentum SGD, poly decay.
    if args.optimizer.is_none() && args.recipe.is_none() {
        opt.optimizer = OptimizerKind::Sgd { momentum: args.momentum, nesterov: args.nesterov };
    }
    if args.schedule.is_none() && args.recipe.is_none() {
        opt.schedule = Schedule::Poly { power: args.poly_power };
    }
    if args.lr.is_none() && args.recipe.is_none() {
        opt.lr = 0.007;
    }
    if args.label_smoothing.is_none() {
        opt.label_smoothing = 0.0;
    }
    let fit_cfg = FitConfig {
        opt,
        dropout: 0.0,
        frozen_stages: 0,
        backbone_lr_scale: args.backbone_lr_scale,
        checkpoint_every: args.checkpoint_every,
        max_steps: args.max_steps,
    };
    let task = std::sync::Arc::new(Segment {
        train: train.clone(),
        val: val.clone(),
        crop: args.crop,
        scale: parse_range(&args.scale_range, "--scale-range")?,
        hflip: !args.no_flip,
        eval_size: args.eval_size,
        eval_output_stride: args.eval_output_stride,
        classes: args.num_classes,
    });
    eprintln!(
        "{} training and {} validation images, {} classes; {} at OS {} on {}x{} crops {}, validated at OS {}",
        train.len(),
        val.len(),
        args.num_classes,
        config.name(),
        args.output_stride,
        args.crop,
        args.crop,
        if pretrained.is_some() { "from the given backbone" } else { "from scratch" },
        args.eval_output_stride
    );
    let bar = progress(0, "train");
    let fitted = fit(&net, &init, task, &fit_cfg, &args.out, args.resume, args.threads, &bar)?;
    bar.finish_and_clear();
    let mut out = fitted.weights.clone();
    out.source = "xception train".into();
    out.metadata.insert("model".into(), config.name());
    out.check(&net)?;
    let final_path = args.out.join("final.safetensors");
    out.write_safetensors(&final_path)?;
    crate::plot::curves(&args.out.join("curves.png"), &fitted.history)?;
    let miou = fitted.val.miou.unwrap_or(0.0);
    let summary = serde_json::json!({
        "model": final_path.display().to_string(), "network": config.name(), "weights": args.weights.as_ref().map(|w| w.display().to_string()),
        "train_images": train.len(), "val_images": val.len(), "classes": args.num_classes, "crop": args.crop,
        "output_stride": args.output_stride, "eval_output_stride": args.eval_output_stride, "steps": fitted.steps,
        "best_epoch": fitted.best_epoch, "epochs": args.epochs, "val_miou": miou, "val_pixel_accuracy": fitted.val.eval.top1,
        "val_per_class_iou": fitted.val.eval.per_class.iter().map(|v| if v.is_nan() { serde_json::Value::Null } else { serde_json::json!(v) }).collect::<Vec<_>>(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    report(&args.out, &summary, args.json, || {
        println!("{}: validation mean IoU {:.2}% at OS {} (epoch {} of {}), pixel accuracy {:.2}%; {:.0} s", final_path.display(), 100.0 * miou, args.eval_output_stride, fitted.best_epoch, args.epochs, 100.0 * fitted.val.eval.top1, started.elapsed().as_secs_f64());
    })
}
