//! Weight files: our canonical safetensors (timm `state_dict` names, PyTorch layouts, float32),
//! timm `.pth` checkpoints, validation against the architecture, and deterministic weights.

use crate::arch::{DenseSpec, ModelConfig, Network, TensorRole, Variant};
use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// A host tensor: shape and row-major float32 data.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?}");
        HostTensor { shape, data }
    }
}

/// Named tensors, as read from or written to a weight file. `source` names the file in errors.
#[derive(Clone, Debug, Default)]
pub struct TensorMap {
    pub source: String,
    pub tensors: BTreeMap<String, HostTensor>,
    /// safetensors `__metadata__` (our files record `model`).
    pub metadata: BTreeMap<String, String>,
}

/// Tensors in checkpoints that carry no weights we use.
fn is_bookkeeping(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

/// The floating-point element types weight files store.
#[derive(Clone, Copy, Debug)]
enum Float {
    F32,
    F64,
    F16,
    BF16,
}

/// Little-endian `dtype` values as float32.
fn to_f32(bytes: &[u8], dtype: Float, name: &str, source: &str) -> Result<Vec<f32>> {
    let chunks = |n: usize| {
        if bytes.len() % n != 0 {
            Err(Error::Weights {
                source_name: source.to_string(),
                message: format!("tensor '{name}': {} bytes is not a whole number of {dtype:?} values", bytes.len()),
            })
        } else {
            Ok(bytes.chunks_exact(n))
        }
    };
    Ok(match dtype {
        Float::F32 => chunks(4)?.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Float::F64 => chunks(8)?.map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        Float::F16 => chunks(2)?.map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        Float::BF16 => chunks(2)?.map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
    })
}

pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal: renormalise
            let shift = f.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((f << shift) & 0x3ff) << 13)
        }
        (31, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 112) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// Permutes a 4-D row-major tensor (TF/Keras HWIO kernels to PyTorch OIHW): output axis i is input axis `perm[i]`.
/// Made in 16 x 16 tiles of the output's first two axes: a 1x1 conv's (I, O) matrix transposed
/// a row of the output at a time read its input a column at a time, a cache miss a value (14%
/// of `embed`'s time with the real Keras model, 2026-12-07).
pub(crate) fn permute4(t: &HostTensor, perm: [usize; 4]) -> HostTensor {
    const TILE: usize = 16;
    let s = &t.shape;
    let shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let strides = [s[1] * s[2] * s[3], s[2] * s[3], s[3], 1];
    // The input's stride along each output axis.
    let from: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let mut data = vec![0f32; t.data.len()];
    for a0 in (0..shape[0]).step_by(TILE) {
        for b0 in (0..shape[1]).step_by(TILE) {
            for a in a0..(a0 + TILE).min(shape[0]) {
                for b in b0..(b0 + TILE).min(shape[1]) {
                    for c in 0..shape[2] {
                        for d in 0..shape[3] {
                            data[((a * shape[1] + b) * shape[2] + c) * shape[3] + d] = t.data[a * from[0] + b * from[1] + c * from[2] + d * from[3]];
                        }
                    }
                }
            }
        }
    }
    HostTensor::new(shape, data)
}

impl TensorMap {
    pub fn new(source: impl Into<String>) -> TensorMap {
        TensorMap { source: source.into(), tensors: BTreeMap::new(), metadata: BTreeMap::new() }
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Weights { source_name: self.source.clone(), message: message.into() }
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// Reads a weight file by its extension: `.safetensors`, a PyTorch `.pth` / `.pt` / `.bin`,
    /// or a Keras `.keras` / `.weights.h5` (converted to our names and layouts).
    pub fn read(path: &Path) -> Result<TensorMap> {
        // A TensorFlow checkpoint is named by its prefix (or its .index file).
        if crate::tf::index_path(path).is_some() {
            let ckpt = crate::tf::Checkpoint::open(path)?;
            return crate::tf::to_tensor_map(&ckpt, &crate::tf::infer_network(&ckpt, None)?);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => TensorMap::read_safetensors(path),
            Some("pth") | Some("pt") | Some("bin") => TensorMap::read_pytorch(path),
            Some("keras") | Some("h5") => Ok(crate::keras::read_keras(path)?.into_tensor_map()),
            _ => Err(Error::file(path, "unknown weight format (expected .safetensors, .pth, .pt, .keras, .weights.h5 or a TensorFlow checkpoint prefix)")),
        }
    }

    /// The input size recorded by the file (Keras models are built for one), if any.
    pub fn input_size(&self) -> Option<(usize, usize)> {
        let (h, w) = self.metadata.get("input_size")?.split_once(',')?;
        Some((h.trim().parse().ok()?, w.trim().parse().ok()?))
    }

    pub fn read_safetensors(path: &Path) -> Result<TensorMap> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        TensorMap::from_safetensors_bytes(&bytes, &path.display().to_string())
    }

