//! The opt-in int8 product (`Precision::Int8`): the 1x1 convs multiply 8-bit activations by 8-bit
//! weights with exact 32-bit integer sums, then scale the sums back to fp32. The kernels
//! (`Int8Kernel`), by what the CPU offers:
//! - TDPBUSD on AMX tiles (AMX-INT8: Intel Xeon "Sapphire Rapids" and later): 16 x 16 sums of
//!   64 byte products an instruction, in 32 x 32 blocks (`amx::gemm_rows_i8`); int8 then runs
//!   1.5-1.6x the AVX-512 VNNI kernel's speed (xception 27.9 -> 17.6 ms, xception65 39.4 -> 25.8;
//!   two threads, 299, 2026-12-07);
//! - VPDPBUSD (four byte products per 32-bit lane, summed into it): with AVX-512 VNNI on zmm
//!   registers, four times the fp32 FMA rate of a core; with AVX-VNNI on ymm, in the AVX2 kernels;
//! - on any AVX2 CPU without VNNI (AMD Zen 2/3, Intel before "Ice Lake"): VPMADDUBSW (byte
//!   pairs' products summed into 16 bits), VPMADDWD against ones (pairs of those into 32 bits)
//!   and VPADDD: twice the fp32 FMA rate in principle, 1.7-1.8x measured on the products.
//!   VPMADDUBSW saturates a pair's sum at 2^15 - 1, and 255 x 127 x 2 would pass it, so there
//!   the weights get 63 levels a side (7 bits: 255 x 63 x 2 = 32130 never saturates) and the
//!   sums stay exact.
//!
//! Quantization is symmetric and per vector, so no calibration data is needed:
//! - each weight column (an output channel) gets the scale max|w| / L at load (L = 127, or 63
//!   for the VPMADDUBSW kernel) and its weights round to [-L, L];
//! - each row of activations (a pixel's channels) gets the scale max|a| / 127 as it is
//!   multiplied and its values round to [-127, 127], stored + 128 as unsigned bytes (both
//!   instructions multiply unsigned by signed bytes). The 128 is taken back out of the sums by
//!   starting them from -128 x the column's sum of weights (`Scales::corr`).
//!
//! So an output is sum_k qa qw x sa x sw + bias: each operand carries a rounding error of at most
//! half a step of its vector's largest value. Rounding is to nearest, ties to even. The sums are
//! exact integers, so every kernel gives the same bits for weights of the same levels.
//!
//! Why the weights and not the activations lose the bit without VNNI: on the real Keras model
//! (kitchenware, `keras_conformance`; 2026-12-07) the logits' largest error is 2.4% of their
//! scale with 127 levels on both sides, 4.5% with 63-level weights and 8.0% with 63-level
//! activations instead (ONNX Runtime's `reduce_range` option, for such CPUs, narrows the weights
//! too).
//!
//! The weights are packed as the fp32 panels are (32 columns, one row per step), a step being
//! four k: each 32-bit value of a panel row holds its column's four weights' bytes, so the
//! fp32 micro-kernel's loop runs unchanged with the integer instructions in place of the FMA
//! (`packed`).

use crate::packed::{Epilogue, Kernel, PackedB, SharedOut, MR, NR};
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;

/// k is padded to a multiple of this (zero weights): whole rounds of four steps of four k; for
/// the AMX tiles whole tile steps of 64 k (`Int8Kernel::k_align`).
const K_ALIGN: usize = 16;

/// The deepest product int8 runs: its 32-bit sums hold k x 255 x 127 (Xception's deepest 1x1
/// conv has k = 2048). Deeper weight matrices stay fp32 (`PackedB::with_precision`).
pub const MAX_K: usize = (i32::MAX as usize) / (255 * 128);

/// The int8 micro-kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AMX tiles with TDPBUSD (AMX-INT8: Intel Xeon "Sapphire Rapids" and later): 32 x 32 blocks
    /// of sums, the products of 64 k a tile step (`amx::gemm_rows_i8`).
    Amx,
    /// The AVX-512 12x32 kernel with VPDPBUSD (AVX-512 VNNI).
    Vnni512,
    /// The AVX2 6x16 kernel with VEX VPDPBUSD (AVX-VNNI).
    Vnni256,
    /// The AVX2 5x16 kernel with VPMADDUBSW, VPMADDWD and VPADDD (AVX2 alone; 7-bit weights).
    Madd256,
    /// The AVX-512 12x32 kernel with the same on zmm (AVX-512BW without VNNI: Intel Xeon
    /// "Skylake-SP"; 7-bit weights).
    Madd512,
}

impl Int8Kernel {
    /// The weights' levels a side this kernel multiplies exactly.
    pub fn levels(self) -> i32 {
        match self {
            Int8Kernel::Madd256 | Int8Kernel::Madd512 => 63,
            _ => 127,
        }
    }

    /// Whether it sums four byte products into a 32-bit lane in one instruction (VPDPBUSD or
    /// AMX's TDPBUSD): four times the fp32 FMA rate or more.
    pub fn vnni(self) -> bool {
        matches!(self, Int8Kernel::Vnni512 | Int8Kernel::Vnni256 | Int8Kernel::Amx)
    }

