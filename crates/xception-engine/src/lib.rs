//! A fused CPU inference engine for the Xception family, compiled from the architecture
//! description (no second hand-written copy of the network).
//!
//! At load time every BatchNorm that follows a conv is folded into that conv's weights and bias,
//! the weights of every GEMM-shaped conv are packed into the micro-kernel's panels (`packed`), a
//! BatchNorm(+ReLU) that precedes a depthwise conv is applied while the depthwise kernel loads
//! its input, and every separable conv becomes one step: the depthwise 3x3 (NHWC, channels
//! innermost, AVX-512 register tiles when the CPU has them) feeds the pointwise GEMM band by band
//! through a cache-resident buffer, and the GEMM adds the bias, the block's residual and ReLU as
//! it stores. Dense convs need no im2col: each kernel row's product reads the input lines in
//! place and accumulates in the output; the stem's 3x3 32->64 conv runs by Winograd's F(2x2, 3x3)
//! instead (`winograd`). Activations are NHWC float32 in buffers reused across layers; a batch
//! runs as one stream of whole images per thread. The rows of every banded product go to the
//! threads evenly to the row, with work stealing at the end (`stealing`), and through a
//! single-image pass the idle thread polls for tasks instead of sleeping (`polling`).
//!
//! Where an entry-flow block's outputs are large, its last separable conv is pooled band by band
//! as it is made, the first block's two separable convs run as one banded chain (neither output
//! goes to memory), and the block's 1x1 shortcut projection is made in its pool a line at a time
//! (`kernels::sep_conv_pool`, `kernels::Residual`). The aligned Xceptions' blocks have no pool:
//! where their intermediate outputs are large (the first block at 299), the block's separable
//! convs run as one banded chain instead, the shortcut added as the last one stores (`chain`).
//!
//! `Precision::Bf16` (opt-in, CPUs with AMX) packs the weights in bf16 for AMX tiles instead and
//! rounds each product's left operand to bf16 (the depthwise kernel writes it so), sums in fp32
//! (`amx`); the pool fusion then reaches the second entry-flow block too. `Precision::Bf16x3`
//! splits both operands into two bf16 pieces each and runs three tile products for one (16
//! significant bits instead of 8). `Precision::Int8` (opt-in, x86-64 CPUs with AVX2; fastest with
//! AMX, then AVX-512 VNNI or AVX-VNNI) runs the 1x1 convs' products on 8-bit operands with 32-bit
//! integer sums, each weight column and each activation row with its own scale (`int8`); the
//! dense k x k convs stay fp32.

pub mod align;
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub mod amx;
mod chain;
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub mod int8;
mod kernels;
#[doc(hidden)]
pub mod packed;
mod peak;
mod polling;
mod stealing;
mod winograd;

pub use kernels::align_corners_taps;
pub use peak::{measured_bandwidth_gbs, measured_peak_gflops};
use kernels::Buffers;
use packed::PackedB;
pub use packed::Precision;

/// An error where `precision` cannot run on this machine.
fn check_precision(precision: Precision) -> Result<()> {
    if precision == Precision::Int8 {
        if !int8_available() {
            return Err(Error::Config(
                "engine: int8 precision needs an x86-64 CPU with AVX2 and FMA (Intel 'Haswell' or later, AMD Zen or later), which this machine is not: use f32".into(),
            ));
        }
        return Ok(());
    }
    if precision == Precision::Bf16 && !bf16_available() {
        return Err(Error::Config(
            "engine: bf16 precision needs AVX-512 with AVX512-BF16 (AMD Zen 4 or later, Intel 'Cooper Lake') or AMX-BF16 tiles (Intel Xeon 4th generation 'Sapphire Rapids' or later, Linux 5.16+), which this machine does not offer (or XCEPTION_ENGINE_NO_AVX512 is set): use f32 or int8".into(),
        ));
    }
    if precision == Precision::Bf16x3 && !bf16x3_available() {
        return Err(Error::Config(
            "engine: bf16x3 precision needs AMX-BF16 tiles (Intel Xeon 4th generation 'Sapphire Rapids' or later), AVX-512 and Linux 5.16+, which this machine does not offer (or XCEPTION_ENGINE_NO_AVX512 or XCEPTION_ENGINE_NO_AMX is set; without tiles its three products would run slower than f32): use f32".into(),
        ));
    }
    Ok(())
}

/// The instruction set the fp32 kernels use on this CPU: "avx512", "avx2" (also with
/// XCEPTION_ENGINE_NO_AVX512 set on an AVX-512 machine) or "portable" (the `gemm` crate and
/// auto-vectorised loops).
pub fn simd_kernels() -> &'static str {
    match packed::kernel() {
        packed::Kernel::Avx512 => "avx512",
        packed::Kernel::Avx2 => "avx2",
        packed::Kernel::Portable => "portable",
    }
}

/// Whether `Precision::Int8` runs here (x86-64 with AVX2 and FMA).
pub fn int8_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return int8::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernels `Precision::Int8` runs on here, if any: "amx-int8" (AMX-INT8 tiles),
/// "avx512-vnni-int8" (AVX-512 VNNI), "avx512bw-int8" (AVX-512 without VNNI, 7-bit weights),
/// "avx-vnni-int8" (AVX-VNNI, on the AVX2 kernels) or "avx2-int8" (AVX2 alone, 7-bit weights).
/// XCEPTION_ENGINE_NO_AMX set in the environment passes over AMX, XCEPTION_ENGINE_NO_VNNI over
/// AMX and both VNNIs (`int8::kernel`).
pub fn int8_kernels() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    return int8::kernel().map(|k| k.name());
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Whether `Precision::Bf16` runs here: on AMX bf16 tiles granted by the kernel, or on AVX-512
/// with AVX512-BF16 (VDPBF16PS, twice the fp32 rate: AMD Zen 4 and later).
pub fn bf16_available() -> bool {
    bf16_kernels().is_some()
}

/// The kernels `Precision::Bf16` runs on here, if any: "amx-bf16" (AMX tiles) or "avx512-bf16"
/// (VDPBF16PS on the AVX-512 micro-kernel; also where XCEPTION_ENGINE_NO_AMX passes over tiles).
pub fn bf16_kernels() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    if bf16_tiles() {
        return Some("amx-bf16");
    } else if amx::dot_available() {
        return Some("avx512-bf16");
    }
    None
}

/// Whether `Precision::Bf16x3` runs here: AMX bf16 tiles only (its three products would run
/// slower than fp32 on VDPBF16PS).
pub fn bf16x3_available() -> bool {
    bf16_tiles()
}

/// Whether bf16 products run on AMX tiles here (`amx::available`).
fn bf16_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    return amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The reduced bf16 precisions this machine runs (bf16x3 on tiles only), for the tests.
#[cfg(test)]
pub(crate) fn bf16_precisions() -> &'static [Precision] {
    match (bf16_available(), bf16x3_available()) {
        (_, true) => &[Precision::Bf16, Precision::Bf16x3],
        (true, false) => &[Precision::Bf16],
        _ => &[],
    }
}

use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use xception_arch::{Block, Conv, Network, Norm, Op, Padding, Pooling, Shortcut};
use xception_arch::{Activation, Error, Result};

