//! `xception`: classify and embed images, inspect and convert models.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use xception::arch::{ModelConfig, Network, Pooling, Variant};
use xception::pipeline::{preprocessing, ClassifyOutput, Head, LoadOptions, Pipeline, PreprocessKind};
use xception::preprocess::{load_items, Resize};
use xception::{zoo, Backend, Labels, Runner, TensorMap};

#[derive(Parser)]
#[command(name = "xception", version, about = "Xception and the aligned Xception family, exact against Keras and timm")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Top-k classes for each image (or preprocessed .npy array).
    Classify(ClassifyArgs),
    /// Pooled embeddings of the inputs, written as an (N, C) float32 .npy file.
    Embed(EmbedArgs),
    /// Per-stage output shapes, parameter and multiply-add counts of a model.
    Info(InfoArgs),
    /// Converts timm (.safetensors, .pth) and Keras (.keras, .weights.h5) weights to our canonical safetensors.
    Convert(ConvertArgs),
    /// Writes the inputs exactly as the network would see them: an (N, H, W, 3) float32 .npy.
    Preprocess(PreprocessArgs),
    /// Times inference: median latency, images/s, GFLOP/s and the fraction of this CPU's peak.
    Bench(BenchArgs),
    /// Semantic segmentation (DeepLabv3+): a palette mask PNG and an overlay PNG per image.
    Segment(SegmentArgs),
    /// Transfer learning: a new classifier head on a frozen backbone, trained on your images.
    Train(TrainArgs),
    /// Top-1/top-5 and per-class accuracy of a classifier on a labelled image set.
    Eval(EvalArgs),
    /// Writes a seeded synthetic segmentation set in the PASCAL VOC layout (shapes on textures).
    SynthVoc {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 200)]
        count: usize,
        #[arg(long, default_value_t = 129)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Serves models over HTTP: classify, embed, models, health, readiness, metrics.
    Serve(ServeArgs),
    /// Lists the named pretrained weights, their checksums and whether they are cached.
    Zoo {
        #[arg(long)]
        json: bool,
    },
}

mod plot;
mod train;
use train::{EvalArgs, TrainArgs};

/// Large allocations (activations, bands) start on a cache line (see `xception::engine::align`).
#[global_allocator]
static ALLOCATOR: xception::engine::align::LineAligned = xception::engine::align::LineAligned;