    /// The fp32 kernels whose row quantizer (and, but for AMX, register tiles) it uses.
    fn simd(self) -> Kernel {
        match self {
            Int8Kernel::Vnni512 | Int8Kernel::Madd512 | Int8Kernel::Amx => Kernel::Avx512,
            _ => Kernel::Avx2,
        }
    }

    /// What k is padded to in the weights it multiplies (and in the rows of A).
    pub fn k_align(self) -> usize {
        match self {
            Int8Kernel::Amx => crate::amx::KT8,
            _ => K_ALIGN,
        }
    }

    /// Its name, as `xception bench` reports it.
    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Vnni512 => "avx512-vnni-int8",
            Int8Kernel::Vnni256 => "avx-vnni-int8",
            Int8Kernel::Madd256 => "avx2-int8",
            Int8Kernel::Madd512 => "avx512bw-int8",
            Int8Kernel::Amx => "amx-int8",
        }
    }
}

/// The int8 kernel for this CPU, if any: with the AVX-512 kernels and AVX-512 VNNI, VPDPBUSD on
/// zmm, or without it, VPMADDUBSW on zmm (AVX-512BW); else with AVX-VNNI, VPDPBUSD on ymm; else
/// on any AVX2+FMA CPU, VPMADDUBSW on ymm.
/// With AMX-INT8 (and the tile state granted), AMX tiles before all of these.
/// `XCEPTION_ENGINE_NO_VNNI` set in the environment passes over both VNNIs and AMX (as
/// XCEPTION_ENGINE_NO_AVX512 does AVX-512), which is how an AVX2 CPU without VNNI is measured and
/// tested on one with it; `XCEPTION_ENGINE_NO_AMX` over AMX alone.
pub fn kernel() -> Option<Int8Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Int8Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let vnni = std::env::var("XCEPTION_ENGINE_NO_VNNI").is_err();
        let amx = vnni && std::env::var("XCEPTION_ENGINE_NO_AMX").is_err();
        match crate::packed::kernel() {
            // (AMX needs AVX-512 for its row quantizer and stores; the AVX-512 kernels check it.)
            Kernel::Avx512 if amx && is_x86_feature_detected!("avx512bw") && crate::amx::int8_available() => Some(Int8Kernel::Amx),
            // (Every AVX-512 VNNI CPU has AVX-512BW, which the row quantizer uses.)
            Kernel::Avx512 if vnni && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") => Some(Int8Kernel::Vnni512),
            Kernel::Avx512 if is_x86_feature_detected!("avx512bw") => Some(Int8Kernel::Madd512),
            Kernel::Portable => None,
            _ if vnni && is_x86_feature_detected!("avxvnni") => Some(Int8Kernel::Vnni256),
            _ => Some(Int8Kernel::Madd256),
        }
    })
}

/// Whether int8 products run here (any x86-64 CPU with AVX2 and FMA: `kernel`).
pub fn available() -> bool {
    kernel().is_some()
}

/// A packed int8 weight matrix's column scales and sum corrections.
#[derive(Clone, Debug)]
pub struct Scales {
    /// Steps of each panel: k rounded up to the kernel's `k_align`, over four.
    pub groups: usize,
    /// The weights' levels a side (`Int8Kernel::levels`).
    pub levels: i32,
    /// Each column's scale (padded with zeros to whole panels).
    pub col: Vec<f32>,
    /// Each column's -128 x (sum of its int8 weights), as i32 bits (the sums' start).
    pub corr: Vec<f32>,
}

/// `v` rounded to the nearest of [-levels, levels] after multiplying by `inv` (ties to even).
///
/// Without a call: `round_ties_even` is the C library's rintf on x86-64's baseline (SSE2), which
/// was 15% of `embed --precision int8`'s time in the weights' packing (real Keras model,
/// 2026-12-07). Adding and subtracting 1.5 x 2^23 rounds to the nearest integer, ties to even
/// (the default rounding mode), any value under 2^22 in magnitude; a value here is at most
/// `levels` (its vector's largest magnitude times `inv`), or NaN, which it keeps.
#[inline(always)]
fn quantize(v: f32, inv: f32, levels: i32) -> i32 {
    const ROUND: f32 = 12_582_912.0;
    let x = v * inv;
    let rounded = if x.abs() < 4_194_304.0 { (x + ROUND) - ROUND } else { x.round_ties_even() };
    rounded.clamp(-levels as f32, levels as f32) as i32
}

/// The scale of a vector of `levels` a side whose largest magnitude is `max` (NaN if a value is
/// NaN: the sums then carry it), and its inverse (zero for an all-zero or non-finite vector).
#[inline(always)]
fn scale_of(max: f32, levels: i32) -> (f32, f32) {
    let l = levels as f32;
    (max / l, if max > 0.0 && max.is_finite() { l / max } else { 0.0 })
}

