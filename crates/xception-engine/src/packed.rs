//! The engine's matrix product: every conv that is a GEMM (1x1 pointwise convs, the 1x1
//! shortcut projections, the im2col'd dense convs) multiplies activation rows (pixels x
//! channels, read in place) by a weight matrix packed once at load time into 32-column panels.
//!
//! With AVX-512 a 12x32 register-tile micro-kernel runs it, with AVX2 (no AVX-512) a 6x16 one
//! over half a panel at a time (their k loops in assembly, `k_loop`); both apply the bias, the
//! residual add and ReLU as the tile is stored, so each output value is written once. On other
//! CPUs each panel goes through the `gemm` crate and the epilogue runs as a second pass over the
//! tile.
//! In bf16 (`Precision::Bf16`) the weights are packed for AMX tiles instead and `amx` runs the
//! product with the same epilogue; without tiles (AVX512-BF16) the panels hold pairs of bf16
//! weights, one per 32-bit value, and the AVX-512 micro-kernel runs them with VDPBF16PS
//! (`gemm_rows_dot`). In int8 (`Precision::Int8`) the panels hold bytes, four k to
//! a 32-bit value, and the same micro-kernels run them with integer instructions, or AMX tiles
//! do (`int8`).

use std::ops::Range;

/// Columns per packed panel (two AVX-512 vectors).
pub const NR: usize = 32;
/// Rows per micro-kernel tile.
pub const MR: usize = 12;

/// The arithmetic of the engine's products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// fp32 throughout (the default; matches Keras and timm to float precision).
    #[default]
    F32,
    /// The products' operands rounded to bfloat16, sums in fp32, on AMX tiles (`amx`), or with
    /// AVX512-BF16 alone on VDPBF16PS (`gemm_rows_dot`); the depthwise convs, norms, pools and
    /// the classifier stay fp32 (the stem's too, without tiles).
    Bf16,
    /// As `Bf16`, but each fp32 operand split into two bf16 values (hi + lo, 16 significant
    /// bits) and multiplied as hi x hi + hi x lo + lo x hi: three tile products for one, each
    /// product within 2^-16 of fp32's (what PyTorch's `set_float32_matmul_precision("high")`
    /// describes as treating a float32 as the sum of two bfloat16 numbers).
    Bf16x3,
    /// The 1x1 convs' products in int8 (`int8`): each weight column scaled to [-127, 127] once,
    /// at load (to [-63, 63] on CPUs without VNNI), each row of activations as it is multiplied
    /// (its own scale, from its largest value), exact 32-bit integer sums (TDPBUSD on AMX tiles,
    /// VPDPBUSD with AVX-512 VNNI or AVX-VNNI, else VPMADDUBSW), then scaled back to fp32. The
    /// dense k x k convs (the stem), depthwise convs, norms, pools and the classifier stay fp32.
    Int8,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "f32" | "fp32" => Some(Precision::F32),
            "bf16" => Some(Precision::Bf16),
            "bf16x3" => Some(Precision::Bf16x3),
            "int8" => Some(Precision::Int8),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Bf16x3 => "bf16x3",
            Precision::Int8 => "int8",
        }
    }

    /// bf16 pieces per fp32 operand of a product (0: the product is not bf16).
    pub fn pieces(self) -> usize {
        match self {
            Precision::F32 | Precision::Int8 => 0,
            Precision::Bf16 => 1,
            Precision::Bf16x3 => 2,
        }
    }
}

/// A (k x n) weight matrix with its bias, packed as `panels` consecutive (k x NR) row-major
/// blocks, the last one zero-padded; or, in bf16, in the AMX tile layout.
#[derive(Clone, Debug)]
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    /// Rows of each panel: k in fp32, k's groups of four in int8.
    steps: usize,
    /// The fp32 panels (empty in bf16), from `start`; in int8 each value holds four weights'
    /// bytes.
    data: Vec<f32>,
    /// Where the panels start in `data`: on a 64-byte boundary where the allocator allowed
    /// (`line_aligned`).
    start: usize,
    /// In int8, the columns' scales and sum corrections.
    #[cfg(target_arch = "x86_64")]
    int8: Option<crate::int8::Scales>,
    #[cfg(target_arch = "x86_64")]
    bf16: Option<crate::amx::PackedBf16>,
    /// `n` values, zero-padded to a whole panel.
    bias: Vec<f32>,
}

/// A zeroed buffer for `len` values, and where in it they start: on a 64-byte boundary, whatever
/// the allocator gives (a clone may lose it, which costs speed only). Rows of AMX tiles that cross
/// cache lines load ~3x slower (int8 products, one thread, 361x768x728: 0.42 ms against 0.18 with
/// both operands aligned; the `xception` binary's allocator aligns large blocks anyway, a Rust
/// program using the library need not register it).
fn line_aligned(len: usize) -> (Vec<f32>, usize) {
    let data = vec![0f32; len + 15];
    let start = data.as_ptr().align_offset(64).min(15);
    (data, start)
}

/// `bias` (n values) zero-padded to whole panels.
fn padded_bias(bias: &[f32], n: usize) -> Vec<f32> {
    let mut padded = bias.to_vec();
    padded.resize(n.div_ceil(NR) * NR, 0.0);
    padded
}

impl PackedB {
    /// `weight` is (k x n) row-major.
    pub fn new(weight: &[f32], bias: &[f32], k: usize, n: usize) -> PackedB {
        PackedB::with_precision(weight, bias, k, n, Precision::F32)
    }

    /// In bf16 only the tile layout is kept, or without tiles the pair panels (callers check
    /// `lib::bf16_available()`, and `bf16x3_available()` for two pieces, first); in int8 the
    /// int8 panels (callers check `int8::available()`), or fp32 ones past `int8::MAX_K`.
    pub fn with_precision(weight: &[f32], bias: &[f32], k: usize, n: usize, precision: Precision) -> PackedB {
        assert_eq!(weight.len(), k * n, "weight shape");
        assert_eq!(bias.len(), n, "bias shape");
        #[cfg(target_arch = "x86_64")]
        if precision == Precision::Int8 && k <= crate::int8::MAX_K {
            let q = crate::int8::kernel();
            return PackedB::quantized(weight, bias, k, n, q.map_or(127, |q| q.levels()), q.map_or(16, |q| q.k_align()));
        }
        let panels = n.div_ceil(NR);
        let padded = padded_bias(bias, n);
        #[cfg(target_arch = "x86_64")]
        if precision.pieces() > 0 && !crate::amx::dot_available() {
            return PackedB { k, n, steps: 0, data: Vec::new(), start: 0, int8: None, bf16: Some(crate::amx::PackedBf16::new(weight, k, n, precision.pieces())), bias: padded };
        }
        #[cfg(target_arch = "x86_64")]
        if precision.pieces() > 0 {
            // VDPBF16PS: panels as the fp32 ones, each value a pair of consecutive k in bf16 (the
            // even k in the low half), as A's rows hold them; k zero-padded to whole tile steps.
            assert_eq!(precision, Precision::Bf16, "bf16x3 products need AMX tiles (check lib::bf16x3_available() first)");
            let shape = crate::amx::PackedBf16::pairs(k);
            let steps = shape.kp() / 2;
            let (mut data, start) = line_aligned(panels * steps * NR);
            let at = |row: usize, col: usize| if row < k { crate::amx::to_bf16(weight[row * n + col]) as u32 } else { 0 };
            for p in 0..panels {
                for col in p * NR..n.min((p + 1) * NR) {
                    for step in 0..steps {
                        data[start + (p * steps + step) * NR + col - p * NR] = f32::from_bits(at(2 * step, col) | at(2 * step + 1, col) << 16);
                    }
                }
            }
            return PackedB { k, n, steps, data, start, int8: None, bf16: Some(shape), bias: padded };
        }
        assert!(precision == Precision::F32 || cfg!(target_arch = "x86_64"), "bf16 and int8 products need x86-64");
        let (mut data, start) = line_aligned(panels * k * NR);
        for p in 0..panels {
            let cols = (n - p * NR).min(NR);
            for row in 0..k {
                data[start + (p * k + row) * NR..][..cols].copy_from_slice(&weight[row * n + p * NR..][..cols]);
            }
        }
        PackedB {
            k,
            n,
            steps: k,
            data,
            start,
            #[cfg(target_arch = "x86_64")]
            int8: None,
            #[cfg(target_arch = "x86_64")]
            bf16: None,
            bias: padded,
        }
    }

