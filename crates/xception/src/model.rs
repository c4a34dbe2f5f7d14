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
use burn::tensor::ops::{ConvOptions, MaxPoolOptions, PadMode};
use burn::tensor::{Device, Slice, Tensor, TensorData};

/// Where a feature map keeps its channels. The burn reference path runs NCHW on burn's own
/// convolutions (what GPUs want); CPU training runs NHWC, where a 1x1 conv is one matrix product
/// on (pixels, channels), the dense stem conv an im2col product and a depthwise conv a sum of
/// shifted per-channel products: burn's autodiff then differentiates only matrix products and
/// elementwise ops, both fast on its CPU backend, instead of its slow grouped and 1x1 conv
/// backward (the weight gradient of a 1x1 conv run as a convolution, a depthwise one group by
/// group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Nchw,
    Nhwc,
}

impl Layout {
    /// NHWC on the CPU backend, NCHW on a GPU.
    pub fn for_training() -> Layout {
        if cfg!(feature = "cuda") { Layout::Nchw } else { Layout::Nhwc }
    }

    fn channel_dim(self) -> usize {
        match self {
            Layout::Nchw => 1,
            Layout::Nhwc => 3,
        }
    }

    fn spatial_dims(self) -> [usize; 2] {
        match self {
            Layout::Nchw => [2, 3],
            Layout::Nhwc => [1, 2],
        }
    }

    /// (height, width) of a feature map.
    fn hw(self, x: &Tensor<4>) -> (usize, usize) {
        let d = x.dims();
        let [a, b] = self.spatial_dims();
        (d[a], d[b])
    }

    /// A per-channel vector shaped to broadcast over a feature map.
    fn per_channel(self, v: Tensor<1>, c: usize) -> Tensor<4> {
        match self {
            Layout::Nchw => v.reshape([1, c, 1, 1]),
            Layout::Nhwc => v.reshape([1, 1, 1, c]),
        }
    }

    /// Converts an NCHW tensor into this layout.
    fn convert_from_nchw(self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Layout::Nchw => x,
            Layout::Nhwc => x.permute([0, 2, 3, 1]),
        }
    }

    /// Converts a tensor in this layout to NCHW.
    fn to_nchw(self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Layout::Nchw => x,
            Layout::Nhwc => x.permute([0, 3, 1, 2]),
        }
    }
}

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