/// Per-channel scale and shift (an inference BatchNorm).
#[derive(Clone, Debug)]
struct Affine {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

/// A dense convolution (stem convs, 1x1 projections) as im2col + GEMM, BN folded.
#[derive(Clone, Debug)]
struct DenseConv {
    k: usize,
    stride: usize,
    dilation: usize,
    padding: Padding,
    cin: usize,
    cout: usize,
    /// (k*k*cin, cout), rows in (ky, kx, ci) order, with the bias.
    weight: PackedB,
    /// For k > 1, the same weights split by kernel row, (k*cin, cout) each, the bias with the
    /// first, for running without im2col (`DenseConv::direct_rows`); empty for 1x1, dilated and
    /// Winograd convs.
    kernel_rows: Vec<PackedB>,
    /// For 3x3 convs of stride 1 with channels enough (the stem's second), the weights for
    /// Winograd's algorithm, which then runs the conv (fp32 only; see `winograd`).
    winograd: Option<winograd::Winograd>,
    relu: bool,
}

impl DenseConv {
    /// The per-kernel-row weights of a conv that can run without im2col (measured faster even for
    /// the 3-channel stem conv: 0.32 against 0.62 ms): an undilated k x k conv, or a strided 1x1
    /// conv, whose single kernel row is `weight` itself. None for a 1x1 conv of stride 1 (a plain
    /// product) and dilated convs (im2col).
    fn direct_rows(&self) -> Option<&[PackedB]> {
        match self.k {
            1 => (self.stride > 1).then(|| std::slice::from_ref(&self.weight)),
            _ => (!self.kernel_rows.is_empty()).then_some(&self.kernel_rows[..]),
        }
    }
}

/// Depthwise conv followed by a pointwise conv, with everything around them folded in.
#[derive(Clone, Debug)]
struct SepConv {
    k: usize,
    stride: usize,
    dilation: usize,
    padding: Padding,
    channels: usize,
    /// Applied to each input value as it is loaded (a preceding BatchNorm), then ReLU if `in_relu`.
    in_affine: Option<Affine>,
    in_relu: bool,
    /// (k*k, channels)
    dw: Vec<f32>,
    dw_bias: Option<Vec<f32>>,
    mid_relu: bool,
    /// (channels, cout), with the bias.
    pw: PackedB,
    out_relu: bool,
}

#[derive(Clone, Debug)]
enum Step {
    Dense(DenseConv),
    Sep(SepConv),
    MaxPool { k: usize, stride: usize, padding: Padding },
    Affine { affine: Affine, relu: bool },
    Relu,
    /// A multi-level feature tap; `relu`: of the input rectified (the ReLU itself left to the
    /// separable conv after, which applies it as it loads).
    Tap { relu: bool },
    DecoderTap,
}

impl SepConv {
    /// Bytes of its weights (depthwise, pointwise and biases) as the products read them.
    fn weight_bytes(&self) -> u64 {
        bytes_of(self.dw.len() + self.dw_bias.as_ref().map_or(0, |b| b.len())) + self.pw.bytes()
    }

    /// A 3x3 separable conv of stride 1, padding 1, ReLU on its input and nothing else folded
    /// in (the middle flow's shape): `dw` is (9, channels), `pw` the packed pointwise weights.
    /// For benchmarks and tests, which vary the rest with struct update syntax.
    fn relu_3x3(dw: Vec<f32>, pw: PackedB) -> SepConv {
        SepConv {
            k: 3,
            stride: 1,
            dilation: 1,
            padding: Padding::Symmetric(1),
            channels: pw.k,
            in_affine: None,
            in_relu: true,
            dw,
            dw_bias: None,
            mid_relu: false,
            pw,
            out_relu: false,
        }
    }
}

impl Step {
    /// Whether the step makes a new tensor (`Engine::produce`) rather than changing its input in
    /// place (`Engine::in_place`).
    fn makes_new(&self) -> bool {
        matches!(self, Step::Dense(_) | Step::Sep(_) | Step::MaxPool { .. })
    }

