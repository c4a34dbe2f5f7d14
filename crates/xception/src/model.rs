//! The network as burn modules, run by interpreting the architecture description.
//!
//! Parameters live in flat lists in the description's op order; each op's hyper-parameters
//! (stride, padding, dilation, groups, epsilon) come from [`Network`], so there is one source of
//! truth for the architecture. Weight names are the description's timm keys.

use crate::arch::{Activation, Block, ModelConfig, Network, Op, Pooling, Shortcut};
use crate::error::{Error, Result};
use crate::preprocess::Item;
use crate::weights::{HostTensor, TensorMap};
use burn::module::{Module, Param, RunningState};
use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};

/// Convolution weight, PyTorch OIHW layout; a bias only on the DeepLab logits conv.
#[derive(Module, Debug)]
pub struct Conv2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
}

/// BatchNorm with PyTorch's parameter names.
#[derive(Module, Debug)]
pub struct BatchNorm2d {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
}

/// Linear classifier, PyTorch layout: weight (out, in), bias (out).
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

/// An Xception-family network on burn.
#[derive(Module, Debug)]
pub struct Xception {
    pub convs: Vec<Conv2d>,
    pub norms: Vec<BatchNorm2d>,
    /// Dense layers after pooling, in the description's order (empty without a top).
    pub head: Vec<Linear>,
    #[module(skip)]
    pub net: Network,
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct Outputs {
    /// Final feature map (N, C, H, W), after the last activation.
    pub features: Tensor<4>,
    /// Multi-level features at timm's `feature_info` taps, in order (see [`Network::info`]).
    pub taps: Vec<Tensor<4>>,
    /// Segmentation networks: the DeepLab decoder's low-level feature.
    pub decoder_tap: Option<Tensor<4>>,
}

/// What a pass keeps besides its output.
#[derive(Default)]
struct Captured {
    taps: Vec<Tensor<4>>,
    decoder: Option<Tensor<4>>,
}

fn resize_align_corners(x: Tensor<4>, h: usize, w: usize) -> Tensor<4> {
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    let [_, _, xh, xw] = x.dims();
    if (xh, xw) == (h, w) {
        return x;
    }
    interpolate(x, InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(true).with_output_size([h, w]))
}

fn activate(x: Tensor<2>, activation: Activation) -> Tensor<2> {
    use burn::tensor::activation as act;
    match activation {
        Activation::Linear => x,
        Activation::Relu => act::relu(x),
        Activation::Softmax => act::softmax(x, 1),
        Activation::Sigmoid => act::sigmoid(x),
        Activation::Tanh => x.tanh(),
    }
}

fn rows(t: Tensor<2>) -> Vec<Vec<f32>> {
    let [_, c] = t.dims();
    let data = t.into_data().convert::<f32>().try_into_vec::<f32>().expect("float tensor");
    data.chunks(c).map(|r| r.to_vec()).collect()
}

fn tensor_from<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

/// Pooled embedding and (with a classifier) logits of one input.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub name: String,
    pub pooled: Vec<f32>,
    pub logits: Option<Vec<f32>>,
}

/// Parameters handed out in the description's op order while building or running.
struct Cursor {
    conv: usize,
    norm: usize,
    /// Training: BatchNorm normalises with batch statistics and moves its running statistics by
    /// this momentum (PyTorch's convention: new = (1 - m) * old + m * batch).
    train_momentum: Option<f64>,
}

impl Xception {
    /// Builds the network and loads `weights`, which must hold every tensor the description
    /// lists with the right shape (unused extra tensors are allowed and ignored).
    pub fn from_weights(net: Network, weights: &TensorMap, device: &Device) -> Result<Xception> {
        weights.check(&net)?;
        let get = |name: String| weights.get(&name).expect("checked above");
        let mut convs = Vec::new();
        let mut norms = Vec::new();
        for op in net.ops() {
            match op {
                Op::Conv(c) => convs.push(Conv2d {
                    weight: Param::from_tensor(tensor_from(get(format!("{}.weight", c.key)), device)),
                    bias: c.bias.then(|| Param::from_tensor(tensor_from(get(format!("{}.bias", c.key)), device))),
                }),
                Op::Norm(n) => norms.push(BatchNorm2d {
                    weight: Param::from_tensor(tensor_from(get(format!("{}.weight", n.key)), device)),
                    bias: Param::from_tensor(tensor_from(get(format!("{}.bias", n.key)), device)),
                    running_mean: RunningState::new(tensor_from(get(format!("{}.running_mean", n.key)), device)),
                    running_var: RunningState::new(tensor_from(get(format!("{}.running_var", n.key)), device)),
                }),
                _ => {}
            }
        }
        let head = net
            .head
            .iter()
            .map(|h| Linear {
                weight: Param::from_tensor(tensor_from(get(format!("{}.weight", h.key)), device)),
                bias: Param::from_tensor(tensor_from(get(format!("{}.bias", h.key)), device)),
            })
            .collect();
        Ok(Xception { convs, norms, head, net })
    }

