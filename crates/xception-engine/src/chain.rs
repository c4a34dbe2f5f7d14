//! A run of separable convs made band by band in one go: each worker makes a band of the last
//! conv's output lines from the lines of the conv before it that the band reads, which it holds
//! in a cache-resident buffer and makes in turn the same way, down to the block input. None of
//! the intermediate outputs goes to memory: at 299, xception65's first block has two of
//! 150x150x128 (11.5 MB each) that went out and back in, the second to a depthwise conv of
//! stride 2 that was bound by reading it.
//!
//! The lines of a conv's input that one band reads are viewed as an image of their own, so the
//! separable conv kernels run on them unchanged: that view starts at a multiple of the stride
//! (its output line i is then line `start / stride + i` of the whole, reading the same input
//! values), and it pads only where the whole image does, which takes a padding the same for
//! every image height (`fixed_top`).

use crate::kernels::{band_product, input_lines, out_size, sep_pixel_macs, slide, taken, with_depthwise, Buffers, BAND_ROWS};
use crate::packed::{Epilogue, Fetch, SharedOut};
use crate::{Activations, SepConv};
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;
use xception_arch::Padding;

/// The lines of one conv's output a worker holds, and which.
#[derive(Default)]
struct Held {
    buf: Vec<f32>,
    lines: Range<usize>,
}

thread_local! {
    /// A worker's held lines of each conv's output but the last.
    static HELD: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
}

/// The padding above the input of `s`, if it is the same for every input height.
fn fixed_top(s: &SepConv) -> Option<usize> {
    match s.padding {
        Padding::Valid => Some(0),
        Padding::Symmetric(p) => Some(p),
        // TensorFlow's 'same' pads (k - 1) * dilation in all at stride 1, whatever the height.
        Padding::TfSame if s.stride == 1 => Some(s.dilation * (s.k - 1) / 2),
        Padding::TfSame => None,
    }
}

/// The lines of its input (`h` of them) that the output lines `out` of `s` read, starting at a
/// multiple of the stride.
fn window(s: &SepConv, h: usize, out: &Range<usize>) -> Range<usize> {
    let top = fixed_top(s).expect("chain: a padding the same for every height");
    let start = (out.start * s.stride).saturating_sub(top) / s.stride * s.stride;
    let end = ((out.end - 1) * s.stride + s.dilation * (s.k - 1) + 1).saturating_sub(top).min(h);
    start..end
}

/// Whether `sep_chain` can run `convs` on an input of `input` (h, w), and pays: every conv pads the
/// same whatever the height, none is dilated, and every output but the last is large (from
/// LARGE_BF16 values where the products outrun memory, `PackedB::outruns_memory`: bf16, int8
/// with VNNI) and, in fp32, narrow. Measured (xception65, two threads, per-step medians, AVX-512), chained against
/// each conv in turn:
/// - the first block (150x150x128 twice at 299): fp32 6.0-6.5 ms against 7.5-7.6, bf16 2.9
///   against 3.7; at 513 (257x257x128) fp32 18-22 against 26-28, bf16 10 against 19-21;
/// - the second (75x75x256 at 299; 129x129x256 at 513): fp32 even at both, bf16 1.9 against
///   2.6 and 6.5 against 11.2;
/// - the third (38x38x728; 65x65x728): fp32 10 against 8.7 and even, bf16 3.2 against 3.3 and
///   8.0-8.8 against 10.8-11.0;
/// - the middle flow at 513, output stride 16 (33x33x728, bf16): 3.6-4.1 ms a block against
///   3.2-3.5; at output stride 8, dilated (fp32 at 513, bf16 at 299), 4-20% slower passes.
pub fn chain_pays(convs: &[&SepConv], input: (usize, usize), threads: usize) -> bool {
    if convs.len() < 2 || convs.iter().any(|s| fixed_top(s).is_none() || s.dilation > 1) {
        return false;
    }
    convs.iter().zip(sizes(convs, input)).take(convs.len() - 1).all(|(s, (h, w))| {
        let large = if s.pw.outruns_memory() { h * w * s.pw.n >= LARGE_BF16 } else { h * w * s.pw.n >= LARGE_F32 && s.pw.n <= NARROW_F32 };
        large && h >= 4 * threads
    })
}

