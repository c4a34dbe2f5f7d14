//! The int8 row quantizer alone (`int8::quantize_rows`: each row's scale from its largest value,
//! then its bytes), on one thread, at the row lengths of the flows (64 to 728 values), best of
//! 2000 calls: `cargo run --release -p xception-engine --example quant_speed`. On AMD Zen 4
//! (2026-12-07): 14.4 ns a 64-value row, 20.6 ns a 128-value row, 76 ns a 728-value one; with
//! rows two at a time (AVX-512) 12.0-13.9, 15.5-17.0 and 60-67 (alternated with the one-row loop,
//! which ran 11.5-14.7, 20.9-21.1 and 64-80 meanwhile).
#[global_allocator]
static A: xception_engine::align::LineAligned = xception_engine::align::LineAligned;
fn main() {
    for &(rows, k) in &[(147usize, 64usize), (147, 128), (74, 256), (37, 728), (19, 728)] {
        let a: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 1999) as f32 - 999.0) / 333.0).collect();
        let ld8 = k.next_multiple_of(16);
        let mut d = vec![0u8; rows * ld8];
        let mut s = vec![0f32; rows];
        let mut best = f64::MAX;
        for _ in 0..2000 {
            let t = std::time::Instant::now();
            xception_engine::int8::quantize_rows(&a, k, k, 0..rows, &mut d, ld8, &mut s);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{rows} rows x {k}: {:.1} ns a row, {:.2} ns a value", best / rows as f64 * 1e9, best / (rows * k) as f64 * 1e9);
    }
}
