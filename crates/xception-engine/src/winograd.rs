//! 3x3 convolutions of stride 1 by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each 2x2 block of output pixels
//! comes from its 4x4 input patch with 16 multiplies per channel pair instead of 36. The
//! products become 16 GEMMs (tiles x cin by cin x cout, one per position of the transformed
//! 4x4 patch), between an input transform and an output transform that only add and subtract.
//!
//! It serves the stem's second conv (32 -> 64 channels at 147x147 or 150x150), the one dense
//! 3x3 conv in the Xception family with channels enough to make the GEMMs pay. The transforms'
//! entries are 0, +-1 and +-1/2, so the outputs differ from the direct conv's by float rounding
//! only: within 1e-5 of the largest output in the tests here, and the whole networks' distance
//! to timm and Keras is unchanged (xception at 299: features 5.6e-6 of their scale, 7.5e-6 with
//! the direct conv; logits 1.4e-6 and 1.5e-6). XCEPTION_ENGINE_NO_WINOGRAD keeps the direct
//! conv.
//!
//! Work is shared out by rows of tiles (two output lines each): a task transforms its tiles'
//! input into a cache-resident buffer, runs the 16 products into a second one and transforms
//! them into its two output lines, so neither buffer goes to memory.
//!
//! Measured (2026-12-07, two threads, per-step medians, three alternations against the direct
//! conv): xception's stem conv2 2.70-2.87 -> 2.19-2.30 ms, xception65's (padded) 3.17-3.27 ->
//! 2.18-2.32 (ONNX Runtime's NCHWc conv: 2.47 and 2.69). One thread on hot data, 147x147: 4.2
//! ms, of which the 16 products (depth 32) 2.8, the input transform 0.6, the output 0.8; the
//! direct conv 4.7.

use crate::packed::{gemm_rows, Epilogue, Fetch, Kernel, PackedB, SharedOut};
use crate::Activations;
use rayon::prelude::*;
use std::cell::RefCell;

/// A 3x3 conv's weights transformed for F(2x2, 3x3).
#[derive(Clone, Debug)]
pub(crate) struct Winograd {
    /// U[p] (cin x cout) for each of the 16 positions p = 4 * i + j of the transformed patch.
    u: Vec<PackedB>,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
}

/// The fewest input channels for which the 16 products (of depth cin) beat the direct conv's
/// (of depth 3 x cin): not the 3-channel first stem conv.
pub(crate) const MIN_CHANNELS: usize = 16;

/// Whether a conv of `cin` -> `cout` channels runs by Winograd's algorithm here: channel counts
/// that fill the transforms' vectors, a CPU with AVX2 or AVX-512 (the transforms' SIMD), and
/// XCEPTION_ENGINE_NO_WINOGRAD not set.
pub(crate) fn available(cin: usize, cout: usize) -> bool {
    cin >= MIN_CHANNELS && cin.is_multiple_of(LANES) && cout.is_multiple_of(LANES) && cfg!(target_arch = "x86_64") && crate::packed::kernel() != Kernel::Portable && std::env::var_os("XCEPTION_ENGINE_NO_WINOGRAD").is_none()
}

impl Winograd {
    /// From a 3x3 conv's weights, rows in (ky, kx, ci) order by cout columns (`DenseConv`'s
    /// layout, BatchNorm folded), and its bias.
    pub(crate) fn new(weight: &[f32], bias: &[f32], cin: usize, cout: usize) -> Winograd {
        assert_eq!(weight.len(), 9 * cin * cout, "winograd: 3x3 weights of {cin} -> {cout} channels");
        assert!(cin.is_multiple_of(LANES) && cout.is_multiple_of(LANES), "winograd: {cin} -> {cout} channels, not multiples of {LANES}");
        // U = G g G^T, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
        let g_rows = |g: [f32; 3]| [g[0], 0.5 * (g[0] + g[1] + g[2]), 0.5 * (g[0] - g[1] + g[2]), g[2]];
        let mut u = vec![vec![0f32; cin * cout]; 16];
        for ci in 0..cin {
            for co in 0..cout {
                let g = |ky: usize, kx: usize| weight[((ky * 3 + kx) * cin + ci) * cout + co];
                // G g: 4 x 3, column by column.
                let cols: [[f32; 4]; 3] = std::array::from_fn(|kx| g_rows([g(0, kx), g(1, kx), g(2, kx)]));
                for i in 0..4 {
                    let row = g_rows([cols[0][i], cols[1][i], cols[2][i]]);
                    for (j, v) in row.into_iter().enumerate() {
                        u[4 * i + j][ci * cout + co] = v;
                    }
                }
            }
        }
        let zero = vec![0f32; cout];
        Winograd { u: u.iter().map(|w| PackedB::new(w, &zero, cin, cout)).collect(), bias: bias.to_vec(), cin, cout }
    }