/// The (k x n) weights (row-major) as int8 panels of `levels` a side (see the module doc), k
/// zero-padded to a multiple of `k_align`, and their scales. Made row by row, in the weights'
/// order (a column at a time read them at a stride of n values).
pub fn pack(weight: &[f32], k: usize, n: usize, levels: i32, k_align: usize) -> (Vec<f32>, Scales) {
    assert!(k <= MAX_K, "int8: k {k} would overflow the 32-bit sums");
    assert!((1..=127).contains(&levels), "int8: {levels} levels");
    assert!(k_align.is_multiple_of(K_ALIGN), "int8: k aligned to {k_align}");
    assert_eq!(weight.len(), k * n, "int8: weight shape");
    let panels = n.div_ceil(NR);
    let groups = k.next_multiple_of(k_align) / 4;
    // Each column's largest magnitude; NaN magnitudes win, so a NaN weight makes its column NaN
    // (as in fp32).
    let mut max = vec![0f32; n];
    for row in weight.chunks_exact(n.max(1)) {
        for (m, v) in max.iter_mut().zip(row) {
            let a = v.abs();
            if a > *m || a.is_nan() {
                *m = a;
            }
        }
    }
    let mut col = vec![0f32; panels * NR];
    let mut inv = vec![0f32; n];
    for j in 0..n {
        (col[j], inv[j]) = scale_of(max[j], levels);
    }
    // Row r's weights are byte r % 4 of the 32-bit values of step r / 4, little-endian.
    let mut bytes = vec![0u8; panels * groups * NR * 4];
    let mut sums = vec![0i32; n];
    for (r, row) in weight.chunks_exact(n.max(1)).enumerate() {
        let (g, i) = (r / 4, r % 4);
        for (j, (v, inv)) in row.iter().zip(&inv).enumerate() {
            let q = quantize(*v, *inv, levels);
            sums[j] += q;
            bytes[((j / NR * groups + g) * NR + j % NR) * 4 + i] = q as i8 as u8;
        }
    }
    let data = bytes.chunks_exact(4).map(|b| f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect();
    let mut corr = vec![0f32; panels * NR];
    for (c, sum) in corr.iter_mut().zip(&sums) {
        *c = f32::from_bits((-128 * sum) as u32);
    }
    (data, Scales { groups, levels, col, corr })
}

/// Row stride (bytes) of A in int8 for the int8 weights `b`: their k, padded.
pub fn lhs_stride(b: &PackedB) -> usize {
    4 * b.int8().expect("int8 weights").groups
}

/// Rows of A a buffer for `m` rows must hold: AMX tiles read whole 16-row tiles (what they read
/// past the m rows makes sums that are never stored).
fn rows_readable(m: usize) -> usize {
    m + crate::amx::T - 1
}

/// Rows `rows` of A (fp32, row stride `lda`, k columns) as unsigned bytes into `dst` (row stride
/// `ld8`, indexed from row 0; the padding past k is 128, a zero) and their scales into
/// `scales` (indexed from row 0).
pub fn quantize_rows(a: &[f32], lda: usize, k: usize, rows: Range<usize>, dst: &mut [u8], ld8: usize, scales: &mut [f32]) {
    quantize_rows_on(kernel().expect("int8 kernel").simd(), a, lda, k, rows, dst, ld8, scales)
}

/// `quantize_rows` with the given kernels' instructions (AVX-512 or AVX2).
#[allow(clippy::too_many_arguments)]
fn quantize_rows_on(kernel: Kernel, a: &[f32], lda: usize, k: usize, rows: Range<usize>, dst: &mut [u8], ld8: usize, scales: &mut [f32]) {
    assert!(kernel != Kernel::Portable, "int8 needs the AVX-512 or AVX2 kernels");
    assert!(ld8 >= k && dst.len() >= rows.end * ld8 && scales.len() >= rows.end, "int8: quantized rows out of bounds");
    assert!(rows.is_empty() || a.len() >= (rows.end - 1) * lda + k, "int8: rows to quantize out of bounds");
    // SAFETY: `available()` (the AVX-512 or AVX2 kernels) is checked before any int8 matrix is
    // multiplied.
    unsafe {
        if kernel == Kernel::Avx512 {
            rows_avx512(a, lda, k, rows, dst, ld8, scales)
        } else {
            rows_avx2(a, lda, k, rows, dst, ld8, scales)
        }
    }
}

/// `quantize_rows_on`'s rows, each quantized by `$row`, inlined into one call for all of them
/// (one thread, 294 rows: 64 values a row 12.6 -> 11.7 ns a row, 728 values 81 -> 79; AVX2 13.1
/// -> 11.6 and 88 -> 85; 2026-12-07).
macro_rules! quantize_rows_with {
    ($row:ident, $a:expr, $lda:expr, $k:expr, $rows:expr, $dst:expr, $ld8:expr, $scales:expr) => {
        for r in $rows {
            let row = &mut $dst[r * $ld8..][..$ld8];
            $scales[r] = $row(&$a[r * $lda..][..$k], &mut row[..$k]);
            if $k < $ld8 {
                row[$k..].fill(128);
            }
        }
    };
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rows_avx512(a: &[f32], lda: usize, k: usize, rows: Range<usize>, dst: &mut [u8], ld8: usize, scales: &mut [f32]) {
    // Rows two at a time, both rows' largest values found before either is quantized: a row's
    // steps form one chain of latencies (its largest value, the scale, the bytes), and two
    // side by side keep the units busy.
    let pairs = rows.start..rows.start + rows.len() / 2 * 2;
    for r in pairs.clone().step_by(2) {
        let (x0, x1) = (&a[r * lda..][..k], &a[(r + 1) * lda..][..k]);
        let ((s0, i0), (s1, i1)) = (scale_of(row_max(x0), 127), scale_of(row_max(x1), 127));
        let (d0, d1) = dst[r * ld8..][..2 * ld8].split_at_mut(ld8);
        row_bytes(x0, &mut d0[..k], i0);
        row_bytes(x1, &mut d1[..k], i1);
        if k < ld8 {
            d0[k..].fill(128);
            d1[k..].fill(128);
        }
        (scales[r], scales[r + 1]) = (s0, s1);
    }
    quantize_rows_with!(quantize_row, a, lda, k, pairs.end..rows.end, dst, ld8, scales)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(a: &[f32], lda: usize, k: usize, rows: Range<usize>, dst: &mut [u8], ld8: usize, scales: &mut [f32]) {
    quantize_rows_with!(quantize_row_avx2, a, lda, k, rows, dst, ld8, scales)
}

/// The largest magnitude of values whose largest magnitude bits (as i32, sign cleared) are
/// `bits`: a float's magnitude bits order as the magnitudes do and a NaN's lie above infinity's,
/// so an integer maximum finds the largest magnitude and keeps a NaN (a float maximum would drop
/// it) with one instruction per vector.
fn magnitude_of(bits: i32) -> f32 {
    if bits > f32::INFINITY.to_bits() as i32 {
        f32::NAN
    } else {
        f32::from_bits(bits as u32)
    }
}

/// One row: its largest magnitude, then each value over its scale, rounded, + 128. Returns the
/// scale.
#[inline(always)]
unsafe fn quantize_row(src: &[f32], dst: &mut [u8]) -> f32 {
    let (scale, inv) = scale_of(row_max(src), 127);
    row_bytes(src, dst, inv);
    scale
}

/// A row's largest magnitude (NaN if it holds one).
#[inline(always)]
unsafe fn row_max(src: &[f32]) -> f32 {
    let (k, p) = (src.len(), src.as_ptr());
    let (whole, tail) = (k / 64 * 64, crate::packed::lane_mask(k % 16));
    // Largest magnitude bits (`magnitude_of`), four running maxima (so the loop is not one chain
    // of max latencies); masked lanes load zeros.
    let (mut m0, mut m1, mut m2, mut m3) = (_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512());
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    let look = |v: __m512i, m: &mut __m512i| *m = _mm512_max_epi32(_mm512_and_si512(v, magnitude), *m);
    for i in (0..whole).step_by(64) {
        look(_mm512_loadu_si512(p.add(i).cast()), &mut m0);
        look(_mm512_loadu_si512(p.add(i + 16).cast()), &mut m1);
        look(_mm512_loadu_si512(p.add(i + 32).cast()), &mut m2);
        look(_mm512_loadu_si512(p.add(i + 48).cast()), &mut m3);
    }
    for i in (whole..k).step_by(16) {
        let m = if i + 16 <= k { 0xffff } else { tail };
        look(_mm512_maskz_loadu_epi32(m, p.add(i).cast()), &mut m0);
    }
    magnitude_of(_mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_max_epi32(m0, m1), _mm512_max_epi32(m2, m3))))
}

/// A row's values times `inv` (1 / its scale), rounded, + 128, into `dst`.
#[inline(always)]
unsafe fn row_bytes(src: &[f32], dst: &mut [u8], inv: f32) {
    let (k, p) = (src.len(), src.as_ptr());
    let (whole, tail) = (k / 64 * 64, crate::packed::lane_mask(k % 16));
    let vinv = _mm512_set1_ps(inv);
    let q = |v: __m512| _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));
    let d = dst.as_mut_ptr();
    // 64 values a round, as `quantize_row_avx2` does 32: rounded to nearest even by the
    // conversion (MXCSR's default), packed with signed saturation to 16 and 8 bits within each
    // 128-bit lane (four-byte groups in the order a0 b0 c0 d0 a1 b1 ..., put back in order),
    // clamped to -127 (NaN converts to i32::MIN; the scale is NaN then anyway), + 128.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let (low, flip) = (_mm512_set1_epi8(-127), _mm512_set1_epi8(-128));
    for i in (0..whole).step_by(64) {
        let ab = _mm512_packs_epi32(q(_mm512_loadu_ps(p.add(i))), q(_mm512_loadu_ps(p.add(i + 16))));
        let cd = _mm512_packs_epi32(q(_mm512_loadu_ps(p.add(i + 32))), q(_mm512_loadu_ps(p.add(i + 48))));
        let bytes = _mm512_permutexvar_epi32(order, _mm512_packs_epi16(ab, cd));
        _mm512_storeu_si512(d.add(i).cast(), _mm512_xor_si512(_mm512_max_epi8(bytes, low), flip));
    }
    let (lo, hi, zp) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127), _mm512_set1_epi32(128));
    let bytes = |v: __m512| _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q(v), lo), hi), zp));
    let full = k / 16 * 16;
    for i in (whole..full).step_by(16) {
        _mm_storeu_si128(d.add(i).cast(), bytes(_mm512_loadu_ps(p.add(i))));
    }
    if full < k {
        let mut last = [0u8; 16];
        _mm_storeu_si128(last.as_mut_ptr().cast(), bytes(_mm512_maskz_loadu_ps(tail, p.add(full))));
        dst[full..].copy_from_slice(&last[..k - full]);
    }
}