    pub fn from_safetensors_bytes(bytes: &[u8], source: &str) -> Result<TensorMap> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Weights { source_name: source.into(), message: format!("not a valid safetensors file: {e}") })?;
        let mut map = TensorMap::new(source);
        if let Ok((_, meta)) = SafeTensors::read_metadata(bytes) {
            if let Some(m) = meta.metadata() {
                map.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            }
        }
        for (name, view) in st.tensors() {
            if is_bookkeeping(&name) {
                continue;
            }
            let dtype = match view.dtype() {
                Dtype::F32 => Float::F32,
                Dtype::F64 => Float::F64,
                Dtype::F16 => Float::F16,
                Dtype::BF16 => Float::BF16,
                other => {
                    return Err(map.error(format!("tensor '{name}' has dtype {other:?}; weights must be floating point")))
                }
            };
            let data = to_f32(view.data(), dtype, &name, source)?;
            map.insert(name, HostTensor::new(view.shape().to_vec(), data));
        }
        Ok(map)
    }

    /// A PyTorch checkpoint (`torch.save(state_dict)`, or a dict holding it under `state_dict` /
    /// `model` / `state_dict_ema`, as training scripts save).
    pub fn read_pytorch(path: &Path) -> Result<TensorMap> {
        let source = path.display().to_string();
        let open = |key: Option<&str>| match key {
            None => pytorch_reader::PytorchReader::new(path),
            Some(k) => pytorch_reader::PytorchReader::with_top_level_key(path, k),
        };
        // Training scripts wrap the state dict: {"state_dict": ..., "epoch": ...}. Prefer the
        // wrapped dict when there is one, else the file's own top level.
        let reader = ["state_dict", "model", "state_dict_ema"]
            .iter()
            .find_map(|k| open(Some(k)).ok().filter(|r| !r.is_empty()))
            .map(Ok)
            .unwrap_or_else(|| open(None))
            .map_err(|e| Error::file(path, format!("not a readable PyTorch checkpoint: {e}")))?;
        if reader.is_empty() {
            return Err(Error::file(path, "PyTorch checkpoint holds no tensors"));
        }
        let mut map = TensorMap::new(source.clone());
        for (name, t) in reader.tensors() {
            if is_bookkeeping(name) {
                continue;
            }
            use pytorch_reader::DType;
            let dtype = match t.dtype() {
                DType::F32 => Float::F32,
                DType::F64 => Float::F64,
                DType::F16 => Float::F16,
                DType::BF16 => Float::BF16,
                other => return Err(map.error(format!("tensor '{name}' has dtype {other:?}; weights must be floating point"))),
            };
            let bytes = t.read().map_err(|e| map.error(format!("tensor '{name}': {e}")))?;
            let data = to_f32(&bytes, dtype, name, &source)?;
            if data.len() != t.shape().iter().product::<usize>() {
                return Err(map.error(format!("tensor '{name}': data does not fill shape {:?}", t.shape())));
            }
            map.insert(name.clone(), HostTensor::new(t.shape().to_vec(), data));
        }
        Ok(map)
    }

    /// Writes float32 safetensors atomically ([`crate::atomic`]).
    pub fn write_safetensors(&self, path: &Path) -> Result<()> {
        let metadata = &self.metadata;
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, t) in &self.tensors {
            let len = t.data.len() * 4;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap());
        }
        let mut head = serde_json::to_vec(&header).unwrap();
        while head.len() % 8 != 0 {
            head.push(b' ');
        }
        crate::atomic::write_with(path, |f| {
            f.write_all(&(head.len() as u64).to_le_bytes())?;
            f.write_all(&head)?;
            for t in self.tensors.values() {
                for v in &t.data {
                    f.write_all(&v.to_le_bytes())?;
                }
            }
            Ok(())
        })
    }

    /// Checks that every tensor the network needs is present with the right shape.
    /// Returns the names present in the file that the network does not use.
    pub fn check(&self, net: &Network) -> Result<Vec<String>> {
        let expected = net.tensors();
        let mut missing = Vec::new();
        for spec in &expected {
            match self.tensors.get(&spec.name) {
                None => missing.push(spec.name.clone()),
                Some(t) if t.shape != spec.shape => {
                    return Err(self.error(format!(
                        "tensor '{}' has shape {:?}, expected {:?} for {}",
                        spec.name,
                        t.shape,
                        spec.shape,
                        net.variant()
                    )))
                }
                Some(t) => {
                    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                        return Err(self.error(format!("tensor '{}' holds a non-finite value ({}) at index {i}", spec.name, t.data[i])));
                    }
                }
            }
        }
        if !missing.is_empty() {
            let more = if missing.len() > 3 { format!(" (and {} more)", missing.len() - 3) } else { String::new() };
            let hint = if missing.len() == expected.len() {
                format!("; is this a {} weight file?", net.variant())
            } else {
                String::new()
            };
            return Err(self.error(format!(
                "missing tensor{} {}{more}{hint}",
                if missing.len() > 1 { "s" } else { "" },
                missing.iter().take(3).map(|m| format!("'{m}'")).collect::<Vec<_>>().join(", ")
            )));
        }
        let used: std::collections::HashSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
        Ok(self.tensors.keys().filter(|k| !used.contains(k.as_str())).cloned().collect())
    }

    /// The configuration these weights were saved for: `variant` if given, else the `model` our
    /// files record, else the variant whose tensor names and shapes they match. The classifier
    /// (and its number of classes) is taken from the file. `xception` and `legacy_xception` share
    /// their tensor names; without metadata, timm's `legacy_xception` is assumed.
    /// Whether these tensors are `config`'s network: all of them, or (for a model the caller
    /// named) a superset. A mismatch is kept in `first_error` for the caller's report.
    fn fits(&self, config: &ModelConfig, named: bool, first_error: &mut Option<Error>) -> Result<bool> {
        match self.check(&Network::build(config)?) {
            Ok(unused) => Ok(named || unused.is_empty()),
            Err(e) => {
                first_error.get_or_insert(e);
                Ok(false)
            }
        }
    }

    pub fn infer_config(&self, variant: Option<Variant>) -> Result<ModelConfig> {
        let named_config = self.metadata.get("model").map(|m| ModelConfig::from_name(m)).transpose()?;
        let named = match variant {
            Some(v) => Some(v),
            None => named_config.as_ref().map(|c| c.variant),
        };
        // DeepLabv3+: timm's backbone tensors plus the head's, the classes in `logits.weight`.
        if let Some(logits) = self.tensors.get("logits.weight").filter(|_| self.tensors.contains_key("aspp.aspp0.conv.weight")) {
            let classes = match logits.shape[..] {
                [k, _, 1, 1] => k,
                ref shape => return Err(self.error(format!("tensor 'logits.weight' has shape {shape:?}, expected (classes, 256, 1, 1)"))),
            };
            let candidates = match named {
                Some(v) => vec![v],
                None => vec![Variant::Xception65, Variant::Xception71, Variant::Xception41],
            };
            let mut first_error = None;
            for v in candidates {
                let config = crate::arch::Segmentation::config(v, classes, 16)?;
                if self.fits(&config, named.is_some(), &mut first_error)? {
                    return Ok(config);
                }
            }
            return Err(first_error.unwrap_or_else(|| self.error("holds a DeepLabv3+ head on no known backbone; pass --model")));
        }
        let candidates: Vec<Variant> = match named {
            Some(v) => vec![v],
            None => Variant::ALL.into_iter().filter(|v| *v != Variant::Xception).collect(),
        };
        let custom_head: Option<Vec<DenseSpec>> = match self.metadata.get("head") {
            Some(json) => Some(serde_json::from_str(json).map_err(|e| self.error(format!("metadata 'head' is not a valid head description: {e}")))?),
            None => None,
        };
        let pooling = self.metadata.get("pooling").map(|p| crate::arch::Pooling::parse(p)).transpose()?;
        let mut first_error = None;
        for v in candidates {
            let mut config = ModelConfig::new(v);
            config.pooling = pooling.unwrap_or(config.pooling);
            let head = match &custom_head {
                Some(layers) => format!("head.{}.weight", layers.len() - 1),
                None => format!("{}.weight", v.classifier_key()),
            };
            config.custom_head = custom_head.clone();
            match self.tensors.get(&head).map(|t| t.shape.clone()) {
                Some(shape) if shape.len() == 2 => config.num_classes = shape[0],
                Some(shape) => return Err(self.error(format!("tensor '{head}' has shape {shape:?}, expected (classes, features)"))),
                None => config.include_top = false,
            }
            if self.fits(&config, named.is_some(), &mut first_error)? {
                return Ok(config);
            }
        }
        match (named, first_error) {
            (Some(_), Some(e)) => Err(e),
            _ => Err(self.error("does not match any known model; pass --model")),
        }
    }

    /// Only the tensors the network uses (drops a classifier when exporting a no-top model, etc.),
    /// with the same metadata.
    pub fn restricted_to(&self, net: &Network) -> TensorMap {
        let mut out = TensorMap::new(self.source.clone());
        out.metadata = self.metadata.clone();
        for spec in net.tensors() {
            if let Some(t) = self.tensors.get(&spec.name) {
                out.insert(spec.name, t.clone());
            }
        }
        out
    }
}

