//! Adam and AdamW as one parallel pass over each parameter ([`super::fused`]).
//!
//! burn's Adam and AdamW update a parameter with about ten tensor operations, each a pass over
//! memory on one thread: a fifth of an MLP step at one thread, and the part of it that more
//! threads did not speed up. This is the same arithmetic, element by element in the same order
//! (so the same bits, but for subnormal numbers: see [`super::fused`]), with or without weight
//! decay. Its state is burn's own [`AdamState`], recorded under burn's names (AdamW's state
//! records under the same ones), so checkpoints keep their format.
#![allow(deprecated)] // burn-ndarray is deprecated upstream but still a backend here

use burn::backend::Dispatch;
use burn::optim::{
    AdamState, AdaptiveMomentumState, LearningRate, Optimizer, RecordState, StateSink, StateSource,
    join_path,
};
use burn::prelude::*;
use burn::store::burn_pack::Scalar;

use super::fused::{ElementUpdate, FusedBackend, SharedReading, read};
use crate::kernels::convert::RoundsInF32;
use crate::precision::GradientReading;

/// Adam or AdamW (no AMSGrad) with PyTorch's and burn's defaults for the betas.
#[derive(Debug, Clone)]
pub struct FusedAdam {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub variant: AdamVariant,
    /// How each gradient is read: as it is unless set.
    pub reading: SharedReading,
}

/// Which of burn's two Adams the update computes, with its weight decay: their arithmetic
/// differs in more than the decay (where each applies the bias corrections), so each is
/// followed as burn writes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdamVariant {
    /// burn's `Adam`; with a penalty (L2 weight decay), `weight * penalty` is added to each
    /// gradient before the moments take it.
    Adam { penalty: Option<f32> },
    /// burn's `AdamW`: the weight is multiplied by `1 - lr * decay` (decoupled weight decay)
    /// before the step is taken off it.
    AdamW { decay: f32 },
}

/// The per-step constants of the update, computed as burn computes them.
#[derive(Debug, Clone, Copy)]
pub struct AdamCoefficients {
    beta_1: f32,
    beta_2: f32,
    /// `1 - beta_1`, `1 - beta_2`.
    keep_1: f32,
    keep_2: f32,
    lr: f32,
    variant: VariantCoefficients,
    /// [`SharedReading`].
    reading: GradientReading,
}

/// The constants of each variant's step.
#[derive(Debug, Clone, Copy)]
enum VariantCoefficients {
    Adam {
        /// `sqrt(1 - beta_2^t) / (1 - beta_1^t)`.
        combined: f32,
        /// `epsilon * sqrt(1 - beta_2^t)`.
        epsilon: f32,
        penalty: Option<f32>,
    },
    AdamW {
        /// `1 - beta_1^t`, `1 - beta_2^t`.
        correction_1: f32,
        correction_2: f32,
        epsilon: f32,
        /// `1 - lr * decay`, rounded to f32 as burn's `mul_scalar` rounds it; 1 (which changes
        /// no weight) without decay.
        keep: f32,
    },
}

impl FusedAdam {
    /// `matrix`: whether the parameter is a matrix (or larger). AdamW decays matrices only, as
    /// nanoGPT and the GPT-2 recipe do: never a bias or a LayerNorm gain.
    fn coefficients(&self, time: usize, lr: LearningRate, matrix: bool) -> AdamCoefficients {
        let time = time as i32;
        let (bias_1, bias_2) = (1.0 - self.beta_1.powi(time), 1.0 - self.beta_2.powi(time));
        let variant = match self.variant {
            AdamVariant::Adam { penalty } => VariantCoefficients::Adam {
                combined: bias_2.sqrt() / bias_1,
                epsilon: self.epsilon * bias_2.sqrt(),
                penalty,
            },
            AdamVariant::AdamW { decay } => {
                let decay_rate = if matrix { lr * decay as f64 } else { 0.0 };
                VariantCoefficients::AdamW {
                    correction_1: bias_1,
                    correction_2: bias_2,
                    epsilon: self.epsilon,
                    keep: if decay_rate == 0.0 {
                        1.0
                    } else {
                        (1.0 - decay_rate) as f32
                    },
                }
            }
        };
        AdamCoefficients {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            keep_1: 1.0 - self.beta_1,
            keep_2: 1.0 - self.beta_2,
            lr: lr as f32,
            variant,
            reading: self.reading.get(),
        }
    }
}

