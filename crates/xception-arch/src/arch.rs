//! The architecture as data.
//!
//! Every variant is described once, here, as a flat program of [`Op`]s grouped into named
//! blocks. The burn modules, the weight loader and exporter, the deterministic test weights and
//! `xception info` all read this description; none of them knows a variant by hand.
//!
//! Every parameterised op carries its checkpoint key (timm's `state_dict` prefix), so weights load
//! by name with no renaming table: `blocks.3.stack.conv2.conv_dw` holds
//! `blocks.3.stack.conv2.conv_dw.weight`, a norm `k` holds `k.weight`, `k.bias`,
//! `k.running_mean`, `k.running_var`.
//!
//! Sources: `shared/spec/xception.md` (Keras `xception`, timm `legacy_xception`) and
//! `shared/spec/aligned_xception.md` (timm `xception41/65/71`, `xception41p/65p`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// A network we can build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// `keras.applications.Xception`: TF 'same' padding (extra pixel bottom/right), BN eps 1e-3.
    Xception,
    /// timm `legacy_xception`: same graph and weight names, symmetric padding, BN eps 1e-5.
    LegacyXception,
    Xception41,
    Xception65,
    Xception71,
    Xception41p,
    Xception65p,
    /// Ours, for small problems and tests: the aligned (DeepLab) module design, about a quarter
    /// of the widths, two middle-flow modules (see [`aligned_block_cfg`]; `info` prints it).
    XceptionTiny,
}

/// The three ways the family builds its modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Chollet's original network (Keras / timm legacy): max-pool downsampling.
    Original,
    /// DeepLab's modified aligned Xception: three separable convs per module, strided third conv.
    Aligned,
    /// timm's pre-activation aligned Xception.
    AlignedPreact,
}

impl Variant {
    pub const ALL: [Variant; 8] = [
        Variant::Xception,
        Variant::LegacyXception,
        Variant::Xception41,
        Variant::Xception65,
        Variant::Xception71,
        Variant::Xception41p,
        Variant::Xception65p,
        Variant::XceptionTiny,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Xception => "xception",
            Variant::LegacyXception => "legacy_xception",
            Variant::Xception41 => "xception41",
            Variant::Xception65 => "xception65",
            Variant::Xception71 => "xception71",
            Variant::Xception41p => "xception41p",
            Variant::Xception65p => "xception65p",
            Variant::XceptionTiny => "xception_tiny",
        }
    }

    pub fn parse(name: &str) -> Result<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
            Error::Config(format!("unknown model '{name}'; known models: {}", known.join(", ")))
        })
    }

    pub fn family(self) -> Family {
        match self {
            Variant::Xception | Variant::LegacyXception => Family::Original,
            Variant::Xception41 | Variant::Xception65 | Variant::Xception71 | Variant::XceptionTiny => Family::Aligned,
            Variant::Xception41p | Variant::Xception65p => Family::AlignedPreact,
        }
    }

    /// BatchNorm epsilon of the reference: Keras' default 1e-3; PyTorch's default 1e-5 for timm's
    /// legacy port and `xception41p`; timm passes 1e-3 explicitly for the TF-ported aligned nets
    /// and `xception65p`. Our tiny net takes PyTorch's default.
    pub fn bn_eps(self) -> f64 {
        match self {
            Variant::LegacyXception | Variant::Xception41p | Variant::XceptionTiny => 1e-5,
            _ => 1e-3,
        }
    }

    /// BatchNorm momentum in PyTorch's convention (new = (1 - m) * old + m * batch): Keras'
    /// BatchNormalization decays with 0.99, i.e. m = 0.01; timm's nets use PyTorch's 0.1.
    pub fn bn_momentum(self) -> f64 {
        match self {
            Variant::Xception => 0.01,
            _ => 0.1,
        }
    }

    /// Smallest square input accepted. Keras refuses inputs under 71x71 for Xception; the aligned
    /// nets pad every stride-2 op, and we ask for at least one output pixel per 32x32 patch.
    pub fn min_input_size(self) -> usize {
        match self.family() {
            Family::Original => 71,
            _ => 32,
        }
    }

    /// Output strides the variant can run at.
    pub fn output_strides(self) -> &'static [usize] {
        match self.family() {
            Family::Original => &[32],
            _ => &[32, 16, 8],
        }
    }

    /// Key of the classifier in the reference state_dict.
    pub fn classifier_key(self) -> &'static str {
        match self.family() {
            Family::Original => "fc",
            _ => "head.fc",
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Global pooling before the classifier (or as the embedding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    Avg,
    Max,
}

impl Pooling {
    pub fn parse(s: &str) -> Result<Pooling> {
        match s {
            "avg" => Ok(Pooling::Avg),
            "max" => Ok(Pooling::Max),
            _ => Err(Error::Config(format!("unknown pooling '{s}' (expected avg or max)"))),
        }
    }
}

/// Activation after a dense layer (Keras' names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Linear,
    Relu,
    Softmax,
    Sigmoid,
    Tanh,
}