impl BatchNorm2d {
    /// Moves the running statistics towards a batch's with momentum `m` (PyTorch's convention:
    /// new = (1 - m) * old + m * batch). `var` is the batch's biased variance over `count`
    /// values per channel, which normalises; its unbiased form enters the running estimate, as
    /// PyTorch does.
    fn update_running(&self, mean: Tensor<1>, var: Tensor<1>, count: f64, m: f64) {
        let unbiased = var * (count / (count - 1.0).max(1.0));
        self.running_mean.update(self.running_mean.value_sync() * (1.0 - m) + mean * m);
        self.running_var.update(self.running_var.value_sync() * (1.0 - m) + unbiased * m);
    }
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

fn resize_align_corners(x: Tensor<4>, h: usize, w: usize, layout: Layout) -> Tensor<4> {
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    if layout.hw(&x) == (h, w) {
        return x;
    }
    let options = InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(true).with_output_size([h, w]);
    layout.convert_from_nchw(interpolate(layout.to_nchw(x), options))
}

/// A convolution on an NHWC map (see [`Layout`]), weights OIHW as everywhere else.
fn conv_nhwc(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, c: &crate::arch::Conv) -> Tensor<4> {
    let [n, h, w, cin] = x.dims();
    let (t, b, oh) = c.padding.resolve(h, c.kernel, c.stride, c.dilation);
    let (l, r, ow) = c.padding.resolve(w, c.kernel, c.stride, c.dilation);
    if c.is_depthwise() && crate::train_ops::AVAILABLE {
        let g = crate::train_ops::Geometry { kernel: c.kernel, stride: c.stride, dilation: c.dilation, pad_top: t, pad_left: l, out_h: oh, out_w: ow };
        let out = crate::train_ops::depthwise_nhwc(x, weight, g);
        return match bias {
            Some(bias) => out + bias.reshape([1, 1, 1, c.out_channels]),
            None => out,
        };
    }
    let x = if t + b + l + r > 0 { x.pad([(0, 0), (t, b), (l, r), (0, 0)], PadMode::Constant(0.0)) } else { x };
    // The input pixels kernel tap (i, j) reads for every output pixel.
    let tap = |i: usize, j: usize| {
        let (y0, x0) = (i * c.dilation, j * c.dilation);
        let span = |start: usize, out: usize| Slice::new(start as isize, Some((start + (out - 1) * c.stride + 1) as isize), c.stride as isize);
        x.clone().slice([Slice::full(), span(y0, oh), span(x0, ow), Slice::full()])
    };
    let k = c.kernel;
    let out = if c.is_depthwise() {
        // Sum over taps of the shifted input times that tap's per-channel weight.
        let taps = weight.reshape([cin, k * k]);
        let mut acc: Option<Tensor<4>> = None;
        for i in 0..k {
            for j in 0..k {
                let wk = taps.clone().slice([0..cin, i * k + j..i * k + j + 1]).reshape([1, 1, 1, cin]);
                let term = tap(i, j) * wk;
                acc = Some(match acc {
                    Some(a) => a + term,
                    None => term,
                });
            }
        }
        acc.expect("a kernel has at least one tap")
    } else if c.groups == 1 {
        // im2col: the k*k taps side by side, (kh, kw, cin) fastest last, times OIHW as (kh kw ci, co).
        let cols = if k == 1 { tap(0, 0) } else { Tensor::cat((0..k * k).map(|ij| tap(ij / k, ij % k)).collect(), 3) };
        let wmat = weight.permute([2, 3, 1, 0]).reshape([k * k * cin, c.out_channels]);
        cols.reshape([n * oh * ow, k * k * cin]).matmul(wmat).reshape([n, oh, ow, c.out_channels])
    } else {
        // Other grouped convs (none in the family today): burn's own, on the padded input.
        let options = ConvOptions::new([c.stride, c.stride], [0, 0], [c.dilation, c.dilation], c.groups);
        Layout::Nhwc.convert_from_nchw(conv2d(Layout::Nhwc.to_nchw(x), weight, None, options))
    };
    match bias {
        Some(bias) => out + bias.reshape([1, 1, 1, c.out_channels]),
        None => out,
    }
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
    layout: Layout,
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
        let mut cursor = Cursor { conv: 0, norm: 0, train_momentum: None, layout: Layout::Nchw };
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
        self.backbone_with(x, None, Layout::Nchw)
    }

    /// Classifier logits in training mode: BatchNorm uses the batch's statistics and updates its
    /// running statistics with the flavour's momentum (0.1 for timm's nets, 0.01 = Keras' 0.99
    /// decay for the Keras graph); run it on an autodiff device to take gradients. `x` is NCHW;
    /// `layout` is how the network runs inside ([`Layout::for_training`]).
    pub fn forward_train(&self, x: Tensor<4>, layout: Layout) -> Result<Tensor<2>> {
        self.classify(self.pool_train(x, layout, 0, None)?)
    }

    /// The pooled embedding in training mode. The first `frozen` stages (the stem, then blocks
    /// in order) run in inference mode and pass no gradient back. Dropout of rate `dropout.0`
    /// is drawn from the seeded `dropout.1` (inverted, as PyTorch: kept values scaled by
    /// 1 / (1 - p)).
    pub fn pool_train(&self, x: Tensor<4>, layout: Layout, frozen: usize, dropout: Option<(f64, u64)>) -> Result<Tensor<2>> {
        let (out, _) = self.backbone_frozen(x, Some(self.net.variant().bn_momentum()), layout, frozen)?;
        let pooled = self.pool_in(out.features, layout);
        Ok(match dropout {
            Some((p, seed)) if p > 0.0 => {
                let [n, c] = pooled.dims();
                let mut rng = crate::data::Rng(seed);
                let keep: Vec<f32> = (0..n * c).map(|_| if rng.uniform() >= p { (1.0 / (1.0 - p)) as f32 } else { 0.0 }).collect();
                pooled * Tensor::<2>::from_data(TensorData::new(keep, [n, c]), &self.device())
            }
            _ => pooled,
        })
    }

