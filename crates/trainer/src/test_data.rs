//! Seeded test tensors, and pools of a chosen size.
//!
//! Tests run in parallel and burn's generator is shared by all of them, so `Tensor::random`
//! after `device.seed(n)` gives a test other values from run to run; a test that compares
//! exactly then fails only on some draws. These come from a generator of the test's own.

use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Values uniform in [0, 1), drawn from `seed` alone.
pub fn uniform<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.iter().product())
        .map(|_| rng.random::<f32>())
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Values of a normal distribution of mean 0 and deviation `std` (Box-Muller), from `seed`.
pub fn normal<const D: usize>(
    shape: [usize; D],
    std: f32,
    seed: u64,
    device: &Device,
) -> Tensor<D> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.iter().product())
        .map(|_| {
            let (u, v) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * std
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// `f`'s result, run in a rayon pool of `threads` threads of its own: what a test compares
/// across thread counts.
pub fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool")
        .install(f)
}

#[test]
fn the_same_seed_gives_the_same_values() {
    let device = Device::flex();
    let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(
        values(uniform([3, 4], 1, &device)),
        values(uniform([3, 4], 1, &device))
    );
    assert_ne!(
        values(uniform([3, 4], 1, &device)),
        values(uniform([3, 4], 2, &device))
    );
    let big = values(normal([100, 100], 2.0, 3, &device));
    let mean = big.iter().sum::<f32>() / big.len() as f32;
    let var = big.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / big.len() as f32;
    assert!(
        mean.abs() < 0.1 && (var.sqrt() - 2.0).abs() < 0.1,
        "{mean} {var}"
    );
}
