//! Preprocessing against the real Pillow / torchvision / timm (fixtures from
//! `tools/make_preprocess_fixtures.py`, Pillow 13.0.0, torchvision 0.29.2, timm 1.0.31).

use image::RgbImage;
use safetensors::SafeTensors;
use std::path::PathBuf;
use xception::preprocess::{load_image, pil_resize, timm_resize_crop, Preprocess, Resize};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("preprocess/manifest.json")).unwrap()).unwrap()
}

fn image(rel: &str) -> RgbImage {
    load_image(&dir().join(rel)).unwrap()
}

/// (number of differing channel values, largest difference)
fn diff(a: &RgbImage, b: &RgbImage) -> (usize, u8) {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).filter(|(x, y)| x != y).fold((0, 0), |(n, m), (x, y)| (n + 1, m.max(x.abs_diff(*y))))
}

#[test]
fn pillow_resize_is_reproduced_exactly() {
    for case in manifest()["resize"].as_array().unwrap() {
        let src = image(&format!("images/{}", case["source"].as_str().unwrap()));
        let filter = Resize::parse(case["filter"].as_str().unwrap()).unwrap();
        let (w, h) = (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32);
        let ours = pil_resize(&src, w, h, filter);
        let expected = image(&format!("preprocess/{}", case["expected"].as_str().unwrap()));
        assert_eq!(diff(&ours, &expected), (0, 0), "{case}");
    }
}

#[test]
fn timm_eval_transform_is_reproduced() {
    let arrays = std::fs::read(dir().join("preprocess/arrays.safetensors")).unwrap();
    let arrays = SafeTensors::deserialize(&arrays).unwrap();
    for case in manifest()["timm_eval"].as_array().unwrap() {
        let src = image(&format!("images/{}", case["source"].as_str().unwrap()));
        let size = case["size"].as_u64().unwrap() as usize;
        let crop_pct = case["crop_pct"].as_f64().unwrap();
        let resize = Resize::parse(case["interpolation"].as_str().unwrap()).unwrap();
        let ours = timm_resize_crop(&src, size, crop_pct, resize);
        let expected = image(&format!("preprocess/{}", case["expected_u8"].as_str().unwrap()));
        assert_eq!(diff(&ours, &expected), (0, 0), "{case}");
        if let Some(key) = case["tensor"].as_str() {
            let t = arrays.tensor(key).unwrap();
            assert_eq!(t.shape(), &[size, size, 3]);
            let reference: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let ours = Preprocess::timm(size, crop_pct, resize).apply(&src);
            let worst = ours.iter().zip(&reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst == 0.0, "{key}: float output differs by {worst}");
        }
    }
}

#[test]
fn decoding_matches_pillow() {
    for case in manifest()["decode"].as_array().unwrap() {
        let ours = image(&format!("images/{}", case["file"].as_str().unwrap()));
        let expected = image(&format!("preprocess/{}", case["expected"].as_str().unwrap()));
        // JPEG goes through libjpeg-turbo with Pillow's settings: the same pixels, not nearly.
        assert_eq!(diff(&ours, &expected), (0, 0), "{case}");
    }
    let grey = image("images/chelsea_grey.png");
    assert!(grey.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]), "grey images are replicated to RGB");
}

#[test]
fn bad_images_are_refused_with_their_name() {
    let tmp = std::env::temp_dir().join(format!("xception-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let not_image = tmp.join("notes.jpg");
    std::fs::write(&not_image, b"this is not a picture").unwrap();
    let err = load_image(&not_image).unwrap_err().to_string();
    assert!(err.contains("notes.jpg"), "{err}");
    let bytes = std::fs::read(dir().join("images/chelsea.jpg")).unwrap();
    let truncated = tmp.join("truncated.jpg");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    match load_image(&truncated) {
        Err(e) => assert!(e.to_string().contains("truncated.jpg"), "{e}"),
        // Some decoders fill a truncated JPEG's missing rows; either way there is no panic.
        Ok(img) => assert_eq!(img.dimensions(), (451, 300)),
    }
    let missing = load_image(&tmp.join("missing.png")).unwrap_err().to_string();
    assert!(missing.contains("missing.png"), "{missing}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