    /// The conv of `x` (NHWC, `cin` channels) into `out` (x.n x oh x ow x cout), the input
    /// padded by `pt` lines above and `pl` pixels left (zeros wherever a window leaves the
    /// input), + bias, then ReLU if `relu`.
    pub(crate) fn conv(&self, x: &Activations, (pt, oh): (usize, usize), (pl, ow): (usize, usize), relu: bool, out: &mut [f32]) {
        self.conv_on(crate::packed::kernel(), x, (pt, oh), (pl, ow), relu, out)
    }

    /// `conv` with the transforms of `kernel` (AVX-512 or AVX2; the CPU must have it).
    fn conv_on(&self, kernel: Kernel, x: &Activations, (pt, oh): (usize, usize), (pl, ow): (usize, usize), relu: bool, out: &mut [f32]) {
        let (cin, cout) = (self.cin, self.cout);
        assert!(x.c == cin && out.len() == x.n * oh * ow * cout, "winograd: {}x{}x{}x{} into {} values", x.n, x.h, x.w, x.c, out.len());
        let tiles = ow.div_ceil(2);
        let rows = oh.div_ceil(2);
        let shared = SharedOut::new(out);
        (0..x.n * rows).into_par_iter().for_each(|task| {
            let (b, ty) = (task / rows, task % rows);
            BUFFERS.with_borrow_mut(|(v, m)| {
                v.resize(v.len().max(16 * tiles * cin), 0.0);
                m.resize(m.len().max(16 * tiles * cout), 0.0);
                let (v, m) = (&mut v[..16 * tiles * cin], &mut m[..16 * tiles * cout]);
                transforms::input(kernel, x, b, 2 * ty as isize - pt as isize, pl, tiles, v);
                // The next row of tiles (most likely this worker's next task): its two new input
                // lines and its two output lines are fetched while the products run, a
                // sixteenth with each.
                let next = task + 1 < x.n * rows;
                let (ahead, writes) = if next {
                    let (b1, ty1) = ((task + 1) / rows, (task + 1) % rows);
                    let iy = (2 * ty1 + 2).saturating_sub(pt).min(x.h);
                    let from = (b1 * x.h + iy) * x.w * cin;
                    let lines = 2 * ty1..(2 * ty1 + 2).min(oh);
                    (Fetch::of(&x.data[from..(from + 2 * x.w * cin).min((b1 + 1) * x.h * x.w * cin)]), Fetch::output(shared, (b1 * oh + lines.start) * ow * cout, lines.len() * ow * cout))
                } else {
                    (Fetch::NONE, Fetch::NONE)
                };
                for (p, u) in self.u.iter().enumerate() {
                    let epi = Epilogue { ahead: ahead.share(p, 16), writes: writes.share(p, 16), ..Epilogue::PLAIN };
                    // SAFETY: `m` is this thread's own buffer.
                    unsafe { gemm_rows(tiles, &v[p * tiles * cin..], cin, u, 0..u.panels(), SharedOut::new(&mut m[p * tiles * cout..][..tiles * cout]), cout, epi) };
                }
                let lines = (2 * ty..(2 * ty + 2).min(oh)).map(|oy| {
                    // SAFETY: this task alone writes output lines 2ty and 2ty + 1 of image b.
                    unsafe { std::slice::from_raw_parts_mut(shared.offset((b * oh + oy) * ow * cout).ptr(), ow * cout) }
                });
                let mut lines: Vec<&mut [f32]> = lines.collect();
                transforms::output(kernel, m, &self.bias, relu, tiles, ow, cout, &mut lines);
            });
        });
    }
}

