//! Loss scaling rescues f16 gradients that would underflow to zero.
//!
//! The model below multiplies the gradient flowing back from its logits by 2^-24, in its own
//! precision (its forward value is unchanged): in f16 those gradients are below the smallest
//! subnormal (2^-24 ~ 6e-8) and flush to zero, so without loss scaling nothing trains. With the
//! default scale of 2^16 they are representable; Adam, with a negligible epsilon, does not care
//! how small the unscaled gradients are, so the model trains as it would in f32.

use allcores_trainer::burn::prelude::*;
use allcores_trainer::model::Mlp;
use allcores_trainer::precision::round_activations;
use allcores_trainer::{Classifier, Layers, Options, Settings, Splits, Trainer};

/// The factor the gradient of the logits is multiplied by.
const SHRINK: f32 = 1.0 / (1u32 << 24) as f32;

#[derive(Module, Debug)]
struct ShrunkGradients {
    inner: Mlp,
}

impl Classifier for ShrunkGradients {
    fn forward(&self, inputs: Tensor<4>) -> Tensor<2> {
        let logits = self.inner.forward(inputs);
        // Backward passes through `tiny` only: rounded (emulated f16) after the multiplication.
        let tiny = round_activations(logits.clone()).mul_scalar(SHRINK);
        tiny.clone() + (logits - tiny).detach()
    }
}

fn settings(backend: &str, scaling: &str) -> Settings {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets");
    let config = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[data]\nformat = \"csv\"\ntrain_csv = \"{}\"\ntest_fraction = 0.2\nscale = 16.0\n\
             [optimizer]\nlr = 0.003\nepsilon = 1e-20\n\
             [training]\nepochs = 3\nbatch_size = 32\nthreads = 1\nbackend = \"{backend}\"\n\
             precision = \"f16\"\n[precision]\nloss_scaling = \"{scaling}\"\n",
            data.join("uci-digits.csv.gz").display()
        ),
    )
    .unwrap();
    Settings::load(config.path(), &Layers::default()).expect("valid settings")
}

fn accuracy(backend: &str, scaling: &str) -> f64 {
    let settings = settings(backend, scaling);
    let data = Splits::load(&settings.data).expect("the digits load");
    let shape = data.train.shape();
    let trainer = Trainer::new(
        settings,
        data,
        Options {
            quiet: true,
            ..Options::default()
        },
    );
    let outcome = trainer
        .fit(|device| {
            Ok(ShrunkGradients {
                inner: Mlp::new(shape.len(), &[32], 10, device),
            })
        })
        .expect("trains");
    // A model of one's own is named by its type, not by the config's `model.kind`.
    assert_eq!(outcome.summary.model, "ShrunkGradients");
    assert_eq!(outcome.summary.parameters, (64 * 32 + 32) + (32 * 10 + 10));
    outcome.summary.test_accuracy
}

fn check(backend: &str) {
    let unscaled = accuracy(backend, "off");
    let scaled = accuracy(backend, "dynamic");
    assert!(unscaled < 0.3, "{backend}: without scaling {unscaled}");
    assert!(scaled > 0.85, "{backend}: with scaling {scaled}");
}

#[test]
fn scaling_rescues_underflowing_gradients_emulated_on_ndarray() {
    check("ndarray");
}

#[test]
fn scaling_rescues_underflowing_gradients_native_on_flex() {
    check("flex");
}
