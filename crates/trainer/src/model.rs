//! What the trainer trains: any burn [`Module`] that implements [`Classifier`], and the two
//! built-in networks the config file can name.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;

use crate::data::SampleShape;
use crate::error::{Error, Result};
use crate::kernels;
use crate::precision::round_activations;
use crate::settings::{ModelKind, ModelSettings};

/// A burn module that maps a batch of samples to class logits.
///
/// Implement it for your own module and hand it to [`crate::Trainer::fit`]: the trainer
/// supplies data, optimizer, threads and run folder.
pub trait Classifier: Module + Sync {
    /// `inputs` is `[batch, channels, height, width]`; the result is `[batch, classes]` logits.
    fn forward(&self, inputs: Tensor<4>) -> Tensor<2>;

    /// What a run's log and summary call the model: by default its type's name (`ResidualMlp`).
    fn name(&self) -> String {
        short_type_name(std::any::type_name::<Self>()).to_string()
    }
}

/// `my_crate::models::Net<Backend>` as `Net`.
fn short_type_name(full: &str) -> &str {
    let path = full.split('<').next().unwrap_or(full);
    path.rsplit("::").next().unwrap_or(path)
}

/// Multi-layer perceptron: ReLU hidden layers, then a linear classifier.
#[derive(Module, Debug)]
pub struct Mlp {
    hidden: Vec<Linear>,
    output: Linear,
    activation: Relu,
}

impl Mlp {
    pub fn new(inputs: usize, hidden: &[usize], classes: usize, device: &Device) -> Self {
        let mut width = inputs;
        let hidden = hidden
            .iter()
            .map(|&size| {
                let layer = LinearConfig::new(width, size).init(device);
                width = size;
                layer
            })
            .collect();
        Self {
            hidden,
            output: LinearConfig::new(width, classes).init(device),
            activation: Relu::new(),
        }
    }
}

impl Classifier for Mlp {
    fn forward(&self, inputs: Tensor<4>) -> Tensor<2> {
        let mut x: Tensor<2> = inputs.flatten(1, 3);
        for layer in &self.hidden {
            x = round_activations(dense(layer, &self.activation, x, true));
        }
        dense(&self.output, &self.activation, x, false)
    }
}

/// A dense layer, followed by ReLU when `relu`. f32 on burn-ndarray and burn-flex runs the
/// crate's [`kernels::linear`] (the `Linear` module only holds the parameters, so names, shapes
/// and checkpoints stay burn's); anything else, burn's modules.
fn dense(layer: &Linear, activation: &Relu, x: Tensor<2>, relu: bool) -> Tensor<2> {
    match &layer.bias {
        Some(bias) if kernels::supported(&x.device(), x.dtype()) => {
            kernels::linear(x, layer.weight.val(), bias.val(), relu)
        }
        _ if relu => activation.forward(layer.forward(x)),
        _ => layer.forward(x),
    }
}

/// Two convolution + ReLU + 2x2 max-pool blocks, then a dense ReLU layer and a classifier.
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    dense: Linear,
    output: Linear,
    activation: Relu,
}