impl Activation {
    pub fn parse(s: &str) -> Result<Activation> {
        Ok(match s {
            "linear" => Activation::Linear,
            "relu" => Activation::Relu,
            "softmax" => Activation::Softmax,
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            other => return Err(Error::Config(format!("unsupported activation '{other}' (linear, relu, softmax, sigmoid, tanh)"))),
        })
    }
}

/// One dense layer of a custom head (a Keras transfer-learning model's classifier stack).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenseSpec {
    pub units: usize,
    pub activation: Activation,
}

/// The options a user picks on top of a variant.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    pub variant: Variant,
    pub num_classes: usize,
    /// Build the classifier (`fc` / `head.fc`). Without it the network ends at the pooled embedding.
    pub include_top: bool,
    /// A stack of dense layers (keys `head.0`, `head.1`, ...) replacing the reference classifier,
    /// as Keras transfer-learning models have. The last layer's units are the classes.
    pub custom_head: Option<Vec<DenseSpec>>,
    pub pooling: Pooling,
    pub output_stride: usize,
    /// Dropout before the classifier, active only in training (the paper used 0.5).
    pub drop_rate: f64,
    /// A DeepLabv3+ segmentation head instead of a classifier (aligned non-pre-act backbones).
    pub segmentation: Option<crate::deeplab::Segmentation>,
}

impl ModelConfig {
    pub fn new(variant: Variant) -> ModelConfig {
        ModelConfig {
            variant,
            num_classes: 1000,
            include_top: true,
            custom_head: None,
            pooling: Pooling::Avg,
            output_stride: 32,
            drop_rate: 0.0,
            segmentation: None,
        }
    }

    /// A model by name: a variant (`xception65`), or a DeepLabv3+ network on an aligned backbone
    /// (`deeplabv3plus_xception65`, output stride 16 and 21 classes by default).
    pub fn from_name(name: &str) -> Result<ModelConfig> {
        match name.strip_prefix(crate::deeplab::PREFIX) {
            Some(backbone) => crate::deeplab::Segmentation::config(Variant::parse(backbone)?, 21, 16),
            None => Ok(ModelConfig::new(Variant::parse(name)?)),
        }
    }

    /// The name `from_name` takes back.
    pub fn name(&self) -> String {
        match self.segmentation {
            Some(_) => format!("{}{}", crate::deeplab::PREFIX, self.variant.name()),
            None => self.variant.name().to_string(),
        }
    }

    /// Number of classes the network outputs, None without a classifier.
    pub fn classes(&self) -> Option<usize> {
        if !self.include_top {
            return None;
        }
        Some(self.custom_head.as_ref().and_then(|h| h.last()).map_or(self.num_classes, |d| d.units))
    }

