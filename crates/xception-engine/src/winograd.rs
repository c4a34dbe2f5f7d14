//! 3x3 convolutions of stride 1 by Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms
//! for Convolutional Neural Networks", 2016). F(2x2, 3x3): each 2x2 block of output pixels comes
//! from its 4x4 input patch with 16 multiplies per channel pair instead of 36; the products
//! become 16 GEMMs (tiles x cin by cin x cout, one per position of the transformed 4x4 patch),
//! between an input transform and an output transform that only add and subtract.
//! F(4x4, 3x3) (`Winograd::new` with m = 4): 4x4 blocks from 6x6 patches, 36 multiplies per
//! channel pair instead of 144 (1.78 times fewer than F(2x2, 3x3)), in 36 GEMMs, with transforms
//! whose entries reach 5 and 8 and weights transformed by sixths and 24ths: in a simulation of
//! the stem conv (32 -> 64 channels, fp32) 2.6e-6 of the largest output off against 2.2e-7 for
//! F(2x2, 3x3) and 1.6e-7 for the direct conv. So it runs only under the reduced precisions
//! (int8, and bf16 where the stem stays fp32), whose own errors are 1e-2 or more; fp32 and bf16x3
//! keep F(2x2, 3x3).
//!
//! It serves the stem's second conv (32 -> 64 channels at 147x147 or 150x150), the one dense
//! 3x3 conv in the Xception family with channels enough to make the GEMMs pay. F(2x2, 3x3)'s
//! transforms' entries are 0, +-1 and +-1/2, so its outputs differ from the direct conv's by float
//! rounding only: within 1e-5 of the largest output in the tests here, and the whole networks' distance
//! to timm and Keras is unchanged (xception at 299: features 5.6e-6 of their scale, 7.5e-6 with
//! the direct conv; logits 1.4e-6 and 1.5e-6). XCEPTION_ENGINE_NO_WINOGRAD keeps the direct
//! conv.
//!
//! Work is shared out by rows of tiles (m output lines each): a task transforms its tiles'
//! input into a cache-resident buffer, runs the (m + 2)^2 products into a second one and
//! transforms them into its output lines, so neither buffer goes to memory.
//!
//! Measured (2026-12-07, two threads, per-step medians, three alternations against the direct
//! conv): xception's stem conv2 2.70-2.87 -> 2.19-2.30 ms, xception65's (padded) 3.17-3.27 ->
//! 2.18-2.32 (ONNX Runtime's NCHWc conv: 2.47 and 2.69). One thread on hot data, 147x147: 4.2
//! ms, of which the 16 products (depth 32) 2.8, the input transform 0.6, the output 0.8; the
//! direct conv 4.7. F(4x4, 3x3) against F(2x2, 3x3) (AMD Zen 4, the three fastest of six
//! passes' steps, three alternations): 2.17-2.41 -> 1.41-1.67 ms under int8, 2.17-2.46 ->
//! 1.41-1.91 under bf16; whole passes, four alternations of 21, int8 28.6-30.1 -> 27.7-28.5 ms
//! (one 34.7), bf16 46.1-51.3 -> 44.7-45.8. Under fp32 it would put xception71's timm fixture
//! past the fp32 tests' bound (and the real Keras model's logits 1.4e-5 -> 2.2e-5 off).

use crate::packed::{gemm_rows, Epilogue, Fetch, Kernel, PackedB, SharedOut};
use crate::Activations;
use rayon::prelude::*;
use std::cell::RefCell;

/// A 3x3 conv's weights transformed for F(m x m, 3x3).
#[derive(Clone, Debug)]
pub(crate) struct Winograd {
    /// Output pixels a tile a side: 2 or 4.
    m: usize,
    /// U[p] (cin x cout) for each of the (m + 2)^2 positions p = (m + 2) i + j of the
    /// transformed patch.
    u: Vec<PackedB>,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
}

