//! Gradient accumulation is the large batch: one step of k micro-batches moves the weights as
//! one step of a single batch of all their samples, a short last micro-batch included.

mod common;

use common::{largest_relative_difference, updates};

use allcores_trainer::weights::parameters;
use allcores_trainer::{Dataset, Options, SampleShape, Settings, Splits, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` random samples of `shape` with random labels in 0..10.
fn synthetic(n: usize, shape: SampleShape, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let features = (0..n * shape.len()).map(|_| rng.random::<f32>()).collect();
    let labels = (0..n).map(|_| rng.random_range(0..10u8)).collect();
    Dataset::new(features, labels, shape)
}

fn settings(model: &str, batch_size: usize, accumulation_steps: usize, backend: &str) -> Settings {
    let text = format!(
        "[data]\nformat = \"csv\"\ntrain_csv = \"unused.csv\"\ntest_fraction = 0.5\n\
         [model]\n{model}\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.0\n\
         [training]\nbatch_size = {batch_size}\naccumulation_steps = {accumulation_steps}\n\
         max_steps = 1\nthreads = 1\nbackend = \"{backend}\"\n"
    );
    toml::from_str(&text).expect("valid settings")
}

/// The parameters after one optimizer step over the whole (shuffled) training set.
fn one_step(settings: Settings, data: &Splits) -> Vec<Vec<f32>> {
    let trainer = Trainer::new(
        settings,
        data.clone(),
        Options {
            quiet: true,
            ..Options::default()
        },
    );
    parameters(&trainer.fit_builtin().expect("trains").model)
}

fn check(model: &str, shape: SampleShape, backend: &str) {
    // 64 samples: 16 x 4 divides evenly. 60 samples: micro-batches of 16, 16, 16 and 12.
    for samples in [64, 60] {
        let data = Splits {
            train: synthetic(samples, shape, 1),
            test: synthetic(20, shape, 2),
            classes: 10,
            table: None,
            warnings: Vec::new(),
        };
        let large = one_step(settings(model, samples, 1, backend), &data);
        let accumulated = one_step(settings(model, 16, 4, backend), &data);
        let before = {
            // A rate so small that the step leaves every f32 weight as it was.
            let mut s = settings(model, samples, 1, backend);
            s.optimizer.lr = 1e-30;
            one_step(s, &data)
        };
        let difference = largest_relative_difference(&large, &accumulated);
        assert!(
            difference <= 1e-5,
            "{model} {backend} {samples}: {difference}"
        );
        // Stronger: the updates themselves agree, relative to their own size...
        let update_difference =
            largest_relative_difference(&updates(&large, &before), &updates(&accumulated, &before));
        assert!(
            update_difference <= 1e-4,
            "{model} {backend} {samples}: {update_difference}"
        );
        // ...and the step moved the weights far more than the tolerance, so the test can fail.
        let moved = largest_relative_difference(&large, &before);
        assert!(
            moved > 1e-3,
            "{model} {backend} {samples}: the step moved {moved}"
        );
    }
}

#[test]
fn mlp_accumulated_step_equals_the_large_batch_step() {
    let shape = SampleShape {
        channels: 1,
        height: 1,
        width: 20,
    };
    check("kind = \"mlp\"\nhidden = [32, 16]", shape, "ndarray");
    check("kind = \"mlp\"\nhidden = [32, 16]", shape, "flex");
}

#[test]
fn cnn_accumulated_step_equals_the_large_batch_step() {
    let shape = SampleShape {
        channels: 1,
        height: 12,
        width: 12,
    };
    let cnn = "kind = \"cnn\"\nchannels = [4, 8]\ndense = 16";
    check(cnn, shape, "flex");
    check(cnn, shape, "ndarray");
}
