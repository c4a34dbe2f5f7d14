//! The hot loops: depthwise conv (NHWC, channels innermost so each tap is a contiguous vector
//! multiply-add), dense convs as one product per kernel row straight from the input lines (im2col
//! only for dilated and the smallest ones), max pool, and the drivers that feed the packed GEMM
//! (`packed`) band by band; the `gemm` crate for the classifier head and the portable path.

use crate::packed::{gemm_rows, Epilogue, Fetch, PackedB, SharedOut, MR};
use crate::{stealing, Activations, DenseConv, SepConv};
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Mutex;
use xception_arch::Padding;

/// dst (m x n) = [dst +] lhs (m x k, row stride `lda`; rows may overlap, as a direct conv's do) *
/// rhs (k x n), all row-major.
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, n: usize, k: usize, lhs: &[f32], lda: usize, rhs: &[f32], dst: &mut [f32], accumulate: bool, threads: usize) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(lhs.len() >= (m - 1) * lda + k && rhs.len() >= k * n && dst.len() >= m * n);
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
            lda as isize,
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

pub(crate) fn out_size(p: Padding, n: usize, k: usize, s: usize, d: usize) -> (usize, usize) {
    let (before, _, out) = p.resolve(n, k, s, d);
    (before, out)
}

/// Runs `f` compiled for AVX-512 (or AVX2 and FMA) where the CPU has it, so the plain loops
/// inside vectorise to the widest registers; the crate itself is built for baseline x86-64.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match crate::packed::kernel() {
            // SAFETY: the CPU has AVX-512F and FMA (checked by `kernel`).
            crate::packed::Kernel::Avx512 => return unsafe { wide(f) },
            // SAFETY: the CPU has AVX2 and FMA (checked by `kernel`).
            crate::packed::Kernel::Avx2 => return unsafe { avx2(f) },
            crate::packed::Kernel::Portable => {}
        }
    }
    f()
}

/// Activation buffers reused across layers and passes: a layer's output takes a free buffer of
/// exactly its size instead of fresh memory (fresh memory costs a page fault per 4 KiB, which
/// measured as much as the arithmetic on the 147x147 layers). Exact sizes, because lengthening
/// a shorter buffer writes zeros over it: 24-32 MB of memset per pass when buffers were shared
/// across sizes. Each pass asks for the same sizes in the same order, so from the second pass on
/// every request finds its buffer.
pub struct Buffers {
    free: Mutex<Vec<Vec<f32>>>,
    /// Free buffers kept at most; beyond, the oldest go back to the allocator, so a model run at
    /// many input sizes does not hoard memory.
    max_free: usize,
}

impl Buffers {
    /// For `threads` threads: a pass holds up to ~22 buffers (xception71), and a batch has one
    /// pass in flight per thread.
    pub fn new(threads: usize) -> Buffers {
        Buffers { free: Mutex::default(), max_free: 32 * threads.max(1) }
    }

    /// A buffer of `len` values whose contents are unspecified (left from an earlier layer):
    /// callers overwrite every value.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        match free.iter().rposition(|b| b.len() == len) {
            Some(i) => free.remove(i),
            None => vec![0.0; len],
        }
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, buf: Vec<f32>) {
        if buf.capacity() > 0 {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.push(buf);
            if free.len() > self.max_free {
                free.remove(0);
            }
        }
    }
}

thread_local! {
    /// Each worker's band of GEMM input rows (depthwise outputs, im2col patches).
    static BAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's GEMM input rows made whole (the small layers' depthwise outputs).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// `SCRATCH` (or a ready left operand) rounded to bf16, for a bf16 product.
    static SCRATCH16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// `SCRATCH` (or a ready left operand) quantized to int8 (bytes, four to a u32), and its
    /// rows' scales, for an int8 product.
    static SCRATCH8: RefCell<(Vec<u32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// `BAND` in bf16.
    static BAND16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// `BAND` quantized to int8 (bytes, four to a u32) and its rows' scales, for an int8 product
    /// (`BAND` then holds one line in fp32).
    static BAND8: RefCell<(Vec<u32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Where the rows of a GEMM's left operand come from.
pub enum Lhs<'a> {
    /// Already in memory: (rows x k) row-major.
    Ready(&'a [f32]),
    /// Made on demand, output image lines (`per_line` rows each) at a time: `fill(line, rows)`
    /// makes as many consecutive lines from `line` as `rows` holds;
    /// for bf16 weights `fill16`, where given, makes them in bf16 at once (rows of
    /// `amx::lhs_stride(k, k)` values, zeros past k), which saves rounding them afterwards.
    /// `reads`, where given, names the input values the fill of a range of lines reads, so a
    /// band's product can fetch the next band's input meanwhile.
    Lines { lines: usize, per_line: usize, fill: &'a Fill<'a>, fill16: Option<&'a Fill16<'a>>, reads: Option<&'a Reads<'a>> },
}

/// `reads` of `Lhs::Lines`: the input values the fill of lines `range` reads.
pub type Reads<'a> = dyn Fn(Range<usize>) -> &'a [f32] + Sync + 'a;

/// `fill` of `Lhs::Lines`: writes the rows of consecutive lines, from the first one given, as
/// many as the buffer holds (a whole number of lines).
pub type Fill<'a> = dyn Fn(usize, &mut [f32]) + Sync + 'a;
/// `fill` of `Lhs::Lines` in bf16, the same way.
pub type Fill16<'a> = dyn Fn(usize, &mut [u16]) + Sync + 'a;

/// GEMM rows produced in bands at least this large keep the micro-kernel's row tiles full.
pub(crate) const BAND_ROWS: usize = 192;
/// Rows per task when a large product is shared out by rows (eight micro-kernel tiles): small
/// enough that the faster core can take more of them (measured 0.8% faster than 192 on the
/// whole network), large enough that the weights streamed per task stay amortised.
const ROW_CHUNK: usize = 96;
/// Products of fewer rows than this are small (the middle and exit flows at 299).
const SMALL_ROWS: usize = 1024;
/// Panels a worker from which a small product's tasks take all its rows (`split`).
const WHOLE_ROW_PANELS: usize = 8;
/// Weight matrices of at most this many values (1.5 MB in bf16, 3 MB in fp32: the middle flow's
/// 728x728 and block 12's 728x1024, not the exit's 1024x1536) are read whole by every worker of
/// a small product (`matmul`).
const SMALL_WEIGHTS: usize = 768 << 10;

/// out (rows x b.n) = lhs x b + bias, then the epilogue (residual rows laid out like `out`).
///
/// Large layers run band by band: each worker fills a band of rows into its own cache-resident
/// buffer (for a separable conv: the depthwise output) and multiplies it at once, so the
/// intermediate never goes to memory; small ones with small weights (the middle flow) as one such
/// band per worker. The others (the exit flow's large weights) make all rows first, in the
/// calling thread's scratch, and share out the product (`share_out`).
pub fn matmul(lhs: Lhs, b: &PackedB, out: &mut [f32], residual: Option<&[f32]>, relu: bool, threads: usize) {
    let (k, n) = (b.k, b.n);
    let rows = out.len() / n.max(1);
    assert_eq!(out.len(), rows * n, "matmul output shape");
    if let Some(r) = residual {
        assert_eq!(r.len(), out.len(), "residual shape");
    }
    let shared = SharedOut::new(out);
    let epi_at = |row0: usize| Epilogue { residual: residual.map(|r| (&r[row0 * n..], n)), relu, accumulate: false, ..Epilogue::PLAIN };
    let (lines, per_line, fill, fill16, reads) = match lhs {
        Lhs::Ready(a) => {
            assert!(a.len() >= rows * k, "matmul lhs shape");
            return share_out(a, b, rows, k, n, shared, &epi_at, threads);
        }
        Lhs::Lines { lines, per_line, fill, fill16, reads } => (lines, per_line, fill, fill16, reads),
    };
    debug_assert_eq!(lines * per_line, rows);
    let bf16 = b.is_bf16() && fill16.is_some();
    // Large products (SMALL_ROWS rows or more) in bands of about BAND_ROWS rows, at least four per
    // worker. Since the next band's input is prefetched this includes the 37x37 layers (1369 rows),
    // which made every row first and shared out chunks of rows: their two separable convs 9.1-9.6
    // ms against 9.4-10.4 (fp32, two threads, four alternations; bf16 and AVX2 even), xception65 even or
    // faster (138-141 ms against 138-147). Small ones with weights of at most SMALL_WEIGHTS values
    // (the middle flow) in one band per worker: each makes its own rows of the depthwise output and
    // multiplies them by all the weights, so no row crosses to the other core. In bf16 measured
    // 2-3.5% faster on the whole network, paired, than making every row first and sharing out the
    // weight panels (products of 1024 to 3072 rows, then shared too, made no difference). In fp32
    // it made no difference until the micro-kernels prefetched the next weight panel (streaming all
    // the weights per core then cost more); since, at two threads, xception 4% faster (AVX-512, 13
    // alternations; AVX2 1%) and xception65 13% (AVX-512; AVX2 within the noise). The exit flow's
    // larger weights (3-6 MB fp32) are shared out by panels instead, so each core streams only its
    // half (1.5-3.7% faster than a band per worker there, bf16).
    // Either way the rows go to the workers evenly to the row (`stealing`): a small product's
    // one band per worker is split at a row, not a line (the line the split falls in is made by
    // both workers, each multiplying its own rows of it). The middle flow (19 lines of 19) had
    // bands of 190 and 171 rows, the faster worker waiting 10% of the step; now 180 and 181.
    // Measured (xception, 299, two threads, per-step medians, three alternations): the middle
    // flow's separable convs 1.37-1.43 -> 1.30-1.31 ms, the pass's steps 64.8-66.8 -> 63.2-64.0.
    // (size, least) of the bands, see `stealing::bands`.
    let size = if lines >= 4 * threads && rows >= SMALL_ROWS {
        let size = band_lines(lines, per_line, threads) * per_line;
        (size, stealing::MIN_BAND.min(size))
    } else if rows < SMALL_ROWS && k * n <= SMALL_WEIGHTS {
        (rows.div_ceil(threads), rows.div_ceil(threads))
    } else {
        (0, 0)
    };
    if size.0 > 0 {
        // The lines a band of rows reads, and its rows among theirs.
        let span = |r: &Range<usize>| (r.start / per_line..r.end.div_ceil(per_line), r.start % per_line..r.start % per_line + r.len());
        return stealing::bands(rows, per_line, size, threads, |now, next| {
            // The band after this one, which this worker most likely makes next: its input is
            // fetched into L2 while this band's product runs, instead of line by line as the
            // next fill reads it (the fills of the 147x147 layers read ~3 GB/s a core). The
            // four 147x147 and 74x74 separable convs: 14.9 -> 13.8 ms (sums of per-step
            // medians, two threads, AVX-512; 5 of 7 alternations faster, 2 even); with AVX2
            // 22.0 -> 18.7 ms (3 alternations, the pass 3% faster); one thread 27.7 -> 26.5.
            let ahead = match reads {
                Some(reads) if !next.is_empty() => Fetch::of(reads(span(&next).0)),
                _ => Fetch::NONE,
            };
            // And its output rows, whose first stores would miss otherwise: the 74x74 and 37x37
            // products 2.06 -> 1.95 and 2.62 -> 2.48 ms (means of four alternations of per-step
            // medians; the 256->256 even).
            let writes = Fetch::output(shared, next.start * n, next.len() * n);
            let (lines, local) = span(&now);
            // SAFETY: each band owns its output rows `now`.
            unsafe { band_rows(lines, local, per_line, fill, fill16, b, shared.offset(now.start * n), Epilogue { ahead, writes, ..epi_at(now.start) }) }
        });
    }
    // Every row made first, then the product shared out, in this thread's scratch (`taken`: the
    // parallel work runs meanwhile).
    #[cfg(target_arch = "x86_64")]
    if let (Some(b16), Some(fill16), true) = (b.bf16(), fill16, bf16) {
        let ld16 = crate::amx::lhs_stride(k, k, b16.pieces());
        return taken(&SCRATCH16, |buf| {
            let a16 = crate::amx::lhs_buffer(buf, rows, ld16, k, b16.pieces());
            a16[..rows * ld16].par_chunks_mut(2 * per_line * ld16).enumerate().for_each(|(t, chunk)| fill16(2 * t, chunk));
            share_out16(a16, ld16, b, rows, shared, &epi_at, threads);
        });
    }
    taken(&SCRATCH, |scratch| {
        scratch.resize(scratch.len().max(rows * k), 0.0);
        let made = &mut scratch[..rows * k];
        made.par_chunks_mut(2 * per_line * k).enumerate().for_each(|(t, chunk)| fill(2 * t, chunk));
        share_out(made, b, rows, k, n, shared, &epi_at, threads);
    });
}

/// `f` on this thread's buffer in `key`, taken out of it meanwhile, for work that runs parallel
/// tasks: a thread waiting on them runs other tasks, and with one engine called from several
/// threads those may be another caller's whole pass, which then finds the slot empty and makes
/// a buffer of its own (a second borrow of the RefCell would panic).
pub(crate) fn taken<T: Default, R>(key: &'static std::thread::LocalKey<RefCell<T>>, f: impl FnOnce(&mut T) -> R) -> R {
    let mut buf = key.take();
    let r = f(&mut buf);
    key.set(buf);
    r
}

/// Lines `lines` of a `Lhs::Lines` operand made in this thread's band buffer (in bf16, by
/// `fill16`, where the weights are bf16 and it is given) and multiplied by `b` into `out` (row
/// stride b.n) with `epi`.
///
/// # Safety
/// No other thread may touch the band's rows of `out` meanwhile.
pub(crate) unsafe fn band_product(lines: Range<usize>, per_line: usize, fill: &Fill<'_>, fill16: Option<&Fill16<'_>>, b: &PackedB, out: SharedOut, epi: Epilogue) {
    let rows = 0..lines.len() * per_line;
    band_rows(lines, rows, per_line, fill, fill16, b, out, epi)
}

/// `band_product` of only `rows` of the band (counted from its first line's first row): the
/// lines are made whole, and `out` gets rows.len() rows.
///
/// # Safety
/// As `band_product`.
#[allow(clippy::too_many_arguments)]
unsafe fn band_rows(lines: Range<usize>, rows: Range<usize>, per_line: usize, fill: &Fill<'_>, fill16: Option<&Fill16<'_>>, b: &PackedB, out: SharedOut, epi: Epilogue) {
    let (k, n, made) = (b.k, b.n, lines.len() * per_line);
    debug_assert!(rows.end <= made);
    #[cfg(target_arch = "x86_64")]
    if let (Some(b16), Some(fill16)) = (b.bf16(), fill16) {
        let ld16 = crate::amx::lhs_stride(k, k, b16.pieces());
        return BAND16.with_borrow_mut(|buf| {
            let a16 = crate::amx::lhs_buffer_rows(buf, made, rows.clone(), ld16, k, b16.pieces());
            fill16(lines.start, &mut a16[..made * ld16]);
            crate::amx::gemm_rows(rows.len(), &a16[rows.start * ld16..], ld16, b, 0..b.panels(), out, n, epi)
        });
    }
    #[cfg(target_arch = "x86_64")]
    if b.int8().is_some() {
        // Each pair of lines (the depthwise kernel makes two at once) quantized as soon as it
        // is made, from a buffer of two lines in fp32, into the band's bytes: the band is a
        // quarter of its fp32 size and is never read back in fp32.
        let ld8 = crate::int8::lhs_stride(b);
        return BAND8.with_borrow_mut(|bufs| {
            let (bytes, scales) = crate::int8::lhs_buffers(bufs, made, ld8);
            BAND.with_borrow_mut(|two| {
                two.resize(two.len().max(2 * per_line * k), 0.0);
                let mut l = lines.start;
                for (d, sc) in bytes[..made * ld8].chunks_mut(2 * per_line * ld8).zip(scales.chunks_mut(2 * per_line)) {
                    let n = sc.len();
                    let rows_f32 = &mut two[..n * k];
                    fill(l, rows_f32);
                    crate::int8::quantize_rows(rows_f32, k, k, 0..n, d, ld8, sc);
                    l += n / per_line;
                }
            });
            // (The bytes past the band's rows: what AMX tiles read past them, see `lhs_buffers`.)
            let (a8, scales) = (&crate::int8::lhs_rows(bufs)[rows.start * ld8 / 4..], &bufs.1[rows.start..made]);
            crate::int8::gemm_rows(rows.len(), a8, ld8, scales, b, 0..b.panels(), out, n, epi)
        });
    }
    BAND.with_borrow_mut(|buf| {
        buf.resize(buf.len().max(made * k), 0.0);
        fill(lines.start, &mut buf[..made * k]);
        gemm_rows(rows.len(), &buf[rows.start * k..], k, b, 0..b.panels(), out, n, epi)
    })
}

/// Lines per band for a large product: about BAND_ROWS rows, at least four bands per worker.
fn band_lines(lines: usize, per_line: usize, threads: usize) -> usize {
    BAND_ROWS.div_ceil(per_line).clamp(1, lines / (4 * threads))
}

/// How a product of `rows` rows is shared out: (rows per task, column tasks), see `share_out`;
/// row chunks are whole `granule`s of rows (the micro-kernel's row tiles; BAND_ROWS and
/// ROW_CHUNK are whole fp32 and AMX tiles).
///
/// With `whole_rows`, a small product of many panels (the exit flow's, at least WHOLE_ROW_PANELS
/// a worker) goes a panel a task, all rows in one: each panel's weights pass through one row
/// tile after the other on one core, and half as many tasks start. Measured in whole passes
/// with AVX-512 (xception, two threads, three alternations of per-step timers around the
/// products): the 10x10 1024->1536 product 1.28 -> 1.14 ms, 1536->2048 2.43 -> 2.22 (medians).
/// With AVX2 it was even or slower (3.44 -> 3.50 ms), and in bf16 the pass slower (24.2-25.1 ->
/// 25.5-25.8 ms), so those keep the halves.
fn split(rows: usize, panels: usize, threads: usize, granule: usize, whole_rows: bool) -> (usize, usize) {
    if rows >= SMALL_ROWS {
        (ROW_CHUNK, 1)
    } else if whole_rows && panels >= WHOLE_ROW_PANELS * threads {
        (rows, panels)
    } else if panels < threads {
        (BAND_ROWS.min(rows.div_ceil(threads).next_multiple_of(granule)).min(rows).max(1), 1)
    } else {
        (rows.div_ceil(threads).next_multiple_of(granule).min(rows).max(1), panels)
    }
}

/// out = a (rows x k) x b, shared out between the workers. Large products: chunks of rows, each
/// over every panel (a chunk's rows stay in L2 while the weights stream past). Small ones (the
/// exit flow, the shortcut projections, the classifier): the panels shared out, so each worker
/// streams only part of the weights (a row split would stream all of them once per chunk); each
/// panel's rows in one chunk per worker (or, see `split`, all in one), the tasks in panel
/// order, so a worker takes runs of whole panels and only the last panels are split between
/// workers (the work left when the first worker runs out is half a panel, not a whole one: the
/// pass measured ~2% faster at two threads, AVX-512 and AVX2, alternating, when the middle flow
/// still came through here). Tasks are taken as workers free up: on this VM one core runs the
/// same GEMM ~30% slower than the other, and a static half each would leave the fast one
/// waiting.
#[allow(clippy::too_many_arguments)]
fn share_out<'e>(a: &[f32], b: &PackedB, rows: usize, k: usize, n: usize, shared: SharedOut, epi_at: &(dyn Fn(usize) -> Epilogue<'e> + Sync), threads: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(b16) = b.bf16() {
        // Rounded to bf16 once here, not by every task (a panel task reads every row).
        return taken(&SCRATCH16, |buf| {
            let pieces = b16.pieces();
            let ld16 = crate::amx::lhs_stride(k, k, pieces);
            let a16 = crate::amx::lhs_buffer(buf, rows, ld16, k, pieces);
            a16[..rows * ld16].par_chunks_mut(64 * ld16).enumerate().for_each(|(i, d)| {
                crate::amx::round_rows(&a[i * 64 * k..], k, k, 0..d.len() / ld16, d, ld16, pieces);
            });
            share_out16(a16, ld16, b, rows, shared, epi_at, threads);
        });
    }
    #[cfg(target_arch = "x86_64")]
    if b.int8().is_some() {
        // Quantized once here, not by every task (a panel task reads every row).
        return taken(&SCRATCH8, |bufs| {
            let ld8 = crate::int8::lhs_stride(b);
            let (bytes, scales) = crate::int8::lhs_buffers(bufs, rows, ld8);
            bytes.par_chunks_mut(64 * ld8).zip(scales.par_chunks_mut(64)).enumerate().for_each(|(i, (d, sc))| {
                crate::int8::quantize_rows(&a[i * 64 * k..], k, k, 0..sc.len(), d, ld8, sc);
            });
            let (a8, scales) = (crate::int8::lhs_rows(bufs), &bufs.1[..rows]);
            // SAFETY: each task owns its rows x panels of the output.
            shared_tasks(rows, b.panels(), threads, (MR, crate::packed::has_avx512()), |row0, m, ps| unsafe {
                crate::int8::gemm_rows(m, &a8[row0 * ld8 / 4..], ld8, &scales[row0..], b, ps, shared.offset(row0 * n), n, epi_at(row0))
            });
        });
    }
    // A task over every panel fetches the next chunk's rows into L2 as it runs (a chunk's rows
    // are otherwise read from memory by its first panel's tiles, faster than one core streams).
    // Measured when the 37x37 separable convs came through here (two threads, sums of per-step
    // medians, five alternations): 9.2-10.8 ms against 9.4-10.5, 4 of 5 faster; `bench --ops`
    // separable 37x37 5.9-6.3 ms against 6.3-6.5.
    let all = b.panels();
    // SAFETY: each task owns its rows x panels of the output.
    shared_tasks(rows, all, threads, (MR, crate::packed::has_avx512()), |row0, m, ps| unsafe {
        let ahead = if ps.len() == all { Fetch::of(&a[((row0 + m) * k).min(rows * k)..((row0 + 2 * m) * k).min(rows * k)]) } else { Fetch::NONE };
        gemm_rows(m, &a[row0 * k..], k, b, ps, shared.offset(row0 * n), n, Epilogue { ahead, ..epi_at(row0) })
    });
}

