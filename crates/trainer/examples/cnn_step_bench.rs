//! Times training steps of the built-in CNN (conv 1->32 3x3, pool, conv 32->64 3x3, pool, dense
//! 128, 10 classes; Adam, f32, random inputs) with the crate's convolution kernels and with burn's
//! own `Conv2d` + `MaxPool2d`, the steps `benches/torch_steps.py --model cnn` times in PyTorch.
//!
//! Run: cargo run --release -p allcores-trainer --example cnn_step_bench -- BACKEND THREADS VARIANT [STEPS] [BATCH]
//! with BACKEND `ndarray` or `flex` and VARIANT `kernels` or `burn`. One process per thread
//! count: burn-ndarray's matrix products read their thread count once per process.

use std::num::NonZeroUsize;
use std::time::Instant;

use allcores_trainer::burn;
use allcores_trainer::model::Cnn;
use allcores_trainer::settings::{Backend, ModelKind, ModelSettings, Threads};
use allcores_trainer::{Classifier, SampleShape, ThreadPlan, device};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;

/// The same network as the built-in `Cnn`, on burn's modules only.
#[derive(Module, Debug)]
struct BurnCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    dense: Linear,
    output: Linear,
    activation: Relu,
}

impl BurnCnn {
    fn new(device: &Device) -> Self {
        Self {
            conv1: Conv2dConfig::new([1, 32], [3, 3]).init(device),
            conv2: Conv2dConfig::new([32, 64], [3, 3]).init(device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            dense: LinearConfig::new(64 * 5 * 5, 128).init(device),
            output: LinearConfig::new(128, 10).init(device),
            activation: Relu::new(),
        }
    }
}

impl Classifier for BurnCnn {
    fn forward(&self, inputs: Tensor<4>) -> Tensor<2> {
        let block = |conv: &Conv2d, x| self.pool.forward(self.activation.forward(conv.forward(x)));
        let x = block(&self.conv2, block(&self.conv1, inputs));
        self.output
            .forward(self.activation.forward(self.dense.forward(x.flatten(1, 3))))
    }
}

/// Milliseconds per step, per phase (forward + loss, backward, optimizer), and the last loss,
/// after 3 untimed steps.
fn time_steps<M>(mut model: M, device: &Device, batch: usize, steps: usize) -> (f64, [f64; 3], f32)
where
    M: Classifier,
{
    let mut optimizer = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let x = Tensor::<4>::random([batch, 1, 28, 28], Distribution::Normal(0.0, 1.0), device);
    let labels: Vec<i64> = (0..batch as i64).map(|i| (i * 7) % 10).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), device);
    let mut started = Instant::now();
    let (mut loss, mut phases) = (0.0, [0.0f64; 3]);
    for step in 0..steps + 3 {
        if step == 3 {
            started = Instant::now();
            phases = [0.0; 3];
        }
        let t0 = Instant::now();
        let l = loss_fn.forward(model.forward(x.clone()), y.clone());
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(l.backward(), &model);
        let t2 = Instant::now();
        model = optimizer.step(1e-3, model, grads);
        let t3 = Instant::now();
        for (phase, (a, b)) in phases.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3)]) {
            *phase += (b - a).as_secs_f64() * 1e3 / steps as f64;
        }
        loss = l.into_scalar::<f32>();
    }
    let ms = started.elapsed().as_secs_f64() * 1e3 / steps as f64;
    (ms, phases, loss)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: cnn_step_bench ndarray|flex THREADS kernels|burn [STEPS] [BATCH]";
    let backend = match args.first().map(String::as_str) {
        Some("ndarray") => Backend::Ndarray,
        Some("flex") => Backend::Flex,
        _ => panic!("{usage}"),
    };
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).expect(usage);
    let kernels = match args.get(2).map(String::as_str) {
        Some("kernels") => true,
        Some("burn") => false,
        _ => panic!("{usage}"),
    };
    let steps: usize = args.get(3).map_or(10, |s| s.parse().expect(usage));
    let batch: usize = args.get(4).map_or(128, |s| s.parse().expect(usage));

    let plan = ThreadPlan::new(Threads::Count(NonZeroUsize::new(threads).expect(usage)));
    let pool = plan.install().expect("a rayon pool");
    let (ms, [forward, backward, update], loss) = pool.install(|| {
        let device = device(backend);
        device.seed(42);
        if kernels {
            let settings = ModelSettings {
                kind: ModelKind::Cnn,
                hidden: vec![],
                channels: [32, 64],
                kernel_size: 3,
                dense: 128,
                ..ModelSettings::default()
            };
            let shape = SampleShape {
                channels: 1,
                height: 28,
                width: 28,
            };
            let model = Cnn::new(&settings, shape, 10, &device).expect("the CNN fits 28x28");
            time_steps(model, &device, batch, steps)
        } else {
            time_steps(BurnCnn::new(&device), &device, batch, steps)
        }
    });
    println!(
        "burn backend={backend} variant={} threads={threads} batch={batch} step_ms={ms:.3} \
         samples_per_s={:.0} loss={loss:.6} forward_ms={forward:.2} backward_ms={backward:.2} \
         optimizer_ms={update:.2}",
        if kernels { "kernels" } else { "burn" },
        batch as f64 * 1e3 / ms
    );
}
