//! `xception`: classify and embed images, inspect and convert models.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use xception::arch::{Activation, ModelConfig, Network, Pooling, Variant};
use xception::preprocess::{load_items, Preprocess, Resize};
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
    /// Lists the named pretrained weights, their checksums and whether they are cached.
    Zoo {
        #[arg(long)]
        json: bool,
    },
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
    /// Time the engine's depthwise and pointwise kernels alone at the entry, middle and exit
    /// flow shapes instead of the whole network.
    #[arg(long)]
    ops: bool,
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
    /// Class names: `imagenet` or a file with one label per line.
    #[arg(long, default_value = "imagenet")]
    labels: String,
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
    #[arg(long, default_value_t = 1000)]
    num_classes: usize,
    /// Without the classifier.
    #[arg(long)]
    no_top: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// timm weights: .safetensors or .pth
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

/// The preprocessing the flags ask for, defaulting to the reference's for the variant.
fn preprocessing(size: usize, mode: Option<&str>, resize: Option<&str>, variant: Variant) -> Result<Preprocess> {
    let reference = Preprocess::default_for(variant, size);
    let chosen = match mode {
        None => reference,
        Some("keras") => Preprocess::Keras { size, resize: Resize::Nearest },
        Some(_) => match reference {
            Preprocess::Timm { .. } => reference,
            // The Keras graph has no timm config; timm's port of the same weights uses these.
            Preprocess::Keras { .. } => Preprocess::default_for(Variant::LegacyXception, size),
        },
    };
    Ok(match resize {
        Some(r) => chosen.with_resize(Resize::parse(r)?),
        None => chosen,
    })
}