/// `quantize_row` with AVX2: the same values (the conversion rounds as `quantize` does).
#[inline(always)]
unsafe fn quantize_row_avx2(src: &[f32], dst: &mut [u8]) -> f32 {
    let (k, p) = (src.len(), src.as_ptr());
    let full = k / 8 * 8;
    // Largest magnitude bits (`magnitude_of`).
    let magnitude = _mm256_set1_epi32(0x7fff_ffff);
    let (mut m0, mut m1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for (j, i) in (0..full).step_by(8).enumerate() {
        let v = _mm256_and_si256(_mm256_loadu_si256(p.add(i).cast()), magnitude);
        if j % 2 == 0 {
            m0 = _mm256_max_epi32(v, m0);
        } else {
            m1 = _mm256_max_epi32(v, m1);
        }
    }
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(lanes.as_mut_ptr().cast(), _mm256_max_epi32(m0, m1));
    let bits = src[full..].iter().fold(lanes.into_iter().max().unwrap_or(0), |m, v| m.max((v.to_bits() & 0x7fff_ffff) as i32));
    let (scale, inv) = scale_of(magnitude_of(bits), 127);
    let vinv = _mm256_set1_ps(inv);
    let q = |i: usize| _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vinv));
    // 32 values a round: rounded (to nearest even, by the conversion) to 32-bit integers, packed
    // with signed saturation to 16 and then 8 bits (within each 128-bit half, so the four-byte
    // groups come out as a0 b0 c0 d0 a1 b1 c1 d1 and are put back in order), clamped to -127 (a
    // NaN converts to i32::MIN, which saturates to -128; the scale is NaN then anyway) and + 128
    // (the sign bit flipped).
    let (order, low, flip) = (_mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), _mm256_set1_epi8(-127), _mm256_set1_epi8(-128));
    let whole = k / 32 * 32;
    for i in (0..whole).step_by(32) {
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q(i), q(i + 8)), _mm256_packs_epi32(q(i + 16), q(i + 24)));
        let bytes = _mm256_xor_si256(_mm256_max_epi8(_mm256_permutevar8x32_epi32(bytes, order), low), flip);
        _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), bytes);
    }
    let (lo, hi, zp) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127), _mm256_set1_epi32(128));
    // Each 32-bit lane's low byte, gathered into the first four bytes of each 128-bit half, then
    // the two halves' words side by side.
    let low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    let pair = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
    for i in (whole..full).step_by(8) {
        let q = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(q(i), lo), hi), zp);
        let b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(q, low_bytes), pair);
        _mm_storel_epi64(dst.as_mut_ptr().add(i).cast(), _mm256_castsi256_si128(b));
    }
    for i in full..k {
        dst[i] = (quantize(src[i], inv, 127) + 128) as u8;
    }
    scale
}