    pub fn validate(&self) -> Result<()> {
        if !self.variant.output_strides().contains(&self.output_stride) {
            return Err(Error::Config(format!(
                "{} supports output stride {:?}, not {}",
                self.variant,
                self.variant.output_strides(),
                self.output_stride
            )));
        }
        if self.include_top && self.num_classes == 0 {
            return Err(Error::Config("num_classes must be at least 1".into()));
        }
        if let Some(head) = &self.custom_head {
            if head.is_empty() || head.iter().any(|d| d.units == 0) {
                return Err(Error::Config("a custom head needs at least one dense layer, each with at least one unit".into()));
            }
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            return Err(Error::Config(format!("drop rate {} is not in [0, 1)", self.drop_rate)));
        }
        if let Some(seg) = &self.segmentation {
            seg.validate(self)?;
        }
        Ok(())
    }
}

/// How a conv or pool pads its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// No padding.
    Valid,
    /// The same fixed padding on every side (PyTorch `padding=p`).
    Symmetric(usize),
    /// TensorFlow 'same': output ceil(n / stride); the odd pixel of padding goes after (bottom/right).
    TfSame,
}

impl Padding {
    /// `(before, after, output size)` along one axis of length `n`.
    pub fn resolve(self, n: usize, kernel: usize, stride: usize, dilation: usize) -> (usize, usize, usize) {
        let span = dilation * (kernel - 1) + 1;
        match self {
            Padding::Valid => (0, 0, if n >= span { (n - span) / stride + 1 } else { 0 }),
            Padding::Symmetric(p) => {
                let padded = n + 2 * p;
                (p, p, if padded >= span { (padded - span) / stride + 1 } else { 0 })
            }
            Padding::TfSame => {
                let out = n.div_ceil(stride);
                let total = ((out.max(1) - 1) * stride + span).saturating_sub(n);
                (total / 2, total - total / 2, out)
            }
        }
    }
}

/// A convolution. Only the DeepLab logits conv has a bias; every other conv in the family is
/// followed by a norm or nothing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Conv {
    pub key: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    /// `in_channels` for a depthwise conv, 1 otherwise.
    pub groups: usize,
    pub padding: Padding,
    pub bias: bool,
}

impl Conv {
    /// PyTorch OIHW weight shape.
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.out_channels, self.in_channels / self.groups, self.kernel, self.kernel]
    }

    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.out_channels == self.in_channels
    }
}

/// BatchNorm over channels (inference: running statistics).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Norm {
    pub key: String,
    pub channels: usize,
    pub eps: f64,
}

/// One step of the program.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Conv(Conv),
    Norm(Norm),
    Relu,
    MaxPool { kernel: usize, stride: usize, padding: Padding },
    /// A multi-level feature is read here (timm `feature_info` position).
    Tap { reduction: usize, channels: usize, module: String },
    /// The DeepLabv3+ decoder reads its low-level feature here: the stride-4 pointwise BN output,
    /// before any ReLU (deeplabv3plus.md section 3). Only in segmentation networks.
    DecoderTap,
}

/// How a block's residual connection is formed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shortcut {
    /// No residual: the block's output is its body's output.
    None,
    Identity,
    /// A projection (1x1 strided conv, with or without norm) of the block input.
    Project(Vec<Op>),
}

/// A residual module. `pre` runs first and both the body and the shortcut read its output
/// (pre-activation nets normalise before branching; in the others `pre` is empty and the
/// shortcut reads the un-rectified block input).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Block {
    pub name: String,
    pub pre: Vec<Op>,
    pub body: Vec<Op>,
    pub shortcut: Shortcut,
    /// Stride and dilation the block runs with (after output-stride adjustment), for display.
    pub stride: usize,
    pub dilation: usize,
}

/// A dense layer on pooled features, PyTorch layout: `key.weight` (out, in), `key.bias` (out).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Dense {
    pub key: String,
    pub in_features: usize,
    pub out_features: usize,
    pub activation: Activation,
}

/// A whole network.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Network {
    pub config: ModelConfig,
    pub stem: Vec<Op>,
    pub blocks: Vec<Block>,
    /// Ops after the last block (legacy exit convs; the pre-activation nets' final ReLU).
    pub tail: Vec<Op>,
    /// Dense layers after global pooling (empty: the network ends at the pooled embedding).
    pub head: Vec<Dense>,
    /// Channels of the final feature map and of the pooled embedding.
    pub num_features: usize,
    /// The DeepLabv3+ head, for segmentation networks.
    pub segmentation: Option<crate::deeplab::SegHead>,
}