/// F(2x2, 3x3)'s G (4 x 3), by which the weights are transformed (U = G w G^T).
const G2: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
/// F(4x4, 3x3)'s G (6 x 3), interpolation points 0, 1, -1, 2, -2 and infinity (Lavin & Gray).
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

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
    /// layout, BatchNorm folded), and its bias, for F(m x m, 3x3) (m = 2 or 4).
    pub(crate) fn new(weight: &[f32], bias: &[f32], cin: usize, cout: usize, m: usize) -> Winograd {
        assert_eq!(weight.len(), 9 * cin * cout, "winograd: 3x3 weights of {cin} -> {cout} channels");
        assert!(cin.is_multiple_of(LANES) && cout.is_multiple_of(LANES), "winograd: {cin} -> {cout} channels, not multiples of {LANES}");
        let g: &[[f64; 3]] = match m {
            2 => &G2,
            4 => &G4,
            _ => panic!("winograd: F({m}x{m}, 3x3) is not one of F(2x2, 3x3) and F(4x4, 3x3)"),
        };
        let a = m + 2;
        // U = G w G^T, in f64 and rounded once (F(4x4, 3x3)'s G has sixths).
        let mut u = vec![vec![0f32; cin * cout]; a * a];
        for ci in 0..cin {
            for co in 0..cout {
                let w = |ky: usize, kx: usize| weight[((ky * 3 + kx) * cin + ci) * cout + co] as f64;
                // G w: a x 3.
                let gw: Vec<[f64; 3]> = g.iter().map(|gi| std::array::from_fn(|kx| (0..3).map(|ky| gi[ky] * w(ky, kx)).sum())).collect();
                for i in 0..a {
                    for j in 0..a {
                        u[a * i + j][ci * cout + co] = (0..3).map(|kx| gw[i][kx] * g[j][kx]).sum::<f64>() as f32;
                    }
                }
            }
        }
        let zero = vec![0f32; cout];
        Winograd { m, u: u.iter().map(|w| PackedB::new(w, &zero, cin, cout)).collect(), bias: bias.to_vec(), cin, cout }
    }

    /// The conv of `x` (NHWC, `cin` channels) into `out` (x.n x oh x ow x cout), the input
    /// padded by `pt` lines above and `pl` pixels left (zeros wherever a window leaves the
    /// input), + bias, then ReLU if `relu`.
    pub(crate) fn conv(&self, x: &Activations, (pt, oh): (usize, usize), (pl, ow): (usize, usize), relu: bool, out: &mut [f32]) {
        self.conv_on(crate::packed::kernel(), x, (pt, oh), (pl, ow), relu, out)
    }

    /// `conv` with the transforms of `kernel` (AVX-512 or AVX2; the CPU must have it).
    fn conv_on(&self, kernel: Kernel, x: &Activations, (pt, oh): (usize, usize), (pl, ow): (usize, usize), relu: bool, out: &mut [f32]) {
        let (cin, cout, m) = (self.cin, self.cout, self.m);
        assert!(x.c == cin && out.len() == x.n * oh * ow * cout, "winograd: {}x{}x{}x{} into {} values", x.n, x.h, x.w, x.c, out.len());
        // Positions of a transformed patch.
        let at = (m + 2) * (m + 2);
        let tiles = ow.div_ceil(m);
        let rows = oh.div_ceil(m);
        let shared = SharedOut::new(out);
        (0..x.n * rows).into_par_iter().for_each(|task| {
            let (b, ty) = (task / rows, task % rows);
            BUFFERS.with_borrow_mut(|(v, p)| {
                v.resize(v.len().max(at * tiles * cin), 0.0);
                p.resize(p.len().max(at * tiles * cout), 0.0);
                let (v, p) = (&mut v[..at * tiles * cin], &mut p[..at * tiles * cout]);
                transforms::input(kernel, m, x, b, (m * ty) as isize - pt as isize, pl, tiles, v);
                // The next row of tiles (most likely this worker's next task): its m new input
                // lines and its m output lines are fetched while the products run, a share with
                // each.
                let next = task + 1 < x.n * rows;
                let (ahead, writes) = if next {
                    let (b1, ty1) = ((task + 1) / rows, (task + 1) % rows);
                    let iy = (m * ty1 + 2).saturating_sub(pt).min(x.h);
                    let from = (b1 * x.h + iy) * x.w * cin;
                    let lines = m * ty1..(m * ty1 + m).min(oh);
                    (Fetch::of(&x.data[from..(from + m * x.w * cin).min((b1 + 1) * x.h * x.w * cin)]), Fetch::output(shared, (b1 * oh + lines.start) * ow * cout, lines.len() * ow * cout))
                } else {
                    (Fetch::NONE, Fetch::NONE)
                };
                for (i, u) in self.u.iter().enumerate() {
                    let epi = Epilogue { ahead: ahead.share(i, at), writes: writes.share(i, at), ..Epilogue::PLAIN };
                    // SAFETY: `p` is this thread's own buffer.
                    unsafe { gemm_rows(tiles, &v[i * tiles * cin..], cin, u, 0..u.panels(), SharedOut::new(&mut p[i * tiles * cout..][..tiles * cout]), cout, epi) };
                }
                let lines = (m * ty..(m * ty + m).min(oh)).map(|oy| {
                    // SAFETY: this task alone writes output lines m ty to m ty + m - 1 of image b.
                    unsafe { std::slice::from_raw_parts_mut(shared.offset((b * oh + oy) * ow * cout).ptr(), ow * cout) }
                });
                let mut lines: Vec<&mut [f32]> = lines.collect();
                transforms::output(kernel, m, p, &self.bias, relu, tiles, ow, cout, &mut lines);
            });
        });
    }
}