    /// Builds `config` and loads its weights from a file (safetensors or PyTorch).
    pub fn load(config: &ModelConfig, weights: &std::path::Path, device: &Device) -> Result<Xception> {
        let net = Network::build(config)?;
        Xception::from_weights(net, &TensorMap::read(weights)?, device)
    }

    /// Runs inputs in batches of at most `batch_size` (consecutive inputs of equal size share a
    /// batch): pooled embeddings and, when the model has a classifier, logits.
    pub fn predict(&self, items: &[Item], batch_size: usize, device: &Device) -> Result<Vec<Prediction>> {
        let mut out = Vec::with_capacity(items.len());
        for batch in crate::runner::equal_size_batches(items, batch_size) {
            let (h, w) = (batch[0].height, batch[0].width);
            let data: Vec<f32> = batch.iter().flat_map(|i| i.data.iter().copied()).collect();
            let x = Tensor::<4>::from_data(TensorData::new(data, [batch.len(), h, w, 3]), device).permute([0, 3, 1, 2]);
            let features = self.forward_features(x).map_err(|e| match e {
                Error::Shape(m) => Error::Shape(format!("{}: {m}", batch[0].name)),
                other => other,
            })?;
            let pooled = self.pool(features.features);
            let logits = match self.head.is_empty() {
                false => Some(rows(self.classify(pooled.clone())?)),
                true => None,
            };
            for (i, (item, p)) in batch.iter().zip(rows(pooled)).enumerate() {
                out.push(Prediction { name: item.name.clone(), pooled: p, logits: logits.as_ref().map(|l| l[i].clone()) });
            }
        }
        Ok(out)
    }

    /// The weights as named host tensors (timm names), e.g. to save as safetensors.
    pub fn to_tensor_map(&self) -> TensorMap {
        fn host<const D: usize>(t: Tensor<D>) -> HostTensor {
            let shape = t.dims().to_vec();
            HostTensor::new(shape, t.into_data().convert::<f32>().try_into_vec::<f32>().expect("float tensor"))
        }
        let mut map = TensorMap::new(self.net.variant().name());
        let mut cursor = Cursor { conv: 0, norm: 0, train_momentum: None };
        for op in self.net.ops() {
            match op {
                Op::Conv(c) => {
                    let conv = &self.convs[cursor.conv];
                    map.insert(format!("{}.weight", c.key), host(conv.weight.val()));
                    if let Some(b) = &conv.bias {
                        map.insert(format!("{}.bias", c.key), host(b.val()));
                    }
                    cursor.conv += 1;
                }
                Op::Norm(n) => {
                    let bn = &self.norms[cursor.norm];
                    map.insert(format!("{}.weight", n.key), host(bn.weight.val()));
                    map.insert(format!("{}.bias", n.key), host(bn.bias.val()));
                    map.insert(format!("{}.running_mean", n.key), host(bn.running_mean.value_sync()));
                    map.insert(format!("{}.running_var", n.key), host(bn.running_var.value_sync()));
                    cursor.norm += 1;
                }
                _ => {}
            }
        }
        for (h, spec) in self.head.iter().zip(&self.net.head) {
            map.insert(format!("{}.weight", spec.key), host(h.weight.val()));
            map.insert(format!("{}.bias", spec.key), host(h.bias.val()));
        }
        map
    }

    /// Runs the backbone on an NCHW batch (values already preprocessed).
    pub fn forward_features(&self, x: Tensor<4>) -> Result<Outputs> {
        Ok(self.backbone(x)?.0)
    }

