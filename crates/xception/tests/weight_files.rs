//! Weight files: PyTorch checkpoints written by the real torch.save (tools/make_pth_fixtures.py),
//! our safetensors round trip, and clear errors for broken or mismatched files.

use std::path::PathBuf;
use xception::arch::{ModelConfig, Network, Variant};
use xception::weights::{deterministic, TensorMap};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xception-weights-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn pytorch_checkpoints_load_with_their_values() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("pth/expected.json")).unwrap()).unwrap();
    for file in ["plain.pth", "nested.pth", "legacy.pth"] {
        let map = TensorMap::read(&fixtures().join("pth").join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!map.tensors.contains_key("bn1.num_batches_tracked"), "{file}: bookkeeping tensors are skipped");
        for (name, t) in expected["tensors"].as_object().unwrap() {
            let ours = map.get(name).unwrap_or_else(|| panic!("{file}: missing {name}"));
            let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            assert_eq!(ours.shape, shape, "{file}: {name}");
            let values: Vec<f32> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(ours.data, values, "{file}: {name}");
        }
    }
}

fn legacy() -> Network {
    Network::build(&ModelConfig::new(Variant::LegacyXception)).unwrap()
}

#[test]
fn canonical_safetensors_round_trip_and_detect_the_model() {
    let dir = tmp("roundtrip");
    let mut cfg = ModelConfig::new(Variant::Xception41);
    cfg.num_classes = 7;
    let net = Network::build(&cfg).unwrap();
    let map = deterministic(&net);
    let path = dir.join("w.safetensors");
    map.write_safetensors(&path).unwrap();
    let back = TensorMap::read(&path).unwrap();
    assert_eq!(back.tensors, map.tensors);
    // Detected from the names and shapes alone: variant, classifier and its width.
    let detected = back.infer_config(None).unwrap();
    assert_eq!((detected.variant, detected.num_classes, detected.include_top), (Variant::Xception41, 7, true));
    assert!(!dir.join("w.safetensors.partial").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mismatched_weights_name_the_tensor_and_both_shapes() {
    let net = legacy();
    let mut map = deterministic(&net);
    map.tensors.remove("block3.rep.4.pointwise.weight");
    let err = map.check(&net).unwrap_err().to_string();
    assert!(err.contains("missing tensor 'block3.rep.4.pointwise.weight'"), "{err}");

    let mut map = deterministic(&net);
    map.tensors.get_mut("bn2.running_var").unwrap().shape = vec![32];
    map.tensors.get_mut("bn2.running_var").unwrap().data.truncate(32);
    let err = map.check(&net).unwrap_err().to_string();
    assert!(err.contains("'bn2.running_var'") && err.contains("[32]") && err.contains("[64]"), "{err}");

    let mut map = deterministic(&net);
    map.tensors.get_mut("fc.bias").unwrap().data[3] = f32::NAN;
    let err = map.check(&net).unwrap_err().to_string();
    assert!(err.contains("fc.bias") && err.contains("non-finite"), "{err}");

    // A file of another variant: every tensor is missing, and the message says so.
    let other = deterministic(&Network::build(&ModelConfig::new(Variant::Xception65)).unwrap());
    let err = other.check(&net).unwrap_err().to_string();
    assert!(err.contains("is this a legacy_xception weight file?"), "{err}");
}

#[test]
fn broken_files_are_refused_with_their_name() {
    let dir = tmp("broken");
    let net = legacy();
    let path = dir.join("full.safetensors");
    deterministic(&net).write_safetensors(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for (name, content) in [
        ("truncated.safetensors", bytes[..bytes.len() - 1000].to_vec()),
        ("header_only.safetensors", bytes[..64].to_vec()),
        ("empty.safetensors", vec![]),
        ("garbage.pth", b"PK\x03\x04 not really a zip".to_vec()),
        ("random.pth", (0..4096u32).map(|i| (i * 2654435761u32 >> 13) as u8).collect()),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        let err = TensorMap::read(&p).unwrap_err().to_string();
        assert!(err.contains(name), "{name}: {err}");
    }
    let err = TensorMap::read(&dir.join("weights.h5")).unwrap_err().to_string();
    assert!(err.contains("weights.h5"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