    /// Whether the step records a feature tap (and leaves its input as it is).
    fn is_tap(&self) -> bool {
        matches!(self, Step::Tap { .. } | Step::DecoderTap)
    }
}

#[derive(Clone, Debug)]
enum ShortcutPlan {
    None,
    Identity,
    Project(Vec<Step>),
}

#[derive(Clone, Debug)]
struct BlockPlan {
    pre: Vec<Step>,
    body: Vec<Step>,
    shortcut: ShortcutPlan,
}

#[derive(Clone, Debug)]
struct DenseLayer {
    /// (in, out) with the bias, packed for the engine's GEMM; always fp32 (the classifier is
    /// memory-bound at batch 1: bf16 would save little and cost accuracy where it shows most).
    weight: PackedB,
    n_in: usize,
    n_out: usize,
    activation: Activation,
}

/// A (rows x cols) row-major matrix transposed, in 16 x 16 tiles: a weight matrix transposed a
/// row at a time wrote it a column at a time, a cache miss a value (the loads' 1x1 convs:
/// 2 MB each).
fn transposed(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 16;
    assert_eq!(src.len(), rows * cols, "transpose shape");
    let mut out = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// An NHWC batch of activations.
#[derive(Clone, Debug, PartialEq)]
pub struct Activations {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Activations {
    /// Line `iy` of image `b` (w x c values), or None for a line outside the image (in a conv's
    /// padding).
    pub(crate) fn line(&self, b: usize, iy: isize) -> Option<&[f32]> {
        (iy >= 0 && (iy as usize) < self.h).then(|| &self.data[(b * self.h + iy as usize) * self.w * self.c..][..self.w * self.c])
    }

    /// The same values in NCHW order.
    pub fn to_nchw(&self) -> Vec<f32> {
        let (n, h, w, c) = (self.n, self.h, self.w, self.c);
        let mut out = vec![0f32; self.data.len()];
        for b in 0..n {
            for y in 0..h {
                for x in 0..w {
                    let src = &self.data[((b * h + y) * w + x) * c..][..c];
                    for (ch, v) in src.iter().enumerate() {
                        out[((b * c + ch) * h + y) * w + x] = *v;
                    }
                }
            }
        }
        out
    }
}

/// What a forward pass returns.
#[derive(Clone, Debug)]
pub struct EngineOutput {
    pub features: Activations,
    /// (n, C)
    pub pooled: Vec<f32>,
    /// (n, classes) before the last layer's activation, when the model has a head.
    pub logits: Option<Vec<f32>>,
    /// The multi-level feature taps, in description order.
    pub taps: Vec<Activations>,
    /// Segmentation networks: per-pixel class logits at the input size, (n, H, W, classes).
    pub segmentation: Option<Activations>,
}

/// Activations a forward pass keeps besides its output.
#[derive(Default)]
struct Captured {
    /// Whether the multi-level feature taps are wanted.
    want_taps: bool,
    taps: Vec<Activations>,
    /// The DeepLab decoder's low-level feature.
    decoder: Option<Activations>,
}

/// The DeepLabv3+ head compiled (see `xception_arch::SegHead` for the data flow).
#[derive(Clone, Debug)]
struct SegPlan {
    image_pool: Vec<Step>,
    aspp: Vec<Vec<Step>>,
    project: Vec<Step>,
    low_level: Vec<Step>,
    decoder: Vec<Step>,
    logits: Vec<Step>,
}

/// One step of a traced pass (`Engine::forward_traced`).
#[derive(Clone, Debug)]
pub struct StepTime {
    /// The layer type: "dense conv 3x3", "dense conv 1x1", "separable conv", "separable conv +
    /// max pool" (fused), "max pool", "residual add", "norm", "relu", "tap", ...
    pub kind: &'static str,
    /// The step with its shapes, as XCEPTION_ENGINE_PROFILE prints it.
    pub what: String,
    pub seconds: f64,
    /// Multiply-adds of the step (0 where it does none: pools, adds, norms).
    pub macs: u64,
    /// The memory traffic the step cannot avoid: its input and output activations once each,
    /// its weights once and the residual it adds once (bytes). With `macs`, its arithmetic
    /// intensity.
    pub bytes: u64,
}

/// Bytes of an activation tensor.
fn bytes_of(values: usize) -> u64 {
    (values * std::mem::size_of::<f32>()) as u64
}

/// The compiled network.
pub struct Engine {
    net: Network,
    stem: Vec<Step>,
    blocks: Vec<BlockPlan>,
    tail: Vec<Step>,
    head: Vec<DenseLayer>,
    seg: Option<SegPlan>,
    pool: rayon::ThreadPool,
    threads: usize,
    /// XCEPTION_ENGINE_PROFILE=1: print each step's time to stderr.
    profile: bool,
    /// Whether idle workers poll for tasks through a single-image pass (`polling`); not if
    /// XCEPTION_ENGINE_NO_SPIN is set.
    spin: bool,
    /// While `forward_traced` runs: each step's time, kept.
    trace: Mutex<Option<Vec<StepTime>>>,
    /// Activation memory reused across layers and passes.
    bufs: Buffers,
    precision: Precision,
}

/// Weight lookup: the tensor's data by its checkpoint name (timm names, PyTorch layouts).
pub trait Weights {
    fn get(&self, name: &str) -> Option<&[f32]>;
}

struct Compiler<'a> {
    weights: &'a dyn Weights,
    precision: Precision,
}

impl Compiler<'_> {
    fn tensor(&self, name: String, len: usize) -> Result<&[f32]> {
        let t = self.weights.get(&name).ok_or_else(|| Error::Config(format!("engine: missing tensor '{name}'")))?;
        if t.len() != len {
            return Err(Error::Shape(format!("engine: tensor '{name}' has {} values, expected {len}", t.len())));
        }
        Ok(t)
    }

    /// A conv's (k x n) weight matrix packed for the products in the engine's precision.
    fn pack(&self, weight: &[f32], bias: &[f32], k: usize, n: usize) -> PackedB {
        PackedB::with_precision(weight, bias, k, n, self.precision)
    }

    /// The precision of a dense conv with a `kernel` x `kernel` window and `cin` input channels.
    /// A k x k conv (the stem's) stays fp32 where that is as fast or faster:
    /// - int8: only 1x1 convs (a k x k conv's rows overlap, and each product would quantize each
    ///   input value k times; the stem's convs are also where rounding costs the most);
    /// - bf16x3: its three tile products of depth 3 x cin ran the stem's convs at 1.44 and 3.31 ms
    ///   against fp32's 0.35 and 1.99 (Winograd), which is also exact (xception, 299, two
    ///   threads, per-step medians, 2026-12-07);
    /// - bf16: the first conv (3 input channels, products of depth 9): 0.41 ms against 0.35; the
    ///   second runs in bf16 on AMX tiles (1.22 ms against 1.99), in fp32 on VDPBF16PS (twice
    ///   the fp32 rate, where Winograd's F(2x2, 3x3) does 2.25 times fewer multiply-adds).
    fn dense_precision(&self, kernel: usize, cin: usize) -> Precision {
        match self.precision {
            Precision::Int8 | Precision::Bf16x3 if kernel > 1 => Precision::F32,
            // On VDPBF16PS (twice the fp32 rate) the fp32 Winograd convs do fewer multiply-adds
            // by more than that; only AMX tiles beat them.
            Precision::Bf16 if kernel > 1 && (cin < winograd::MIN_CHANNELS || !bf16_tiles()) => Precision::F32,
            p => p,
        }
    }

    /// Output pixels a side of a Winograd conv's tiles (`winograd`): F(4x4, 3x3) under int8 and
    /// bf16, whose errors are a hundred times its rounding's, F(2x2, 3x3) in fp32 and bf16x3,
    /// which are held to 1e-4 of Keras and timm.
    fn winograd_tile(&self) -> usize {
        match self.precision {
            Precision::Int8 | Precision::Bf16 => 4,
            Precision::F32 | Precision::Bf16x3 => 2,
        }
    }

    fn affine(&self, n: &Norm) -> Result<Affine> {
        let c = n.channels;
        let g = self.tensor(format!("{}.weight", n.key), c)?;
        let b = self.tensor(format!("{}.bias", n.key), c)?;
        let m = self.tensor(format!("{}.running_mean", n.key), c)?;
        let v = self.tensor(format!("{}.running_var", n.key), c)?;
        let eps = n.eps as f32;
        let scale: Vec<f32> = (0..c).map(|i| g[i] / (v[i] + eps).sqrt()).collect();
        let shift = (0..c).map(|i| b[i] - m[i] * scale[i]).collect();
        Ok(Affine { scale, shift })
    }

    /// If `ops[at]` is a norm, folds it into `weight` (row-major, `width` output channels per row):
    /// scales each output column and returns the shift as the bias. Also reports how many ops it
    /// consumed (0 or 1).
    fn fold_norm(&self, ops: &[Op], at: usize, weight: &mut [f32], width: usize) -> Result<(Option<Vec<f32>>, usize)> {
        let Some(Op::Norm(n)) = ops.get(at) else { return Ok((None, 0)) };
        let a = self.affine(n)?;
        for row in weight.chunks_exact_mut(width) {
            for (w, scale) in row.iter_mut().zip(&a.scale) {
                *w *= scale;
            }
        }
        Ok((Some(a.shift), 1))
    }

    /// OIHW weight of a conv.
    fn conv_weight(&self, c: &Conv) -> Result<&[f32]> {
        let len: usize = c.weight_shape().iter().product();
        self.tensor(format!("{}.weight", c.key), len)
    }

    fn compile(&self, ops: &[Op]) -> Result<Vec<Step>> {
        let mut steps = Vec::new();
        let mut i = 0;
        let next_is = |i: usize, f: &dyn Fn(&Op) -> bool| ops.get(i).is_some_and(f);
        let is_relu = |op: &Op| matches!(op, Op::Relu);
        let is_dw = |op: &Op| matches!(op, Op::Conv(c) if c.is_depthwise());
        while i < ops.len() {
            match &ops[i] {
                // A norm (+ReLU) feeding a depthwise conv is applied as the conv loads its input.
                Op::Norm(n) if next_is(i + 1, &is_relu) && next_is(i + 2, &is_dw) => {
                    let affine = self.affine(n)?;
                    let (step, used) = self.sep(ops, i + 2, Some(affine), true)?;
                    steps.push(step);
                    i = i + 2 + used;
                }
                Op::Relu if next_is(i + 1, &is_dw) => {
                    let (step, used) = self.sep(ops, i + 1, None, true)?;
                    steps.push(step);
                    i = i + 1 + used;
                }
                // A tap of rectified features before a separable conv (timm taps each downsampling
                // block's rectified input): the ReLU goes into the conv's loads, and only a kept
                // tap is rectified, in its copy (a pass over the activations saved otherwise).
                Op::Relu if next_is(i + 1, &|op| matches!(op, Op::Tap { .. })) && next_is(i + 2, &is_dw) => {
                    steps.push(Step::Tap { relu: true });
                    let (step, used) = self.sep(ops, i + 2, None, true)?;
                    steps.push(step);
                    i = i + 2 + used;
                }
                Op::Conv(c) if c.is_depthwise() => {
                    let (step, used) = self.sep(ops, i, None, false)?;
                    steps.push(step);
                    i += used;
                }
                Op::Conv(c) => {
                    let mut used = 1;
                    let w = self.conv_weight(c)?;
                    let (k, cin, cout) = (c.kernel, c.in_channels, c.out_channels);
                    // OIHW -> (ky, kx, ci) x co
                    let mut weight = vec![0f32; k * k * cin * cout];
                    for o in 0..cout {
                        for ci in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    weight[((ky * k + kx) * cin + ci) * cout + o] = w[((o * cin + ci) * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                    let own_bias = if c.bias { Some(self.tensor(format!("{}.bias", c.key), cout)?.to_vec()) } else { None };
                    let (shift, folded) = self.fold_norm(ops, i + used, &mut weight, cout)?;
                    let bias = match (own_bias, shift) {
                        (None, shift) => shift.unwrap_or_else(|| vec![0f32; cout]),
                        (Some(b), None) => b,
                        (Some(_), Some(_)) => return Err(Error::Config(format!("engine: {} has a bias and a norm", c.key))),
                    };
                    used += folded;
                    let relu = next_is(i + used, &is_relu);
                    if relu {
                        used += 1;
                    }
                    let precision = self.dense_precision(k, cin);
                    let winograd = (k == 3 && c.stride == 1 && c.dilation == 1 && precision == Precision::F32 && winograd::available(cin, cout)).then(|| winograd::Winograd::new(&weight, &bias, cin, cout, self.winograd_tile()));
                    steps.push(Step::Dense(DenseConv {
                        k,
                        stride: c.stride,
                        dilation: c.dilation,
                        padding: c.padding,
                        cin,
                        cout,
                        weight: PackedB::with_precision(&weight, &bias, k * k * cin, cout, precision),
                        // Not for a conv Winograd's algorithm runs.
                        kernel_rows: if k > 1 && c.dilation == 1 && winograd.is_none() {
                            let zero = vec![0f32; cout];
                            weight.chunks(k * cin * cout).enumerate().map(|(ky, w)| PackedB::with_precision(w, if ky == 0 { &bias } else { &zero }, k * cin, cout, precision)).collect()
                        } else {
                            Vec::new()
                        },
                        winograd,
                        relu,
                    }));
                    i += used;
                }
                Op::Norm(n) => {
                    let affine = self.affine(n)?;
                    let relu = next_is(i + 1, &is_relu);
                    steps.push(Step::Affine { affine, relu });
                    i += if relu { 2 } else { 1 };
                }
                Op::Relu => {
                    steps.push(Step::Relu);
                    i += 1;
                }
                Op::MaxPool { kernel, stride, padding } => {
                    steps.push(Step::MaxPool { k: *kernel, stride: *stride, padding: *padding });
                    i += 1;
                }
                Op::Tap { .. } => {
                    steps.push(Step::Tap { relu: false });
                    i += 1;
                }
                Op::DecoderTap => {
                    steps.push(Step::DecoderTap);
                    i += 1;
                }
            }
        }
        Ok(steps)
    }

    /// A separable conv starting at the depthwise conv `ops[at]`; returns the step and how many
    /// ops it consumed from `at`.
    fn sep(&self, ops: &[Op], at: usize, in_affine: Option<Affine>, in_relu: bool) -> Result<(Step, usize)> {
        let Op::Conv(dw) = &ops[at] else { unreachable!() };
        if dw.bias {
            return Err(Error::Config(format!("engine: depthwise conv {} with a bias", dw.key)));
        }
        let (k, c) = (dw.kernel, dw.in_channels);
        let w = self.conv_weight(dw)?;
        // (C, 1, k, k) -> (k*k, C)
        let mut dw_w = vec![0f32; k * k * c];
        for ch in 0..c {
            for t in 0..k * k {
                dw_w[t * c + ch] = w[ch * k * k + t];
            }
        }
        let (dw_bias, folded) = self.fold_norm(ops, at + 1, &mut dw_w, c)?;
        let mut used = 1 + folded;
        let mid_relu = matches!(ops.get(at + used), Some(Op::Relu));
        if mid_relu {
            used += 1;
        }
        let Some(Op::Conv(pw)) = ops.get(at + used) else {
            return Err(Error::Config(format!("engine: depthwise conv {} is not followed by a pointwise conv", dw.key)));
        };
        if pw.kernel != 1 || pw.groups != 1 || pw.stride != 1 || pw.bias {
            return Err(Error::Config(format!("engine: {} after {} is not a 1x1 conv without bias", pw.key, dw.key)));
        }
        used += 1;
        let cout = pw.out_channels;
        let pw_src = self.conv_weight(pw)?;
        // (cout, c, 1, 1) -> (c, cout)
        let mut pw_w = transposed(pw_src, cout, c);
        let (pw_bias, folded) = self.fold_norm(ops, at + used, &mut pw_w, cout)?;
        let pw_bias = pw_bias.unwrap_or_else(|| vec![0f32; cout]);
        used += folded;
        let out_relu = matches!(ops.get(at + used), Some(Op::Relu));
        if out_relu {
            used += 1;
        }
        let step = Step::Sep(SepConv {
            k,
            stride: dw.stride,
            dilation: dw.dilation,
            padding: dw.padding,
            channels: c,
            in_affine,
            in_relu,
            dw: dw_w,
            dw_bias,
            mid_relu,
            pw: self.pack(&pw_w, &pw_bias, c, cout),
            out_relu,
        });
        Ok((step, used))
    }

    fn block(&self, b: &Block) -> Result<BlockPlan> {
        Ok(BlockPlan {
            pre: self.compile(&b.pre)?,
            body: self.compile(&b.body)?,
            shortcut: match &b.shortcut {
                Shortcut::None => ShortcutPlan::None,
                Shortcut::Identity => ShortcutPlan::Identity,
                Shortcut::Project(ops) => ShortcutPlan::Project(self.compile(ops)?),
            },
        })
    }
}

impl Engine {
    /// Compiles `net` with its weights (looked up by checkpoint name). `threads` 0 means all cores.
    pub fn new(net: &Network, weights: &dyn Weights, threads: usize) -> Result<Engine> {
        Engine::with_precision(net, weights, threads, Precision::F32)
    }

    /// `new`, with the products in `precision`. bf16 needs AMX (checked: an error otherwise).
    pub fn with_precision(net: &Network, weights: &dyn Weights, threads: usize, precision: Precision) -> Result<Engine> {
        check_precision(precision)?;
        let c = Compiler { weights, precision };
        let stem = c.compile(&net.stem)?;
        let blocks = net.blocks.iter().map(|b| c.block(b)).collect::<Result<Vec<_>>>()?;
        let tail = c.compile(&net.tail)?;
        let head = net
            .head
            .iter()
            .map(|d| {
                let w = c.tensor(format!("{}.weight", d.key), d.in_features * d.out_features)?;
                let bias = c.tensor(format!("{}.bias", d.key), d.out_features)?.to_vec();
                // (out, in) -> (in, out)
                let weight = transposed(w, d.out_features, d.in_features);
                let weight = PackedB::new(&weight, &bias, d.in_features, d.out_features);
                Ok(DenseLayer { weight, n_in: d.in_features, n_out: d.out_features, activation: d.activation })
            })
            .collect::<Result<Vec<_>>>()?;
        let seg = match &net.segmentation {
            None => None,
            Some(h) => Some(SegPlan {
                image_pool: c.compile(&h.image_pool)?,
                aspp: h.aspp.iter().map(|b| c.compile(b)).collect::<Result<Vec<_>>>()?,
                project: c.compile(&h.project)?,
                low_level: c.compile(&h.low_level)?,
                decoder: c.compile(&h.decoder)?,
                logits: c.compile(&h.logits)?,
            }),
        };
        let threads = resolve_threads(threads);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Config(format!("engine: cannot start {threads} threads: {e}")))?;
        let profile = std::env::var("XCEPTION_ENGINE_PROFILE").is_ok_and(|v| v == "1");
        let spin = std::env::var_os("XCEPTION_ENGINE_NO_SPIN").is_none();
        keep_freed_memory();
        Ok(Engine { net: net.clone(), stem, blocks, tail, head, seg, pool, threads, profile, spin, trace: Mutex::new(None), bufs: Buffers::new(threads), precision })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn network(&self) -> &Network {
        &self.net
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs an NHWC float32 batch (already preprocessed), keeping the multi-level feature taps.
    pub fn forward(&self, input: &[f32], n: usize, h: usize, w: usize) -> Result<EngineOutput> {
        self.forward_with(input, n, h, w, true)
    }

    /// `forward`, with the feature taps only when `taps` (copying them costs time on the large
    /// early layers).
    ///
    /// A batch of several images runs as one stream of whole images per thread, each image's
    /// layers split into tasks as usual, so a thread that runs out of images helps the others.
    /// Compared with sharing every layer of one image between the threads, two streams have no
    /// per-layer hand-over between the cores: xception and xception65 at 299, batch 8, 2
    /// threads, measured 6-7% faster (pass by pass, alternating). The outputs are the same either
    /// way: how a layer is split never changes the order of its sums.
    pub fn forward_with(&self, input: &[f32], n: usize, h: usize, w: usize, taps: bool) -> Result<EngineOutput> {
        if input.len() != n * h * w * 3 {
            return Err(Error::Shape(format!("engine: input of {} values is not {n}x{h}x{w}x3", input.len())));
        }
        if n == 0 {
            return Err(Error::Shape("engine: an empty batch (no images)".into()));
        }
        self.net.check_input_size(h, w)?;
        let per = h * w * 3;
        let image = |i: usize| self.forward_batch(&input[i * per..][..per], 1, h, w, taps);
        if n < 2 || self.threads < 2 {
            return self.polling(|| Ok(concat((0..n).map(image).collect::<Result<Vec<_>>>()?)));
        }
        let next = AtomicUsize::new(0);
        let done: Vec<Mutex<Option<Result<EngineOutput>>>> = (0..n).map(|_| Mutex::new(None)).collect();
        self.pool.broadcast(|_| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let out = image(i);
            *done[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
        });
        let outs = done.into_iter().map(|d| d.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every image ran")).collect::<Result<Vec<_>>>()?;
        Ok(concat(outs))
    }

    /// `f` on the engine's threads, with the idle ones polling for tasks while it runs
    /// (`polling::run`) unless XCEPTION_ENGINE_NO_SPIN is set.
    fn polling<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.spin && self.threads > 1 {
            polling::run(&self.pool, f)
        } else {
            self.pool.install(f)
        }
    }

    fn forward_batch(&self, input: &[f32], n: usize, h: usize, w: usize, want_taps: bool) -> Result<EngineOutput> {
        self.pool.install(|| {
            let mut taps = Captured { want_taps, ..Default::default() };
            let mut data = self.bufs.take(input.len());
            data.copy_from_slice(input);
            let mut x = Activations { n, h, w, c: 3, data };
            x = self.run(&self.stem, x, &mut taps);
            for b in &self.blocks {
                x = self.block(b, x, &mut taps);
            }
            x = self.run(&self.tail, x, &mut taps);
            let started = self.step_start();
            let pooled = global_pool(&x, self.net.config.pooling);
            self.profile_step(started, "global pool", (0, bytes_of(x.data.len() + pooled.len())), || "global pool".into());
            let logits = (!self.head.is_empty()).then(|| {
                let started = self.step_start();
                let logits = self.classify(&pooled, n);
                let macs = self.head.iter().map(|l| (n * l.n_in * l.n_out) as u64).sum();
                let bytes = self.head.iter().map(|l| l.weight.bytes() + bytes_of(n * (l.n_in + l.n_out))).sum();
                self.profile_step(started, "classifier", (macs, bytes), || "classifier".into());
                logits
            });
            let segmentation = match &self.seg {
                None => None,
                Some(plan) => {
                    let low = taps.decoder.take().ok_or_else(|| Error::Config("engine: segmentation network without a decoder tap".into()))?;
                    Some(self.segment(plan, &x, low, h, w))
                }
            };
            Ok(EngineOutput { features: x, pooled, logits, taps: taps.taps, segmentation })
        })
    }

    /// One block: pre-ops, body, shortcut and residual add.
    fn block(&self, b: &BlockPlan, x: Activations, taps: &mut Captured) -> Activations {
        let input = self.run(&b.pre, x, taps);
        // A body ending in a separable conv without ReLU takes the shortcut into its GEMM, one
        // ending in a max pool (the entry flow) into the pool: no separate pass for the add. The
        // separable conv before such a pool goes with it (`produce_end`).
        let fuses = |s: &Step| matches!(s, Step::Sep(s) if !s.out_relu) || matches!(s, Step::MaxPool { .. });
        let ends = match &b.body[..] {
            _ if matches!(b.shortcut, ShortcutPlan::None) => 0,
            // A body of two separable convs and the pool (the entry-flow blocks, after their
            // feature taps) in one go where both convs' outputs are large: neither goes to
            // memory.
            [lead @ .., Step::Sep(pre), Step::Sep(s), Step::MaxPool { .. }] if lead.iter().all(Step::is_tap) && kernels::pool_chain_pays(&input, pre, s, self.threads) => 3,
            [.., Step::Sep(_), Step::MaxPool { .. }] => 2,
            // A body of separable convs alone (the aligned Xceptions' blocks) in one go where
            // the outputs before the last are large; feature taps between them are passed over
            // unless wanted.
            body if !(taps.want_taps && body.iter().any(|s| matches!(s, Step::Tap { .. }))) && seps(body).is_some_and(|c| chain::chain_pays(&c, (input.h, input.w), self.threads)) => body.len(),
            [.., last] if fuses(last) => 1,
            _ => 0,
        };
        let (body, last) = b.body.split_at(b.body.len() - ends);
        // A projection shortcut ending in the pool is made there, a pool line at a time
        // (`kernels::Residual::Project`): the body runs on the input borrowed.
        if let (ShortcutPlan::Project(steps), Some(Step::MaxPool { .. })) = (&b.shortcut, last.last()) {
            if let [Step::Dense(d)] = &steps[..] {
                if kernels::projects_in_pool(d, &input, self.threads) {
                    // Feature taps alone before the last steps record the input, no copy of it.
                    let lead = body.iter().take_while(|s| s.is_tap()).count();
                    body[..lead].iter().for_each(|s| self.record(s, &input, taps));
                    let body = &body[lead..];
                    let partial = (!body.is_empty()).then(|| self.run_from(body, &input, taps));
                    let out = self.produce_end(last, partial.as_ref().unwrap_or(&input), kernels::Residual::Project(d, &input));
                    if let Some(p) = partial {
                        self.bufs.give(p.data);
                    }
                    self.bufs.give(input.data);
                    return out;
                }
            }
        }
        // The body's first conv and the projection read the block input in place, so the
        // identity shortcut is the input itself and neither needs a copy of it.
        let (partial, skip) = match &b.shortcut {
            ShortcutPlan::None => (self.run(body, input, taps), None),
            // A body made whole by `produce_end` (a chain) reads the input that is its shortcut.
            ShortcutPlan::Identity if body.is_empty() && !last.is_empty() => {
                let out = self.produce_end(last, &input, kernels::Residual::Ready(&input.data));
                self.bufs.give(input.data);
                return out;
            }
            ShortcutPlan::Identity => (self.run_from(body, &input, taps), Some(input)),
            ShortcutPlan::Project(steps) => {
                let skip = self.run_from(steps, &input, taps);
                (self.run(body, input, taps), Some(skip))
            }
        };
        let Some(skip) = skip else { return partial };
        if !last.is_empty() {
            let out = self.produce_end(last, &partial, kernels::Residual::Ready(&skip.data));
            self.bufs.give(partial.data);
            self.bufs.give(skip.data);
            return out;
        }
        let mut out = partial;
        let started = self.step_start();
        debug_assert_eq!((skip.h, skip.w, skip.c), (out.h, out.w, out.c));
        out.data.par_chunks_mut(1 << 14).zip(skip.data.par_chunks(1 << 14)).for_each(|(o, s)| {
            kernels::simd(
                #[inline(always)]
                || o.iter_mut().zip(s).for_each(|(o, s)| *o += s),
            )
        });
        self.bufs.give(skip.data);
        self.profile_step(started, "residual add", (0, 3 * bytes_of(out.data.len())), || "residual add".into());
        out
    }

    /// `run` on a borrowed input: a first step that makes a new tensor (a conv, a pool) reads
    /// `x` in place; otherwise the steps run on a copy.
    fn run_from(&self, steps: &[Step], x: &Activations, taps: &mut Captured) -> Activations {
        // Taps first record `x` as it is.
        let lead = steps.iter().take_while(|s| s.is_tap()).count();
        for step in &steps[..lead] {
            self.record(step, x, taps);
        }
        let steps = &steps[lead..];
        match steps.split_first() {
            Some((first, rest)) if first.makes_new() => {
                let y = self.produce(first, x, None);
                self.run(rest, y, taps)
            }
            _ => self.run(steps, self.copy(x), taps),
        }
    }

    /// The last steps of a block with its shortcut `residual` added as they store: one step
    /// (`produce`), or a separable conv and the max pool after it, made band by band in one go
    /// where its output is large (`kernels::sep_conv_pool`), or two separable convs and the pool
    /// where `kernels::pool_chain_pays` (`block` checks).
    fn produce_end(&self, last: &[Step], x: &Activations, residual: kernels::Residual) -> Activations {
        match last {
            [Step::Sep(pre), Step::Sep(s), Step::MaxPool { k, stride, padding }] => {
                let started = self.step_start();
                let out = kernels::sep_conv_pool(x, Some(pre), s, (*k, *stride, *padding), &self.bufs, Some(residual), self.threads);
                let cost = (chain::chain_macs(x, &[pre, s]) + residual.macs(&out), bytes_of(x.data.len() + out.data.len() + residual.reads()) + pre.weight_bytes() + s.weight_bytes());
                self.profile_step(started, "separable convs + max pool", cost, || format!("separable {}->{}, {}->{} + max pool + {}, pooled to {}x{}", pre.channels, pre.pw.n, s.channels, s.pw.n, residual.name(), out.h, out.w));
                out
            }
            [Step::Sep(s), Step::MaxPool { k, stride, padding }] if kernels::pool_fusion_pays((x.h, x.w), s, self.threads) => {
                let started = self.step_start();
                let out = kernels::sep_conv_pool(x, None, s, (*k, *stride, *padding), &self.bufs, Some(residual), self.threads);
                let cost = (kernels::sep_conv_macs(x, s) + residual.macs(&out), bytes_of(x.data.len() + out.data.len() + residual.reads()) + s.weight_bytes());
                self.profile_step(started, "separable conv + max pool", cost, || format!("separable {}->{} + max pool + {}, pooled to {}x{}", s.channels, s.pw.n, residual.name(), out.h, out.w));
                out
            }
            [sep @ Step::Sep(_), pool @ Step::MaxPool { .. }] => {
                let y = self.produce(sep, x, None);
                let out = self.produce(pool, &y, Some(residual));
                self.bufs.give(y.data);
                out
            }
            [step] => self.produce(step, x, Some(residual)),
            steps if let Some(convs) = seps(steps) => {
                let kernels::Residual::Ready(ready) = residual else { unreachable!("engine: a shortcut projection is made in a pool only") };
                let started = self.step_start();
                let out = chain::sep_chain(x, &convs, Some(ready), &self.bufs, self.threads);
                let macs = chain::chain_macs(x, &convs) + residual.macs(&out);
                let weights: u64 = convs.iter().map(|s| s.weight_bytes()).sum();
                self.profile_step(started, "separable conv chain", (macs, bytes_of(x.data.len() + out.data.len() + residual.reads()) + weights), || format!("{} separable convs {}->{} + {}, to {}x{}", convs.len(), convs[0].channels, out.c, residual.name(), out.h, out.w));
                out
            }
            _ => unreachable!("produce_end: one step, separable convs, or one or two separable convs and a max pool"),
        }
    }

    /// A step that makes a new tensor from `x` (conv, separable conv, max pool), with the
    /// residual added as the output is stored where given (not for dense convs).
    fn produce(&self, step: &Step, x: &Activations, residual: Option<kernels::Residual>) -> Activations {
        let started = self.step_start();
        let out = match step {
            Step::Dense(d) => {
                assert!(residual.is_none(), "engine: no residual for a dense conv");
                kernels::dense_conv(x, d, self.threads, &self.bufs)
            }
            Step::Sep(s) => {
                let ready = residual.map(|r| match r {
                    kernels::Residual::Ready(r) => r,
                    kernels::Residual::Project(..) => unreachable!("engine: a shortcut projection is made in a pool only"),
                });
                kernels::sep_conv(x, s, self.threads, &self.bufs, ready)
            }
            Step::MaxPool { k, stride, padding } => kernels::max_pool(x, *k, *stride, *padding, &self.bufs, residual),
            _ => unreachable!("produce: an in-place step (Engine::in_place)"),
        };
        let (kind, macs, weights) = match step {
            Step::Dense(d) => (if d.k == 1 { "dense conv 1x1" } else if d.k == 3 { "dense conv 3x3" } else { "dense conv" }, (out.n * out.h * out.w * d.cout * d.cin * d.k * d.k) as u64, d.weight.bytes()),
            Step::Sep(s) => ("separable conv", kernels::sep_conv_macs(x, s), s.weight_bytes()),
            // A pool that makes the block's shortcut projection is a type of its own (its
            // multiply-adds are the projection's).
            _ if matches!(residual, Some(kernels::Residual::Project(..))) => ("max pool + shortcut projection", 0, 0),
            _ => ("max pool", 0, 0),
        };
        let bytes = bytes_of(x.data.len() + out.data.len() + residual.map_or(0, |r| r.reads())) + weights;
        let macs = macs + residual.map_or(0, |r| r.macs(&out));
        self.profile_step(started, kind, (macs, bytes), || {
            let what = match step {
                Step::Dense(d) => format!("dense {}x{} {}->{}", d.k, d.k, d.cin, d.cout),
                Step::Sep(s) => format!("separable {}->{} at {}x{}", s.channels, s.pw.n, out.h, out.w),
                _ => "max pool".into(),
            };
            match residual {
                Some(r) => format!("{what} + {}", r.name()),
                None => what,
            }
        });
        out
    }

    /// A copy of `x` in reused memory.
    fn copy(&self, x: &Activations) -> Activations {
        let started = self.step_start();
        let mut data = self.bufs.take(x.data.len());
        data.copy_from_slice(&x.data);
        self.profile_step(started, "copy", (0, 2 * bytes_of(x.data.len())), || format!("copy of {}x{}x{}", x.h, x.w, x.c));
        Activations { data, ..*x }
    }

    /// The start of a step, where steps are timed (XCEPTION_ENGINE_PROFILE=1 or a traced pass).
    fn step_start(&self) -> Option<std::time::Instant> {
        (self.profile || self.trace.lock().unwrap_or_else(|e| e.into_inner()).is_some()).then(std::time::Instant::now)
    }

    /// The time since `started` of the step `what` names (of type `kind`; `macs` multiply-adds
    /// and `bytes` of compulsory traffic, see `StepTime`): printed with XCEPTION_ENGINE_PROFILE=1,
    /// kept in a traced pass.
    fn profile_step(&self, started: Option<std::time::Instant>, kind: &'static str, (macs, bytes): (u64, u64), what: impl FnOnce() -> String) {
        let Some(t) = started else { return };
        let seconds = t.elapsed().as_secs_f64();
        let what = what();
        if self.profile {
            eprintln!("engine step {:>8.3} ms  {}", seconds * 1e3, what);
        }
        if let Some(trace) = self.trace.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            trace.push(StepTime { kind, what, seconds, macs, bytes });
        }
    }

    /// `forward_with` (no taps) that also returns the time of each step, in order. For
    /// measurements: a pass run meanwhile from another thread would add its steps too.
    pub fn forward_traced(&self, input: &[f32], n: usize, h: usize, w: usize) -> Result<(EngineOutput, Vec<StepTime>)> {
        *self.trace.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
        let out = self.forward_with(input, n, h, w, false);
        let steps = self.trace.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
        Ok((out?, steps))
    }

    /// DeepLabv3+: ASPP on the encoder output, the decoder on [ASPP, low-level], logits resized
    /// to the input. Every resize is bilinear with align_corners=True, as TF DeepLab's.
    fn segment(&self, plan: &SegPlan, encoder: &Activations, low: Activations, h: usize, w: usize) -> Activations {
        let mut none = Captured::default();
        let pooled = Activations { n: encoder.n, h: 1, w: 1, c: encoder.c, data: global_pool(encoder, Pooling::Avg) };
        let image = self.run(&plan.image_pool, pooled, &mut none);
        let mut branches = vec![kernels::resize_bilinear(&image, encoder.h, encoder.w)];
        for b in &plan.aspp {
            branches.push(self.run(b, encoder.clone(), &mut none));
        }
        let aspp = self.run(&plan.project, kernels::concat_channels(&branches), &mut none);
        let low = self.run(&plan.low_level, low, &mut none);
        let up = kernels::resize_bilinear(&aspp, low.h, low.w);
        let decoded = self.run(&plan.decoder, kernels::concat_channels(&[up, low]), &mut none);
        let logits = self.run(&plan.logits, decoded, &mut none);
        kernels::resize_bilinear(&logits, h, w)
    }

    fn classify(&self, pooled: &[f32], n: usize) -> Vec<f32> {
        let mut x = pooled.to_vec();
        for (li, layer) in self.head.iter().enumerate() {
            let mut out = vec![0f32; n * layer.n_out];
            // Its weight panels shared out between the threads: at batch 1 the product is bound
            // by reading the weights (8 MB for ImageNet's 2048 x 1000).
            kernels::matmul(kernels::Lhs::Ready(&x), &layer.weight, &mut out, None, false, self.threads);
            if li + 1 < self.head.len() {
                activate(&mut out, layer.n_out, layer.activation);
            }
            x = out;
        }
        x
    }

    fn run(&self, steps: &[Step], mut x: Activations, taps: &mut Captured) -> Activations {
        for step in steps {
            if step.makes_new() {
                let y = self.produce(step, &x, None);
                self.bufs.give(std::mem::replace(&mut x, y).data);
            } else {
                self.in_place(step, &mut x, taps);
            }
        }
        x
    }

    /// A step that changes `x` in place (norm, ReLU) or only records it (taps).
    fn in_place(&self, step: &Step, x: &mut Activations, taps: &mut Captured) {
        let started = self.step_start();
        let what = match step {
            Step::Affine { affine, relu } => {
                let c = x.c;
                let relu = *relu;
                x.data.par_chunks_mut(c * 64).for_each(|chunk| {
                    kernels::simd(
                        #[inline(always)]
                        || {
                            for px in chunk.chunks_mut(c) {
                                for ((v, s), t) in px.iter_mut().zip(&affine.scale).zip(&affine.shift) {
                                    let y = *v * s + t;
                                    *v = if relu { y.max(0.0) } else { y };
                                }
                            }
                        },
                    )
                });
                "norm"
            }
            Step::Relu => {
                x.data.par_chunks_mut(1 << 14).for_each(|c| {
                    kernels::simd(
                        #[inline(always)]
                        || c.iter_mut().for_each(|v| *v = v.max(0.0)),
                    )
                });
                "relu"
            }
            Step::Tap { .. } | Step::DecoderTap => return self.record(step, x, taps),
            Step::Dense(_) | Step::Sep(_) | Step::MaxPool { .. } => unreachable!("in_place: a step that makes a new tensor"),
        };
        // Each value read and written once.
        self.profile_step(started, what, (0, 2 * bytes_of(x.data.len())), || what.into());
    }

    /// A step that only records `x` (a tap).
    fn record(&self, step: &Step, x: &Activations, taps: &mut Captured) {
        let started = self.step_start();
        let what = match step {
            Step::Tap { relu } => {
                if taps.want_taps {
                    let mut tap = x.clone();
                    if *relu {
                        tap.data.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                    taps.taps.push(tap);
                }
                "tap"
            }
            Step::DecoderTap => {
                taps.decoder = Some(x.clone());
                "decoder tap"
            }
            _ => unreachable!("record: a tap"),
        };
        // A tap is copied when it is kept.
        let moved = !matches!(step, Step::Tap { .. }) || taps.want_taps;
        self.profile_step(started, what, (0, if moved { 2 * bytes_of(x.data.len()) } else { 0 }), || what.into());
    }
}

/// The separable convs `steps` are, if they are nothing else but feature taps.
fn seps(steps: &[Step]) -> Option<Vec<&SepConv>> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Sep(s) => Some(Some(s)),
            Step::Tap { .. } => None,
            _ => Some(None),
        })
        .collect()
}

/// `threads`, or every core for 0.
pub fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        threads
    }
}

