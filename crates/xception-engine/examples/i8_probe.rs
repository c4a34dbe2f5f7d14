//! The int8 product's two parts apart, one thread, at the separable convs' shapes (a development
//! probe): each row's quantization (`int8::quantize_rows`) and the VNNI/AMX product of the bytes
//! (`int8::gemm_rows`, with ReLU), best of 300 each:
//! `cargo run --release -p xception-engine --example i8_probe`.
//!
//! On AMD Zen 4 (AVX-512 VNNI, 2026-12-07) the product alone ran 112-140 GMAC/s at k = 64,
//! 155-178 at k = 128, 197-200 at k = 256 and 213-215 at k = 728 (the deep products' rate, about
//! 90% of one core's VPDPBUSD peak), and the quantization took 14-17% of the time at k = 64 and
//! 128, 2-3% at 728: the entry flow's shallow products pay for each tile's epilogue (the
//! sums scaled back to fp32 and stored) against a short k loop.
#[global_allocator]
static A: xception_engine::align::LineAligned = xception_engine::align::LineAligned;

use xception_engine::packed::{Epilogue, PackedB, Precision, SharedOut};

fn main() {
    if !xception_engine::int8::available() {
        eprintln!("int8 products need AVX2, which this machine lacks");
        std::process::exit(1);
    }
    for &(m, k, n) in &[(294usize, 64usize, 128usize), (294, 128, 128), (148, 128, 256), (148, 256, 256), (74, 256, 728), (74, 728, 728), (361, 728, 728)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1999) as f32 - 999.0) / 333.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.01).collect();
        let b = PackedB::with_precision(&w, &vec![0.0; n], k, n, Precision::Int8);
        let ld8 = xception_engine::int8::lhs_stride(&b);
        // Room for the rows AMX tiles read past the last one.
        let mut q = vec![0u32; (m + 16) * ld8 / 4];
        let mut scales = vec![0f32; m];
        let mut out = vec![0f32; m * n];
        let (mut quantize, mut product) = (f64::MAX, f64::MAX);
        for _ in 0..300 {
            let t = std::time::Instant::now();
            {
                // SAFETY: the u32 buffer viewed as its bytes.
                let bytes = unsafe { std::slice::from_raw_parts_mut(q.as_mut_ptr().cast::<u8>(), q.len() * 4) };
                xception_engine::int8::quantize_rows(&a, k, k, 0..m, bytes, ld8, &mut scales);
            }
            quantize = quantize.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            // SAFETY: `out` holds m rows of n values; one thread.
            unsafe { xception_engine::int8::gemm_rows(m, &q, ld8, &scales, &b, 0..b.panels(), SharedOut::new(&mut out), n, Epilogue { relu: true, ..Epilogue::PLAIN }) };
            product = product.min(t.elapsed().as_secs_f64());
        }
        let macs = (m * k * n) as f64;
        println!(
            "{m}x{k}x{n}: quantization {:.1} us, product {:.1} us = {:.0} GMAC/s (quantization {:.0}% of the two)",
            quantize * 1e6,
            product * 1e6,
            macs / product / 1e9,
            100.0 * quantize / (quantize + product)
        );
    }
}