/// `n` values in [-1, 1): a splitmix64 stream keyed by FNV-1a of `name`, exact in f64. The
/// Python fixture tool implements the same function, so both sides derive identical weights.
pub fn deterministic_uniform(name: &str, n: usize) -> Vec<f64> {
    let mut seed: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        seed = (seed ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    (1..=n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// Deterministic, non-trivial weights for every tensor of `net` (unit-variance conv outputs for
/// unit-variance inputs). Running statistics are mean 0, variance 1 unless overridden.
pub fn deterministic(net: &Network) -> TensorMap {
    let mut map = TensorMap::new("deterministic weights");
    for spec in net.tensors() {
        let n = spec.numel();
        let u = || deterministic_uniform(&spec.name, n);
        let data: Vec<f32> = match spec.role {
            TensorRole::ConvWeight | TensorRole::LinearWeight => {
                let scale = (3.0 / spec.fan_in as f64).sqrt();
                u().into_iter().map(|v| (v * scale) as f32).collect()
            }
            TensorRole::LinearBias | TensorRole::ConvBias => u().into_iter().map(|v| (0.1 * v) as f32).collect(),
            TensorRole::NormWeight => u().into_iter().map(|v| (1.0 + 0.25 * v) as f32).collect(),
            TensorRole::NormBias => u().into_iter().map(|v| (0.25 * v) as f32).collect(),
            TensorRole::NormRunningMean => vec![0.0; n],
            TensorRole::NormRunningVar => vec![1.0; n],
        };
        map.insert(spec.name.clone(), HostTensor::new(spec.shape.clone(), data));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_convert_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn deterministic_stream_is_in_range_and_keyed_by_name() {
        let a = deterministic_uniform("conv1.weight", 1000);
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_ne!(a, deterministic_uniform("conv2.weight", 1000));
        let mean = a.iter().sum::<f64>() / 1000.0;
        assert!(mean.abs() < 0.1);
    }
}

impl xception_engine::Weights for TensorMap {
    fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors.get(name).map(|t| t.data.as_slice())
    }
}
