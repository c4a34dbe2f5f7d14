//! The opt-in bfloat16 product (`Precision::Bf16`): Intel AMX tiles multiply bf16 activations by
//! bf16 weights and accumulate in fp32, sixteen times the fp32 FMA rate of an AVX-512 core.
//!
//! Weights are rounded to bf16 once, at load, into the tile layout; each product's left operand
//! (depthwise output, input lines) is rounded as it is multiplied. Rounding is to nearest, ties
//! to even (what PyTorch, TensorFlow and oneDNN do), so each operand keeps 8 significant bits;
//! sums, bias, residual and ReLU stay fp32. In two pieces (`Precision::Bf16x3`) each operand is
//! also split into hi + lo (`split_bf16`, 16 bits) and a product runs as three, hi x hi + hi x lo
//! + lo x hi (`block_steps_split`; the lo x lo term left out is below the split's own error, 2^-16
//! of the product): each weight panel holds its hi pieces, then its lo pieces; each row of A its
//! hi values, then its lo values.
//!
//! Without tiles, on AVX-512 CPUs with AVX512-BF16 (AMD Zen 4 and later), `Precision::Bf16` runs
//! its products on VDPBF16PS instead (`dot_available`, `packed::gemm_rows_dot`): the same bf16
//! operands and fp32 sums, A's rows laid out as here, the weights as pairs of k in fp32-shaped
//! panels, twice the fp32 rate.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are inline assembly. Linux hands a
//! process the 8 KiB of tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and each
//! thread loads the tile shapes (`ldtilecfg`) before its first product.

use crate::packed::{lane_mask, Epilogue, PackedB, SharedOut};
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::{Cell, RefCell};
use std::ops::Range;

/// Depth of one tile step: a 16 x 32 bf16 tile of A (64 bytes a row).
pub const KT: usize = 32;
/// Rows and columns of one fp32 accumulator tile (a product's row chunks other than its last
/// are whole tiles, see `lhs_len`).
pub const T: usize = 16;
/// Columns per weight panel: two accumulator tiles side by side (as the fp32 panels).
pub const NP: usize = 2 * T;

/// Depth of one int8 tile step: a 16 x 64 byte tile of A.
pub const KT8: usize = 64;

/// Whether this process can run AMX bf16 tiles: the CPU has AMX-TILE and AMX-BF16, AVX-512 runs
/// the stores (not disabled by XCEPTION_ENGINE_NO_AVX512), the kernel granted the tile state, and
/// XCEPTION_ENGINE_NO_AMX is not set (which runs `Precision::Bf16` on `dot_available`'s
/// instructions instead, to test or measure them on an AMX machine).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // CPUID leaf 7: EDX bit 22 AMX-BF16.
    *OK.get_or_init(|| std::env::var("XCEPTION_ENGINE_NO_AMX").is_err() && tiles_granted(1 << 22))
}

/// Whether `Precision::Bf16` runs here without tiles (where `available()` is false): AVX-512
/// with AVX512-BF16, whose VDPBF16PS multiplies sixteen pairs of bf16 values into fp32 sums per
/// instruction, twice the fp32 FMA's multiply-adds (AMD Zen 4 and later, Intel "Cooper Lake").
/// Measured on a Zen 4 core: one VDPBF16PS on zmm a cycle, as one FMA on zmm. The products run
/// on the fp32 register-tile micro-kernel (`packed::gemm_rows_dot`).
pub fn dot_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| !available() && crate::packed::has_avx512() && is_x86_feature_detected!("avx512bf16"))
}

/// Whether this process can run AMX int8 tiles (AMX-INT8, CPUID leaf 7 EDX bit 25), as
/// `available` for bf16.
pub fn int8_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| tiles_granted(1 << 25))
}

/// Whether the CPU has AMX-TILE and the features in `edx` (CPUID leaf 7), AVX-512 runs the
/// stores, and the kernel grants the tile state.
fn tiles_granted(edx: u32) -> bool {
    // CPUID leaf 7: EDX bit 24 AMX-TILE.
    let cpu = crate::packed::has_avx512() && {
        let id = __cpuid_count(7, 0);
        id.edx & edx == edx && id.edx & (1 << 24) != 0
    };
    // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA (18): process-wide (asking twice is harmless),
    // fails on kernels without AMX support (before 5.16) or where a hypervisor hides the state.
    // SAFETY: a plain syscall with integer arguments.
    cpu && unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023, 18) } == 0
}

/// The tile shapes every product uses: eight 16-row x 64-byte tiles. tmm0-3 accumulate a 32 x 32
/// fp32 block, tmm4-5 hold two 16 x 32 bf16 slices of A, tmm6-7 two 16 x 16 (pair-interleaved)
/// slices of the weights.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile shapes on this thread once (the configuration is per thread and survives
/// context switches; nothing else in the process uses tiles).
fn configure_thread() {
    thread_local! {
        static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    }
    if !CONFIGURED.get() {
        let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = T as u8;
        }
        // SAFETY: a valid palette-1 configuration; `available()` was checked by the caller.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
        CONFIGURED.set(true);
    }
}

