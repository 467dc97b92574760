//! The floor the trainer's overhead is measured against: a bare burn training loop, no
//! allcores around it. The same MLP (784-512-512-10), Adam 1e-3 and cross-entropy as
//! `examples/mnist-mlp.toml`, on one fixed random batch held in memory, inside a rayon pool of
//! the given size (and `MATMUL_NUM_THREADS` set to match, as allcores does).
//!
//!   cargo run --release --example raw_loop -- BACKEND THREADS BATCH STEPS
//!
//! Prints the samples per second over STEPS steps after 3 warm-up steps.

use std::time::Instant;

use allcores_trainer::burn;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;

#[derive(Module, Debug)]
struct Mlp {
    l1: Linear,
    l2: Linear,
    l3: Linear,
    relu: Relu,
}

impl Mlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = self.relu.forward(self.l1.forward(x));
        let x = self.relu.forward(self.l2.forward(x));
        self.l3.forward(x)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.into());
    let backend = arg(1, "ndarray");
    let threads: usize = arg(2, "1").parse().expect("THREADS is a number");
    let batch: usize = arg(3, "64").parse().expect("BATCH is a number");
    let steps: usize = arg(4, "300").parse().expect("STEPS is a number");
    // SAFETY: set before any thread or tensor exists.
    unsafe { std::env::set_var("MATMUL_NUM_THREADS", threads.to_string()) };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a pool");
    pool.install(|| {
        #[allow(deprecated)]
        let device = match backend.as_str() {
            "flex" => Device::flex(),
            _ => Device::ndarray(),
        }
        .autodiff();
        device.seed(0);
        let mut model = Mlp {
            l1: LinearConfig::new(784, 512).init(&device),
            l2: LinearConfig::new(512, 512).init(&device),
            l3: LinearConfig::new(512, 10).init(&device),
            relu: Relu::new(),
        };
        let mut optimizer = AdamConfig::new().with_epsilon(1e-8).init();
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let x = Tensor::<2>::random([batch, 784], Distribution::Uniform(0.0, 1.0), &device);
        let labels: Vec<i64> = (0..batch as i64).map(|i| (i * 7) % 10).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), &device);
        let mut started = Instant::now();
        for step in 0..steps + 3 {
            if step == 3 {
                started = Instant::now();
            }
            let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
            let _value: f32 = loss.clone().into_scalar();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(1e-3, model, grads);
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "raw burn loop: backend={backend} threads={threads} batch={batch} steps={steps} \
             samples_per_second={:.0}",
            (steps * batch) as f64 / seconds
        );
    });
}
