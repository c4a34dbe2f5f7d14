//! The CPU training layout's (NHWC) depthwise convolution and training-mode BatchNorm as burn
//! operations with our own forward and backward kernels, plugged in through burn's
//! backend-extension mechanism.
//!
//! Written with burn's tensor ops, a 3x3 depthwise conv is nine shifted slices multiplied and
//! added, and its backward nine more full-size passes for each of the input and the weight: on
//! the CPU that made it several times slower than the 1x1 conv next to it, which does 10-100x
//! more arithmetic. BatchNorm in training mode was about ten elementwise passes each way. Here
//! each direction is one or two passes over the data, channels innermost (contiguous in NHWC, so
//! the loops vectorise), images or rows in parallel.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

/// Whether these kernels can run: they are written for the CPU backend, the only one a build
/// without the `cuda` feature has (a cuda build trains on burn's own NCHW ops).
pub const AVAILABLE: bool = !cfg!(feature = "cuda");

/// Where a depthwise conv reads: kernel k x k, stride, dilation, the padding before the first
/// row and column, and the output size (the padding after follows from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl Geometry {
    /// The input row (or column) tap `i` of output `o` reads, None in the padding.
    #[inline]
    fn source(&self, o: usize, i: usize, pad: usize, n: usize) -> Option<usize> {
        (o * self.stride + i * self.dilation).checked_sub(pad).filter(|&v| v < n)
    }

    /// Calls `f(tap, input row, output column, input column)` for every tap output row `oy`
    /// reads from an `h` x `w` input (taps in the padding skipped), taps by kernel row, then
    /// output column, then kernel column: the one walk the forward and both gradients share.
    #[inline]
    fn row_taps(&self, oy: usize, h: usize, w: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let k = self.kernel;
        for i in 0..k {
            let Some(iy) = self.source(oy, i, self.pad_top, h) else { continue };
            for ox in 0..self.out_w {
                for j in 0..k {
                    if let Some(ix) = self.source(ox, j, self.pad_left, w) {
                        f(i * k + j, iy, ox, ix);
                    }
                }
            }
        }
    }
}

#[backend_extension(Flex, Autodiff)]
pub trait TrainOpsBackend: Backend {
    /// `x` (N, H, W, C), `weight` (C, 1, k, k) -> (N, out_h, out_w, C).
    #[allow(clippy::too_many_arguments)]
    fn depthwise_nhwc(x: FloatTensor<Self>, weight: FloatTensor<Self>, kernel: usize, stride: usize, dilation: usize, pad_top: usize, pad_left: usize, out_h: usize, out_w: usize) -> FloatTensor<Self>;

    /// BatchNorm on the batch's statistics: `x` (..., C), `mean` and `var` (C) its per-channel
    /// mean and biased variance (constants: the backward accounts for their dependence on `x`),
    /// `gamma`, `beta` (C) -> gamma * (x - mean) / sqrt(var + eps) + beta.
    fn batch_norm_train_nhwc(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, mean: FloatTensor<Self>, var: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;

    /// Per-channel mean and biased variance of `x` (..., C) as a (2, C) tensor, f64 sums. A
    /// constant: no gradient flows through it.
    fn channel_moments_nhwc(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let d = t.layout().shape().dims::<4>();
    [d[0], d[1], d[2], d[3]]
}

/// The tensor's values, row-major.
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("f32 tensor").to_vec()),
    }
}

/// OIHW (C, 1, k, k) weights as [i][j][c], so the innermost loops run over channels.
fn taps_last(weight: &FlexTensor) -> (Vec<f32>, usize) {
    let [c, _, k, _] = dims4(weight);
    let w = values(weight);
    let mut out = vec![0f32; k * k * c];
    for ch in 0..c {
        for t in 0..k * k {
            out[t * c + ch] = w[ch * k * k + t];
        }
    }
    (out, c)
}

