//! DeepLabv3+ against a PyTorch reference written from the spec on timm's aligned Xception
//! (`tools/make_deeplab_fixtures.py`, timm 1.0.31, torch 2.15): per-pixel logits at the input
//! size, from formula weights with calibrated BN statistics, within 1e-4 of their scale, at
//! output strides 16 and 8, on X-41/65/71, at DeepLab crop sizes (16k+1) and others.

mod common;

use common::{reference, relative_error};
use safetensors::SafeTensors;
use std::path::PathBuf;
use xception::arch::{Network, Segmentation, Variant};
use xception::weights::{deterministic, TensorMap};
use xception::Engine;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/deeplab")
}

#[derive(serde::Deserialize)]
struct Case {
    file: String,
    norms: String,
    backbone: String,
    size: usize,
    output_stride: usize,
    classes: usize,
}

fn run_case(case: &Case) -> f32 {
    let config = Segmentation::config(Variant::parse(&case.backbone).unwrap(), case.classes, case.output_stride).unwrap();
    let net = Network::build(&config).unwrap();
    let mut weights = deterministic(&net);
    let norms = TensorMap::read_safetensors(&fixtures().join(&case.norms)).unwrap();
    let mut replaced = 0;
    for (name, t) in norms.tensors {
        assert!(weights.tensors.contains_key(&name), "{}: the reference has '{name}', we do not", case.file);
        weights.insert(name, t);
        replaced += 1;
    }
    assert_eq!(replaced, 2 * net.tensors().iter().filter(|t| t.name.ends_with(".running_mean")).count(), "every norm calibrated");
    let engine = Engine::new(&net, &weights, 0).unwrap();

    let bytes = std::fs::read(fixtures().join(&case.file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let input = st.tensor("input_u8").unwrap();
    let [n, h, w, _]: [usize; 4] = input.shape().try_into().unwrap();
    assert_eq!((h, w), (case.size, case.size));
    let x: Vec<f32> = input.data().iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
    let out = engine.forward(&x, n, h, w).unwrap();
    let seg = out.segmentation.expect("segmentation output");
    assert_eq!((seg.n, seg.h, seg.w, seg.c), (n, h, w, case.classes));
    let logits = reference(&st, "logits");
    assert_eq!(logits.shape, vec![n, case.classes, h, w]);
    relative_error(&seg.to_nchw(), &logits)
}

#[test]
fn deeplab_matches_the_pytorch_reference() {
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 4);
    let mut worst = 0f32;
    for case in &cases {
        let err = run_case(case);
        eprintln!("{}: logits max |diff| / scale {err:.2e}", case.file);
        assert!(err <= TOLERANCE, "{}: {err:e}", case.file);
        worst = worst.max(err);
    }
    eprintln!("deeplab worst {worst:.2e}");
}

#[test]
fn deeplab_has_no_burn_path_yet_and_says_so() {
    let config = Segmentation::config(Variant::Xception65, 21, 16).unwrap();
    let net = Network::build(&config).unwrap();
    let weights = deterministic(&net);
    let err = xception::Xception::from_weights(net, &weights, &xception::device::default_device()).unwrap_err().to_string();
    assert!(err.contains("deeplabv3plus_xception65") && err.contains("engine"), "{err}");
}
