//! A global allocator that gives every large allocation (activations, bands, packed weights) a
//! 64-byte (cache-line) start, and the largest ones (2 MiB or more) a 2 MiB start with their
//! whole 2 MiB pages offered to the kernel as transparent huge pages.
//!
//! - Lines: a `Vec<f32>` from the system allocator starts 16 bytes into a line, so every
//!   16-channel vector the depthwise kernels load and every output row the GEMM stores straddles
//!   two lines. Measured (xception, 299, two threads, five alternations of 15-pass medians):
//!   73.5-78.5 ms against 77.0-81.5 with the system's alignment; AVX2 (three) 118.8-120.2
//!   against 119.4-128.6; bf16 even.
//! - Huge pages: a pass streams ~90 MB of packed weights from memory, 4 KiB pages of which miss
//!   the TLB on every page (the second-level TLB holds 8 MB of them), and the page walks do not
//!   overlap the GEMM the way the data prefetches do. On Linux, `madvise(MADV_HUGEPAGE)` makes
//!   the kernel back each whole 2 MiB page of the block with one huge page where transparent huge
//!   pages are `always` or `madvise` (their usual default); elsewhere it changes nothing. One
//!   thread, 181x728x728 products with weights that do not stay in cache: 1.29-1.31 ms against
//!   1.18-1.20 with huge pages, 1.14 with the weights in cache (2026-12-06). On whole passes (two
//!   threads, alternated) less: xception 0.7-3.5% faster (10 alternations), xception65, AVX2 and
//!   bf16 within the noise; peak RSS at batch 1 240-243 MB against 283-284.
//!   `XCEPTION_ENGINE_NO_HUGEPAGES` set in the environment turns them off.
//!
//! Binaries opt in (`#[global_allocator]`); the engine is correct with any allocator.
use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, with allocations of LARGE bytes or more aligned to 64 bytes and of
/// HUGE bytes or more to HUGE, their whole HUGE pages advised as huge pages.
pub struct LineAligned;

/// Allocations from this size on start on a cache line.
const LARGE: usize = 4096;

/// Allocations from this size on start on a huge page (2 MiB on x86-64).
const HUGE: usize = 2 << 20;

/// Whether large blocks go on huge pages: not if XCEPTION_ENGINE_NO_HUGEPAGES is set. Read
/// through libc once, then cached: `std::env` takes a lock and allocates, which an allocator
/// must not do.
fn huge_pages() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static STATE: AtomicU8 = AtomicU8::new(0);
    match STATE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: a NUL-terminated name; the result is only compared with null.
            let on = cfg!(target_os = "linux") && unsafe { libc::getenv(c"XCEPTION_ENGINE_NO_HUGEPAGES".as_ptr()) }.is_null();
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        state => state == 2,
    }
}

/// The layout actually asked of the system for `l`: a function of `l` alone (and of the
/// environment read once), so `dealloc` and `realloc` hand back exactly what `alloc` took.
fn widened(l: Layout) -> Layout {
    let align = if l.size() >= HUGE && huge_pages() {
        HUGE
    } else if l.size() >= LARGE {
        64
    } else {
        return l;
    };
    if l.align() >= align {
        return l;
    }
    // SAFETY: a power of two, and a size that fit `l` fits it (a size near isize::MAX was never
    // allocated: the system fails first).
    unsafe { Layout::from_size_align_unchecked(l.size(), align) }
}

/// Advises the whole huge pages of a fresh block `p` of layout `w` as huge pages, before anything
/// touches them (a page already faulted in stays a small one).
unsafe fn advise(p: *mut u8, w: Layout) -> *mut u8 {
    #[cfg(target_os = "linux")]
    if !p.is_null() && w.align() >= HUGE {
        // Only the pages inside the block: the tail's partial page stays small. Failure (no
        // transparent huge pages in this kernel) leaves the block as it is.
        libc::madvise(p.cast(), w.size() / HUGE * HUGE, libc::MADV_HUGEPAGE);
    }
    p
}

// SAFETY: every call goes to `System` with `widened(layout)`, which is deterministic, valid,
// and at least as aligned as asked; a block from it is valid for the caller's layout. madvise
// changes how pages are backed, never their contents.
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let w = widened(l);
        advise(System.alloc(w), w)
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let w = widened(l);
        if w.align() < HUGE {
            return System.alloc_zeroed(w);
        }
        // Advised before the zeros are written: the system's zeroing of an over-aligned block
        // would fault every page in small first.
        let p = advise(System.alloc(w), w);
        if !p.is_null() {
            std::ptr::write_bytes(p, 0, w.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, widened(l))
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        let (old, new) = (widened(l), widened(Layout::from_size_align_unchecked(size, l.align())));
        if old.align() == new.align() && new.align() < HUGE {
            return System.realloc(p, old, size);
        }
        // Another alignment class, or a huge block (whose new pages must be advised before they
        // are written): a new block, the values moved.
        let q = self.alloc(Layout::from_size_align_unchecked(size, l.align()));
        if !q.is_null() {
            std::ptr::copy_nonoverlapping(p, q, l.size().min(size));
            System.dealloc(p, old);
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size class come back from the widened layout aligned and keep their
    /// values across a realloc that crosses LARGE or HUGE either way; zeroed huge blocks are
    /// zeros.
    #[test]
    fn large_blocks_start_on_a_line() {
        let a = LineAligned;
        let huge = if huge_pages() { HUGE } else { 64 };
        unsafe {
            for (size, align) in [(LARGE, 64), (LARGE + 4, 64), (1 << 20, 64), (HUGE, huge), (HUGE + 12, huge)] {
                let l = Layout::from_size_align(size, 4).unwrap();
                let p = a.alloc(l);
                assert_eq!(p as usize % align, 0, "{size} bytes");
                a.dealloc(p, l);
                let z = a.alloc_zeroed(l);
                assert_eq!(z as usize % align, 0, "{size} bytes, zeroed");
                assert!((0..size).step_by(4093).all(|i| *z.add(i) == 0), "{size} bytes zeroed");
                a.dealloc(z, l);
            }
            let small = Layout::from_size_align(64, 4).unwrap();
            let p = a.alloc(small);
            p.write_bytes(7, 64);
            let q = a.realloc(p, small, 2 * LARGE);
            assert_eq!(q as usize % 64, 0);
            assert!((0..64).all(|i| *q.add(i) == 7));
            let big = Layout::from_size_align(2 * LARGE, 4).unwrap();
            let h = a.realloc(q, big, HUGE + 100);
            assert_eq!(h as usize % huge, 0);
            assert!((0..64).all(|i| *h.add(i) == 7));
            let hl = Layout::from_size_align(HUGE + 100, 4).unwrap();
            let g = a.realloc(h, hl, 2 * HUGE);
            assert!((0..64).all(|i| *g.add(i) == 7));
            let gl = Layout::from_size_align(2 * HUGE, 4).unwrap();
            let r = a.realloc(g, gl, 32);
            assert!((0..32).all(|i| *r.add(i) == 7));
            a.dealloc(r, Layout::from_size_align(32, 4).unwrap());
        }
    }
}
