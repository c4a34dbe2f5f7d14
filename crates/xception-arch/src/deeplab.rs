//! DeepLabv3+ on the aligned Xception (deeplabv3plus.md), as data: ASPP (image pooling, a 1x1
//! conv, three atrous separable convs, a 1x1 projection), the decoder (48-channel projection of
//! the low-level feature, two separable convs on [ASPP, low-level]) and the logits conv.
//!
//! Weight names: the backbone keeps timm's (so timm ImageNet checkpoints load as the pretrained
//! encoder with no renaming); the head's mirror the TF DeepLab scopes:
//! `aspp.{image_pooling,aspp0,project}.{conv,bn}`, `aspp.aspp{1,2,3}.{conv_dw,bn_dw,conv_pw,bn_pw}`,
//! `decoder.feature_projection0.{conv,bn}`, `decoder.conv{0,1}.{conv_dw,bn_dw,conv_pw,bn_pw}`,
//! `logits.{weight,bias}`.

use crate::arch::{Conv, Family, ModelConfig, Norm, Op, Padding, Variant};
use crate::error::{Error, Result};
use serde::Serialize;

/// Model names `deeplabv3plus_<backbone>`.
pub const PREFIX: &str = "deeplabv3plus_";

/// Width of the ASPP branches and of the decoder.
const DEPTH: usize = 256;
/// Channels the low-level feature is projected to (paper Table 1).
const LOW_LEVEL_CHANNELS: usize = 48;
/// BatchNorm epsilon of the head (the backbone keeps its own; trap 1 of the spec).
const HEAD_EPS: f64 = 1e-5;

/// What a segmentation network adds to its backbone's configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Segmentation {
    pub num_classes: usize,
    /// ASPP atrous rates; None: the spec's for the output stride (6/12/18 at 16, 12/24/36 at 8).
    pub atrous_rates: Option<[usize; 3]>,
}

impl Segmentation {
    /// A DeepLabv3+ configuration on `backbone`.
    pub fn config(backbone: Variant, num_classes: usize, output_stride: usize) -> Result<ModelConfig> {
        let mut c = ModelConfig::new(backbone);
        c.include_top = false;
        c.output_stride = output_stride;
        c.segmentation = Some(Segmentation { num_classes, atrous_rates: None });
        c.validate()?;
        Ok(c)
    }

    pub fn rates(&self, output_stride: usize) -> [usize; 3] {
        self.atrous_rates.unwrap_or_else(|| {
            let k = 16 / output_stride.clamp(1, 16);
            [6 * k, 12 * k, 18 * k]
        })
    }

    pub(crate) fn validate(&self, config: &ModelConfig) -> Result<()> {
        if config.variant.family() != Family::Aligned {
            return Err(Error::Config(format!(
                "DeepLabv3+ runs on the aligned xception41, xception65, xception71 or xception_tiny, not {}",
                config.variant
            )));
        }
        if config.include_top {
            return Err(Error::Config("a segmentation network has no classifier (include_top must be off)".into()));
        }
        if ![8, 16].contains(&config.output_stride) {
            return Err(Error::Config(format!("DeepLabv3+ runs at output stride 16 or 8, not {}", config.output_stride)));
        }
        if self.num_classes == 0 {
            return Err(Error::Config("a segmentation network needs at least one class".into()));
        }
        if self.rates(config.output_stride).contains(&0) {
            return Err(Error::Config("atrous rates must be at least 1".into()));
        }
        Ok(())
    }

    pub(crate) fn head(&self, output_stride: usize, encoder_channels: usize, low_level_channels: usize) -> SegHead {
        let rates = self.rates(output_stride);
        let aspp = std::iter::once(conv_bn_relu("aspp.aspp0", encoder_channels, DEPTH))
            .chain(rates.iter().enumerate().map(|(i, &r)| separable(&format!("aspp.aspp{}", i + 1), encoder_channels, DEPTH, r)))
            .collect();
        let mut decoder = separable("decoder.conv0", DEPTH + LOW_LEVEL_CHANNELS, DEPTH, 1);
        decoder.extend(separable("decoder.conv1", DEPTH, DEPTH, 1));
        SegHead {
            image_pool: conv_bn_relu("aspp.image_pooling", encoder_channels, DEPTH),
            aspp,
            project: conv_bn_relu("aspp.project", 5 * DEPTH, DEPTH),
            low_level: conv_bn_relu("decoder.feature_projection0", low_level_channels, LOW_LEVEL_CHANNELS),
            decoder,
            logits: vec![Op::Conv(conv("logits", DEPTH, self.num_classes, 1, 1, 1, true))],
            num_classes: self.num_classes,
            atrous_rates: rates,
        }
    }
}

/// The head as programs of ops, run in this order (deeplabv3plus.md sections 2-4):
/// `image_pool` on the global average of the encoder output, broadcast back; each `aspp` branch
/// on the encoder output; `project` on the concatenation [image_pool, aspp...]; `low_level` on the
/// decoder tap; `decoder` on [project resized to the low-level size, low_level]; `logits`, then
/// a bilinear resize to the input size. Every resize uses align_corners=True.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SegHead {
    pub image_pool: Vec<Op>,
    pub aspp: Vec<Vec<Op>>,
    pub project: Vec<Op>,
    pub low_level: Vec<Op>,
    pub decoder: Vec<Op>,
    pub logits: Vec<Op>,
    pub num_classes: usize,
    pub atrous_rates: [usize; 3],
}

impl SegHead {
    /// Every op of the head, in the order above.
    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.image_pool
            .iter()
            .chain(self.aspp.iter().flatten())
            .chain(&self.project)
            .chain(&self.low_level)
            .chain(&self.decoder)
            .chain(&self.logits)
    }
}

fn conv(key: &str, cin: usize, cout: usize, kernel: usize, dilation: usize, groups: usize, bias: bool) -> Conv {
    Conv {
        key: key.to_string(),
        in_channels: cin,
        out_channels: cout,
        kernel,
        stride: 1,
        dilation,
        groups,
        // TF 'SAME' at stride 1 is symmetric: dilation * (kernel - 1) / 2 on every side.
        padding: Padding::Symmetric(dilation * (kernel - 1) / 2),
        bias,
    }
}

fn norm(key: String, channels: usize) -> Op {
    Op::Norm(Norm { key, channels, eps: HEAD_EPS })
}

fn conv_bn_relu(key: &str, cin: usize, cout: usize) -> Vec<Op> {
    vec![Op::Conv(conv(&format!("{key}.conv"), cin, cout, 1, 1, 1, false)), norm(format!("{key}.bn"), cout), Op::Relu]
}

/// TF DeepLab's split separable conv: BN + ReLU after the depthwise *and* the pointwise conv.
fn separable(key: &str, cin: usize, cout: usize, rate: usize) -> Vec<Op> {
    vec![
        Op::Conv(conv(&format!("{key}.conv_dw"), cin, cin, 3, rate, cin, false)),
        norm(format!("{key}.bn_dw"), cin),
        Op::Relu,
        Op::Conv(conv(&format!("{key}.conv_pw"), cin, cout, 1, 1, 1, false)),
        norm(format!("{key}.bn_pw"), cout),
        Op::Relu,
    ]
}