/// Values of an intermediate output from which `chain_pays`, and its channels at most (see there).
const LARGE_F32: usize = 2 << 20;
const NARROW_F32: usize = 256;
const LARGE_BF16: usize = 1 << 20;

/// The separable convs `convs` one after the other on `x`, with `residual` (laid out like the
/// output) added as the last one stores. The same values as `sep_conv` on each in turn: the
/// same sums in the same order.
pub fn sep_chain(x: &Activations, convs: &[&SepConv], residual: Option<&[f32]>, bufs: &Buffers, threads: usize) -> Activations {
    let last = convs[convs.len() - 1];
    with_chain(x, convs, |chain| {
        let ((oh, ow), n) = (chain.output(), last.pw.n);
        let mut out = bufs.take(x.n * oh * ow * n);
        if let Some(r) = residual {
            assert_eq!(r.len(), out.len(), "chain: residual shape");
        }
        let shared = SharedOut::new(&mut out);
        // Output lines per band: about a quarter of BAND_ROWS rows, since every conv's held
        // lines and band of depthwise rows must stay in L2 beside the weights. At 299,
        // xception65's first block (75 lines of 75) measured 6.0-6.6 ms (mean 6.3) with bands of
        // one line against 6.2-7.2 (mean 6.8) with two (fp32, five alternations; with two runs a
        // worker, 6.4-6.6 for three and 7.1-7.3 for five); in bf16 within the noise. Each worker
        // makes one run of lines (batches: whole images), since the intermediate lines two runs
        // share are made by both: two runs a worker measured 6.0-6.6 ms against 5.7-6.4.
        let band = (BAND_ROWS / 4).div_ceil(ow).max(1);
        let run_len = oh.div_ceil(threads.div_ceil(x.n)).max(1);
        let runs = oh.div_ceil(run_len);
        (0..x.n * runs).into_par_iter().for_each(|t| {
            let (b, run) = (t / runs, t % runs);
            let (start, end) = (run * run_len, ((run + 1) * run_len).min(oh));
            for o0 in (start..end).step_by(band) {
                let o1 = (o0 + band).min(end);
                let row0 = (b * oh + o0) * ow;
                // The output lines of the next band, whose first stores would miss otherwise.
                let next = following(&(o0..o1), end);
                let writes = Fetch::output(shared, (b * oh + next.start) * ow * n, next.len() * ow * n);
                let epi = Epilogue { residual: residual.map(|r| (&r[row0 * n..], n)), relu: last.out_relu, writes, ..Epilogue::PLAIN };
                // SAFETY: this task alone writes output lines [o0, o1) of image b.
                unsafe { chain.make_fresh(o0 == start, b, o0..o1, shared.offset(row0 * n), epi) };
            }
        });
        Activations { n: x.n, h: oh, w: ow, c: n, data: out }
    })
}

/// As many lines as `lines` right after them, up to `end`: those made next.
fn following(lines: &Range<usize>, end: usize) -> Range<usize> {
    lines.end..(2 * lines.end - lines.start).min(end)
}

/// Calls `f` with the chain of `convs` on `x`.
pub(crate) fn with_chain<R>(x: &Activations, convs: &[&SepConv], f: impl FnOnce(&Chain) -> R) -> R {
    let sizes = sizes(convs, (x.h, x.w));
    with_depthwise(x, convs[0], |(_, _, fill, fill16)| f(&Chain { x, convs, sizes: &sizes, first: (fill, fill16) }))
}

/// Separable convs one after the other on `x`, with the first one's line makers.
pub(crate) struct Chain<'c, 'f, 'a> {
    x: &'c Activations,
    convs: &'c [&'c SepConv],
    /// Each conv's output (h, w).
    sizes: &'c [(usize, usize)],
    first: (&'f crate::kernels::Fill<'a>, Option<&'f crate::kernels::Fill16<'a>>),
}

