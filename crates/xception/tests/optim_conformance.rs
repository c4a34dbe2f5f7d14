//! The head `xception train` trains, stepped by burn's autodiff and optimizers as our training
//! loop configures them, against torch.optim (tools/make_optim_fixtures.py, torch 2.15): three
//! steps of AdamW and of SGD with momentum (plain and Nesterov), label-smoothed cross-entropy; and
//! the TF-style RMSprop against Keras 3's (tools/make_keras_rmsprop_fixture.py).

mod common;

use std::path::PathBuf;
use xception::train::{head_steps, HeadConfig, OptimizerKind, Schedule};
use xception::weights::TensorMap;

#[derive(serde::Deserialize)]
struct Setting {
    name: String,
    optimizer: String,
    lr: f64,
    weight_decay: f64,
    #[serde(default)]
    momentum: f64,
    #[serde(default)]
    nesterov: bool,
    #[serde(default)]
    alpha: f64,
    #[serde(default)]
    eps: f64,
    clip: Option<f64>,
    ema: Option<f64>,
}

#[derive(serde::Deserialize)]
struct Meta {
    steps: usize,
    label_smoothing: f64,
    settings: Vec<Setting>,
    schedules: std::collections::BTreeMap<String, Vec<f64>>,
    schedule_lr: f64,
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn head_steps_match_torch_optim() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/optim/head_steps.safetensors");
    let fx = TensorMap::read_safetensors(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta: Meta = serde_json::from_str(&header.metadata().as_ref().unwrap()["case"]).unwrap();
    let t = |name: &str| fx.get(name).unwrap_or_else(|| panic!("fixture lacks {name}")).data.clone();
    let y: Vec<usize> = t("y").iter().map(|&v| v as usize).collect();
    let batches: Vec<Vec<f32>> = (0..meta.steps).map(|i| t(&format!("x{i}"))).collect();
    assert_eq!(meta.settings.len(), 6);
    for s in &meta.settings {
        let cfg = HeadConfig {
            weight_decay: s.weight_decay,
            label_smoothing: meta.label_smoothing,
            optimizer: match s.optimizer.as_str() {
                "adamw" => OptimizerKind::AdamW,
                "rmsprop" => OptimizerKind::RmsProp { alpha: s.alpha, momentum: s.momentum, epsilon: s.eps },
                _ => OptimizerKind::Sgd { momentum: s.momentum, nesterov: s.nesterov },
            },
            clip_grad_norm: s.clip,
            ema: s.ema,
            ..HeadConfig::default()
        };
        let steps = head_steps(&t("w0"), &t("b0"), &batches, &y, &cfg, s.lr);
        let losses = t(&format!("{}.loss", s.name));
        let mut worst = 0f32;
        for (i, step) in steps.iter().enumerate() {
            let (loss, w, b) = (step.loss, &step.weight, &step.bias);
            assert!((loss - losses[i]).abs() <= 1e-5 * losses[i].abs(), "{} step {}: loss {loss} vs torch {}", s.name, i + 1, losses[i]);
            worst = worst.max(max_rel(w, &t(&format!("{}.w{}", s.name, i + 1)))).max(max_rel(b, &t(&format!("{}.b{}", s.name, i + 1))));
            if let Some((ew, eb)) = &step.ema {
                worst = worst.max(max_rel(ew, &t(&format!("{}.ema_w{}", s.name, i + 1)))).max(max_rel(eb, &t(&format!("{}.ema_b{}", s.name, i + 1))));
            }
        }
        assert_eq!(steps[0].ema.is_some(), s.ema.is_some());
        eprintln!("{}: 3 steps, worst weight difference {worst:.2e} of scale", s.name);
        assert!(worst <= 1e-5, "{}: weights differ from torch.optim by {worst:e}", s.name);
    }
}

#[test]
fn schedules_match_torch_schedulers() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/optim/head_steps.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta: Meta = serde_json::from_str(&header.metadata().as_ref().unwrap()["case"]).unwrap();
    assert_eq!(meta.schedules.len(), 3);
    for (name, want) in &meta.schedules {
        let schedule = match name.as_str() {
            "step_exp" => Schedule::StepExp { every: 2, rate: 0.94 },
            "poly" => Schedule::Poly { power: 0.9 },
            _ => Schedule::Cosine,
        };
        let cfg = HeadConfig { lr: meta.schedule_lr, schedule, warmup_epochs: 0, ..HeadConfig::default() };
        for (epoch, &lr) in want.iter().enumerate() {
            let ours = cfg.lr_at(epoch, want.len(), 1);
            assert!((ours - lr).abs() <= 1e-9 * lr.abs().max(1e-12) + 1e-15, "{name} epoch {epoch}: {ours} vs torch {lr}");
        }
    }
}

#[derive(serde::Deserialize)]
struct KerasSetting {
    name: String,
    learning_rate: f64,
    rho: f64,
    momentum: f64,
    epsilon: f64,
    weight_decay: Option<f64>,
}

#[test]
fn tf_style_rmsprop_matches_keras() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/optim");
    let inputs = TensorMap::read_safetensors(&dir.join("head_steps.safetensors")).unwrap();
    let path = dir.join("keras_rmsprop.safetensors");
    let fx = TensorMap::read_safetensors(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    #[derive(serde::Deserialize)]
    struct KerasMeta {
        settings: Vec<KerasSetting>,
    }
    let meta: KerasMeta = serde_json::from_str(&header.metadata().as_ref().unwrap()["case"]).unwrap();
    let t = |m: &TensorMap, name: &str| m.get(name).unwrap_or_else(|| panic!("fixture lacks {name}")).data.clone();
    let y: Vec<usize> = t(&inputs, "y").iter().map(|&v| v as usize).collect();
    let batches: Vec<Vec<f32>> = (0..3).map(|i| t(&inputs, &format!("x{i}"))).collect();
    assert_eq!(meta.settings.len(), 2);
    for s in &meta.settings {
        let cfg = HeadConfig {
            weight_decay: s.weight_decay.unwrap_or(0.0),
            label_smoothing: 0.1,
            optimizer: OptimizerKind::RmsPropTf { rho: s.rho, momentum: s.momentum, epsilon: s.epsilon },
            ..HeadConfig::default()
        };
        let steps = head_steps(&t(&inputs, "w0"), &t(&inputs, "b0"), &batches, &y, &cfg, s.learning_rate);
        let losses = t(&fx, &format!("{}.loss", s.name));
        let mut worst = 0f32;
        for (i, step) in steps.iter().enumerate() {
            assert!((step.loss - losses[i]).abs() <= 1e-5 * losses[i].abs(), "{} step {}: loss {} vs Keras {}", s.name, i + 1, step.loss, losses[i]);
            worst = worst.max(max_rel(&step.weight, &t(&fx, &format!("{}.w{}", s.name, i + 1)))).max(max_rel(&step.bias, &t(&fx, &format!("{}.b{}", s.name, i + 1))));
        }
        eprintln!("{}: 3 steps, worst weight difference {worst:.2e} of scale", s.name);
        assert!(worst <= 1e-5, "{}: weights differ from Keras by {worst:e}", s.name);
    }
}