/// Where a weight tensor lives and what it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorRole {
    ConvWeight,
    ConvBias,
    NormWeight,
    NormBias,
    NormRunningMean,
    NormRunningVar,
    LinearWeight,
    LinearBias,
}

impl TensorRole {
    pub fn trainable(&self) -> bool {
        !matches!(self, TensorRole::NormRunningMean | TensorRole::NormRunningVar)
    }
}

/// One named tensor the network expects in a weight file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: TensorRole,
    /// Inputs feeding one output of the layer that owns the tensor (for weight init scales).
    pub fan_in: usize,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Network {
    pub fn build(config: &ModelConfig) -> Result<Network> {
        config.validate()?;
        let net = match config.variant.family() {
            Family::Original => build_original(config),
            Family::Aligned | Family::AlignedPreact => build_aligned(config),
        };
        Ok(net)
    }

    pub fn variant(&self) -> Variant {
        self.config.variant
    }

    /// All ops in execution order, block by block (shortcuts after their body).
    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        let blocks = self.blocks.iter().flat_map(|b| {
            let shortcut: &[Op] = match &b.shortcut {
                Shortcut::Project(ops) => ops,
                _ => &[],
            };
            b.pre.iter().chain(b.body.iter()).chain(shortcut.iter())
        });
        let seg = self.segmentation.iter().flat_map(|s| s.ops());
        self.stem.iter().chain(blocks).chain(self.tail.iter()).chain(seg)
    }

    /// Every tensor a complete weight file holds for this network, in a stable order.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        for op in self.ops() {
            match op {
                Op::Conv(c) => {
                    let fan_in = c.in_channels / c.groups * c.kernel * c.kernel;
                    out.push(TensorSpec { name: format!("{}.weight", c.key), shape: c.weight_shape().to_vec(), role: TensorRole::ConvWeight, fan_in });
                    if c.bias {
                        out.push(TensorSpec { name: format!("{}.bias", c.key), shape: vec![c.out_channels], role: TensorRole::ConvBias, fan_in });
                    }
                }
                Op::Norm(n) => {
                    for (suffix, role) in [
                        ("weight", TensorRole::NormWeight),
                        ("bias", TensorRole::NormBias),
                        ("running_mean", TensorRole::NormRunningMean),
                        ("running_var", TensorRole::NormRunningVar),
                    ] {
                        out.push(TensorSpec {
                            name: format!("{}.{suffix}", n.key),
                            shape: vec![n.channels],
                            role,
                            fan_in: 1,
                        });
                    }
                }
                _ => {}
            }
        }
        for h in &self.head {
            out.push(TensorSpec {
                name: format!("{}.weight", h.key),
                shape: vec![h.out_features, h.in_features],
                role: TensorRole::LinearWeight,
                fan_in: h.in_features,
            });
            out.push(TensorSpec {
                name: format!("{}.bias", h.key),
                shape: vec![h.out_features],
                role: TensorRole::LinearBias,
                fan_in: h.in_features,
            });
        }
        out
    }
}

/// Stride-2 blocks of the original network, in Keras block numbering 2..13 (timm block1..12).
struct OriginalBlock {
    in_ch: usize,
    out_ch: usize,
    reps: usize,
    stride: usize,
    start_with_relu: bool,
    grow_first: bool,
}