impl Cnn {
    /// Fails when the images are too small for two convolution and pooling blocks.
    pub fn new(
        settings: &ModelSettings,
        shape: SampleShape,
        classes: usize,
        device: &Device,
    ) -> Result<Self> {
        let k = settings.kernel_size;
        let [c1, c2] = settings.channels;
        Ok(Self {
            conv1: Conv2dConfig::new([shape.channels, c1], [k, k]).init(device),
            conv2: Conv2dConfig::new([c1, c2], [k, k]).init(device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            dense: LinearConfig::new(c2 * Self::feature_map(settings, shape)?, settings.dense)
                .init(device),
            output: LinearConfig::new(settings.dense, classes).init(device),
            activation: Relu::new(),
        })
    }

    /// How many values each channel of the second block's output holds (height x width) for
    /// samples of `shape`; fails when the images are too small for two blocks.
    fn feature_map(settings: &ModelSettings, shape: SampleShape) -> Result<usize> {
        let k = settings.kernel_size;
        let block = |side: usize| side.checked_sub(k - 1).map(|s| s / 2).filter(|&s| s > 0);
        let out = |side| block(side).and_then(block);
        let (Some(h), Some(w)) = (out(shape.height), out(shape.width)) else {
            return Err(Error::Model(format!(
                "model.kind = \"cnn\" with kernel_size {k} does not fit {}x{} inputs: two \
                 convolution and pooling blocks need images of at least {min}x{min}",
                shape.height,
                shape.width,
                min = 3 * k as u128 + 1
            )));
        };
        Ok(h * w)
    }

    /// Convolution, ReLU and 2x2 max-pool. On burn-ndarray and burn-flex this runs the crate's
    /// [`kernels`] (the `Conv2d` module only holds the parameters); anything else, burn's modules.
    fn block(&self, conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        match &conv.bias {
            Some(bias) if kernels::supported(&x.device(), x.dtype()) => {
                kernels::conv2d_relu_pool(x, conv.weight.val(), bias.val())
            }
            _ => self.pool.forward(self.activation.forward(conv.forward(x))),
        }
    }
}

impl Classifier for Cnn {
    fn forward(&self, inputs: Tensor<4>) -> Tensor<2> {
        let x = round_activations(self.block(&self.conv1, inputs));
        let x = round_activations(self.block(&self.conv2, x));
        let x: Tensor<2> = x.flatten(1, 3);
        let x = round_activations(dense(&self.dense, &self.activation, x, true));
        dense(&self.output, &self.activation, x, false)
    }
}

/// The networks a config file can name with `model.kind`.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one value per run: its size does not matter
pub enum BuiltinModel {
    Mlp(Mlp),
    Cnn(Cnn),
}

impl BuiltinModel {
    /// Builds the configured network for samples of `shape`, initialised from the device's
    /// random generator (seed it first). Refuses, before allocating any of it, a network whose
    /// weights alone would not fit in memory: a few zeros too many in a layer size would
    /// otherwise end the process in a failed allocation.
    pub fn new(
        settings: &ModelSettings,
        shape: SampleShape,
        classes: usize,
        device: &Device,
    ) -> Result<Self> {
        let parameters = Self::parameter_count(settings, shape, classes)?;
        ensure_memory_for(parameters, 1, "their f32 weights alone")?;
        Ok(match settings.kind {
            ModelKind::Mlp => {
                BuiltinModel::Mlp(Mlp::new(shape.len(), &settings.hidden, classes, device))
            }
            ModelKind::Cnn => BuiltinModel::Cnn(Cnn::new(settings, shape, classes, device)?),
            ModelKind::Gpt => return Err(not_a_classifier()),
        })
    }

    /// The values one sample's forward pass keeps for backward in the configured network
    /// (inputs, each layer's output, and for the CNN each convolution's output before pooling),
    /// counted without building it, in `f64` as [`Self::parameter_count`].
    pub fn activation_count(
        settings: &ModelSettings,
        shape: SampleShape,
        classes: usize,
    ) -> Result<f64> {
        let size = |n: usize| n as f64;
        let outputs = size(classes) + size(shape.len());
        Ok(match settings.kind {
            ModelKind::Mlp => outputs + settings.hidden.iter().copied().map(size).sum::<f64>(),
            ModelKind::Cnn => {
                let k = settings.kernel_size;
                let convolved = |side: usize| side.saturating_sub(k - 1);
                let pooled_side = |side: usize| convolved(side) / 2;
                let [c1, c2] = settings.channels.map(size);
                let first = c1 * size(convolved(shape.height) * convolved(shape.width));
                let second = c2
                    * size(
                        convolved(pooled_side(shape.height)) * convolved(pooled_side(shape.width)),
                    );
                let pooled = first / 4.0 + c2 * size(Cnn::feature_map(settings, shape)?);
                outputs + first + second + pooled + size(settings.dense)
            }
            ModelKind::Gpt => return Err(not_a_classifier()),
        })
    }

