//! Helpers shared by the command-line test files.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use xception::arch::{Network, Segmentation, Variant};
use xception::weights::{deterministic, TensorMap};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh temporary directory for one test.
pub fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xception-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the binary to completion.
pub fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_xception")).args(args).output().unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fixture case's weights written as our canonical safetensors, and its first input image.
pub fn fixture_deeplab(dir: &Path, case: &str, variant: Variant, classes: usize, os: usize) -> (PathBuf, PathBuf, Vec<u8>) {
    let fixtures = root().join("fixtures/deeplab");
    let net = Network::build(&Segmentation::config(variant, classes, os).unwrap()).unwrap();
    let mut weights = deterministic(&net);
    for (name, t) in TensorMap::read_safetensors(&fixtures.join(format!("{case}_norms.safetensors"))).unwrap().tensors {
        weights.insert(name, t);
    }
    weights.metadata.insert("model".into(), net.config.name());
    let model = dir.join("deeplab.safetensors");
    weights.write_safetensors(&model).unwrap();

    let bytes = std::fs::read(fixtures.join(format!("{case}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let input = st.tensor("input_u8").unwrap();
    let [_, h, w, _]: [usize; 4] = input.shape().try_into().unwrap();
    let image = dir.join("input.png");
    image::RgbImage::from_raw(w as u32, h as u32, input.data()[..h * w * 3].to_vec()).unwrap().save(&image).unwrap();
    let mask = st.tensor("mask").unwrap().data()[..h * w].to_vec();
    (model, image, mask)
}

/// A palette PNG's pixel indices and size.
pub fn read_mask(path: &Path) -> (Vec<u8>, u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    assert_eq!(reader.info().color_type, png::ColorType::Indexed, "{}", path.display());
    assert!(reader.info().palette.as_ref().is_some_and(|p| p.len() == 768));
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    buf.truncate(frame.buffer_size());
    (buf, frame.width, frame.height)
}

