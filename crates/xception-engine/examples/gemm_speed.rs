//! Single-thread speed of the packed GEMM at the pointwise shapes (a development probe):
//! `cargo run --release -p xception-engine --example gemm_speed [f32|bf16]`.
use xception_engine::packed::{gemm_rows, Epilogue, PackedB, Precision, SharedOut};

fn main() {
    let precision = Precision::parse(&std::env::args().nth(1).unwrap_or_else(|| "f32".into())).expect("f32 or bf16");
    if precision == Precision::Bf16 && !xception_engine::bf16_available() {
        eprintln!("bf16 needs AMX, which this machine lacks");
        std::process::exit(1);
    }
    for &(m, k, n) in &[(147 * 2, 128, 128), (361, 728, 728), (100, 1536, 2048), (96, 728, 728), (1369, 728, 728), (1369, 256, 728), (685, 728, 728), (222, 256, 256)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let b = PackedB::with_precision(&w, &vec![0.0; n], k, n, precision);
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