    /// The trainable values of the configured network, counted without building it (in `f64`:
    /// a size with too many zeros must be counted, not overflow).
    pub fn parameter_count(
        settings: &ModelSettings,
        shape: SampleShape,
        classes: usize,
    ) -> Result<f64> {
        // A dense layer: a weight per input and output, a bias per output; a convolution's
        // inputs are its input channels times its window.
        let layer = |inputs: f64, outputs: f64| (inputs + 1.0) * outputs;
        let size = |n: usize| n as f64;
        Ok(match settings.kind {
            ModelKind::Mlp => {
                let widths: Vec<f64> = std::iter::once(shape.len())
                    .chain(settings.hidden.iter().copied())
                    .chain(std::iter::once(classes))
                    .map(size)
                    .collect();
                widths.windows(2).map(|w| layer(w[0], w[1])).sum()
            }
            ModelKind::Cnn => {
                let window = size(settings.kernel_size).powi(2);
                let [c1, c2] = settings.channels.map(size);
                let features = c2 * size(Cnn::feature_map(settings, shape)?);
                let dense = size(settings.dense);
                layer(size(shape.channels) * window, c1)
                    + layer(c1 * window, c2)
                    + layer(features, dense)
                    + layer(dense, size(classes))
            }
            ModelKind::Gpt => return Err(not_a_classifier()),
        })
    }
}

/// A GPT asked for where a classifier is built (validated settings pair it with text data,
/// which the language-model path trains).
fn not_a_classifier() -> Error {
    Error::Model("model.kind = \"gpt\" is a language model, not a classifier".into())
}

/// Refuses `parameters` whose `values_each` f32 values (weights, and gradients and optimizer
/// state where a run keeps them) would take more memory than this process may use: `what`
/// names those values in the error.
pub fn ensure_memory_for(parameters: f64, values_each: usize, what: &str) -> Result<()> {
    let needed = parameters * values_each as f64 * 4.0;
    refuse_beyond_memory(needed, |limit| {
        format!(
            "{} parameters: {what} take {}, more than the {limit} this process may use",
            crate::thousands(parameters),
            gib(needed),
        )
    })
}

/// Refuses `needed` bytes past the memory this process may use, with the message `describe`
/// writes around that limit (in GiB); passes where the limit cannot be read.
fn refuse_beyond_memory(needed: f64, describe: impl FnOnce(String) -> String) -> Result<()> {
    match crate::usage::memory_limit_bytes() {
        Some(limit) if needed > limit as f64 => Err(Error::Model(describe(gib(limit as f64)))),
        _ => Ok(()),
    }
}

/// `bytes` in GiB: to one decimal, or in whole GiB with digits grouped past 10,000 (a typo's
/// size, where decimals are noise).
fn gib(bytes: f64) -> String {
    let gib = bytes / (1u64 << 30) as f64;
    match gib < 1e4 {
        true => format!("{gib:.1} GiB"),
        false => format!("{} GiB", crate::thousands(gib)),
    }
}

/// What a training run holds at once, for [`ensure_memory_for_run`].
#[derive(Debug, Clone, Copy)]
pub struct RunMemory {
    pub parameters: f64,
    /// f32 values kept per parameter: weights, gradients, optimizer state.
    pub values_each: usize,
    /// What those values are, for the message.
    pub values_are: &'static str,
    /// Activations one sample's forward pass keeps for its backward pass.
    pub activations_per_sample: f64,
    /// Samples whose passes run at once: a piece's samples times the pieces in flight.
    pub samples_in_flight: f64,
}

/// Refuses a run whose parameters and activations would take more memory than this process
/// may use. The count is a floor (each activation is kept once and gets one gradient, as f32):
/// what it refuses cannot train here, and a wide layer with a large batch no longer passes a
/// check of the parameters alone to abort on its first activation.
pub fn ensure_memory_for_run(run: RunMemory) -> Result<()> {
    let parameters = run.parameters * run.values_each as f64 * 4.0;
    let activations = run.activations_per_sample * run.samples_in_flight * 2.0 * 4.0;
    refuse_beyond_memory(parameters + activations, |limit| {
        format!(
            "this run needs at least {} ({} parameters: {} take {}; {} of activations for {} \
             samples in flight), more than the {limit} this process may use: lower \
             training.batch_size or the model's size",
            gib(parameters + activations),
            crate::thousands(run.parameters),
            run.values_are,
            gib(parameters),
            gib(activations),
            crate::thousands(run.samples_in_flight),
        )
    })
}

impl Classifier for BuiltinModel {
    fn forward(&self, inputs: Tensor<4>) -> Tensor<2> {
        match self {
            BuiltinModel::Mlp(m) => m.forward(inputs),
            BuiltinModel::Cnn(m) => m.forward(inputs),
        }
    }