/// Each layer allocates activations of up to 25 MB. By default glibc returns such blocks to the
/// kernel on free and page-faults them in again on the next allocation, which measured as much as
/// the arithmetic on the large early layers; keep freed memory in the heap instead.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tuning parameters.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}

/// Stacks per-image outputs along the batch.
fn concat(parts: Vec<EngineOutput>) -> EngineOutput {
    // One image's output as it is: copying it (xception's 10x10x2048 features, value by value)
    // took ~0.4 ms of a 62 ms pass.
    if parts.len() == 1 {
        return parts.into_iter().next().expect("one part");
    }
    let stack = |acts: Vec<&Activations>| {
        let first = acts[0];
        let mut data = Vec::with_capacity(acts.iter().map(|a| a.data.len()).sum());
        for a in &acts {
            data.extend_from_slice(&a.data);
        }
        Activations { n: acts.iter().map(|a| a.n).sum(), h: first.h, w: first.w, c: first.c, data }
    };
    let taps = (0..parts[0].taps.len()).map(|t| stack(parts.iter().map(|p| &p.taps[t]).collect())).collect();
    EngineOutput {
        features: stack(parts.iter().map(|p| &p.features).collect()),
        pooled: parts.iter().flat_map(|p| p.pooled.iter().copied()).collect(),
        logits: parts[0].logits.as_ref().map(|_| parts.iter().flat_map(|p| p.logits.as_ref().unwrap().iter().copied()).collect()),
        taps,
        segmentation: parts[0].segmentation.as_ref().map(|_| stack(parts.iter().map(|p| p.segmentation.as_ref().unwrap()).collect())),
    }
}