/// The fused Adam's state: burn's [`AdamState`], recorded as burn's derive records it (same
/// names and values) but from a copy of each moment that no other handle shares. burn-ndarray
/// turns a shared tensor into data one element at a time over dynamic-rank indices (ndarray's
/// slow `IxDyn` iteration), and the optimizer's own state is always shared while a checkpoint
/// reads it: that was a large part of the time of a checkpoint. An unshared copy hands its
/// buffer over whole.
#[derive(Clone)]
pub struct FusedAdamState<const D: usize>(AdamState<D>);

impl<const D: usize> RecordState for FusedAdamState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        let momentum = &self.0.momentum;
        let path = join_path(prefix, "momentum");
        out.push_scalar(&path, "time", Scalar::from(momentum.time));
        for (leaf, moment) in [
            ("moment_1", &momentum.moment_1),
            ("moment_2", &momentum.moment_2),
        ] {
            let copy = <Dispatch as FusedBackend>::unshared_copy(moment.clone().into_dispatch());
            out.push_tensor(&path, leaf, Tensor::<D>::from_dispatch(copy).into_data());
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        AdamState::state_unflatten(prefix, src, device).map(Self)
    }
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = FusedAdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (time, moment_1, moment_2) = match state {
            Some(FusedAdamState(state)) => (
                state.momentum.time + 1,
                state.momentum.moment_1,
                state.momentum.moment_2,
            ),
            // Zero moments give burn's first step exactly: 0 * beta + x = x. f32 like the
            // parameter, whatever the gradient's format.
            None => (1, tensor.zeros_like(), tensor.zeros_like()),
        };
        let c = self.coefficients(time, lr, D >= 2);
        let (tensor, moment_1, moment_2) = <Dispatch as FusedBackend>::adam_update(
            tensor.into_dispatch(),
            grad.into_dispatch(),
            moment_1.into_dispatch(),
            moment_2.into_dispatch(),
            c,
        );
        let momentum = AdaptiveMomentumState::new(
            time,
            Tensor::from_dispatch(moment_1),
            Tensor::from_dispatch(moment_2),
        );
        (
            Tensor::from_dispatch(tensor),
            Some(FusedAdamState(AdamState::new(momentum))),
        )
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.0.momentum = state.0.momentum.to_device(device);
        state
    }
}

impl ElementUpdate<3> for AdamCoefficients {
    fn reading(&self) -> GradientReading {
        self.reading
    }

    /// One chunk's update of `[parameter, first moment, second moment]`, in place, element by
    /// element and operation by operation as burn's Adam or AdamW does it. Every slice is cut
    /// to one length first, so that the loops carry no bounds checks and vectorise.
    #[inline(always)]
    fn update_chunk<R: RoundsInF32>(&self, [p, m1, m2]: [&mut [f32]; 3], g: &[f32]) {
        let (c, n) = (self, p.len());
        let (m1, m2, g) = (&mut m1[..n], &mut m2[..n], &g[..n]);
        let reading = &c.reading;
        match c.variant {
            VariantCoefficients::Adam {
                combined,
                epsilon,
                penalty,
            } => match penalty {
                // Two loops, so that the plain one carries no test: `weight * 0 + g` would not
                // always be `g` (the sign of a zero, an infinite weight).
                None => {
                    for i in 0..n {
                        let g = read::<R>(g[i], reading);
                        adam([&mut p[i], &mut m1[i], &mut m2[i]], g, combined, epsilon, c);
                    }
                }
                Some(penalty) => {
                    for i in 0..n {
                        let g = p[i] * penalty + read::<R>(g[i], reading);
                        adam([&mut p[i], &mut m1[i], &mut m2[i]], g, combined, epsilon, c);
                    }
                }
            },
            VariantCoefficients::AdamW {
                correction_1,
                correction_2,
                epsilon,
                keep,
            } => {
                for i in 0..n {
                    let (new_m1, new_m2) = moments(m1[i], m2[i], read::<R>(g[i], reading), c);
                    let step = (new_m1 / correction_1) / ((new_m2 / correction_2).sqrt() + epsilon);
                    p[i] = p[i] * keep - step * c.lr;
                    (m1[i], m2[i]) = (new_m1, new_m2);
                }
            }
        }
    }
}