/// bf16 nearest to `v`, ties to even; NaN stays NaN (quiet).
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        ((b >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

/// The f32 a bf16 stands for.
#[inline(always)]
pub fn from_bf16(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

/// `dst[i] = bf16(src[i])` (vectorised).
pub fn round_into(src: &[f32], dst: &mut [u16]) {
    crate::kernels::simd(
        #[inline(always)]
        || dst.iter_mut().zip(src).for_each(|(d, s)| *d = to_bf16(*s)),
    )
}

/// `v` as the sum of two bf16 values: the nearest, and the nearest to what it leaves over
/// (`Precision::Bf16x3`). Together they keep 16 significant bits: |v - hi - lo| <= 2^-16 |v|.
/// Where hi is not finite (an infinity, NaN, or a value past bf16's largest) it stands alone and
/// lo is zero: what it leaves over would be an infinity or NaN that turns the sum into NaN.
#[inline(always)]
pub fn split_bf16(v: f32) -> (u16, u16) {
    let hi = to_bf16(v);
    let lo = if from_bf16(hi).is_finite() { to_bf16(v - from_bf16(hi)) } else { 0 };
    (hi, lo)
}

/// `hi[i] + lo[i]` = src[i] to 16 bits (`split_bf16`, vectorised).
pub fn split_into(src: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    crate::kernels::simd(
        #[inline(always)]
        || {
            for ((h, l), s) in hi.iter_mut().zip(lo.iter_mut()).zip(src) {
                (*h, *l) = split_bf16(*s);
            }
        },
    )
}

/// A (k x n) weight matrix in bf16, packed for the tiles: per 32-column panel and per 32-deep
/// step, two 16-column tiles of 16 rows, each row holding its columns' two consecutive k values
/// side by side (the layout TDPBF16PS multiplies). k and n are zero-padded to whole steps and
/// panels. With two pieces each panel holds the hi pieces' steps, then the lo pieces'.
/// Without tiles (`dot_available`) only the shape is here: the panels are pairs of k in the
/// `PackedB`'s own fp32 panels (`PackedB::with_precision`), and `data` is empty.
#[derive(Clone, Debug)]
pub struct PackedBf16 {
    /// k rounded up to a whole step.
    kp: usize,
    /// bf16 pieces per fp32 value, of the weights and of A (1 or 2).
    pieces: usize,
    data: Vec<u16>,
    /// Where the first panel starts in `data` (on a 64-byte boundary).
    start: usize,
    /// Whether AMX tiles run the product (else VDPBF16PS on the PackedB's pair panels).
    tiles: bool,
}

impl PackedBf16 {
    /// `weight` is (k x n) row-major. Panics where `available()` is false (callers check it
    /// first; it also obtains the tile state from the kernel, without which a tile instruction
    /// faults).
    /// `pieces`: 1 rounds each weight to bf16, 2 splits it in two (`split_bf16`).
    pub fn new(weight: &[f32], k: usize, n: usize, pieces: usize) -> PackedBf16 {
        assert!(available(), "bf16 products need AMX (check amx::available() first)");
        let kp = k.div_ceil(KT) * KT;
        let (panels, steps) = (n.div_ceil(NP), kp / KT);
        let depth = pieces * steps;
        let mut data = vec![0u16; panels * depth * KT * NP + 32];
        let start = data.as_ptr().align_offset(64);
        let packed = &mut data[start..];
        // The hi piece is the bf16 rounding itself (`split_bf16`), so one piece is the hi one.
        let piece = |v: f32, which: usize| {
            let (hi, lo) = split_bf16(v);
            if which == 0 { hi } else { lo }
        };
        for p in 0..panels {
            for which in 0..pieces {
                for s in 0..steps {
                    for half in 0..2 {
                        let tile = &mut packed[((p * depth + which * steps + s) * 2 + half) * T * KT..][..T * KT];
                        for pair in 0..T {
                            for c in 0..T {
                                let col = p * NP + half * T + c;
                                for q in 0..2 {
                                    let row = s * KT + 2 * pair + q;
                                    if row < k && col < n {
                                        tile[(pair * T + c) * 2 + q] = piece(weight[row * n + col], which);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        PackedBf16 { kp, pieces, data, start, tiles: true }
    }

    /// The shape of a one-piece bf16 matrix whose products run on VDPBF16PS (`dot_available`):
    /// k rounded up to a whole tile step as for the tiles, so that A's rows (`lhs_stride`,
    /// `lhs_len`) are laid out alike whichever runs them.
    pub(crate) fn pairs(k: usize) -> PackedBf16 {
        PackedBf16 { kp: k.div_ceil(KT) * KT, pieces: 1, data: Vec::new(), start: 0, tiles: false }
    }

    /// Whether AMX tiles run the products (else VDPBF16PS, `dot_available`).
    pub fn tiles(&self) -> bool {
        self.tiles
    }

    /// k rounded up to a whole tile step.
    pub(crate) fn kp(&self) -> usize {
        self.kp
    }

    /// bf16 pieces per fp32 value (1, or 2 for `Precision::Bf16x3`).
    pub fn pieces(&self) -> usize {
        self.pieces
    }

    /// Values of one panel: k steps once per piece.
    fn panel_len(&self) -> usize {
        self.pieces * self.kp * NP
    }

    fn panel(&self, p: usize) -> *const u16 {
        self.data[self.start + p * self.panel_len()..][..self.panel_len()].as_ptr()
    }
}

/// How many bf16 values the tiles read from an A of `m` rows at row stride `lda` (whole 16-row
/// tiles, each row a whole number of steps, per piece): a buffer must hold this many, and the
/// values past the m rows' k columns must be finite (they meet zero weights). A row in two
/// pieces holds its hi values, then its lo values one step-rounded k further on.
pub fn lhs_len(m: usize, lda: usize, k: usize, pieces: usize) -> usize {
    (m.div_ceil(T) * T - 1) * lda + pieces * k.div_ceil(KT) * KT
}

/// The row stride A gets in bf16: rows of whole steps, so every tile row is one cache line, where
/// rows do not overlap; overlapping rows (a direct conv's) keep their stride, in one piece (in
/// two each row is laid out whole).
pub fn lhs_stride(lda: usize, k: usize, pieces: usize) -> usize {
    // (An odd stride would split VDPBF16PS's pairs across rows; no conv of ours has one, as
    // dense convs of fewer than 16 input channels run in fp32.)
    if lda >= k || pieces > 1 || !lda.is_multiple_of(2) {
        pieces * k.div_ceil(KT) * KT
    } else {
        lda
    }
}

/// `len` values of `buf` starting on a 64-byte boundary (a tile row is one cache line only if
/// it starts on one).
pub fn aligned(buf: &mut Vec<u16>, len: usize) -> &mut [u16] {
    buf.resize(buf.len().max(len + 32), 0);
    let skip = buf.as_ptr().align_offset(64);
    &mut buf[skip..skip + len]
}

/// Rows `rows` of A (fp32, row stride `lda`, `k` columns used) rounded into `dst` (row stride
/// `ld16` from `lhs_stride`, indexed from row 0) in `pieces` pieces: each piece's columns past
/// k are zeroed; with overlapping rows in one piece the whole span between them is rounded
/// instead.
pub fn round_rows(a: &[f32], lda: usize, k: usize, rows: Range<usize>, dst: &mut [u16], ld16: usize, pieces: usize) {
    if ld16 == lda && lda < k {
        let (from, to) = (rows.start * lda, ((rows.end - 1) * lda + k).min(a.len()));
        round_into(&a[from..to], &mut dst[from..to]);
        return;
    }
    let kp = k.div_ceil(KT) * KT;
    for r in rows {
        let d = &mut dst[r * ld16..][..ld16];
        if pieces == 1 {
            round_into(&a[r * lda..][..k], &mut d[..k]);
        } else {
            let (hi, lo) = d.split_at_mut(kp);
            split_into(&a[r * lda..][..k], &mut hi[..k], &mut lo[..k]);
            lo[k..].fill(0);
        }
        d[k..kp].fill(0);
    }
}

/// The buffer for a bf16 left operand of `m` rows at row stride `ld16`: as many values as the
/// tiles read (`lhs_len`), from a 64-byte boundary, zero past the m rows (the caller writes the
/// rows).
pub fn lhs_buffer(buf: &mut Vec<u16>, m: usize, ld16: usize, k: usize, pieces: usize) -> &mut [u16] {
    lhs_buffer_rows(buf, m, 0..m, ld16, k, pieces)
}

/// `lhs_buffer` for m rows of which the tiles multiply only `rows`: long enough for the whole
/// tiles read from rows.start on.
pub fn lhs_buffer_rows(buf: &mut Vec<u16>, m: usize, rows: Range<usize>, ld16: usize, k: usize, pieces: usize) -> &mut [u16] {
    let a16 = aligned(buf, lhs_len(m, ld16, k, pieces).max(rows.start * ld16 + lhs_len(rows.len(), ld16, k, pieces)));
    a16[m * ld16..].fill(0);
    a16
}

/// A (m x k at row stride `lda`, fp32) rounded for the tiles into `buf`: the values and their
/// row stride. Everything `lhs_len` covers past the rounded rows is zero.
pub fn round_lhs<'b>(m: usize, a: &[f32], lda: usize, k: usize, pieces: usize, buf: &'b mut Vec<u16>) -> (&'b [u16], usize) {
    let ld16 = lhs_stride(lda, k, pieces);
    let dst = lhs_buffer(buf, m, ld16, k, pieces);
    round_rows(a, lda, k, 0..m, dst, ld16, pieces);
    (dst, ld16)
}

thread_local! {
    /// A rounded to bf16 for one `gemm_rows_f32` call on this thread.
    static LHS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// `packed::gemm_rows` for bf16 weights: rounds A into this thread's buffer, then `gemm_rows`.
///
/// # Safety
/// As `packed::gemm_rows`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows_f32(m: usize, a: &[f32], lda: usize, b: &PackedB, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue) {
    if m == 0 || panels.is_empty() {
        return;
    }
    let b16 = b.bf16().expect("bf16 weights");
    assert!(a.len() >= (m - 1) * lda + b.k, "gemm: lhs too short");
    LHS.with_borrow_mut(|buf| {
        let (a16, ld16) = round_lhs(m, a, lda, b.k, b16.pieces, buf);
        gemm_rows(m, a16, ld16, b, panels, out, ldc, epi)
    })
}

/// out[rows m, panels] = a (m x k bf16 in b's pieces, row stride `lda`, `lhs_len` values
/// readable) x b (bf16 weights) + bias (or + out with `epi.accumulate`), then the epilogue, in
/// fp32; out has row stride `ldc`. On AMX tiles, or where the matrix was packed without them, on
/// VDPBF16PS (`packed::gemm_rows_dot`).
///
/// # Safety
/// As `packed::gemm_rows`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows(m: usize, a: &[u16], lda: usize, packed: &PackedB, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue) {
    if m == 0 || panels.is_empty() {
        return;
    }
    let (k, n, bias) = (packed.k, packed.n, packed.bias());
    let b = packed.bf16().expect("bf16 weights");
    if !b.tiles {
        assert!(a.len() >= lhs_len(m, lda, k, 1), "gemm: bf16 lhs too short");
        return crate::packed::gemm_rows_dot(m, a, lda, packed, panels, out, ldc, epi);
    }
    assert!(a.len() >= lhs_len(m, lda, k, b.pieces), "gemm: bf16 lhs too short");
    assert!(b.pieces == 1 || lda >= 2 * b.kp, "gemm: a row's two pieces overlap the next row");
    assert!(b.kp == k.div_ceil(KT) * KT && bias.len() >= panels.end * NP, "gemm: weights do not match k");
    assert!(out.values() >= (m - 1) * ldc + n.min(panels.end * NP), "gemm: output too short");
    if let Some((r, ldr)) = epi.residual {
        assert!(r.len() >= (m - 1) * ldr + n.min(panels.end * NP), "gemm: residual too short");
    }
    configure_thread();
    let mut acc = [0f32; 2 * T * NP];
    let last_panel = n.div_ceil(NP) - 1;
    for p in panels {
        let (col, cols) = (p * NP, (n - p * NP).min(NP));
        let mut m0 = 0;
        while m0 < m {
            let rows = (m - m0).min(2 * T);
            // The first row block fetches the next panel into L2 as it goes (tile loads that miss
            // wait for memory: measured 5-6% faster on the whole network, paired); the others
            // point the same prefetches at the panel they read, where they cost next to nothing.
            let prefetch = if m0 == 0 && p < last_panel { b.panel(p + 1) } else { b.panel(p) };
            // The block's output lines are fetched for writing while the tiles work (as the fp32
            // micro-kernel does; measured 0.5-4% faster on the whole network, paired).
            for r in 0..rows {
                crate::packed::avx512::prefetch_row_write(out.ptr().add((m0 + r) * ldc + col));
            }
            block(a.as_ptr().add(m0 * lda), lda, (b.panel(p), b.kp / KT, b.pieces), rows > T, prefetch, acc.as_mut_ptr());
            let residual = epi.residual.map(|(r, ldr)| (r.as_ptr().add(m0 * ldr + col), ldr));
            store(&acc, rows, cols, bias.as_ptr().add(col), out.ptr().add(m0 * ldc + col), ldc, residual, epi);
            m0 += rows;
        }
    }
}

/// The asm lines that fetch one tile step of the next panel (2 KiB) into L2 through the pointer
/// operand `$p`: every other cache line, as the L2 fetches lines in pairs.
macro_rules! prefetch_step {
    ($p:literal) => {
        concat!(
            "prefetcht1 [{", $p, "}]\n",
            "prefetcht1 [{", $p, "} + 128]\n",
            "prefetcht1 [{", $p, "} + 256]\n",
            "prefetcht1 [{", $p, "} + 384]\n",
            "prefetcht1 [{", $p, "} + 512]\n",
            "prefetcht1 [{", $p, "} + 640]\n",
            "prefetcht1 [{", $p, "} + 768]\n",
            "prefetcht1 [{", $p, "} + 896]\n",
            "prefetcht1 [{", $p, "} + 1024]\n",
            "prefetcht1 [{", $p, "} + 1152]\n",
            "prefetcht1 [{", $p, "} + 1280]\n",
            "prefetcht1 [{", $p, "} + 1408]\n",
            "prefetcht1 [{", $p, "} + 1536]\n",
            "prefetcht1 [{", $p, "} + 1664]\n",
            "prefetcht1 [{", $p, "} + 1792]\n",
            "prefetcht1 [{", $p, "} + 1920]\n",
        )
    };
}

/// `$steps` tile steps of A rows at `$a` (row stride `$sa` bytes; 16 rows, or 32 with `$two`)
/// times one panel's two 16-column tiles at `$b` (rows `$sb` bytes apart, the second tile `$b1`
/// bytes after the first), accumulated into tmm0-1 (and tmm2-3 for the second 16 rows) by the
/// tile product `$dot` (TDPBF16PS, TDPBUSD); a 32-row pass also prefetches, step by step, the
/// panel at `$prefetch` into L2. Each step is 64 bytes of A's rows and 2 KiB of the panel.
macro_rules! tile_steps {
    ($dot:literal, $b1:literal; $a:expr, $sa:expr, $b:expr, $sb:expr, $steps:expr, $two:expr, $prefetch:expr) => {
        if $two {
            asm!(
                "2:",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                concat!("tileloadd tmm7, [{b} + {sb}*1 + ", $b1, "]"),
                concat!($dot, " tmm0, tmm4, tmm6"),
                "tileloadd tmm5, [{a2} + {sa}*1]",
                concat!($dot, " tmm1, tmm4, tmm7"),
                prefetch_step!("pf"),
                concat!($dot, " tmm2, tmm5, tmm6"),
                concat!($dot, " tmm3, tmm5, tmm7"),
                "add {a}, 64",
                "add {a2}, 64",
                "add {b}, 2048",
                "add {pf}, 2048",
                "dec {n}",
                "jnz 2b",
                a = inout(reg) $a => _,
                a2 = inout(reg) $a.byte_add(T * $sa) => _,
                b = inout(reg) $b => _,
                pf = inout(reg) $prefetch => _,
                n = inout(reg) $steps => _,
                sa = in(reg) $sa,
                sb = in(reg) $sb,
                options(nostack),
            );
        } else {
            asm!(
                "2:",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                concat!("tileloadd tmm7, [{b} + {sb}*1 + ", $b1, "]"),
                concat!($dot, " tmm0, tmm4, tmm6"),
                concat!($dot, " tmm1, tmm4, tmm7"),
                "add {a}, 64",
                "add {b}, 2048",
                "dec {n}",
                "jnz 2b",
                a = inout(reg) $a => _,
                b = inout(reg) $b => _,
                n = inout(reg) $steps => _,
                sa = in(reg) $sa,
                sb = in(reg) $sb,
                options(nostack),
            );
        }
    };
}

/// out[rows m, panels] = the dequantized int8 product of A (u8 rows of `ld8` bytes from
/// `int8::quantize_rows`, readable to whole 16-row tiles; their `scales`) and the int8 panels of
/// `b` (`q` their scales; k padded to whole tile steps) + bias (or + the output, accumulating),
/// then the epilogue: `int8::gemm_rows` on AMX tiles, each panel 32 rows at a time as the bf16
/// product runs. The int8 panels are already the layout TDPBUSD multiplies: a panel row holds one
/// step of four k for its 32 columns, four bytes a column, so 16 rows of one half (64 bytes at a
/// 128-byte stride) are a 64 k x 16 column tile. The sums are exact and scaled back as the AVX-512
/// VNNI kernel's are (from the same integer, the columns' corrections added after the tiles
/// instead of before), so both give the same bits.
///
/// # Safety
/// As `packed::gemm_rows`; `int8_available()` must be true.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows_i8(m: usize, a: &[u8], ld8: usize, scales: &[f32], b: &PackedB, q: &crate::int8::Scales, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue) {
    let steps = 4 * q.groups / KT8;
    assert!(steps * KT8 == 4 * q.groups && ld8 >= steps * KT8, "int8 tiles: k not in whole tile steps");
    assert!(a.len() >= (m.div_ceil(T) * T - 1) * ld8 + steps * KT8 && scales.len() >= m, "int8 tiles: lhs too short");
    configure_thread();
    let mut acc = [0i32; 2 * T * NP];
    let last_panel = b.panels() - 1;
    for p in panels {
        let (col, cols) = (p * NP, b.cols(p));
        let panel = b.panel(p).as_ptr().cast::<u8>();
        let mut m0 = 0;
        while m0 < m {
            let rows = (m - m0).min(2 * T);
            // As the bf16 product: the first row block fetches the next panel into L2, and the
            // block's output lines are fetched for writing meanwhile.
            let prefetch = if m0 == 0 && p < last_panel { b.panel(p + 1).as_ptr().cast::<u8>() } else { panel };
            for r in 0..rows {
                crate::packed::avx512::prefetch_row_write(out.ptr().add((m0 + r) * ldc + col));
            }
            block_i8(a.as_ptr().add(m0 * ld8), ld8, panel, steps, rows > T, prefetch, acc.as_mut_ptr());
            let residual = epi.residual.map(|(r, ldr)| (r.as_ptr().add(m0 * ldr + col), ldr));
            let bias = (!epi.accumulate).then(|| b.bias()[col..].as_ptr());
            store_i8(&acc, rows, cols, (&scales[m0..], &q.col[col..], &q.corr[col..]), bias, out.ptr().add(m0 * ldc + col), ldc, residual, epi.relu);
            m0 += rows;
        }
    }
}

/// Zeroes the four accumulator tiles (tmm0-3) before a block.
#[inline(always)]
unsafe fn zero_sums() {
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
}

/// Stores the four accumulator tiles, a 32 x 32 block of 4-byte sums (fp32 or i32), row-major
/// (128 bytes a row) to `acc`.
#[inline(always)]
unsafe fn store_sums(acc: *mut u8) {
    asm!(
        "tilestored [{c} + {sc}*1], tmm0",
        "tilestored [{c} + {sc}*1 + 64], tmm1",
        "tilestored [{c} + {sc}*1 + 2048], tmm2",
        "tilestored [{c} + {sc}*1 + 2112], tmm3",
        c = in(reg) acc,
        sc = in(reg) 128usize,
        options(nostack),
    );
}

/// One 32 x 32 (or, not `two`, 16 x 32) block of int8 sums: `steps` tile steps of the panel at
/// `b` times the A rows at `a` (row stride `lda` bytes), stored row-major (32 a row) to `acc`;
/// a 32-row block also prefetches, step by step, the panel at `prefetch` into L2.
#[target_feature(enable = "avx512f")]
unsafe fn block_i8(a: *const u8, lda: usize, b: *const u8, steps: usize, two: bool, prefetch: *const u8, acc: *mut i32) {
    zero_sums();
    tile_steps!("tdpbusd", "64"; a, lda, b, 128usize, steps, two, prefetch);
    store_sums(acc.cast());
}

/// A block's int8 sums to the output: plus the columns' corrections, then as the AVX-512 VNNI
/// kernel's epilogue (`avx512::dequant_row`, `finish_row`).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn store_i8(acc: &[i32; 2 * T * NP], rows: usize, cols: usize, (rs, cs, corr): (&[f32], &[f32], &[f32]), bias: Option<*const f32>, c: *mut f32, ldc: usize, residual: Option<(*const f32, usize)>, relu: bool) {
    let (m0, m1) = (lane_mask(cols), lane_mask(cols.saturating_sub(16)));
    let cols_scales = (_mm512_loadu_ps(cs.as_ptr()), _mm512_loadu_ps(cs.as_ptr().add(16)));
    let (k0, k1) = (_mm512_loadu_si512(corr.as_ptr().cast()), _mm512_loadu_si512(corr.as_ptr().add(16).cast()));
    for (r, &row_scale) in rs.iter().take(rows).enumerate() {
        let cr = c.add(r * ldc);
        let i0 = _mm512_add_epi32(_mm512_loadu_si512(acc.as_ptr().add(r * NP).cast()), k0);
        let i1 = _mm512_add_epi32(_mm512_loadu_si512(acc.as_ptr().add(r * NP + 16).cast()), k1);
        let (v0, v1) = crate::packed::avx512::dequant_row((i0, i1), cols_scales, row_scale, bias, (m0, m1), cr);
        crate::packed::avx512::finish_row(v0, v1, residual.map(|(rp, ldr)| rp.add(r * ldr)), relu, (m0, m1), cr);
    }
}

/// One 32 x 32 block (or 16 x 32 when `!two`): the panel `b` (`steps` tile steps, once per
/// product of `pieces`) times A rows at `a` (row stride `lda` values; a second piece `steps`
/// steps on), the fp32 sums stored row-major (32 a row) to `acc`. A 32-row block also prefetches
/// into L2, step by step, the panel at `prefetch` (2 KiB a step, every other line: the L2
/// fetches lines in pairs).
///
/// The accumulator tiles stay in tmm0-3 from one `asm!` to the next: nothing else in the process
/// uses tile registers, and the kernel keeps them across context switches.
#[target_feature(enable = "avx512f")]
unsafe fn block(a: *const u16, lda: usize, (b, steps, pieces): (*const u16, usize, usize), two: bool, prefetch: *const u16, acc: *mut f32) {
    zero_sums();
    let (piece_len, panel_piece) = (steps * KT, steps * 2 * T * KT);
    if pieces == 2 {
        // The three products in one pass over k: each step's tiles loaded once for all three
        // (8 KiB a step for 12 tile products, against 12 KiB product by product; the tiles come
        // from L2, which bounds these products), and the weights' hi pieces packed once, not
        // twice. Measured, xception65's bf16x3 pass at 299 (step sums, three alternations):
        // 58.4-59.8 ms, against 70.4-71.6 with only hi x hi and hi x lo sharing a pass and
        // 74.7-75.9 product by product.
        if two {
            block_steps_split((a, a.add(piece_len)), lda, (b, b.add(panel_piece)), steps, (prefetch, prefetch.add(panel_piece)));
        } else {
            block_steps_split16((a, a.add(piece_len)), lda, (b, b.add(panel_piece)), steps);
        }
    } else {
        block_steps(a, lda, b, steps, two, prefetch);
    }
    store_sums(acc.cast());
}

/// `steps` tile steps of `block` for 32 rows in two pieces: hi x lo, hi x hi, lo x hi, each
/// step's tiles loaded once (A's hi tiles serve two products, the weights' hi tiles two),
/// accumulated into tmm0-3; both weight pieces' next panels prefetched.
#[inline(always)]
unsafe fn block_steps_split((hi, lo): (*const u16, *const u16), lda: usize, (b_hi, b_lo): (*const u16, *const u16), steps: usize, (pf, pf2): (*const u16, *const u16)) {
    asm!(
        "2:",
        "tileloadd tmm4, [{a} + {sa}*1]",
        "tileloadd tmm6, [{bl} + {sb}*1]",
        "tileloadd tmm7, [{bl} + {sb}*1 + 1024]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm5, [{a2} + {sa}*1]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        prefetch_step!("pf"),
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "tileloadd tmm6, [{bh} + {sb}*1]",
        "tileloadd tmm7, [{bh} + {sb}*1 + 1024]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        prefetch_step!("pf2"),
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "tileloadd tmm4, [{l} + {sa}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{l2} + {sa}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a}, 64",
        "add {a2}, 64",
        "add {l}, 64",
        "add {l2}, 64",
        "add {bh}, 2048",
        "add {bl}, 2048",
        "add {pf}, 2048",
        "add {pf2}, 2048",
        "dec {n}",
        "jnz 2b",
        a = inout(reg) hi => _,
        a2 = inout(reg) hi.add(T * lda) => _,
        l = inout(reg) lo => _,
        l2 = inout(reg) lo.add(T * lda) => _,
        bh = inout(reg) b_hi => _,
        bl = inout(reg) b_lo => _,
        pf = inout(reg) pf => _,
        pf2 = inout(reg) pf2 => _,
        n = inout(reg) steps => _,
        sa = in(reg) lda * 2,
        sb = in(reg) 64usize,
        options(nostack),
    );
}

/// `block_steps_split` for 16 rows (tmm0-1), its sums in the same order (so a row's output does
/// not depend on the block it falls in).
#[inline(always)]
unsafe fn block_steps_split16((hi, lo): (*const u16, *const u16), lda: usize, (b_hi, b_lo): (*const u16, *const u16), steps: usize) {
    asm!(
        "2:",
        "tileloadd tmm4, [{a} + {sa}*1]",
        "tileloadd tmm6, [{bl} + {sb}*1]",
        "tileloadd tmm7, [{bl} + {sb}*1 + 1024]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm6, [{bh} + {sb}*1]",
        "tileloadd tmm7, [{bh} + {sb}*1 + 1024]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm4, [{l} + {sa}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "add {a}, 64",
        "add {l}, 64",
        "add {bh}, 2048",
        "add {bl}, 2048",
        "dec {n}",
        "jnz 2b",
        a = inout(reg) hi => _,
        l = inout(reg) lo => _,
        bh = inout(reg) b_hi => _,
        bl = inout(reg) b_lo => _,
        n = inout(reg) steps => _,
        sa = in(reg) lda * 2,
        sb = in(reg) 64usize,
        options(nostack),
    );
}

/// `steps` tile steps of `block`, accumulated into tmm0-1 (and tmm2-3 for the second 16 rows).
/// Inlined: a call for each product of each block was ~2% of a bf16 pass.
#[inline(always)]
unsafe fn block_steps(a: *const u16, lda: usize, b: *const u16, steps: usize, two: bool, prefetch: *const u16) {
    tile_steps!("tdpbf16ps", "1024"; a, lda * 2, b, 64usize, steps, two, prefetch);
}

/// The block's sums to the output: + bias (or + what the output holds), + residual, ReLU.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn store(acc: &[f32; 2 * T * NP], rows: usize, cols: usize, bias: *const f32, c: *mut f32, ldc: usize, residual: Option<(*const f32, usize)>, epi: Epilogue) {
    let (m0, m1) = (lane_mask(cols), lane_mask(cols.saturating_sub(16)));
    let (b0, b1) = (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)));
    for r in 0..rows {
        let cr = c.add(r * ldc);
        let mut v0 = _mm512_loadu_ps(acc.as_ptr().add(r * NP));
        let mut v1 = _mm512_loadu_ps(acc.as_ptr().add(r * NP + 16));
        if epi.accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cr));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cr.add(16)));
        } else {
            v0 = _mm512_add_ps(v0, b0);
            v1 = _mm512_add_ps(v1, b1);
        }
        crate::packed::avx512::finish_row(v0, v1, residual.map(|(rp, ldr)| rp.add(r * ldr)), epi.relu, (m0, m1), cr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::PackedB;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 12) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even one (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        // Two pieces keep 16 bits: 1 + 2^-12 is lost to bf16 alone, kept by hi + lo.
        let v = 1.0 + 1.0 / 4096.0;
        let (hi, lo) = split_bf16(v);
        assert_eq!((from_bf16(hi), from_bf16(hi) + from_bf16(lo)), (1.0, v));
        let v = -std::f32::consts::PI;
        let (hi, lo) = split_bf16(v);
        assert!(((from_bf16(hi) + from_bf16(lo)) as f64 - v as f64).abs() <= v.abs() as f64 / 65536.0);
        assert!(from_bf16(to_bf16(f32::from_bits(0x7fff_ffff))).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        // Infinities (and what rounds to one) keep their value in two pieces: hi alone, lo zero,
        // so hi + lo is not inf - inf.
        for v in [f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::MAX] {
            let (hi, lo) = split_bf16(v);
            assert_eq!((from_bf16(hi), lo), (v.signum() * f32::INFINITY, 0), "{v}");
        }
        let (hi, lo) = split_bf16(f32::NAN);
        assert!(from_bf16(hi).is_nan() && lo == 0);
    }

    /// Against an f64 product of the same bf16-rounded operands: what is left is only the order
    /// of the fp32 sums, bounded relative to the sum of the products' magnitudes. In bf16x3,
    /// against the f64 product of the fp32 operands themselves: each product within 3 x 2^-16
    /// of its magnitude (the pieces' error twice, the lo x lo term left out), where bf16 is
    /// off by up to 2^-8. On AMX tiles, or without them on VDPBF16PS (bf16 only; also on an
    /// AMX machine under XCEPTION_ENGINE_NO_AMX).
    #[test]
    fn tile_product_matches_the_rounded_operands_product() {
        use crate::packed::Precision;
        let precisions = crate::bf16_precisions();
        if precisions.is_empty() {
            eprintln!("skipped: this CPU or kernel has no bf16 products");
            return;
        }
        // (m, k, n, lda): ragged rows (1, 17, 33), k not a whole step, ragged panels, rows that
        // overlap (lda < k, as a direct conv reads its input lines; an odd stride too), and k
        // past one k block of the register tiles (KC pairs).
        let cases = [(1, 1, 1, 1), (17, 27, 32, 30), (33, 96, 45, 32), (20, 64, 40, 32), (9, 30, 20, 15), (50, 728, 97, 728), (64, 300, 64, 303), (5, 2048, 33, 2048), (13, 3100, 35, 3100)];
        for (&(m, k, n, lda), &precision) in cases.iter().flat_map(|c| precisions.iter().map(move |p| (c, p))) {
            let a = values((m - 1) * lda + k, 1);
            let w = values(k * n, 2);
            let bias = values(n, 3);
            let res = values(m * n, 4);
            let prior = values(m * n, 5);
            let b = PackedB::with_precision(&w, &bias, k, n, precision);
            let split = precision == Precision::Bf16x3;
            let r = |v: f32| if split { v as f64 } else { from_bf16(to_bf16(v)) as f64 };
            let tolerance = if split { 3.0 / 65536.0 } else { 0.0 };
            for (residual, relu, accumulate) in [(false, false, false), (true, true, false), (false, false, true), (true, true, true)] {
                let ldc = n + 1;
                let mut out = vec![7.5f32; m * ldc];
                for i in 0..m {
                    out[i * ldc..][..n].copy_from_slice(&prior[i * n..][..n]);
                }
                let epi = Epilogue { residual: residual.then_some((&res[..], n)), relu, accumulate, ..Epilogue::PLAIN };
                unsafe { crate::packed::gemm_rows(m, &a, lda, &b, 0..b.panels(), SharedOut::new(&mut out), ldc, epi) };
                for i in 0..m {
                    assert_eq!(out[i * ldc + n], 7.5, "column past the end written ({m}x{k}x{n})");
                    for j in 0..n {
                        let (mut s, mut mag) = (0f64, 0f64);
                        for p in 0..k {
                            let t = r(a[i * lda + p]) * r(w[p * n + j]);
                            s += t;
                            mag += t.abs();
                        }
                        let mut e = s + if accumulate { prior[i * n + j] as f64 } else { bias[j] as f64 };
                        if residual {
                            e += res[i * n + j] as f64;
                        }
                        if relu {
                            e = e.max(0.0);
                        }
                        let g = out[i * ldc + j] as f64;
                        assert!((g - e).abs() <= tolerance * mag + 1e-6 * (mag + 4.0), "{precision:?} ({m}x{k}x{n}, lda {lda}) [{i},{j}] {g} vs {e}");
                    }
                }
            }
        }
    }
}