thread_local! {
    /// A task's transformed input (16 x tiles x cin) and products (16 x tiles x cout).
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Channel counts must be multiples of this (one AVX-512 vector, two AVX2 ones); convs whose
/// are not keep the direct conv.
pub(crate) const LANES: usize = 16;

/// The transforms in SIMD registers, V::LANES channels at a time: each tile's 16 values of a
/// channel block loaded once, transformed in registers and stored once.
#[cfg(target_arch = "x86_64")]
mod transforms {
    use crate::kernels::dw3::Vector;
    use crate::packed::Kernel;
    use crate::Activations;
    use std::arch::x86_64::*;

    /// V = B^T d B for the row of tiles whose 4x4 patches start at input line `iy0` (negative:
    /// padding) and pixel 2 * t - pl, into v[p][t][ci]; B^T = [[1, 0, -1, 0], [0, 1, 1, 0],
    /// [0, -1, 1, 0], [0, 1, 0, -1]].
    #[inline(always)]
    unsafe fn input_in<V: Vector>(x: &Activations, b: usize, iy0: isize, pl: usize, tiles: usize, v: &mut [f32]) {
        let c = x.c;
        assert!(v.len() >= 16 * tiles * c && c.is_multiple_of(V::LANES));
        let v = v.as_mut_ptr();
        let lines: [Option<*const f32>; 4] = std::array::from_fn(|i| x.line(b, iy0 + i as isize).map(<[f32]>::as_ptr));
        for tile in 0..tiles {
            let ix0 = 2 * tile as isize - pl as isize;
            let mut cb = 0;
            while cb < c {
                let mut d = [[V::zero(); 4]; 4];
                for (i, l) in lines.iter().enumerate() {
                    if let Some(l) = l {
                        for (j, dij) in d[i].iter_mut().enumerate() {
                            let ix = ix0 + j as isize;
                            if ix >= 0 && (ix as usize) < x.w {
                                *dij = V::load_full(l.add(ix as usize * c + cb));
                            }
                        }
                    }
                }
                // Rows: t = B^T d.
                let t: [[V; 4]; 4] = [
                    std::array::from_fn(|j| V::sub(d[0][j], d[2][j])),
                    std::array::from_fn(|j| V::add(d[1][j], d[2][j])),
                    std::array::from_fn(|j| V::sub(d[2][j], d[1][j])),
                    std::array::from_fn(|j| V::sub(d[1][j], d[3][j])),
                ];
                // Columns: V = t B.
                for (i, r) in t.iter().enumerate() {
                    let out = [V::sub(r[0], r[2]), V::add(r[1], r[2]), V::sub(r[2], r[1]), V::sub(r[1], r[3])];
                    for (j, val) in out.into_iter().enumerate() {
                        V::store_full(v.add(((4 * i + j) * tiles + tile) * c + cb), val);
                    }
                }
                cb += V::LANES;
            }
        }
    }

    /// Y = A^T M A + bias (then ReLU) for each tile, from m[p][t][co], into the output lines
    /// (one or two, `ow` pixels of `cout` values each); A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn output_in<V: Vector>(m: &[f32], bias: &[f32], relu: bool, tiles: usize, ow: usize, cout: usize, lines: &mut [&mut [f32]]) {
        let n = cout;
        assert!(m.len() >= 16 * tiles * n && bias.len() >= n && n.is_multiple_of(V::LANES) && ow <= 2 * tiles && lines.iter().all(|l| l.len() >= ow * n));
        for tile in 0..tiles {
            let cols = (ow - 2 * tile).min(2);
            let mut cb = 0;
            while cb < n {
                let e = |i: usize, j: usize| V::load_full(m.as_ptr().add(((4 * i + j) * tiles + tile) * n + cb));
                // Rows: s = A^T M.
                let s: [[V; 4]; 2] = [std::array::from_fn(|j| V::add(V::add(e(0, j), e(1, j)), e(2, j))), std::array::from_fn(|j| V::sub(V::sub(e(1, j), e(2, j)), e(3, j)))];
                let z = V::load_full(bias.as_ptr().add(cb));
                for (r, line) in lines.iter_mut().enumerate() {
                    let y = [V::add(V::add(s[r][0], s[r][1]), s[r][2]), V::sub(V::sub(s[r][1], s[r][2]), s[r][3])];
                    for (dx, val) in y.into_iter().enumerate().take(cols) {
                        let val = V::add(val, z);
                        V::store_full(line.as_mut_ptr().add((2 * tile + dx) * n + cb), if relu { V::max(val, V::zero()) } else { val });
                    }
                }
                cb += V::LANES;
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn input_avx512(x: &Activations, b: usize, iy0: isize, pl: usize, tiles: usize, v: &mut [f32]) {
        input_in::<__m512>(x, b, iy0, pl, tiles, v)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn input_avx2(x: &Activations, b: usize, iy0: isize, pl: usize, tiles: usize, v: &mut [f32]) {
        input_in::<__m256>(x, b, iy0, pl, tiles, v)
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn output_avx512(m: &[f32], bias: &[f32], relu: bool, tiles: usize, ow: usize, cout: usize, lines: &mut [&mut [f32]]) {
        output_in::<__m512>(m, bias, relu, tiles, ow, cout, lines)
    }

    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn output_avx2(m: &[f32], bias: &[f32], relu: bool, tiles: usize, ow: usize, cout: usize, lines: &mut [&mut [f32]]) {
        output_in::<__m256>(m, bias, relu, tiles, ow, cout, lines)
    }

    /// The input transform with `kernel`'s vectors.
    pub(super) fn input(kernel: Kernel, x: &Activations, b: usize, iy0: isize, pl: usize, tiles: usize, v: &mut [f32]) {
        match kernel {
            // SAFETY: `kernel` names vectors this CPU has (`packed::kernel`, or checked by the tests).
            Kernel::Avx512 => unsafe { input_avx512(x, b, iy0, pl, tiles, v) },
            Kernel::Avx2 => unsafe { input_avx2(x, b, iy0, pl, tiles, v) },
            Kernel::Portable => unreachable!("winograd: no SIMD transforms (`available` is false)"),
        }
    }

    /// The output transform with `kernel`'s vectors.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn output(kernel: Kernel, m: &[f32], bias: &[f32], relu: bool, tiles: usize, ow: usize, cout: usize, lines: &mut [&mut [f32]]) {
        match kernel {
            // SAFETY: as for `input`.
            Kernel::Avx512 => unsafe { output_avx512(m, bias, relu, tiles, ow, cout, lines) },
            Kernel::Avx2 => unsafe { output_avx2(m, bias, relu, tiles, ow, cout, lines) },
            Kernel::Portable => unreachable!("winograd: no SIMD transforms (`available` is false)"),
        }
    }
}

/// Elsewhere `available` is false and nothing calls these.
#[cfg(not(target_arch = "x86_64"))]
mod transforms {
    use crate::packed::Kernel;
    use crate::Activations;

    pub(super) fn input(_: Kernel, _: &Activations, _: usize, _: isize, _: usize, _: usize, _: &mut [f32]) {
        unreachable!("winograd: x86-64 only")
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn output(_: Kernel, _: &[f32], _: &[f32], _: bool, _: usize, _: usize, _: usize, _: &mut [&mut [f32]]) {
        unreachable!("winograd: x86-64 only")
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The conv written out directly (fp64 sums), for comparison.
    #[allow(clippy::too_many_arguments)]
    fn direct(x: &Activations, w: &[f32], bias: &[f32], cout: usize, (pt, oh): (usize, usize), (pl, ow): (usize, usize), relu: bool) -> Vec<f32> {
        let c = x.c;
        let mut out = vec![0f32; x.n * oh * ow * cout];
        for b in 0..x.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for co in 0..cout {
                        let mut s = bias[co] as f64;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = ((oy + ky) as isize - pt as isize, (ox + kx) as isize - pl as isize);
                                if iy < 0 || ix < 0 || iy as usize >= x.h || ix as usize >= x.w {
                                    continue;
                                }
                                for ci in 0..c {
                                    s += x.data[((b * x.h + iy as usize) * x.w + ix as usize) * c + ci] as f64 * w[((ky * 3 + kx) * c + ci) * cout + co] as f64;
                                }
                            }
                        }
                        let s = s as f32;
                        out[((b * oh + oy) * ow + ox) * cout + co] = if relu { s.max(0.0) } else { s };
                    }
                }
            }
        }
        out
    }

    /// The transforms this CPU can run.
    fn kernels() -> Vec<Kernel> {
        let mut k = Vec::new();
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            k.push(Kernel::Avx2);
        }
        if is_x86_feature_detected!("avx512f") {
            k.push(Kernel::Avx512);
        }
        k
    }

    /// Odd and even sizes, with and without padding, outputs of 48 and 80 channels (ragged
    /// last weight panels), ReLU on and off, two images; the AVX2 and AVX-512 transforms where
    /// the CPU has them: within 1e-5 of the largest output.
    #[test]
    fn matches_the_direct_conv() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(n, h, w, cin, cout, pad, relu) in &[(1usize, 9usize, 9usize, 32usize, 64usize, 0usize, true), (2, 8, 11, 16, 48, 1, false), (1, 7, 6, 16, 80, 1, true), (1, 3, 3, 32, 16, 0, false)] {
            let x = Activations { n, h, w, c: cin, data: (0..n * h * w * cin).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect() };
            let wt: Vec<f32> = (0..9 * cin * cout).map(|i| ((i * 104729 % 997) as f32 / 498.0) - 1.0).collect();
            let bias: Vec<f32> = (0..cout).map(|i| i as f32 * 0.01 - 0.2).collect();
            let (oh, ow) = (h + 2 * pad - 2, w + 2 * pad - 2);
            let want = direct(&x, &wt, &bias, cout, (pad, oh), (pad, ow), relu);
            let wg = Winograd::new(&wt, &bias, cin, cout);
            for kernel in kernels() {
                let mut got = vec![f32::NAN; want.len()];
                pool.install(|| wg.conv_on(kernel, &x, (pad, oh), (pad, ow), relu, &mut got));
                assert!(got.iter().all(|v| v.is_finite()), "every output written ({kernel:?})");
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= 1e-5 * scale, "{n}x{h}x{w}x{cin} -> {cout}, pad {pad}, {kernel:?}: off by {worst} (largest {scale})");
            }
        }
    }
}