/// Room for `m` quantized rows of `ld8` bytes and their scales in `bufs` (a u32 buffer, so the
/// rows can be read as the micro-kernels' 32-bit values; grown as needed, with room for the rows
/// AMX tiles read past them): the rows' bytes and scales, for `quantize_rows`.
pub(crate) fn lhs_buffers(bufs: &mut (Vec<u32>, Vec<f32>), m: usize, ld8: usize) -> (&mut [u8], &mut [f32]) {
    let (buf, scales) = bufs;
    // (15 values more: room to start the rows on a cache line, `lhs_start`.)
    buf.resize(buf.len().max(rows_readable(m) * ld8 / 4 + 15), 0);
    scales.resize(scales.len().max(m), 0.0);
    let start = lhs_start(buf);
    let rows = &mut buf[start..];
    // SAFETY: the rows hold at least m * ld8 bytes (ld8 is a multiple of four).
    (unsafe { std::slice::from_raw_parts_mut(rows.as_mut_ptr().cast::<u8>(), m * ld8) }, &mut scales[..m])
}

/// The rows `lhs_buffers` made in `bufs`, as the products read them (`gemm_rows`): from a cache
/// line, so that AMX tile rows do not cross lines (see `packed::line_aligned`).
pub(crate) fn lhs_rows(bufs: &(Vec<u32>, Vec<f32>)) -> &[u32] {
    &bufs.0[lhs_start(&bufs.0)..]
}

/// Where the rows start in a buffer of `lhs_buffers`: its first value on a 64-byte boundary.
fn lhs_start(buf: &[u32]) -> usize {
    buf.as_ptr().align_offset(64).min(15)
}