impl Chain<'_, '_, '_> {
    /// The last conv's output (h, w).
    pub(crate) fn output(&self) -> (usize, usize) {
        self.sizes[self.sizes.len() - 1]
    }

    /// Output lines `lines` of the last conv for image `b` into `dst` with `epi`, from the lines
    /// of the convs before that this worker holds, and those it makes; `fresh`: a new run of
    /// lines (of any image), for which the lines held count for nothing. Lines of a run come in
    /// order.
    ///
    /// # Safety
    /// No other thread may touch the lines' rows of `dst` meanwhile.
    pub(crate) unsafe fn make_fresh(&self, fresh: bool, b: usize, lines: Range<usize>, dst: SharedOut, epi: Epilogue) {
        taken(&HELD, |held| {
            held.resize_with(self.convs.len() - 1, Held::default);
            if fresh {
                held.iter_mut().for_each(|h| h.lines = 0..0);
            }
            self.make(self.convs.len() - 1, b, lines, held, dst, epi)
        })
    }

    /// Output lines `lines` of conv `j` for image `b` into `dst` with `epi`, from the lines of
    /// conv j - 1 they read, made into `held[j - 1]` as needed (`held`: the convs' below j).
    ///
    /// # Safety
    /// No other thread may touch the lines' rows of `dst` meanwhile.
    unsafe fn make(&self, j: usize, b: usize, lines: Range<usize>, held: &mut [Held], dst: SharedOut, epi: Epilogue) {
        let (s, ow) = (self.convs[j], self.sizes[j].1);
        if j == 0 {
            let oh = self.sizes[0].0;
            let (fill, fill16) = self.first;
            // The input of the lines it makes next is fetched into L2 meanwhile (it comes from
            // memory, as in `matmul`'s bands).
            let next = following(&lines, oh);
            let ahead = if next.is_empty() { Fetch::NONE } else { Fetch::of(input_lines(self.x, s, oh, b * oh + next.start..b * oh + next.end)) };
            return band_product(b * oh + lines.start..b * oh + lines.end, ow, fill, fill16, &s.pw, dst, Epilogue { ahead, ..epi });
        }
        let (h, w) = self.sizes[j - 1];
        let want = window(s, h, &lines);
        self.hold(j - 1, b, want.clone(), held);
        let below = &mut held[j - 1];
        let view = Activations { n: 1, h: want.len(), w, c: s.channels, data: std::mem::take(&mut below.buf) };
        let skip = want.start / s.stride;
        with_depthwise(&view, s, |(_, _, fill, fill16)| band_product(lines.start - skip..lines.end - skip, ow, fill, fill16, &s.pw, dst, epi));
        below.buf = view.data;
    }

    /// Makes `held[j]` hold lines `want` of conv j's output (image `b`), keeping those it held
    /// already: `want` starts no earlier than the lines held.
    fn hold(&self, j: usize, b: usize, want: Range<usize>, held: &mut [Held]) {
        let line = self.sizes[j].1 * self.convs[j].pw.n;
        let (below, this) = held.split_at_mut(j);
        let this = &mut this[0];
        let kept = slide(&mut this.buf, &mut this.lines, want.clone(), line);
        if kept < want.len() {
            let dst = SharedOut::new(&mut this.buf[kept * line..want.len() * line]);
            let epi = Epilogue { relu: self.convs[j].out_relu, ..Epilogue::PLAIN };
            // SAFETY: `dst` is this worker's own buffer.
            unsafe { self.make(j, b, want.start + kept..want.end, below, dst, epi) };
        }
    }
}

/// Multiply-adds of `convs` one after the other on `x`.
pub fn chain_macs(x: &Activations, convs: &[&SepConv]) -> u64 {
    convs.iter().zip(sizes(convs, (x.h, x.w))).map(|(s, (h, w))| (x.n * h * w * sep_pixel_macs(s)) as u64).sum()
}