thread_local! {
    /// A task's transformed input ((m + 2)^2 x tiles x cin) and products ((m + 2)^2 x tiles x
    /// cout).
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

    /// One F(m x m, 3x3): B^T and A^T applied to a column of A = m + 2 vectors, written out
    /// (F(2x2, 3x3)'s only add and subtract). Plain code, no closures or coefficient tables: a
    /// closure is compiled without the caller's target features (its intrinsics become calls),
    /// and loops over tables of coefficients were left rolled (the stem conv 1.5x slower).
    trait Tiling<V: Vector, const A: usize, const M: usize> {
        /// B^T x.
        unsafe fn bt(x: &[V; A]) -> [V; A];
        /// A^T x.
        unsafe fn at(x: &[V; A]) -> [V; M];
    }

    /// F(2x2, 3x3): B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    /// A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
    struct F2;
    impl<V: Vector> Tiling<V, 4, 2> for F2 {
        #[inline(always)]
        unsafe fn bt(x: &[V; 4]) -> [V; 4] {
            [V::sub(x[0], x[2]), V::add(x[1], x[2]), V::sub(x[2], x[1]), V::sub(x[1], x[3])]
        }
        #[inline(always)]
        unsafe fn at(x: &[V; 4]) -> [V; 2] {
            [V::add(V::add(x[0], x[1]), x[2]), V::sub(V::sub(x[1], x[2]), x[3])]
        }
    }

    /// F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2 and infinity: B^T = [[4, 0, -5, 0, 1,
    /// 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1,
    /// 0], [0, 4, 0, -5, 0, 1]], A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4,
    /// 0], [0, 1, -1, 8, -8, 1]].
    struct F4;
    impl<V: Vector> Tiling<V, 6, 4> for F4 {
        #[inline(always)]
        unsafe fn bt(x: &[V; 6]) -> [V; 6] {
            let (four, five, two) = (V::splat(4.0), V::splat(5.0), V::splat(2.0));
            // Shared terms: x4 - 4 x2, x3 - 4 x1, x4 - x2, x3 - x1.
            let (a, b) = (V::sub(x[4], V::mul(x[2], four)), V::sub(x[3], V::mul(x[1], four)));
            let (c, d) = (V::sub(x[4], x[2]), V::sub(x[3], x[1]));
            [
                V::fmadd(x[0], four, V::sub(x[4], V::mul(x[2], five))),
                V::add(a, b),
                V::sub(a, b),
                V::fmadd(d, two, c),
                V::sub(c, V::mul(d, two)),
                V::fmadd(x[1], four, V::sub(x[5], V::mul(x[3], five))),
            ]
        }
        #[inline(always)]
        unsafe fn at(x: &[V; 6]) -> [V; 4] {
            // Shared terms: x1 + x2, x1 - x2, x3 + x4, x3 - x4.
            let (p, q) = (V::add(x[1], x[2]), V::sub(x[1], x[2]));
            let (r, s) = (V::add(x[3], x[4]), V::sub(x[3], x[4]));
            [V::add(V::add(x[0], p), r), V::fmadd(s, V::splat(2.0), q), V::fmadd(r, V::splat(4.0), p), V::add(V::fmadd(s, V::splat(8.0), q), x[5])]
        }
    }

    /// V = B^T d B for the row of tiles whose A x A patches (A = m + 2) start at input line `iy0`
    /// (negative: padding) and pixel m t - pl, into v[p][t][ci].
    #[inline(always)]
    unsafe fn input_in<V: Vector, T: Tiling<V, A, M>, const A: usize, const M: usize>(x: &Activations, b: usize, iy0: isize, pl: usize, tiles: usize, v: &mut [f32]) {
        let c = x.c;
        assert!(v.len() >= A * A * tiles * c && c.is_multiple_of(V::LANES));
        let v = v.as_mut_ptr();
        let mut lines: [Option<*const f32>; A] = [None; A];
        for (i, l) in lines.iter_mut().enumerate() {
            *l = x.line(b, iy0 + i as isize).map(<[f32]>::as_ptr);
        }
        for tile in 0..tiles {
            let ix0 = (M * tile) as isize - pl as isize;
            let mut cb = 0;
            while cb < c {
                // The patch by columns: d[j][i] is line i, pixel j.
                let mut d = [[V::zero(); A]; A];
                for (i, l) in lines.iter().enumerate() {
                    if let Some(l) = l {
                        for (j, dj) in d.iter_mut().enumerate() {
                            let ix = ix0 + j as isize;
                            if ix >= 0 && (ix as usize) < x.w {
                                dj[i] = V::load_full(l.add(ix as usize * c + cb));
                            }
                        }
                    }
                }
                // Rows: t = B^T d, a column at a time (t[i][j] = tc[j][i]).
                let mut tc = [[V::zero(); A]; A];
                for (t, dj) in tc.iter_mut().zip(&d) {
                    *t = T::bt(dj);
                }
                // Columns: V = t B, a row at a time.
                for i in 0..A {
                    let mut row = [V::zero(); A];
                    for (r, t) in row.iter_mut().zip(&tc) {
                        *r = t[i];
                    }
                    let out = T::bt(&row);
                    for (j, val) in out.into_iter().enumerate() {
                        V::store_full(v.add(((A * i + j) * tiles + tile) * c + cb), val);
                    }
                }
                cb += V::LANES;
            }
        }
    }

    /// Y = A^T P A + bias (then ReLU) for each tile, from p[p][t][co], into the output lines
    /// (up to M, `ow` pixels of `cout` values each).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn output_in<V: Vector, T: Tiling<V, A, M>, const A: usize, const M: usize>(p: &[f32], bias: &[f32], relu: bool, tiles: usize, ow: usize, cout: usize, lines: &mut [&mut [f32]]) {
        let n = cout;
        assert!(p.len() >= A * A * tiles * n && bias.len() >= n && n.is_multiple_of(V::LANES) && ow <= M * tiles && lines.len() <= M && lines.iter().all(|l| l.len() >= ow * n));
        for tile in 0..tiles {
            let cols = (ow - M * tile).min(M);
            let mut cb = 0;
            while cb < n {
                // Rows: s = A^T P, a column of P at a time (s[r][j] = sc[j][r]).
                let mut sc = [[V::zero(); M]; A];
                for (j, s) in sc.iter_mut().enumerate() {
                    let mut col = [V::zero(); A];
                    for (i, e) in col.iter_mut().enumerate() {
                        *e = V::load_full(p.as_ptr().add(((A * i + j) * tiles + tile) * n + cb));
                    }
                    *s = T::at(&col);
                }
                let z = V::load_full(bias.as_ptr().add(cb));
                for (r, line) in lines.iter_mut().enumerate() {
                    let mut row = [V::zero(); A];
                    for (x, s) in row.iter_mut().zip(&sc) {
                        *x = s[r];
                    }
                    for (dx, val) in T::at(&row).into_iter().enumerate().take(cols) {
                        let val = V::add(val, z);
                        V::store_full(line.as_mut_ptr().add((M * tile + dx) * n + cb), if relu { V::max(val, V::zero()) } else { val });
                    }
                }
                cb += V::LANES;
            }
        }
    }

    /// The transforms of F(m x m, 3x3) for one SIMD width.
    macro_rules! widths {
        ($input:ident, $output:ident, $v:ty, $feature:literal) => {
            #[target_feature(enable = $feature)]
            unsafe fn $input(m: usize, x: &Activations, b: usize, iy0: isize, pl: usize, tiles: usize, v: &mut [f32]) {
                match m {
                    2 => input_in::<$v, F2, 4, 2>(x, b, iy0, pl, tiles, v),
                    _ => input_in::<$v, F4, 6, 4>(x, b, iy0, pl, tiles, v),
                }
            }

            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $output(m: usize, p: &[f32], bias: &[f32], relu: bool, tiles: usize, ow: usize, cout: usize, lines: &mut [&mut [f32]]) {
                match m {
                    2 => output_in::<$v, F2, 4, 2>(p, bias, relu, tiles, ow, cout, lines),
                    _ => output_in::<$v, F4, 6, 4>(p, bias, relu, tiles, ow, cout, lines),
                }
            }
        };
    }
    widths!(input_avx512, output_avx512, __m512, "avx512f,fma");
    widths!(input_avx2, output_avx2, __m256, "avx2,fma");

    /// The input transform of F(m x m, 3x3) with `kernel`'s vectors.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn input(kernel: Kernel, m: usize, x: &Activations, b: usize, iy0: isize, pl: usize, tiles: usize, v: &mut [f32]) {
        assert!(m == 2 || m == 4);
        match kernel {
            // SAFETY: `kernel` names vectors this CPU has (`packed::kernel`, or checked by the tests).
            Kernel::Avx512 => unsafe { input_avx512(m, x, b, iy0, pl, tiles, v) },
            Kernel::Avx2 => unsafe { input_avx2(m, x, b, iy0, pl, tiles, v) },
            Kernel::Portable => unreachable!("winograd: no SIMD transforms (`available` is false)"),
        }
    }

    /// The output transform of F(m x m, 3x3) with `kernel`'s vectors.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn output(kernel: Kernel, m: usize, p: &[f32], bias: &[f32], relu: bool, tiles: usize, ow: usize, cout: usize, lines: &mut [&mut [f32]]) {
        assert!(m == 2 || m == 4);
        match kernel {
            // SAFETY: as for `input`.
            Kernel::Avx512 => unsafe { output_avx512(m, p, bias, relu, tiles, ow, cout, lines) },
            Kernel::Avx2 => unsafe { output_avx2(m, p, bias, relu, tiles, ow, cout, lines) },
            Kernel::Portable => unreachable!("winograd: no SIMD transforms (`available` is false)"),
        }
    }
}