/// Runs `task(row0, rows, panels)` over the pieces `split` cuts a product of `rows` rows into,
/// in parallel, taken as workers free up; a panel's row chunks are consecutive tasks.
fn shared_tasks(rows: usize, panels: usize, threads: usize, (granule, whole_rows): (usize, bool), task: impl Fn(usize, usize, Range<usize>) + Sync) {
    let (chunk, col_chunks) = split(rows, panels, threads, granule, whole_rows);
    let per = panels.div_ceil(col_chunks);
    let row_chunks = rows.div_ceil(chunk);
    (0..row_chunks * col_chunks).into_par_iter().for_each(|t| {
        let (ri, ci) = (t % row_chunks, t / row_chunks);
        let row0 = ri * chunk;
        task(row0, chunk.min(rows - row0), (ci * per).min(panels)..((ci + 1) * per).min(panels));
    });
}

/// `share_out` for bf16 weights, on A already rounded (`rows` rows at stride `ld16`, as many
/// values as `amx::lhs_len` asks).
#[cfg(target_arch = "x86_64")]
fn share_out16<'e>(a16: &[u16], ld16: usize, b: &PackedB, rows: usize, shared: SharedOut, epi_at: &(dyn Fn(usize) -> Epilogue<'e> + Sync), threads: usize) {
    let n = b.n;
    // SAFETY: each task owns its rows x panels of the output.
    shared_tasks(rows, b.panels(), threads, (crate::amx::T, false), |row0, m, ps| unsafe {
        crate::amx::gemm_rows(m, &a16[row0 * ld16..], ld16, b, ps, shared.offset(row0 * n), n, epi_at(row0))
    });
}

/// The most weights (values) a dense conv runs with without im2col (`dense_conv`): 1 MiB in
/// fp32, half a core's L2 here, so the weights each task streams stay cached between tasks.
const DIRECT_WEIGHTS: usize = 1 << 18;

pub fn dense_conv(x: &Activations, d: &DenseConv, threads: usize, bufs: &Buffers) -> Activations {
    let (pt, oh) = out_size(d.padding, x.h, d.k, d.stride, d.dilation);
    let (pl, ow) = out_size(d.padding, x.w, d.k, d.stride, d.dilation);
    let mut out = bufs.take(x.n * oh * ow * d.cout);
    if let Some(w) = &d.winograd {
        w.conv(x, (pt, oh), (pl, ow), d.relu, &mut out);
        return Activations { n: x.n, h: oh, w: ow, c: d.cout, data: out };
    }
    // Without im2col where there are lines enough to share out and the weights stay in a core's
    // cache (each task multiplies its lines by all the weights); small layers (the exit flow's
    // 10x10) and large weights (block 12's 728x1024 shortcut: 3 MB streamed once per line from
    // memory; 2.4-3.1 ms against 1.5-1.7 ms through im2col at one thread) share out the weights.
    if let Some(rows) = d.direct_rows().filter(|_| x.c == d.cin && x.n * oh >= 8 * threads && d.weight.k * d.weight.n <= DIRECT_WEIGHTS) {
        direct_conv(x, d, rows, (pt, oh), (pl, ow), &mut out);
    } else if d.k == 1 && d.stride == 1 && pt == 0 && pl == 0 {
        matmul(Lhs::Ready(&x.data), &d.weight, &mut out, None, d.relu, threads);
    } else {
        let kk = d.k * d.k * d.cin;
        // Dilated or small convs: im2col, line by line.
        let fill = |first: usize, cols: &mut [f32]| {
            for (line, cols) in (first..).zip(cols.chunks_mut(ow * kk)) {
                let (b, oy) = (line / oh, line % oh);
                for (ox, dst) in cols.chunks_mut(kk).enumerate() {
                    for ky in 0..d.k {
                        let iy = (oy * d.stride + ky * d.dilation) as isize - pt as isize;
                        for kx in 0..d.k {
                            let ix = (ox * d.stride + kx * d.dilation) as isize - pl as isize;
                            let tap = &mut dst[(ky * d.k + kx) * d.cin..][..d.cin];
                            if iy >= 0 && ix >= 0 && (iy as usize) < x.h && (ix as usize) < x.w {
                                let src = ((b * x.h + iy as usize) * x.w + ix as usize) * x.c;
                                tap.copy_from_slice(&x.data[src..src + d.cin]);
                            } else {
                                tap.fill(0.0);
                            }
                        }
                    }
                }
            }
        };
        matmul(Lhs::Lines { lines: x.n * oh, per_line: ow, fill: &fill, fill16: None, reads: None }, &d.weight, &mut out, None, d.relu, threads);
    }
    Activations { n: x.n, h: oh, w: ow, c: d.cout, data: out }
}

