//! Keras weights: Keras 3 `.keras` archives (with transfer-learning heads) and bare
//! `.weights.h5` files, converted to our canonical tensors (timm names, PyTorch layouts).
//!
//! Keras stores a layer's variables under a *generic* name: the snake-cased class name with a
//! per-class counter in the order the layers appear in their container (`conv2d`, `conv2d_1`,
//! `separable_conv2d_5`, ...), not the layer's own name. We derive the order of Keras' Xception
//! from the architecture description (Keras builds each residual projection before the block's
//! separable convs), check it against the archive's `config.json` layer by layer, and map
//! positionally, so Keras' session-dependent auto-names (`conv2d_3`, `batch_normalization_7`)
//! never matter.

use crate::arch::{Activation, DenseSpec, ModelConfig, Network, Op, Pooling, Shortcut, Variant};
use crate::error::{Error, Result};
use crate::weights::{HostTensor, TensorMap};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A Keras layer class that holds weights in the Xception backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KerasClass {
    Conv2D,
    SeparableConv2D,
    BatchNormalization,
}

impl KerasClass {
    fn name(self) -> &'static str {
        match self {
            KerasClass::Conv2D => "Conv2D",
            KerasClass::SeparableConv2D => "SeparableConv2D",
            KerasClass::BatchNormalization => "BatchNormalization",
        }
    }
}

/// One weighted layer of `keras.applications.Xception`.
#[derive(Clone, Debug)]
struct KerasLayer {
    class: KerasClass,
    /// The name Keras gives it (None: an auto-named residual layer).
    name: Option<String>,
    /// Our key prefix for its tensors.
    key: String,
}

/// Keras' Xception weighted layers, from the description, in the order of Keras' `model.layers`
/// (its functional graph's order: a block's separable convs, then its residual projection).
fn keras_layers(net: &Network) -> Vec<KerasLayer> {
    keras_layers_in(net, false)
}

/// With `construction`, in the order Keras' builder creates them (each residual projection
/// before its block's separable convs): the numbering of Keras-1 auto-names
/// (`convolution2d_3`, `batchnormalization_36`, ...) in the published ImageNet `.h5` files.
fn keras_layers_in(net: &Network, construction: bool) -> Vec<KerasLayer> {
    let mut out = Vec::new();
    let push_ops = |out: &mut Vec<KerasLayer>, ops: &[Op], names: &mut dyn FnMut(KerasClass) -> Option<String>| {
        for op in ops {
            match op {
                Op::Conv(c) if c.key.ends_with(".pointwise") => {
                    let key = c.key.trim_end_matches(".pointwise").to_string();
                    out.push(KerasLayer { class: KerasClass::SeparableConv2D, name: names(KerasClass::SeparableConv2D), key });
                }
                Op::Conv(c) if c.key.ends_with(".conv1") => {} // the depthwise half of a SeparableConv2D
                Op::Conv(c) => out.push(KerasLayer { class: KerasClass::Conv2D, name: names(KerasClass::Conv2D), key: c.key.clone() }),
                Op::Norm(n) => out.push(KerasLayer { class: KerasClass::BatchNormalization, name: names(KerasClass::BatchNormalization), key: n.key.clone() }),
                _ => {}
            }
        }
    };
    // Stem: block1_conv1, block1_conv1_bn, block1_conv2, block1_conv2_bn.
    let stem_names = ["block1_conv1", "block1_conv1_bn", "block1_conv2", "block1_conv2_bn"];
    let mut i = 0;
    push_ops(&mut out, &net.stem, &mut |_| {
        i += 1;
        Some(stem_names[i - 1].to_string())
    });
    // Keras block k's layers are block{k}_sepconv{j} and block{k}_sepconv{j}_bn.
    let sepconv_names = |k: usize| {
        let mut sep = 0;
        move |class: KerasClass| match class {
            KerasClass::SeparableConv2D => {
                sep += 1;
                Some(format!("block{k}_sepconv{sep}"))
            }
            _ => Some(format!("block{k}_sepconv{sep}_bn")),
        }
    };
    for (b, block) in net.blocks.iter().enumerate() {
        let shortcut: &[Op] = match &block.shortcut {
            Shortcut::Project(ops) => ops,
            _ => &[],
        };
        if construction {
            push_ops(&mut out, shortcut, &mut |_| None);
        }
        push_ops(&mut out, &block.body, &mut sepconv_names(b + 2));
        if !construction {
            push_ops(&mut out, shortcut, &mut |_| None);
        }
    }
    push_ops(&mut out, &net.tail, &mut sepconv_names(14));
    out
}

