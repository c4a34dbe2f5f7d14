//! The fused engine runs a batch of several images as one stream of images per thread
//! (`Engine::forward_with`); each image must come out exactly as it does alone, taps included.
use xception::{Engine, ModelConfig, Network, Precision};

#[test]
fn a_batch_gives_each_image_exactly_what_it_gets_alone() {
    let mut precisions = vec![Precision::F32];
    if xception::engine::bf16_available() {
        precisions.push(Precision::Bf16);
    }
    if xception::engine::bf16x3_available() {
        precisions.push(Precision::Bf16x3);
    }
    if xception::engine::int8_available() {
        precisions.push(Precision::Int8);
    }
    for (model, precision) in ["xception", "xception41"].into_iter().flat_map(|m| precisions.iter().map(move |&p| (m, p))) {
        let net = Network::build(&ModelConfig::from_name(model).unwrap()).unwrap();
        let weights = xception::weights::deterministic(&net);
        let engine = Engine::with_precision(&net, &weights, 2, precision).unwrap();
        let model = format!("{model} ({})", precision.name());
        let (n, h, w) = (3, 96, 96);
        let per = h * w * 3;
        let input: Vec<f32> = (0..n * per).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect();
        let batch = engine.forward(&input, n, h, w).unwrap();
        assert_eq!(batch.features.n, n, "{model}: batch size of the features");
        let logits_per = batch.logits.as_ref().unwrap().len() / n;
        let pooled_per = batch.pooled.len() / n;
        for i in 0..n {
            let alone = engine.forward(&input[i * per..][..per], 1, h, w).unwrap();
            let part = |a: &[f32], len: usize| a[i * len..][..len].to_vec();
            assert_eq!(alone.features.data, part(&batch.features.data, alone.features.data.len()), "{model}: image {i} features");
            assert_eq!(alone.pooled, part(&batch.pooled, pooled_per), "{model}: image {i} pooled");
            assert_eq!(alone.logits.unwrap(), part(batch.logits.as_ref().unwrap(), logits_per), "{model}: image {i} logits");
            assert_eq!(alone.taps.len(), batch.taps.len(), "{model}: number of taps");
            for (t, (a, b)) in alone.taps.iter().zip(&batch.taps).enumerate() {
                assert_eq!(a.data, part(&b.data, a.data.len()), "{model}: image {i} tap {t}");
            }
        }
    }
}

/// How the engine shares a layer out between threads (rows, panels, bands) never changes the
/// order of any output's sums, so every thread count gives the same bits.
#[test]
fn every_thread_count_gives_the_same_bits() {
    let net = Network::build(&ModelConfig::from_name("xception41").unwrap()).unwrap();
    let weights = xception::weights::deterministic(&net);
    let (h, w) = (131, 131);
    let input: Vec<f32> = (0..h * w * 3).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect();
    // int8 too: each row's scale is its own, whatever rows a task gets.
    let precisions = if xception::engine::int8_available() { vec![Precision::F32, Precision::Int8] } else { vec![Precision::F32] };
    for precision in precisions {
        let one = Engine::with_precision(&net, &weights, 1, precision).unwrap().forward(&input, 1, h, w).unwrap();
        for threads in [2, 3, 4] {
            let many = Engine::with_precision(&net, &weights, threads, precision).unwrap().forward(&input, 1, h, w).unwrap();
            let what = format!("{} at {threads} threads", precision.name());
            assert_eq!(one.features.data, many.features.data, "features, {what}");
            assert_eq!(one.logits, many.logits, "logits, {what}");
            for (t, (a, b)) in one.taps.iter().zip(&many.taps).enumerate() {
                assert_eq!(a.data, b.data, "tap {t}, {what}");
            }
        }
    }
}

/// A batch of no images is an error naming it, not a panic.
#[test]
fn an_empty_batch_is_an_error() {
    let net = Network::build(&ModelConfig::from_name("xception").unwrap()).unwrap();
    let weights = xception::weights::deterministic(&net);
    let engine = Engine::new(&net, &weights, 2).unwrap();
    let err = engine.forward(&[], 0, 96, 96).err().expect("an empty batch fails");
    assert!(err.to_string().contains("empty batch"), "{err}");
}

/// Several threads calling one engine at once (its workers poll for tasks during a pass, and a
/// poller may pick up another caller's pass): every call finishes with its own image's output.
#[test]
fn concurrent_callers_each_get_their_own_output() {
    let net = Network::build(&ModelConfig::from_name("xception41").unwrap()).unwrap();
    let weights = xception::weights::deterministic(&net);
    let engine = Engine::new(&net, &weights, 2).unwrap();
    let (h, w) = (64, 64);
    let image = |seed: usize| -> Vec<f32> { (0..h * w * 3).map(|i| (((i + seed) * 7919) % 255) as f32 / 127.5 - 1.0).collect() };
    let alone: Vec<Vec<f32>> = (0..3).map(|s| engine.forward(&image(s), 1, h, w).unwrap().features.data).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|s| {
                let (engine, input) = (&engine, image(s));
                scope.spawn(move || (0..4).map(|_| engine.forward(&input, 1, h, w).unwrap().features.data).collect::<Vec<_>>())
            })
            .collect();
        for (s, handle) in handles.into_iter().enumerate() {
            for out in handle.join().unwrap() {
                assert_eq!(out, alone[s], "caller {s}");
            }
        }
    });
}
