//! The hot loops: depthwise conv (NHWC, channels innermost so each tap is a contiguous vector
//! multiply-add), im2col for the few dense convs, max pool, and the `gemm` crate for every matrix
//! product.

use crate::{Activations, DenseConv, SepConv};
use rayon::prelude::*;
use xception_arch::Padding;

/// dst (m x n) = [dst +] lhs (m x k) * rhs (k x n), all row-major.
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32], dst: &mut [f32], accumulate: bool, threads: usize) {
    assert!(lhs.len() >= m * k && rhs.len() >= k * n && dst.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above bound every access the strides describe.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

fn out_size(p: Padding, n: usize, k: usize, s: usize, d: usize) -> (usize, usize) {
    let (before, _, out) = p.resolve(n, k, s, d);
    (before, out)
}

/// Rows filled with the bias, ready for an accumulating GEMM.
fn bias_rows(rows: usize, bias: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * bias.len());
    for _ in 0..rows {
        out.extend_from_slice(bias);
    }
    out
}

fn relu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
}

pub fn dense_conv(x: &Activations, d: &DenseConv, threads: usize) -> Activations {
    let (pt, oh) = out_size(d.padding, x.h, d.k, d.stride, d.dilation);
    let (pl, ow) = out_size(d.padding, x.w, d.k, d.stride, d.dilation);
    let rows = x.n * oh * ow;
    let kk = d.k * d.k * d.cin;
    let mut out = bias_rows(rows, &d.bias);
    if d.k == 1 && d.stride == 1 && pt == 0 && pl == 0 {
        gemm(rows, d.cout, kk, &x.data, &d.weight, &mut out, true, threads);
    } else {
        // im2col in tiles of output rows, each tile's GEMM right after its gather, so the
        // gathered patches stay in cache (the stem's full im2col would be 25 MB).
        let tile = (8 * 1024 * 1024 / 4 / (ow * kk).max(1)).clamp(1, 16);
        let image_rows: Vec<(usize, usize)> = (0..x.n).flat_map(|b| (0..oh).step_by(tile).map(move |oy| (b, oy))).collect();
        let out_addr = out.as_mut_ptr() as usize;
        image_rows.par_iter().for_each(|&(b, oy0)| {
            let oy1 = (oy0 + tile).min(oh);
            let mut cols = vec![0f32; (oy1 - oy0) * ow * kk];
            for oy in oy0..oy1 {
                for ox in 0..ow {
                    let dst = &mut cols[((oy - oy0) * ow + ox) * kk..][..kk];
                    for ky in 0..d.k {
                        let iy = (oy * d.stride + ky * d.dilation) as isize - pt as isize;
                        for kx in 0..d.k {
                            let ix = (ox * d.stride + kx * d.dilation) as isize - pl as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < x.h && (ix as usize) < x.w {
                                let src = ((b * x.h + iy as usize) * x.w + ix as usize) * x.c;
                                dst[(ky * d.k + kx) * d.cin..][..d.cin].copy_from_slice(&x.data[src..src + d.cin]);
                            }
                        }
                    }
                }
            }
            let first = (b * oh + oy0) * ow;
            let m = (oy1 - oy0) * ow;
            // SAFETY: tiles cover disjoint output rows [first, first + m) of `out`.
            let dst = unsafe { std::slice::from_raw_parts_mut((out_addr as *mut f32).add(first * d.cout), m * d.cout) };
            gemm(m, d.cout, kk, &cols, &d.weight, dst, true, 1);
        });
    }
    if d.relu {
        relu_in_place(&mut out);
    }
    Activations { n: x.n, h: oh, w: ow, c: d.cout, data: out }
}

/// How the depthwise kernel transforms each input value as it loads it (a preceding ReLU, or
/// BatchNorm + ReLU); monomorphised so the innermost loop has no branch on it.
trait Load: Copy + Sync {
    fn apply(&self, v: f32, channel: usize) -> f32;
}

#[derive(Clone, Copy)]
struct Plain;
impl Load for Plain {
    #[inline(always)]
    fn apply(&self, v: f32, _: usize) -> f32 {
        v
    }
}

#[derive(Clone, Copy)]
struct Relu;
impl Load for Relu {
    #[inline(always)]
    fn apply(&self, v: f32, _: usize) -> f32 {
        v.max(0.0)
    }
}

#[derive(Clone, Copy)]
struct AffineRelu<'a> {
    scale: &'a [f32],
    shift: &'a [f32],
    relu: bool,
}
impl Load for AffineRelu<'_> {
    #[inline(always)]
    fn apply(&self, v: f32, ch: usize) -> f32 {
        let y = v * self.scale[ch] + self.shift[ch];
        if self.relu {
            y.max(0.0)
        } else {
            y
        }
    }
}