    /// The `model.kind` that names it.
    fn name(&self) -> String {
        match self {
            BuiltinModel::Mlp(_) => ModelKind::Mlp,
            BuiltinModel::Cnn(_) => ModelKind::Cnn,
        }
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_named_by_its_type_or_its_kind() {
        assert_eq!(short_type_name("custom_model::ResidualMlp"), "ResidualMlp");
        assert_eq!(short_type_name("a::b::Net<burn::Dispatch>"), "Net");
        assert_eq!(short_type_name("Net"), "Net");
        let device = Device::default();
        let mlp = Mlp::new(4, &[3], 2, &device);
        assert_eq!(mlp.name(), "Mlp");
        assert_eq!(BuiltinModel::Mlp(mlp).name(), "mlp");
    }

    /// The count made before building a network is the built network's.
    #[test]
    fn parameters_are_counted_before_the_model_is_built() {
        let device = Device::default();
        let shape = SampleShape {
            channels: 1,
            height: 12,
            width: 11,
        };
        for kind in [ModelKind::Mlp, ModelKind::Cnn] {
            let settings = ModelSettings {
                kind,
                hidden: vec![7, 5],
                channels: [3, 4],
                kernel_size: 2,
                dense: 6,
                ..ModelSettings::default()
            };
            let counted = BuiltinModel::parameter_count(&settings, shape, 3).unwrap();
            let built = BuiltinModel::new(&settings, shape, 3, &device).unwrap();
            assert_eq!(counted, built.num_params() as f64, "{kind}");
        }
    }

    #[test]
    fn a_model_larger_than_memory_is_refused_before_it_is_built() {
        let err = ensure_memory_for(1e15, 1, "their weights").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("model: 1,000,000,000,000,000 parameters: their weights take"),
            "{text}"
        );
        ensure_memory_for(1e3, 4, "their weights").unwrap();
    }

    /// A 20-million-wide layer on one feature has few parameters, but a batch of 100 holds
    /// 8 GB of its activations: the parameters alone passed the check.
    #[test]
    fn activations_count_toward_the_memory_a_run_needs() {
        let shape = SampleShape {
            channels: 1,
            height: 1,
            width: 1,
        };
        let wide = ModelSettings {
            hidden: vec![20_000_000],
            ..ModelSettings::default()
        };
        let activations = BuiltinModel::activation_count(&wide, shape, 2).unwrap();
        assert_eq!(activations, 1.0 + 20_000_000.0 + 2.0);
        let parameters = BuiltinModel::parameter_count(&wide, shape, 2).unwrap();
        let run = |activations_per_sample: f64, samples_in_flight: f64| RunMemory {
            parameters,
            values_each: 4,
            values_are: "their weights, gradients and Adam's moments",
            activations_per_sample,
            samples_in_flight,
        };
        // 1.6 TB of activations: more than any machine that runs these tests.
        let err = ensure_memory_for_run(run(activations, 1e4))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("model: this run needs at least"), "{err}");
        assert!(
            err.contains("of activations for 10,000 samples in flight"),
            "{err}"
        );
        // The same parameters (1 GB with gradients and state) and a few activations pass.
        ensure_memory_for_run(run(1e3, 1.0)).unwrap();
    }

    #[test]
    fn cnn_activations_count_each_block_before_and_after_pooling() {
        let shape = SampleShape {
            channels: 1,
            height: 28,
            width: 28,
        };
        let cnn = ModelSettings {
            kind: ModelKind::Cnn,
            channels: [2, 3],
            kernel_size: 5,
            dense: 7,
            ..ModelSettings::default()
        };
        // 784 inputs, 2x24x24 convolved, 2x12x12 pooled, 3x8x8 convolved, 3x4x4 pooled, 7, 10.
        let expected = 784 + 2 * 576 + 2 * 144 + 3 * 64 + 3 * 16 + 7 + 10;
        assert_eq!(
            BuiltinModel::activation_count(&cnn, shape, 10).unwrap(),
            expected as f64
        );
    }
}
