//! The packed GEMM (hot operands) on one thread, then on two at once with their own data: on a
//! VM whose two vCPUs differ (one shared with a neighbour), the per-thread figures show it.
use xception_engine::packed::{gemm_rows, Epilogue, PackedB, SharedOut};

fn run(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let b = PackedB::new(&w, &vec![0.0; n], k, n);
    let mut out = vec![0f32; m * n];
    let epi = Epilogue::PLAIN;
    unsafe { gemm_rows(m, &a, k, &b, 0..b.panels(), SharedOut::new(&mut out), n, epi) };
    let t = std::time::Instant::now();
    for _ in 0..reps {
        unsafe { gemm_rows(m, &a, k, &b, 0..b.panels(), SharedOut::new(&mut out), n, epi) };
    }
    2.0 * (m * k * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    for &(m, k, n) in &[(294usize, 288usize, 64usize), (222, 256, 256), (96, 728, 728)] {
        for round in 0..3 {
            let one = run(m, k, n, 200);
            let two: Vec<f64> = std::thread::scope(|s| {
                let h: Vec<_> = (0..2).map(|_| s.spawn(move || run(m, k, n, 200))).collect();
                h.into_iter().map(|h| h.join().unwrap()).collect()
            });
            println!("{m}x{k}x{n} round {round}: one thread {one:.0} GF/s; two at once {:.0} + {:.0} GF/s", two[0], two[1]);
        }
    }
    println!("peak 1 thread {:.0}, 2 threads {:.0}", xception_engine::measured_peak_gflops(1), xception_engine::measured_peak_gflops(2));
}