/// Keras' `naming.to_snake_case` for the class names we meet.
fn snake_case(class: &str) -> String {
    let chars: Vec<char> = class.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            let prev_lower = chars[i - 1].is_ascii_lowercase();
            if next_lower || prev_lower {
                out.push('_');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Generic h5 names of a container's layers, in order: snake-cased class with per-class counter.
fn generic_names<'a>(classes: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut used: HashMap<String, usize> = HashMap::new();
    classes
        .map(|class| {
            let base = snake_case(class);
            let n = used.entry(base.clone()).and_modify(|n| *n += 1).or_insert(0);
            if *n == 0 {
                base
            } else {
                format!("{base}_{n}")
            }
        })
        .collect()
}

/// What a Keras file turned into.
pub struct KerasImport {
    pub config: ModelConfig,
    pub weights: TensorMap,
    /// The input size the Keras model was built for, when it states one.
    pub input_size: Option<(usize, usize)>,
}

impl KerasImport {
    /// Our canonical form: the tensors plus metadata recording model, head, pooling and input size.
    pub fn into_tensor_map(self) -> TensorMap {
        let mut map = self.weights;
        map.metadata.insert("model".into(), self.config.variant.name().into());
        map.metadata.insert("pooling".into(), match self.config.pooling {
            Pooling::Avg => "avg".into(),
            Pooling::Max => "max".into(),
        });
        if let Some(head) = &self.config.custom_head {
            map.metadata.insert("head".into(), serde_json::to_string(head).expect("head serialises"));
        }
        if let Some((h, w)) = self.input_size {
            map.metadata.insert("input_size".into(), format!("{h},{w}"));
        }
        map
    }
}

/// Reads a Keras 3 `.keras` archive or a bare Keras 3 `.weights.h5` of `keras.applications.Xception`.
pub fn read_keras(path: &Path) -> Result<KerasImport> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".keras") {
        read_archive(path)
    } else if name.ends_with(".h5") {
        let h5 = H5::open(path)?;
        if h5.file.link_exists("layers") {
            let net = Network::build(&ModelConfig { include_top: false, ..ModelConfig::new(Variant::Xception) })?;
            let mut weights = TensorMap::new(path.display().to_string());
            // A bare `model.save_weights()` of keras.applications.Xception: its layers, in order.
            let layers = keras_layers(&net);
            let generic = generic_names(layers.iter().map(|l| l.class.name()));
            for (layer, g) in layers.iter().zip(generic) {
                h5.convert_layer(layer, &format!("layers/{g}"), &mut weights)?;
            }
            let mut config = ModelConfig::new(Variant::Xception);
            if h5.file.link_exists("layers/dense") {
                // include_top=True: Dense 'predictions' with softmax (Keras' ImageNet classifier).
                let units = h5.dense("layers/dense", "predictions", &mut weights, "head.0")?;
                config.num_classes = units;
                config.custom_head = Some(vec![DenseSpec { units, activation: Activation::Softmax }]);
            } else {
                config.include_top = false;
            }
            Ok(KerasImport { config, weights, input_size: None })
        } else {
            import_legacy(&h5)
        }
    } else {
        Err(Error::file(path, "not a Keras file (expected .keras or .weights.h5)"))
    }
}

/// An open HDF5 file and its name for messages.
struct H5 {
    file: hdf5::File,
    path: PathBuf,
}

impl H5 {
    fn open(path: &Path) -> Result<H5> {
        let file = hdf5::File::open(path).map_err(|e| Error::file(path, format!("cannot open as HDF5: {e}")))?;
        Ok(H5 { file, path: path.to_path_buf() })
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::file(&self.path, message)
    }

    /// `vars/i` of a layer group as float32 with its shape.
    fn var(&self, group: &str, i: usize, layer: &str) -> Result<HostTensor> {
        let name = format!("{group}/vars/{i}");
        let ds = self.file.dataset(&name).map_err(|_| self.err(format!("layer '{layer}': missing dataset '{name}'")))?;
        self.read(&ds, &name)
    }