    /// int8 panels of `levels` a side, k padded to a multiple of `k_align` (`int8::pack`).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn quantized(weight: &[f32], bias: &[f32], k: usize, n: usize, levels: i32, k_align: usize) -> PackedB {
        let (packed, scales) = crate::int8::pack(weight, k, n, levels, k_align);
        let (mut data, start) = line_aligned(packed.len());
        data[start..][..packed.len()].copy_from_slice(&packed);
        PackedB { k, n, steps: scales.groups, data, start, int8: Some(scales), bf16: None, bias: padded_bias(bias, n) }
    }

    /// Whether the products run in bf16 (AMX).
    pub fn is_bf16(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.bf16.is_some();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Whether the products run in int8.
    pub fn is_int8(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.int8.is_some();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Whether the products run so much faster than fp32 (bf16 on AMX tiles; int8 with VNNI or
    /// AMX, four times the fp32 rate or more) that a layer's output going to memory and back costs more than the
    /// lines two workers both make when layers are fused (`kernels::pool_fusion_pays`,
    /// `chain::chain_pays`). int8 without VNNI runs at twice the fp32 rate and fuses as fp32.
    /// bf16 on VDPBF16PS (also twice the fp32 rate, AMD Zen 4) fuses as on tiles: xception 299,
    /// two threads, ten alternations, medians 48.9 -> 47.1 ms; xception65 four, 87.6 -> 80.0
    /// (2026-12-07).
    pub fn outruns_memory(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.bf16.is_some() || self.int8.is_some() && crate::int8::kernel().is_some_and(crate::int8::Int8Kernel::vnni);
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The columns' scales, for an int8 matrix.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn int8(&self) -> Option<&crate::int8::Scales> {
        self.int8.as_ref()
    }

    /// The bf16 tile layout, for a bf16 matrix.
    #[cfg(target_arch = "x86_64")]
    pub fn bf16(&self) -> Option<&crate::amx::PackedBf16> {
        self.bf16.as_ref()
    }

    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// Bytes of the weights and bias as the products read them (bf16 weights: two a value, four
    /// in bf16x3's two pieces; int8 one).
    pub fn bytes(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        let per_weight = if self.int8.is_some() { 1 } else { self.bf16.as_ref().map_or(4, |b| 2 * b.pieces()) };
        #[cfg(not(target_arch = "x86_64"))]
        let per_weight = 4;
        (self.k * self.n * per_weight + self.n * 4) as u64
    }

    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    pub(crate) fn panel(&self, p: usize) -> &[f32] {
        &self.data[self.start + p * self.steps * NR..][..self.steps * NR]
    }

    /// Valid columns of panel `p`.
    pub(crate) fn cols(&self, p: usize) -> usize {
        (self.n - p * NR).min(NR)
    }
}

/// What happens to each output value as it is stored: `+ residual` (same layout as the output,
/// row stride `ld`), then ReLU. With `accumulate` the product is added to what the output
/// already holds instead of to the bias (a conv made of several products, one per kernel row).
/// And what the product fetches for the caller meanwhile (`ahead`).
#[derive(Clone, Copy)]
pub struct Epilogue<'a> {
    pub residual: Option<(&'a [f32], usize)>,
    pub relu: bool,
    pub accumulate: bool,
    /// Values the caller reads next (the next band's input), then the output values it writes
    /// next (their first stores would miss), fetched into L2 while the tiles run.
    pub ahead: Fetch<'a>,
    pub writes: Fetch<'a>,
}

impl Epilogue<'_> {
    /// Bias added, nothing else.
    pub const PLAIN: Epilogue<'static> = Epilogue { residual: None, relu: false, accumulate: false, ahead: Fetch::NONE, writes: Fetch::NONE };
}

/// A run of values to prefetch, by address only: they are never read through it, so it may
/// name memory another thread is writing (an output line the next task fills).
#[derive(Clone, Copy)]
pub struct Fetch<'a> {
    from: *const f32,
    len: usize,
    _values: std::marker::PhantomData<&'a [f32]>,
}

impl<'a> Fetch<'a> {
    pub const NONE: Fetch<'static> = Fetch { from: std::ptr::null(), len: 0, _values: std::marker::PhantomData };

    pub fn of(values: &'a [f32]) -> Fetch<'a> {
        Fetch { from: values.as_ptr(), len: values.len(), _values: std::marker::PhantomData }
    }

    /// The `len` values from `at` on in the output matrix `out`.
    pub fn output(out: SharedOut, at: usize, len: usize) -> Fetch<'a> {
        assert!(at + len <= out.len, "prefetch past the output");
        // SAFETY: within the allocation (checked above).
        Fetch { from: unsafe { out.ptr.add(at) }, len, _values: std::marker::PhantomData }
    }

    pub fn len(self) -> usize {
        self.len
    }

    pub fn is_empty(self) -> bool {
        self.len == 0
    }

    /// Share `i` of `parts` equal shares of this run (the last one shorter), for `parts`
    /// products that fetch it between them.
    pub fn share(self, i: usize, parts: usize) -> Fetch<'a> {
        let size = self.len.div_ceil(parts);
        let (start, end) = ((i * size).min(self.len), ((i + 1) * size).min(self.len));
        Fetch { from: self.from.wrapping_add(start), len: end.saturating_sub(start), _values: std::marker::PhantomData }
    }
}

// SAFETY: a Fetch only hands addresses to prefetch instructions, which never fault and read
// nothing the program sees.
unsafe impl Send for Fetch<'_> {}
unsafe impl Sync for Fetch<'_> {}

/// An output matrix shared by the tasks of one parallel GEMM, each writing its own rows and
/// panels.
#[derive(Clone, Copy)]
pub struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint (row range x panel range) rectangles (see `gemm_rows`'s callers).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn new(out: &mut [f32]) -> SharedOut {
        SharedOut { ptr: out.as_mut_ptr(), len: out.len() }
    }

    pub fn ptr(self) -> *mut f32 {
        self.ptr
    }

    /// Values from `ptr` to the end of the matrix.
    pub fn values(self) -> usize {
        self.len
    }

    /// The same matrix from value `at` on.
    pub fn offset(self, at: usize) -> SharedOut {
        assert!(at <= self.len, "output offset");
        // SAFETY: within the allocation (checked above).
        SharedOut { ptr: unsafe { self.ptr.add(at) }, len: self.len - at }
    }
}

/// Which micro-kernel runs the fp32 products on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// 12x32 tiles in AVX-512 registers.
    Avx512,
    /// 6x16 tiles in AVX2 registers (x86-64 without AVX-512: most AMD Zen 2/3 and older Intel).
    Avx2,
    /// The `gemm` crate per panel, the epilogue as a second pass (other CPUs).
    Portable,
}

/// The fp32 micro-kernel for this CPU: AVX-512F+FMA, else AVX2+FMA, else the portable path.
/// `XCEPTION_ENGINE_NO_AVX512` set in the environment skips AVX-512 (every AVX-512 kernel of the
/// engine), which is how an AVX2-only machine is measured and tested on an AVX-512 one.
pub(crate) fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let fma = is_x86_feature_detected!("fma");
            if fma && is_x86_feature_detected!("avx512f") && std::env::var("XCEPTION_ENGINE_NO_AVX512").is_err() {
                Kernel::Avx512
            } else if fma && is_x86_feature_detected!("avx2") {
                Kernel::Avx2
            } else {
                Kernel::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Kernel::Portable
}

/// Whether the AVX-512 kernels run (AVX-512F and FMA, unless XCEPTION_ENGINE_NO_AVX512 is set).
pub fn has_avx512() -> bool {
    kernel() == Kernel::Avx512
}