/// Elsewhere `available` is false and nothing calls these.
#[cfg(not(target_arch = "x86_64"))]
mod transforms {
    use crate::packed::Kernel;
    use crate::Activations;

    #[allow(clippy::too_many_arguments)]
    pub(super) fn input(_: Kernel, _: usize, _: &Activations, _: usize, _: isize, _: usize, _: usize, _: &mut [f32]) {
        unreachable!("winograd: x86-64 only")
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn output(_: Kernel, _: usize, _: &[f32], _: &[f32], _: bool, _: usize, _: usize, _: usize, _: &mut [&mut [f32]]) {
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
            for (m, bound) in [(2, 1e-5), (4, 3e-5)] {
                let wg = Winograd::new(&wt, &bias, cin, cout, m);
                for kernel in kernels() {
                    let mut got = vec![f32::NAN; want.len()];
                    pool.install(|| wg.conv_on(kernel, &x, (pad, oh), (pad, ow), relu, &mut got));
                    assert!(got.iter().all(|v| v.is_finite()), "every output written (F({m}x{m}, 3x3), {kernel:?})");
                    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    eprintln!("{n}x{h}x{w}x{cin} -> {cout}, pad {pad}, F({m}x{m}, 3x3), {kernel:?}: {:.1e} of the largest output", worst / scale);
                    assert!(worst <= bound * scale, "{n}x{h}x{w}x{cin} -> {cout}, pad {pad}, F({m}x{m}, 3x3), {kernel:?}: off by {worst} (largest {scale})");
                }
            }
        }
    }
}