    /// A dataset as float32; a declared size out of all proportion to the file is refused before
    /// anything is allocated.
    fn read(&self, ds: &hdf5::Dataset, name: &str) -> Result<HostTensor> {
        let shape = ds.shape();
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if count.is_none_or(|c| c as u64 > 4 * self.file.size() + 1024) {
            return Err(self.err(format!("dataset '{name}' declares shape {shape:?}, larger than the file")));
        }
        let data = ds.read_raw::<f32>().map_err(|e| self.err(format!("dataset '{name}': {e}")))?;
        Ok(HostTensor::new(shape, data))
    }

    fn expect_shape(&self, t: &HostTensor, expected: &[usize], what: &str) -> Result<()> {
        if t.shape != expected {
            return Err(self.err(format!("{what} has shape {:?}, expected {:?}", t.shape, expected)));
        }
        Ok(())
    }

    /// Converts one backbone layer's variables to our tensors, checking every shape.
    fn convert_layer(&self, layer: &KerasLayer, group: &str, out: &mut TensorMap) -> Result<()> {
        let label = layer.name.clone().unwrap_or_else(|| format!("{} ({})", group, layer.key));
        match layer.class {
            KerasClass::Conv2D => {
                let k = self.var(group, 0, &label)?;
                if k.shape.len() != 4 {
                    return Err(self.err(format!("layer '{label}' kernel has shape {:?}, expected (kh, kw, in, out)", k.shape)));
                }
                out.insert(format!("{}.weight", layer.key), crate::weights::permute4(&k, [3, 2, 0, 1]));
            }
            KerasClass::SeparableConv2D => {
                let dw = self.var(group, 0, &label)?;
                let pw = self.var(group, 1, &label)?;
                if dw.shape.len() != 4 || dw.shape[3] != 1 || pw.shape.len() != 4 {
                    return Err(self.err(format!(
                        "layer '{label}': depthwise {:?} / pointwise {:?}, expected (kh, kw, C, 1) / (1, 1, C, O)",
                        dw.shape, pw.shape
                    )));
                }
                out.insert(format!("{}.conv1.weight", layer.key), crate::weights::permute4(&dw, [2, 3, 0, 1]));
                out.insert(format!("{}.pointwise.weight", layer.key), crate::weights::permute4(&pw, [3, 2, 0, 1]));
            }
            KerasClass::BatchNormalization => {
                for (i, suffix) in ["weight", "bias", "running_mean", "running_var"].iter().enumerate() {
                    let t = self.var(group, i, &label)?;
                    if t.shape.len() != 1 {
                        return Err(self.err(format!("layer '{label}' variable {i} has shape {:?}, expected (C,)", t.shape)));
                    }
                    out.insert(format!("{}.{suffix}", layer.key), t);
                }
            }
        }
        Ok(())
    }

    /// A Dense layer: kernel (in, out) and bias (out) -> `key.weight` (out, in), `key.bias`.
    /// Returns its units.
    fn dense(&self, group: &str, label: &str, out: &mut TensorMap, key: &str) -> Result<usize> {
        let kernel = self.var(group, 0, label)?;
        let bias = self.var(group, 1, label)?;
        if kernel.shape.len() != 2 {
            return Err(self.err(format!("layer '{label}' kernel has shape {:?}, expected (in, out)", kernel.shape)));
        }
        let units = kernel.shape[1];
        self.expect_shape(&bias, &[units], &format!("layer '{label}' bias"))?;
        insert_dense(out, key, &kernel, bias);
        Ok(units)
    }
}


/// A layer of a Keras functional or sequential config.
struct ConfigLayer<'a> {
    class: &'a str,
    name: &'a str,
    config: &'a Value,
}

fn config_layers(model: &Value) -> Vec<ConfigLayer<'_>> {
    model["config"]["layers"]
        .as_array()
        .map(|layers| {
            layers
                .iter()
                .map(|l| ConfigLayer {
                    class: l["class_name"].as_str().unwrap_or(""),
                    name: l["config"]["name"].as_str().or(l["name"].as_str()).unwrap_or(""),
                    config: &l["config"],
                })
                .collect()
        })
        .unwrap_or_default()
}