fn forward(x: &FlexTensor, weight: &FlexTensor, g: Geometry) -> FlexTensor {
    let [n, h, w, c] = dims4(x);
    let xs = values(x);
    let (taps, wc) = taps_last(weight);
    assert_eq!(wc, c, "depthwise weight for {wc} channels on a {c}-channel map");
    let mut out = vec![0f32; n * g.out_h * g.out_w * c];
    out.par_chunks_mut(g.out_w * c).enumerate().for_each(|(row, o)| {
        let (b, oy) = (row / g.out_h, row % g.out_h);
        g.row_taps(oy, h, w, |tap, iy, ox, ix| {
            let (acc, px, wt) = (&mut o[ox * c..][..c], &xs[((b * h + iy) * w + ix) * c..][..c], &taps[tap * c..][..c]);
            for ((a, &v), &t) in acc.iter_mut().zip(px).zip(wt) {
                *a += v * t;
            }
        });
    });
    FlexTensor::from_data(TensorData::new(out, [n, g.out_h, g.out_w, c]))
}

/// d loss / d x: every output gradient spread back over the pixels its taps read.
fn grad_input(grad: &FlexTensor, weight: &FlexTensor, x_dims: [usize; 4], g: Geometry) -> FlexTensor {
    let [n, h, w, c] = x_dims;
    let gs = values(grad);
    let (taps, _) = taps_last(weight);
    let mut out = vec![0f32; n * h * w * c];
    // One image per task: the scatter of one image never touches another's pixels.
    out.par_chunks_mut(h * w * c).enumerate().for_each(|(b, img)| {
        for oy in 0..g.out_h {
            g.row_taps(oy, h, w, |tap, iy, ox, ix| {
                let go = &gs[((b * g.out_h + oy) * g.out_w + ox) * c..][..c];
                let (dst, wt) = (&mut img[(iy * w + ix) * c..][..c], &taps[tap * c..][..c]);
                for ((d, &v), &t) in dst.iter_mut().zip(go).zip(wt) {
                    *d += v * t;
                }
            });
        }
    });
    FlexTensor::from_data(TensorData::new(out, [n, h, w, c]))
}

/// d loss / d weight: per tap and channel, the sum over images and output pixels of the output
/// gradient times the input pixel the tap read. Partial sums per image, then added.
fn grad_weight(x: &FlexTensor, grad: &FlexTensor, g: Geometry) -> FlexTensor {
    let [n, h, w, c] = dims4(x);
    let (xs, gs) = (values(x), values(grad));
    let k = g.kernel;
    let sums = (0..n)
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0f32; k * k * c];
            for oy in 0..g.out_h {
                g.row_taps(oy, h, w, |tap, iy, ox, ix| {
                    let go = &gs[((b * g.out_h + oy) * g.out_w + ox) * c..][..c];
                    let (a, px) = (&mut acc[tap * c..][..c], &xs[((b * h + iy) * w + ix) * c..][..c]);
                    for ((s, &v), &p) in a.iter_mut().zip(go).zip(px) {
                        *s += v * p;
                    }
                });
            }
            acc
        })
        .reduce(|| vec![0f32; k * k * c], |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        });
    // Back to OIHW (C, 1, k, k).
    let mut out = vec![0f32; c * k * k];
    for ch in 0..c {
        for t in 0..k * k {
            out[ch * k * k + t] = sums[t * c + ch];
        }
    }
    FlexTensor::from_data(TensorData::new(out, [c, 1, k, k]))
}

impl TrainOpsBackend for Flex {
    fn depthwise_nhwc(x: FlexTensor, weight: FlexTensor, kernel: usize, stride: usize, dilation: usize, pad_top: usize, pad_left: usize, out_h: usize, out_w: usize) -> FlexTensor {
        forward(&x, &weight, Geometry { kernel, stride, dilation, pad_top, pad_left, out_h, out_w })
    }

    fn batch_norm_train_nhwc(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, mean: FlexTensor, var: FlexTensor, eps: f64) -> FlexTensor {
        bn_forward(&x, &gamma, &beta, &mean, &var, eps)
    }

    fn channel_moments_nhwc(x: FlexTensor) -> FlexTensor {
        moments(&x)
    }
}

/// Two passes, f64 sums: the mean, then the mean squared deviation from it (as exact as burn's
/// own reductions; E[x^2] - mean^2 loses digits when the mean dwarfs the spread).
fn moments(x: &FlexTensor) -> FlexTensor {
    let xs = values(x);
    let c = x.layout().shape().dims::<4>()[3];
    let rows = xs.len() / c.max(1);
    let [sums] = channel_sums(rows, c, |r, ch| [xs[r * c + ch] as f64]);
    let mean: Vec<f64> = sums.iter().map(|s| s / rows as f64).collect();
    let [squares] = channel_sums(rows, c, |r, ch| [(xs[r * c + ch] as f64 - mean[ch]).powi(2)]);
    let var: Vec<f64> = squares.iter().map(|s| s / rows as f64).collect();
    let out: Vec<f32> = mean.iter().chain(&var).map(|&v| v as f32).collect();
    FlexTensor::from_data(TensorData::new(out, [2, c]))
}