    /// Gives every parameter an id fixed by its position, so optimizer state saved by one
    /// process is found again by the next (burn keys it by parameter id).
    pub fn with_stable_ids(mut self) -> Xception {
        let mut k = 0u64;
        let mut next = || {
            k += 1;
            burn::module::ParamId::from(0x5843_0000_0000_0000 + k)
        };
        for c in &mut self.convs {
            c.weight.id = next();
            if let Some(b) = &mut c.bias {
                b.id = next();
            }
        }
        for n in &mut self.norms {
            n.weight.id = next();
            n.bias.id = next();
        }
        for h in &mut self.head {
            h.weight.id = next();
            h.bias.id = next();
        }
        self
    }

    /// Every trainable parameter's id and rank.
    pub fn param_shapes(&self) -> Vec<(burn::module::ParamId, usize)> {
        let mut out = Vec::new();
        for c in &self.convs {
            out.push((c.weight.id, 4));
            out.extend(c.bias.as_ref().map(|b| (b.id, 1)));
        }
        for n in &self.norms {
            out.extend([(n.weight.id, 1), (n.bias.id, 1)]);
        }
        for h in &self.head {
            out.extend([(h.weight.id, 2), (h.bias.id, 1)]);
        }
        out
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.convs[0].weight.val().device()
    }

    fn backbone_with(&self, x: Tensor<4>, train_momentum: Option<f64>, layout: Layout) -> Result<(Outputs, Cursor)> {
        self.backbone_frozen(x, train_momentum, layout, 0)
    }

    fn backbone_frozen(&self, x: Tensor<4>, train_momentum: Option<f64>, layout: Layout, frozen: usize) -> Result<(Outputs, Cursor)> {
        let [_, c, h, w] = x.dims();
        if c != 3 {
            return Err(Error::Shape(format!("expected 3 input channels, got an input of shape {:?}", x.dims())));
        }
        self.net.check_input_size(h, w)?;
        // Stage 0 is the stem, stage i + 1 block i; frozen stages normalise with running
        // statistics, and their output is cut from the graph.
        let mode = |stage: usize| if stage < frozen { None } else { train_momentum };
        let mut cursor = Cursor { conv: 0, norm: 0, train_momentum: mode(0), layout };
        let mut captured = Captured::default();
        let mut x = self.run(&self.net.stem, layout.convert_from_nchw(x), &mut cursor, &mut captured);
        if frozen == 1 {
            x = x.detach();
        }
        for (i, block) in self.net.blocks.iter().enumerate() {
            cursor.train_momentum = mode(i + 1);
            x = self.block(block, x, &mut cursor, &mut captured);
            if frozen == i + 2 {
                x = x.detach();
            }
        }
        cursor.train_momentum = train_momentum;
        let x = self.run(&self.net.tail, x, &mut cursor, &mut captured);
        Ok((Outputs { features: x, taps: captured.taps, decoder_tap: captured.decoder }, cursor))
    }

    /// DeepLabv3+ per-pixel logits (N, classes, H, W) at the input size: ASPP on the encoder
    /// output, the decoder on [ASPP resized to the low-level size, low-level], logits resized to
    /// the input; every resize bilinear with align_corners=True (deeplabv3plus.md 2-4).
    pub fn segment(&self, x: Tensor<4>) -> Result<Tensor<4>> {
        self.segment_with(x, None, Layout::Nchw)
    }

    /// [`Self::segment`] in training mode (BatchNorm on batch statistics everywhere, running
    /// statistics updated), running inside in `layout`; logits NCHW.
    pub fn segment_train(&self, x: Tensor<4>, layout: Layout) -> Result<Tensor<4>> {
        self.segment_with(x, Some(self.net.variant().bn_momentum()), layout)
    }

