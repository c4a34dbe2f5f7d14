//! Single-thread speed of the packed GEMM at the pointwise shapes (a development probe).
use xception_engine::packed::{gemm_rows, Epilogue, PackedB, SharedOut};

fn main() {
    for &(m, k, n) in &[(147 * 2, 128, 128), (361, 728, 728), (100, 1536, 2048), (96, 728, 728)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let b = PackedB::new(&w, &vec![0.0; n], k, n);
        let mut out = vec![0f32; m * n];
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = std::time::Instant::now();
            unsafe { gemm_rows(m, &a, k, &b, 0..b.panels(), SharedOut::new(&mut out), n, Epilogue::PLAIN) };
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{m}x{k}x{n}: {:.3} ms {:.1} GFLOP/s", best * 1e3, 2.0 * (m * k * n) as f64 / best / 1e9);
    }
}