/// out[rows m, panels] = a (m x k, row stride `lda`) x b + bias, then the epilogue; out has row
/// stride `ldc`. Runs on the calling thread.
///
/// # Safety
/// `out` must be valid for writes of rows `0..m`, columns `panels * NR` (clipped to `b.n`) at row
/// stride `ldc`, and no other thread may touch that rectangle meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows(m: usize, a: &[f32], lda: usize, b: &PackedB, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue) {
    gemm_rows_on(kernel(), m, a, lda, b, panels, out, ldc, epi)
}

/// `gemm_rows` with the given micro-kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows_on(kernel: Kernel, m: usize, a: &[f32], lda: usize, b: &PackedB, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue) {
    if m == 0 || panels.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if b.int8.is_some() {
        // int8 matrices run on the int8 kernel for this CPU (which `kernel` does not name).
        return crate::int8::gemm_rows_f32(crate::int8::kernel().expect("int8 kernel"), m, a, lda, b, panels, out, ldc, epi);
    }
    #[cfg(target_arch = "x86_64")]
    if b.bf16.is_some() {
        return crate::amx::gemm_rows_f32(m, a, lda, b, panels, out, ldc, epi);
    }
    assert!(a.len() >= (m - 1) * lda + b.k, "gemm: lhs too short");
    assert!(out.len >= (m - 1) * ldc + b.n.min(panels.end * NR), "gemm: output too short");
    if let Some((r, ldr)) = epi.residual {
        assert!(r.len() >= (m - 1) * ldr + b.n.min(panels.end * NR), "gemm: residual too short");
    }
    #[cfg(target_arch = "x86_64")]
    match kernel {
        Kernel::Avx512 => return tiles(m, a, lda, b, panels, out, ldc, epi, (avx512::KC, MR, NR), None, |t| avx512::tile(t)),
        Kernel::Avx2 => return tiles(m, a, lda, b, panels, out, ldc, epi, (avx2::KC, avx2::MR, avx2::NR), None, |t| avx2::tile(t)),
        Kernel::Portable => {}
    }
    // One tile of the panel's width: the product, then the epilogue as a second pass.
    let mut tile = vec![0f32; m * NR];
    for p in panels {
        let (col, cols) = (p * NR, b.cols(p));
        for (r, row) in tile.chunks_mut(NR).enumerate() {
            if epi.accumulate {
                row[..cols].copy_from_slice(std::slice::from_raw_parts(out.ptr.add(r * ldc + col), cols));
            } else {
                row.copy_from_slice(&b.bias[col..col + NR]);
            }
        }
        crate::kernels::gemm(m, NR, b.k, a, lda, b.panel(p), &mut tile, true, 1);
        for (r, src) in tile.chunks(NR).enumerate() {
            let dst = std::slice::from_raw_parts_mut(out.ptr.add(r * ldc + col), cols);
            for (j, (d, s)) in dst.iter_mut().zip(src).enumerate() {
                let mut v = *s;
                if let Some((res, ldr)) = epi.residual {
                    v += res[r * ldr + col + j];
                }
                *d = if epi.relu { v.max(0.0) } else { v };
            }
        }
    }
}

/// `amx::gemm_rows` without tiles (`amx::dot_available`): A's bf16 rows (row stride `lda16`,
/// even, `amx::lhs_len` values readable) taken as pairs, one 32-bit value each, through the fp32
/// register tiles (`tiles`), with VDPBF16PS for the FMA; the sums, bias, residual and ReLU are
/// fp32 as there, k blocks included (their partial sums are exact in the output).
///
/// # Safety
/// As `gemm_rows`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows_dot(m: usize, a: &[u16], lda16: usize, b: &PackedB, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue) {
    assert!(lda16.is_multiple_of(2) && (a.as_ptr() as usize).is_multiple_of(4), "gemm: bf16 pairs across 32-bit values");
    assert!(b.steps.is_multiple_of(4), "gemm: bf16 pairs not in whole rounds of four");
    assert!(out.len >= (m - 1) * ldc + b.n.min(panels.end * NR), "gemm: output too short");
    if let Some((r, ldr)) = epi.residual {
        assert!(r.len() >= (m - 1) * ldr + b.n.min(panels.end * NR), "gemm: residual too short");
    }
    let pairs = std::slice::from_raw_parts(a.as_ptr().cast::<f32>(), a.len() / 2);
    tiles(m, pairs, lda16 / 2, b, panels, out, ldc, epi, (avx512::KC, MR, NR), None, |t| avx512::tile_dot(t))
}

/// One register tile's work: `rows` rows of A (row stride `lda`) times `k` rows of a packed
/// panel slice, into `cols` valid columns of C (row stride `ldc`).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub rows: usize,
    pub k: usize,
    pub a: *const f32,
    pub lda: usize,
    pub b: *const f32,
    pub c: *mut f32,
    pub ldc: usize,
    pub step: Step,
    pub cols: usize,
    /// Lines of the next panel to fetch into L2 while this tile runs (`Ahead`).
    pub ahead: Ahead,
    /// Lines of the caller's next values (`Epilogue::ahead`) to fetch meanwhile.
    pub extra: Ahead,
}

/// Cache lines to prefetch into L2 while a micro-kernel runs (`Bursts`): the weights the next
/// panel's tiles will read, shared out between the current panel's tiles (or the caller's next
/// values, `Epilogue::ahead`, shared out between all the tiles of a product). Weights come from
/// memory (a pass streams ~90 MB of them) and the hardware prefetchers do not run a panel ahead,
/// so a panel's first row tile would wait for each line in turn: a 361x728x728 product whose
/// weights were not in cache ran 13-24% slower than with hot ones (one thread, 2026-12-06). With
/// this, the whole pass (two threads, seven alternations with it switched off) ran 4% faster with
/// AVX-512 (98.8 against 102.9 ms mean) and 5% with AVX2 (144.7 against 152.0).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Ahead {
    pub from: *const i8,
    pub lines: usize,
}

#[cfg(target_arch = "x86_64")]
impl Ahead {
    pub const NONE: Ahead = Ahead { from: std::ptr::null(), lines: 0 };
}

/// Issues `ahead`'s prefetches in bursts of at most BURST lines (a few fill buffers) spread
/// over a micro-kernel's k loop: the loop runs in chunks, each after one burst, so the loop body
/// itself has no prefetch bookkeeping.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Bursts {
    /// The two streams, fetched one after the other: the next panel's weights, then the
    /// caller's next values.
    streams: [Ahead; 2],
    /// k steps per chunk (a multiple of four: the kernels take four k steps a round).
    chunk: usize,
}

#[cfg(target_arch = "x86_64")]
impl Bursts {
    const BURST: usize = 8;

    #[inline(always)]
    pub fn new(ahead: Ahead, extra: Ahead, k: usize) -> Bursts {
        let bursts = (ahead.lines + extra.lines).div_ceil(Self::BURST).max(1);
        Bursts { streams: [ahead, extra], chunk: ((k / bursts) & !3).max(4) }
    }

    /// Issues the next burst for the k loop at step `p` of `k` (with a round of four steps
    /// left: p + 4 <= k); returns how many rounds the loop's next chunk runs, at least one
    /// (chunks are whole rounds; after the last burst, all the rounds left).
    #[inline(always)]
    pub unsafe fn rounds(&mut self, p: usize, k: usize) -> usize {
        let rounds = (self.issue(p, k) - p) / 4;
        // A count of zero would run the assembly loop (dec, jnz) 2^64 times.
        assert!(rounds > 0, "k loop: no round left at {p} of {k}");
        rounds
    }

    /// Issues the next burst; returns where the k loop's next chunk ends (`k` after the last).
    #[inline(always)]
    unsafe fn issue(&mut self, p: usize, k: usize) -> usize {
        let s = if self.streams[0].lines > 0 { &mut self.streams[0] } else { &mut self.streams[1] };
        let n = s.lines.min(Self::BURST);
        for i in 0..n {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(s.from.add(64 * i));
        }
        s.from = s.from.add(64 * n);
        s.lines -= n;
        if self.streams[0].lines + self.streams[1].lines == 0 {
            k
        } else {
            (p + self.chunk).min(k)
        }
    }
}