    fn segment_with(&self, x: Tensor<4>, train_momentum: Option<f64>, layout: Layout) -> Result<Tensor<4>> {
        let seg = self.net.segmentation.as_ref().ok_or_else(|| Error::Config(format!("{} is not a segmentation model", self.net.config.name())))?;
        let [_, _, h, w] = x.dims();
        let (out, mut cursor) = self.backbone_with(x, train_momentum, layout)?;
        let low = out.decoder_tap.ok_or_else(|| Error::Config("segmentation network without a decoder tap".into()))?;
        let encoder = out.features;
        let (eh, ew) = layout.hw(&encoder);
        let [sh, sw] = layout.spatial_dims();
        let channels = layout.channel_dim();
        let mut none = Captured::default();
        let image = self.run(&seg.image_pool, encoder.clone().mean_dims(&[sh, sw]), &mut cursor, &mut none);
        let mut branches = vec![image.repeat_dim(sh, eh).repeat_dim(sw, ew)];
        for b in &seg.aspp {
            branches.push(self.run(b, encoder.clone(), &mut cursor, &mut none));
        }
        let aspp = self.run(&seg.project, Tensor::cat(branches, channels), &mut cursor, &mut none);
        let low = self.run(&seg.low_level, low, &mut cursor, &mut none);
        let (lh, lw) = layout.hw(&low);
        let decoded = self.run(&seg.decoder, Tensor::cat(vec![resize_align_corners(aspp, lh, lw, layout), low], channels), &mut cursor, &mut none);
        let logits = self.run(&seg.logits, decoded, &mut cursor, &mut none);
        Ok(layout.to_nchw(resize_align_corners(logits, h, w, layout)))
    }

    /// Global pooling of a feature map: the embedding, (N, C).
    pub fn pool(&self, features: Tensor<4>) -> Tensor<2> {
        self.pool_in(features, Layout::Nchw)
    }

    fn pool_in(&self, features: Tensor<4>, layout: Layout) -> Tensor<2> {
        let spatial = layout.spatial_dims();
        let pooled = match self.net.config.pooling {
            Pooling::Avg => features.mean_dims(&spatial),
            Pooling::Max => features.max_dims(&spatial),
        };
        let [n, ..] = pooled.dims();
        pooled.reshape([n, self.net.num_features])
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
            let layout = cursor.layout;
            x = match op {
                Op::Conv(c) if layout == Layout::Nhwc => {
                    let conv = &self.convs[cursor.conv];
                    cursor.conv += 1;
                    conv_nhwc(x, conv.weight.val(), conv.bias.as_ref().map(|b| b.val()), c)
                }
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
                    let [a, b] = layout.spatial_dims();
                    let count = (x.dims()[0] * x.dims()[a] * x.dims()[b]) as f64;
                    if let (Some(m), Layout::Nhwc, true) = (cursor.train_momentum, layout, crate::train_ops::AVAILABLE) {
                        // The CPU training path: statistics of the detached input and the
                        // normalisation with its backward, each one of our kernels.
                        let (mean, var) = crate::train_ops::channel_moments_nhwc(x.clone().detach());
                        bn.update_running(mean.clone(), var.clone(), count, m);
                        crate::train_ops::batch_norm_train_nhwc(x, bn.weight.val(), bn.bias.val(), mean, var, n.eps)
                    } else if let Some(m) = cursor.train_momentum {
                        let dims = [0, a, b];
                        let mean = x.clone().mean_dims(&dims);
                        let centered = x - mean.clone();
                        let var = centered.clone().powi_scalar(2).mean_dims(&dims);
                        let y = centered / (var.clone() + n.eps).sqrt();
                        bn.update_running(mean.detach().reshape([c]), var.detach().reshape([c]), count, m);
                        y * layout.per_channel(bn.weight.val(), c) + layout.per_channel(bn.bias.val(), c)
                    } else {
                        // Inference BatchNorm folded to one scale and shift per channel, as
                        // PyTorch's CPU kernel does: y = x * (gamma / sqrt(var + eps)) + (beta - mean * scale).
                        let scale = bn.weight.val() / (bn.running_var.value_sync() + n.eps).sqrt();
                        let shift = bn.bias.val() - bn.running_mean.value_sync() * scale.clone();
                        x * layout.per_channel(scale, c) + layout.per_channel(shift, c)
                    }
                }
                Op::Relu => relu(x),
                Op::MaxPool { kernel, stride, padding } => {
                    let (h, w) = layout.hw(&x);
                    let (t, b, _) = padding.resolve(h, *kernel, *stride, 1);
                    let (l, r, _) = padding.resolve(w, *kernel, *stride, 1);
                    let options = MaxPoolOptions::new([*kernel, *kernel])
                        .with_stride([*stride, *stride])
                        .with_padding_pairs([(t, b), (l, r)]);
                    layout.convert_from_nchw(max_pool2d(layout.to_nchw(x), options))
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