fn read_archive(path: &Path) -> Result<KerasImport> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| Error::file(path, format!("not a .keras archive (zip): {e}")))?;
    let mut config_text = String::new();
    zip.by_name("config.json")
        .map_err(|_| Error::file(path, "archive has no config.json"))?
        .take(64 << 20)
        .read_to_string(&mut config_text)
        .map_err(|e| Error::file(path, format!("config.json: {e}")))?;
    let config: Value = serde_json::from_str(&config_text).map_err(|e| Error::file(path, format!("config.json is not JSON: {e}")))?;
    // The HDF5 library reads files, so the weights are extracted next to a private temp name.
    let tmp = std::env::temp_dir().join(format!("xception-keras-{}-{}.weights.h5", std::process::id(), unique()));
    let mut copy = || -> std::io::Result<()> {
        let mut entry = zip.by_name("model.weights.h5").map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut out = std::fs::File::create(&tmp)?;
        std::io::copy(&mut entry, &mut out)?;
        Ok(())
    };
    if let Err(e) = copy() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, format!("model.weights.h5: {e}")));
    }
    let result = H5::open(&tmp).and_then(|mut h5| {
        h5.path = path.join("model.weights.h5");
        import_functional(&h5, &config, path)
    });
    let _ = std::fs::remove_file(&tmp);
    result
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The layers of `keras.applications.Xception` that hold weights, in the config's order.
const BACKBONE_CLASSES: [&str; 3] = ["Conv2D", "SeparableConv2D", "BatchNormalization"];

/// Layers that carry no weights and change nothing we model (their effect is in the description).
const STRUCTURAL: [&str; 5] = ["InputLayer", "Activation", "Add", "MaxPooling2D", "ReLU"];