/// One element's step of burn's Adam.
#[inline(always)]
fn adam([p, m1, m2]: [&mut f32; 3], g: f32, combined: f32, epsilon: f32, c: &AdamCoefficients) {
    let (new_m1, new_m2) = moments(*m1, *m2, g, c);
    let step = (new_m1 * combined) / (new_m2.sqrt() + epsilon);
    *p -= step * c.lr;
    (*m1, *m2) = (new_m1, new_m2);
}

/// Both variants' moments, as burn's `AdaptiveMomentum` updates them.
#[inline(always)]
fn moments(m1: f32, m2: f32, g: f32, c: &AdamCoefficients) -> (f32, f32) {
    (
        m1 * c.beta_1 + g * c.keep_1,
        m2 * c.beta_2 + (g * g) * c.keep_2,
    )
}

#[cfg(test)]
mod tests {
    use burn::optim::{AdamConfig, ModuleOptimizer};

    use super::*;
    use crate::optim::fused::testing::{distinct_and_trained, train};
    use crate::optim::fused::{dispatch, flushed};
    use crate::precision::HalfFormat;

    /// Each variant against burn's own optimizer: Adam without and with an L2 penalty, AdamW
    /// without and with a decoupled decay.
    #[test]
    #[allow(deprecated)]
    fn the_same_bits_as_burns_adam_and_adamw_at_any_thread_count() {
        use burn::optim::AdamWConfig;
        use burn::optim::decay::WeightDecayConfig;
        let burns = |variant| match variant {
            AdamVariant::Adam { penalty } => AdamConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(penalty.map(WeightDecayConfig::new))
                .init(),
            AdamVariant::AdamW { decay } => AdamWConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(decay)
                .init(),
        };
        let variants = [
            AdamVariant::Adam { penalty: None },
            AdamVariant::Adam {
                penalty: Some(0.05),
            },
            // With a decay, burn's AdamW also decays biases, which ours leaves alone (the next
            // test): the bits are compared without one.
            AdamVariant::AdamW { decay: 0.0 },
        ];
        for device in [Device::ndarray().autodiff(), Device::flex().autodiff()] {
            let mut outcomes = Vec::new();
            for variant in variants {
                let fused = || {
                    ModuleOptimizer::from(FusedAdam {
                        beta_1: 0.9,
                        beta_2: 0.999,
                        epsilon: 1e-8,
                        variant,
                        reading: SharedReading::default(),
                    })
                };
                let reference = train(burns(variant), &device, 1);
                assert_eq!(train(fused(), &device, 1), reference, "{variant:?}");
                assert_eq!(train(fused(), &device, 2), reference, "{variant:?}");
                outcomes.push(reference);
            }
            distinct_and_trained(outcomes, &device);
        }
    }

    /// AdamW's decoupled decay shrinks matrices by `1 - lr * decay` and leaves vectors (biases,
    /// LayerNorm gains) alone.
    #[test]
    fn adamw_decays_matrices_only() {
        let adam = FusedAdam {
            beta_1: 0.9,
            beta_2: 0.99,
            epsilon: 1e-8,
            variant: AdamVariant::AdamW { decay: 0.5 },
            reading: SharedReading::default(),
        };
        let keep = |matrix| match adam.coefficients(1, 0.1, matrix).variant {
            VariantCoefficients::AdamW { keep, .. } => keep,
            other => panic!("{other:?}"),
        };
        assert_eq!(keep(true), (1.0 - 0.1 * 0.5f64) as f32);
        assert_eq!(keep(false), 1.0);
    }