fn build_original(config: &ModelConfig) -> Network {
    let keras = config.variant == Variant::Xception;
    let eps = config.variant.bn_eps();
    // Keras pads every 'same' op TF-style; timm's port pads symmetrically. They differ only on
    // max pools over even-sized inputs (xception.md section 2.3).
    let same = |p: usize| if keras { Padding::TfSame } else { Padding::Symmetric(p) };
    let norm = |key: String, channels: usize| Op::Norm(Norm { key, channels, eps });
    let sep = |key: &str, cin: usize, cout: usize| {
        [
            Op::Conv(Conv {
                key: format!("{key}.conv1"),
                in_channels: cin,
                out_channels: cin,
                kernel: 3,
                stride: 1,
                dilation: 1,
                groups: cin,
                padding: same(1),
                bias: false,
            }),
            Op::Conv(Conv {
                key: format!("{key}.pointwise"),
                in_channels: cin,
                out_channels: cout,
                kernel: 1,
                stride: 1,
                dilation: 1,
                groups: 1,
                padding: Padding::Valid,
                bias: false,
            }),
        ]
    };

    let stem_conv = |key: &str, cin: usize, cout: usize, stride: usize| {
        Op::Conv(Conv {
            key: key.into(),
            in_channels: cin,
            out_channels: cout,
            kernel: 3,
            stride,
            dilation: 1,
            groups: 1,
            padding: Padding::Valid,
            bias: false,
        })
    };
    let stem = vec![
        stem_conv("conv1", 3, 32, 2),
        norm("bn1".into(), 32),
        Op::Relu,
        stem_conv("conv2", 32, 64, 1),
        norm("bn2".into(), 64),
        Op::Relu,
        Op::Tap { reduction: 2, channels: 64, module: "act2".into() },
    ];

    let b = |in_ch, out_ch, reps, stride| OriginalBlock {
        in_ch,
        out_ch,
        reps,
        stride,
        start_with_relu: true,
        grow_first: true,
    };
    let mut specs = vec![OriginalBlock { start_with_relu: false, ..b(64, 128, 2, 2) }, b(128, 256, 2, 2), b(256, 728, 2, 2)];
    specs.extend((0..8).map(|_| b(728, 728, 3, 1)));
    specs.push(OriginalBlock { grow_first: false, ..b(728, 1024, 2, 2) });

    let mut blocks = Vec::new();
    let mut reduction = 2;
    for (i, s) in specs.iter().enumerate() {
        let name = format!("block{}", i + 1);
        // timm's Sequential `rep`: reps x [ReLU, SeparableConv2d, BatchNorm2d], minus the leading
        // ReLU when start_with_relu is false, plus a MaxPool when strided. Indices follow it.
        enum Item {
            Relu,
            Sep(usize, usize),
            Bn(usize),
        }
        let mut items = Vec::new();
        for r in 0..s.reps {
            let (cin, cout) = if s.grow_first {
                (if r == 0 { s.in_ch } else { s.out_ch }, s.out_ch)
            } else {
                (s.in_ch, if r + 1 < s.reps { s.in_ch } else { s.out_ch })
            };
            items.extend([Item::Relu, Item::Sep(cin, cout), Item::Bn(cout)]);
        }
        if !s.start_with_relu {
            items.remove(0);
        }
        let mut body = Vec::new();
        for (idx, item) in items.iter().enumerate() {
            match *item {
                Item::Relu => {
                    body.push(Op::Relu);
                    // timm taps the rectified input of each downsampling block (block2.rep.0, ...).
                    if idx == 0 && s.stride > 1 {
                        body.push(Op::Tap {
                            reduction,
                            channels: s.in_ch,
                            module: format!("{name}.rep.0"),
                        });
                    }
                }
                Item::Sep(cin, cout) => body.extend(sep(&format!("{name}.rep.{idx}"), cin, cout)),
                Item::Bn(c) => body.push(norm(format!("{name}.rep.{idx}"), c)),
            }
        }
        let shortcut = if s.stride != 1 || s.in_ch != s.out_ch {
            body.push(Op::MaxPool { kernel: 3, stride: s.stride, padding: same(1) });
            Shortcut::Project(vec![
                Op::Conv(Conv {
                    key: format!("{name}.skip"),
                    in_channels: s.in_ch,
                    out_channels: s.out_ch,
                    kernel: 1,
                    stride: s.stride,
                    dilation: 1,
                    groups: 1,
                    padding: if keras { Padding::TfSame } else { Padding::Valid },
                    bias: false,
                }),
                norm(format!("{name}.skipbn"), s.out_ch),
            ])
        } else {
            Shortcut::Identity
        };
        reduction *= s.stride;
        blocks.push(Block { name, pre: vec![], body, shortcut, stride: s.stride, dilation: 1 });
    }

    let mut tail = Vec::new();
    tail.extend(sep("conv3", 1024, 1536));
    tail.extend([norm("bn3".into(), 1536), Op::Relu]);
    tail.extend(sep("conv4", 1536, 2048));
    tail.extend([norm("bn4".into(), 2048), Op::Relu]);
    tail.push(Op::Tap { reduction, channels: 2048, module: "act4".into() });

    finish(config, stem, blocks, tail, 2048)
}