fn import_functional(h5: &H5, model: &Value, path: &Path) -> Result<KerasImport> {
    let err = |m: String| Error::file(path, m);
    let top = config_layers(model);
    let top_generic = generic_names(top.iter().map(|l| l.class));
    // The backbone is either nested (a Functional named like `xception`) or inlined at top level.
    let nested = top.iter().position(|l| matches!(l.class, "Functional" | "Model" | "Sequential"));
    let (backbone, backbone_prefix, head_layers): (Vec<ConfigLayer>, String, Vec<(usize, &ConfigLayer)>) = match nested {
        Some(i) => {
            let inner = &model["config"]["layers"][i];
            let after: Vec<(usize, &ConfigLayer)> = top.iter().enumerate().skip(i + 1).collect();
            (config_layers(inner), format!("layers/{}/layers", top_generic[i]), after)
        }
        None => {
            let last_backbone = top.iter().rposition(|l| BACKBONE_CLASSES.contains(&l.class) || STRUCTURAL.contains(&l.class)).unwrap_or(0);
            let after: Vec<(usize, &ConfigLayer)> = top.iter().enumerate().skip(last_backbone + 1).collect();
            (config_layers(model), "layers".to_string(), after)
        }
    };

    let input_size = model["config"]["layers"][0]["config"]["batch_shape"]
        .as_array()
        .or(model["config"]["layers"][0]["config"]["batch_input_shape"].as_array())
        .and_then(|s| Some((s.get(1)?.as_u64()? as usize, s.get(2)?.as_u64()? as usize)));

    // Check the backbone is Keras' Xception: named layers by name, the auto-named residual
    // projections (conv2d_N, batch_normalization_N, session dependent) in graph order.
    let net = Network::build(&ModelConfig { include_top: false, ..ModelConfig::new(Variant::Xception) })?;
    let expected = keras_layers(&net);
    let by_name: HashMap<&str, &KerasLayer> = expected.iter().filter_map(|l| Some((l.name.as_deref()?, l))).collect();
    let mut residuals: Vec<&KerasLayer> = expected.iter().filter(|l| l.name.is_none()).collect();
    residuals.reverse(); // popped from the back in order
    let generic = generic_names(backbone.iter().map(|l| l.class));
    let mut weights = TensorMap::new(path.display().to_string());
    let mut next = 0;
    let mut backbone_top: Option<usize> = None; // index in the backbone of include_top's Dense
    let mut pooling = None;
    for (i, layer) in backbone.iter().enumerate() {
        if BACKBONE_CLASSES.contains(&layer.class) {
            let want = match by_name.get(layer.name) {
                Some(w) => *w,
                None => {
                    let pos = residuals.iter().rposition(|r| r.class.name() == layer.class);
                    match pos {
                        Some(p) if !layer.name.starts_with("block") => residuals.remove(p),
                        _ => return Err(err(format!("layer '{}' ({}) is not part of Keras' Xception", layer.name, layer.class))),
                    }
                }
            };
            if layer.class != want.class.name() {
                return Err(err(format!("layer '{}' is a {}, Keras' Xception has a {} there", layer.name, layer.class, want.class.name())));
            }
            if layer.class == "BatchNormalization" {
                let eps = layer.config["epsilon"].as_f64().unwrap_or(1e-3);
                let (center, scale) = (layer.config["center"].as_bool().unwrap_or(true), layer.config["scale"].as_bool().unwrap_or(true));
                if (eps - 1e-3).abs() > 1e-12 || !center || !scale {
                    return Err(err(format!("layer '{}': BatchNormalization with epsilon {eps}, center {center}, scale {scale} is not Keras' Xception", layer.name)));
                }
            }
            h5.convert_layer(want, &format!("{backbone_prefix}/{}", generic[i]), &mut weights)?;
            next += 1;
        } else if layer.class == "Dense" && next == expected.len() {
            backbone_top = Some(i);
        } else if matches!(layer.class, "GlobalAveragePooling2D" | "GlobalMaxPooling2D") && next == expected.len() {
            pooling = Some(if layer.class == "GlobalAveragePooling2D" { Pooling::Avg } else { Pooling::Max });
        } else if !STRUCTURAL.contains(&layer.class) {
            return Err(err(format!("unsupported layer '{}' ({}) in the backbone", layer.name, layer.class)));
        }
    }
    if next != expected.len() {
        return Err(err(format!("the backbone stops after {next} of Keras' Xception's {} weighted layers", expected.len())));
    }

    let mut config = ModelConfig::new(Variant::Xception);
    config.include_top = false;
    let mut dense = Vec::new();
    if let Some(i) = backbone_top {
        let units = h5.dense(&format!("{backbone_prefix}/{}", generic[i]), backbone[i].name, &mut weights, "head.0")?;
        dense.push(DenseSpec { units, activation: Activation::parse(backbone[i].config["activation"].as_str().unwrap_or("linear"))? });
    }
    // The head: pooling, Dense (any activation we support), Dropout, Flatten after pooling.
    for (i, layer) in head_layers {
        match layer.class {
            "GlobalAveragePooling2D" | "GlobalMaxPooling2D" => {
                if pooling.is_some() || !dense.is_empty() {
                    return Err(err(format!("layer '{}': a second global pooling is not supported", layer.name)));
                }
                pooling = Some(if layer.class == "GlobalAveragePooling2D" { Pooling::Avg } else { Pooling::Max });
            }
            "Dropout" => {}
            "Flatten" if pooling.is_some() => {}
            "Flatten" => return Err(err(format!("layer '{}': Flatten of the un-pooled feature map is not supported (it fixes the input size); use global pooling", layer.name))),
            "Dense" => {
                if pooling.is_none() {
                    return Err(err(format!("layer '{}': Dense on the un-pooled feature map is not supported", layer.name)));
                }
                let key = format!("head.{}", dense.len());
                let units = h5.dense(&format!("layers/{}", top_generic[i]), layer.name, &mut weights, &key)?;
                let activation = Activation::parse(layer.config["activation"].as_str().unwrap_or("linear"))
                    .map_err(|e| err(format!("layer '{}': {e}", layer.name)))?;
                dense.push(DenseSpec { units, activation });
            }
            "Activation" if !dense.is_empty() => {
                let a = Activation::parse(layer.config["activation"].as_str().unwrap_or(""))
                    .map_err(|e| err(format!("layer '{}': {e}", layer.name)))?;
                let last = dense.last_mut().unwrap();
                if last.activation != Activation::Linear {
                    return Err(err(format!("layer '{}': a second activation after a dense layer is not supported", layer.name)));
                }
                last.activation = a;
            }
            other => return Err(err(format!("unsupported layer '{}' ({other}) in the head", layer.name))),
        }
    }
    config.pooling = pooling.unwrap_or(Pooling::Avg);
    if !dense.is_empty() {
        config.include_top = true;
        config.num_classes = dense.last().unwrap().units;
        config.custom_head = Some(dense);
    }
    Ok(KerasImport { config, weights, input_size })
}

/// One layer group of a Keras 2 (legacy) HDF5 file: its weights in `weight_names` order.
#[derive(Clone, Debug)]
pub struct LegacyLayer {
    pub name: String,
    pub weights: Vec<(String, HostTensor)>,
}