    /// The fused state records what burn's derive records for the same [`AdamState`] (and
    /// AdamW's): the same names, scalars and tensor data; and it reads back what it wrote.
    #[test]
    #[allow(deprecated)]
    fn the_state_records_as_burns_adam_and_adamw_states() {
        for device in [Device::ndarray().autodiff(), Device::flex().autodiff()] {
            // Fixed values, not the device's generator, which other tests seed and draw from.
            let moment = |seed| {
                let values = crate::kernels::test_values(70 * 30, seed);
                Tensor::<2>::from_data(TensorData::new(values, [70, 30]), &device)
            };
            let state = AdamState::new(AdaptiveMomentumState::new(7, moment(1), moment(2)));
            let (mut ours, mut burns) = (StateSink::default(), StateSink::default());
            FusedAdamState(state.clone()).state_flatten("3", &mut ours);
            state.state_flatten("3", &mut burns);
            assert_eq!(
                format!("{:?}", ours.scalars),
                format!("{:?}", burns.scalars)
            );
            assert_eq!(ours.tensors, burns.tensors);
            // burn's AdamW records its state under the same names.
            let mut adamw = StateSink::default();
            burn::optim::AdamWState::new(state.momentum.clone()).state_flatten("3", &mut adamw);
            assert_eq!(
                format!("{:?}", ours.scalars),
                format!("{:?}", adamw.scalars)
            );
            assert_eq!(ours.tensors, adamw.tensors);
            assert_eq!(ours.tensors.len(), 2);

            let mut source = StateSource::new(ours.scalars.into_iter().collect());
            for (name, data) in ours.tensors {
                source.insert_tensor(name, data);
            }
            let back = FusedAdamState::<2>::state_unflatten("3", &mut source, &device).unwrap();
            assert_eq!(back.0.momentum.time, 7);
            assert_eq!(
                back.0.momentum.moment_2.into_data(),
                state.momentum.moment_2.into_data()
            );
        }
    }

    /// Where a gradient stops, its moments decay into the subnormal range: there the flushed
    /// update stores 0 where IEEE arithmetic keeps a subnormal moment, and every parameter ends
    /// with the same bits either way.
    #[test]
    fn a_stopped_gradient_leaves_zero_moments_and_the_same_parameters() {
        for variant in [
            AdamVariant::Adam { penalty: None },
            AdamVariant::AdamW { decay: 0.01 },
        ] {
            let adam = FusedAdam {
                variant,
                ..adam(None, 1.0)
            };
            stopped_gradient(&adam);
        }
    }

