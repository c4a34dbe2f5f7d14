//! TensorFlow checkpoints written by TensorFlow itself (`tools/make_tf_checkpoint_fixtures.py`,
//! TensorFlow 2.21): our tensor-bundle reader against TF's own reader, the TF DeepLab variable
//! names against a TF-written DeepLabv3+ index, and (with the full 328 MB checkpoint in the
//! cache) DeepLab logits from a TF checkpoint against the PyTorch reference.

mod common;

use std::path::PathBuf;
use xception::arch::{Network, Segmentation, Variant};
use xception::tf::{to_tensor_map, Checkpoint};
use xception::weights::TensorMap;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xception-tf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bundle_reader_matches_tensorflows_reader() {
    let prefix = fixtures().join("tf/format/model.ckpt");
    let ckpt = Checkpoint::open(&prefix).unwrap();
    assert_eq!(ckpt.names().count(), 411, "every entry of the index, across its blocks");
    let expected = TensorMap::read_safetensors(&fixtures().join("tf/format/expected.safetensors")).unwrap();
    assert_eq!(expected.tensors.len(), 410);
    for (name, want) in &expected.tensors {
        let got = ckpt.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.shape, want.shape, "{name}");
        assert_eq!(got.data, want.data, "{name}: values differ from TensorFlow's reader");
    }
    let err = ckpt.tensor("a_string").unwrap_err().to_string();
    assert!(err.contains("a_string") && err.contains("not a number type"), "{err}");
    // The index file itself names the checkpoint too.
    assert!(Checkpoint::open(&fixtures().join("tf/format/model.ckpt.index")).is_ok());
}

#[test]
fn corrupt_checkpoints_are_refused_naming_the_file_and_tensor() {
    let dir = temp("corrupt");
    let copy = |name: &str| {
        for ext in ["index", "data-00000-of-00001"] {
            std::fs::copy(fixtures().join(format!("tf/format/model.ckpt.{ext}")), dir.join(format!("{name}.{ext}"))).unwrap();
        }
        dir.join(name)
    };
    // A flipped byte in the tensor data fails that tensor's CRC32C.
    let prefix = copy("bad_data");
    let data = dir.join("bad_data.data-00000-of-00001");
    let mut bytes = std::fs::read(&data).unwrap();
    let ckpt = Checkpoint::open(&prefix).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();
    let failures: Vec<String> = ckpt.names().filter_map(|name| ckpt.tensor(name).err().map(|e| e.to_string())).collect();
    assert!(failures.iter().any(|e| e.contains("CRC32C") && e.contains("bad_data.data-00000-of-00001")), "{failures:?}");
    // A truncated data file names the tensor it cannot read.
    std::fs::write(&data, &bytes[..n / 3]).unwrap();
    let errors: Vec<String> = ckpt.names().filter(|&t| t != "a_string").filter_map(|t| ckpt.tensor(t).err().map(|e| e.to_string())).collect();
    assert!(errors.iter().any(|e| e.contains("truncated") && e.contains("tensor '")), "{errors:?}");
    // A flipped byte inside an index block fails its block checksum; a cut index has no footer.
    let prefix = copy("bad_index");
    let index = dir.join("bad_index.index");
    let mut bytes = std::fs::read(&index).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&index, &bytes).unwrap();
    let err = Checkpoint::open(&prefix).err().expect("corrupt index accepted").to_string();
    assert!(err.contains("bad_index.index") && err.contains("CRC32C"), "{err}");
    std::fs::write(&index, &bytes[..bytes.len() - 10]).unwrap();
    let err = Checkpoint::open(&prefix).err().expect("cut index accepted").to_string();
    assert!(err.contains("magic"), "{err}");
    // Not a checkpoint at all.
    let err = Checkpoint::open(&dir.join("nothing")).err().unwrap().to_string();
    assert!(err.contains("nothing") && err.contains("no .index"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn deeplab_tf_names_and_shapes_map_onto_ours() {
    // The index TensorFlow wrote for the full DeepLabv3+ X-65 checkpoint (names, dtypes, shapes).
    let ckpt = Checkpoint::open(&fixtures().join("tf/deeplabv3plus_xception65_k21.ckpt.index")).unwrap();
    let net = xception::tf::infer_network(&ckpt, None).unwrap();
    assert_eq!(net.config.name(), "deeplabv3plus_xception65");
    assert_eq!(net.segmentation.as_ref().unwrap().num_classes, 21);
    // Every tensor of ours has its TF variable, and only the data file is missing here.
    let err = to_tensor_map(&ckpt, &net).err().unwrap().to_string();
    assert!(err.contains("missing 'xception_65/entry_flow/conv1_1/weights'"), "the first lookup should reach the data: {err}");
    let ours: usize = net.tensors().len();
    let tf_vars = ckpt.names().filter(|n| !n.ends_with("/Momentum") && *n != "global_step").count();
    assert_eq!(ours, tf_vars, "one TF variable per tensor of ours");
}

/// Needs the full checkpoint: `tools/make_tf_checkpoint_fixtures.py --deeplab ~/.cache/xception/tf`.
#[test]
#[ignore = "needs the 328 MB TF checkpoint written by tools/make_tf_checkpoint_fixtures.py --deeplab"]
fn deeplab_from_a_tensorflow_checkpoint_matches_the_pytorch_reference() {
    let cache = std::env::var_os("XCEPTION_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/xception"));
    let prefix = cache.join("tf/deeplabv3plus_xception65_s129_os16_k21.ckpt");
    let weights = TensorMap::read(&prefix).unwrap();
    let config = weights.infer_config(None).unwrap();
    assert_eq!(config, Segmentation::config(Variant::Xception65, 21, 16).unwrap());
    let net = Network::build(&config).unwrap();
    let engine = xception::Engine::new(&net, &weights, 0).unwrap();
    let bytes = std::fs::read(fixtures().join("deeplab/deeplabv3plus_xception65_s129_os16_k21.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let input = st.tensor("input_u8").unwrap();
    let x: Vec<f32> = input.data().iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
    let seg = engine.forward(&x, 2, 129, 129).unwrap().segmentation.unwrap();
    let err = common::relative_error(&seg.to_nchw(), &common::reference(&st, "logits"));
    eprintln!("DeepLab from a TF checkpoint vs the PyTorch reference: {err:.2e}");
    assert!(err <= 1e-4, "{err}");
}