/// The register-tile loops shared by the SIMD micro-kernels: equal blocks of at most `kc` along
/// k; within a block every row tile (`mr` rows) passes over one `nr`-column slice of a panel
/// (which stays in cache) before the next slice; the tiles' partial sums go back to the output
/// between blocks, and the epilogue runs after the last one. A panel's tiles share out the
/// prefetch of the next panel's block, and all the tiles that of `epi.ahead` (`Ahead`).
/// In int8 (`row_scales`, the rows' scales) `a` holds the rows' bytes, four to a value, and the
/// panels' steps are groups of four k; the sums stay in registers over all of k (one block).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tiles(m: usize, a: &[f32], lda: usize, b: &PackedB, panels: Range<usize>, out: SharedOut, ldc: usize, epi: Epilogue, (kc_max, mr, nr): (usize, usize, usize), row_scales: Option<&[f32]>, tile: impl Fn(Tile)) {
    let steps = b.steps;
    // Blocks of whole rounds of four steps (the k loop's; bf16 pairs have no single steps).
    let kc_even = steps.div_ceil(steps.div_ceil(kc_max)).next_multiple_of(4);
    // The caller's next values, shared out between every tile of the product.
    let regions = [epi.ahead, epi.writes].map(|f| (f.from as *const i8, f.len() * 4 / 64));
    let extra_total = regions[0].1 + regions[1].1;
    let extra_per_tile = extra_total.div_ceil(steps.div_ceil(kc_even) * panels.len() * (NR / nr) * m.div_ceil(mr));
    let mut extra_done = 0;
    let mut k0 = 0;
    while k0 < steps {
        let kc = (steps - k0).min(kc_even);
        let (first, last) = (k0 == 0, k0 + kc == steps);
        for p in panels.clone() {
            // The next panel's block: kc rows of NR values, two lines each; the last panel has none.
            let next = (p + 1 < b.panels()).then(|| b.panel(p + 1)[k0 * NR..].as_ptr() as *const i8);
            let total = if next.is_some() { kc * NR * 4 / 64 } else { 0 };
            let slices = b.cols(p).div_ceil(nr).min(NR / nr);
            let per_tile = total.div_ceil(slices * m.div_ceil(mr));
            let mut fetched = 0;
            for slice in 0..NR / nr {
                let col = p * NR + slice * nr;
                let cols = b.cols(p).saturating_sub(slice * nr).min(nr);
                if cols == 0 {
                    break;
                }
                let panel = &b.panel(p)[k0 * NR + slice * nr..];
                let mut m0 = 0;
                while m0 < m {
                    let rows = tile_rows(m, mr, m0);
                    let lines = per_tile.min(total - fetched);
                    let ahead = match next {
                        Some(from) if lines > 0 => Ahead { from: from.add(fetched * 64), lines },
                        _ => Ahead::NONE,
                    };
                    fetched += lines;
                    // This tile's share, within one region: a share that would run from the
                    // first region into the second stops at the first one's end (so the last
                    // few lines of the second may go unfetched, which is harmless).
                    let (region, at) = if extra_done < regions[0].1 { (regions[0], extra_done) } else { (regions[1], extra_done - regions[0].1) };
                    let extra_lines = extra_per_tile.min(extra_total - extra_done).min(region.1 - at);
                    let extra = Ahead { from: region.0.wrapping_add(at * 64), lines: extra_lines };
                    extra_done += extra_lines;
                    let step = Step {
                        start: match (b.int8(), first && !epi.accumulate) {
                            // int8 sums start from the columns' zero-point corrections.
                            (Some(q), _) => Start::Bias(q.corr[col..].as_ptr()),
                            (None, true) => Start::Bias(b.bias[col..].as_ptr()),
                            (None, false) => Start::Partial,
                        },
                        residual: if last { epi.residual.map(|(r, ldr)| (r.as_ptr().add(m0 * ldr + col), ldr)) } else { None },
                        relu: last && epi.relu,
                        dequant: match (row_scales, b.int8()) {
                            (Some(rows), Some(q)) => Some(Dequant { rows: rows[m0..].as_ptr(), cols: q.col[col..].as_ptr(), bias: (!epi.accumulate).then(|| b.bias[col..].as_ptr()) }),
                            _ => None,
                        },
                    };
                    let (a, c) = (a.as_ptr().add(m0 * lda + k0), out.ptr.add(m0 * ldc + col));
                    tile(Tile { rows, k: kc, a, lda, b: panel.as_ptr(), c, ldc, step, cols, ahead, extra });
                    m0 += rows;
                }
            }
        }
        k0 += kc;
    }
}

/// Rows of the row tile that starts at row `m0` of `m`: the tiles of a panel slice are as even
/// as `mr` allows (361 rows: 20 of 12 and 11 of 11, not 30 of 12 and one of 1), since a tile of
/// a row or two waits on the multiply-add latency instead of the units. One thread, best of 20:
/// 25x728x728 0.198-0.199 -> 0.188-0.189 ms, 37x256x728 0.095 -> 0.092, 100x1536x2048 2-3%
/// faster, the others even (2026-12-06).
#[cfg(target_arch = "x86_64")]
fn tile_rows(m: usize, mr: usize, m0: usize) -> usize {
    let tiles = m.div_ceil(mr);
    let (base, longer) = (m / tiles, m % tiles);
    // The first `longer` tiles have base + 1 rows.
    if m0 < longer * (base + 1) {
        base + 1
    } else {
        base
    }
}

/// What the accumulators of a register tile start from.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) enum Start {
    /// The bias (the first block along k).
    Bias(*const f32),
    /// The partial sums already in the output.
    Partial,
}

/// One k-block's work on a register tile: where it starts and what happens at the store.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Step {
    pub start: Start,
    pub residual: Option<(*const f32, usize)>,
    pub relu: bool,
    /// An int8 tile's way back to fp32.
    pub dequant: Option<Dequant>,
}

/// How an int8 tile's 32-bit integer sums become fp32 outputs: sum x its row's scale x its
/// column's scale, + the bias (or, accumulating, + what the output holds).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Dequant {
    /// The tile's first row's scale (one per row).
    pub rows: *const f32,
    /// The tile's first column's scale (padded to whole panels).
    pub cols: *const f32,
    pub bias: Option<*const f32>,
}

/// PREFETCHW: fetches the line for writing (exclusive), so the store finds it owned.
/// (`_mm_prefetch` with a write hint needs the unstable `prfchw` target feature.) Prefetches
/// never fault, so lines past the matrix are harmless.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn prefetch_write(p: *const i8) {
    std::arch::asm!("prefetchw [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly));
}

/// The AVX-512 lane mask of the first `lanes` of sixteen lanes (all of them from 16 on).
#[cfg(target_arch = "x86_64")]
pub(crate) fn lane_mask(lanes: usize) -> u16 {
    if lanes >= 16 {
        0xffff
    } else {
        ((1u32 << lanes) - 1) as u16
    }
}

/// The micro-kernels' multiply-adds (their `DOT` parameter): fp32 FMA; int8 with VNNI
/// (VPDPBUSD); int8 with AVX2 or AVX-512BW alone (VPMADDUBSW, VPMADDWD, VPADDD: `mac`).
#[cfg(target_arch = "x86_64")]
const FMA: u8 = 0;
#[cfg(target_arch = "x86_64")]
const VNNI: u8 = 1;
#[cfg(target_arch = "x86_64")]
const MADD: u8 = 2;
#[cfg(target_arch = "x86_64")]
const BF16: u8 = 3;

/// Runs the micro-kernel `$kernel::<R>` (one monomorphised kernel per row count R) on the tile
/// `$t`.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($t:expr, $kernel:ident, $($r:literal)*) => {{
        let Tile { rows, k, a, lda, b, c, ldc, step, cols, ahead, extra } = $t;
        match rows {
            $($r => $kernel::<$r>(k, a, lda, b, c, ldc, step, cols, ahead, extra),)*
            _ => unreachable!("tile rows"),
        }
    }};
    ($t:expr, $kernel:ident <$g:tt>, $($r:literal)*) => {{
        let Tile { rows, k, a, lda, b, c, ldc, step, cols, ahead, extra } = $t;
        match rows {
            $($r => $kernel::<$r, $g>(k, a, lda, b, c, ldc, step, cols, ahead, extra),)*
            _ => unreachable!("tile rows"),
        }
    }};
}