fn activate(x: &mut [f32], width: usize, a: Activation) {
    match a {
        Activation::Linear => {}
        Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Sigmoid => x.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
        Activation::Tanh => x.iter_mut().for_each(|v| *v = v.tanh()),
        Activation::Softmax => {
            for row in x.chunks_mut(width) {
                let max = row.iter().fold(f32::MIN, |m, &v| m.max(v));
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                row.iter_mut().for_each(|v| *v /= sum);
            }
        }
    }
}

fn global_pool(x: &Activations, pooling: Pooling) -> Vec<f32> {
    let (hw, c) = (x.h * x.w, x.c);
    let mut out = vec![0f32; x.n * c];
    // Blocks of channels shared out, each summed pixel by pixel in SIMD registers (the same
    // order as one pass over the pixels, so the same values). Measured (xception, 299, two
    // threads, per-step medians, three runs): 0.09-0.10 ms on one thread in baseline x86-64
    // code -> 0.044-0.048 (ONNX Runtime's GlobalAveragePool: 0.042).
    out.par_chunks_mut(c).enumerate().for_each(|(b, o)| {
        let img = &x.data[b * hw * c..][..hw * c];
        o.par_chunks_mut(GLOBAL_POOL_BLOCK).enumerate().for_each(|(j, o)| {
            let (c0, len) = (j * GLOBAL_POOL_BLOCK, o.len());
            let px = |p: usize| &img[p * c + c0..][..len];
            kernels::simd(
                #[inline(always)]
                || match pooling {
                    Pooling::Avg => {
                        o.fill(0.0);
                        for p in 0..hw {
                            o.iter_mut().zip(px(p)).for_each(|(o, v)| *o += v);
                        }
                        o.iter_mut().for_each(|v| *v /= hw as f32);
                    }
                    Pooling::Max => {
                        o.copy_from_slice(px(0));
                        for p in 1..hw {
                            o.iter_mut().zip(px(p)).for_each(|(o, v)| *o = o.max(*v));
                        }
                    }
                },
            )
        });
    });
    out
}

