//! `xception train` / `eval` end to end on a generated image set (three colour classes with noise
//! and shapes) over a deterministic xception41 backbone: it learns, its model classifies with
//! its class names, a run resumed from any checkpoint (even after kill -9) ends exactly where an
//! uninterrupted run ends, and bad input is refused.

mod common;

use common::{run, s, workdir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use xception::arch::{ModelConfig, Network, Variant};
use xception::data::Rng;
use xception::weights::{deterministic, TensorMap};




/// `per_class` 48x48 PNGs per class: a dominant colour, noise, and a random bright square.
fn make_images(dir: &Path, per_class: usize) {
    let colours = [("red", [200u8, 40, 40]), ("green", [40, 180, 60]), ("blue", [40, 60, 200])];
    let mut rng = Rng(42);
    for (name, base) in colours {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        for i in 0..per_class {
            let mut img = image::RgbImage::new(48, 48);
            for px in img.pixels_mut() {
                for (v, &b) in px.0.iter_mut().zip(&base) {
                    *v = (b as i32 + (rng.next_u64() % 81) as i32 - 40).clamp(0, 255) as u8;
                }
            }
            let (x0, y0) = ((rng.next_u64() % 32) as u32, (rng.next_u64() % 32) as u32);
            for y in y0..y0 + 12 {
                for x in x0..x0 + 12 {
                    img.put_pixel(x, y, image::Rgb([230, 230, 230]));
                }
            }
            img.save(dir.join(name).join(format!("{i:02}.png"))).unwrap();
        }
    }
}

fn backbone(dir: &Path) -> PathBuf {
    let config = ModelConfig { include_top: false, ..ModelConfig::new(Variant::Xception41) };
    let path = dir.join("backbone.safetensors");
    deterministic(&Network::build(&config).unwrap()).write_safetensors(&path).unwrap();
    path
}

fn train(data: &Path, weights: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", s(data), "--weights", s(weights), "--out", s(out), "--size", "48", "--val-split", "0.25", "--seed", "3", "--batch-size", "8", "--lr", "3e-3", "--json"];
    args.extend_from_slice(extra);
    run(&args)
}

fn ok(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// metrics.jsonl without the wall-clock field.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

fn same_model(a: &Path, b: &Path) {
    let (a, b) = (TensorMap::read_safetensors(a).unwrap(), TensorMap::read_safetensors(b).unwrap());
    assert_eq!(a.tensors.keys().collect::<Vec<_>>(), b.tensors.keys().collect::<Vec<_>>());
    for (name, t) in &a.tensors {
        assert_eq!(t.data, b.tensors[name].data, "{name} differs");
    }
}

#[test]
fn learns_classifies_and_resumes_exactly() {
    let dir = workdir("learn");
    let data = dir.join("colours");
    make_images(&data, 12);
    let weights = backbone(&dir);

    let full = dir.join("full");
    let summary = ok(&train(&data, &weights, &full, &["--epochs", "12"]));
    let first_model = std::fs::read(full.join("final.safetensors")).unwrap();
    assert_eq!(summary["classes"], serde_json::json!(["blue", "green", "red"]));
    assert_eq!((summary["train_images"].as_u64(), summary["val_images"].as_u64()), (Some(27), Some(9)));
    let top1 = summary["val_top1"].as_f64().unwrap();
    assert!(top1 >= 0.85, "validation accuracy {top1}");
    for f in ["final.safetensors", "metrics.jsonl", "summary.json", "confusion.png", "features/train.npy"] {
        assert!(full.join(f).is_file(), "{f}");
    }
    assert_eq!(metrics(&full).len(), 12);
    let kept = std::fs::read_dir(full.join("checkpoints")).unwrap().count();
    assert!(kept <= 6, "old checkpoints are pruned ({kept} files)");

    // The model classifies with the class names it recorded, and eval agrees.
    let out = run(&["classify", "--weights", s(&full.join("final.safetensors")), "--top", "1", "--json", s(&data.join("red/00.png")), s(&data.join("blue/05.png"))]);
    let c = ok(&out);
    assert_eq!(c["results"][0]["top"][0]["label"], "red");
    assert_eq!(c["results"][1]["top"][0]["label"], "blue");
    let e = ok(&run(&["eval", "--data", s(&data), "--weights", s(&full.join("final.safetensors")), "--json", "--confusion", s(&dir.join("c.png"))]));
    assert!(e["top1"].as_f64().unwrap() >= 0.9, "{e}");
    assert_eq!(e["images"], 36);
    assert!(dir.join("c.png").is_file());

    // A damaged newest checkpoint is reported and the previous one used: the run redoes its last
    // epoch and ends the same.
    let newest = full.join("checkpoints/epoch-0012.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let out = train(&data, &weights, &full, &["--epochs", "12", "--resume"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipping damaged checkpoint of epoch 12"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(metrics(&full).len(), 12);
    assert_eq!(std::fs::read(full.join("final.safetensors")).unwrap(), first_model, "the redone epoch gives the same model");

    // A second run into the same directory must say whether it resumes.
    let refused = train(&data, &weights, &full, &["--epochs", "12"]);
    assert_eq!(refused.status.code(), Some(1), "a second run into the same --out needs --resume");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_moving_average_survives_a_resume() {
    let dir = workdir("ema");
    let data = dir.join("colours");
    make_images(&data, 6);
    let weights = backbone(&dir);
    let run = dir.join("run");
    let first = ok(&train(&data, &weights, &run, &["--epochs", "8", "--ema", "0.9"]));
    let model = std::fs::read(run.join("final.safetensors")).unwrap();
    let plain = ok(&train(&data, &weights, &dir.join("plain"), &["--epochs", "8"]));
    assert_ne!(first["val_top1"].as_f64().map(|_| metrics(&run)), plain["val_top1"].as_f64().map(|_| metrics(&dir.join("plain"))), "EMA changes what is validated");
    // Damage the last checkpoint: the resumed run redoes epoch 8 from epoch 7's weights, moments
    // and moving average, and exports the same averaged model.
    let last = run.join("checkpoints/epoch-0008.safetensors");
    let bytes = std::fs::read(&last).unwrap();
    std::fs::write(&last, &bytes[..bytes.len() / 3]).unwrap();
    ok(&train(&data, &weights, &run, &["--epochs", "8", "--ema", "0.9", "--resume"]));
    assert_eq!(std::fs::read(run.join("final.safetensors")).unwrap(), model);
    // Asking for the average when resuming a run that never kept one is an error, not damage.
    let plain = dir.join("plain");
    std::fs::remove_file(plain.join("final.safetensors")).unwrap();
    let out = train(&data, &weights, &plain, &["--epochs", "9", "--ema", "0.9", "--resume"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without --ema"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_killed_at_any_moment_resumes_to_the_same_end() {
    let dir = workdir("kill");
    let data = dir.join("colours");
    make_images(&data, 6);
    let weights = backbone(&dir);
    let epochs = "400";
    let reference = dir.join("reference");
    ok(&train(&data, &weights, &reference, &["--epochs", epochs]));

    let killed = dir.join("killed");
    let mut args = vec!["train", "--data", s(&data), "--weights", s(&weights), "--out", s(&killed), "--size", "48", "--val-split", "0.25", "--seed", "3", "--batch-size", "8", "--lr", "3e-3", "--epochs", epochs];
    let mut child = Command::new(env!("CARGO_BIN_EXE_xception")).args(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Kill it mid-training: once a few epochs are logged, and well before the end.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let done = std::fs::read_to_string(killed.join("metrics.jsonl")).map(|m| m.lines().count()).unwrap_or(0);
        if done >= 20 {
            break;
        }
        assert!(std::time::Instant::now() < until && child.try_wait().unwrap().is_none(), "training ended or stalled before the kill");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Command::new("kill").args(["-9", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();
    let logged = metrics(&killed).len();
    assert!(logged < 400, "killed after the run had finished");
    assert!(!killed.join("final.safetensors").exists());
    // Every checkpoint left behind is complete and readable.
    for e in std::fs::read_dir(killed.join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            TensorMap::read_safetensors(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
    args.push("--resume");
    let out = run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(metrics(&killed), metrics(&reference), "killed after {logged} epochs, resumed");
    same_model(&killed.join("final.safetensors"), &reference.join("final.safetensors"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_data_is_refused_naming_the_cause() {
    let dir = workdir("bad");
    let weights = backbone(&dir);
    let fail = |args: &[&str], needle: &str| {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: expected '{needle}' in {err}");
    };
    std::fs::create_dir_all(dir.join("empty/cats")).unwrap();
    fail(&["train", "--data", s(&dir.join("empty")), "--weights", s(&weights), "--out", s(&dir.join("r"))], "cats");
    make_images(&dir.join("one"), 2);
    std::fs::remove_dir_all(dir.join("one/red")).unwrap();
    std::fs::remove_dir_all(dir.join("one/green")).unwrap();
    fail(&["train", "--data", s(&dir.join("one")), "--weights", s(&weights), "--out", s(&dir.join("r"))], "at least two");
    std::fs::write(dir.join("list.csv"), "path,label\nmissing.png,a\n").unwrap();
    fail(&["train", "--data", s(&dir.join("list.csv")), "--weights", s(&weights), "--out", s(&dir.join("r"))], "missing.png");
    fail(&["train", "--data", s(&dir.join("one")), "--weights", s(&weights), "--out", s(&dir.join("r")), "--freeze", "all"], "all");
    fail(&["train", "--data", s(&dir.join("one")), "--weights", s(&weights), "--out", s(&dir.join("r")), "--schedule", "exp"], "exp");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn train_whole(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", s(data), "--model", "xception_tiny", "--out", s(out), "--size", "32", "--val-split", "0.25", "--seed", "3", "--batch-size", "12", "--lr", "3e-3", "--warmup-epochs", "0", "--crop-scale", "0.5,1", "--json"];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn the_whole_network_trains_from_scratch_and_resumes_mid_epoch_exactly() {
    let dir = workdir("whole");
    let data = dir.join("colours");
    make_images(&data, 16);
    // 36 training images in batches of 12: 3 steps an epoch, 36 in all. (Batches this small
    // make train-mode BatchNorm on the 1x1 exit maps a poor guide to inference mode; 12 is
    // about the least that learns here.)
    let reference = dir.join("reference");
    let summary = ok(&train_whole(&data, &reference, &["--epochs", "12", "--checkpoint-every", "2", "--dropout", "0.2"]));
    assert_eq!(summary["steps"], 36);
    assert_eq!(summary["trained_stages"], summary["stages"]);
    assert!(summary["val_top1"].as_f64().unwrap() >= 0.8, "{summary}");
    for name in ["final.safetensors", "curves.png", "confusion.png", "metrics.jsonl", "summary.json"] {
        assert!(reference.join(name).is_file(), "{name}");
    }
    assert_eq!(metrics(&reference).len(), 12);
    // The model classifies with its class names on the fast engine.
    let image = data.join("green").join("00.png");
    let out = run(&["classify", "--weights", s(&reference.join("final.safetensors")), "--json", s(&image)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.to_string().contains("green"), "{v}");

    // Stopped after step 17 (inside epoch 6), then resumed: the same run to the last bit.
    let stopped = dir.join("stopped");
    ok(&train_whole(&data, &stopped, &["--epochs", "12", "--checkpoint-every", "2", "--dropout", "0.2", "--max-steps", "17"]));
    assert_eq!(metrics(&stopped).len(), 5);
    ok(&train_whole(&data, &stopped, &["--epochs", "12", "--checkpoint-every", "2", "--dropout", "0.2", "--resume"]));
    assert_eq!(metrics(&stopped), metrics(&reference));
    same_model(&stopped.join("final.safetensors"), &reference.join("final.safetensors"));
    // A damaged newest checkpoint is skipped for the one before it, with a warning.
    let damaged = dir.join("damaged");
    ok(&train_whole(&data, &damaged, &["--epochs", "12", "--checkpoint-every", "2", "--dropout", "0.2", "--max-steps", "17"]));
    let newest = damaged.join("checkpoints").join("step-00000017.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let out = train_whole(&data, &damaged, &["--epochs", "12", "--checkpoint-every", "2", "--dropout", "0.2", "--resume"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipping damaged checkpoint"), "{}", String::from_utf8_lossy(&out.stderr));
    ok(&out);
    same_model(&damaged.join("final.safetensors"), &reference.join("final.safetensors"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fine_tuning_the_top_blocks_leaves_the_frozen_ones_untouched() {
    let dir = workdir("finetune");
    let data = dir.join("colours");
    make_images(&data, 4);
    let config = ModelConfig { include_top: false, ..ModelConfig::new(Variant::XceptionTiny) };
    let weights = dir.join("tiny.safetensors");
    let start = deterministic(&Network::build(&config).unwrap());
    start.write_safetensors(&weights).unwrap();
    let out_dir = dir.join("run");
    let summary = ok(&train_whole(&data, &out_dir, &["--weights", s(&weights), "--unfreeze-top", "2", "--epochs", "1", "--backbone-lr-scale", "0.1"]));
    assert_eq!(summary["trained_stages"], 2);
    let done = TensorMap::read_safetensors(&out_dir.join("final.safetensors")).unwrap();
    // Stages: stem, blocks.0 ..= blocks.6; the top two (blocks.5, blocks.6) train.
    for (name, t) in &start.tensors {
        let trained = name.starts_with("blocks.5.") || name.starts_with("blocks.6.");
        let same = done.tensors[name].data == t.data;
        assert_eq!(same, !trained || name.ends_with("num_batches_tracked"), "{name}: trained {trained}, unchanged {same}");
    }
    // Refused: training from scratch with a frozen backbone; contradictory options.
    let bad = run(&["train", "--data", s(&data), "--model", "xception_tiny", "--out", s(&dir.join("bad")), "--freeze", "backbone"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("needs --weights"));
    let bad = run(&["train", "--data", s(&data), "--out", s(&dir.join("bad2"))]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--model"), "{}", String::from_utf8_lossy(&bad.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn whole_network_training_killed_mid_run_resumes_to_the_same_end() {
    let dir = workdir("whole-kill");
    let data = dir.join("colours");
    make_images(&data, 16);
    let extra = ["--epochs", "12", "--checkpoint-every", "1"];
    let reference = dir.join("reference");
    ok(&train_whole(&data, &reference, &extra));
    let killed = dir.join("killed");
    let mut args = vec!["train", "--data", s(&data), "--model", "xception_tiny", "--out", s(&killed), "--size", "32", "--val-split", "0.25", "--seed", "3", "--batch-size", "12", "--lr", "3e-3", "--warmup-epochs", "0", "--crop-scale", "0.5,1", "--json"];
    args.extend_from_slice(&extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_xception")).args(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Kill it between checkpoints once a few steps are saved (step 7 is inside epoch 3).
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !killed.join("checkpoints/step-00000007.safetensors").exists() {
        assert!(std::time::Instant::now() < until && child.try_wait().unwrap().is_none(), "training ended or stalled before the kill");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Command::new("kill").args(["-9", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("final.safetensors").exists(), "killed after the run had finished");
    for e in std::fs::read_dir(killed.join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            TensorMap::read_safetensors(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
    args.push("--resume");
    ok(&run(&args));
    assert_eq!(metrics(&killed), metrics(&reference));
    same_model(&killed.join("final.safetensors"), &reference.join("final.safetensors"));
    std::fs::remove_dir_all(&dir).unwrap();
}
