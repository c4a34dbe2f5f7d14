//! The `xception` command end to end: conversion, classification, embeddings, info, and the
//! errors a user meets (exit code 1, a message naming the file, tensor or shape, no output file).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use xception::arch::{ModelConfig, Network, Variant};
use xception::weights::deterministic;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xception"))
}

fn images() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/images")
}

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xception-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A timm-style checkpoint (timm names, no metadata) for `variant` with `classes` outputs.
fn timm_checkpoint(dir: &Path, variant: Variant, classes: usize) -> PathBuf {
    let mut cfg = ModelConfig::new(variant);
    cfg.num_classes = classes;
    let path = dir.join(format!("{variant}_timm.safetensors"));
    deterministic(&Network::build(&cfg).unwrap()).write_safetensors(&path).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_then_classify_and_embed() {
    let dir = workdir("flow");
    let timm = timm_checkpoint(&dir, Variant::Xception41, 10);
    let canonical = dir.join("x41.safetensors");
    let out = run(&["convert", s(&timm), "--out", s(&canonical)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("xception41 (10 classes)"), "{}", stderr(&out));
    let map = xception::TensorMap::read(&canonical).unwrap();
    assert_eq!(map.metadata.get("model").map(String::as_str), Some("xception41"));

    // An .npy input (already preprocessed) next to an image, both at 96x96.
    let npy = dir.join("input.npy");
    let pattern: Vec<f32> = (0..96 * 96 * 3).map(|i| ((i * 37 % 255) as f32) / 127.5 - 1.0).collect();
    xception::npy::write_f32(&npy, &[1, 96, 96, 3], &pattern).unwrap();
    let chelsea = images().join("chelsea.jpg");
    let out = run(&["classify", "--weights", s(&canonical), "--size", "96", "--top", "3", "--labels", s(&dir.join("labels.txt")), "--json", s(&chelsea), s(&npy)]);
    assert_eq!(out.status.code(), Some(1), "missing labels file is an error");
    assert!(stderr(&out).contains("labels.txt"));
    std::fs::write(dir.join("labels.txt"), (0..10).map(|i| format!("thing {i}\n")).collect::<String>()).unwrap();
    let out = run(&["classify", "--weights", s(&canonical), "--size", "96", "--top", "3", "--labels", s(&dir.join("labels.txt")), "--json", s(&chelsea), s(&npy)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["model"], "xception41");
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let logits: Vec<f64> = r["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(logits.len(), 10);
        let top = r["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let best = logits.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(logits[top[0]["index"].as_u64().unwrap() as usize], best);
        assert!(top[0]["label"].as_str().unwrap().starts_with("thing "));
        let p: Vec<f64> = top.iter().map(|t| t["probability"].as_f64().unwrap()).collect();
        assert!(p[0] >= p[1] && p[1] >= p[2] && p[0] <= 1.0);
    }
    assert_eq!(results[1]["input"], s(&npy));

    // Embeddings of the same inputs: (2, 2048) float32, the .npy row equal to a library run.
    let feats = dir.join("feats.npy");
    let out = run(&["embed", "--weights", s(&canonical), "--size", "96", "--out", s(&feats), s(&chelsea), s(&npy)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (shape, data) = xception::npy::read_f32(&feats).unwrap();
    assert_eq!(shape, vec![2, 2048]);
    let mut cfg = ModelConfig::new(Variant::Xception41);
    cfg.include_top = false;
    let device = xception::device::default_device();
    let model = xception::Xception::load(&cfg, &canonical, &device).unwrap();
    let items = xception::preprocess::load_items(&[&npy], &xception::Preprocess::default_for(Variant::Xception41, 96)).unwrap();
    let ours = model.predict(&items, 1, &device).unwrap();
    let worst = ours[0].pooled.iter().zip(&data[2048..]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst < 1e-5, "embed and the library disagree by {worst}");

    // The timm file classifies directly too (model detected from its tensor names).
    let out = run(&["classify", "--weights", s(&timm), "--size", "96", s(&chelsea)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("chelsea.jpg"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn info_reports_the_spec_totals() {
    for (model, total, trainable, macs) in [
        ("xception", 22_910_480u64, 22_855_952u64, 8_357_403_496u64),
        ("legacy_xception", 22_910_480, 22_855_952, 8_357_403_496),
    ] {
        let out = run(&["info", "--model", model, "--json"]);
        assert!(out.status.success());
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["params_total"], total);
        assert_eq!(j["params_trainable"], trainable);
        assert_eq!(j["params_non_trainable"], total - trainable);
        assert_eq!(j["macs"], macs);
    }
    for (model, trainable) in [
        ("xception41", 26_969_560u64),
        ("xception65", 39_916_312),
        ("xception71", 42_338_736),
        ("xception41p", 26_907_752),
        ("xception65p", 39_819_560),
    ] {
        let out = run(&["info", "--model", model, "--json"]);
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["params_trainable"], trainable, "{model}");
    }
    // aligned_xception.md 7: the segmentation backbone at 513, OS 8: 163.61 G multiply-adds.
    let out = run(&["info", "--model", "xception65", "--input-size", "513", "--output-stride", "8", "--no-top", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((j["macs"].as_f64().unwrap() / 1e9 - 163.61).abs() < 0.005, "{}", j["macs"]);
    assert_eq!(j["stages"].as_array().unwrap().last().unwrap()["output"], serde_json::json!([65, 65, 2048]));
    let table = run(&["info", "--model", "xception65", "--input-size", "513", "--output-stride", "8", "--no-top"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("65x65x2048"));
}

#[test]
fn user_errors_exit_1_with_a_clear_message() {
    let dir = workdir("errors");
    let timm = timm_checkpoint(&dir, Variant::LegacyXception, 1000);
    let chelsea = images().join("chelsea.png");
    let out_npy = dir.join("never.npy");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["info".into(), "--model".into(), "xception99".into()], "unknown model 'xception99'"),
        (vec!["classify".into(), "--bogus".into()], "--bogus"),
        (vec!["info".into(), "--model".into(), "xception".into(), "--input-size".into(), "64".into()], "at least 71x71"),
        (vec!["info".into(), "--model".into(), "xception".into(), "--output-stride".into(), "16".into()], "output stride"),
        (
            vec!["classify".into(), "--weights".into(), s(&timm).into(), s(&dir.join("nothere.jpg")).into()],
            "nothere.jpg",
        ),
        (
            vec!["embed".into(), "--weights".into(), s(&timm).into(), "--out".into(), s(&out_npy).into(), s(&dir.join("fake.png")).into()],
            "fake.png",
        ),
        (
            vec!["classify".into(), "--weights".into(), s(&dir.join("none.safetensors")).into(), s(&chelsea).into()],
            "none.safetensors",
        ),
        (
            vec!["classify".into(), "--weights".into(), s(&timm).into(), "--model".into(), "xception65".into(), s(&chelsea).into()],
            "missing tensors",
        ),
        (
            vec!["classify".into(), "--weights".into(), s(&timm).into(), "--size".into(), "40".into(), s(&chelsea).into()],
            "at least 71x71",
        ),
        (
            vec!["embed".into(), "--weights".into(), s(&timm).into(), "--out".into(), s(&out_npy).into(), s(&dir.join("bad_shape.npy")).into()],
            "bad_shape.npy",
        ),
        (
            vec!["classify".into(), "--weights".into(), s(&timm).into(), "--backend".into(), "burn".into(), "--precision".into(), "bf16".into(), s(&chelsea).into()],
            "precision bf16 runs on the engine only",
        ),
        (vec!["classify".into(), "--weights".into(), s(&timm).into(), "--precision".into(), "fp16".into(), s(&chelsea).into()], "fp16"),
    ];
    std::fs::write(dir.join("fake.png"), b"\x89PNG\r\n\x1a\n but then nothing").unwrap();
    xception::npy::write_f32(&dir.join("bad_shape.npy"), &[2, 80, 80], &vec![0.0; 2 * 80 * 80]).unwrap();
    for (args, needle) in cases {
        let out = bin().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: expected '{needle}' in: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}");
    }
    assert!(!out_npy.exists(), "no output file is written when the run fails");

    // A classifier-less file cannot classify; wrong classifier shapes are named.
    let mut cfg = ModelConfig::new(Variant::Xception65);
    cfg.include_top = false;
    let notop = dir.join("notop.safetensors");
    deterministic(&Network::build(&cfg).unwrap()).write_safetensors(&notop).unwrap();
    let out = run(&["classify", "--weights", s(&notop), s(&chelsea)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no classifier (head.fc.weight)"), "{}", stderr(&out));

    let mut map = xception::TensorMap::read(&timm).unwrap();
    map.tensors.get_mut("block1.skip.weight").unwrap().shape = vec![128, 64, 1, 1, 1];
    let broken = dir.join("broken.safetensors");
    map.write_safetensors(&broken).unwrap();
    let out = run(&["classify", "--model", "legacy_xception", "--weights", s(&broken), s(&chelsea)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("'block1.skip.weight' has shape [128, 64, 1, 1, 1], expected [128, 64, 1, 1]"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--precision bf16` runs where the CPU has AMX or AVX512-BF16, `bf16x3` where it has AMX,
/// `int8` on any x86-64 CPU with AVX2 (the numbers are checked in the conformance tests), and
/// are refused with a clear message, exit 1, where they cannot run. `bench` names the kernels:
/// they follow what the CPU offers and what XCEPTION_ENGINE_NO_AVX512, XCEPTION_ENGINE_NO_VNNI
/// and XCEPTION_ENGINE_NO_AMX hold it to.
#[test]
fn reduced_precisions_run_or_are_refused_clearly() {
    let dir = workdir("bf16");
    let timm = timm_checkpoint(&dir, Variant::LegacyXception, 1000);
    let chelsea = images().join("chelsea.png");
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512_vnni, avx512bw, avx_vnni) = (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"), is_x86_feature_detected!("avx512vnni"), is_x86_feature_detected!("avx512bw"), is_x86_feature_detected!("avxvnni"));
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, avx512_vnni, avx512bw, avx_vnni) = (false, false, false, false);
    let avx512 = xception::engine::simd_kernels() == "avx512";
    #[cfg(target_arch = "x86_64")]
    let amx_int8 = avx512 && avx512bw && xception::engine::amx::int8_available();
    #[cfg(not(target_arch = "x86_64"))]
    let amx_int8 = false;
    // int8's kernels on the AVX-512 kernels without AMX.
    let avx512_int8 = if avx512_vnni { "avx512-vnni-int8" } else { "avx512bw-int8" };
    for precision in ["bf16", "bf16x3", "int8"] {
        let (available, needs, kernels) = if precision == "int8" {
            let widest = if amx_int8 {
                "amx-int8"
            } else if avx512 && avx512_vnni {
                "avx512-vnni-int8"
            } else if avx512 && avx512bw {
                "avx512bw-int8"
            } else if avx_vnni {
                "avx-vnni-int8"
            } else {
                "avx2-int8"
            };
            (xception::engine::int8_available(), "AVX2", widest.to_string())
        } else if precision == "bf16" {
            (xception::engine::bf16_available(), "AMX", xception::engine::bf16_kernels().unwrap_or("none").to_string())
        } else {
            (xception::engine::bf16x3_available(), "AMX", "amx-bf16x3".to_string())
        };
        let out = run(&["classify", "--weights", s(&timm), "--size", "96", "--precision", precision, "--json", s(&chelsea)]);
        if available {
            assert!(out.status.success(), "{}", stderr(&out));
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(json["results"][0]["logits"].as_array().unwrap().len(), 1000);
            let bench = run(&["bench", "--model", "xception41", "--input-size", "96", "--runs", "1", "--precision", precision, "--json"]);
            assert!(bench.status.success(), "{}", stderr(&bench));
            let json: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
            assert_eq!(json["precision"], precision);
            assert_eq!(json["kernels"], kernels);
        } else {
            assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
            assert!(stderr(&out).contains(needs) && stderr(&out).contains(precision), "{}", stderr(&out));
        }
        // Without AVX-512 (forced off here) bf16 does not run: refused, for the kernels alone
        // too. int8 runs on the AVX2 kernels, with AVX-VNNI where the CPU has it and without
        // when XCEPTION_ENGINE_NO_VNNI says so; that alone holds int8 on AVX-512 machines to
        // AVX-512BW, and XCEPTION_ENGINE_NO_AMX to AVX-512 VNNI (bf16 runs under both, and is
        // not checked again).
        let no_vnni = if avx512 && avx512bw { "avx512bw-int8" } else { "avx2-int8" };
        let no_amx = if avx512 && avx512bw { avx512_int8 } else if avx_vnni { "avx-vnni-int8" } else { "avx2-int8" };
        let held: &[(&[(&str, &str)], &str)] = &[
            (&[("XCEPTION_ENGINE_NO_AVX512", "1")], if avx_vnni { "avx-vnni-int8" } else { "avx2-int8" }),
            (&[("XCEPTION_ENGINE_NO_AVX512", "1"), ("XCEPTION_ENGINE_NO_VNNI", "1")], "avx2-int8"),
            (&[("XCEPTION_ENGINE_NO_VNNI", "1")], no_vnni),
            (&[("XCEPTION_ENGINE_NO_AMX", "1")], no_amx),
        ];
        for &(env, int8_kernels) in held {
            if env.len() == 1 && matches!(env[0].0, "XCEPTION_ENGINE_NO_VNNI" | "XCEPTION_ENGINE_NO_AMX") && precision != "int8" {
                continue;
            }
            let runs = precision == "int8" && avx2;
            for args in [vec!["classify", "--weights", s(&timm), "--size", "96", "--precision", precision, s(&chelsea)], vec!["bench", "--ops", "--runs", "1", "--precision", precision]] {
                let out = bin().args(&args).envs(env.iter().copied()).output().unwrap();
                if runs {
                    assert!(out.status.success(), "{args:?} {env:?}: {}", stderr(&out));
                } else {
                    assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}: {}", stderr(&out));
                    assert!(stderr(&out).contains(needs) && !stderr(&out).contains("panicked"), "{args:?}: {}", stderr(&out));
                }
            }
            if runs {
                let bench = bin().args(["bench", "--model", "xception41", "--input-size", "96", "--runs", "1", "--precision", precision, "--json"]).envs(env.iter().copied()).output().unwrap();
                let json: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
                assert_eq!(json["kernels"], int8_kernels, "{env:?}");
            }
        }
    }
    // Without tiles (XCEPTION_ENGINE_NO_AMX, or a CPU without AMX) bf16 runs on VDPBF16PS where
    // the CPU has AVX512-BF16, and bf16x3 is refused.
    #[cfg(target_arch = "x86_64")]
    if avx512 && is_x86_feature_detected!("avx512bf16") {
        let bench = bin().args(["bench", "--model", "xception41", "--input-size", "96", "--runs", "1", "--precision", "bf16", "--json"]).env("XCEPTION_ENGINE_NO_AMX", "1").output().unwrap();
        assert!(bench.status.success(), "{}", stderr(&bench));
        let json: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
        assert_eq!(json["kernels"], "avx512-bf16");
        let out = bin().args(["classify", "--weights", s(&timm), "--size", "96", "--precision", "bf16x3", s(&chelsea)]).env("XCEPTION_ENGINE_NO_AMX", "1").output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("bf16x3") && stderr(&out).contains("AMX") && !stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `bench --json` carries the fields the benchmarks read and names the kernels that ran: the
/// widest this CPU has, and AVX2 where XCEPTION_ENGINE_NO_AVX512 holds the engine to it.
#[test]
fn bench_json_names_the_kernels() {
    let args = ["bench", "--model", "xception41", "--input-size", "71", "--runs", "1", "--json"];
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let native = json(run(&args));
    for key in ["model", "batch", "threads", "median_ms", "images_per_s", "gflops", "peak_fraction", "peak_rss_mb", "peak_gflops"] {
        assert!(!native[key].is_null(), "bench --json lacks {key}: {native}");
    }
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = avx2 && is_x86_feature_detected!("avx512f");
        assert_eq!(native["kernels"], if avx512 { "avx512" } else if avx2 { "avx2" } else { "portable" });
        let held = json(bin().args(args).env("XCEPTION_ENGINE_NO_AVX512", "1").output().unwrap());
        assert_eq!(held["kernels"], if avx2 { "avx2" } else { "portable" });
    }
}

/// `bench --layers` times the steps inside whole passes: the layer types add up to the pass, the
/// convs report their GFLOP/s and fraction of the peak, the pools none.
#[test]
fn bench_layers_adds_up_to_the_pass() {
    let out = run(&["bench", "--layers", "--model", "xception", "--input-size", "71", "--runs", "2", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = json["layers"].as_array().unwrap();
    let kind = |k: &str| layers.iter().find(|l| l["kind"] == k).unwrap_or_else(|| panic!("no {k} in {json}"));
    let sep = kind("separable conv");
    assert!(sep["steps"].as_u64().unwrap() >= 20 && sep["gflops"].as_f64().unwrap() > 0.0 && sep["peak_fraction"].as_f64().unwrap() > 0.0, "{sep}");
    assert!(kind("dense conv 3x3")["gflops"].as_f64().unwrap() > 0.0);
    assert!(kind("max pool")["gflops"].is_null());
    // The first block's pool makes its 1x1 shortcut projection (at 71: 18 lines, small weights).
    assert!(kind("max pool + shortcut projection")["gflops"].as_f64().unwrap() > 0.0, "{json}");
    // The roofline: arithmetic intensity for the convs, memory rate for the pools, each against
    // its bound (the measured memory bandwidth, or the peak).
    assert!(json["bandwidth_gbs"].as_f64().unwrap() > 0.0, "{json}");
    assert!(sep["flop_per_byte"].as_f64().unwrap() > 1.0 && sep["bound_fraction"].as_f64().unwrap() > 0.0, "{sep}");
    let pool = kind("max pool");
    assert!(pool["flop_per_byte"].is_null() && pool["gb_per_s"].as_f64().unwrap() > 0.0 && pool["bound_fraction"].as_f64().unwrap() > 0.0, "{pool}");
    assert!(kind("other")["bound_fraction"].is_null());
    // The types of the reported pass add up to it ("other" is its time outside the steps).
    let ms: f64 = layers.iter().map(|l| l["ms"].as_f64().unwrap()).sum();
    let pass = json["median_ms"].as_f64().unwrap();
    assert!((ms - pass).abs() <= 1e-6 * pass, "layers {ms} ms against a pass of {pass} ms");
    assert!(kind("other")["ms"].as_f64().unwrap() >= 0.0);
    let refused = run(&["bench", "--layers", "--ops"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("cannot be used with"), "{}", stderr(&refused));
    let refused = run(&["bench", "--layers", "--batch", "8"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("batch 1"), "{}", stderr(&refused));
}

#[test]
fn help_and_version_exit_0() {
    assert!(run(&["--help"]).status.success());
    assert!(run(&["--version"]).status.success());
    assert!(run(&["classify", "--help"]).status.success());
}
