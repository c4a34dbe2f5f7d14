//! This CPU's fp32 peak, measured: every thread runs independent FMA chains (no memory traffic)
//! at the widest vector width the engine uses, so the figure includes whatever clock the cores
//! actually hold under vector load (turbo, AVX-512 licences, a VM's share).

/// Measured fp32 GFLOP/s of `threads` threads running FMAs side by side (about 0.2 s).
pub fn measured_peak_gflops(threads: usize) -> f64 {
    let reps = 20_000_000usize;
    side_by_side(threads, move || {
        let t = std::time::Instant::now();
        let flops = fma_loop(reps);
        flops / t.elapsed().as_secs_f64() / 1e9
    })
}

/// Measured memory bandwidth (GB/s) of `threads` threads side by side, each copying its own
/// buffer far larger than a core's share of the last-level cache (bytes read plus bytes
/// written, best of three rounds): the rate a layer whose activations and weights come from
/// memory can at most move them (the roofline's slope). Buffers of 64 MiB, smaller with many
/// threads (16 MiB from 32 threads on, 2 GiB in all at 64), always well past the cache in all.
pub fn measured_bandwidth_gbs(threads: usize) -> f64 {
    let values = ((128 << 20) / threads.max(1)).clamp(4 << 20, 16 << 20);
    side_by_side(threads, move || {
        let src = vec![1f32; values];
        let mut dst = vec![0f32; values];
        (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                dst.copy_from_slice(std::hint::black_box(&src));
                std::hint::black_box(&dst);
                2.0 * (values * 4) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    })
}

/// The sum of the rates `rate` returns, run on `threads` (at least one) threads at once.
fn side_by_side(threads: usize, rate: impl Fn() -> f64 + Send + Copy + 'static) -> f64 {
    let handles: Vec<_> = (0..threads.max(1)).map(|_| std::thread::spawn(rate)).collect();
    handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
}

/// Runs `reps` rounds of independent FMA chains; returns the flops done.
fn fma_loop(reps: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // Independent chains hide the FMA latency on both ports: 4 cycles x 2 ports needs 8;
        // 24 zmm (12 ymm) chains leave headroom for slower-latency cores.
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn wide(reps: usize) -> f32 {
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_set1_ps(1.0); 24];
            for _ in 0..reps {
                for v in acc.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, a, b);
                }
            }
            _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v)))
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn narrow(reps: usize) -> f32 {
            let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_set1_ps(1.0); 12];
            for _ in 0..reps {
                for v in acc.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, a, b);
                }
            }
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), acc.iter().fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v)));
            out.iter().sum()
        }
        if crate::packed::has_avx512() {
            // SAFETY: the CPU has AVX-512F and FMA (checked).
            std::hint::black_box(unsafe { wide(reps) });
            return (reps * 24 * 16 * 2) as f64;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked).
            std::hint::black_box(unsafe { narrow(reps) });
            return (reps * 12 * 8 * 2) as f64;
        }
    }
    let mut acc = [1f32; 8];
    for _ in 0..reps {
        for v in acc.iter_mut() {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    (reps * 8 * 2) as f64
}