/// The output (h, w) of each of `convs` one after the other on an input of `h` x `w`.
fn sizes(convs: &[&SepConv], (mut h, mut w): (usize, usize)) -> Vec<(usize, usize)> {
    convs
        .iter()
        .map(|s| {
            (h, w) = (out_size(s.padding, h, s.k, s.stride, s.dilation).1, out_size(s.padding, w, s.k, s.stride, s.dilation).1);
            (h, w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sep_conv;
    use crate::packed::{PackedB, Precision};
    use crate::Affine;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i + seed) * 104729 % 997) as f32 - 498.0) / 251.0).collect()
    }

    /// A separable conv `c` -> `cout` of kernel 3 with `stride`, `dilation` and `padding`; the
    /// input transform, ReLU in the middle and after vary with `seed`.
    fn conv(c: usize, cout: usize, (stride, dilation, padding): (usize, usize, Padding), seed: usize, precision: Precision) -> SepConv {
        let pw = PackedB::with_precision(&values(c * cout, seed), &values(cout, seed + 1), c, cout, precision);
        let in_affine = seed.is_multiple_of(3).then(|| Affine { scale: values(c, seed + 2).iter().map(|v| 1.0 + v / 4.0).collect(), shift: values(c, seed + 3) });
        SepConv { stride, dilation, padding, in_affine, mid_relu: seed % 2 == 1, out_relu: seed % 4 == 2, dw_bias: seed.is_multiple_of(5).then(|| values(c, seed + 4)), ..SepConv::relu_3x3(values(9 * c, seed + 5), pw) }
    }

    /// The chain gives exactly what its separable convs give one after the other, in both
    /// precisions, on one to three threads: over bands of one output line (wide images) and of
    /// many (narrow ones), odd and even heights, a last conv of stride 2, dilation, each padding
    /// that `fixed_top` takes, and a residual added as the last conv stores.
    #[test]
    fn chain_is_exactly_its_convs_in_turn() {
        let precisions: &[Precision] = if crate::bf16_available() { &[Precision::F32, Precision::Bf16] } else { &[Precision::F32] };
        let (one, two, dilated) = ((1, 1, Padding::Symmetric(1)), (2, 1, Padding::Symmetric(1)), (1, 2, Padding::Symmetric(2)));
        type Geometry = (usize, usize, Padding);
        let cases: &[(usize, usize, &[Geometry])] = &[
            (29, 23, &[one, one, two]),
            (30, 12, &[one, one, two]),
            (17, 201, &[one, two]),
            (26, 5, &[dilated, one, (1, 1, Padding::TfSame)]),
            (21, 9, &[(1, 1, Padding::Valid), two, one]),
            (40, 7, &[(1, 1, Padding::TfSame), (1, 2, Padding::TfSame), two]),
        ];
        for &precision in precisions {
            for (case, &(h, w, shape)) in cases.iter().enumerate() {
                let channels = [8, 16, 12, 24];
                let convs: Vec<SepConv> = shape.iter().enumerate().map(|(i, &g)| conv(channels[i], channels[i + 1], g, case + i, precision)).collect();
                let convs: Vec<&SepConv> = convs.iter().collect();
                let x = Activations { n: 2, h, w, c: 8, data: values(2 * h * w * 8, case) };
                let bufs = Buffers::new(2);
                let mut want = x.clone();
                for (i, s) in convs.iter().enumerate() {
                    let last = i + 1 == convs.len();
                    let out_len = {
                        let (oh, ow) = (out_size(s.padding, want.h, 3, s.stride, s.dilation).1, out_size(s.padding, want.w, 3, s.stride, s.dilation).1);
                        want.n * oh * ow * s.pw.n
                    };
                    let residual = values(out_len, 9);
                    want = sep_conv(&want, s, 2, &bufs, last.then_some(&residual[..]));
                }
                let residual = values(want.data.len(), 9);
                for threads in 1..=3 {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let got = pool.install(|| sep_chain(&x, &convs, Some(&residual), &bufs, threads));
                    assert_eq!((got.n, got.h, got.w, got.c), (want.n, want.h, want.w, want.c));
                    assert!(got.data == want.data, "{precision:?} case {case} ({h}x{w}) on {threads} threads: the chain differs");
                }
            }
        }
    }

    /// A stride-2 padding that depends on the height (TensorFlow's 'same') cannot be chained;
    /// dilated convs and small or (fp32) wide intermediate outputs are not.
    #[test]
    fn chain_pays_only_where_it_can_run_and_saves_memory_traffic() {
        let s = |g, cout| conv(64, cout, g, 1, Precision::F32);
        let (a, b) = (s((1, 1, Padding::Symmetric(1)), 128), s((2, 1, Padding::TfSame), 128));
        let c = SepConv { channels: 128, ..s((2, 1, Padding::Symmetric(1)), 128) };
        assert!(chain_pays(&[&a, &c], (150, 150), 2));
        assert!(!chain_pays(&[&a, &b], (150, 150), 2));
        assert!(!chain_pays(&[&a, &c], (75, 75), 2));
        assert!(!chain_pays(&[&a], (150, 150), 2));
        let dilated = s((1, 2, Padding::Symmetric(2)), 128);
        assert!(!chain_pays(&[&dilated, &c], (150, 150), 2));
        let wide = s((1, 1, Padding::Symmetric(1)), 728);
        assert!(!chain_pays(&[&wide, &c], (150, 150), 2));
    }
}