    /// The backbone, and where its parameters end (the head's start there).
    fn backbone(&self, x: Tensor<4>) -> Result<(Outputs, Cursor)> {
        self.backbone_with(x, None)
    }

    /// Classifier logits in training mode: BatchNorm uses the batch's statistics and updates its
    /// running statistics with the flavour's momentum (0.1 for timm's nets, 0.01 = Keras' 0.99
    /// decay for the Keras graph); run it on an autodiff device to take gradients.
    pub fn forward_train(&self, x: Tensor<4>) -> Result<Tensor<2>> {
        let (out, _) = self.backbone_with(x, Some(self.net.variant().bn_momentum()))?;
        self.classify(self.pool(out.features))
    }

    fn backbone_with(&self, x: Tensor<4>, train_momentum: Option<f64>) -> Result<(Outputs, Cursor)> {
        let [_, c, h, w] = x.dims();
        if c != 3 {
            return Err(Error::Shape(format!("expected 3 input channels, got an input of shape {:?}", x.dims())));
        }
        self.net.check_input_size(h, w)?;
        let mut cursor = Cursor { conv: 0, norm: 0, train_momentum };
        let mut captured = Captured::default();
        let mut x = self.run(&self.net.stem, x, &mut cursor, &mut captured);
        for block in &self.net.blocks {
            x = self.block(block, x, &mut cursor, &mut captured);
        }
        let x = self.run(&self.net.tail, x, &mut cursor, &mut captured);
        Ok((Outputs { features: x, taps: captured.taps, decoder_tap: captured.decoder }, cursor))
    }

    /// DeepLabv3+ per-pixel logits (N, classes, H, W) at the input size: ASPP on the encoder
    /// output, the decoder on [ASPP resized to the low-level size, low-level], logits resized to
    /// the input; every resize bilinear with align_corners=True (deeplabv3plus.md 2-4).
    pub fn segment(&self, x: Tensor<4>) -> Result<Tensor<4>> {
        let seg = self.net.segmentation.as_ref().ok_or_else(|| Error::Config(format!("{} is not a segmentation model", self.net.config.name())))?;
        let [_, _, h, w] = x.dims();
        let (out, mut cursor) = self.backbone(x)?;
        let low = out.decoder_tap.ok_or_else(|| Error::Config("segmentation network without a decoder tap".into()))?;
        let encoder = out.features;
        let [_, _, eh, ew] = encoder.dims();
        let mut none = Captured::default();
        let image = self.run(&seg.image_pool, encoder.clone().mean_dims(&[2, 3]), &mut cursor, &mut none);
        let mut branches = vec![image.repeat_dim(2, eh).repeat_dim(3, ew)];
        for b in &seg.aspp {
            branches.push(self.run(b, encoder.clone(), &mut cursor, &mut none));
        }
        let aspp = self.run(&seg.project, Tensor::cat(branches, 1), &mut cursor, &mut none);
        let low = self.run(&seg.low_level, low, &mut cursor, &mut none);
        let [_, _, lh, lw] = low.dims();
        let decoded = self.run(&seg.decoder, Tensor::cat(vec![resize_align_corners(aspp, lh, lw), low], 1), &mut cursor, &mut none);
        let logits = self.run(&seg.logits, decoded, &mut cursor, &mut none);
        Ok(resize_align_corners(logits, h, w))
    }

    /// Global pooling of a feature map: the embedding, (N, C).
    pub fn pool(&self, features: Tensor<4>) -> Tensor<2> {
        let pooled = match self.net.config.pooling {
            Pooling::Avg => features.mean_dims(&[2, 3]),
            Pooling::Max => features.max_dims(&[2, 3]),
        };
        let [n, c, _, _] = pooled.dims();
        pooled.reshape([n, c])
    }

    /// Classifier logits from pooled features: every dense layer of the head, with the
    /// activations of all but the last (the last layer's activation is [`Self::output_activation`]).
    /// Errors if the model was built without a top.
    pub fn classify(&self, pooled: Tensor<2>) -> Result<Tensor<2>> {
        if self.head.is_empty() {
            return Err(Error::Config("this model was built without a classifier".into()));
        }
        let mut x = pooled;
        for (i, (layer, spec)) in self.head.iter().zip(&self.net.head).enumerate() {
            x = x.matmul(layer.weight.val().transpose()) + layer.bias.val().unsqueeze_dim(0);
            if i + 1 < self.head.len() {
                x = activate(x, spec.activation);
            }
        }
        Ok(x)
    }