/// One k step of the micro-kernels' assembly k loop (`k_loop`): two loads of B into `$bv`,
/// `$bw` (byte offsets `$b0`, `$b1` from `{b}`), then per row a broadcast of its A value (byte
/// offset `$da` from the row's address) into `$bc` and two multiply-adds into its accumulators
/// (`mac`: `fma` fp32, `dot` int8).
#[cfg(target_arch = "x86_64")]
macro_rules! k_step {
    ($mac:tt $bv:tt $bw:tt $bc:tt; $da:tt $b0:tt $b1:tt; $(($base:tt $within:tt $lo:tt $hi:tt $li:tt $hi_i:tt))*) => {
        concat!(
            "vmovups ", $bv, ", [{b} + ", $b0, "]\n",
            "vmovups ", $bw, ", [{b} + ", $b1, "]\n",
            $(
                "vbroadcastss ", $bc, ", dword ptr [", $base, $within, " + ", $da, "]\n",
                mac!($mac $lo $bv $bc),
                mac!($mac $hi $bw $bc),
            )*
        )
    };
}

/// One multiply-add of the micro-kernels' k loop into accumulator `$acc`, B's vector `$b`, A's
/// broadcast `$a`: `fma`, fp32 (acc += a * b); `dot`, int8 (each 32-bit lane of acc += the dot
/// product of its four unsigned bytes of a with its four signed bytes of b: VPDPBUSD, AVX-512
/// VNNI); `vdot`, the same on ymm (AVX-VNNI); `madd` and `zmadd`, the same on ymm with AVX2
/// alone and on zmm with AVX-512BW alone (three instructions).
#[cfg(target_arch = "x86_64")]
macro_rules! mac {
    (fma $acc:tt $b:tt $a:tt) => {
        concat!("vfmadd231ps ", $acc, ", ", $b, ", ", $a, "\n")
    };
    (dot $acc:tt $b:tt $a:tt) => {
        concat!("vpdpbusd ", $acc, ", ", $a, ", ", $b, "\n")
    };
    // bf16 (AVX512-BF16): each 32-bit lane of acc += the sum of the products of its two bf16
    // values of a with those of b, in fp32.
    (bdot $acc:tt $b:tt $a:tt) => {
        concat!("vdpbf16ps ", $acc, ", ", $a, ", ", $b, "\n")
    };
    // The same on ymm registers in its VEX form (AVX-VNNI), which CPUs without AVX-512 run.
    (vdot $acc:tt $b:tt $a:tt) => {
        concat!("{{vex}} vpdpbusd ", $acc, ", ", $a, ", ", $b, "\n")
    };
    // AVX2 without VNNI: byte pairs' products summed into 16 bits (which cannot saturate: the
    // weights have 7 bits, `int8`), pairs of those summed into 32 bits by multiplying with ones
    // (16-bit ones in ymm11; the product goes through ymm15), added to acc.
    (madd $acc:tt $b:tt $a:tt) => {
        concat!("vpmaddubsw ymm15, ", $a, ", ", $b, "\n", "vpmaddwd ymm15, ymm15, ymm11\n", "vpaddd ", $acc, ", ", $acc, ", ymm15\n")
    };
    // The same on zmm (AVX-512BW without VNNI: Intel Xeon "Skylake-SP"): ones in zmm27, the
    // product through zmm28.
    (zmadd $acc:tt $b:tt $a:tt) => {
        concat!("vpmaddubsw zmm28, ", $a, ", ", $b, "\n", "vpmaddwd zmm28, zmm28, zmm27\n", "vpaddd ", $acc, ", ", $acc, ", zmm28\n")
    };
}

/// `$iters` rounds of four k steps of a micro-kernel on the rows listed, in assembly (the
/// AVX-512 and AVX2 kernels: registers `$bv $bw $bc` for B and the broadcast, then in brackets
/// any operands the multiply-add needs besides (`mac`'s madd: the ones, the spare register); the
/// four steps' offsets as in `k_step`; B's rows are a packed panel, 128 bytes, apart). Rows go in groups of
/// three, row 3g + j read at `{a<g>} + j * lda` (an x86 address with no arithmetic of its
/// own); the four group pointers and B's move once a round.
///
/// Compiled from intrinsics, the same loops spent issue slots on address arithmetic (a chain of
/// adds per row). AVX-512, one core, a 12x256x32 tile on cache-resident data: 164-167 GFLOP/s
/// against 182-183 here, 77% and 86% of the measured FMA peak (~213). 86% is the ceiling here
/// for FMAs fed by loads at all: with the loads of B or the broadcasts removed the loop ran at
/// 204 and 196, with neither at 215, and 14x32, 8x48 and 9x48 tiles also stopped at 182. AVX2,
/// a 6x16 tile: 102 GFLOP/s (91% of the AVX2 peak) against 113 (100%).
///
/// Whole products, one thread, best of 15 (2026-12-07), AVX-512: 180x728x728 160 -> 172
/// GFLOP/s, 361x728x728 163 -> 169, 1369x256x728 138 -> 154, 100x1536x2048 145 -> 151,
/// 294x128x128 156 -> 165; AVX2: 101 -> 107, 100 -> 106, 99 -> 100, 96 -> 101, 102 -> 106.
/// Whole passes gain less, 1-2% (xception, two threads, alternated: AVX-512 61.1 -> 60.6 ms,
/// AVX2 97.3 -> 95.7), as there the weights come from L3 or memory: a chain of 24 361x728x728
/// products with weights of their own runs ~5% slower than one product repeated.
#[cfg(target_arch = "x86_64")]
macro_rules! k_loop {
    ($mac:tt $bv:tt $bw:tt $bc:tt $([$($extra:tt)*])?; ($($s0:tt)*) ($($s1:tt)*) ($($s2:tt)*) ($($s3:tt)*); $acc:ident, $a:expr, $lda:expr, $b:expr, $iters:expr; $(($base:tt $within:tt $lo:tt $hi:tt $li:tt $hi_i:tt))*) => {
        std::arch::asm!(
            // (Mentions the row stride for tiles of one row, which never read it.)
            "/* lda bytes {s} */",
            "2:",
            k_step!($mac $bv $bw $bc; $($s0)*; $(($base $within $lo $hi $li $hi_i))*),
            k_step!($mac $bv $bw $bc; $($s1)*; $(($base $within $lo $hi $li $hi_i))*),
            k_step!($mac $bv $bw $bc; $($s2)*; $(($base $within $lo $hi $li $hi_i))*),
            k_step!($mac $bv $bw $bc; $($s3)*; $(($base $within $lo $hi $li $hi_i))*),
            "add {a0}, 16",
            "add {a1}, 16",
            "add {a2}, 16",
            "add {a3}, 16",
            "add {b}, 512",
            "dec {n}",
            "jnz 2b",
            a0 = inout(reg) $a => _,
            a1 = inout(reg) $a.wrapping_add(3 * $lda) => _,
            a2 = inout(reg) $a.wrapping_add(6 * $lda) => _,
            a3 = inout(reg) $a.wrapping_add(9 * $lda) => _,
            s = in(reg) $lda * 4,
            b = inout(reg) $b => _,
            n = inout(reg) $iters => _,
            $(inout($lo) $acc[$li], inout($hi) $acc[$hi_i],)*
            out($bv) _,
            out($bw) _,
            out($bc) _,
            $($($extra)*)?
            options(nostack, readonly),
        )
    };
}