/// Output channels of the two stem convs of the aligned family.
fn aligned_stem_widths(variant: Variant) -> [usize; 2] {
    match variant {
        Variant::XceptionTiny => [16, 32],
        _ => [32, 64],
    }
}

/// timm's block config for the aligned family: `(in, (c1, c2, c3), stride, no_skip)`.
/// `xception_tiny` keeps the design (three entry modules at stride 2, middle modules, the strided
/// exit module and the unskipped final one) with widths 64/128/256, two middle modules and
/// 256 -> 384 -> 768 in the exit flow.
pub(crate) fn aligned_block_cfg(variant: Variant) -> Vec<(usize, [usize; 3], usize, bool)> {
    if variant == Variant::XceptionTiny {
        let mut cfg = vec![(32, [64; 3], 2, false), (64, [128; 3], 2, false), (128, [256; 3], 2, false)];
        cfg.extend((0..2).map(|_| (256, [256; 3], 1, false)));
        cfg.push((256, [256, 384, 384], 2, false));
        cfg.push((384, [512, 512, 768], 1, true));
        return cfg;
    }
    let entry: Vec<(usize, [usize; 3], usize, bool)> = match variant {
        Variant::Xception71 => vec![
            (64, [128; 3], 2, false),
            (128, [256; 3], 1, false),
            (256, [256; 3], 2, false),
            (256, [728; 3], 1, false),
            (728, [728; 3], 2, false),
        ],
        _ => vec![(64, [128; 3], 2, false), (128, [256; 3], 2, false), (256, [728; 3], 2, false)],
    };
    let middle = match variant {
        Variant::Xception41 | Variant::Xception41p => 8,
        _ => 16,
    };
    let mut cfg = entry;
    cfg.extend((0..middle).map(|_| (728, [728; 3], 1, false)));
    cfg.push((728, [728, 1024, 1024], 2, false));
    cfg.push((1024, [1536, 1536, 2048], 1, true));
    cfg
}