    /// The activation the reference applies to the logits (softmax for Keras' ImageNet top,
    /// linear for timm and most transfer heads).
    pub fn output_activation(&self) -> Option<Activation> {
        self.net.head.last().map(|d| d.activation)
    }

    /// Logits for an NCHW batch.
    pub fn forward(&self, x: Tensor<4>) -> Result<Tensor<2>> {
        let out = self.forward_features(x)?;
        self.classify(self.pool(out.features))
    }

    fn block(&self, block: &Block, x: Tensor<4>, cursor: &mut Cursor, taps: &mut Captured) -> Tensor<4> {
        let input = self.run(&block.pre, x, cursor, taps);
        let branch = self.run(&block.body, input.clone(), cursor, taps);
        match &block.shortcut {
            Shortcut::None => branch,
            Shortcut::Identity => branch + input,
            Shortcut::Project(ops) => branch + self.run(ops, input, cursor, taps),
        }
    }

    fn run(&self, ops: &[Op], mut x: Tensor<4>, cursor: &mut Cursor, taps: &mut Captured) -> Tensor<4> {
        for op in ops {
            x = match op {
                Op::Conv(c) => {
                    let [_, _, h, w] = x.dims();
                    let (t, b, _) = c.padding.resolve(h, c.kernel, c.stride, c.dilation);
                    let (l, r, _) = c.padding.resolve(w, c.kernel, c.stride, c.dilation);
                    let options = ConvOptions::new_with_padding(
                        [c.stride, c.stride],
                        [(t, b), (l, r)],
                        [c.dilation, c.dilation],
                        c.groups,
                    );
                    let conv = &self.convs[cursor.conv];
                    cursor.conv += 1;
                    conv2d(x, conv.weight.val(), conv.bias.as_ref().map(|b| b.val()), options)
                }
                Op::Norm(n) => {
                    let bn = &self.norms[cursor.norm];
                    cursor.norm += 1;
                    let c = n.channels;
                    if let Some(m) = cursor.train_momentum {
                        // Batch statistics over (N, H, W); the biased variance normalises, the
                        // unbiased one enters the running estimate (as PyTorch does).
                        let [b, _, h, w] = x.dims();
                        let mean = x.clone().mean_dims(&[0, 2, 3]);
                        let centered = x - mean.clone();
                        let var = centered.clone().powi_scalar(2).mean_dims(&[0, 2, 3]);
                        let y = centered / (var.clone() + n.eps).sqrt();
                        let count = (b * h * w) as f64;
                        let unbiased = var.detach().reshape([c]) * (count / (count - 1.0).max(1.0));
                        bn.running_mean.update(bn.running_mean.value_sync() * (1.0 - m) + mean.detach().reshape([c]) * m);
                        bn.running_var.update(bn.running_var.value_sync() * (1.0 - m) + unbiased * m);
                        y * bn.weight.val().reshape([1, c, 1, 1]) + bn.bias.val().reshape([1, c, 1, 1])
                    } else {
                        // Inference BatchNorm folded to one scale and shift per channel, as
                        // PyTorch's CPU kernel does: y = x * (gamma / sqrt(var + eps)) + (beta - mean * scale).
                        let scale = bn.weight.val() / (bn.running_var.value_sync() + n.eps).sqrt();
                        let shift = bn.bias.val() - bn.running_mean.value_sync() * scale.clone();
                        x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1])
                    }
                }
                Op::Relu => relu(x),
                Op::MaxPool { kernel, stride, padding } => {
                    let [_, _, h, w] = x.dims();
                    let (t, b, _) = padding.resolve(h, *kernel, *stride, 1);
                    let (l, r, _) = padding.resolve(w, *kernel, *stride, 1);
                    let options = MaxPoolOptions::new([*kernel, *kernel])
                        .with_stride([*stride, *stride])
                        .with_padding_pairs([(t, b), (l, r)]);
                    max_pool2d(x, options)
                }
                Op::Tap { .. } => {
                    taps.taps.push(x.clone());
                    x
                }
                Op::DecoderTap => {
                    taps.decoder = Some(x.clone());
                    x
                }
            };
        }
        x
    }
}