fn preprocess(args: PreprocessArgs) -> Result<()> {
    let p = preprocessing(args.size, args.preprocess.as_deref(), args.resize.as_deref(), Variant::parse(&args.model)?)?;
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

/// The weight file `--weights` names: a path, or registry weights fetched into the cache.
fn weight_file(args: &ModelArgs, want_top: bool) -> Result<(PathBuf, Option<&'static zoo::Entry>)> {
    let given = args.weights.to_string_lossy();
    if args.weights.exists() || !zoo::is_name(&given) {
        return Ok((args.weights.clone(), None));
    }
    let entry = zoo::lookup(&given, parse_variant(&args.model)?, want_top)?;
    let options = zoo::FetchOptions { offline: args.offline, progress: true, cache: None };
    Ok((zoo::fetch(entry, &options)?, Some(entry)))
}

/// Loads weights, builds the model they fit, runs every input.
fn run_model(args: &ModelArgs, want_top: bool, pooling: Option<Pooling>) -> Result<(ModelConfig, Vec<xception::Prediction>)> {
    let (path, entry) = weight_file(args, want_top)?;
    let weights = TensorMap::read(&path)?;
    let weights_input_size = weights.input_size();
    let mut config = weights.infer_config(parse_variant(&args.model)?.or(entry.map(|e| e.model)))?;
    if want_top && !config.include_top {
        bail!(
            "{}: the weights have no classifier ({}.weight); use `xception embed` for features",
            args.weights.display(),
            config.variant.classifier_key()
        );
    }
    config.include_top = want_top;
    config.output_stride = args.output_stride;
    if let Some(p) = pooling {
        config.pooling = p;
    }
    let net = Network::build(&config)?;
    let runner = Runner::new(Backend::parse(&args.backend)?, net, &weights, args.threads)?;
    drop(weights);
    let size = match (args.size, weights_input_size) {
        (Some(s), _) => s,
        (None, Some((h, w))) if h == w => h,
        _ => 299,
    };
    let mut p = preprocessing(size, args.preprocess.as_deref(), args.resize.as_deref(), config.variant)?;
    if let (Some(crop), Preprocess::Timm { crop_pct, .. }) = (entry.and_then(|e| e.crop_pct), &mut p) {
        *crop_pct = crop; // the evaluation crop these weights were published with
    }
    let items = load_items(&args.inputs, &p)?;
    let predictions = runner.predict(&items, args.batch_size)?;
    Ok((config, predictions))
}

#[derive(Serialize)]
struct TopClass {
    index: usize,
    label: String,
    probability: f64,
}

#[derive(Serialize)]
struct ClassifyResult {
    input: String,
    logits: Vec<f32>,
    top: Vec<TopClass>,
}

#[derive(Serialize)]
struct ClassifyOutput {
    model: String,
    weights: String,
    results: Vec<ClassifyResult>,
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let exp: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

fn classify(args: ClassifyArgs) -> Result<()> {
    let labels = match args.labels.as_str() {
        "imagenet" => Labels::imagenet(),
        file => Labels::from_file(&PathBuf::from(file))?,
    };
    let (config, predictions) = run_model(&args.model, true, None)?;
    // Probabilities as the model's own output activation gives them (softmax unless sigmoid).
    let sigmoid = config.custom_head.as_ref().and_then(|h| h.last()).is_some_and(|d| d.activation == Activation::Sigmoid);
    let results: Vec<ClassifyResult> = predictions
        .into_iter()
        .map(|p| {
            let logits = p.logits.expect("model has a classifier");
            let probs = if sigmoid { logits.iter().map(|&v| 1.0 / (1.0 + (-v as f64).exp())).collect() } else { softmax(&logits) };
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let top = order
                .into_iter()
                .take(args.top)
                .map(|i| TopClass { index: i, label: labels.name(i), probability: probs[i] })
                .collect();
            ClassifyResult { input: p.name, logits, top }
        })
        .collect();
    if args.json {
        let out = ClassifyOutput {
            model: config.variant.name().into(),
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
    let (config, predictions) = run_model(&args.model, false, pooling)?;
    let n = predictions.len();
    let c = predictions.first().map(|p| p.pooled.len()).unwrap_or(0);
    let data: Vec<f32> = predictions.iter().flat_map(|p| p.pooled.iter().copied()).collect();
    xception::npy::write_f32(&args.out, &[n, c], &data)?;
    eprintln!("{}: {n} x {c} {} embeddings ({:?} pooling)", args.out.display(), config.variant, config.pooling);
    Ok(())
}

fn info(args: InfoArgs) -> Result<()> {
    let mut config = ModelConfig::new(Variant::parse(&args.model)?);
    config.output_stride = args.output_stride;
    config.num_classes = args.num_classes;
    config.include_top = !args.no_top;
    let net = Network::build(&config)?;
    net.check_input_size(args.input_size, args.input_size)?;
    let info = net.info(args.input_size, args.input_size)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let s = args.input_size;
    println!("{} at {s}x{s}, output stride {}\n", info.model, info.output_stride);
    println!("{:<12} {:>16} {:>7} {:>9} {:>12} {:>16}", "stage", "output (HxWxC)", "stride", "dilation", "params", "multiply-adds");
    for st in &info.stages {
        let shape = st.output.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        println!("{:<12} {:>16} {:>7} {:>9} {:>12} {:>16}", st.name, shape, st.stride, st.dilation, group(st.params as u64), group(st.macs));
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

/// The CPU clock in GHz as the kernel reports it (mean over cores of /proc/cpuinfo `cpu MHz`).
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
fn flops_per_cycle() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return 64.0;
    }
    32.0
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.ops {
        let threads = xception::engine::resolve_threads(args.threads);
        let peak = cpu_ghz().map(|g| g * flops_per_cycle() * threads as f64);
        let rows: Vec<serde_json::Value> = xception::engine::bench_ops(threads, args.runs)
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
    let mut config = ModelConfig::new(Variant::parse(&args.model)?);
    config.output_stride = args.output_stride;
    let net = Network::build(&config)?;
    let s = args.input_size;
    let info = net.info(s, s)?;
    // Timing does not depend on the values: deterministic weights, a constant input.
    let weights = xception::weights::deterministic(&net);
    let threads = xception::engine::resolve_threads(args.threads);
    let runner = Runner::new(Backend::parse(&args.backend)?, net, &weights, threads)?;
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
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let flops = 2.0 * info.macs as f64 * args.batch as f64;
    let gflops = flops / median / 1e9;
    let ghz = cpu_ghz();
    let peak = ghz.map(|g| g * flops_per_cycle() * threads as f64);
    let out = serde_json::json!({
        "model": args.model, "backend": args.backend, "batch": args.batch, "threads": threads,
        "input_size": s, "output_stride": args.output_stride, "runs": times.len(),
        "median_ms": median * 1e3, "images_per_s": args.batch as f64 / median, "gflops": gflops,
        "cpu_ghz": ghz, "peak_gflops": peak, "peak_fraction": peak.map(|p| gflops / p),
        "peak_rss_mb": peak_rss_mb(), "macs_per_image": info.macs,
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{} batch {} on {threads} threads ({}): median {:.1} ms, {:.2} images/s, {:.1} GFLOP/s{}, peak RSS {:.0} MB",
            args.model,
            args.batch,
            args.backend,
            median * 1e3,
            args.batch as f64 / median,
            gflops,
            peak.map(|p| format!(" = {:.0}% of {:.1} GFLOP/s peak", 100.0 * gflops / p, p)).unwrap_or_default(),
            peak_rss_mb().unwrap_or(0.0)
        );
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
    out.metadata.insert("model".into(), config.variant.name().into());
    out.metadata.insert("format".into(), "xception-rs canonical: timm state_dict names, PyTorch layouts, float32".into());
    out.metadata.insert("converted_from".into(), args.input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    weights.tensors.clear();
    out.write_safetensors(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    let classes = if config.include_top { format!("{} classes", config.num_classes) } else { "no classifier".into() };
    eprintln!("{}: {} ({classes}), {} tensors", args.out.display(), config.variant, out.tensors.len());
    if !unused.is_empty() {
        eprintln!("ignored {} tensors the model does not use, e.g. '{}'", unused.len(), unused[0]);
    }
    Ok(())
}