/// Reads an attribute holding a list of strings (fixed or variable length); an empty list may be
/// stored as an empty float array (h5py's encoding of `[]`).
fn string_list(loc: &hdf5::Location, name: &str, h5: &H5) -> Result<Vec<String>> {
    use hdf5::types::{FixedAscii, TypeDescriptor, VarLenAscii, VarLenUnicode};
    let attr = loc.attr(name).map_err(|e| h5.err(format!("attribute '{name}': {e}")))?;
    if attr.size() == 0 {
        return Ok(vec![]);
    }
    let descriptor = attr.dtype().and_then(|t| t.to_descriptor()).map_err(|e| h5.err(format!("attribute '{name}': {e}")))?;
    let bad = |e: hdf5::Error| h5.err(format!("attribute '{name}': {e}"));
    match descriptor {
        TypeDescriptor::FixedAscii(n) | TypeDescriptor::FixedUnicode(n) if n <= 1024 => {
            Ok(attr.read_raw::<FixedAscii<1024>>().map_err(bad)?.iter().map(|s| s.as_str().to_string()).collect())
        }
        TypeDescriptor::VarLenAscii => Ok(attr.read_raw::<VarLenAscii>().map_err(bad)?.iter().map(|s| s.as_str().to_string()).collect()),
        TypeDescriptor::VarLenUnicode => {
            Ok(attr.read_raw::<VarLenUnicode>().map_err(bad)?.iter().map(|s| s.as_str().to_string()).collect())
        }
        other => Err(h5.err(format!("attribute '{name}' holds {other}, expected a list of names"))),
    }
}

/// Every layer of a Keras 2 HDF5 file (`model.save()` / `save_weights()` in Keras 1-2, or the
/// `.h5` format of Keras 3), with its weights. Weightless layers are left out.
pub fn read_legacy_layers(path: &Path) -> Result<Vec<LegacyLayer>> {
    let h5 = H5::open(path)?;
    legacy_layers(&h5)
}

fn legacy_layers(h5: &H5) -> Result<Vec<LegacyLayer>> {
    let root: hdf5::Group = if h5.file.link_exists("model_weights") {
        h5.file.group("model_weights").map_err(|e| h5.err(format!("model_weights: {e}")))?
    } else {
        h5.file.as_group().map_err(|e| h5.err(e.to_string()))?
    };
    let attrs = root.attr_names().map_err(|e| h5.err(e.to_string()))?;
    let names = if attrs.iter().any(|a| a == "layer_names") {
        string_list(&root, "layer_names", h5)?
    } else if attrs.iter().any(|a| a == "layer_names0") {
        // Keras splits attributes over 64 KiB into layer_names0, layer_names1, ...
        let mut all = Vec::new();
        let mut i = 0;
        while attrs.iter().any(|a| *a == format!("layer_names{i}")) {
            all.extend(string_list(&root, &format!("layer_names{i}"), h5)?);
            i += 1;
        }
        all
    } else {
        return Err(h5.err("neither a Keras 3 weights file ('layers' group) nor a Keras 2 one ('layer_names' attribute)"));
    };
    let mut layers = Vec::new();
    for name in names {
        let group = root.group(&name).map_err(|_| h5.err(format!("layer '{name}' is listed but has no group")))?;
        let weight_names = string_list(&group, "weight_names", h5)?;
        let mut weights = Vec::new();
        for w in weight_names {
            let ds = group.dataset(&w).map_err(|_| h5.err(format!("layer '{name}': missing dataset '{w}'")))?;
            let tensor = h5.read(&ds, &format!("{name}/{w}"))?;
            weights.push((w, tensor));
        }
        if !weights.is_empty() {
            layers.push(LegacyLayer { name, weights });
        }
    }
    Ok(layers)
}

/// The class and number of an auto-named layer: `convolution2d_3` (Keras 1), `conv2d_3` (Keras 2),
/// `conv2d` (the first one, Keras 3).
fn auto_name(name: &str) -> Option<(KerasClass, usize)> {
    let (base, n) = match name.rsplit_once('_') {
        Some((base, n)) if n.parse::<usize>().is_ok() => (base, n.parse().unwrap()),
        _ => (name, 0),
    };
    let class = match base {
        "convolution2d" | "conv2d" => KerasClass::Conv2D,
        "separableconvolution2d" | "separable_conv2d" => KerasClass::SeparableConv2D,
        "batchnormalization" | "batch_normalization" => KerasClass::BatchNormalization,
        _ => return None,
    };
    Some((class, n))
}