/// `k_loop` on the first `$rows` rows of the table (`$acc` holds row r's accumulators at 2r and
/// 2r + 1): one branch per row count, each with the rows so far (`$counts` numbers them).
#[cfg(target_arch = "x86_64")]
macro_rules! k_loop_rows {
    ($regs:tt $steps:tt; $rows:expr, $acc:ident, $a:expr, $lda:expr, $b:expr, $iters:expr; [$($table:tt)*]; [$($counts:tt)*]) => {
        k_loop_rows!(@prefix $regs $steps; $rows, $acc, $a, $lda, $b, $iters; []; [$($table)*]; [$($counts)*])
    };
    (@prefix ($($regs:tt)*) ($($steps:tt)*); $rows:expr, $acc:ident, $a:expr, $lda:expr, $b:expr, $iters:expr; [$($done:tt)*]; [$next:tt $($rest:tt)*]; [$count:tt $($counts:tt)*]) => {
        if $rows == $count {
            k_loop!($($regs)*; $($steps)*; $acc, $a, $lda, $b, $iters; $($done)* $next)
        } else {
            k_loop_rows!(@prefix ($($regs)*) ($($steps)*); $rows, $acc, $a, $lda, $b, $iters; [$($done)* $next]; [$($rest)*]; [$($counts)*])
        }
    };
    (@prefix $regs:tt $steps:tt; $rows:expr, $acc:ident, $a:expr, $lda:expr, $b:expr, $iters:expr; [$($done:tt)*]; []; []) => {
        unreachable!("tile rows")
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{prefetch_write, Ahead, Bursts, Start, Step, Tile, BF16, FMA, MADD, VNNI};
    use std::arch::x86_64::*;

    /// Largest depth of one k-block. Between blocks each tile's partial sums go back to memory;
    /// a (768 x NR) panel slice is 96 KiB, read from L2 by every row tile. Measured on the whole
    /// network against L1-sized blocks of 256 (32 KiB): 5% faster (xception, batch 1).
    pub const KC: usize = 768;

    /// One tile of 1..=MR rows by one panel: fp32, or int8 with AVX-512 VNNI.
    #[inline(always)]
    pub unsafe fn tile(t: Tile) {
        if t.step.dequant.is_some() {
            by_rows!(t, kernel<VNNI>, 1 2 3 4 5 6 7 8 9 10 11 12)
        } else {
            by_rows!(t, kernel<FMA>, 1 2 3 4 5 6 7 8 9 10 11 12)
        }
    }

    /// One bf16 tile (`gemm_rows_dot`): A's values and the panel's pairs of bf16 (VDPBF16PS).
    #[inline(always)]
    pub unsafe fn tile_dot(t: Tile) {
        by_rows!(t, kernel<BF16>, 1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// One int8 tile with AVX-512BW alone (weights of 7 bits, `int8`).
    #[inline(always)]
    pub unsafe fn tile_madd(t: Tile) {
        by_rows!(t, kernel<MADD>, 1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// The end of one 32-value output row: + the residual row, ReLU, and the store, masked to
    /// the valid columns (`masks` for the two halves). Shared with the AMX path's epilogue.
    #[inline(always)]
    pub(crate) unsafe fn finish_row(mut v0: __m512, mut v1: __m512, residual: Option<*const f32>, relu: bool, (m0, m1): (u16, u16), dst: *mut f32) {
        if let Some(rr) = residual {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, rr));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, rr.add(16)));
        }
        if relu {
            let zero = _mm512_setzero_ps();
            v0 = _mm512_max_ps(v0, zero);
            v1 = _mm512_max_ps(v1, zero);
        }
        _mm512_mask_storeu_ps(dst, m0, v0);
        _mm512_mask_storeu_ps(dst.add(16), m1, v1);
    }

    /// One int8 output row of a panel in fp32: its two halves' 32-bit `sums` x the columns'
    /// scales x the row's scale, + the bias (or, with none, + what the output row `dst` holds,
    /// masked to the valid columns). The VNNI kernels and the AMX tiles both end here, so they
    /// give the same bits.
    #[inline(always)]
    pub(crate) unsafe fn dequant_row((i0, i1): (__m512i, __m512i), (s0, s1): (__m512, __m512), row_scale: f32, bias: Option<*const f32>, (m0, m1): (u16, u16), dst: *const f32) -> (__m512, __m512) {
        let scale = _mm512_set1_ps(row_scale);
        let (base0, base1) = match bias {
            Some(bias) => (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16))),
            None => (_mm512_maskz_loadu_ps(m0, dst), _mm512_maskz_loadu_ps(m1, dst.add(16))),
        };
        (_mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(s0, scale), base0), _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(s1, scale), base1))
    }

    /// PREFETCHW of the lines an output row of one panel (32 values, 128 bytes at any
    /// alignment) spans. Prefetches never fault, so a ragged row's lines past the matrix are
    /// harmless.
    #[inline(always)]
    pub(crate) unsafe fn prefetch_row_write(row: *const f32) {
        let p = row as *const i8;
        prefetch_write(p);
        prefetch_write(p.add(64));
        prefetch_write(p.add(124));
    }

    /// The micro-kernel: R x 32 accumulators in registers (24 of the 32 for R = 12), one
    /// broadcast of A per row and two loads of B per k step, four steps at a time in `k_loop`.
    /// In int8 (`DOT` VNNI or MADD) the same loop on bytes (`int8`): a step is four k, A's
    /// broadcast four unsigned bytes, B's vectors four signed bytes per column, VPDPBUSD (or
    /// VPMADDUBSW, VPMADDWD and VPADDD) for the FMA (so `k`, the steps, is a multiple of four: no
    /// single steps); `step.dequant` scales the sums back.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const R: usize, const DOT: u8>(k: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, step: Step, cols: usize, ahead: Ahead, extra: Ahead) {
        let (m0, m1) = (super::lane_mask(cols), super::lane_mask(cols.saturating_sub(16)));
        let zero = _mm512_setzero_ps();
        // The tile's output (and residual) lines are fetched while the k loop runs: a store that
        // misses the cache would stall it (the large layers' outputs come from L3 or memory).
        // Prefetches never fault, so a ragged tile's lines past the matrix are harmless.
        if let Start::Bias(_) = step.start {
            for r in 0..R {
                prefetch_row_write(c.add(r * ldc));
            }
        }
        if let Some((rp, ldr)) = step.residual {
            for r in 0..R {
                let rr = rp.add(r * ldr) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(rr);
                _mm_prefetch::<_MM_HINT_T0>(rr.add(64));
                _mm_prefetch::<_MM_HINT_T0>(rr.add(124));
            }
        }
        // Row r's accumulators are acc[2r] (columns 0..16) and acc[2r + 1] (16..32), the
        // registers zmm(2r) and zmm(2r + 1) in the assembly loop; those past R go unused.
        let mut acc = [zero; 24];
        match step.start {
            Start::Bias(bias) => {
                let (b0, b1) = (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)));
                for r in 0..R {
                    acc[2 * r] = b0;
                    acc[2 * r + 1] = b1;
                }
            }
            Start::Partial => {
                debug_assert!(DOT == FMA || DOT == BF16, "int8 sums run over all of k at once");
                for r in 0..R {
                    acc[2 * r] = _mm512_maskz_loadu_ps(m0, c.add(r * ldc));
                    acc[2 * r + 1] = _mm512_maskz_loadu_ps(m1, c.add(r * ldc + 16));
                }
            }
        }
        // Four k steps per round of the assembly loop, in chunks between prefetch bursts.
        debug_assert!(DOT == FMA || k.is_multiple_of(4), "int8 and bf16 steps come in fours");
        let mut bursts = Bursts::new(ahead, extra, k);
        let mut p = 0;
        macro_rules! rows_table {
            ($mac:tt $([$($extra:tt)*])?, $ap:ident, $bp:ident, $rounds:ident) => {
                k_loop_rows!(($mac "zmm24" "zmm25" "zmm26" $([$($extra)*])?) ((0 0 64) (4 128 192) (8 256 320) (12 384 448)); R, acc, $ap, lda, $bp, $rounds; [
                    ("{a0}" "" "zmm0" "zmm1" 0 1) ("{a0}" " + {s}" "zmm2" "zmm3" 2 3) ("{a0}" " + {s}*2" "zmm4" "zmm5" 4 5)
                    ("{a1}" "" "zmm6" "zmm7" 6 7) ("{a1}" " + {s}" "zmm8" "zmm9" 8 9) ("{a1}" " + {s}*2" "zmm10" "zmm11" 10 11)
                    ("{a2}" "" "zmm12" "zmm13" 12 13) ("{a2}" " + {s}" "zmm14" "zmm15" 14 15) ("{a2}" " + {s}*2" "zmm16" "zmm17" 16 17)
                    ("{a3}" "" "zmm18" "zmm19" 18 19) ("{a3}" " + {s}" "zmm20" "zmm21" 20 21) ("{a3}" " + {s}*2" "zmm22" "zmm23" 22 23)];
                    [1 2 3 4 5 6 7 8 9 10 11 12])
            };
        }
        while p + 4 <= k {
            let rounds = bursts.rounds(p, k);
            let (ap, bp) = (a.add(p), b.add(p * 32));
            match DOT {
                VNNI => rows_table!(dot, ap, bp, rounds),
                BF16 => rows_table!(bdot, ap, bp, rounds),
                MADD => rows_table!(zmadd [in("zmm27") _mm512_set1_epi16(1), out("zmm28") _,], ap, bp, rounds),
                _ => rows_table!(fma, ap, bp, rounds),
            }
            p += 4 * rounds;
        }
        while p < k {
            let bp = b.add(p * 32);
            let (b0, b1) = (_mm512_loadu_ps(bp), _mm512_loadu_ps(bp.add(16)));
            for r in 0..R {
                let av = _mm512_set1_ps(*a.add(r * lda + p));
                acc[2 * r] = _mm512_fmadd_ps(av, b0, acc[2 * r]);
                acc[2 * r + 1] = _mm512_fmadd_ps(av, b1, acc[2 * r + 1]);
            }
            p += 1;
        }
        if let (true, Some(dq)) = (DOT != FMA, step.dequant) {
            // sum x row scale x column scale + bias (or + the output, accumulating), each row
            // finished as soon as it is scaled: with all rows scaled first, the compiler kept the
            // rows' scales on the stack (the 24 sums fill most registers). One thread, best of
            // 5000: 294x64x128 267 -> 287 GOP/s (with the rows' quantization), k of 128 and up
            // even (2026-12-07).
            let cols = (_mm512_loadu_ps(dq.cols), _mm512_loadu_ps(dq.cols.add(16)));
            for r in 0..R {
                let sums = (_mm512_castps_si512(acc[2 * r]), _mm512_castps_si512(acc[2 * r + 1]));
                let (v0, v1) = dequant_row(sums, cols, *dq.rows.add(r), dq.bias, (m0, m1), c.add(r * ldc));
                let residual = step.residual.map(|(rp, ldr)| rp.add(r * ldr));
                finish_row(v0, v1, residual, step.relu, (m0, m1), c.add(r * ldc));
            }
            return;
        }
        for r in 0..R {
            let residual = step.residual.map(|(rp, ldr)| rp.add(r * ldr));
            finish_row(acc[2 * r], acc[2 * r + 1], residual, step.relu, (m0, m1), c.add(r * ldc));
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{prefetch_write, Ahead, Bursts, Start, Step, Tile, FMA, MADD, VNNI};
    use std::arch::x86_64::*;

    /// Columns per register tile: half a packed panel (two AVX2 vectors).
    pub const NR: usize = 16;
    /// Rows per register tile: 6 x 2 accumulators, 2 B vectors and a broadcast fill 15 of the
    /// 16 ymm registers.
    pub const MR: usize = 6;
    /// Largest depth of one k-block. As with AVX-512, fewer blocks (less partial-sum traffic)
    /// beat an L1-sized slice: one thread, blocks of 768 (48 KiB of half a panel, read from L2)
    /// against 256 (16 KiB), alternating: 1-2% faster at every pointwise shape; 512 and 1536 no
    /// better than 768. On the whole network (2 threads, paired) the two were within 1.3%.
    pub const KC: usize = 768;

    /// Rows per register tile of the `MADD` kernel: 5 x 2 accumulators, 2 B vectors, the
    /// broadcast, VPMADDWD's ones and the product in between fill 15 of the 16 ymm registers. One
    /// thread, best of 20 (2026-12-07): 361x728x728 186 GOP/s, 100x1536x2048 184-191, 1369x256x728
    /// 161-166, against 164, 169 and 150 for 6 rows with the ones read from memory.
    pub const MR_MADD: usize = 5;

    /// One tile of 1..=MR rows by half a panel: fp32, or int8 with AVX-VNNI.
    #[inline(always)]
    pub unsafe fn tile(t: Tile) {
        if t.step.dequant.is_some() {
            by_rows!(t, kernel<VNNI>, 1 2 3 4 5 6)
        } else {
            by_rows!(t, kernel<FMA>, 1 2 3 4 5 6)
        }
    }

    /// One int8 tile of 1..=MR_MADD rows with AVX2 alone (weights of 7 bits, `int8`).
    #[inline(always)]
    pub unsafe fn tile_madd(t: Tile) {
        by_rows!(t, kernel<MADD>, 1 2 3 4 5)
    }

    /// The first `n` of eight lanes, as VMASKMOV's mask.
    #[inline(always)]
    unsafe fn lanes(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    // Whole vectors go through plain loads and stores: VMASKMOV is microcoded and slow on some
    // AVX2 cores (AMD Zen 2), so only ragged tails use it.
    #[inline(always)]
    unsafe fn load(p: *const f32, n: usize, mask: __m256i) -> __m256 {
        if n >= 8 {
            _mm256_loadu_ps(p)
        } else {
            _mm256_maskload_ps(p, mask)
        }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256, n: usize, mask: __m256i) {
        if n >= 8 {
            _mm256_storeu_ps(p, v)
        } else if n > 0 {
            _mm256_maskstore_ps(p, mask, v)
        }
    }

    /// The micro-kernel: R x 16 accumulators in registers, one broadcast of A per row and two
    /// loads of B per k step; B's rows are a whole panel (32 values) apart.
    /// In int8 (`DOT` VNNI or MADD) the same loop on bytes, as the AVX-512 kernel's.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const R: usize, const DOT: u8>(k: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, step: Step, cols: usize, ahead: Ahead, extra: Ahead) {
        let (n0, n1) = (cols.min(8), cols.saturating_sub(8));
        let (m0, m1) = (lanes(n0), lanes(n1));
        // As in the AVX-512 kernel: the output (and residual) lines are fetched while k runs.
        if let Start::Bias(_) = step.start {
            for r in 0..R {
                let row = c.add(r * ldc) as *const i8;
                prefetch_write(row);
                prefetch_write(row.add(60));
            }
        }
        if let Some((rp, ldr)) = step.residual {
            for r in 0..R {
                let row = rp.add(r * ldr) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.add(60));
            }
        }
        let zero = _mm256_setzero_ps();
        // Row r's accumulators are acc[2r] (columns 0..8) and acc[2r + 1] (8..16), the
        // registers ymm(2r) and ymm(2r + 1) in the assembly loop; those past R go unused.
        let mut acc = [zero; 12];
        match step.start {
            // The bias is padded to whole panels.
            Start::Bias(bias) => {
                let (b0, b1) = (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)));
                for r in 0..R {
                    acc[2 * r] = b0;
                    acc[2 * r + 1] = b1;
                }
            }
            Start::Partial => {
                for r in 0..R {
                    acc[2 * r] = load(c.add(r * ldc), n0, m0);
                    acc[2 * r + 1] = load(c.add(r * ldc + 8), n1, m1);
                }
            }
        }
        // Four k steps per round of the assembly loop (`k_loop`), in chunks between prefetch
        // bursts.
        let mut bursts = Bursts::new(ahead, extra, k);
        let mut p = 0;
        macro_rules! rows_table {
            ($mac:tt $([$($extra:tt)*])?, $ap:ident, $bp:ident, $rounds:ident) => {
                k_loop_rows!(($mac "ymm12" "ymm13" "ymm14" $([$($extra)*])?) ((0 0 32) (4 128 160) (8 256 288) (12 384 416)); R, acc, $ap, lda, $bp, $rounds; [
                    ("{a0}" "" "ymm0" "ymm1" 0 1) ("{a0}" " + {s}" "ymm2" "ymm3" 2 3) ("{a0}" " + {s}*2" "ymm4" "ymm5" 4 5)
                    ("{a1}" "" "ymm6" "ymm7" 6 7) ("{a1}" " + {s}" "ymm8" "ymm9" 8 9) ("{a1}" " + {s}*2" "ymm10" "ymm11" 10 11)];
                    [1 2 3 4 5 6])
            };
        }
        debug_assert!(DOT == FMA || k.is_multiple_of(4), "int8 steps come in fours");
        while p + 4 <= k {
            let rounds = bursts.rounds(p, k);
            let (ap, bp) = (a.add(p), b.add(p * super::NR));
            match DOT {
                VNNI => rows_table!(vdot, ap, bp, rounds),
                MADD => {
                    // The first MR_MADD rows of the table: ymm11 holds the ones.
                    let ones = _mm256_set1_epi16(1);
                    k_loop_rows!((madd "ymm12" "ymm13" "ymm14" [in("ymm11") ones, out("ymm15") _,]) ((0 0 32) (4 128 160) (8 256 288) (12 384 416)); R, acc, ap, lda, bp, rounds; [
                    ("{a0}" "" "ymm0" "ymm1" 0 1) ("{a0}" " + {s}" "ymm2" "ymm3" 2 3) ("{a0}" " + {s}*2" "ymm4" "ymm5" 4 5)
                    ("{a1}" "" "ymm6" "ymm7" 6 7) ("{a1}" " + {s}" "ymm8" "ymm9" 8 9)];
                    [1 2 3 4 5])
                }
                _ => rows_table!(fma, ap, bp, rounds),
            }
            p += 4 * rounds;
        }
        while p < k {
            let bp = b.add(p * super::NR);
            let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
            for r in 0..R {
                let av = _mm256_broadcast_ss(&*a.add(r * lda + p));
                acc[2 * r] = _mm256_fmadd_ps(av, b0, acc[2 * r]);
                acc[2 * r + 1] = _mm256_fmadd_ps(av, b1, acc[2 * r + 1]);
            }
            p += 1;
        }
        if let (true, Some(dq)) = (DOT != FMA, step.dequant) {
            // sum x row scale x column scale + bias (or + the output, accumulating).
            let (s0, s1) = (_mm256_loadu_ps(dq.cols), _mm256_loadu_ps(dq.cols.add(8)));
            for r in 0..R {
                let scale = _mm256_set1_ps(*dq.rows.add(r));
                let (base0, base1) = match dq.bias {
                    Some(bias) => (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8))),
                    None => (load(c.add(r * ldc), n0, m0), load(c.add(r * ldc + 8), n1, m1)),
                };
                acc[2 * r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_castps_si256(acc[2 * r])), _mm256_mul_ps(s0, scale), base0);
                acc[2 * r + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_castps_si256(acc[2 * r + 1])), _mm256_mul_ps(s1, scale), base1);
            }
        }
        for r in 0..R {
            let (mut v0, mut v1) = (acc[2 * r], acc[2 * r + 1]);
            if let Some((rp, ldr)) = step.residual {
                let rr = rp.add(r * ldr);
                v0 = _mm256_add_ps(v0, load(rr, n0, m0));
                v1 = _mm256_add_ps(v1, load(rr.add(8), n1, m1));
            }
            if step.relu {
                v0 = _mm256_max_ps(v0, zero);
                v1 = _mm256_max_ps(v1, zero);
            }
            store(c.add(r * ldc), v0, n0, m0);
            store(c.add(r * ldc + 8), v1, n1, m1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn naive(m: usize, k: usize, n: usize, a: &[f32], lda: usize, w: &[f32], bias: &[f32], res: Option<&[f32]>, relu: bool) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = bias[j] as f64;
                for p in 0..k {
                    s += a[i * lda + p] as f64 * w[p * n + j] as f64;
                }
                let mut v = s as f32 + res.map_or(0.0, |r| r[i * n + j]);
                if relu {
                    v = v.max(0.0);
                }
                out[i * n + j] = v;
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 201) as f32 / 100.0 - 1.0).collect()
    }

    /// Every fp32 micro-kernel this CPU can run.
    fn kernels() -> Vec<Kernel> {
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            all.push(Kernel::Avx2);
        }
        if has_avx512() {
            all.push(Kernel::Avx512);
        }
        all
    }

    /// Every tile height (1 to 24 rows: each row count of a register tile, alone and beside
    /// another) at depths of every remainder mod 4 (the assembly loop takes four k steps at a
    /// time), with the residual and ReLU.
    #[test]
    fn every_tile_height_and_depth_remainder() {
        for k in [4, 29, 34, 63] {
            for m in 1..=24 {
                let n = 40;
                let (a, w, bias, res) = (values(m * k, 6), values(k * n, 7), values(n, 8), values(m * n, 9));
                let b = PackedB::new(&w, &bias, k, n);
                let want = naive(m, k, n, &a, k, &w, &bias, Some(&res), true);
                for simd in kernels() {
                    let mut got = vec![0f32; m * n];
                    let epi = Epilogue { residual: Some((&res[..], n)), relu: true, ..Epilogue::PLAIN };
                    unsafe { gemm_rows_on(simd, m, &a, k, &b, 0..b.panels(), SharedOut::new(&mut got), n, epi) };
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{simd:?} ({m}x{k}x{n}) [{i}] {g} vs {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn packed_gemm_matches_a_plain_product_on_ragged_shapes() {
        for &(m, k, n) in &[(1, 1, 1), (13, 27, 32), (25, 64, 45), (12, 300, 97), (37, 5, 70), (7, 40, 58), (14, 1601, 33)] {
            let lda = k + 3;
            let a = values(m * lda, 1);
            let w = values(k * n, 2);
            let bias = values(n, 3);
            let res = values(m * n, 4);
            let b = PackedB::new(&w, &bias, k, n);
            for (residual, relu) in [(false, false), (true, true), (false, true)] {
                let want = naive(m, k, n, &a, lda, &w, &bias, residual.then_some(&res[..]), relu);
                // A sentinel beyond column n shows the masked stores stay inside the matrix.
                let ldc = n + 1;
                let mut out = vec![7.5f32; m * ldc];
                let epi = Epilogue { residual: residual.then_some((&res[..], n)), relu, accumulate: false, ..Epilogue::PLAIN };
                for simd in kernels() {
                    let mut full = vec![0f32; m * n];
                    unsafe { gemm_rows_on(simd, m, &a, lda, &b, 0..b.panels(), SharedOut::new(&mut full), n, epi) };
                    unsafe { gemm_rows_on(simd, m, &a, lda, &b, 0..b.panels(), SharedOut::new(&mut out), ldc, Epilogue::PLAIN) };
                    for i in 0..m {
                        assert_eq!(out[i * ldc + n], 7.5, "{simd:?}: column past the end written ({m}x{k}x{n})");
                    }
                    for (i, (g, e)) in full.iter().zip(&want).enumerate() {
                        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{simd:?} ({m}x{k}x{n}) [{i}] {g} vs {e}");
                    }
                    // Accumulating: the product (no bias) is added to what the output holds.
                    let prior = values(m * n, 5);
                    let mut acc = prior.clone();
                    unsafe { gemm_rows_on(simd, m, &a, lda, &b, 0..b.panels(), SharedOut::new(&mut acc), n, Epilogue { accumulate: true, ..epi }) };
                    let product = naive(m, k, n, &a, lda, &w, &vec![0.0; n], None, false);
                    for i in 0..m * n {
                        let mut e = prior[i] + product[i] + if residual { res[i] } else { 0.0 };
                        if relu {
                            e = e.max(0.0);
                        }
                        assert!((acc[i] - e).abs() <= 1e-4 * (1.0 + e.abs()), "{simd:?} accumulate ({m}x{k}x{n}) [{i}] {} vs {e}", acc[i]);
                    }
                }
            }
        }
    }
}
