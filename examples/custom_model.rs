//! Train a burn module of your own with allcores: implement `Classifier`, hand the trainer a
//! function that builds the module, and it brings the data, optimizer, threads and run folder.
//!
//! Run: cargo run --release --example custom_model

use allcores_trainer::burn;
use allcores_trainer::{Classifier, Layers, Options, Settings, Splits, Trainer};
use burn::nn::{Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;

/// A residual MLP: a projection, then `x + gelu(norm(linear(x)))`, then the classifier.
#[derive(Module, Debug)]
struct ResidualMlp {
    project: Linear,
    norm: LayerNorm,
    inner: Linear,
    output: Linear,
    activation: Gelu,
}

impl ResidualMlp {
    fn new(inputs: usize, width: usize, classes: usize, device: &Device) -> Self {
        Self {
            project: LinearConfig::new(inputs, width).init(device),
            norm: LayerNormConfig::new(width).init(device),
            inner: LinearConfig::new(width, width).init(device),
            output: LinearConfig::new(width, classes).init(device),
            activation: Gelu::new(),
        }
    }
}

impl Classifier for ResidualMlp {
    fn forward(&self, inputs: Tensor<4>) -> Tensor<2> {
        let x = self.project.forward(inputs.flatten(1, 3));
        let x = x.clone()
            + self
                .activation
                .forward(self.inner.forward(self.norm.forward(x)));
        self.output.forward(x)
    }
}

fn main() -> Result<(), allcores_trainer::Error> {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/digits-mlp.toml");
    let settings = Settings::load(config.as_ref(), &Layers::default())?;
    // burn's `Linear` multiplies with matrixmultiply, which has a pool of its own.
    // SAFETY: no other thread runs yet.
    unsafe { allcores_trainer::threads::limit_matmul_threads(settings.training.threads) };
    let data = Splits::load(&settings.data)?;
    let (inputs, classes) = (data.train.shape().len(), data.classes);

    let trainer = Trainer::new(settings, data, Options::default());
    let summary = trainer
        .fit(|device| Ok(ResidualMlp::new(inputs, 96, classes, device)))?
        .summary;

    println!(
        "residual MLP: test accuracy {:.2}% after {} steps, weights_sha256 {}",
        summary.test_accuracy * 100.0,
        summary.steps,
        summary.weights_sha256
    );
    Ok(())
}