/// A dense conv (stride s, dilation 1; the strided 1x1 shortcut projections too) without im2col:
/// for one output line and kernel row ky, the k taps of every output pixel are k * cin
/// consecutive input values, and consecutive pixels' windows start s * cin values apart, so the
/// input line itself is the GEMM's left operand (row stride s * cin). The k kernel rows' products
/// (`kernel_rows`, from `DenseConv::direct_rows`) accumulate in the output; the bias comes with
/// the first, ReLU with the last. Padding: the products run on a zero-padded copy of the line's
/// k input rows, made by the worker for each line (xception65's stem, padded both convs:
/// 0.55 -> 0.45 and 3.30 -> 3.08 ms against a padded copy of the whole input, per-step medians of
/// four alternations, each faster; the copy alone had taken 0.18 and 0.31 ms).
fn direct_conv(x: &Activations, d: &DenseConv, kernel_rows: &[PackedB], (pt, oh): (usize, usize), (pl, ow): (usize, usize), out: &mut [f32]) {
    let c = d.cin;
    // The extent the windows read, padding included.
    let (hp, wp) = ((oh - 1) * d.stride + d.k, (ow - 1) * d.stride + d.k);
    let padded = pt > 0 || pl > 0 || hp > x.h || wp > x.w;
    let n = d.cout;
    let shared = SharedOut::new(out);
    let line_of = |b: usize, iy: usize| &x.data[(b * x.h + iy) * x.w * c..][..x.w * c];
    // The input rows [iy0, iy1) output line `oy` of image `b` reads, clipped to the image.
    let rows_of = |b: usize, oy: usize| {
        let first = (oy * d.stride) as isize - pt as isize;
        let (iy0, iy1) = (first.max(0) as usize, ((first + d.k as isize).max(0) as usize).min(x.h));
        &x.data[(b * x.h + iy0) * x.w * c..(b * x.h + iy1.max(iy0)) * x.w * c]
    };
    // Two output lines per task, taken as workers free up.
    let lines = x.n * oh;
    (0..lines.div_ceil(2)).into_par_iter().for_each(|t| {
        PADDED.with_borrow_mut(|window| {
            if padded {
                window.resize(window.len().max(d.k * wp * c), 0.0);
            }
            for line in 2 * t..(2 * t + 2).min(lines) {
                let (b, oy) = (line / oh, line % oh);
                // With padding, the k input rows this line reads, zero-padded to wp pixels, in
                // this worker's window (instead of a padded copy of the whole input, written and
                // read back through memory).
                if padded {
                    for ky in 0..d.k {
                        let dst = &mut window[ky * wp * c..][..wp * c];
                        let iy = (oy * d.stride + ky) as isize - pt as isize;
                        if iy < 0 || iy as usize >= x.h {
                            dst.fill(0.0);
                            continue;
                        }
                        let (x0, x1) = (pl.min(wp), (pl + x.w).min(wp));
                        dst[..x0 * c].fill(0.0);
                        dst[x0 * c..x1 * c].copy_from_slice(&line_of(b, iy as usize)[..(x1 - x0) * c]);
                        dst[x1 * c..].fill(0.0);
                    }
                }
                // The input lines of the output line two on (the next task's, which this worker
                // most likely takes next), fetched into L2 while this line's products run, a
                // kernel row's share with each. Measured (two threads, per-step medians, five
                // alternations): the 147x147 shortcut projection 0.80-0.91 ms against 0.80-1.09
                // without; the others within the noise.
                let next = line + 2;
                let ahead = if next < lines { Fetch::of(rows_of(next / oh, next % oh)) } else { Fetch::NONE };
                // And that line's output, whose first stores would miss otherwise. Each kernel
                // row's product fetches a share of both.
                let written = if next < lines { Fetch::output(shared, next * ow * n, ow * n) } else { Fetch::NONE };
                for (ky, rows) in kernel_rows.iter().enumerate() {
                    let a = if padded { &window[ky * wp * c..][..wp * c] } else { line_of(b, oy * d.stride + ky) };
                    let (ahead, writes) = (ahead.share(ky, d.k), written.share(ky, d.k));
                    let epi = Epilogue { residual: None, relu: d.relu && ky + 1 == d.k, accumulate: ky > 0, ahead, writes };
                    // SAFETY: this task owns output line `line` (ow rows of n values).
                    unsafe { gemm_rows(ow, a, d.stride * c, rows, 0..rows.panels(), shared.offset(line * ow * n), n, epi) };
                }
            }
        })
    });
}

thread_local! {
    /// `direct_conv`'s window of a padded conv's input rows for one output line.
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// How the depthwise kernel transforms each input value as it loads it (a preceding ReLU, or
/// BatchNorm + ReLU); monomorphised so the innermost loop has no branch on it.
/// A load transform as data: (scale, shift) if any, and whether ReLU follows.
type Transform<'a> = (Option<(&'a [f32], &'a [f32])>, bool);

trait Load: Copy + Sync {
    fn apply(&self, v: f32, channel: usize) -> f32;
    /// The same transform as data.
    fn transform(&self) -> Transform<'_>;
}

#[derive(Clone, Copy)]
struct Plain;
impl Load for Plain {
    #[inline(always)]
    fn apply(&self, v: f32, _: usize) -> f32 {
        v
    }
    fn transform(&self) -> Transform<'_> {
        (None, false)
    }
}

#[derive(Clone, Copy)]
struct Relu;
impl Load for Relu {
    #[inline(always)]
    fn apply(&self, v: f32, _: usize) -> f32 {
        v.max(0.0)
    }
    fn transform(&self) -> Transform<'_> {
        (None, true)
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
    fn transform(&self) -> Transform<'_> {
        (Some((self.scale, self.shift)), self.relu)
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

/// Whether the depthwise conv `s` makes two output lines at a time here (`dw3::run`'s PAIR):
/// with the AVX-512 or AVX2 kernels, for a 3x3 conv of stride 1 without dilation.
fn in_pairs(s: &SepConv) -> bool {
    cfg!(target_arch = "x86_64") && matches!(crate::packed::kernel(), crate::packed::Kernel::Avx512 | crate::packed::Kernel::Avx2) && s.k == 3 && s.stride == 1 && s.dilation == 1
}

/// Calls `f(at, b, oy, n)` for `lines` consecutive output lines from `line` (counted over the
/// images, `oh` an image), `n` of them at a time from image `b`'s line `oy` (`at` lines after
/// `line`): two where `pairs` and both are in the image, else one.
fn by_pairs(line: usize, lines: usize, oh: usize, pairs: bool, mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut at = 0;
    while at < lines {
        let (b, oy) = ((line + at) / oh, (line + at) % oh);
        let n = if pairs && at + 1 < lines && oy + 1 < oh { 2 } else { 1 };
        f(at, b, oy, n);
        at += n;
    }
}

/// Consecutive output lines of the depthwise conv from `line` (counted over the images, `oh` an
/// image), as many as `out` holds (`ow` pixels of `s.channels` values each), with the best
/// kernel this CPU runs, two at a time where it can (`in_pairs`).
#[allow(clippy::too_many_arguments)]
fn dw_lines<L: Load>(x: &Activations, s: &SepConv, load: L, (line, oh): (usize, usize), ow: usize, pt: usize, pl: usize, out: &mut [f32]) {
    let per = ow * s.channels;
    assert!(per > 0 && out.len().is_multiple_of(per), "depthwise lines: {} values for lines of {per}", out.len());
    by_pairs(line, out.len() / per, oh, in_pairs(s), |at, b, oy, n| dw_line(x, s, load, (b, oy, ow, pt, pl), n, &mut out[at * per..(at + n) * per]));
}

/// Output line `oy` of image `b` of the depthwise conv with the best kernel this CPU runs, and
/// with `lines` = 2 line oy + 1 after it (the 3x3 SIMD kernels only: `in_pairs`).
#[inline(always)]
fn dw_line<L: Load>(x: &Activations, s: &SepConv, load: L, (b, oy, ow, pt, pl): (usize, usize, usize, usize, usize), lines: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::packed::Kernel;
        match crate::packed::kernel() {
            // SAFETY: the CPU has AVX-512F and FMA (checked by `kernel`).
            Kernel::Avx512 if s.k == 3 => {
                return unsafe { dw3::avx512::<false>(load.transform(), x, s, (b, oy, ow, pt, pl), lines, out.as_mut_ptr().cast(), out.len(), (s.channels, 0)) };
            }
            // SAFETY: the CPU has AVX2 and FMA (checked by `kernel`).
            Kernel::Avx2 if s.k == 3 => return unsafe { dw3::avx2(load.transform(), x, s, (b, oy, ow, pt, pl), lines, out) },
            // Other kernel sizes: the plain loop, which `simd` compiles for AVX-512 or AVX2, both
            // with FMA.
            Kernel::Avx512 | Kernel::Avx2 => {
                assert_eq!(lines, 1, "depthwise: the plain loop makes one line at a time");
                return simd(
                    #[inline(always)]
                    || dw_row::<true, L>(x, s, load, b, oy, ow, pt, pl, out),
                )
            }
            Kernel::Portable => {}
        }
    }
    assert_eq!(lines, 1, "depthwise: the plain loop makes one line at a time");
    dw_row::<false, L>(x, s, load, b, oy, ow, pt, pl, out);
}

/// Consecutive output lines of the 3x3 depthwise conv in bf16 from `line`, as many as `out`
/// holds, two at a time where it can (`in_pairs`; AVX-512 machines: bf16 products need AMX or
/// AVX512-BF16, which come with it): each pixel's channels at `stride` values apart, zeros after
/// them; with `lo` (bf16x3) split in two (`amx::split_bf16`), the lo values `lo` after the hi
/// values.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn dw_lines16<L: Load>(x: &Activations, s: &SepConv, load: L, (line, oh): (usize, usize), ow: usize, pt: usize, pl: usize, out: &mut [u16], (stride, lo): (usize, Option<usize>)) {
    let (c, per) = (s.channels, ow * stride);
    assert!(s.k == 3 && crate::packed::has_avx512() && stride >= lo.map_or(c, |lo| lo + c), "bf16 depthwise: 3x3 on AVX-512 only");
    assert!(per > 0 && out.len().is_multiple_of(per), "bf16 depthwise lines: {} values for lines of {per}", out.len());
    by_pairs(line, out.len() / per, oh, in_pairs(s), |at, b, oy, n| {
        let now = &mut out[at * per..(at + n) * per];
        // SAFETY: the CPU has AVX-512F and FMA (checked above).
        unsafe { dw3::avx512::<true>(load.transform(), x, s, (b, oy, ow, pt, pl), n, now.as_mut_ptr().cast(), now.len(), (stride, lo.unwrap_or(0))) };
    });
    for px in out.chunks_mut(stride) {
        match lo {
            None => px[c..].fill(0),
            Some(lo) => {
                px[c..lo].fill(0);
                px[lo + c..].fill(0);
            }
        }
    }
}

/// The 3x3 depthwise conv in SIMD registers, sixteen channels at a time with AVX-512 and eight
/// with AVX2: their nine tap weights held in registers for a run of output pixels, each output
/// vector accumulated in a register and stored once. One generic line serves both widths.
#[cfg(target_arch = "x86_64")]
pub(crate) mod dw3 {
    use super::*;
    use std::arch::x86_64::*;

    /// The vector operations of one SIMD width. Every method is inlined into the
    /// target-feature functions below, where the intrinsics compile to single instructions.
    pub(crate) trait Vector: Copy {
        const LANES: usize;
        /// Pixels per register-blocked run (at most 8; their accumulators, nine weights and
        /// a loaded vector fit the registers).
        const RUN: usize;
        /// Which lanes of a ragged last vector are valid.
        type Mask: Copy;
        unsafe fn mask(valid: usize) -> Self::Mask;
        /// Loads the valid lanes, zeros in the others.
        unsafe fn load(m: Self::Mask, p: *const f32) -> Self;
        /// Loads a whole vector (no mask: a zero-masked AVX-512 load costs a vector ALU
        /// operation besides the load).
        unsafe fn load_full(p: *const f32) -> Self;
        unsafe fn store(m: Self::Mask, p: *mut f32, v: Self);
        /// Stores a whole vector.
        unsafe fn store_full(p: *mut f32, v: Self);
        unsafe fn zero() -> Self;
        /// Every lane `v`.
        unsafe fn splat(v: f32) -> Self;
        unsafe fn add(a: Self, b: Self) -> Self;
        unsafe fn sub(a: Self, b: Self) -> Self;
        unsafe fn mul(a: Self, b: Self) -> Self;
        unsafe fn max(a: Self, b: Self) -> Self;
        /// a * b + c, one rounding.
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    }