/// One output row of a depthwise conv: per output pixel, per tap, one multiply-add over the
/// contiguous channel vector. `FMA` selects fused multiply-add (used in the AVX2+FMA clone,
/// where it is one instruction).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_row<const FMA: bool, L: Load>(x: &Activations, s: &SepConv, load: L, b: usize, oy: usize, ow: usize, pt: usize, pl: usize, out: &mut [f32]) {
    let c = s.channels;
    for ox in 0..ow {
        let acc = &mut out[ox * c..][..c];
        match &s.dw_bias {
            Some(bias) => acc.copy_from_slice(&bias[..c]),
            None => acc.fill(0.0),
        }
        for ky in 0..s.k {
            let iy = (oy * s.stride + ky * s.dilation) as isize - pt as isize;
            if iy < 0 || iy as usize >= x.h {
                continue;
            }
            for kx in 0..s.k {
                let ix = (ox * s.stride + kx * s.dilation) as isize - pl as isize;
                if ix < 0 || ix as usize >= x.w {
                    continue;
                }
                let src = &x.data[((b * x.h + iy as usize) * x.w + ix as usize) * c..][..c];
                let w = &s.dw[(ky * s.k + kx) * c..][..c];
                for i in 0..c {
                    let v = load.apply(src[i], i);
                    acc[i] = if FMA { v.mul_add(w[i], acc[i]) } else { acc[i] + v * w[i] };
                }
            }
        }
        if s.mid_relu {
            acc.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_row_avx2<L: Load>(x: &Activations, s: &SepConv, load: L, b: usize, oy: usize, ow: usize, pt: usize, pl: usize, out: &mut [f32]) {
    dw_row::<true, L>(x, s, load, b, oy, ow, pt, pl, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_row_avx512<L: Load>(x: &Activations, s: &SepConv, load: L, b: usize, oy: usize, ow: usize, pt: usize, pl: usize, out: &mut [f32]) {
    dw_row::<true, L>(x, s, load, b, oy, ow, pt, pl, out)
}

/// Writes the depthwise output into `mid` (resized, reused across layers); returns (h, w).
fn depthwise_with<L: Load>(x: &Activations, s: &SepConv, load: L, mid: &mut Vec<f32>) -> (usize, usize) {
    let (pt, oh) = out_size(s.padding, x.h, s.k, s.stride, s.dilation);
    let (pl, ow) = out_size(s.padding, x.w, s.k, s.stride, s.dilation);
    let c = s.channels;
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(target_arch = "x86_64")]
    let avx512 = avx2 && is_x86_feature_detected!("avx512f");
    mid.resize(x.n * oh * ow * c, 0.0);
    mid.par_chunks_mut(ow * c).enumerate().for_each(|(row, out)| {
        let (b, oy) = (row / oh, row % oh);
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked above).
            unsafe { dw_row_avx512(x, s, load, b, oy, ow, pt, pl, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { dw_row_avx2(x, s, load, b, oy, ow, pt, pl, out) };
            return;
        }
        dw_row::<false, L>(x, s, load, b, oy, ow, pt, pl, out);
    });
    (oh, ow)
}

/// A separable conv. With `residual` (the block's shortcut, same shape as the output), the
/// pointwise GEMM accumulates onto it: the residual add costs no extra pass.
pub fn sep_conv(x: &Activations, s: &SepConv, threads: usize, scratch: &mut Vec<f32>, residual: Option<Vec<f32>>) -> Activations {
    let (oh, ow) = depthwise_into(x, s, scratch);
    let rows = x.n * oh * ow;
    let mut out = match residual {
        Some(mut r) => {
            assert_eq!(r.len(), rows * s.cout, "residual shape");
            r.par_chunks_mut(s.cout * 64).for_each(|chunk| {
                for px in chunk.chunks_mut(s.cout) {
                    px.iter_mut().zip(&s.pw_bias).for_each(|(v, b)| *v += b);
                }
            });
            r
        }
        None => bias_rows(rows, &s.pw_bias),
    };
    gemm(rows, s.cout, s.channels, &scratch[..rows * s.channels], &s.pw, &mut out, true, threads);
    if s.out_relu {
        relu_in_place(&mut out);
    }
    Activations { n: x.n, h: oh, w: ow, c: s.cout, data: out }
}

/// The pointwise half: (rows, c) x (c, cout) + bias, ReLU if asked.
pub fn pointwise(mid: &[f32], rows: usize, s: &SepConv, threads: usize) -> Vec<f32> {
    let mut out = bias_rows(rows, &s.pw_bias);
    gemm(rows, s.cout, s.channels, mid, &s.pw, &mut out, true, threads);
    if s.out_relu {
        relu_in_place(&mut out);
    }
    out
}


/// The depthwise half, with the input transform and the folded norm, into `mid`; returns (h, w).
pub fn depthwise_into(x: &Activations, s: &SepConv, mid: &mut Vec<f32>) -> (usize, usize) {
    match (&s.in_affine, s.in_relu) {
        (Some(a), relu) => depthwise_with(x, s, AffineRelu { scale: &a.scale, shift: &a.shift, relu }, mid),
        (None, true) => depthwise_with(x, s, Relu, mid),
        (None, false) => depthwise_with(x, s, Plain, mid),
    }
}

pub fn max_pool(x: &Activations, k: usize, stride: usize, padding: Padding) -> Activations {
    let (pt, oh) = out_size(padding, x.h, k, stride, 1);
    let (pl, ow) = out_size(padding, x.w, k, stride, 1);
    let c = x.c;
    let mut out = vec![f32::NEG_INFINITY; x.n * oh * ow * c];
    out.par_chunks_mut(ow * c).enumerate().for_each(|(row, dst)| {
        let (b, oy) = (row / oh, row % oh);
        for ox in 0..ow {
            let acc = &mut dst[ox * c..][..c];
            for ky in 0..k {
                let iy = (oy * stride + ky) as isize - pt as isize;
                if iy < 0 || iy as usize >= x.h {
                    continue;
                }
                for kx in 0..k {
                    let ix = (ox * stride + kx) as isize - pl as isize;
                    if ix < 0 || ix as usize >= x.w {
                        continue;
                    }
                    let src = &x.data[((b * x.h + iy as usize) * x.w + ix as usize) * c..][..c];
                    acc.iter_mut().zip(src).for_each(|(a, &v)| *a = a.max(v));
                }
            }
        }
    });
    Activations { n: x.n, h: oh, w: ow, c, data: out }
}

/// Bilinear resize with align_corners=True (TF `resize_bilinear(align_corners=True)`, PyTorch
/// `interpolate(mode='bilinear', align_corners=True)`): output pixel o samples input position
/// o * (in - 1) / (out - 1); a 1-pixel input is broadcast.
pub fn resize_bilinear(x: &Activations, oh: usize, ow: usize) -> Activations {
    if (oh, ow) == (x.h, x.w) {
        return x.clone();
    }
    let (ys, xs) = (align_corners_taps(x.h, oh), align_corners_taps(x.w, ow));
    let c = x.c;
    let mut out = vec![0f32; x.n * oh * ow * c];
    out.par_chunks_mut(ow * c).enumerate().for_each(|(row, dst)| {
        let (b, oy) = (row / oh, row % oh);
        let (y0, y1, ly) = ys[oy];
        let line = |y: usize| &x.data[((b * x.h + y) * x.w) * c..][..x.w * c];
        let (top, bottom) = (line(y0), line(y1));
        for (ox, &(x0, x1, lx)) in xs.iter().enumerate() {
            let d = &mut dst[ox * c..][..c];
            let (a, bb, cc, dd) = (&top[x0 * c..][..c], &top[x1 * c..][..c], &bottom[x0 * c..][..c], &bottom[x1 * c..][..c]);
            for ch in 0..c {
                let t = (1.0 - lx) * a[ch] + lx * bb[ch];
                let u = (1.0 - lx) * cc[ch] + lx * dd[ch];
                d[ch] = (1.0 - ly) * t + ly * u;
            }
        }
    });
    Activations { n: x.n, h: oh, w: ow, c, data: out }
}

/// For each of `n_out` output positions of an align-corners resize along one axis of length
/// `n_in`: the two input positions it blends and the weight of the second. Computed in f32 as
/// PyTorch's CPU kernel does.
pub fn align_corners_taps(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32)> {
    let scale = if n_out > 1 { (n_in - 1) as f32 / (n_out - 1) as f32 } else { 0.0 };
    (0..n_out)
        .map(|o| {
            let src = o as f32 * scale;
            let i0 = (src as usize).min(n_in - 1);
            (i0, (i0 + 1).min(n_in - 1), src - i0 as f32)
        })
        .collect()
}

/// Concatenation along channels of activations of equal batch and spatial size.
pub fn concat_channels(parts: &[Activations]) -> Activations {
    let (n, h, w) = (parts[0].n, parts[0].h, parts[0].w);
    debug_assert!(parts.iter().all(|p| (p.n, p.h, p.w) == (n, h, w)));
    let c: usize = parts.iter().map(|p| p.c).sum();
    let mut out = vec![0f32; n * h * w * c];
    out.par_chunks_mut(c).enumerate().for_each(|(px, dst)| {
        let mut at = 0;
        for p in parts {
            dst[at..at + p.c].copy_from_slice(&p.data[px * p.c..][..p.c]);
            at += p.c;
        }
    });
    Activations { n, h, w, c, data: out }
}
