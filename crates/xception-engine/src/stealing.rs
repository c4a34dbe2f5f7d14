//! The rows of a product shared out between workers in bands, evenly to the row.
//!
//! Each worker starts on a contiguous range of its own (the rows split evenly, at a row, not a
//! line) and takes bands from its front; a worker whose range is empty takes the back half of
//! the fullest other range and goes on there. Near the end of its range a worker takes smaller
//! bands (half of what is left, down to a least band), so the last bands, which decide when the
//! step ends, are short. A band that starts or ends inside a line makes that line too (the
//! caller's fill makes whole lines), so cuts fall on line boundaries wherever that costs less
//! than half a band.
//!
//! Before, bands of whole lines went to the workers as rayon split their indices, so a step
//! ended with one worker making its last band of four lines alone (the 37x37 728->728 separable
//! conv: 8% of both workers' time idle, measured with timers around each band). Measured
//! (2026-12-07, two threads, per-step medians, three alternations): that conv 5.62-5.74 ->
//! 5.27-5.52 ms, the 74x74 128->256 1.65-1.72 -> 1.57-1.60; xception65's pass 104.4 ->
//! 102.4-102.9 ms (two alternations).

use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// The fewest rows a band of a large product has, unless the range has fewer: four micro-kernel
/// row tiles, so the weights streamed for a band still meet enough rows.
pub(crate) const MIN_BAND: usize = 48;

/// Runs `band(rows, next)` over bands covering [0, rows) exactly once, on `workers` parallel
/// tasks; `next` is the band this worker will most likely take after (empty if none), for the
/// caller to fetch ahead. `size` is the band the workers take while their ranges are long,
/// `least` the shortest they take near the end (with `least` >= the rows a worker starts on,
/// each makes its own range in one band, and none is shared); `per_line` the rows a line has.
pub(crate) fn bands(rows: usize, per_line: usize, (size, least): (usize, usize), workers: usize, band: impl Fn(Range<usize>, Range<usize>) + Sync) {
    let workers = workers.clamp(1, rows.max(1));
    let ranges: Vec<AtomicU64> = (0..workers).map(|w| AtomicU64::new(pack(w * rows / workers, (w + 1) * rows / workers))).collect();
    let take = Take { per_line: per_line.max(1), size: size.max(1), least: least.clamp(1, size.max(1)) };
    (0..workers).into_par_iter().for_each(|w| loop {
        if let Some((now, next)) = take.front(&ranges[w]) {
            band(now, next);
        } else if !take.steal(&ranges, w) {
            return;
        }
    });
}

fn pack(front: usize, back: usize) -> u64 {
    ((front as u64) << 32) | back as u64
}

fn unpack(v: u64) -> (usize, usize) {
    ((v >> 32) as usize, (v & 0xffff_ffff) as usize)
}

struct Take {
    per_line: usize,
    size: usize,
    least: usize,
}

impl Take {
    /// Where a band of about `want` rows from `front` (at most to `back`) ends: on a line
    /// boundary if one lies in its second half; the whole rest if that is short.
    fn cut(&self, front: usize, back: usize, want: usize) -> usize {
        let end = front + want;
        if end + self.least / 2 >= back {
            return back;
        }
        let line_end = end / self.per_line * self.per_line;
        if line_end > front + want / 2 {
            line_end
        } else {
            end
        }
    }

    /// The next band from the front of `range`, and the one after it, if any.
    fn front(&self, range: &AtomicU64) -> Option<(Range<usize>, Range<usize>)> {
        let mut v = range.load(Ordering::Acquire);
        loop {
            let (front, back) = unpack(v);
            if front >= back {
                return None;
            }
            let left = back - front;
            let want = if left >= 2 * self.size { self.size } else { (left / 2).max(self.least) };
            let end = self.cut(front, back, want);
            match range.compare_exchange_weak(v, pack(end, back), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let after = if end < back { end..self.cut(end, back, want.min(back - end)) } else { end..end };
                    return Some((front..end, after));
                }
                Err(now) => v = now,
            }
        }
    }

    /// Moves the back half of the fullest other range into worker `w`'s (empty) range; false
    /// if every range is too short to share.
    fn steal(&self, ranges: &[AtomicU64], w: usize) -> bool {
        loop {
            let fullest = (0..ranges.len())
                .filter(|&o| o != w)
                .map(|o| (o, ranges[o].load(Ordering::Acquire)))
                .max_by_key(|&(_, v)| {
                    let (front, back) = unpack(v);
                    back.saturating_sub(front)
                });
            let Some((o, v)) = fullest else { return false };
            let (front, back) = unpack(v);
            if back.saturating_sub(front) < 2 * self.least {
                return false;
            }
            let mid = self.cut(front, back, (back - front) / 2);
            if ranges[o].compare_exchange(v, pack(front, mid), Ordering::AcqRel, Ordering::Acquire).is_ok() {
                ranges[w].store(pack(mid, back), Ordering::Release);
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Every row in exactly one band, whatever the shape, band size and workers; with one
    /// worker on a long range, bands of `size` rows that end on lines.
    #[test]
    fn every_row_once() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for &(rows, per_line, size) in &[(1369usize, 37usize, 148usize), (361, 19, 181), (5476, 74, 222), (10, 5, 4), (1, 1, 1), (0, 3, 5), (200, 1, 7)] {
            for workers in [1, 2, 3, 5] {
                let seen = Mutex::new(vec![0u32; rows]);
                let sizes = Mutex::new(Vec::new());
                pool.install(|| {
                    bands(rows, per_line, (size, MIN_BAND), workers, |now, next| {
                        assert!(now.start < now.end && now.end <= rows, "band {now:?} of {rows}");
                        assert!(next.start == now.end && next.end <= rows, "next {next:?} after {now:?}");
                        for r in now.clone() {
                            seen.lock().unwrap()[r] += 1;
                        }
                        let start = now.start;
                        sizes.lock().unwrap().push(now);
                        // Uneven work, so the workers steal from each other.
                        std::thread::sleep(std::time::Duration::from_micros(if start % 3 == 0 { 200 } else { 10 }));
                    })
                });
                assert!(seen.into_inner().unwrap().iter().all(|&n| n == 1), "{rows} rows, {per_line} a line, bands of {size}, {workers} workers");
                if workers == 1 && rows >= 4 * size && size >= MIN_BAND {
                    let sizes = sizes.into_inner().unwrap();
                    assert!(sizes[..2].iter().all(|b| b.len() <= size && b.len() > size / 2 && b.end % per_line == 0), "{sizes:?}");
                }
            }
        }
    }

    /// With `least` the whole share, one band a worker, split at a row (the middle flow).
    #[test]
    fn one_band_a_worker() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let got = Mutex::new(Vec::new());
        pool.install(|| bands(361, 19, (181, 181), 2, |now, next| got.lock().unwrap().push((now, next))));
        let mut got = got.into_inner().unwrap();
        got.sort_by_key(|(now, _)| now.start);
        assert_eq!(got, vec![(0..180, 180..180), (180..361, 361..361)]);
    }
}