thread_local! {
    /// A quantized for one `gemm_rows_f32` call on this thread (u32 for 4-byte alignment), and
    /// its rows' scales.
    static LHS: RefCell<(Vec<u32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `packed::gemm_rows` for int8 weights on `kernel`: quantizes A's rows into this thread's
/// buffer, then `gemm_rows`.
///
/// # Safety
/// As `packed::gemm_rows`; `kernel` must run here.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows_f32(kernel: Int8Kernel, m: usize, a: &[f32], lda: usize, b: &PackedB, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue) {
    if m == 0 || panels.is_empty() {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + b.k, "gemm: lhs too short");
    LHS.with_borrow_mut(|bufs| {
        let ld8 = lhs_stride(b);
        let (bytes, scales) = lhs_buffers(bufs, m, ld8);
        quantize_rows_on(kernel.simd(), a, lda, b.k, 0..m, bytes, ld8, scales);
        gemm_rows_on(kernel, m, lhs_rows(bufs), ld8, &bufs.1[..m], b, panels, out, ldc, epi)
    })
}

/// out[rows m, panels] = the dequantized product of A (m rows of `ld8` bytes from
/// `quantize_rows`, as u32 values, from a buffer of `lhs_buffers`: AMX tiles read whole 16-row
/// tiles; its rows' `scales`) and b + bias, then the epilogue.
///
/// # Safety
/// As `packed::gemm_rows`; `available()` must be true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows(m: usize, a: &[u32], ld8: usize, scales: &[f32], b: &PackedB, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue) {
    if m == 0 || panels.is_empty() {
        return;
    }
    let q = kernel().expect("int8 kernel");
    let rows = if q == Int8Kernel::Amx { rows_readable(m) } else { m };
    assert!(ld8 == lhs_stride(b) && a.len() * 4 >= rows * ld8 && scales.len() >= m, "int8 gemm: lhs shape");
    assert!(out.values() >= (m - 1) * ldc + b.n.min(panels.end * NR), "gemm: output too short");
    if let Some((r, ldr)) = epi.residual {
        assert!(r.len() >= (m - 1) * ldr + b.n.min(panels.end * NR), "gemm: residual too short");
    }
    gemm_rows_on(q, m, a, ld8, scales, b, panels, out, ldc, epi)
}