fn build_aligned(config: &ModelConfig) -> Network {
    let preact = config.variant.family() == Family::AlignedPreact;
    let eps = config.variant.bn_eps();
    let norm = |key: String, channels: usize| Op::Norm(Norm { key, channels, eps });
    // timm's static symmetric padding: ((stride - 1) + dilation * (kernel - 1)) / 2.
    let conv = |key: String, cin: usize, cout: usize, kernel: usize, stride: usize, dilation: usize, groups: usize| {
        Op::Conv(Conv {
            key,
            in_channels: cin,
            out_channels: cout,
            kernel,
            stride,
            dilation,
            groups,
            padding: Padding::Symmetric(((stride - 1) + dilation * (kernel - 1)) / 2),
            bias: false,
        })
    };

    let [s0, s1] = aligned_stem_widths(config.variant);
    let mut stem = vec![conv("stem.0.conv".into(), 3, s0, 3, 2, 1, 1), norm("stem.0.bn".into(), s0), Op::Relu];
    if preact {
        stem.push(conv("stem.1".into(), s0, s1, 3, 1, 1, 1));
    } else {
        stem.extend([conv("stem.1.conv".into(), s0, s1, 3, 1, 1, 1), norm("stem.1.bn".into(), s1), Op::Relu]);
    }

    let cfg = aligned_block_cfg(config.variant);
    let last = cfg.len() - 1;
    let num_features = cfg[last].1[2];
    let mut blocks = Vec::new();
    let (mut curr_stride, mut curr_dilation) = (2usize, 1usize);
    for (i, (in_ch, outs, nominal_stride, no_skip)) in cfg.into_iter().enumerate() {
        let name = format!("blocks.{i}");
        let dilation = curr_dilation;
        let mut stride = nominal_stride;
        let mut tap = None;
        if stride > 1 {
            // timm feature_info: the input of the strided conv (act3 / conv2 for pre-act).
            let module = if preact { format!("{name}.stack.conv2") } else { format!("{name}.stack.act3") };
            tap = Some(Op::Tap { reduction: curr_stride, channels: outs[1], module });
            // Output-stride rule: a stride that would overshoot becomes dilation for later blocks.
            if curr_stride * stride > config.output_stride {
                curr_dilation *= stride;
                stride = 1;
            } else {
                curr_stride *= stride;
            }
        }
        // timm decides on a projection after the stride adjustment (aligned_xception.md section 5).
        let needs_projection = !no_skip && (outs[2] != in_ch || stride != 1);
        // The last module of the non-pre-act nets puts its ReLUs inside the separable convs.
        let start_with_relu = i != last || preact;

        let mut pre = Vec::new();
        let mut body = Vec::new();
        if preact {
            pre.extend([norm(format!("{name}.norm"), in_ch), Op::Relu]);
        }
        let mut cin = in_ch;
        for (j, &cout) in outs.iter().enumerate() {
            let s = if j == 2 { stride } else { 1 };
            let p = format!("{name}.stack.conv{}", j + 1);
            if preact {
                if j > 0 {
                    body.extend([norm(format!("{p}.norm"), cin), Op::Relu]);
                }
                body.push(conv(format!("{p}.conv_dw"), cin, cin, 3, s, dilation, cin));
                body.push(conv(format!("{p}.conv_pw"), cin, cout, 1, 1, 1, 1));
                if j == 1 {
                    body.extend(tap.clone());
                }
            } else if start_with_relu {
                // DeepLab's low-level feature: the stride-4 tap's position, before its ReLU.
                if j == 2 && config.segmentation.is_some() && tap.as_ref().is_some_and(|t| matches!(t, Op::Tap { reduction: 4, .. })) {
                    body.push(Op::DecoderTap);
                }
                body.push(Op::Relu);
                if j == 2 {
                    body.extend(tap.clone());
                }
                body.push(conv(format!("{p}.conv_dw"), cin, cin, 3, s, dilation, cin));
                body.push(norm(format!("{p}.bn_dw"), cin));
                body.push(conv(format!("{p}.conv_pw"), cin, cout, 1, 1, 1, 1));
                body.push(norm(format!("{p}.bn_pw"), cout));
            } else {
                body.push(conv(format!("{p}.conv_dw"), cin, cin, 3, s, dilation, cin));
                body.extend([norm(format!("{p}.bn_dw"), cin), Op::Relu]);
                body.push(conv(format!("{p}.conv_pw"), cin, cout, 1, 1, 1, 1));
                body.extend([norm(format!("{p}.bn_pw"), cout), Op::Relu]);
            }
            cin = cout;
        }
        let shortcut = if no_skip {
            Shortcut::None
        } else if needs_projection {
            if preact {
                Shortcut::Project(vec![conv(format!("{name}.shortcut"), in_ch, outs[2], 1, stride, 1, 1)])
            } else {
                Shortcut::Project(vec![
                    conv(format!("{name}.shortcut.conv"), in_ch, outs[2], 1, stride, 1, 1),
                    norm(format!("{name}.shortcut.bn"), outs[2]),
                ])
            }
        } else {
            Shortcut::Identity
        };
        blocks.push(Block { name, pre, body, shortcut, stride, dilation });
    }
    // timm's final feature tap is the last block's output (before the pre-act nets' final ReLU).
    let last_name = format!("blocks.{last}");
    blocks[last].body.push(Op::Tap { reduction: curr_stride, channels: num_features, module: last_name });
    let tail = if preact { vec![Op::Relu] } else { vec![] };
    finish(config, stem, blocks, tail, num_features)
}

