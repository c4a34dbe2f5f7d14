//! Workers that poll for tasks through a pass instead of sleeping, as ONNX Runtime's spin
//! between ops.
//!
//! An idle rayon worker goes to sleep after a few microseconds, and a single-image pass has some
//! fifty steps, most ending with one thread waiting on the other. Measured here (2-core VM,
//! 2026-12-07, rayon 1.12): a worker idle for 10 µs or more costs the thread that hands it the
//! next task 11-14 µs (the wake-up call) and starts that task 30-65 µs later; a polling worker
//! starts it at once. With pollers a pass (xception, 299, two threads, four alternations) runs
//! 0.3-4.8% faster, its step times summing 3-4% less; xception65 3%.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A poller that has run no task for this long returns, and its worker sleeps as usual until
/// the next pass. Without it a pass could hang: rayon runs other jobs while a join waits, so a
/// worker may start its poller nested inside a task it took, above a join whose other half the
/// pass still waits on; that poller would spin on, never finding the work beneath it. Seen in
/// a whole-network benchmark that never ended, and in `nested_tasks_never_hang` (a hang within
/// 12,000 passes); with the limit that case costs the pass this long once.
const IDLE_LIMIT: Duration = Duration::from_millis(1);

/// `f` on `pool`, every other worker of the pool running tasks as they appear, from any
/// worker's queue, and spinning between them until `f` returns (or panics: the panic reaches the
/// caller once the pollers have stopped), or until it has found no task for IDLE_LIMIT.
pub(crate) fn run<R: Send>(pool: &rayon::ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    pool.install(|| {
        let done = AtomicBool::new(false);
        let caller = rayon::current_thread_index();
        rayon::scope(|s| {
            // One poller a worker (a broadcast task runs on its own worker only); the caller's
            // returns at once, whenever the caller gets to it.
            s.spawn_broadcast(|_, at| {
                if Some(at.index()) == caller {
                    return;
                }
                let mut busy = Instant::now();
                while !done.load(Ordering::Acquire) {
                    if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                        busy = Instant::now();
                    } else if busy.elapsed() > IDLE_LIMIT {
                        return;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            });
            let _stop = Stop(&done);
            f()
        })
    })
}

/// Stops the pollers when dropped: after `f` returns, or as its panic unwinds.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::Mutex;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
    }

    #[test]
    fn returns_what_the_work_returns_and_every_task_runs() {
        for threads in [1, 2, 3] {
            let pool = pool(threads);
            let ran = Mutex::new(vec![0u32; 1000]);
            let sum: u64 = run(&pool, || {
                (0..1000u64)
                    .into_par_iter()
                    .map(|i| {
                        ran.lock().unwrap()[i as usize] += 1;
                        i
                    })
                    .sum()
            });
            assert_eq!(sum, 999 * 1000 / 2, "{threads} threads");
            assert!(ran.lock().unwrap().iter().all(|&n| n == 1), "every task once, {threads} threads");
            // Passes one after another on the same pool, nested joins inside.
            for _ in 0..50 {
                let (a, b) = run(&pool, || rayon::join(|| rayon::join(|| 1, || 2), || 3));
                assert_eq!((a, b), ((1, 2), 3));
            }
        }
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_goes_on() {
        let pool = pool(2);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&pool, || (0..64).into_par_iter().for_each(|i| assert!(i != 40, "task {i} failed")))));
        let message = caught.expect_err("the panic goes through");
        assert!(message.downcast_ref::<String>().is_some_and(|m| m.contains("task 40 failed")));
        assert_eq!(run(&pool, || (0..64).into_par_iter().count()), 64);
    }

    /// Passes whose tasks nest joins in uneven parallel loops end, in the time they take:
    /// before `IDLE_LIMIT` this hung within 12,000 passes (a poller started inside a task a
    /// worker took, spinning above work the pass waited on).
    #[test]
    fn nested_tasks_never_hang() {
        let (sent, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = pool(2);
            for i in 0..30_000usize {
                let n: usize = run(&pool, || {
                    (0..8usize)
                        .into_par_iter()
                        .map(|j| {
                            let (a, b) = rayon::join(|| (0..64usize).into_par_iter().map(|k| k * j).sum::<usize>(), || (0..(j * 37 + i) % 50).sum::<usize>());
                            a + b
                        })
                        .sum()
                });
                std::hint::black_box(n);
            }
            sent.send(()).unwrap();
        });
        finished.recv_timeout(std::time::Duration::from_secs(120)).expect("30,000 passes within two minutes (a pass hung)");
    }
}