#[derive(Args)]
struct SegmentArgs {
    /// DeepLabv3+ weights (our safetensors, or a PyTorch state dict with timm backbone names).
    #[arg(long)]
    weights: PathBuf,
    /// Model (deeplabv3plus_xception41/65/71); read from the weights when omitted.
    #[arg(long)]
    model: Option<String>,
    /// Output stride: 16, or 8 (finer, about 3x the compute). ASPP rates follow it.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(8..=16))]
    output_stride: u16,
    /// Network input size: images are shrunk so their long side fits, then padded (DeepLab's
    /// crops are 16k+1: 513, 769, 1025).
    #[arg(long, default_value_t = 513)]
    size: usize,
    /// Directory for <name>.mask.png (palette PNG, pixel = class) and <name>.overlay.png.
    #[arg(long)]
    out: PathBuf,
    /// Class names: `voc` or a file with one label per line (default: voc for 21 classes).
    #[arg(long)]
    labels: Option<String>,
    /// Opacity of the class colours in the overlay.
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
    /// Print per-image class fractions as one JSON object.
    #[arg(long)]
    json: bool,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// engine: the fused CPU engine; burn: burn modules (CPU flex, or CUDA in a `cuda` build).
    #[arg(long, default_value = DEFAULT_BACKEND, value_parser = ["engine", "burn"])]
    backend: String,
    /// The engine's arithmetic (see `classify --precision`).
    #[arg(long, default_value = "f32", value_parser = PRECISIONS)]
    precision: String,
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with the address, limits and [[model]] entries (see the README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (port 0: any free port); default 127.0.0.1:8080.
    #[arg(long)]
    addr: Option<String>,
    /// Weights of one model to serve (besides any in --config); named weights work too.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Its variant (read from the weight file when omitted).
    #[arg(long)]
    model: Option<String>,
    /// The name requests use for it (`?model=`); default: the variant's.
    #[arg(long)]
    name: Option<String>,
    /// Class names: `imagenet` or a file with one label per line.
    #[arg(long)]
    labels: Option<String>,
    #[arg(long)]
    size: Option<usize>,
    #[arg(long, value_parser = ["keras", "timm"])]
    preprocess: Option<String>,
    #[arg(long, value_parser = ["nearest", "bilinear", "bicubic"])]
    resize: Option<String>,
    /// Output stride (default: the model's, 32 for classifiers and 16 for DeepLabv3+).
    #[arg(long)]
    output_stride: Option<usize>,
    /// Engine threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The engine's arithmetic (see `classify --precision`).
    #[arg(long, value_parser = PRECISIONS)]
    precision: Option<String>,
    /// Most requests batched into one forward pass (1: no batching).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// How long a batch waits to fill, in milliseconds.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Requests that may wait for inference; beyond it new ones get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Largest request body in bytes.
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Largest image, in pixels, a request may declare.
    #[arg(long)]
    max_pixels: Option<u64>,
    #[arg(long)]
    decode_timeout_ms: Option<u64>,
    #[arg(long)]
    inference_timeout_ms: Option<u64>,
    /// File holding the bearer token required on /v1/* (or set XCEPTION_SERVE_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Never download named weights.
    #[arg(long)]
    offline: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value = "xception")]
    model: String,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value_t = 299)]
    input_size: usize,
    #[arg(long, default_value_t = 32)]
    output_stride: usize,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value = DEFAULT_BACKEND, value_parser = ["engine", "burn"])]
    backend: String,
    /// The engine's arithmetic (see `classify --precision`).
    #[arg(long, default_value = "f32", value_parser = PRECISIONS)]
    precision: String,
    /// Time the engine's depthwise and pointwise kernels alone at the entry, middle and exit
    /// flow shapes instead of the whole network.
    #[arg(long)]
    ops: bool,
    /// Time each step inside whole engine passes (batch 1 only) and report the time, GFLOP/s and
    /// fraction of the peak per layer type (separable convs, dense convs, pools, ...), with each
    /// type's arithmetic intensity (FLOP per byte of compulsory traffic) and the fraction of its
    /// roofline bound it reaches: min(peak, intensity x measured memory bandwidth) (bf16: the
    /// memory roof alone), or the bandwidth for types without arithmetic (over 100% where their
    /// data stays in cache).
    #[arg(long, conflicts_with_all = ["ops", "train"])]
    layers: bool,
    /// Time training steps (forward, backward, SGD update through burn's autodiff in the CPU
    /// training layout) instead of inference.
    #[arg(long)]
    train: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PreprocessArgs {
    /// Model whose reference preprocessing to apply.
    #[arg(long, default_value = "xception")]
    model: String,
    #[arg(long, default_value_t = 299)]
    size: usize,
    #[arg(long, value_parser = ["nearest", "bilinear", "bicubic"])]
    resize: Option<String>,
    #[arg(long, value_parser = ["keras", "timm"])]
    preprocess: Option<String>,
    #[arg(long)]
    out: PathBuf,
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    /// Model name (xception, legacy_xception, xception41, xception65, xception71, xception41p,
    /// xception65p). Read from the weight file when omitted.
    #[arg(long)]
    model: Option<String>,
    /// Weight file (our safetensors, timm .safetensors or .pth, Keras .keras or .h5) or named
    /// weights: `imagenet` (the model's default) or a registry name (`xception zoo` lists them),
    /// downloaded once into the cache.
    #[arg(long)]
    weights: PathBuf,
    /// Never download: use only cached named weights (also XCEPTION_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Output stride (aligned family: 32, 16 or 8).
    #[arg(long, default_value_t = 32)]
    output_stride: usize,
    /// Input size the images are resized/cropped to (default: the size a Keras model was built
    /// for, else 299).
    #[arg(long)]
    size: Option<usize>,
    /// Resampling filter (default: the reference's, nearest for Keras, bicubic for timm).
    #[arg(long, value_parser = ["nearest", "bilinear", "bicubic"])]
    resize: Option<String>,
    /// Preprocessing pipeline (default: the reference's for the model).
    #[arg(long, value_parser = ["keras", "timm"])]
    preprocess: Option<String>,
    /// Inputs run together in one forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// engine: the fused CPU engine; burn: burn modules (CPU flex, or CUDA in a `cuda` build).
    #[arg(long, default_value = DEFAULT_BACKEND, value_parser = ["engine", "burn"])]
    backend: String,
    /// CPU threads for the engine (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The engine's arithmetic: f32; bf16 (the convs' products with bf16 operands and fp32 sums:
    /// faster, ~3 significant digits; needs AMX tiles (Intel Xeon 4th gen.) or AVX512-BF16 (AMD
    /// Zen 4)); or bf16x3 (each fp32 operand as two bf16 values, three tile products: ~5
    /// significant digits; needs AMX); or
    /// int8 (the 1x1 convs' products on 8-bit operands, each weight column and activation row
    /// scaled on its own, exact integer sums: ~2 significant digits; needs AVX2, fastest with
    /// AMX, then AVX-512 VNNI or AVX-VNNI).
    #[arg(long, default_value = "f32", value_parser = PRECISIONS)]
    precision: String,
    /// Images (JPEG, PNG, WebP) or float32 .npy arrays (N,H,W,3), already preprocessed.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

#[cfg(feature = "cuda")]
const DEFAULT_BACKEND: &str = "burn";
#[cfg(not(feature = "cuda"))]
const DEFAULT_BACKEND: &str = "engine";

#[derive(Args)]
struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Number of classes to show per input.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Class names: `imagenet`, `voc` or a file with one label per line (default: the names the
    /// weight file records, else ImageNet's for 1000 classes).
    #[arg(long)]
    labels: Option<String>,
    /// Print one JSON object (with all logits) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output .npy file.
    #[arg(long)]
    out: PathBuf,
    /// Global pooling of the final feature map (default: the model's, else avg).
    #[arg(long, value_parser = ["avg", "max"])]
    pooling: Option<String>,
}

#[derive(Args)]
struct InfoArgs {
    #[arg(long)]
    model: String,
    #[arg(long, default_value_t = 299)]
    input_size: usize,
    #[arg(long, default_value_t = 32)]
    output_stride: usize,
    /// Classes (default: 1000 for classifiers, 21 for DeepLabv3+).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Without the classifier.
    #[arg(long)]
    no_top: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// timm (.safetensors, .pth), Keras (.keras, .h5) or TensorFlow checkpoint (prefix or .index) weights
    input: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Model the weights belong to (detected from the tensor names when omitted).
    #[arg(long)]
    model: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 0,
                _ => 1,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Classify(a) => classify(a),
        Command::Embed(a) => embed(a),
        Command::Info(a) => info(a),
        Command::Convert(a) => convert(a),
        Command::Preprocess(a) => preprocess(a),
        Command::Zoo { json } => list_zoo(json),
        Command::Bench(a) => bench(a),
        Command::Serve(a) => serve(a),
        Command::Segment(a) => segment(a),
        Command::Train(a) => train::train(a),
        Command::SynthVoc { out, count, size, seed } => xception::segdata::synthetic_voc(&out, count, size, seed)
            .map(|()| eprintln!("{}: {count} images ({size}x{size}), classes {:?}", out.display(), xception::segdata::SYNTHETIC_CLASSES))
            .map_err(Into::into),
        Command::Eval(a) => train::eval(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn parse_variant(name: &Option<String>) -> Result<Option<Variant>> {
    Ok(name.as_deref().map(Variant::parse).transpose()?)
}

/// Parses the `--preprocess` / `--resize` flags.
fn preprocess_flags(mode: Option<&str>, resize: Option<&str>) -> Result<(Option<PreprocessKind>, Option<Resize>)> {
    Ok((mode.map(PreprocessKind::parse).transpose()?, resize.map(Resize::parse).transpose()?))
}

fn preprocess(args: PreprocessArgs) -> Result<()> {
    let (kind, resize) = preprocess_flags(args.preprocess.as_deref(), args.resize.as_deref())?;
    let p = preprocessing(args.size, kind, resize, Variant::parse(&args.model)?);
    let items = load_items(&args.inputs, &p)?;
    let (h, w) = (items[0].height, items[0].width);
    if let Some(odd) = items.iter().find(|i| (i.height, i.width) != (h, w)) {
        bail!("{}: {}x{} differs from the first input's {h}x{w}", odd.name, odd.height, odd.width);
    }
    let data: Vec<f32> = items.iter().flat_map(|i| i.data.iter().copied()).collect();
    xception::npy::write_f32(&args.out, &[items.len(), h, w, 3], &data)?;
    eprintln!("{}: {} x {h} x {w} x 3", args.out.display(), items.len());
    Ok(())
}

impl ModelArgs {
    fn load_options(&self, head: Head, pooling: Option<Pooling>) -> Result<LoadOptions> {
        let (preprocess, resize) = preprocess_flags(self.preprocess.as_deref(), self.resize.as_deref())?;
        Ok(LoadOptions {
            model: parse_variant(&self.model)?,
            weights: self.weights.clone(),
            offline: self.offline,
            progress: true,
            output_stride: Some(self.output_stride),
            size: self.size,
            resize,
            preprocess,
            backend: Backend::parse(&self.backend)?,
            threads: self.threads,
            precision: parse_precision(&self.precision),
            head,
            pooling,
        })
    }
}

/// Loads weights, builds the model they fit, runs every input.
fn run_model(args: &ModelArgs, head: Head, pooling: Option<Pooling>) -> Result<(Pipeline, Vec<xception::Prediction>)> {
    let pipeline = Pipeline::load(&args.load_options(head, pooling)?)?;
    let items = load_items(&args.inputs, &pipeline.preprocess)?;
    let predictions = pipeline.predict(&items, args.batch_size)?;
    Ok((pipeline, predictions))
}

fn classify(args: ClassifyArgs) -> Result<()> {
    let (pipeline, predictions) = run_model(&args.model, Head::Require, None)?;
    let labels = match args.labels.as_deref() {
        Some("imagenet") => Labels::imagenet(),
        Some("voc") => Labels::voc(),
        Some(file) => Labels::from_file(&PathBuf::from(file))?,
        None => pipeline.default_labels(),
    };
    let results = pipeline.classify(predictions, &labels, args.top)?;
    if args.json {
        let out = ClassifyOutput {
            model: pipeline.config.variant.name().into(),
            weights: args.model.weights.display().to_string(),
            results,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for r in &results {
            println!("{}", r.input);
            for (rank, t) in r.top.iter().enumerate() {
                println!("  {:>2}. {:>6.2}%  {} ({})", rank + 1, 100.0 * t.probability, t.label, t.index);
            }
        }
    }
    Ok(())
}

fn embed(args: EmbedArgs) -> Result<()> {
    let pooling = args.pooling.as_deref().map(Pooling::parse).transpose()?;
    let (pipeline, predictions) = run_model(&args.model, Head::Drop, pooling)?;
    let config = &pipeline.config;
    let n = predictions.len();
    let c = predictions.first().map(|p| p.pooled.len()).unwrap_or(0);
    let data: Vec<f32> = predictions.iter().flat_map(|p| p.pooled.iter().copied()).collect();
    xception::npy::write_f32(&args.out, &[n, c], &data)?;
    eprintln!("{}: {n} x {c} {} embeddings ({:?} pooling)", args.out.display(), config.variant, config.pooling);
    Ok(())
}

fn info(args: InfoArgs) -> Result<()> {
    let mut config = ModelConfig::from_name(&args.model)?;
    config.output_stride = args.output_stride;
    match &mut config.segmentation {
        Some(seg) => seg.num_classes = args.num_classes.unwrap_or(seg.num_classes),
        None => {
            config.num_classes = args.num_classes.unwrap_or(config.num_classes);
            config.include_top = !args.no_top;
        }
    }
    let net = Network::build(&config)?;
    net.check_input_size(args.input_size, args.input_size)?;
    let info = net.info(args.input_size, args.input_size)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let s = args.input_size;
    println!("{} at {s}x{s}, output stride {}\n", info.model, info.output_stride);
    let width = info.stages.iter().map(|s| s.name.len()).max().unwrap_or(5).max(12);
    println!("{:<width$} {:>16} {:>7} {:>9} {:>12} {:>16}", "stage", "output (HxWxC)", "stride", "dilation", "params", "multiply-adds");
    for st in &info.stages {
        let shape = st.output.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        println!("{:<width$} {:>16} {:>7} {:>9} {:>12} {:>16}", st.name, shape, st.stride, st.dilation, group(st.params as u64), group(st.macs));
    }
    println!();
    println!("parameters      {:>16}", group(info.params_total as u64));
    println!("  trainable     {:>16}", group(info.params_trainable as u64));
    println!("  non-trainable {:>16}", group(info.params_non_trainable as u64));
    println!("multiply-adds   {:>16}  ({:.3} G)", group(info.macs), info.macs as f64 / 1e9);
    println!("\nfeature taps (timm feature_info):");
    for f in &info.features {
        println!("  stride {:>2}  {:>4} x {:>3} x {:>3}  {}", f.reduction, f.shape[0], f.shape[1], f.shape[2], f.module);
    }
    Ok(())
}

/// The nominal CPU clock in GHz as the kernel reports it (mean over cores of /proc/cpuinfo `cpu MHz`).
fn cpu_ghz() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("cpu MHz"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse().ok())
        .collect();
    (!mhz.is_empty()).then(|| mhz.iter().sum::<f64>() / mhz.len() as f64 / 1000.0)
}

/// fp32 flops per cycle per core: 2 FMA units x lanes (16 with AVX-512, 8 with AVX2) x 2.
/// fp32 flops per cycle per core at the engine's vector width: 2 FMA units x 16 (AVX-512) or 8
/// lanes x 2.
fn flops_per_cycle() -> f64 {
    if xception::engine::simd_kernels() == "avx512" {
        64.0
    } else {
        32.0
    }
}

/// The names `--precision` takes (`Precision::parse`).
const PRECISIONS: [&str; 4] = ["f32", "bf16", "bf16x3", "int8"];

/// `--precision`, already restricted by clap to the names `Precision::parse` knows.
fn parse_precision(s: &str) -> xception::Precision {
    xception::Precision::parse(s).expect("clap allows only the PRECISIONS")
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Which of the engine's kernels a bench runs (the burn backend has its own).
fn kernels_name(args: &BenchArgs) -> &'static str {
    match (args.train, args.backend.as_str(), args.precision.as_str()) {
        (false, "engine", "bf16") => xception::engine::bf16_kernels().unwrap_or("none"),
        (false, "engine", "bf16x3") => "amx-bf16x3",
        (false, "engine", "int8") => xception::engine::int8_kernels().unwrap_or("none"),
        (false, "engine", _) => xception::engine::simd_kernels(),
        _ => "burn",
    }
}

/// `bench --layers`: engine passes at batch 1 with every step timed; the pass of median time is
/// reported, its steps summed per layer type (so the types add up to that pass). "other" is the
/// pass's time outside the timed steps (input copy, thread hand-overs).
fn bench_layers(args: &BenchArgs, net: &Network) -> Result<()> {
    if args.backend != "engine" {
        bail!("bench --layers times the engine's steps: use --backend engine");
    }
    if args.batch != 1 {
        // A batch runs as concurrent image streams, whose steps would interleave in the trace.
        bail!("bench --layers times batch 1 (got --batch {})", args.batch);
    }
    let threads = xception::engine::resolve_threads(args.threads);
    let weights = xception::weights::deterministic(net);
    let engine = xception::Engine::with_precision(net, &weights, threads, parse_precision(&args.precision))?;
    drop(weights);
    let s = args.input_size;
    let input = vec![0.1f32; s * s * 3];
    engine.forward_traced(&input, 1, s, s)?; // warm-up
    let mut passes = Vec::new();
    let mut steps: Vec<Vec<xception::engine::StepTime>> = Vec::new();
    for _ in 0..args.runs.max(1) {
        let t = std::time::Instant::now();
        let (_, trace) = engine.forward_traced(&input, 1, s, s)?;
        passes.push(t.elapsed().as_secs_f64());
        steps.push(trace);
    }
    // The median pass, whole: per-step medians taken across passes would not add up to a pass.
    let mut order: Vec<usize> = (0..passes.len()).collect();
    order.sort_by(|&a, &b| passes[a].total_cmp(&passes[b]));
    let median = order[order.len() / 2];
    let pass = passes[median];
    // Per layer type, in the order the types first appear: (steps, seconds, multiply-adds, bytes).
    let mut kinds: Vec<(&str, usize, f64, u64, u64)> = Vec::new();
    for step in &steps[median] {
        match kinds.iter_mut().find(|k| k.0 == step.kind) {
            Some(k) => {
                k.1 += 1;
                k.2 += step.seconds;
                k.3 += step.macs;
                k.4 += step.bytes;
            }
            None => kinds.push((step.kind, 1, step.seconds, step.macs, step.bytes)),
        }
    }
    let timed: f64 = kinds.iter().map(|k| k.2).sum();
    kinds.push(("other", 0, (pass - timed).max(0.0), 0, 0));
    let peak = xception::engine::measured_peak_gflops(threads);
    let bandwidth = xception::engine::measured_bandwidth_gbs(threads);
    // The roofline: a layer type can at most run at its arithmetic intensity (FLOP per byte of
    // compulsory traffic) times the memory bandwidth, or at the peak; one without arithmetic
    // (pools, adds) at the bandwidth. "of bound" is the fraction of that it reaches. The peak is
    // fp32's: bf16 products run on AMX tiles or VDPBF16PS and int8 ones on integer instructions, whose peaks
    // are not measured, so there the bound is the memory roof alone.
    let compute_roof = if parse_precision(&args.precision) == xception::Precision::F32 { peak } else { f64::INFINITY };
    let rows: Vec<serde_json::Value> = kinds
        .iter()
        .map(|&(kind, n, seconds, macs, bytes)| {
            let gflops = 2.0 * macs as f64 / seconds / 1e9;
            let gbs = bytes as f64 / seconds / 1e9;
            let intensity = (macs > 0 && bytes > 0).then(|| 2.0 * macs as f64 / bytes as f64);
            let bound_fraction = match intensity {
                Some(i) => Some(gflops / (i * bandwidth).min(compute_roof)),
                None => (bytes > 0).then_some(gbs / bandwidth),
            };
            serde_json::json!({"kind": kind, "steps": n, "ms": seconds * 1e3, "share": seconds / pass,
                "gflops": (macs > 0).then_some(gflops), "peak_fraction": (macs > 0).then_some(gflops / peak),
                "bytes": bytes, "gb_per_s": (bytes > 0).then_some(gbs), "flop_per_byte": intensity, "bound_fraction": bound_fraction})
        })
        .collect();
    let kernels = kernels_name(args);
    if args.json {
        let out = serde_json::json!({"model": args.model, "batch": 1, "threads": threads, "input_size": s, "precision": args.precision,
            "kernels": kernels, "runs": steps.len(), "median_ms": pass * 1e3, "peak_gflops": peak, "bandwidth_gbs": bandwidth, "layers": rows});
        println!("{out}");
        return Ok(());
    }
    println!("{} at {s}x{s}, batch 1, {threads} threads ({}, {kernels}): median pass {:.1} ms; fp32 peak {peak:.1} GFLOP/s, memory {bandwidth:.1} GB/s", args.model, args.precision, pass * 1e3);
    println!("{:<26} {:>5} {:>9} {:>6} {:>9} {:>8} {:>7} {:>7} {:>8}", "layer type", "steps", "ms", "share", "GFLOP/s", "of peak", "FLOP/B", "GB/s", "of bound");
    let cell = |v: &serde_json::Value, f: &dyn Fn(f64) -> String| v.as_f64().map_or("-".to_string(), f);
    for r in &rows {
        let gflops = cell(&r["gflops"], &|v| format!("{v:.1}"));
        let of_peak = cell(&r["peak_fraction"], &|v| format!("{:.0}%", 100.0 * v));
        let intensity = cell(&r["flop_per_byte"], &|v| format!("{v:.0}"));
        let gbs = cell(&r["gb_per_s"], &|v| format!("{v:.1}"));
        let of_bound = cell(&r["bound_fraction"], &|v| format!("{:.0}%", 100.0 * v));
        let share = 100.0 * r["share"].as_f64().unwrap_or(0.0);
        println!(
            "{:<26} {:>5} {:>9.2} {share:>5.1}% {gflops:>9} {of_peak:>8} {intensity:>7} {gbs:>7} {of_bound:>8}",
            r["kind"].as_str().unwrap_or(""),
            r["steps"].as_u64().unwrap_or(0),
            r["ms"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.ops {
        let threads = xception::engine::resolve_threads(args.threads);
        let peak = Some(xception::engine::measured_peak_gflops(threads));
        let rows: Vec<serde_json::Value> = xception::engine::bench_ops(threads, args.runs, parse_precision(&args.precision))?
            .into_iter()
            .map(|t| {
                serde_json::json!({"op": t.op, "flow": t.flow, "shape": [t.shape.0, t.shape.1, t.shape.2, t.shape.3],
                    "ms": t.seconds * 1e3, "gflops": t.gflops, "peak_fraction": peak.map(|p| t.gflops / p)})
            })
            .collect();
        if args.json {
            println!("{}", serde_json::Value::from(rows));
        } else {
            for r in rows {
                println!("{:<14} {:<7} {:>20} {:>8.3} ms {:>6.1} GFLOP/s", r["op"].as_str().unwrap(), r["flow"].as_str().unwrap(), r["shape"].to_string(), r["ms"].as_f64().unwrap(), r["gflops"].as_f64().unwrap());
            }
        }
        return Ok(());
    }
    let mut config = ModelConfig::from_name(&args.model)?;
    config.output_stride = args.output_stride;
    let net = Network::build(&config)?;
    if args.layers {
        return bench_layers(&args, &net);
    }
    let s = args.input_size;
    let info = net.info(s, s)?;
    // Timing does not depend on the values: deterministic weights, a constant input.
    let threads = xception::engine::resolve_threads(args.threads);
    let mut times = if args.train {
        // A training step costs about three forward passes (forward, input and weight gradients).
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        pool.install(|| xception::fit::bench_steps(&net, args.batch, s, args.runs.max(1)))?
    } else {
        let weights = xception::weights::deterministic(&net);
        let runner = Runner::with_precision(Backend::parse(&args.backend)?, net, &weights, threads, parse_precision(&args.precision))?;
        drop(weights);
        let item = xception::Item { name: "bench".into(), height: s, width: s, data: vec![0.1; s * s * 3] };
        let items = vec![item; args.batch];
        runner.predict(&items, args.batch)?; // warm-up
        let mut times = Vec::new();
        for _ in 0..args.runs.max(1) {
            let t = std::time::Instant::now();
            runner.predict(&items, args.batch)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times
    };
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let flops = if args.train { 3.0 } else { 1.0 } * 2.0 * info.macs as f64 * args.batch as f64;
    let gflops = flops / median / 1e9;
    // The peak is measured (FMA chains on every thread); the clock it implies is reported with
    // the nominal one from /proc/cpuinfo.
    let peak = xception::engine::measured_peak_gflops(threads);
    let ghz = peak / (flops_per_cycle() * threads as f64);
    let peak = Some(peak);
    let kernels = kernels_name(&args);
    let out = serde_json::json!({
        "model": args.model, "backend": if args.train { "burn-train" } else { args.backend.as_str() }, "precision": args.precision, "mode": if args.train { "train" } else { "inference" }, "batch": args.batch, "threads": threads,
        "input_size": s, "output_stride": args.output_stride, "runs": times.len(),
        "median_ms": median * 1e3, "images_per_s": args.batch as f64 / median, "gflops": gflops,
        "cpu_ghz": ghz, "nominal_ghz": cpu_ghz(), "peak_gflops": peak, "peak_fraction": peak.map(|p| gflops / p),
        "peak_rss_mb": peak_rss_mb(), "macs_per_image": info.macs, "kernels": kernels,
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{} batch {} on {threads} threads ({}, {}, {kernels}): median {:.1} ms, {:.2} images/s, {:.1} GFLOP/s{}, peak RSS {:.0} MB",
            args.model,
            args.batch,
            if args.train { "training steps, burn" } else { args.backend.as_str() },
            args.precision,
            median * 1e3,
            args.batch as f64 / median,
            gflops,
            peak.map(|p| format!(" = {:.0}% of the {:.1} GFLOP/s fp32 peak", 100.0 * gflops / p, p)).unwrap_or_default(),
            peak_rss_mb().unwrap_or(0.0)
        );
    }
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    use xception_serve::config::{ModelEntry, ServeConfig};
    let mut config = match &args.config {
        Some(path) => ServeConfig::read(path)?,
        None => ServeConfig::empty(),
    };
    if let Some(addr) = args.addr {
        config.addr = addr;
    }
    if let Some(weights) = args.weights {
        let mut m = ModelEntry::new(weights);
        m.name = args.name;
        m.model = args.model;
        m.labels = args.labels;
        m.size = args.size;
        m.preprocess = args.preprocess;
        m.resize = args.resize;
        m.output_stride = args.output_stride;
        m.threads = args.threads;
        m.precision = args.precision;
        m.max_batch = args.max_batch;
        m.max_wait_ms = args.max_wait_ms;
        m.queue = args.queue;
        config.models.push(m);
    } else if args.model.is_some() || args.name.is_some() {
        bail!("--model and --name describe the model given by --weights; add --weights");
    }
    let l = &mut config.limits;
    l.max_body_bytes = args.max_body_bytes.unwrap_or(l.max_body_bytes);
    l.max_pixels = args.max_pixels.unwrap_or(l.max_pixels);
    l.decode_timeout_ms = args.decode_timeout_ms.unwrap_or(l.decode_timeout_ms);
    l.inference_timeout_ms = args.inference_timeout_ms.unwrap_or(l.inference_timeout_ms);
    if args.token_file.is_some() {
        config.token_file = args.token_file;
    }
    xception_serve::run(config, args.offline, |addr| {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    })?;
    Ok(())
}

fn segment(args: SegmentArgs) -> Result<()> {
    use xception::segment::{class_fractions, fit, label_map, overlay, voc_palette, write_mask_png, write_png};
    let model = args.model.as_deref().map(|m| Variant::parse(m.strip_prefix(xception::arch::deeplab::PREFIX).unwrap_or(m))).transpose()?;
    if !(0.0..=1.0).contains(&args.alpha) {
        bail!("--alpha {} is not in [0, 1]", args.alpha);
    }
    // Output names are the inputs' file stems: refuse two inputs that would write the same files.
    let mut stems = std::collections::HashMap::new();
    for input in &args.inputs {
        let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(other) = stems.insert(stem.clone(), input) {
            bail!("{} and {} would both write {stem}.mask.png; segment them into different --out directories", other.display(), input.display());
        }
    }
    let mut options = LoadOptions::new(args.weights.clone(), Head::IfPresent);
    options.model = model;
    options.output_stride = Some(args.output_stride as usize);
    options.threads = args.threads;
    options.precision = parse_precision(&args.precision);
    options.backend = Backend::parse(&args.backend)?;
    let pipeline = Pipeline::load(&options)?;
    let seg = pipeline.config.segmentation.clone().ok_or_else(|| {
        anyhow::anyhow!("{}: {} is not a segmentation model (expected DeepLabv3+ weights with aspp.* and logits.*)", args.weights.display(), pipeline.config.name())
    })?;
    let labels = match args.labels.as_deref() {
        Some("voc") => Labels::voc(),
        Some(file) => Labels::from_file(&PathBuf::from(file))?,
        None if seg.num_classes == 21 => Labels::voc(),
        None => Labels::numbered(),
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let palette = voc_palette();
    let mut results = Vec::new();
    for input in &args.inputs {
        let img = xception::preprocess::load_image(input)?;
        let fitted = fit(&img, args.size);
        let logits = pipeline.runner.segment(&fitted.data, fitted.size, fitted.size)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mask = label_map(&logits, fitted.content_h, fitted.content_w, h, w);
        let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let (mask_path, overlay_path) = (args.out.join(format!("{stem}.mask.png")), args.out.join(format!("{stem}.overlay.png")));
        write_mask_png(&mask_path, &mask, w, h, &palette)?;
        write_png(&overlay_path, &overlay(&img, &mask, &palette, args.alpha))?;
        let fractions = class_fractions(&mask, seg.num_classes);
        let classes: Vec<serde_json::Value> = fractions
            .iter()
            .enumerate()
            .filter(|(_, &f)| f > 0.0)
            .map(|(i, &f)| serde_json::json!({"index": i, "label": labels.name(i), "fraction": f}))
            .collect();
        if !args.json {
            let shown: Vec<String> = classes.iter().map(|c| format!("{} {:.1}%", c["label"].as_str().unwrap(), 100.0 * c["fraction"].as_f64().unwrap())).collect();
            println!("{}: {}x{} -> {} ({})", input.display(), w, h, mask_path.display(), shown.join(", "));
        }
        results.push(serde_json::json!({
            "input": input.display().to_string(), "width": w, "height": h,
            "mask": mask_path.display().to_string(), "overlay": overlay_path.display().to_string(), "classes": classes,
        }));
    }
    if args.json {
        let out = serde_json::json!({
            "model": pipeline.config.name(), "weights": args.weights.display().to_string(),
            "output_stride": args.output_stride, "input_size": args.size, "results": results,
        });
        println!("{out}");
    }
    Ok(())
}

fn list_zoo(json: bool) -> Result<()> {
    let dir = zoo::cache_dir();
    let rows: Vec<serde_json::Value> = zoo::REGISTRY
        .iter()
        .map(|e| {
            let checksum = match e.checksum {
                zoo::Checksum::Sha256(h) => format!("sha256 {h}"),
                zoo::Checksum::Md5(h) => format!("md5 {h}"),
                zoo::Checksum::Sha256Prefix(h) => format!("sha256 {h}..."),
                zoo::Checksum::Unpublished => "none published".into(),
            };
            serde_json::json!({
                "name": e.name, "model": e.model.name(), "url": e.url, "checksum": checksum,
                "cached": dir.join(e.file_name).is_file(), "source": e.source,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("cache: {}\n", dir.display());
    println!("{:<30} {:<16} {:<48} {}", "name", "model", "checksum", "cached");
    for r in &rows {
        println!("{:<30} {:<16} {:<48} {}", r["name"].as_str().unwrap(), r["model"].as_str().unwrap(), r["checksum"].as_str().unwrap(), r["cached"]);
    }
    Ok(())
}

fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn convert(args: ConvertArgs) -> Result<()> {
    let mut weights = TensorMap::read(&args.input)?;
    let config = weights.infer_config(parse_variant(&args.model)?)?;
    let net = Network::build(&config)?;
    let unused = weights.check(&net)?;
    let mut out = weights.restricted_to(&net);
    out.metadata.insert("model".into(), config.name());
    out.metadata.insert("format".into(), "xception-rs canonical: timm state_dict names, PyTorch layouts, float32".into());
    out.metadata.insert("converted_from".into(), args.input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    weights.tensors.clear();
    out.write_safetensors(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    let classes = match (&config.segmentation, config.classes()) {
        (Some(seg), _) => format!("segmentation, {} classes", seg.num_classes),
        (None, Some(k)) => format!("{k} classes"),
        (None, None) => "no classifier".into(),
    };
    eprintln!("{}: {} ({classes}), {} tensors", args.out.display(), config.name(), out.tensors.len());
    if !unused.is_empty() {
        eprintln!("ignored {} tensors the model does not use, e.g. '{}'", unused.len(), unused[0]);
    }
    Ok(())
}