/// `gemm_rows` on the given micro-kernel.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows_on(kernel: Int8Kernel, m: usize, a: &[u32], ld8: usize, scales: &[f32], b: &PackedB, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue) {
    let q = b.int8().expect("int8 gemm: weights not int8");
    // Weights of more levels than the kernel multiplies exactly would saturate its sums.
    assert!(q.levels <= kernel.levels(), "int8 gemm: weights of {} levels on {kernel:?}", q.levels);
    assert!((4 * q.groups).is_multiple_of(kernel.k_align()), "int8 gemm: weights padded for another kernel than {kernel:?}");
    let a = std::slice::from_raw_parts(a.as_ptr().cast::<f32>(), a.len());
    use crate::packed::{avx2, avx512, tiles};
    // (No k-blocks: the integer sums run over all of k at once.)
    match kernel {
        Int8Kernel::Vnni512 => tiles(m, a, ld8 / 4, b, panels, out, ldc, epi, (usize::MAX, MR, NR), Some(scales), |t| avx512::tile(t)),
        Int8Kernel::Vnni256 => tiles(m, a, ld8 / 4, b, panels, out, ldc, epi, (usize::MAX, avx2::MR, avx2::NR), Some(scales), |t| avx2::tile(t)),
        Int8Kernel::Madd256 => tiles(m, a, ld8 / 4, b, panels, out, ldc, epi, (usize::MAX, avx2::MR_MADD, avx2::NR), Some(scales), |t| avx2::tile_madd(t)),
        Int8Kernel::Madd512 => tiles(m, a, ld8 / 4, b, panels, out, ldc, epi, (usize::MAX, MR, NR), Some(scales), |t| avx512::tile_madd(t)),
        Int8Kernel::Amx => crate::amx::gemm_rows_i8(m, std::slice::from_raw_parts(a.as_ptr().cast::<u8>(), a.len() * 4), ld8, scales, b, q, panels, out, ldc, epi),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::gemm_rows_on;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 12) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// The int8 kernels this CPU runs (whatever XCEPTION_ENGINE_NO_VNNI says): AMX, AVX-512 with
    /// AVX-512 VNNI, AVX-512BW alone, AVX2 with AVX-VNNI, AVX2 alone.
    fn kernels() -> Vec<Int8Kernel> {
        let mut k = Vec::new();
        if crate::packed::has_avx512() && is_x86_feature_detected!("avx512bw") && crate::amx::int8_available() {
            k.push(Int8Kernel::Amx);
        }
        if crate::packed::has_avx512() {
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") {
                k.push(Int8Kernel::Vnni512);
            }
            if is_x86_feature_detected!("avx512bw") {
                k.push(Int8Kernel::Madd512);
            }
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avxvnni") {
                k.push(Int8Kernel::Vnni256);
            }
            k.push(Int8Kernel::Madd256);
        }
        if k.is_empty() {
            eprintln!("skipped: no AVX2 here");
        }
        k
    }

    /// The row quantizers (AVX-512 and AVX2) this CPU runs.
    fn quantizers() -> Vec<Kernel> {
        let mut q: Vec<Kernel> = kernels().iter().map(|k| k.simd()).collect();
        q.dedup();
        q
    }

    /// Scales and rounding, on values picked so each case is known by hand; both kernels'
    /// instructions give the same bytes.
    #[test]
    fn quantization_is_symmetric_per_vector_and_rounds_to_nearest_even() {
        for kernel in quantizers() {
            let quantize_rows = |a: &[f32], k: usize, dst: &mut [u8], ld8: usize, scales: &mut [f32]| quantize_rows_on(kernel, a, k, k, 0..1, dst, ld8, scales);
            // Scale 2/127: -2 -> -127, 1 -> 63.5 -> 64 (even), 0.5 -> 31.75 -> 32; + 128.
            let row = [1.0, -2.0, 0.5, 0.0];
            let mut q = [0u8; 16];
            let mut s = [0f32];
            quantize_rows(&row, 4, &mut q, 16, &mut s);
            assert_eq!(s[0], 2.0 / 127.0);
            assert_eq!(&q[..4], &[192, 1, 160, 128], "{kernel:?}");
            assert!(q[4..].iter().all(|&v| v == 128), "padding is zero");
            // Long rows go through the vector loops (and a ragged tail): every value within half
            // a step of its own, rounded as the scalar `quantize`.
            for len in [100, 728, 37] {
                let row: Vec<f32> = values(len, 3).iter().map(|v| v * 37.0).collect();
                let ld8 = len.next_multiple_of(K_ALIGN);
                let mut q = vec![0u8; ld8];
                quantize_rows(&row, len, &mut q, ld8, &mut s);
                let inv = scale_of(row.iter().fold(0f32, |m, v| m.max(v.abs())), 127).1;
                for (v, q) in row.iter().zip(&q) {
                    assert_eq!(*q as i32 - 128, quantize(*v, inv, 127), "{kernel:?}: {v}");
                    let back = (*q as f32 - 128.0) * s[0];
                    assert!((back - v).abs() <= s[0] / 2.0 * 1.0001, "{v} -> {q} -> {back}");
                }
            }
            // An all-zero row has scale 0 and zero bytes; a NaN (in the vector part or the tail)
            // makes the scale NaN.
            let mut q = vec![7u8; 32];
            quantize_rows(&[0.0; 20], 20, &mut q, 32, &mut s);
            assert_eq!((s[0], q[0], q[19]), (0.0, 128, 128));
            for at in [3, 38] {
                let mut row = vec![1.0f32; 39];
                row[at] = f32::NAN;
                let mut q = vec![0u8; 48];
                quantize_rows(&row, 39, &mut q, 48, &mut s);
                assert!(s[0].is_nan(), "{kernel:?}: NaN at {at}");
            }
        }
    }

    /// `quantize`, without rintf, rounds as `round_ties_even` (ties to even, clamped, NaN to
    /// zero), and `pack` puts each column's weights, scale and zero-point sum where the kernels
    /// read them: row r of column j is byte r % 4 of step r / 4 of j's panel.
    #[test]
    fn weights_pack_row_by_row_as_quantize_rounds_them() {
        for v in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5, 63.5, 0.49999997, 127.0, -127.0, 0.0, -0.0, 3.7, -3.7, 1e-30] {
            for levels in [127, 63] {
                assert_eq!(quantize(v, 1.0, levels), v.round_ties_even().clamp(-levels as f32, levels as f32) as i32, "{v} at {levels} levels");
            }
        }
        assert_eq!(quantize(f32::NAN, 1.0, 127), 0);
        assert_eq!(quantize(1.0, f32::INFINITY, 127), 127);
        // Column 0 has ties (its largest magnitude 127 makes the scale 1), column 1 a NaN, the rest values.
        let (k, n) = (6, 35);
        let mut w = values(k * n, 9);
        for (r, v) in [0.5f32, 1.5, -2.5, 127.0, -0.5, 3.5].iter().enumerate() {
            w[r * n] = *v;
        }
        w[2 * n + 1] = f32::NAN;
        let (data, scales) = pack(&w, k, n, 127, K_ALIGN);
        let groups = scales.groups;
        assert_eq!(groups, 4);
        assert_eq!(scales.col[0], 1.0);
        assert!(scales.col[1].is_nan());
        for j in 0..n {
            let inv = scale_of((0..k).map(|r| w[r * n + j].abs()).fold(0f32, |m, v| if v > m || v.is_nan() { v } else { m }), 127).1;
            let mut sum = 0;
            for r in 0..4 * groups {
                let word = data[(j / NR * groups + r / 4) * NR + j % NR].to_bits().to_le_bytes();
                let want = if r < k { quantize(w[r * n + j], inv, 127) } else { 0 };
                assert_eq!(word[r % 4] as i8 as i32, want, "row {r} column {j}");
                sum += want;
            }
            assert_eq!(scales.corr[j].to_bits() as i32, -128 * sum, "column {j}");
        }
        let column0: Vec<i32> = (0..k).map(|r| data[r / 4 * NR].to_bits().to_le_bytes()[r % 4] as i8 as i32).collect();
        assert_eq!(column0, [0, 2, -2, 127, 0, 4]);
    }

    /// The int8 product against the same product in f64 of the dequantized operands (what
    /// int8 computes exactly, in integers): only the fp32 epilogue's rounding is left. Ragged
    /// rows, columns and k, residual, ReLU and accumulation, weights of 127 and 63 levels (the
    /// latter on every kernel, the AVX2-alone one included); every kernel gives the same bits for
    /// the same weights. The last case puts every product at its extreme (activations of +-127,
    /// weights of +-L), where VPMADDUBSW would saturate were the weights 8-bit.
    #[test]
    fn int8_product_is_the_exact_product_of_the_quantized_operands() {
        let kernels = kernels();
        let extreme = |len: usize, seed: u32| -> Vec<f32> { values(len, seed).iter().map(|v| if *v < 0.0 { -1.0 } else { 1.0 }).collect() };
        for &(m, k, n, residual, relu, accumulate) in &[(1, 5, 3, false, false, false), (13, 70, 40, true, true, false), (29, 128, 64, false, true, true), (40, 728, 96, true, false, false), (7, 2048, 33, false, false, false), (12, 256, 32, false, false, false)] {
            let (a, w) = if (m, k) == (12, 256) {
                (extreme(m * k, 1), extreme(k * n, 2))
            } else {
                (values(m * k, 1).iter().enumerate().map(|(i, v)| v * (1.0 + (i / k) as f32)).collect(), values(k * n, 2).iter().enumerate().map(|(i, v)| v * (0.5 + (i % n) as f32 / 8.0)).collect::<Vec<_>>())
            };
            let bias = values(n, 3);
            let res = values(m * n, 4);
            let start = values(m * n, 5);
            let epi = Epilogue { residual: residual.then_some((&res[..], n)), relu, accumulate, ..Epilogue::PLAIN };
            for levels in [127, 63] {
                let mut first: Option<Vec<f32>> = None;
                for &kernel in kernels.iter().filter(|q| q.levels() >= levels) {
                    // (Padded for the kernel: the padding's zeros change no sum.)
                    let b = PackedB::quantized(&w, &bias, k, n, levels, kernel.k_align());
                    let mut out = if accumulate { start.clone() } else { vec![0f32; m * n] };
                    unsafe { gemm_rows_f32(kernel, m, &a, k, &b, 0..b.panels(), SharedOut::new(&mut out), n, epi) };
                    // The dequantized operands, from this module's own scales (checked above).
                    let ld8 = lhs_stride(&b);
                    let (mut qa, mut sa) = (vec![0u8; m * ld8], vec![0f32; m]);
                    quantize_rows_on(kernel.simd(), &a, k, k, 0..m, &mut qa, ld8, &mut sa);
                    let sw = &b.int8().unwrap().col;
                    for r in 0..m {
                        for j in 0..n {
                            let (inv, mut sum, mut mag) = (scale_of((0..k).map(|i| w[i * n + j].abs()).fold(0.0, f32::max), levels).1, 0f64, 0f64);
                            for i in 0..k {
                                let x = (qa[r * ld8 + i] as f64 - 128.0) * sa[r] as f64;
                                let y = quantize(w[i * n + j], inv, levels) as f64 * sw[j] as f64;
                                sum += x * y;
                                mag += (x * y).abs();
                            }
                            let mut want = sum + if accumulate { start[r * n + j] as f64 } else { bias[j] as f64 };
                            if residual {
                                want += res[r * n + j] as f64;
                            }
                            if relu {
                                want = want.max(0.0);
                            }
                            let tol = 1e-6 * (mag + want.abs() + 1.0);
                            assert!((out[r * n + j] as f64 - want).abs() <= tol, "{kernel:?} {levels} levels {m}x{k}x{n}: out[{r}][{j}] {} want {want}", out[r * n + j]);
                        }
                    }
                    // And int8 is near the fp32 product: each operand within half a step of its
                    // vector's largest value.
                    let mut f = if accumulate { start.clone() } else { vec![0f32; m * n] };
                    let bf = PackedB::new(&w, &bias, k, n);
                    unsafe { gemm_rows_on(kernel.simd(), m, &a, k, &bf, 0..bf.panels(), SharedOut::new(&mut f), n, epi) };
                    let scale = f.iter().fold(0f32, |s, v| s.max(v.abs()));
                    let err = out.iter().zip(&f).fold(0f32, |e, (x, y)| e.max((x - y).abs()));
                    assert!(err <= 0.05 * scale, "{kernel:?} {levels} levels {m}x{k}x{n}: int8 off fp32 by {err} of {scale}");
                    match &first {
                        None => first = Some(out),
                        Some(o) => assert_eq!(o, &out, "{m}x{k}x{n}, {levels} levels: {kernel:?} differs from {:?}", kernels[0]),
                    }
                }
            }
        }
    }
}