    impl Vector for __m512 {
        const LANES: usize = 16;
        const RUN: usize = 8;
        type Mask = __mmask16;
        #[inline(always)]
        unsafe fn mask(valid: usize) -> __mmask16 {
            crate::packed::lane_mask(valid)
        }
        #[inline(always)]
        unsafe fn load(m: __mmask16, p: *const f32) -> __m512 {
            _mm512_maskz_loadu_ps(m, p)
        }
        #[inline(always)]
        unsafe fn load_full(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(m: __mmask16, p: *mut f32, v: __m512) {
            _mm512_mask_storeu_ps(p, m, v)
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m512 {
            _mm512_set1_ps(v)
        }
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn store_full(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
    }

    /// AVX2 has no mask registers: the count of valid lanes, and VMASKMOV's mask for a ragged
    /// vector (VMASKMOV is slow on some AVX2 cores, so whole vectors use plain moves).
    #[derive(Clone, Copy)]
    pub(crate) struct Lanes8 {
        valid: usize,
        mask: __m256i,
    }

    impl Vector for __m256 {
        const LANES: usize = 8;
        const RUN: usize = 4;
        type Mask = Lanes8;
        #[inline(always)]
        unsafe fn mask(valid: usize) -> Lanes8 {
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid.min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            Lanes8 { valid, mask }
        }
        #[inline(always)]
        unsafe fn load(m: Lanes8, p: *const f32) -> __m256 {
            if m.valid >= 8 {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, m.mask)
            }
        }
        #[inline(always)]
        unsafe fn load_full(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(m: Lanes8, p: *mut f32, v: __m256) {
            if m.valid >= 8 {
                _mm256_storeu_ps(p, v)
            } else {
                _mm256_maskstore_ps(p, m.mask, v)
            }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            _mm256_set1_ps(v)
        }
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn store_full(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
    }

    /// Calls `$f::<AFFINE, RELU, ..>` for the load transform `$t` (monomorphised, so the
    /// innermost loop has no branch on it).
    macro_rules! by_transform {
        ($t:expr, $f:ident $(, $extra:ident)?; $($arg:expr),*) => {
            match $t {
                (None, false) => $f::<false, false $(, $extra)?>(&[], &[], $($arg),*),
                (None, true) => $f::<false, true $(, $extra)?>(&[], &[], $($arg),*),
                (Some((sc, sh)), false) => $f::<true, false $(, $extra)?>(sc, sh, $($arg),*),
                (Some((sc, sh)), true) => $f::<true, true $(, $extra)?>(sc, sh, $($arg),*),
            }
        };
    }

    /// Output line `oy` of image `b` with AVX-512 for the load transform `t`, and with `lines`
    /// = 2 line oy + 1 after it (`ow * stride` values on; stride 1 and no dilation only): out
    /// holds `len` values (f32, or bf16 with `BF16`), pixels `stride` values apart; with `BF16`
    /// and `lo` > 0 each value split in two (`amx::split_bf16`), the lo values `lo` after the hi
    /// values.
    ///
    /// Two lines at once load the four input lines they read once for both, and each channel
    /// vector's weights once: the same values as one at a time (the same sums in the same
    /// order). The fp32 kernel alone (`xception bench --ops --threads 2`, four alternations, AMD
    /// Zen 4, 2026-12-07): 74x74x256 0.178-0.189 -> 0.159-0.167 ms, 37x37x728 0.132-0.134 ->
    /// 0.113-0.115, 19x19x728 0.039-0.041 -> 0.031-0.032, 10x10x1536 0.022 -> 0.020; one thread
    /// (three alternations) 74x74x256 0.358-0.364 -> 0.305-0.366, 37x37x728 0.256-0.257 ->
    /// 0.217-0.229, 19x19x728 0.076-0.083 -> 0.063-0.064, 10x10x1536 0.042-0.043 -> 0.033-0.036.
    /// The AVX2 kernel (`avx2`) makes pairs too, with runs of four pixels: its eight
    /// accumulators and nine weights pass its 16 registers, yet alone, one thread, five
    /// alternations, `XCEPTION_ENGINE_NO_AVX512=1`: 37x37x728 0.335-0.556 -> 0.257-0.265 ms,
    /// 19x19x728 0.095-0.097 -> 0.071-0.074, 10x10x1536 0.053-0.054 -> 0.044 (mostly), 74x74x256
    /// 0.49-0.99 -> 0.42-0.80.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn avx512<const BF16: bool>(t: Transform, x: &Activations, s: &SepConv, at: (usize, usize, usize, usize, usize), lines: usize, out: *mut u8, len: usize, (stride, lo): (usize, usize)) {
        by_transform!(t, on_avx512, BF16; x, s, at, lines, out, len, stride, lo)
    }

    /// One output line of a max pool (+ `residual`), a vector of channels at a time: the
    /// window's taps (`taps(ox)`: up to MAX_TAPS pointers to a pixel's first channel) maxed in a
    /// register and stored once. Same values as the scalar `pool_line` (a max of the same set,
    /// the residual added after).
    #[inline(always)]
    unsafe fn pool<V: Vector>(ow: usize, c: usize, taps: impl Fn(usize, &mut [*const f32; MAX_TAPS]) -> usize, residual: Option<&[f32]>, dst: &mut [f32]) {
        let mut at = [std::ptr::null(); MAX_TAPS];
        for ox in 0..ow {
            let n = taps(ox, &mut at);
            let out = dst.as_mut_ptr().add(ox * c);
            let res = residual.map(|r| r.as_ptr().add(ox * c));
            let mut cb = 0;
            while cb < c {
                let m = V::mask(c - cb);
                let mut acc = V::load(m, at[0].add(cb));
                for t in &at[1..n] {
                    acc = V::max(V::load(m, t.add(cb)), acc);
                }
                if let Some(r) = res {
                    acc = V::add(acc, V::load(m, r.add(cb)));
                }
                V::store(m, out.add(cb), acc);
                cb += V::LANES;
            }
        }
    }

    /// The most taps of a pool window `pool_avx512` / `pool_avx2` take (3x3 windows and 4x4).
    pub const MAX_TAPS: usize = 16;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn pool_avx512(ow: usize, c: usize, taps: impl Fn(usize, &mut [*const f32; MAX_TAPS]) -> usize, residual: Option<&[f32]>, dst: &mut [f32]) {
        pool::<__m512>(ow, c, taps, residual, dst)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn pool_avx2(ow: usize, c: usize, taps: impl Fn(usize, &mut [*const f32; MAX_TAPS]) -> usize, residual: Option<&[f32]>, dst: &mut [f32]) {
        pool::<__m256>(ow, c, taps, residual, dst)
    }

    /// Output line `oy` of image `b` with AVX2 (f32, pixels `s.channels` values apart), and with
    /// `lines` = 2 line oy + 1 after it, as `avx512` makes them.
    pub unsafe fn avx2(t: Transform, x: &Activations, s: &SepConv, at: (usize, usize, usize, usize, usize), lines: usize, out: &mut [f32]) {
        by_transform!(t, on_avx2; x, s, at, lines, out.as_mut_ptr(), out.len())
    }

    /// `BF16`: the outputs are rounded to bf16 (nearest, ties to even) as they are stored.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn on_avx512<const AFFINE: bool, const RELU: bool, const BF16: bool>(
        scale: &[f32],
        shift: &[f32],
        x: &Activations,
        s: &SepConv,
        (b, oy, ow, pt, pl): (usize, usize, usize, usize, usize),
        lines: usize,
        out: *mut u8,
        len: usize,
        stride: usize,
        lo: usize,
    ) {
        assert!(lines == 1 || (lines == 2 && s.k == 3 && s.stride == 1 && s.dilation == 1));
        // Where the last line starts, and the values from there.
        let (last, len1) = ((lines - 1) * ow * stride, len.saturating_sub((lines - 1) * ow * stride));
        assert!(ow == 0 || (stride >= s.channels && len1 >= (ow - 1) * stride + s.channels));
        assert!(lo == 0 || (BF16 && lo >= s.channels && stride >= lo + s.channels && (ow == 0 || len1 >= (ow - 1) * stride + lo + s.channels)));
        // Round to nearest even on the bits (AVX-512F only: vpmovdw narrows and stores), NaN
        // kept quiet, as amx::to_bf16; the bf16 as 32-bit lanes.
        let round = |v: __m512| {
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40))
        };
        // In bf16 whole vectors are narrowed in a register and stored unmasked: VPMOVDW to memory
        // (masked) ran the depthwise convs 1.6-2.7x slower on AMD Zen 4 (one thread, `bench --ops`:
        // 74x74x256 1.07 -> 0.40 ms, 37x37x728 0.43 -> 0.26). A ragged last vector is stored
        // whole too where the pixel's padding has room (`dw_line16` zeroes it after).
        let c16 = s.channels.next_multiple_of(16);
        let room = if lo == 0 { stride >= c16 } else { lo >= c16 && stride >= lo + c16 };
        let whole = BF16 && room && (ow == 0 || len1 >= (ow - 1) * stride + lo + c16);
        let narrow = |at: usize, m: __mmask16, h: __m512i| {
            let to = out.cast::<u16>().add(at);
            if m == 0xffff || whole {
                _mm256_storeu_si256(to.cast(), _mm512_cvtepi32_epi16(h));
            } else {
                _mm512_mask_cvtepi32_storeu_epi16(to.cast(), m, h);
            }
        };
        let store = |at: usize, m: __mmask16, v: __m512| {
            if BF16 {
                let h = round(v);
                narrow(at, m, h);
                if lo > 0 {
                    // What the hi value leaves over, rounded in turn, zero where hi is not finite
                    // (amx::split_bf16).
                    let hf = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h));
                    let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(hf), _mm512_set1_ps(f32::INFINITY));
                    let left = _mm512_maskz_mov_epi32(finite, round(_mm512_sub_ps(v, hf)));
                    narrow(at + lo, m, left);
                }
            } else {
                _mm512_mask_storeu_ps(out.cast::<f32>().add(at), m, v);
            }
        };
        if lines == 2 {
            pair::<__m512, AFFINE, RELU>(scale, shift, x, s, (b, oy, ow, pt, pl), stride, |l, at, m, v| store(l * last + at, m, v))
        } else {
            line::<__m512, AFFINE, RELU>(scale, shift, x, s, (b, oy, ow, pt, pl), len, stride, store)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn on_avx2<const AFFINE: bool, const RELU: bool>(
        scale: &[f32],
        shift: &[f32],
        x: &Activations,
        s: &SepConv,
        (b, oy, ow, pt, pl): (usize, usize, usize, usize, usize),
        lines: usize,
        out: *mut f32,
        len: usize,
    ) {
        let c = s.channels;
        assert!(ow == 0 || len >= (lines - 1) * ow * c + (ow - 1) * c + c);
        let store = |at: usize, m: Lanes8, v: __m256| __m256::store(m, out.add(at), v);
        if lines == 2 {
            pair::<__m256, AFFINE, RELU>(scale, shift, x, s, (b, oy, ow, pt, pl), c, |l, at, m, v| store(l * ow * c + at, m, v))
        } else {
            line::<__m256, AFFINE, RELU>(scale, shift, x, s, (b, oy, ow, pt, pl), len, c, store)
        }
    }

    /// Channels [cb, cb + V::LANES) of a 3x3 depthwise conv (valid lanes `m`; `FULL`: all of
    /// them, loaded without a mask): the load transform's scale and shift, the nine tap weights
    /// (`dw`, tap-major, `c` channels a tap) and the bias, loaded once for a run of pixels.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn channel_taps<V: Vector, const AFFINE: bool, const FULL: bool>(m: V::Mask, cb: usize, c: usize, dw: *const f32, bias: Option<*const f32>, scale: &[f32], shift: &[f32]) -> ((V, V), [V; 9], V) {
        let zero = V::zero();
        let get = |p: *const f32| if FULL { V::load_full(p) } else { V::load(m, p) };
        let affine = if AFFINE { (get(scale.as_ptr().add(cb)), get(shift.as_ptr().add(cb))) } else { (zero, zero) };
        // A plain loop: `array::map` is not always inlined, and outside the caller's target
        // features the loads would be calls.
        let mut w = [zero; 9];
        for (t, w) in w.iter_mut().enumerate() {
            *w = get(dw.add(t * c + cb));
        }
        (affine, w, bias.map_or(zero, |b| get(b.add(cb))))
    }

    /// One input vector as the depthwise conv reads it: loaded (`FULL`: without a mask), then
    /// `v * scale + shift` with `AFFINE`, then max(0) with `RELU`.
    #[inline(always)]
    unsafe fn load_input<V: Vector, const AFFINE: bool, const RELU: bool, const FULL: bool>(m: V::Mask, p: *const f32, (scale, shift): (V, V)) -> V {
        let mut v = if FULL { V::load_full(p) } else { V::load(m, p) };
        if AFFINE {
            v = V::add(V::mul(v, scale), shift);
        }
        if RELU {
            v = V::max(v, V::zero());
        }
        v
    }

    /// What a stride-1 run reads and writes: the input lines (None: in the padding; the first
    /// three for one output line, all four for a pair), the input width, channels and left
    /// padding, the taps' weights and bias, the load transform's scale and shift, and the output
    /// pixel stride.
    struct Run<'a> {
        lines: [Option<*const f32>; 4],
        w: usize,
        c: usize,
        pl: usize,
        dw: *const f32,
        bias: Option<*const f32>,
        scale: &'a [f32],
        shift: &'a [f32],
        stride: usize,
        mid_relu: bool,
    }

    /// A stride-1 line of `ow` pixels at dilation D (with `PAIR`, two consecutive lines at
    /// dilation 1), in register-blocked runs (`run`) of V::RUN pixels, the line's last few in
    /// runs of 4, 2 and 1. `store(l, at, mask, vector)`: l the line of the pair.
    #[inline(always)]
    unsafe fn runs<V: Vector, const AFFINE: bool, const RELU: bool, const D: usize, const PAIR: bool>(at: &Run, ow: usize, store: &impl Fn(usize, usize, V::Mask, V)) {
        let mut first = 0;
        while first < ow {
            let r = match ow - first {
                left if left >= 8 && V::RUN >= 8 => 8,
                left if left >= 4 && V::RUN >= 4 => 4,
                left if left >= 2 => 2,
                _ => 1,
            };
            // Whether the run's window reaches into the padding left or right.
            let ix0 = first as isize - at.pl as isize;
            let edge = ix0 < 0 || ix0 + (r + 2 * D) as isize > at.w as isize;
            match (r, edge) {
                (8, false) => run::<V, AFFINE, RELU, 8, false, D, PAIR>(at, first, store),
                (8, true) => run::<V, AFFINE, RELU, 8, true, D, PAIR>(at, first, store),
                (4, false) => run::<V, AFFINE, RELU, 4, false, D, PAIR>(at, first, store),
                (4, true) => run::<V, AFFINE, RELU, 4, true, D, PAIR>(at, first, store),
                (2, false) => run::<V, AFFINE, RELU, 2, false, D, PAIR>(at, first, store),
                (2, true) => run::<V, AFFINE, RELU, 2, true, D, PAIR>(at, first, store),
                (_, false) => run::<V, AFFINE, RELU, 1, false, D, PAIR>(at, first, store),
                (_, true) => run::<V, AFFINE, RELU, 1, true, D, PAIR>(at, first, store),
            }
            first += r;
        }
    }

    /// Output pixels [first, first + R) of a stride-1 line at dilation D (R <= V::RUN), a vector
    /// of channels at a time: the nine weights in registers, each input vector loaded once and
    /// used for each of the (up to three) pixels whose taps read it, 3 (R + 2D) loads for 9 R
    /// multiply-adds. Taps in the padding (lines that are None, columns outside the image) are
    /// skipped, and each pixel takes its taps in the order (ky, kx): the same sums as one pixel
    /// at a time. With `PAIR` the same pixels of two consecutive lines: the two input lines they
    /// share loaded once for both, 4 (R + 2) loads for 18 R multiply-adds.
    #[inline(always)]
    unsafe fn run<V: Vector, const AFFINE: bool, const RELU: bool, const R: usize, const EDGE: bool, const D: usize, const PAIR: bool>(at: &Run, first: usize, store: &impl Fn(usize, usize, V::Mask, V)) {
        debug_assert!(R <= V::RUN);
        let (c, ix0) = (at.c, first as isize - at.pl as isize);
        debug_assert_eq!(EDGE, ix0 < 0 || ix0 + (R + 2 * D) as isize > at.w as isize);
        // Whole vectors of channels, then the ragged last one under a mask.
        let whole = c - c % V::LANES;
        let mut cb = 0;
        while cb < whole {
            block::<V, AFFINE, RELU, R, EDGE, true, D, PAIR>(at, first, cb, store);
            cb += V::LANES;
        }
        if cb < c {
            block::<V, AFFINE, RELU, R, EDGE, false, D, PAIR>(at, first, cb, store);
        }
    }

    /// Channels [cb, cb + V::LANES) of `run`'s pixels (`FULL`: all of them valid, so every
    /// load is a plain one).
    #[inline(always)]
    unsafe fn block<V: Vector, const AFFINE: bool, const RELU: bool, const R: usize, const EDGE: bool, const FULL: bool, const D: usize, const PAIR: bool>(at: &Run, first: usize, cb: usize, store: &impl Fn(usize, usize, V::Mask, V)) {
        debug_assert!(!PAIR || D == 1);
        let Run { lines, w, c, pl, dw, bias, scale, shift, stride, mid_relu } = *at;
        let zero = V::zero();
        // Input column of the window's first tap; with EDGE some of the R + 2D columns are outside.
        let ix0 = first as isize - pl as isize;
        let m = V::mask(c - cb);
        let (affine, wt, b) = channel_taps::<V, AFFINE, FULL>(m, cb, c, dw, bias, scale, shift);
        let load = |p: *const f32| load_input::<V, AFFINE, RELU, FULL>(m, p, affine);
        // The first line's sums, and the second's with PAIR.
        let mut acc = [b; R];
        let mut acc2 = [b; R];
        // One input line's taps, written out for each line (a macro: a closure would be
        // compiled without this function's target features), so that the lines unroll and
        // the weights stay in registers (a loop over ky kept them on the stack). Input line
        // `$r` is kernel row $r of the first output line and row $r - 1 of the second.
        macro_rules! taps {
            ($r:literal) => {
                if let Some(line) = lines[$r] {
                    for j in 0..R + 2 * D {
                        let ix = ix0 + j as isize;
                        if EDGE && (ix < 0 || ix >= w as isize) {
                            continue;
                        }
                        let v = load(line.add(ix as usize * c + cb));
                        for kx in 0..3 {
                            if j >= kx * D && j - kx * D < R {
                                // (Indices modulo 3 only so that every arm compiles.)
                                if $r < 3 {
                                    acc[j - kx * D] = V::fmadd(v, wt[$r % 3 * 3 + kx], acc[j - kx * D]);
                                }
                                if PAIR && $r >= 1 {
                                    acc2[j - kx * D] = V::fmadd(v, wt[($r + 2) % 3 * 3 + kx], acc2[j - kx * D]);
                                }
                            }
                        }
                    }
                }
            };
        }
        taps!(0);
        taps!(1);
        taps!(2);
        if PAIR {
            taps!(3);
        }
        for (l, acc) in [acc, acc2].into_iter().take(1 + PAIR as usize).enumerate() {
            for (i, mut a) in acc.into_iter().enumerate() {
                if mid_relu {
                    a = V::max(a, zero);
                }
                store(l, (first + i) * stride + cb, m, a);
            }
        }
    }

    /// Output lines `oy` and `oy + 1` of image `b` of a stride-1, undilated conv, as `line`
    /// makes each, through `store(l, at, mask, vector)` (l: 0 or 1, the line).
    #[inline(always)]
    unsafe fn pair<V: Vector, const AFFINE: bool, const RELU: bool>(
        scale: &[f32],
        shift: &[f32],
        x: &Activations,
        s: &SepConv,
        (b, oy, ow, pt, pl): (usize, usize, usize, usize, usize),
        stride: usize,
        store: impl Fn(usize, usize, V::Mask, V),
    ) {
        let c = s.channels;
        assert!(s.k == 3 && s.stride == 1 && s.dilation == 1);
        assert!(s.dw.len() >= 9 * c && (!AFFINE || (scale.len() >= c && shift.len() >= c)));
        // The four input lines the taps read (None: in the padding).
        let lines = std::array::from_fn(|r| x.line(b, (oy + r) as isize - pt as isize).map(<[f32]>::as_ptr));
        let at = Run { lines, w: x.w, c, pl, dw: s.dw.as_ptr(), bias: s.dw_bias.as_ref().map(|b| b.as_ptr()), scale, shift, stride, mid_relu: s.mid_relu };
        runs::<V, AFFINE, RELU, 1, true>(&at, ow, &store)
    }

    /// Output line `oy` of image `b` (`ow` pixels; `pt`, `pl` the padding before), each pixel
    /// `stride` values after the previous one, through `store(at, mask, vector)`.
    /// `AFFINE`: each input value goes through `v * scale + shift` as it loads; `RELU`: then max(0).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn line<V: Vector, const AFFINE: bool, const RELU: bool>(
        scale: &[f32],
        shift: &[f32],
        x: &Activations,
        s: &SepConv,
        (b, oy, ow, pt, pl): (usize, usize, usize, usize, usize),
        len: usize,
        stride: usize,
        store: impl Fn(usize, V::Mask, V),
    ) {
        let (c, st, d) = (s.channels, s.stride, s.dilation);
        assert!(ow == 0 || (stride >= c && len >= (ow - 1) * stride + c));
        assert!(s.dw.len() >= 9 * c && (!AFFINE || (scale.len() >= c && shift.len() >= c)));
        // The three input lines the taps read (None: in the padding).
        let lines: [Option<*const f32>; 3] = std::array::from_fn(|ky| {
            let iy = (oy * st + ky * d) as isize - pt as isize;
            x.line(b, iy).map(<[f32]>::as_ptr)
        });
        let [l0, l1, l2] = lines;
        let zero = V::zero();
        let dw = s.dw.as_ptr();
        if st == 1 && matches!(d, 1 | 2 | 4) {
            // Every pixel, the borders and the lines in the padding included, in register-blocked
            // runs of RUN pixels, the line's last few in runs of 4, 2 and 1. Against runs for the
            // interior only, with each border pixel (and every pixel of a line with a row in the
            // padding) taken one at a time: one thread, the kernel alone, best of five, 10-30%
            // faster at every flow shape (147x147x128: 2.02-2.09 -> 1.44-1.48 ms; 19x19x728:
            // 0.134-0.135 -> 0.124-0.128 ms; 2026-12-06); with the kernel rows written out, EDGE
            // and unmasked loads (`block`) 1.24-1.34 and 0.098-0.100 ms. Dilated (DeepLab's
            // output strides 16 and 8) the same runs read R + 2d columns a kernel row.
            let at = Run { lines: [l0, l1, l2, None], w: x.w, c, pl, dw, bias: s.dw_bias.as_ref().map(|b| b.as_ptr()), scale, shift, stride, mid_relu: s.mid_relu };
            let store = |_, at, m, v| store(at, m, v);
            match d {
                1 => runs::<V, AFFINE, RELU, 1, false>(&at, ow, &store),
                2 => runs::<V, AFFINE, RELU, 2, false>(&at, ow, &store),
                _ => runs::<V, AFFINE, RELU, 4, false>(&at, ow, &store),
            }
            return;
        }
        // All three lines inside the image, and the outputs [inner.0, inner.1) whose taps are all
        // inside it horizontally.
        let full = match lines {
            [Some(a), Some(b), Some(c)] => Some([a, b, c]),
            _ => None,
        };
        let lo = pl.div_ceil(st);
        let hi = if x.w + pl > 2 * d { ((x.w + pl - 2 * d - 1) / st + 1).min(ow) } else { 0 };
        let inner = (lo, hi.max(lo));
        // Strided or dilated: one pixel at a time, each channel vector's nine weights loaded
        // once into registers for TILE output pixels.
        const TILE: usize = 8;
        let mut ox0 = 0;
        while ox0 < ow {
            // Tiles end where the interior begins and ends, so that every interior pixel takes
            // the path without checks.
            let ox1 = if ox0 < inner.0 { inner.0.min(ox0 + TILE) } else if ox0 < inner.1 { inner.1.min(ox0 + TILE) } else { ox0 + TILE }.min(ow);
            let interior = full.is_some() && ox0 >= inner.0 && ox1 <= inner.1;
            let mut cb = 0;
            while cb < c {
                let m = V::mask(c - cb);
                let (affine, w, bias) = channel_taps::<V, AFFINE, false>(m, cb, c, dw, s.dw_bias.as_ref().map(|b| b.as_ptr()), scale, shift);
                let load = |p: *const f32| load_input::<V, AFFINE, RELU, false>(m, p, affine);
                for ox in ox0..ox1 {
                    let mut acc = bias;
                    if interior {
                        let base = full.expect("interior");
                        // Away from the borders: nine taps, no checks.
                        let at = (ox * st - pl) * c + cb;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                acc = V::fmadd(load(base[ky].add(at + kx * d * c)), w[ky * 3 + kx], acc);
                            }
                        }
                    } else {
                        let ix0 = (ox * st) as isize - pl as isize;
                        for (ky, line) in lines.iter().enumerate() {
                            let Some(line) = *line else { continue };
                            for kx in 0..3 {
                                let ix = ix0 + (kx * d) as isize;
                                if ix >= 0 && (ix as usize) < x.w {
                                    acc = V::fmadd(load(line.add(ix as usize * c + cb)), w[ky * 3 + kx], acc);
                                }
                            }
                        }
                    }
                    if s.mid_relu {
                        acc = V::max(acc, zero);
                    }
                    store(ox * stride + cb, m, acc);
                }
                cb += V::LANES;
            }
            ox0 = ox1;
        }
    }
}

