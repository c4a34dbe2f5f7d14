//! TensorFlow checkpoints (the V2 "tensor bundle": `<prefix>.index` + `<prefix>.data-NNNNN-of-MMMMM`)
//! read natively, and the TF DeepLab / TF-slim Xception variable names mapped onto ours.
//!
//! The index is an SSTable (LevelDB table format: footer with the index block's handle, blocks
//! of prefix-compressed keys with restart points, each block followed by a compression byte and
//! a masked CRC32C); its values are `BundleEntryProto` messages giving each tensor's dtype,
//! shape, shard, offset, size and masked CRC32C; the key "" holds the `BundleHeaderProto`.

use crate::arch::{Network, TensorRole, Variant};
use crate::error::{Error, Result};
use crate::weights::{HostTensor, TensorMap};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const TABLE_MAGIC: u64 = 0xdb47_7524_8b80_fb57;
const FOOTER_LEN: usize = 48;

/// tensorflow/core/protobuf/tensor_bundle.proto
#[derive(Clone, PartialEq, prost::Message)]
struct BundleHeaderProto {
    #[prost(int32, tag = "1")]
    num_shards: i32,
    /// 0 little-endian, 1 big-endian
    #[prost(int32, tag = "2")]
    endianness: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BundleEntryProto {
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
    #[prost(int32, tag = "3")]
    shard_id: i32,
    #[prost(int64, tag = "4")]
    offset: i64,
    #[prost(int64, tag = "5")]
    size: i64,
    #[prost(fixed32, tag = "6")]
    crc32c: u32,
    /// Partitioned variables: not supported (the reader says so).
    #[prost(bytes = "vec", repeated, tag = "7")]
    slices: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
    #[prost(bool, tag = "3")]
    unknown_rank: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

/// TF's DataType values we can turn into float32, with their element size.
fn dtype_info(dtype: i32) -> Option<(&'static str, usize)> {
    Some(match dtype {
        1 => ("float32", 4),
        2 => ("float64", 8),
        3 => ("int32", 4),
        4 => ("uint8", 1),
        9 => ("int64", 8),
        10 => ("bool", 1),
        14 => ("bfloat16", 2),
        19 => ("float16", 2),
        _ => return None,
    })
}

fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `<prefix>.index` file of a checkpoint named by its prefix or by the index file itself.
pub fn index_path(path: &Path) -> Option<PathBuf> {
    let s = path.to_string_lossy();
    if s.ends_with(".index") && path.is_file() {
        return Some(path.to_path_buf());
    }
    let index = PathBuf::from(format!("{s}.index"));
    index.is_file().then_some(index)
}

/// One tensor's place in the data files.
struct Entry {
    dtype: i32,
    shape: Vec<usize>,
    shard: usize,
    offset: u64,
    size: usize,
    crc: u32,
}

/// An open checkpoint: the parsed index, tensors read on demand.
pub struct Checkpoint {
    index: PathBuf,
    prefix: String,
    num_shards: usize,
    entries: BTreeMap<String, Entry>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let index = index_path(path).ok_or_else(|| Error::file(path, "not a TensorFlow checkpoint (no .index file)"))?;
        let bytes = std::fs::read(&index).map_err(|e| Error::io(&index, e))?;
        let err = |m: String| Error::file(&index, m);
        let records = sstable_records(&bytes).map_err(err)?;
        let mut header = None;
        let mut entries = BTreeMap::new();
        for (key, value) in records {
            if key.is_empty() {
                header = Some(<BundleHeaderProto as prost::Message>::decode(&value[..]).map_err(|e| err(format!("bundle header: {e}")))?);
                continue;
            }
            let name = String::from_utf8(key).map_err(|_| err("a tensor name is not UTF-8".into()))?;
            let e = <BundleEntryProto as prost::Message>::decode(&value[..]).map_err(|e| err(format!("entry of '{name}': {e}")))?;
            if !e.slices.is_empty() {
                return Err(err(format!("tensor '{name}' is partitioned into slices, which is not supported")));
            }
            let shape = e.shape.as_ref().map(|s| s.dim.iter().map(|d| d.size.max(0) as usize).collect()).unwrap_or_default();
            entries.insert(
                name,
                Entry { dtype: e.dtype, shape, shard: e.shard_id.max(0) as usize, offset: e.offset.max(0) as u64, size: e.size.max(0) as usize, crc: e.crc32c },
            );
        }
        let header = header.ok_or_else(|| err("no bundle header (the \"\" entry)".into()))?;
        if header.endianness != 0 {
            return Err(err("a big-endian checkpoint; only little-endian ones are read".into()));
        }
        let prefix = index.to_string_lossy().trim_end_matches(".index").to_string();
        Ok(Checkpoint { index, prefix, num_shards: header.num_shards.max(1) as usize, entries })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// A tensor as float32 (floats, integers and bools convert; strings are refused), its bytes
    /// checked against the stored CRC32C.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let e = self.entries.get(name).ok_or_else(|| Error::file(&self.index, format!("no tensor '{name}'")))?;
        let (kind, width) = dtype_info(e.dtype).ok_or_else(|| Error::file(&self.index, format!("tensor '{name}' has TF dtype {}, not a number type", e.dtype)))?;
        let count: usize = e.shape.iter().product();
        if count * width != e.size {
            return Err(Error::file(&self.index, format!("tensor '{name}': {} bytes for shape {:?} of {kind}", e.size, e.shape)));
        }
        if e.shard >= self.num_shards {
            return Err(Error::file(&self.index, format!("tensor '{name}' is in shard {} of {}", e.shard, self.num_shards)));
        }
        let data_path = PathBuf::from(format!("{}.data-{:05}-of-{:05}", self.prefix, e.shard, self.num_shards));
        let mut f = std::fs::File::open(&data_path).map_err(|err| Error::io(&data_path, err))?;
        let mut bytes = vec![0u8; e.size];
        f.seek(SeekFrom::Start(e.offset)).and_then(|_| f.read_exact(&mut bytes)).map_err(|err| {
            Error::file(&data_path, format!("tensor '{name}' at bytes {}..{}: {err} (truncated data file?)", e.offset, e.offset + e.size as u64))
        })?;
        if masked_crc32c(&bytes) != e.crc {
            return Err(Error::file(&data_path, format!("tensor '{name}' fails its CRC32C check: the data file is corrupt")));
        }
        let data: Vec<f32> = match kind {
            "float32" => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            "float64" => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            "int32" => bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            "int64" => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            "uint8" | "bool" => bytes.iter().map(|&b| b as f32).collect(),
            "bfloat16" => bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
            "float16" => bytes.chunks_exact(2).map(|c| crate::weights::f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            _ => unreachable!("dtype_info lists every kind"),
        };
        Ok(HostTensor::new(e.shape.clone(), data))
    }
}

/// (key, value) pairs of an SSTable.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// Every (key, value) of an SSTable, in key order.
fn sstable_records(file: &[u8]) -> std::result::Result<Records, String> {
    if file.len() < FOOTER_LEN {
        return Err(format!("{} bytes is too short for a checkpoint index", file.len()));
    }
    let footer = &file[file.len() - FOOTER_LEN..];
    if u64::from_le_bytes(footer[40..48].try_into().unwrap()) != TABLE_MAGIC {
        return Err("not an SSTable (bad magic number): not a TensorFlow V2 checkpoint index".into());
    }
    let mut at = 0;
    let handle = |at: &mut usize| -> std::result::Result<(usize, usize), String> {
        let offset = varint(footer, at).ok_or("corrupt footer")?;
        let size = varint(footer, at).ok_or("corrupt footer")?;
        Ok((offset as usize, size as usize))
    };
    let _metaindex = handle(&mut at)?;
    let index = handle(&mut at)?;
    let mut out = Vec::new();
    for (_, handle) in block_records(&read_block(file, index)?)? {
        let mut at = 0;
        let offset = varint(&handle, &mut at).ok_or("corrupt block handle")? as usize;
        let size = varint(&handle, &mut at).ok_or("corrupt block handle")? as usize;
        out.extend(block_records(&read_block(file, (offset, size))?)?);
    }
    Ok(out)
}

/// A block's contents, its trailer (compression type, masked CRC32C) checked.
fn read_block(file: &[u8], (offset, size): (usize, usize)) -> std::result::Result<Vec<u8>, String> {
    let end = offset.checked_add(size).and_then(|e| e.checked_add(5)).filter(|&e| e <= file.len()).ok_or_else(|| format!("block at {offset} (+{size}) runs past the end of the index"))?;
    let (data, trailer) = (&file[offset..offset + size], &file[offset + size..end]);
    let stored = u32::from_le_bytes(trailer[1..5].try_into().unwrap());
    if masked_crc32c(&file[offset..offset + size + 1]) != stored {
        return Err(format!("block at {offset} fails its CRC32C check: the index is corrupt"));
    }
    match trailer[0] {
        0 => Ok(data.to_vec()),
        1 => snap::raw::Decoder::new().decompress_vec(data).map_err(|e| format!("block at {offset}: bad snappy data: {e}")),
        t => Err(format!("block at {offset}: unknown compression type {t}")),
    }
}

/// The entries of one block: keys prefix-compressed against the previous key.
fn block_records(block: &[u8]) -> std::result::Result<Records, String> {
    if block.len() < 4 {
        return Err("block too short".into());
    }
    let restarts = u32::from_le_bytes(block[block.len() - 4..].try_into().unwrap()) as usize;
    let end = restarts.checked_mul(4).and_then(|r| block.len().checked_sub(4 + r)).ok_or("corrupt restart array")?;
    let mut out = Vec::new();
    let mut key: Vec<u8> = Vec::new();
    let mut at = 0;
    while at < end {
        let shared = varint(block, &mut at).ok_or("corrupt entry")? as usize;
        let unshared = varint(block, &mut at).ok_or("corrupt entry")? as usize;
        let value_len = varint(block, &mut at).ok_or("corrupt entry")? as usize;
        if shared > key.len() || at + unshared + value_len > end {
            return Err("corrupt entry".into());
        }
        key.truncate(shared);
        key.extend_from_slice(&block[at..at + unshared]);
        at += unshared;
        out.push((key.clone(), block[at..at + value_len].to_vec()));
        at += value_len;
    }
    Ok(out)
}

// ---- TF DeepLab / TF-slim Xception names --------------------------------------------------------

/// The TF backbone scope (`xception_65`) of a checkpoint, and which of ours it is.
fn backbone_of(ckpt: &Checkpoint) -> Option<(Variant, &'static str)> {
    [(Variant::Xception41, "xception_41"), (Variant::Xception65, "xception_65"), (Variant::Xception71, "xception_71")]
        .into_iter()
        .find(|(_, scope)| ckpt.entries.contains_key(&format!("{scope}/entry_flow/conv1_1/weights")))
}

/// timm block index -> `<flow>/block<k>/unit_<u>` (aligned_xception.md 3.1): entry blocks until
/// the first 728 -> 728 stride-1 module, the middle flow's units, then the exit flow's two blocks.
fn block_scopes(net: &Network) -> Vec<String> {
    let middle: Vec<bool> = net
        .blocks
        .iter()
        .map(|b| matches!(b.shortcut, crate::arch::Shortcut::Identity) && b.body.iter().any(|op| matches!(op, crate::arch::Op::Conv(c) if c.in_channels == 728)))
        .collect();
    let first_middle = middle.iter().position(|&m| m).unwrap_or(net.blocks.len());
    let last_middle = middle.iter().rposition(|&m| m).unwrap_or(first_middle);
    (0..net.blocks.len())
        .map(|i| {
            if i < first_middle {
                format!("entry_flow/block{}/unit_1", i + 1)
            } else if i <= last_middle {
                format!("middle_flow/block1/unit_{}", i - first_middle + 1)
            } else {
                format!("exit_flow/block{}/unit_1", i - last_middle)
            }
        })
        .collect()
}

/// The TF variable holding our tensor `key` (deeplabv3plus.md 6, aligned_xception.md 8.3).
fn tf_name(key: &str, scope: &str, blocks: &[String]) -> Option<String> {
    let parts: Vec<&str> = key.split('.').collect();
    let leaf = *parts.last()?;
    let bn = |leaf: &str| -> Option<&'static str> {
        Some(match leaf {
            "weight" => "gamma",
            "bias" => "beta",
            "running_mean" => "moving_mean",
            "running_var" => "moving_variance",
            _ => return None,
        })
    };
    let var = |prefix: String, kind: &str| -> Option<String> {
        Some(match kind {
            "conv" | "conv_pw" => format!("{prefix}/weights"),
            "conv_dw" => format!("{prefix}/depthwise_weights"),
            "bn" | "bn_pw" | "bn_dw" => format!("{prefix}/BatchNorm/{}", bn(leaf)?),
            _ => return None,
        })
    };
    let half = |kind: &str| if kind.ends_with("_dw") { "depthwise" } else { "pointwise" };
    match parts[..] {
        ["stem", i, kind, _] => var(format!("{scope}/entry_flow/conv1_{}", i.parse::<usize>().ok()? + 1), kind),
        ["blocks", i, "shortcut", kind, _] => var(format!("{scope}/{}/xception_module/shortcut", blocks.get(i.parse::<usize>().ok()?)?), kind),
        ["blocks", i, "stack", conv, kind, _] => {
            let j = conv.strip_prefix("conv")?;
            var(format!("{scope}/{}/xception_module/separable_conv{j}_{}", blocks.get(i.parse::<usize>().ok()?)?, half(kind)), kind)
        }
        ["head", "fc", "weight"] => Some(format!("{scope}/logits/weights")),
        ["head", "fc", "bias"] => Some(format!("{scope}/logits/biases")),
        ["logits", "weight"] => Some("logits/semantic/weights".into()),
        ["logits", "bias"] => Some("logits/semantic/biases".into()),
        ["aspp", "project", kind, _] => var("concat_projection".into(), kind),
        ["aspp", module, kind, _] if kind.ends_with("_dw") || kind.ends_with("_pw") => var(format!("{module}_{}", half(kind)), kind),
        ["aspp", module, kind, _] => var(module.to_string(), kind),
        ["decoder", module, kind, _] if kind.ends_with("_dw") || kind.ends_with("_pw") => var(format!("decoder/decoder_{module}_{}", half(kind)), kind),
        ["decoder", module, kind, _] => var(format!("decoder/{module}"), kind),
        _ => None,
    }
}

/// TF layouts to PyTorch's (the permutations the Keras importer uses): conv (kh, kw, in, out)
/// -> (out, in, kh, kw); depthwise (kh, kw, C, 1) -> (C, 1, kh, kw); the 1x1 classifier conv
/// (1, 1, in, K) -> (K, in).
fn to_torch_layout(t: &HostTensor, want: &[usize], depthwise: bool) -> Option<HostTensor> {
    if t.shape.len() != 4 {
        return (t.shape == want).then(|| t.clone());
    }
    let out = crate::weights::permute4(t, if depthwise { [2, 3, 0, 1] } else { [3, 2, 0, 1] });
    if out.shape == want {
        Some(out)
    } else if want.len() == 2 && out.shape[2..] == [1, 1] && out.shape[..2] == *want {
        Some(HostTensor::new(want.to_vec(), out.data)) // the classifier as a dense layer
    } else {
        None
    }
}

/// The tensors of `net` from a TF checkpoint (TF DeepLab or TF-slim Xception names), in our
/// names and PyTorch layouts; every missing or mis-shaped tensor is named. A 1001-class TF-slim
/// classifier (index 0 = background) loses its background row for a 1000-class model.
pub fn to_tensor_map(ckpt: &Checkpoint, net: &Network) -> Result<TensorMap> {
    let (_, scope) = backbone_of(ckpt).ok_or_else(|| Error::file(&ckpt.index, "holds no xception_41/65/71 backbone (no '<net>/entry_flow/conv1_1/weights')"))?;
    let blocks = block_scopes(net);
    let mut map = TensorMap::new(ckpt.index.display().to_string());
    for spec in net.tensors() {
        let name = tf_name(&spec.name, scope, &blocks).ok_or_else(|| Error::Config(format!("no TF name known for '{}'", spec.name)))?;
        let mut t = ckpt.tensor(&name).map_err(|_| Error::file(&ckpt.index, format!("missing '{name}' (for our '{}')", spec.name)))?;
        if spec.name.starts_with("head.fc.") {
            let rows = if spec.role == TensorRole::LinearWeight { t.shape.get(3).copied() } else { t.shape.first().copied() };
            if rows == Some(spec.shape[0] + 1) {
                t = drop_background_class(&t, spec.role == TensorRole::LinearWeight);
            }
        }
        let depthwise = spec.name.ends_with("conv_dw.weight");
        let converted = to_torch_layout(&t, &spec.shape, depthwise)
            .ok_or_else(|| Error::file(&ckpt.index, format!("'{name}' has shape {:?}; '{}' needs {:?}", t.shape, spec.name, spec.shape)))?;
        map.insert(spec.name.clone(), converted);
    }
    map.metadata.insert("model".into(), net.config.name());
    map.metadata.insert("converted_from".into(), "TensorFlow checkpoint".into());
    Ok(map)
}

/// Removes class 0 from a (1, 1, in, 1001) classifier weight or its (1001,) bias.
fn drop_background_class(t: &HostTensor, weight: bool) -> HostTensor {
    if weight {
        let (cin, k) = (t.shape[2], t.shape[3]);
        let data = (0..cin).flat_map(|i| t.data[i * k + 1..(i + 1) * k].iter().copied()).collect();
        HostTensor::new(vec![1, 1, cin, k - 1], data)
    } else {
        HostTensor::new(vec![t.shape[0] - 1], t.data[1..].to_vec())
    }
}

/// What a TF checkpoint holds: a DeepLabv3+ network (with its class count) or a classifier.
pub fn infer_network(ckpt: &Checkpoint, output_stride: Option<usize>) -> Result<Network> {
    let (variant, scope) = backbone_of(ckpt).ok_or_else(|| Error::file(&ckpt.index, "holds no xception_41/65/71 backbone"))?;
    let config = if let Some(shape) = ckpt.shape("logits/semantic/weights") {
        let classes = *shape.last().ok_or_else(|| Error::file(&ckpt.index, "logits/semantic/weights has no shape"))?;
        crate::arch::Segmentation::config(variant, classes, output_stride.unwrap_or(16))?
    } else {
        let mut c = crate::arch::ModelConfig::new(variant);
        match ckpt.shape(&format!("{scope}/logits/weights")).and_then(|s| s.last().copied()) {
            Some(k) => c.num_classes = if k == 1001 { 1000 } else { k },
            None => c.include_top = false,
        }
        c.output_stride = output_stride.unwrap_or(32);
        c
    };
    Network::build(&config)
}