/// Per-channel f64 sums of the `K` values `f(row, channel)` over the rows of a (rows, C) map,
/// blocks of 64 rows in parallel.
fn channel_sums<const K: usize>(rows: usize, c: usize, f: impl Fn(usize, usize) -> [f64; K] + Sync) -> [Vec<f64>; K] {
    let zeros = || std::array::from_fn::<Vec<f64>, K, _>(|_| vec![0f64; c]);
    (0..rows.div_ceil(64))
        .into_par_iter()
        .map(|block| {
            let mut acc = zeros();
            for r in block * 64..(block * 64 + 64).min(rows) {
                for ch in 0..c {
                    for (a, v) in acc.iter_mut().zip(f(r, ch)) {
                        a[ch] += v;
                    }
                }
            }
            acc
        })
        .reduce(zeros, |mut a, b| {
            for (x, y) in a.iter_mut().zip(&b) {
                x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
            }
            a
        })
}

/// The backward step of an operation no gradient flows through.
#[derive(Debug)]
struct Constant;

impl Backward<Flex, 1> for Constant {
    type State = ();

    fn backward(self, _ops: Ops<Self::State, 1>, _grads: &mut Gradients, _checkpointer: &mut Checkpointer) {}
}

#[derive(Debug)]
struct DepthwiseGrad(Geometry);

impl Backward<Flex, 2> for DepthwiseGrad {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, weight) = ops.state;
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, grad_input(&grad, &weight, dims4(&x), self.0));
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, grad_weight(&x, &grad, self.0));
        }
    }
}

impl<C: CheckpointStrategy> TrainOpsBackend for Autodiff<Flex, C> {
    fn depthwise_nhwc(x: FloatTensor<Self>, weight: FloatTensor<Self>, kernel: usize, stride: usize, dilation: usize, pad_top: usize, pad_left: usize, out_h: usize, out_w: usize) -> FloatTensor<Self> {
        let g = Geometry { kernel, stride, dilation, pad_top, pad_left, out_h, out_w };
        match DepthwiseGrad(g).prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = forward(x.primitive(), weight.primitive(), g);
                prep.finish((x.into_primitive(), weight.into_primitive()), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive(), weight.primitive(), g)),
        }
    }

    fn batch_norm_train_nhwc(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, mean: FloatTensor<Self>, var: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let out = bn_forward(x.primitive(), gamma.primitive(), beta.primitive(), mean.primitive(), var.primitive(), eps);
        match BatchNormGrad(eps).prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.into_primitive(), gamma.into_primitive(), mean.into_primitive(), var.into_primitive()), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn channel_moments_nhwc(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = moments(x.primitive());
        Constant.prepare::<C>([x.node()]).compute_bound().stateless(out)
    }
}

/// Per-channel values of a (C) tensor as f64.
fn channel_values(t: &FlexTensor) -> Vec<f64> {
    values(t).iter().map(|&v| v as f64).collect()
}

fn bn_forward(x: &FlexTensor, gamma: &FlexTensor, beta: &FlexTensor, mean: &FlexTensor, var: &FlexTensor, eps: f64) -> FlexTensor {
    let xs = values(x);
    let c = gamma.layout().shape().num_elements();
    let (g, b, m, v) = (channel_values(gamma), channel_values(beta), channel_values(mean), channel_values(var));
    // y = x * scale + shift per channel.
    let scale: Vec<f32> = (0..c).map(|i| (g[i] / (v[i] + eps).sqrt()) as f32).collect();
    let shift: Vec<f32> = (0..c).map(|i| (b[i] - m[i] * g[i] / (v[i] + eps).sqrt()) as f32).collect();
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(c * 64).zip(xs.par_chunks(c * 64)).for_each(|(o, xi)| {
        for (orow, xrow) in o.chunks_mut(c).zip(xi.chunks(c)) {
            for (((y, &v), &s), &t) in orow.iter_mut().zip(xrow).zip(&scale).zip(&shift) {
                *y = v * s + t;
            }
        }
    });
    FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()))
}