/// The depthwise conv's output size and its line makers for `Lhs::Lines` (`fill`, and
/// `fill16` where the bf16 kernel runs).
type DwLines<'a, 'f> = (usize, usize, &'f Fill<'a>, Option<&'f Fill16<'a>>);

/// Calls `f((oh, ow, fill, fill16))` with the depthwise output's size and `fill(line, out)`,
/// which writes one output line (input transform and folded norm included) with the kernel for
/// this conv's input transform; `fill16` the same in bf16 for a bf16 product (AVX-512 3x3).
pub(crate) fn with_depthwise<R>(x: &Activations, s: &SepConv, f: impl FnOnce(DwLines) -> R) -> R {
    fn lines<L: Load, R>(x: &Activations, s: &SepConv, load: L, f: impl FnOnce(DwLines) -> R) -> R {
        let (pt, oh) = out_size(s.padding, x.h, s.k, s.stride, s.dilation);
        let (pl, ow) = out_size(s.padding, x.w, s.k, s.stride, s.dilation);
        let fill = |line: usize, out: &mut [f32]| dw_lines(x, s, load, (line, oh), ow, pt, pl, out);
        #[cfg(target_arch = "x86_64")]
        if let (Some(b16), 3, true) = (s.pw.bf16(), s.k, crate::packed::has_avx512()) {
            let stride = crate::amx::lhs_stride(s.channels, s.channels, b16.pieces());
            // In two pieces a pixel's lo values follow its hi values.
            let lo = (b16.pieces() > 1).then_some(stride / 2);
            let fill16 = move |line: usize, out: &mut [u16]| dw_lines16(x, s, load, (line, oh), ow, pt, pl, out, (stride, lo));
            return f((oh, ow, &fill, Some(&fill16)));
        }
        f((oh, ow, &fill, None))
    }
    match (&s.in_affine, s.in_relu) {
        (Some(a), relu) => lines(x, s, AffineRelu { scale: &a.scale, shift: &a.shift, relu }, f),
        (None, true) => lines(x, s, Relu, f),
        (None, false) => lines(x, s, Plain, f),
    }
}