fn finish(config: &ModelConfig, stem: Vec<Op>, blocks: Vec<Block>, tail: Vec<Op>, num_features: usize) -> Network {
    let head = match (&config.custom_head, config.include_top) {
        (_, false) => vec![],
        (None, true) => vec![Dense {
            key: config.variant.classifier_key().into(),
            in_features: num_features,
            out_features: config.num_classes,
            activation: Activation::Linear,
        }],
        (Some(layers), true) => {
            let mut in_features = num_features;
            layers
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let dense = Dense { key: format!("head.{i}"), in_features, out_features: d.units, activation: d.activation };
                    in_features = d.units;
                    dense
                })
                .collect()
        }
    };
    // The decoder's low-level input: the channels of the map at the decoder tap.
    let low_level = blocks.iter().flat_map(|b| b.body.iter()).try_fold(0, |channels, op| match op {
        Op::DecoderTap => Err(channels),
        Op::Norm(n) => Ok(n.channels),
        Op::Conv(c) => Ok(c.out_channels),
        _ => Ok(channels),
    });
    let segmentation = config.segmentation.as_ref().map(|s| s.head(config.output_stride, num_features, low_level.err().unwrap_or(0)));
    Network { config: config.clone(), stem, blocks, tail, head, num_features, segmentation }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_same_padding_puts_the_odd_pixel_after() {
        // 3x3 stride-2 pool: even input pads 0/1, odd input pads 1/1 (xception.md 2.3).
        assert_eq!(Padding::TfSame.resolve(74, 3, 2, 1), (0, 1, 37));
        assert_eq!(Padding::TfSame.resolve(147, 3, 2, 1), (1, 1, 74));
        assert_eq!(Padding::TfSame.resolve(74, 1, 2, 1), (0, 0, 37));
        assert_eq!(Padding::Symmetric(1).resolve(74, 3, 2, 1), (1, 1, 37));
        assert_eq!(Padding::Valid.resolve(299, 3, 2, 1), (0, 0, 149));
    }

    #[test]
    fn state_dict_entry_counts_match_timm() {
        // aligned_xception.md 7: entries include one num_batches_tracked per norm, which we omit.
        for (variant, entries) in [
            (Variant::LegacyXception, 276),
            (Variant::Xception41, 506),
            (Variant::Xception65, 794),
            (Variant::Xception71, 878),
            (Variant::Xception41p, 286),
            (Variant::Xception65p, 454),
        ] {
            let net = Network::build(&ModelConfig::new(variant)).unwrap();
            let tensors = net.tensors();
            let norms = tensors.iter().filter(|t| t.role == TensorRole::NormWeight).count();
            assert_eq!(tensors.len() + norms, entries, "{variant}");
        }
    }

    #[test]
    fn output_stride_moves_stride_into_dilation_like_timm() {
        let mut cfg = ModelConfig::new(Variant::Xception65);
        cfg.output_stride = 8;
        let net = Network::build(&cfg).unwrap();
        let sd: Vec<(usize, usize)> = net.blocks.iter().map(|b| (b.stride, b.dilation)).collect();
        assert_eq!(sd[0], (2, 1));
        assert_eq!(sd[1], (2, 1));
        assert_eq!(sd[2], (1, 1));
        assert_eq!(sd[3], (1, 2));
        assert_eq!(sd[19], (1, 2));
        assert_eq!(sd[20], (1, 4));
        // timm drops xception71's blocks.4 projection at OS 8 (stride 2 -> 1, 728 -> 728).
        cfg.variant = Variant::Xception71;
        let net = Network::build(&cfg).unwrap();
        assert_eq!(net.blocks[4].shortcut, Shortcut::Identity);
        assert!(!net.tensors().iter().any(|t| t.name.starts_with("blocks.4.shortcut")));
    }

    #[test]
    fn unknown_model_and_stride_are_refused() {
        assert!(Variant::parse("xception99").unwrap_err().to_string().contains("xception65"));
        let mut cfg = ModelConfig::new(Variant::Xception);
        cfg.output_stride = 16;
        assert!(Network::build(&cfg).is_err());
    }
}
