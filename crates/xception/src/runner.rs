//! One way to run inference for the library's callers: the fused CPU engine (the default) or the
//! burn modules (for GPUs, and as the reference the engine is tested against).

use crate::arch::Network;
use crate::error::{Error, Result};
use crate::model::{Prediction, Xception};
use crate::preprocess::Item;
use crate::weights::TensorMap;
use burn::tensor::{Device, Tensor};
use xception_engine::{Engine, Precision};

/// Which implementation runs the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The fused CPU engine (xception-engine).
    Engine,
    /// burn modules on the default device (CPU `flex`, or CUDA when built with `cuda`).
    Burn,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Backend> {
        match s {
            "engine" => Ok(Backend::Engine),
            "burn" => Ok(Backend::Burn),
            _ => Err(Error::Config(format!("unknown backend '{s}' (engine or burn)"))),
        }
    }
}

/// A loaded model ready to predict.
pub enum Runner {
    Engine(Engine),
    Burn(Box<Xception>, Device),
}

impl Runner {
    /// `threads` 0: all cores (engine only).
    pub fn new(backend: Backend, net: Network, weights: &TensorMap, threads: usize) -> Result<Runner> {
        Runner::with_precision(backend, net, weights, threads, Precision::F32)
    }

    /// `new` with the engine's products in `precision` (bf16 is an engine option).
    pub fn with_precision(backend: Backend, net: Network, weights: &TensorMap, threads: usize, precision: Precision) -> Result<Runner> {
        weights.check(&net)?;
        if backend == Backend::Burn && precision != Precision::F32 {
            return Err(Error::Config(format!("precision {} runs on the engine only (--backend engine)", precision.name())));
        }
        Ok(match backend {
            Backend::Engine => Runner::Engine(Engine::with_precision(&net, weights, threads, precision)?),
            Backend::Burn => {
                let device = crate::device::default_device();
                Runner::Burn(Box::new(Xception::from_weights(net, weights, &device)?), device)
            }
        })
    }

    /// Pooled embeddings and (with a head) logits, in batches of at most `batch_size` inputs of
    /// equal size.
    pub fn predict(&self, items: &[Item], batch_size: usize) -> Result<Vec<Prediction>> {
        match self {
            Runner::Burn(model, device) => model.predict(items, batch_size, device),
            Runner::Engine(engine) => {
                let mut out = Vec::with_capacity(items.len());
                for batch in equal_size_batches(items, batch_size) {
                    let (h, w) = (batch[0].height, batch[0].width);
                    let data: Vec<f32> = batch.iter().flat_map(|i| i.data.iter().copied()).collect();
                    let r = engine.forward_with(&data, batch.len(), h, w, false).map_err(|e| match e {
                        Error::Shape(m) => Error::Shape(format!("{}: {m}", batch[0].name)),
                        other => other,
                    })?;
                    let c = r.pooled.len() / batch.len();
                    for (i, item) in batch.iter().enumerate() {
                        let logits = r.logits.as_ref().map(|l| {
                            let k = l.len() / batch.len();
                            l[i * k..][..k].to_vec()
                        });
                        out.push(Prediction { name: item.name.clone(), pooled: r.pooled[i * c..][..c].to_vec(), logits });
                    }
                }
                Ok(out)
            }
        }
    }
}

impl Runner {
    /// Per-pixel class logits of one preprocessed `h` x `w` image, (1, h, w, classes) NHWC, for a
    /// segmentation network (engine only).
    pub fn segment(&self, input: &[f32], h: usize, w: usize) -> Result<xception_engine::Activations> {
        match self {
            Runner::Engine(engine) => engine
                .forward_with(input, 1, h, w, false)?
                .segmentation
                .ok_or_else(|| Error::Config(format!("{} is not a segmentation model", engine.network().config.name()))),
            Runner::Burn(model, device) => {
                let x = Tensor::<4>::from_data(burn::tensor::TensorData::new(input.to_vec(), [1, h, w, 3]), device).permute([0, 3, 1, 2]);
                let logits = model.segment(x)?.permute([0, 2, 3, 1]);
                let [n, h, w, c] = logits.dims();
                let data = logits.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| Error::Config(format!("reading logits: {e:?}")))?;
                Ok(xception_engine::Activations { n, h, w, c, data })
            }
        }
    }
}

/// Consecutive runs of inputs sharing a size, at most `batch_size` long.
pub fn equal_size_batches(items: &[Item], batch_size: usize) -> Vec<&[Item]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let size = (items[start].height, items[start].width);
        let mut end = start + 1;
        while end < items.len() && end - start < batch_size.max(1) && (items[end].height, items[end].width) == size {
            end += 1;
        }
        out.push(&items[start..end]);
        start = end;
    }
    out
}