/// Output pixels of the separable conv `s` on `x` (all images).
fn sep_pixels(x: &Activations, s: &SepConv) -> usize {
    let (_, oh) = out_size(s.padding, x.h, s.k, s.stride, s.dilation);
    let (_, ow) = out_size(s.padding, x.w, s.k, s.stride, s.dilation);
    x.n * oh * ow
}

/// Multiply-adds of one output pixel of the separable conv `s`: its depthwise and pointwise parts.
pub(crate) fn sep_pixel_macs(s: &SepConv) -> usize {
    s.channels * (s.k * s.k + s.pw.n)
}

/// Multiply-adds of the separable conv `s` on `x`.
pub fn sep_conv_macs(x: &Activations, s: &SepConv) -> u64 {
    (sep_pixels(x, s) * sep_pixel_macs(s)) as u64
}

/// A separable conv: the depthwise conv feeds the pointwise GEMM band by band (see `matmul`).
/// With `residual` (the block's shortcut, same shape as the output) the GEMM adds it as it
/// stores: the residual add costs no extra pass.
pub fn sep_conv(x: &Activations, s: &SepConv, threads: usize, bufs: &Buffers, residual: Option<&[f32]>) -> Activations {
    with_depthwise(x, s, |(oh, ow, fill, fill16)| {
        let mut out = bufs.take(x.n * oh * ow * s.pw.n);
        let reads = |lines: Range<usize>| input_lines(x, s, oh, lines);
        matmul(Lhs::Lines { lines: x.n * oh, per_line: ow, fill, fill16, reads: Some(&reads) }, &s.pw, &mut out, residual, s.out_relu, threads);
        Activations { n: x.n, h: oh, w: ow, c: s.pw.n, data: out }
    })
}

/// The input lines the depthwise conv of output lines `lines` (image-major, `oh` per image)
/// reads, as one slice (of the first image the range touches).
pub(crate) fn input_lines<'x>(x: &'x Activations, s: &SepConv, oh: usize, lines: Range<usize>) -> &'x [f32] {
    let (pt, _) = out_size(s.padding, x.h, s.k, s.stride, s.dilation);
    let (b, oy0) = (lines.start / oh, lines.start % oh);
    let oy1 = (lines.end - b * oh).min(oh);
    let y0 = (oy0 * s.stride).saturating_sub(pt);
    let y1 = ((oy1 - 1) * s.stride + (s.k - 1) * s.dilation + 1).saturating_sub(pt).min(x.h);
    let line = x.w * x.c;
    &x.data[(b * x.h + y0) * line..(b * x.h + y1.max(y0)) * line]
}

/// The depthwise half alone into `mid`; returns (h, w). For timing the kernel (`bench_ops`).
pub fn depthwise_into(x: &Activations, s: &SepConv, mid: &mut Vec<f32>) -> (usize, usize) {
    with_depthwise(x, s, |(oh, ow, fill, _)| {
        mid.resize(x.n * oh * ow * s.channels, 0.0);
        mid.par_chunks_mut(2 * ow * s.channels).enumerate().for_each(|(t, out)| fill(2 * t, out));
        (oh, ow)
    })
}

/// A max pool's geometry: window, stride, and (for input h x w) the padding before and the output
/// size along each axis.
#[derive(Clone, Copy)]
pub struct PoolShape {
    pub k: usize,
    pub stride: usize,
    pub top: usize,
    pub oh: usize,
    pub left: usize,
    pub ow: usize,
}

impl PoolShape {
    pub fn new(k: usize, stride: usize, padding: Padding, h: usize, w: usize) -> PoolShape {
        let (top, oh) = out_size(padding, h, k, stride, 1);
        let (left, ow) = out_size(padding, w, k, stride, 1);
        PoolShape { k, stride, top, oh, left, ow }
    }

    /// The input lines output line `oy` reads, clipped to `h` lines.
    fn lines(&self, oy: usize, h: usize) -> std::ops::Range<usize> {
        let first = (oy * self.stride).saturating_sub(self.top);
        first..(oy * self.stride + self.k).saturating_sub(self.top).min(h)
    }
}

/// Output line `oy` of a max pool into `dst` (+ `residual`, laid out like `dst`): the input is
/// `w` pixels of `c` channels a line, `line(iy)` giving input line iy of the `h` lines.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pool_line<'a>(p: &PoolShape, line: impl Fn(usize) -> &'a [f32], h: usize, w: usize, c: usize, oy: usize, residual: Option<&[f32]>, dst: &mut [f32]) {
    let rows = p.lines(oy, h);
    #[cfg(target_arch = "x86_64")]
    if rows.len() * p.k <= dw3::MAX_TAPS {
        use crate::packed::Kernel;
        let taps = |ox: usize, at: &mut [*const f32; dw3::MAX_TAPS]| {
            let x0 = (ox * p.stride).saturating_sub(p.left);
            let x1 = (ox * p.stride + p.k).saturating_sub(p.left).min(w);
            let mut n = 0;
            for iy in rows.clone() {
                let src = line(iy);
                for ix in x0..x1 {
                    at[n] = src[ix * c..][..c].as_ptr();
                    n += 1;
                }
            }
            debug_assert!(n > 0, "an empty pool window");
            n
        };
        // Measured (xception, two threads, per-step medians, four alternations): the three
        // max pool steps 1.22-1.31 ms against 1.51-1.72 with the scalar loop below.
        match crate::packed::kernel() {
            // SAFETY: the CPU has AVX-512F (checked by `kernel`); every tap points at c values.
            Kernel::Avx512 => return unsafe { dw3::pool_avx512(p.ow, c, taps, residual, dst) },
            // SAFETY: the CPU has AVX2 (checked by `kernel`).
            Kernel::Avx2 => return unsafe { dw3::pool_avx2(p.ow, c, taps, residual, dst) },
            Kernel::Portable => {}
        }
    }
    pool_line_scalar(p, line, h, w, c, oy, residual, dst)
}

/// `pool_line` as a plain loop (compiled for AVX-512 or AVX2 by `simd` where the CPU has them):
/// the maximum gathered in `dst`, tap by tap.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pool_line_scalar<'a>(p: &PoolShape, line: impl Fn(usize) -> &'a [f32], h: usize, w: usize, c: usize, oy: usize, residual: Option<&[f32]>, dst: &mut [f32]) {
    let rows = p.lines(oy, h);
    simd(
        #[inline(always)]
        || {
            for ox in 0..p.ow {
                let acc = &mut dst[ox * c..][..c];
                acc.fill(f32::NEG_INFINITY);
                let x0 = (ox * p.stride).saturating_sub(p.left);
                let x1 = (ox * p.stride + p.k).saturating_sub(p.left).min(w);
                for iy in rows.clone() {
                    let src = line(iy);
                    for ix in x0..x1 {
                        acc.iter_mut().zip(&src[ix * c..][..c]).for_each(|(a, &v)| *a = a.max(v));
                    }
                }
                if let Some(r) = residual {
                    acc.iter_mut().zip(&r[ox * c..][..c]).for_each(|(a, &v)| *a += v);
                }
            }
        },
    )
}

/// What a pool adds to its output (the shortcut of an entry-flow block): values laid out like the
/// output, or the shortcut's projection (a 1x1 conv of stride s without padding on the block's
/// input, `projects_in_pool`), made a pool line at a time as the pool stores it, so the shortcut
/// never goes to memory. The same values either way (the same products, row by row).
#[derive(Clone, Copy)]
pub enum Residual<'a> {
    Ready(&'a [f32]),
    Project(&'a DenseConv, &'a Activations),
}

/// `f` on the residual, if any, of output line `row` (image-major, `oh` lines an image, `ow` x
/// `n` values a line).
fn residual_line<R>(residual: Option<Residual>, row: usize, (oh, ow, n): (usize, usize, usize), f: impl FnOnce(Option<&[f32]>) -> R) -> R {
    match residual {
        None => f(None),
        Some(Residual::Ready(r)) => f(Some(&r[row * ow * n..][..ow * n])),
        Some(Residual::Project(d, x)) => SKIP.with_borrow_mut(|skip| {
            skip.resize(skip.len().max(ow * n), 0.0);
            let (b, oy) = (row / oh, row % oh);
            let a = &x.data[(b * x.h + oy * d.stride) * x.w * x.c..];
            let epi = Epilogue { relu: d.relu, ..Epilogue::PLAIN };
            // SAFETY: `skip` is this thread's own buffer.
            unsafe { gemm_rows(ow, a, d.stride * x.c, &d.weight, 0..d.weight.panels(), SharedOut::new(&mut skip[..ow * n]), n, epi) };
            f(Some(&skip[..ow * n]))
        }),
    }
}

impl Residual<'_> {
    /// Asserts that it fits an output of `images` x `oh` x `ow` x `n`.
    fn check(&self, images: usize, (oh, ow, n): (usize, usize, usize)) {
        match *self {
            Residual::Ready(r) => assert_eq!(r.len(), images * oh * ow * n, "pool residual shape"),
            Residual::Project(d, x) => {
                let out = (x.n, x.h.div_ceil(d.stride), x.w.div_ceil(d.stride), d.cout);
                assert!(d.k == 1 && d.cin == x.c && out == (images, oh, ow, n), "pool residual: a {0}x{0} projection of {1} channels to {out:?}, pool output {2:?}", d.k, x.c, (images, oh, ow, n));
            }
        }
    }

    /// Multiply-adds of a shortcut projection made with the pool output `out` (0 for a
    /// residual made before).
    pub fn macs(&self, out: &Activations) -> u64 {
        match *self {
            Residual::Ready(_) => 0,
            Residual::Project(d, _) => (out.data.len() * d.cin) as u64,
        }
    }

    /// How a step's profile line names what it adds.
    pub fn name(&self) -> &'static str {
        match self {
            Residual::Ready(_) => "residual",
            Residual::Project(..) => "shortcut 1x1",
        }
    }

    /// Values it reads (for the traffic of a step).
    pub fn reads(&self) -> usize {
        match *self {
            Residual::Ready(r) => r.len(),
            Residual::Project(d, x) => x.data.len() / (d.stride * d.stride),
        }
    }
}