    fn stopped_gradient(adam: &FusedAdam) {
        use crate::kernels::test_values;
        let n = 4096;
        let start = test_values(n, 3);
        let [mut flushed_run, mut ieee] =
            [0, 1].map(|_| [start.clone(), vec![0.0; n], vec![0.0; n]]);
        let mut subnormal_moments = 0;
        for time in 1..=1500 {
            // Every element's gradient for five steps; then only every other one's, and small
            // enough (some of them subnormal) for its square to be.
            let g: Vec<f32> = test_values(n, time as u32)
                .iter()
                .enumerate()
                .map(|(i, &v)| match (time <= 5, i % 2) {
                    (true, _) => v,
                    (false, 0) => v * 1e-36,
                    (false, _) => 0.0,
                })
                .collect();
            let c = adam.coefficients(time, 1e-3, true);
            let [p, m1, m2] = &mut flushed_run;
            flushed(&c, [p, m1, m2], &g);
            let [p, m1, m2] = &mut ieee;
            dispatch(&c, [p, m1, m2], &g);
            let is_subnormal = |v: &f32| v.is_subnormal();
            subnormal_moments += ieee[1]
                .iter()
                .chain(&ieee[2])
                .filter(|v| is_subnormal(v))
                .count();
            assert!(
                !flushed_run[1]
                    .iter()
                    .chain(&flushed_run[2])
                    .any(is_subnormal),
                "{:?}, step {time}",
                adam.variant
            );
        }
        // The case arose, and the moments differ where it did.
        assert!(subnormal_moments > n, "{subnormal_moments}");
        assert_ne!(flushed_run[1], ieee[1]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&flushed_run[0]), bits(&ieee[0]), "{:?}", adam.variant);
        assert_ne!(bits(&flushed_run[0]), bits(&start));
    }

    fn adam(round_to: Option<HalfFormat>, factor: f32) -> FusedAdam {
        let reading = SharedReading::default();
        reading.set(GradientReading { round_to, factor });
        FusedAdam {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            variant: AdamVariant::Adam { penalty: None },
            reading,
        }
    }

    /// An f32 gradient read rounded to a half format (and unscaled) updates the parameter and
    /// the moments to the same bits as the gradient rounded (and divided) beforehand, as the
    /// trainer rounded emulated gradients before.
    #[test]
    fn an_emulated_gradient_is_rounded_as_it_is_read() {
        use crate::kernels::test_values;
        use crate::precision::round_to_half;
        // Several rayon chunks, and a tail; values of its own (the device's generator is shared
        // with the tests running beside this one).
        let shape = [300, 201];
        let device = Device::ndarray();
        let tensor = |seed: u32| {
            let values = test_values(shape[0] * shape[1], seed);
            Tensor::<1>::from_floats(values.as_slice(), &device).reshape(shape)
        };
        for format in [HalfFormat::F16, HalfFormat::Bf16] {
            let param = tensor(9);
            let (mut fused, mut fused_state) = (param.clone(), None);
            let (mut reference, mut reference_state) = (param, None);
            for step in 1..=3 {
                let g = tensor(step).mul_scalar(512.0 * step as f32);
                let rounded = round_to_half(g.clone(), format).mul_scalar(1.0 / 512.0);
                (fused, fused_state) =
                    adam(Some(format), 1.0 / 512.0).step(1e-2, fused, g, fused_state);
                (reference, reference_state) =
                    adam(None, 1.0).step(1e-2, reference, rounded, reference_state);
            }
            let bits = |t: &Tensor<2>| t.to_data().to_vec::<f32>().unwrap();
            assert_eq!(bits(&fused), bits(&reference), "{format:?}");
            let (fused_state, reference_state) = (fused_state.unwrap(), reference_state.unwrap());
            assert_eq!(
                bits(&fused_state.0.momentum.moment_1),
                bits(&reference_state.0.momentum.moment_1),
                "{format:?}"
            );
        }
    }

    /// A half-precision gradient of a scaled loss, read with the factor `1 / scale`, updates
    /// the parameter and the moments to the same bits as its f32 value divided beforehand.
    #[test]
    fn a_scaled_half_gradient_is_unscaled_as_it_is_read() {
        use crate::test_data::{normal, uniform};
        use burn::tensor::DType;
        let device = Device::flex();
        let adam = |factor: f32| adam(None, factor);
        // Several rayon chunks, and a tail.
        let param = uniform([300, 201], 1, &device);
        let scaled = |step: f32| {
            let g = normal([300, 201], 1.0, step as u64, &device);
            crate::precision::convert(g.mul_scalar(1024.0 * step), DType::F16)
        };
        let (mut fused, mut fused_state) = (param.clone(), None);
        let (mut reference, mut reference_state) = (param, None);
        for step in 1..=3 {
            let half = scaled(step as f32);
            let unscaled =
                crate::precision::convert(half.clone(), DType::F32).mul_scalar(1.0 / 1024.0);
            (fused, fused_state) = adam(1.0 / 1024.0).step(1e-2, fused, half, fused_state);
            (reference, reference_state) =
                adam(1.0).step(1e-2, reference, unscaled, reference_state);
        }
        let bits = |t: &Tensor<2>| t.to_data().to_vec::<f32>().unwrap();
        assert_eq!(fused.dtype(), DType::F32);
        assert_eq!(bits(&fused), bits(&reference));
        let (fused_state, reference_state) = (fused_state.unwrap(), reference_state.unwrap());
        assert_eq!(
            bits(&fused_state.0.momentum.moment_2),
            bits(&reference_state.0.momentum.moment_2)
        );
    }
}