/// Channels per task of `global_pool` (2048 at the end of every Xception: eight tasks).
const GLOBAL_POOL_BLOCK: usize = 256;

/// One layer kind timed alone (for `xception bench --ops`).
#[derive(Clone, Debug)]
pub struct OpTiming {
    pub op: &'static str,
    pub flow: &'static str,
    /// (h, w, c_in, c_out)
    pub shape: (usize, usize, usize, usize),
    pub seconds: f64,
    pub gflops: f64,
}

/// Times the depthwise 3x3 and the pointwise 1x1 kernels (the latter in `precision`), and the
/// two as one separable conv, at the entry (the three downsampling blocks' second separable
/// convs), middle and exit flow shapes of Xception at 299 (median of `runs`).
pub fn bench_ops(threads: usize, runs: usize, precision: Precision) -> Result<Vec<OpTiming>> {
    check_precision(precision)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().expect("thread pool");
    let shapes = [("entry", 147, 147, 128, 128), ("entry 74", 74, 74, 256, 256), ("entry 37", 37, 37, 728, 728), ("middle", 19, 19, 728, 728), ("exit", 10, 10, 1536, 2048)];
    let mut out = Vec::new();
    for (flow, h, w, c, cout) in shapes {
        let x = Activations { n: 1, h, w, c, data: (0..h * w * c).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect() };
        let pw: Vec<f32> = (0..c * cout).map(|i| ((i % 17) as f32 - 8.0) / 100.0).collect();
        let dw = (0..9 * c).map(|i| ((i % 13) as f32 - 6.0) / 10.0).collect();
        let sep = SepConv::relu_3x3(dw, PackedB::with_precision(&pw, &vec![0.0; cout], c, cout, precision));
        let time = |f: &mut dyn FnMut()| {
            f();
            let mut t: Vec<f64> = (0..runs.max(1))
                .map(|_| {
                    let s = std::time::Instant::now();
                    f();
                    s.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        let mut mid = Vec::new();
        let dw = pool.install(|| {
            time(&mut || {
                kernels::depthwise_into(&x, &sep, &mut mid);
            })
        });
        let mut dst = vec![0f32; h * w * cout];
        let pw = pool.install(|| time(&mut || kernels::matmul(kernels::Lhs::Ready(&mid), &sep.pw, &mut dst, None, false, threads)));
        out.push(OpTiming { op: "depthwise 3x3", flow, shape: (h, w, c, c), seconds: dw, gflops: 2.0 * (h * w * c * 9) as f64 / dw / 1e9 });
        out.push(OpTiming { op: "pointwise 1x1", flow, shape: (h, w, c, cout), seconds: pw, gflops: 2.0 * (h * w * c * cout) as f64 / pw / 1e9 });
        let bufs = Buffers::new(threads);
        let both = pool.install(|| {
            time(&mut || {
                let y = kernels::sep_conv(&x, &sep, threads, &bufs, None);
                bufs.give(y.data);
            })
        });
        out.push(OpTiming { op: "separable", flow, shape: (h, w, c, cout), seconds: both, gflops: 2.0 * (h * w * c * (cout + 9)) as f64 / both / 1e9 });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The tiled transpose puts every value where its indices say, for shapes past its tiles
    /// and ragged.
    #[test]
    fn transposed_moves_every_value() {
        for (rows, cols) in [(1, 1), (3, 40), (35, 50), (16, 16), (728, 17)] {
            let src: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            let t = super::transposed(&src, rows, cols);
            for c in 0..cols {
                for r in 0..rows {
                    assert_eq!(t[c * rows + r], src[r * cols + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }
}
