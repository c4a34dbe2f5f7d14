//! Our CPU training kernels (crates/xception/src/train_ops.rs) against the same operations
//! written with burn's own differentiable tensor ops, forward and gradients, on the geometries the
//! family uses: stride 1 and 2, TF-same (odd pixel after) and symmetric padding, dilation 2 and 4
//! (output strides 16 and 8) and the ASPP rates. The timm gradient test (grad_conformance.rs)
//! covers them inside whole networks at dilation 1.

use burn::tensor::ops::PadMode;
use burn::tensor::{Slice, Tensor, TensorData};
use xception::data::Rng;
use xception::train_ops::{batch_norm_train_nhwc, channel_moments_nhwc, depthwise_nhwc, Geometry};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The depthwise conv as shifted slices of the zero-padded input times per-channel taps.
fn reference(x: Tensor<4>, w: Tensor<4>, g: Geometry, pad_bottom: usize, pad_right: usize) -> Tensor<4> {
    let [_, _, _, c] = x.dims();
    let x = x.pad([(0, 0), (g.pad_top, pad_bottom), (g.pad_left, pad_right), (0, 0)], PadMode::Constant(0.0));
    let k = g.kernel;
    let taps = w.reshape([c, k * k]);
    let span = |start: usize, out: usize| Slice::new(start as isize, Some((start + (out - 1) * g.stride + 1) as isize), g.stride as isize);
    let mut acc: Option<Tensor<4>> = None;
    for i in 0..k {
        for j in 0..k {
            let tap = x.clone().slice([Slice::full(), span(i * g.dilation, g.out_h), span(j * g.dilation, g.out_w), Slice::full()]);
            let term = tap * taps.clone().slice([0..c, i * k + j..i * k + j + 1]).reshape([1, 1, 1, c]);
            acc = Some(match acc {
                Some(a) => a + term,
                None => term,
            });
        }
    }
    acc.unwrap()
}

#[test]
fn depthwise_matches_burn_ops_forward_and_backward() {
    let device = xception::device::default_device().autodiff();
    // (input h, w, stride, dilation, pad top/left, pad bottom/right)
    let cases = [
        (9, 9, 1, 1, (1, 1), (1, 1)),   // aligned nets, symmetric
        (10, 10, 2, 1, (0, 0), (1, 1)), // TF 'same', stride 2, even input: the odd pixel after
        (11, 7, 2, 1, (1, 1), (1, 1)),  // timm's stride-2 padding, odd and non-square input
        (12, 12, 1, 2, (2, 2), (2, 2)), // output stride 16's dilation
        (12, 12, 1, 4, (4, 4), (4, 4)), // output stride 8's
        (14, 14, 1, 6, (6, 6), (6, 6)), // an ASPP rate wider than half the map
    ];
    let (n, c) = (3, 5);
    for (idx, &(h, w, stride, dilation, (pt, pl), (pb, pr))) in cases.iter().enumerate() {
        let out_h = (h + pt + pb - 2 * dilation - 1) / stride + 1;
        let out_w = (w + pl + pr - 2 * dilation - 1) / stride + 1;
        let g = Geometry { kernel: 3, stride, dilation, pad_top: pt, pad_left: pl, out_h, out_w };
        let xv = random(n * h * w * c, 10 + idx as u64);
        let wv = random(c * 9, 20 + idx as u64);
        let upstream = random(n * out_h * out_w * c, 30 + idx as u64);
        let run = |ours: bool| {
            let x = Tensor::<4>::from_data(TensorData::new(xv.clone(), [n, h, w, c]), &device).require_grad();
            let wt = Tensor::<4>::from_data(TensorData::new(wv.clone(), [c, 1, 3, 3]), &device).require_grad();
            let y = if ours { depthwise_nhwc(x.clone(), wt.clone(), g) } else { reference(x.clone(), wt.clone(), g, pb, pr) };
            assert_eq!(y.dims(), [n, out_h, out_w, c], "case {idx}");
            let up = Tensor::<4>::from_data(TensorData::new(upstream.clone(), [n, out_h, out_w, c]), &device);
            let grads = (y.clone() * up).sum().backward();
            (host(y), host(x.grad(&grads).unwrap()), host(wt.grad(&grads).unwrap()))
        };
        let (ours, theirs) = (run(true), run(false));
        for (what, a, b) in [("output", &ours.0, &theirs.0), ("input gradient", &ours.1, &theirs.1), ("weight gradient", &ours.2, &theirs.2)] {
            let err = max_rel(a, b);
            assert!(err < 1e-5, "case {idx} {cases:?}: {what} differs by {err:e}", cases = cases[idx]);
        }
    }
}

#[test]
fn batch_norm_matches_burn_ops_forward_and_backward() {
    let device = xception::device::default_device().autodiff();
    let (n, h, w, c) = (4, 5, 3, 6);
    // A large mean against a small spread: the statistics must not lose their digits.
    let xv: Vec<f32> = random(n * h * w * c, 1).iter().enumerate().map(|(i, v)| 50.0 + (i % c) as f32 + 0.1 * v).collect();
    let (gv, bv, up) = (random(c, 2), random(c, 3), random(n * h * w * c, 4));
    let eps = 1e-3;
    let run = |ours: bool| {
        let x = Tensor::<4>::from_data(TensorData::new(xv.clone(), [n, h, w, c]), &device).require_grad();
        let gamma = Tensor::<1>::from_data(TensorData::new(gv.clone(), [c]), &device).require_grad();
        let beta = Tensor::<1>::from_data(TensorData::new(bv.clone(), [c]), &device).require_grad();
        let (y, mean, var) = if ours {
            let (mean, var) = channel_moments_nhwc(x.clone().detach());
            (batch_norm_train_nhwc(x.clone(), gamma.clone(), beta.clone(), mean.clone(), var.clone(), eps), mean, var)
        } else {
            let mean = x.clone().mean_dims(&[0, 1, 2]);
            let centered = x.clone() - mean.clone();
            let var = centered.clone().powi_scalar(2).mean_dims(&[0, 1, 2]);
            let y = centered / (var.clone() + eps).sqrt() * gamma.clone().reshape([1, 1, 1, c]) + beta.clone().reshape([1, 1, 1, c]);
            (y, mean.detach().reshape([c]), var.detach().reshape([c]))
        };
        let upstream = Tensor::<4>::from_data(TensorData::new(up.clone(), [n, h, w, c]), &device);
        let grads = (y.clone() * upstream).sum().backward();
        [host(y), host(mean), host(var), host(x.grad(&grads).unwrap()), host(gamma.grad(&grads).unwrap()), host(beta.grad(&grads).unwrap())]
    };
    let (ours, theirs) = (run(true), run(false));
    for (what, (a, b)) in ["output", "mean", "variance", "input gradient", "gamma gradient", "beta gradient"].iter().zip(ours.iter().zip(&theirs)) {
        let err = max_rel(a, b);
        assert!(err < 1e-4, "{what} differs by {err:e}");
    }
}