/// A Keras 2 HDF5 file of `keras.applications.Xception`: Keras' published ImageNet weights
/// (Keras-1 auto-names, numbered in construction order) or a file saved by Keras 2/3 (block
/// names, with auto-named residual layers). Layers map by name, auto-named ones by their number.
fn import_legacy(h5: &H5) -> Result<KerasImport> {
    let layers = legacy_layers(h5)?;
    let net = Network::build(&ModelConfig { include_top: false, ..ModelConfig::new(Variant::Xception) })?;
    let expected = keras_layers_in(&net, true);
    let by_name: HashMap<&str, &KerasLayer> = expected.iter().filter_map(|l| Some((l.name.as_deref()?, l))).collect();
    let all_auto = layers.iter().all(|l| !l.name.starts_with("block"));
    let mut weights = TensorMap::new(h5.path.display().to_string());
    let mut dense = None;
    let mut auto: Vec<(KerasClass, usize, &LegacyLayer)> = Vec::new();
    let mut mapped = 0;
    for layer in &layers {
        if let Some(want) = by_name.get(layer.name.as_str()) {
            convert_legacy(h5, layer, want, &mut weights)?;
            mapped += 1;
        } else if let Some((class, n)) = auto_name(&layer.name) {
            auto.push((class, n, layer));
        } else if layer.weights.len() == 2 && layer.weights[0].1.shape.len() == 2 && dense.is_none() {
            dense = Some(layer);
        } else {
            return Err(h5.err(format!("layer '{}' is not part of Keras' Xception", layer.name)));
        }
    }
    // Auto-named layers, by number within their class, onto the layers Keras names automatically:
    // all of them in a Keras-1 file, only the residual projections otherwise.
    for class in [KerasClass::Conv2D, KerasClass::SeparableConv2D, KerasClass::BatchNormalization] {
        let mut found: Vec<&(KerasClass, usize, &LegacyLayer)> = auto.iter().filter(|a| a.0 == class).collect();
        found.sort_by_key(|a| a.1);
        let targets: Vec<&KerasLayer> =
            expected.iter().filter(|l| l.class == class && (all_auto || l.name.is_none())).collect();
        if found.len() != targets.len() {
            return Err(h5.err(format!(
                "{} auto-named {} layers, Keras' Xception has {}",
                found.len(),
                class.name(),
                targets.len()
            )));
        }
        for ((_, _, layer), want) in found.into_iter().zip(targets) {
            convert_legacy(h5, layer, want, &mut weights)?;
            mapped += 1;
        }
    }
    if mapped != expected.len() {
        return Err(h5.err(format!("{mapped} of Keras' Xception's {} backbone layers found", expected.len())));
    }
    let mut config = ModelConfig::new(Variant::Xception);
    match dense {
        Some(layer) => {
            let (kernel, bias) = (&layer.weights[0].1, &layer.weights[1].1);
            let units = kernel.shape[1];
            if bias.shape != [units] {
                return Err(h5.err(format!("layer '{}' bias has shape {:?}, expected [{units}]", layer.name, bias.shape)));
            }
            insert_dense(&mut weights, "head.0", kernel, bias.clone());
            config.num_classes = units;
            config.custom_head = Some(vec![DenseSpec { units, activation: Activation::Softmax }]);
        }
        None => config.include_top = false,
    }
    Ok(KerasImport { config, weights, input_size: None })
}

fn convert_legacy(h5: &H5, layer: &LegacyLayer, want: &KerasLayer, out: &mut TensorMap) -> Result<()> {
    let n = match want.class {
        KerasClass::Conv2D => 1,
        KerasClass::SeparableConv2D => 2,
        KerasClass::BatchNormalization => 4,
    };
    if layer.weights.len() != n {
        return Err(h5.err(format!("layer '{}' has {} weights, a {} has {n}", layer.name, layer.weights.len(), want.class.name())));
    }
    let w = |i: usize| &layer.weights[i].1;
    let four = |t: &HostTensor, what: &str| {
        if t.shape.len() == 4 {
            Ok(())
        } else {
            Err(h5.err(format!("layer '{}' {what} has shape {:?}, expected 4 dimensions", layer.name, t.shape)))
        }
    };
    match want.class {
        KerasClass::Conv2D => {
            four(w(0), "kernel")?;
            out.insert(format!("{}.weight", want.key), crate::weights::permute4(w(0), [3, 2, 0, 1]));
        }
        KerasClass::SeparableConv2D => {
            four(w(0), "depthwise kernel")?;
            four(w(1), "pointwise kernel")?;
            out.insert(format!("{}.conv1.weight", want.key), crate::weights::permute4(w(0), [2, 3, 0, 1]));
            out.insert(format!("{}.pointwise.weight", want.key), crate::weights::permute4(w(1), [3, 2, 0, 1]));
        }
        KerasClass::BatchNormalization => {
            // gamma, beta, moving mean, moving variance (Keras 1 calls the last `running_std`,
            // but stores the variance: xception.md section 7.1).
            for (i, suffix) in ["weight", "bias", "running_mean", "running_var"].iter().enumerate() {
                out.insert(format!("{}.{suffix}", want.key), w(i).clone());
            }
        }
    }
    Ok(())
}