thread_local! {
    /// A line of a shortcut projection made in a pool (`Residual::Project`).
    static SKIP: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether the shortcut `d` on `x` can be made in the pool (`Residual::Project`): a 1x1 conv of
/// stride 2 or more without padding, whose output lines start at input lines oy * stride; and
/// whether it pays: as for `dense_conv`'s direct path, lines enough to share out and weights
/// that stay in a core's cache, since each pool line multiplies its line by all of them (the
/// exit block's 728x1024 projection to 10x10 made in its pool: 2.0 ms against 1.1 for the
/// projection shared out by panels and the pool after). Measured for the entry flow's three
/// (xception, 299, two threads, one profile each): 7.43 / 1.05 / 1.21 ms for the block's
/// pooling step against 7.61 / 1.23 / 1.32 with the projection a step before.
pub fn projects_in_pool(d: &DenseConv, x: &Activations, threads: usize) -> bool {
    let none = |n: usize| out_size(d.padding, n, 1, d.stride, 1).0 == 0;
    let lines = x.n * x.h.div_ceil(d.stride.max(1));
    d.k == 1 && d.stride > 1 && d.dilation == 1 && d.cin == x.c && none(x.h) && none(x.w) && lines >= 8 * threads && d.weight.k * d.weight.n <= DIRECT_WEIGHTS
}

/// Max pooling; with `residual` (laid out like the output) added to each output as it is stored,
/// which is how the entry-flow blocks end (the pooled body plus the shortcut).
pub fn max_pool(x: &Activations, k: usize, stride: usize, padding: Padding, bufs: &Buffers, residual: Option<Residual>) -> Activations {
    let p = PoolShape::new(k, stride, padding, x.h, x.w);
    let (c, oh, ow) = (x.c, p.oh, p.ow);
    let mut out = bufs.take(x.n * oh * ow * c);
    if let Some(r) = residual {
        r.check(x.n, (oh, ow, c));
    }
    out.par_chunks_mut(ow * c).enumerate().for_each(|(row, dst)| {
        let b = row / oh;
        let line = |iy: usize| &x.data[(b * x.h + iy) * x.w * c..][..x.w * c];
        residual_line(residual, row, (oh, ow, c), |r| pool_line(&p, line, x.h, x.w, c, row % oh, r, dst));
    });
    Activations { n: x.n, h: oh, w: ow, c, data: out }
}

thread_local! {
    /// A band of a separable conv's output lines, pooled as soon as it is made (`sep_conv_pool`).
    static POOL_BAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether `sep_conv_pool` pays for the separable conv `s` on an input of h x w: its output must
/// be large enough to leave the cache (the entry flow's first two blocks at 299); below, the conv
/// lines made twice cost more than the memory traffic saved. In fp32 only outputs of at least
/// POOL_FUSION_F32 values an image (the first block at 299: 147x147x128). Measured (xception,
/// 299, two threads, per-step medians, five alternations): block 1's conv + pool 8.3-8.7 ms
/// unfused, 7.2-7.6 fused; block 2 (74x74x256) even, 6.4-7.1 against 6.6-7.1 (again even with
/// the SIMD pool). bf16: blocks 1 and 2 5.4-5.6 and 3.2-3.6 ms fused, 6.0-6.5 and 3.6-4.1 with
/// the earlier fusion (a band for every four pool lines, each making its own shared conv line).
/// Where the products outrun memory (`PackedB::outruns_memory`: bf16, int8 with VNNI) at any
/// size; int8 with VNNI down to a fourth of the lines (block 3 at 37x37, not the exit block's
/// 19x19). Measured with blocks 2 and 3 each chained with the conv before
/// (`pool_chain_pays`; xception, 299, two threads, per-step medians, 2026-12-07, AVX-512 VNNI):
/// int8 block 2 2.86-3.08 -> 2.22-2.39 ms, block 3 3.37-3.39 -> 3.21-3.24, the exit block's
/// 1.24 -> 1.82 (so not there); bf16 block 2 2.14 -> 1.72. Whole passes alternated: int8 27.7-29.2
/// -> 27.1-27.9 ms, xception65 42.6 -> 41.1, batch 8 209-215 -> 198-203; bf16 22.9 -> 21.9,
/// xception65 even. int8 without VNNI (twice the fp32 rate) fused block 3 even and block 4 0.65 ms
/// slower: it fuses as fp32.
pub fn pool_fusion_pays((h, w): (usize, usize), s: &SepConv, threads: usize) -> bool {
    let (_, oh) = out_size(s.padding, h, s.k, s.stride, s.dilation);
    let (_, ow) = out_size(s.padding, w, s.k, s.stride, s.dilation);
    let least = if s.pw.is_int8() { 2 } else { 8 } * BAND_ROWS * threads;
    (s.pw.outruns_memory() || oh * ow * s.pw.n >= POOL_FUSION_F32) && oh >= 4 * threads && oh * ow >= least
}

/// See `pool_fusion_pays`.
const POOL_FUSION_F32: usize = 2 << 20;
/// Runs of consecutive pool lines per worker (`sep_conv_pool`): several, so the faster core can
/// take more of them; few, since the conv line two runs share is made by both.
const POOL_RUNS_PER_WORKER: usize = 2;

/// A separable conv followed by a max pool (+ `residual`, laid out like the pooled output): the
/// conv's output lines are made band by band into a cache-resident buffer and pooled at once, so
/// the full-resolution output never goes to memory (at 299 an 11 MB write and read for the first
/// entry-flow block). Each task makes a run of consecutive pool lines of one image; the conv line
/// two neighbouring bands share (a 3x3 window of stride 2 overlaps its neighbour by one line) is
/// kept from one band to the next, so only the lines shared between runs are made twice (3 of
/// 147 at 299 on two threads, against one in eight when every band of four pool lines made its
/// own). Every output value is the same as `max_pool(sep_conv(..))`'s: the same sums in the same
/// order.
///
/// With `pre` (see `pool_chain_pays`), `s` runs on the output of the separable conv `pre` on
/// `x`, itself made band by band into a second cache-resident buffer as `s` needs its lines (a
/// `chain::Chain` of the two): neither full-resolution output goes to memory (the first
/// entry-flow block: 22 MB written and read less). The same values as
/// `max_pool(sep_conv(sep_conv(x, pre), s))`.
#[allow(clippy::too_many_arguments)]
pub fn sep_conv_pool(x: &Activations, pre: Option<&SepConv>, s: &SepConv, pool: (usize, usize, Padding), bufs: &Buffers, residual: Option<Residual>, threads: usize) -> Activations {
    fn epi<'a>(relu: bool, ahead: Fetch<'a>, writes: Fetch<'a>) -> Epilogue<'a> {
        Epilogue { residual: None, relu, accumulate: false, ahead, writes }
    }
    let Some(pre) = pre else {
        return with_depthwise(x, s, |(oh, ow, fill, fill16)| {
            let reads = |lines: Range<usize>| input_lines(x, s, oh, lines);
            pool_runs(x.n, (oh, ow, s.pw.n), pool, bufs, residual, threads, |b, lines, next, _, writes, conv| {
                let ahead = if next.is_empty() { Fetch::NONE } else { Fetch::of(reads(b * oh + next.start..b * oh + next.end)) };
                // SAFETY: `conv` is this task's own buffer.
                unsafe { band_product(b * oh + lines.start..b * oh + lines.end, ow, fill, fill16, &s.pw, SharedOut::new(conv), epi(s.out_relu, ahead, writes)) };
            })
        });
    };
    crate::chain::with_chain(x, &[pre, s], |chain| {
        let (oh, ow) = chain.output();
        pool_runs(x.n, (oh, ow, s.pw.n), pool, bufs, residual, threads, |b, lines, _, fresh, writes, conv| {
            // SAFETY: `conv` is this task's own buffer.
            unsafe { chain.make_fresh(fresh, b, lines, SharedOut::new(conv), epi(s.out_relu, Fetch::NONE, writes)) };
        })
    })
}

/// Moves a buffer of whole lines (`line` values each) from holding lines `held` to holding
/// `want`, which starts no earlier: the lines both cover move to the front, and the buffer grows
/// to fit `want`. Returns how many lines it kept (the first ones of `want`); the others are the
/// caller's to make.
pub(crate) fn slide(buf: &mut Vec<f32>, held: &mut Range<usize>, want: Range<usize>, line: usize) -> usize {
    let kept = if held.contains(&want.start) { held.end.min(want.end) - want.start } else { 0 };
    if kept > 0 {
        let from = (want.start - held.start) * line;
        buf.copy_within(from..from + kept * line, 0);
    }
    buf.resize(buf.len().max(want.len() * line), 0.0);
    *held = want;
    kept
}

/// Whether `sep_conv_pool` pays for the separable conv `pre` on `x` followed by `s` and the max
/// pool: the pool fusion pays for `s` on pre's output, and `s` is the 3x3 conv of stride 1 with a
/// line of padding on each side, so it reads pre's lines in a window that slides with it.
/// Measured on the first entry-flow block (xception, 299, two threads, per-step medians, five
/// alternations): 6.6-6.8 ms against 7.4-7.8 for the first conv alone and then the fused conv +
/// pool; bf16 (four alternations) 3.7-3.8 against 5.6-6.2; batch 8 even in fp32, 203-229 ms
/// against 229-237 in bf16.
pub fn pool_chain_pays(x: &Activations, pre: &SepConv, s: &SepConv, threads: usize) -> bool {
    let (_, oh) = out_size(pre.padding, x.h, pre.k, pre.stride, pre.dilation);
    let (_, ow) = out_size(pre.padding, x.w, pre.k, pre.stride, pre.dilation);
    let slides = |n: usize| out_size(s.padding, n, s.k, s.stride, s.dilation) == (1, n);
    s.k == 3 && s.stride == 1 && s.dilation == 1 && s.channels == pre.pw.n && slides(oh) && slides(ow) && slides(1) && pool_fusion_pays((oh, ow), s, threads)
}

/// The runs of pool lines of `sep_conv_pool` and the pool of each band: `make(b, lines, next,
/// fresh, writes, conv)` writes conv lines `lines` of image b (`oh` x `ow` x `n` an image) into
/// `conv`; `next`: the lines the band after it makes (empty after a run's last band); `fresh`:
/// the first band of a run; `writes`: the pool lines stored right after (to prefetch).
#[allow(clippy::too_many_arguments)]
fn pool_runs(images: usize, (oh, ow, n): (usize, usize, usize), (k, stride, padding): (usize, usize, Padding), bufs: &Buffers, residual: Option<Residual>, threads: usize, make: impl Fn(usize, Range<usize>, Range<usize>, bool, Fetch, &mut [f32]) + Sync) -> Activations {
    let p = PoolShape::new(k, stride, padding, oh, ow);
    let mut out = bufs.take(images * p.oh * p.ow * n);
    if let Some(r) = residual {
        r.check(images, (p.oh, p.ow, n));
    }
    let shared = SharedOut::new(&mut out);
    // Pool lines per band: the band's new conv lines (`stride` a pool line) about BAND_ROWS
    // rows, as in `matmul`'s bands (measured: pool bands of 4 lines, 8-9 conv lines, made
    // the fused 147x147 step 20% slower than bands of one).
    let pbl = BAND_ROWS.div_ceil(stride * ow).max(1);
    let run_len = p.oh.div_ceil((POOL_RUNS_PER_WORKER * threads).div_ceil(images)).max(1);
    let runs = p.oh.div_ceil(run_len);
    (0..images * runs).into_par_iter().for_each(|t| {
        let (b, run) = (t / runs, t % runs);
        let (q0, q1) = (run * run_len, ((run + 1) * run_len).min(p.oh));
        POOL_BAND.with_borrow_mut(|conv| {
            // The conv lines (of image b) the buffer holds.
            let mut held = 0..0;
            for p0 in (q0..q1).step_by(pbl) {
                let p1 = (p0 + pbl).min(q1);
                // The conv lines this band's pool lines read; those made for the band before
                // move to the front of the buffer.
                let (l0, l1) = (p.lines(p0, oh).start, p.lines(p1 - 1, oh).end);
                let kept = slide(conv, &mut held, l0..l1, ow * n);
                let m = (l1 - l0) * ow;
                if l0 + kept < l1 {
                    let next_end = if p1 < q1 { p.lines((p1 + pbl).min(q1) - 1, oh).end.max(l1) } else { l1 };
                    // The pool lines the band's conv lines make, written right after (the first
                    // entry-flow block, chained: 5.22 -> 5.12 ms, means of five alternations of
                    // per-step medians, each faster).
                    let writes = Fetch::output(shared, (b * p.oh + p0) * p.ow * n, (p1 - p0) * p.ow * n);
                    make(b, l0 + kept..l1, l1..next_end, p0 == q0, writes, &mut conv[kept * ow * n..m * n]);
                }
                let conv = &conv[..m * n];
                for oy in p0..p1 {
                    let row = b * p.oh + oy;
                    // SAFETY: this task alone writes pool lines [q0, q1) of image b.
                    let dst = unsafe { std::slice::from_raw_parts_mut(shared.offset(row * p.ow * n).ptr(), p.ow * n) };
                    let line = |iy: usize| &conv[(iy - l0) * ow * n..][..ow * n];
                    residual_line(residual, row, (p.oh, p.ow, n), |r| pool_line(&p, line, oh, ow, n, oy, r, dst));
                }
            }
        });
    });
    Activations { n: images, h: p.oh, w: p.ow, c: n, data: out }
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::packed::Precision;
    use crate::Affine;

    /// The fused separable conv + max pool (+ residual) gives exactly what the two steps give
    /// one after the other, in both precisions, over several bands and images, with ReLU after
    /// the conv and both padding rules of the pool; chained after another separable conv too.
    #[test]
    fn sep_conv_pool_is_exactly_pool_after_conv() {
        let precisions: &[Precision] = if crate::bf16_available() { &[Precision::F32, Precision::Bf16] } else { &[Precision::F32] };
        for &precision in precisions {
            // Runs of one band, and (100 wide: a band for each pool line) of up to eleven, whose
            // bands keep the conv lines (and the chain's first conv lines) they share.
            for &(h, w, c, cout, padding, out_relu) in &[(23, 17, 24, 40, Padding::TfSame, false), (20, 9, 16, 33, Padding::Symmetric(1), true), (41, 7, 16, 20, Padding::TfSame, false), (41, 6, 8, 12, Padding::Symmetric(1), true), (41, 100, 8, 12, Padding::TfSame, true), (30, 99, 16, 8, Padding::Symmetric(1), false)] {
                let x = Activations { n: 2, h, w, c, data: (0..2 * h * w * c).map(|i| ((i * 7919 % 1999) as f32 - 999.0) / 333.0).collect() };
                let weights = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| (((i + seed) * 104729 % 997) as f32 - 498.0) / 251.0).collect() };
                let pw = PackedB::with_precision(&weights(c * cout, 5), &weights(cout, 6), c, cout, precision);
                let s = SepConv { out_relu, ..SepConv::relu_3x3(weights(9 * c, 3), pw) };
                let bufs = Buffers::new(2);
                let conv = sep_conv(&x, &s, 2, &bufs, None);
                let p = PoolShape::new(3, 2, padding, conv.h, conv.w);
                let residual = weights(2 * p.oh * p.ow * cout, 7);
                let want = max_pool(&conv, 3, 2, padding, &bufs, Some(Residual::Ready(&residual)));
                for threads in 1..=3 {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let got = pool.install(|| sep_conv_pool(&x, None, &s, (3, 2, padding), &bufs, Some(Residual::Ready(&residual)), threads));
                    assert_eq!((got.n, got.h, got.w, got.c), (want.n, want.h, want.w, want.c));
                    assert!(got.data == want.data, "{precision:?} {h}x{w} on {threads} threads: fused output differs");
                }
                // The shortcut projection (1x1, stride 2) made in the pool: the same values as made
                // before, in both the fused and the plain pool.
                let d = DenseConv { k: 1, stride: 2, dilation: 1, padding: Padding::TfSame, cin: c, cout, weight: PackedB::with_precision(&weights(c * cout, 11), &weights(cout, 12), c, cout, precision), kernel_rows: Vec::new(), winograd: None, relu: false };
                let skip = dense_conv(&x, &d, 2, &bufs);
                let want = max_pool(&conv, 3, 2, padding, &bufs, Some(Residual::Ready(&skip.data)));
                assert!(max_pool(&conv, 3, 2, padding, &bufs, Some(Residual::Project(&d, &x))).data == want.data, "{precision:?} {h}x{w}: projection in the pool differs");
                let got = sep_conv_pool(&x, None, &s, (3, 2, padding), &bufs, Some(Residual::Project(&d, &x)), 2);
                assert!(got.data == want.data, "{precision:?} {h}x{w}: projection in the fused pool differs");
                // The chain: a separable conv (c -> c) before, its output never made whole.
                let pw0 = PackedB::with_precision(&weights(c * c, 8), &weights(c, 9), c, c, precision);
                let pre = SepConv { out_relu: false, in_relu: false, ..SepConv::relu_3x3(weights(9 * c, 10), pw0) };
                let mid = sep_conv(&x, &pre, 2, &bufs, None);
                let want = max_pool(&sep_conv(&mid, &s, 2, &bufs, None), 3, 2, padding, &bufs, Some(Residual::Ready(&residual)));
                for threads in 1..=3 {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let got = pool.install(|| sep_conv_pool(&x, Some(&pre), &s, (3, 2, padding), &bufs, Some(Residual::Ready(&residual)), threads));
                    assert!(got.data == want.data, "{precision:?} {h}x{w} on {threads} threads: chained output differs");
                }
            }
        }
    }

    /// The SIMD max pool line gives the plain loop's values bit for bit: both padding rules,
    /// with and without a residual, channel counts that leave a ragged last vector for either
    /// width, the first, inner and last lines.
    #[test]
    fn simd_pool_is_the_scalar_pool() {
        for &(h, w, c, padding) in &[(9, 7, 24, Padding::TfSame), (10, 9, 37, Padding::Symmetric(1)), (7, 8, 16, Padding::TfSame), (6, 5, 5, Padding::Symmetric(1))] {
            let x: Vec<f32> = (0..h * w * c).map(|i| ((i * 7919 % 1999) as f32 - 999.0) / 333.0).collect();
            let p = PoolShape::new(3, 2, padding, h, w);
            let residual: Vec<f32> = (0..p.ow * c).map(|i| ((i * 104729 % 997) as f32 - 498.0) / 251.0).collect();
            let line = |iy: usize| &x[iy * w * c..][..w * c];
            for oy in 0..p.oh {
                for r in [None, Some(&residual[..])] {
                    let (mut got, mut want) = (vec![0f32; p.ow * c], vec![1f32; p.ow * c]);
                    pool_line(&p, line, h, w, c, oy, r, &mut got);
                    pool_line_scalar(&p, line, h, w, c, oy, r, &mut want);
                    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{h}x{w}x{c} {padding:?} line {oy}: SIMD pool differs");
                }
            }
        }
    }

    /// The SIMD 3x3 depthwise kernels (AVX-512 and AVX2, whichever this CPU runs, whatever
    /// XCEPTION_ENGINE_NO_AVX512 says) give the scalar loop's values bit for bit (same fused
    /// multiply-adds in the same order): every load transform, with and without the ReLU after,
    /// strides 1 and 2, dilations 1, 2 and 4, both padding rules, channel counts that leave a
    /// ragged last vector for either width, lines long enough for interior runs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_depthwise_is_the_scalar_depthwise() {
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if !avx2 {
            eprintln!("skipped: no AVX2 here");
            return;
        }
        let weights = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| (((i + seed) * 104729 % 997) as f32 - 498.0) / 251.0).collect() };
        for &(c, stride, dilation, padding) in
            &[(20, 1, 1, Padding::Symmetric(1)), (40, 2, 1, Padding::TfSame), (12, 1, 2, Padding::Symmetric(2)), (36, 1, 4, Padding::TfSame), (8, 2, 1, Padding::Symmetric(1))]
        {
            // Widths whose stride-1 lines end in runs of every length (8 + 8 + 8 + 4 + 1, 8 + 4 + 2;
            // 4 + 2 with AVX2) and lines whose taps reach the padding on both sides.
            for (h, w) in [(13, 29), (5, 14)] {
                let x = Activations { n: 2, h, w, c, data: (0..2 * h * w * c).map(|i| ((i * 7919 % 1999) as f32 - 999.0) / 333.0).collect() };
                for mid_relu in [false, true] {
                    let pw = PackedB::new(&weights(c * 8, 5), &[0.0; 8], c, 8);
                    let s = SepConv { stride, dilation, padding, mid_relu, dw_bias: Some(weights(c, 4)), ..SepConv::relu_3x3(weights(9 * c, 3), pw) };
                    let (pt, oh) = out_size(s.padding, x.h, s.k, s.stride, s.dilation);
                    let (pl, ow) = out_size(s.padding, x.w, s.k, s.stride, s.dilation);
                    let affine = (weights(c, 1), weights(c, 2));
                    let check = |load: &dyn Fn(usize, usize, &mut [f32]), t: Transform, what: &str| {
                        for line in 0..2 * oh {
                            let (b, oy) = (line / oh, line % oh);
                            let mut want = vec![0f32; ow * c];
                            load(b, oy, &mut want);
                            let mut kernels: Vec<(&str, Vec<f32>)> = Vec::new();
                            let mut got = vec![f32::NAN; ow * c];
                            unsafe { dw3::avx2(t, &x, &s, (b, oy, ow, pt, pl), 1, &mut got) };
                            kernels.push(("avx2", got));
                            if avx512 {
                                let mut got = vec![f32::NAN; ow * c];
                                unsafe { dw3::avx512::<false>(t, &x, &s, (b, oy, ow, pt, pl), 1, got.as_mut_ptr().cast(), got.len(), (c, 0)) };
                                kernels.push(("avx512", got));
                            }
                            // The pair kernels' lines oy and oy + 1 (the second checked against the
                            // scalar line too).
                            if stride == 1 && dilation == 1 && oy + 1 < oh {
                                let mut next = vec![0f32; ow * c];
                                load(b, oy + 1, &mut next);
                                for wide in [false, true].into_iter().filter(|&w| !w || avx512) {
                                    let mut pair = vec![f32::NAN; 2 * ow * c];
                                    unsafe {
                                        if wide {
                                            dw3::avx512::<false>(t, &x, &s, (b, oy, ow, pt, pl), 2, pair.as_mut_ptr().cast(), pair.len(), (c, 0))
                                        } else {
                                            dw3::avx2(t, &x, &s, (b, oy, ow, pt, pl), 2, &mut pair)
                                        }
                                    };
                                    let name = if wide { "avx512 pair" } else { "avx2 pair" };
                                    let (first, second) = pair.split_at(ow * c);
                                    assert!(second.iter().zip(&next).all(|(g, w)| g.to_bits() == w.to_bits()), "{name} {what} c {c} mid_relu {mid_relu}: line {} differs", line + 1);
                                    kernels.push((name, first.to_vec()));
                                }
                            }
                            for (name, got) in kernels {
                                assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "{name} {what} c {c} stride {stride} dilation {dilation} mid_relu {mid_relu}: line {line} differs");
                            }
                        }
                    };
                    check(&|b, oy, out: &mut [f32]| dw_row::<true, Plain>(&x, &s, Plain, b, oy, ow, pt, pl, out), Plain.transform(), "plain");
                    check(&|b, oy, out: &mut [f32]| dw_row::<true, Relu>(&x, &s, Relu, b, oy, ow, pt, pl, out), Relu.transform(), "relu");
                    for relu in [false, true] {
                        let a = AffineRelu { scale: &affine.0, shift: &affine.1, relu };
                        check(&|b, oy, out: &mut [f32]| dw_row::<true, AffineRelu>(&x, &s, a, b, oy, ow, pt, pl, out), a.transform(), "affine");
                    }
                }
            }
        }
    }

    /// The bf16 depthwise output (what a bf16 product multiplies) is the f32 output rounded to
    /// nearest even, value for value, with zeros in each pixel's padding; in bf16x3 the f32
    /// output split in two (`amx::split_bf16`), the lo values after the hi values; for every
    /// load transform, strides 1 and 2, dilation 2, both padding rules, ragged channel counts,
    /// lines made one and two at a time.
    #[test]
    fn bf16_depthwise_is_the_rounded_f32_depthwise() {
        let precisions = crate::bf16_precisions();
        if precisions.is_empty() {
            eprintln!("skipped: no bf16 products here");
            return;
        }
        // The last case's input has values near f32::MAX, so some outputs are infinities or NaN.
        for &(c, stride, dilation, padding, huge) in &[(40, 1, 1, Padding::Symmetric(1), false), (16, 2, 1, Padding::TfSame, false), (70, 1, 2, Padding::Symmetric(2), false), (33, 2, 1, Padding::Symmetric(1), false), (24, 1, 1, Padding::Symmetric(1), true)] {
            let (h, w) = (9, 11);
            let value = |i: usize| if huge && i.is_multiple_of(37) { 3e38 * (1.0 - (i % 2) as f32 * 2.0) } else { ((i * 7919 % 1999) as f32 - 999.0) / 333.0 };
            let x = Activations { n: 1, h, w, c, data: (0..h * w * c).map(value).collect() };
            let weights = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| (((i + seed) * 104729 % 997) as f32 - 498.0) / 251.0).collect() };
            let transforms = || [(None, false), (None, true), (Some(Affine { scale: weights(c, 1), shift: weights(c, 2) }), true)];
            for ((in_affine, in_relu), &precision) in precisions.iter().flat_map(|p| transforms().into_iter().map(move |t| (t, p))) {
                let pieces = precision.pieces();
                let pw = PackedB::with_precision(&weights(c * 8, 5), &[0.0; 8], c, 8, precision);
                let s = SepConv { stride, dilation, padding, in_affine, in_relu, dw_bias: Some(weights(c, 4)), ..SepConv::relu_3x3(weights(9 * c, 3), pw) };
                with_depthwise(&x, &s, |(oh, ow, fill, fill16)| {
                    let fill16 = fill16.expect("a bf16 depthwise on this machine");
                    let stride16 = crate::amx::lhs_stride(c, c, pieces);
                    let lo = stride16 / 2;
                    let mut infinite = 0;
                    // Two lines a call (in pairs where the kernel makes them so), against the
                    // f32 lines made one at a time.
                    for line in 0..oh {
                        let mut f = vec![0f32; ow * c];
                        fill(line, &mut f);
                        infinite += f.iter().filter(|v| v.is_infinite()).count();
                        let first = line - line % 2;
                        let mut two = vec![7u16; (oh - first).min(2) * ow * stride16];
                        fill16(first, &mut two);
                        let h = &two[(line - first) * ow * stride16..][..ow * stride16];
                        for px in 0..ow {
                            for ch in 0..stride16 {
                                let want = match (pieces, ch) {
                                    (1, ch) if ch < c => crate::amx::to_bf16(f[px * c + ch]),
                                    (2, ch) if ch < c => crate::amx::split_bf16(f[px * c + ch]).0,
                                    (2, ch) if ch >= lo && ch < lo + c => crate::amx::split_bf16(f[px * c + ch - lo]).1,
                                    _ => 0,
                                };
                                assert_eq!(h[px * stride16 + ch], want, "{precision:?} c {c} stride {stride} dilation {dilation}: line {line} pixel {px} channel {ch}");
                            }
                        }
                    }
                    assert_eq!(huge, infinite > 0, "{precision:?} c {c}: infinite outputs");
                });
            }
        }
    }
}
