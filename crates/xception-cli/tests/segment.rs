//! `xception segment` end to end: the DeepLabv3+ fixture model (formula weights + calibrated BN
//! statistics, as in crates/xception/tests/deeplab_conformance.rs) on the fixture's own input,
//! whose class map the PyTorch reference stored; masks at the image's own size for larger
//! images; errors with exit code 1 and no partial files.

mod common;

use common::{fixture_deeplab as fixture_model, read_mask, root, run, s, workdir};
use std::path::Path;
use xception::arch::{Network, Variant};
use xception::weights::{deterministic, TensorMap};




#[test]
fn masks_match_the_pytorch_reference_class_map() {
    for (case, variant, classes, os) in [
        ("deeplabv3plus_xception65_s129_os16_k21", Variant::Xception65, 21, 16),
        ("deeplabv3plus_xception41_s100_os8_k3", Variant::Xception41, 3, 8),
    ] {
        let dir = workdir(case);
        let (model, image, reference) = fixture_model(&dir, case, variant, classes, os);
        let size = (reference.len() as f64).sqrt() as usize;
        let out_dir = dir.join("out");
        let out = run(&["segment", "--weights", s(&model), "--output-stride", &os.to_string(), "--size", &size.to_string(), "--out", s(&out_dir), "--json", s(&image)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["model"], format!("deeplabv3plus_{variant}"));
        let r = &json["results"][0];
        let (mask, w, h) = read_mask(Path::new(r["mask"].as_str().unwrap()));
        assert_eq!((w as usize, h as usize), (size, size));
        let agree = mask.iter().zip(&reference).filter(|(a, b)| a == b).count() as f64 / mask.len() as f64;
        eprintln!("{case}: {:.4}% of pixels carry the reference's class", 100.0 * agree);
        assert!(agree >= 0.999, "{case}: only {agree} of the pixels agree with PyTorch's class map");
        // The reported fractions are the mask's.
        let mut total = 0.0;
        for c in r["classes"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as u8;
            let counted = mask.iter().filter(|&&m| m == i).count() as f64 / mask.len() as f64;
            assert!((c["fraction"].as_f64().unwrap() - counted).abs() < 1e-12);
            total += counted;
        }
        assert!((total - 1.0).abs() < 1e-9);
        if classes == 21 {
            assert!(r["classes"].as_array().unwrap().iter().all(|c| c["label"] != "class 0"), "VOC names for 21 classes");
        }
        let overlay = image::open(r["overlay"].as_str().unwrap()).unwrap();
        assert_eq!((overlay.width(), overlay.height()), (w, h));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn large_images_are_fitted_and_masks_keep_their_size() {
    let dir = workdir("large");
    let (model, _, _) = fixture_model(&dir, "deeplabv3plus_xception65_s129_os16_k21", Variant::Xception65, 21, 16);
    let photo = image::open(root().join("fixtures/images/chelsea.png")).unwrap().to_rgb8();
    let big = dir.join("wide.jpg");
    image::imageops::resize(&photo, 700, 301, image::imageops::FilterType::Triangle).save(&big).unwrap();
    let out = run(&["segment", "--weights", s(&model), "--size", "129", "--out", s(&dir.join("out")), s(&big)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("700x301"));
    let (mask, w, h) = read_mask(&dir.join("out/wide.mask.png"));
    assert_eq!((w, h, mask.len()), (700, 301, 700 * 301));
    assert!(mask.iter().all(|&m| m < 21));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_exit_1_with_the_cause_and_no_partial_files() {
    let dir = workdir("errors");
    let (model, image, _) = fixture_model(&dir, "deeplabv3plus_xception65_s129_os16_k21", Variant::Xception65, 21, 16);
    let out_dir = dir.join("out");
    let fail = |args: &[&str], needle: &str| {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: expected '{needle}' in: {err}");
    };
    let corrupt = dir.join("corrupt.jpg");
    std::fs::write(&corrupt, b"\xFF\xD8\xFF\xE0 not really a jpeg").unwrap();
    fail(&["segment", "--weights", s(&model), "--size", "129", "--out", s(&out_dir), s(&corrupt)], "corrupt.jpg");
    assert!(!out_dir.join("corrupt.mask.png").exists() && !out_dir.join("corrupt.mask.png.partial").exists());

    // A classifier is not a segmentation model.
    let classifier = dir.join("x41.safetensors");
    deterministic(&Network::build(&xception::ModelConfig::new(Variant::Xception41)).unwrap()).write_safetensors(&classifier).unwrap();
    fail(&["segment", "--weights", s(&classifier), "--out", s(&out_dir), s(&image)], "not a segmentation model");
    // Two inputs that would write the same files.
    let other = dir.join("sub");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&image, other.join("input.png")).unwrap();
    fail(&["segment", "--weights", s(&model), "--out", s(&out_dir), s(&image), s(&other.join("input.png"))], "input.mask.png");
    fail(&["segment", "--weights", s(&model), "--out", s(&out_dir), "--output-stride", "32", s(&image)], "32");
    fail(&["segment", "--weights", s(&model), "--out", s(&out_dir), "--size", "20", s(&image)], "20x20");
    // A head tensor with the wrong shape is named.
    let mut broken = TensorMap::read_safetensors(&model).unwrap();
    broken.insert("aspp.project.conv.weight".to_string(), xception::HostTensor::new(vec![256, 1024, 1, 1], vec![0.0; 256 * 1024]));
    let broken_path = dir.join("broken.safetensors");
    broken.write_safetensors(&broken_path).unwrap();
    fail(&["segment", "--weights", s(&broken_path), "--out", s(&out_dir), s(&image)], "aspp.project.conv.weight");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn info_reports_the_spec_figures_for_deeplab() {
    for (os, gmacs) in [("16", 54.03), ("8", 176.85)] {
        let out = run(&["info", "--model", "deeplabv3plus_xception65", "--input-size", "513", "--output-stride", os, "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let macs = info["macs"].as_f64().unwrap() / 1e9;
        assert!((macs / gmacs - 1.0).abs() < 1e-3, "OS {os}: {macs} G multiply-adds, spec {gmacs} G");
        assert_eq!(info["params_trainable"], 41_055_413);
        assert_eq!(info["num_classes"], 21);
    }
    let out = run(&["info", "--model", "deeplabv3plus_xception65p"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("aligned"));
}

#[test]
fn eval_scores_a_voc_tree_and_names_bad_masks() {
    let dir = workdir("eval-seg");
    let (model, _, _) = fixture_model(&dir, "deeplabv3plus_xception65_s129_os16_k21", Variant::Xception65, 21, 16);
    let voc = dir.join("voc");
    let out = run(&["synth-voc", "--out", s(&voc), "--count", "10", "--size", "65", "--seed", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["eval", "--task", "segment", "--data", s(&voc), "--weights", s(&model), "--size", "65", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["images"], 2);
    let miou = e["miou"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&miou));
    let per_class = e["per_class_iou"].as_object().unwrap();
    assert_eq!(per_class.len(), 21);
    assert!(per_class["background"].is_number(), "background is in every synthetic mask");
    assert!(per_class.values().all(|v| v.is_null() || (0.0..=1.0).contains(&v.as_f64().unwrap())));
    // Multi-scale with flips: DeepLab's evaluation protocol.
    let out = run(&["eval", "--task", "segment", "--data", s(&voc), "--weights", s(&model), "--size", "65", "--scales", "0.75,1.0,1.25", "--flip", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((m["scales"].clone(), m["flip"].clone()), (serde_json::json!([0.75, 1.0, 1.25]), serde_json::json!(true)));
    assert!((0.0..=1.0).contains(&m["miou"].as_f64().unwrap()));

    let fail = |args: &[&str], needle: &str| {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: expected '{needle}' in {err}");
    };
    // A 3-class model cannot score masks holding class 3.
    let (small, _, _) = fixture_model(&dir, "deeplabv3plus_xception41_s100_os8_k3", Variant::Xception41, 3, 8);
    let eval = |weights: &Path| vec!["eval".to_string(), "--task".into(), "segment".into(), "--data".into(), s(&voc).into(), "--weights".into(), s(weights).into(), "--size".into(), "65".into(), "--split".into(), "train".into()];
    let args = eval(&small);
    fail(&args.iter().map(String::as_str).collect::<Vec<_>>(), "class value 3");
    // A mask of another size than its image, and a listed image that is missing.
    let first = std::fs::read_to_string(voc.join("ImageSets/Segmentation/val.txt")).unwrap().lines().next().unwrap().to_string();
    image::GrayImage::new(10, 10).save(voc.join(format!("SegmentationClass/{first}.png"))).unwrap();
    let args = eval(&model);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args[10] = "val";
    fail(&args, &format!("{first}.png is 10x10"));
    std::fs::write(voc.join("ImageSets/Segmentation/val.txt"), "nothere\n").unwrap();
    fail(&args, "nothere");
    fail(&["eval", "--task", "segment", "--data", s(&dir), "--weights", s(&model)], "neither a VOC tree");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn burn_and_engine_write_the_same_mask() {
    let dir = workdir("backends");
    let (model, image, _) = fixture_model(&dir, "deeplabv3plus_xception41_s100_os8_k3", Variant::Xception41, 3, 8);
    let mut masks = Vec::new();
    for backend in ["engine", "burn"] {
        let out_dir = dir.join(backend);
        let out = run(&["segment", "--weights", s(&model), "--backend", backend, "--output-stride", "8", "--size", "100", "--out", s(&out_dir), s(&image)]);
        assert!(out.status.success(), "{backend}: {}", String::from_utf8_lossy(&out.stderr));
        masks.push(read_mask(&out_dir.join("input.mask.png")).0);
    }
    let agree = masks[0].iter().zip(&masks[1]).filter(|(a, b)| a == b).count() as f64 / masks[0].len() as f64;
    assert!(agree >= 0.999, "engine and burn masks agree on {agree}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn train_seg(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    train_seg_classes(data, out, "4", extra)
}

fn train_seg_classes(data: &Path, out: &Path, classes: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train", "--task", "segment", "--data", s(data), "--model", "deeplabv3plus_xception_tiny", "--num-classes", classes, "--out", s(out), "--crop", "33",
        "--eval-size", "49", "--batch-size", "4", "--optimizer", "adamw", "--lr", "2e-3", "--warmup-epochs", "0", "--seed", "1", "--json",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn deeplab_trains_evaluates_and_resumes_exactly() {
    let dir = workdir("segtrain");
    let data = dir.join("synth");
    let out = run(&["synth-voc", "--out", s(&data), "--count", "20", "--size", "48", "--seed", "5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 16 training images in batches of 4: 4 steps an epoch, 8 in all.
    let reference = dir.join("reference");
    let out = train_seg(&data, &reference, &["--epochs", "2", "--checkpoint-every", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps"], 8);
    assert_eq!(summary["eval_output_stride"], 8);
    for name in ["final.safetensors", "curves.png", "metrics.jsonl", "summary.json"] {
        assert!(reference.join(name).is_file(), "{name}");
    }
    // `eval --task segment` on the same split at the same size and stride scores the same mIoU.
    let best = summary["best_epoch"].as_u64().unwrap();
    let out = run(&["eval", "--task", "segment", "--data", s(&data), "--weights", s(&reference.join("final.safetensors")), "--output-stride", "8", "--size", "49", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let eval: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let logged: Vec<serde_json::Value> = std::fs::read_to_string(reference.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let logged_miou = logged[best as usize - 1]["val_miou"].as_f64().unwrap();
    assert!((eval["miou"].as_f64().unwrap() - logged_miou).abs() < 1e-9, "eval {} vs training log {logged_miou}", eval["miou"]);
    assert!((summary["val_miou"].as_f64().unwrap() - logged_miou).abs() < 1e-9);

    // Stopped inside epoch 2, resumed: the same weights to the last bit.
    let stopped = dir.join("stopped");
    assert!(train_seg(&data, &stopped, &["--epochs", "2", "--checkpoint-every", "3", "--max-steps", "6"]).status.success());
    let out = train_seg(&data, &stopped, &["--epochs", "2", "--checkpoint-every", "3", "--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (a, b) = (TensorMap::read_safetensors(&stopped.join("final.safetensors")).unwrap(), TensorMap::read_safetensors(&reference.join("final.safetensors")).unwrap());
    for (name, t) in &a.tensors {
        assert_eq!(t.data, b.tensors[name].data, "{name} differs after the resume");
    }

    // A mask value beyond the classes is refused, naming the mask.
    let out = train_seg_classes(&data, &dir.join("three"), "3", &["--epochs", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SegmentationClass") && err.contains("holds class value 3"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