fn insert_dense(out: &mut TensorMap, key: &str, kernel: &HostTensor, bias: HostTensor) {
    let (n_in, n_out) = (kernel.shape[0], kernel.shape[1]);
    let mut t = vec![0f32; n_in * n_out];
    for i in 0..n_in {
        for o in 0..n_out {
            t[o * n_in + i] = kernel.data[i * n_out + o];
        }
    }
    out.insert(format!("{key}.weight"), HostTensor::new(vec![n_out, n_in], t));
    out.insert(format!("{key}.bias"), bias);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keras_generic_names() {
        assert_eq!(snake_case("SeparableConv2D"), "separable_conv2d");
        assert_eq!(snake_case("BatchNormalization"), "batch_normalization");
        assert_eq!(snake_case("GlobalAveragePooling2D"), "global_average_pooling2d");
        assert_eq!(snake_case("Conv2D"), "conv2d");
        assert_eq!(generic_names(["Dense", "Dropout", "Dense"].into_iter()), vec!["dense", "dropout", "dense_1"]);
    }

    #[test]
    fn keras_order_has_the_80_backbone_layers_with_residuals_after_each_block() {
        let net = Network::build(&ModelConfig { include_top: false, ..ModelConfig::new(Variant::Xception) }).unwrap();
        let layers = keras_layers(&net);
        assert_eq!(layers.len(), 80); // 81 with the classifier (xception.md section 4)
        assert_eq!(layers[4].name.as_deref(), Some("block2_sepconv1"));
        assert_eq!(layers[4].key, "block1.rep.0");
        assert_eq!((layers[8].key.as_str(), layers[8].name.as_deref()), ("block1.skip", None));
        assert_eq!(layers[9].key, "block1.skipbn");
        assert_eq!(layers.last().unwrap().name.as_deref(), Some("block14_sepconv2_bn"));
    }

    #[test]
    fn permute_hwio_to_oihw() {
        // (kh=1, kw=2, in=1, out=3): value = 10*w + o
        let t = HostTensor::new(vec![1, 2, 1, 3], vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0]);
        let p = crate::weights::permute4(&t, [3, 2, 0, 1]);
        assert_eq!(p.shape, vec![3, 1, 1, 2]);
        assert_eq!(p.data, vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
        // Larger than the tiles it is made in, ragged, every permutation the loaders use: each
        // value where its indices say.
        for (shape, perm) in [([1, 1, 35, 50], [3, 2, 0, 1]), ([3, 3, 40, 17], [3, 2, 0, 1]), ([3, 3, 33, 1], [2, 3, 0, 1])] {
            let t = HostTensor::new(shape.to_vec(), (0..shape.iter().product::<usize>()).map(|v| v as f32).collect());
            let p = crate::weights::permute4(&t, perm);
            assert_eq!(p.shape, perm.iter().map(|&i| shape[i]).collect::<Vec<_>>());
            for (at, v) in p.data.iter().enumerate() {
                let (d, c, b, a) = (at % p.shape[3], at / p.shape[3] % p.shape[2], at / (p.shape[3] * p.shape[2]) % p.shape[1], at / (p.shape[3] * p.shape[2] * p.shape[1]));
                let mut src = [0; 4];
                for (axis, i) in perm.iter().zip([a, b, c, d]) {
                    src[*axis] = i;
                }
                assert_eq!(*v as usize, ((src[0] * shape[1] + src[1]) * shape[2] + src[2]) * shape[3] + src[3], "{shape:?} {perm:?} at {at}");
            }
        }
    }
}