#[derive(Debug)]
struct BatchNormGrad(f64);

impl Backward<Flex, 3> for BatchNormGrad {
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor);

    /// With x_hat = (x - mean) * inv_std over the M pixels of a channel:
    /// d gamma = sum(dy * x_hat), d beta = sum(dy),
    /// dx = gamma * inv_std * (dy - d beta / M - x_hat * d gamma / M).
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, gamma, mean, var) = ops.state;
        let (xs, dy) = (values(&x), values(&grad));
        let c = gamma.layout().shape().num_elements();
        let (g, m) = (channel_values(&gamma), channel_values(&mean));
        let inv_std: Vec<f64> = channel_values(&var).iter().map(|v| 1.0 / (v + self.0).sqrt()).collect();
        let rows = xs.len() / c;
        // Per-channel sums of dy and dy * x_hat.
        let [sum_dy, sum_dy_xhat] = channel_sums(rows, c, |r, ch| {
            let d = dy[r * c + ch] as f64;
            [d, d * (xs[r * c + ch] as f64 - m[ch]) * inv_std[ch]]
        });
        let channel = |v: Vec<f64>| FlexTensor::from_data(TensorData::new(v.into_iter().map(|x| x as f32).collect::<Vec<f32>>(), [c]));
        if let Some(node) = node_x {
            let count = rows as f64;
            let k1: Vec<f32> = (0..c).map(|i| (g[i] * inv_std[i]) as f32).collect();
            let mean_dy: Vec<f32> = (0..c).map(|i| (sum_dy[i] / count) as f32).collect();
            let k2: Vec<f32> = (0..c).map(|i| (sum_dy_xhat[i] / count * inv_std[i]) as f32).collect();
            let mf: Vec<f32> = m.iter().map(|&v| v as f32).collect();
            let mut dx = vec![0f32; xs.len()];
            dx.par_chunks_mut(c * 64).zip(xs.par_chunks(c * 64)).zip(dy.par_chunks(c * 64)).for_each(|((o, xb), db)| {
                for ((orow, xr), dr) in o.chunks_mut(c).zip(xb.chunks(c)).zip(db.chunks(c)) {
                    for ch in 0..c {
                        // x_hat * inv_std * mean(dy x_hat) folded into k2 * (x - mean).
                        orow[ch] = k1[ch] * (dr[ch] - mean_dy[ch] - k2[ch] * (xr[ch] - mf[ch]));
                    }
                }
            });
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, x.layout().shape().clone())));
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, channel(sum_dy_xhat));
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, channel(sum_dy));
        }
    }
}

/// A depthwise conv of an NHWC map `x` with OIHW weights (C, 1, k, k), differentiable on the
/// CPU backend (with or without autodiff).
pub fn depthwise_nhwc(x: Tensor<4>, weight: Tensor<4>, g: Geometry) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as TrainOpsBackend>::depthwise_nhwc(x.into_dispatch(), weight.into_dispatch(), g.kernel, g.stride, g.dilation, g.pad_top, g.pad_left, g.out_h, g.out_w))
}

/// Training-mode BatchNorm of an NHWC map on the CPU backend: normalised with the batch's
/// statistics `mean` and biased `var` (per channel, computed by the caller, who also updates the
/// running estimates with them), scaled by `gamma` and shifted by `beta`; differentiable in `x`,
/// `gamma` and `beta`.
pub fn batch_norm_train_nhwc(x: Tensor<4>, gamma: Tensor<1>, beta: Tensor<1>, mean: Tensor<1>, var: Tensor<1>, eps: f64) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as TrainOpsBackend>::batch_norm_train_nhwc(x.into_dispatch(), gamma.into_dispatch(), beta.into_dispatch(), mean.into_dispatch(), var.into_dispatch(), eps))
}

/// Per-channel (mean, biased variance) of an NHWC map, each (C), on the CPU backend; constants
/// for autodiff.
pub fn channel_moments_nhwc(x: Tensor<4>) -> (Tensor<1>, Tensor<1>) {
    let m = Tensor::<2>::from_dispatch(<Dispatch as TrainOpsBackend>::channel_moments_nhwc(x.into_dispatch()));
    let [_, c] = m.dims();
    (m.clone().slice([0..1, 0..c]).reshape([c]), m.slice([1..2, 0..c]).reshape([c]))
}
