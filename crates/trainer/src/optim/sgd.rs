//! SGD, with or without heavy-ball momentum and an L2 penalty, as one parallel pass over each
//! parameter ([`super::fused`]).
//!
//! burn's SGD takes two to six tensor operations a parameter (the penalty, the velocity, the
//! step), each a pass over memory on one thread. This is its arithmetic element by element in
//! the same order (so the same bits, but for subnormal numbers: see [`super::fused`]), for the
//! SGD that allcores configures: momentum without dampening, no Nesterov. Its state records
//! under the names of burn's `SgdState`, so checkpoints keep their format.

use burn::backend::Dispatch;
use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource, join_path};
use burn::prelude::*;

use super::fused::{ElementUpdate, FusedBackend, SharedReading, read};
use crate::kernels::convert::RoundsInF32;
use crate::precision::GradientReading;

/// burn's `Sgd` with `MomentumConfig { momentum, dampening: 0, nesterov: false }` when
/// `momentum` is set, and `WeightDecayConfig { penalty }` when `penalty` is.
#[derive(Debug, Clone)]
pub struct FusedSgd {
    pub momentum: Option<f32>,
    /// L2 weight decay: `weight * penalty` is added to each gradient first.
    pub penalty: Option<f32>,
    /// How each gradient is read: as it is unless set.
    pub reading: SharedReading,
}

/// The per-step constants of the update, as burn computes them.
#[derive(Debug, Clone, Copy)]
pub struct SgdCoefficients {
    lr: f32,
    penalty: Option<f32>,
    /// The momentum, unless this is the velocity's first step (which burn starts at the
    /// gradient itself) or there is none.
    momentum: Option<f32>,
    /// [`SharedReading`].
    reading: GradientReading,
}

/// The fused SGD's state: the velocity, where there is momentum. burn records its `SgdState`
/// as `momentum.velocity`; so does this, from a copy that no other handle shares (as
/// [`super::adam::FusedAdamState`] does, for the same reason: a shared tensor turns into data
/// one element at a time on burn-ndarray).
#[derive(Clone)]
pub struct FusedSgdState<const D: usize> {
    velocity: Option<Tensor<D>>,
}

const MOMENTUM: &str = "momentum";
const VELOCITY: &str = "velocity";

impl<const D: usize> RecordState for FusedSgdState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        if let Some(velocity) = &self.velocity {
            let copy = <Dispatch as FusedBackend>::unshared_copy(velocity.clone().into_dispatch());
            let data = Tensor::<D>::from_dispatch(copy).into_data();
            out.push_tensor(&join_path(prefix, MOMENTUM), VELOCITY, data);
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let velocity = src
            .take_tensor(&join_path(prefix, MOMENTUM), VELOCITY)
            .map(|data| Tensor::from_data(data, device));
        Some(Self { velocity })
    }
}

impl Optimizer for FusedSgd {
    type State<const D: usize> = FusedSgdState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let mut c = SgdCoefficients {
            lr: lr as f32,
            penalty: self.penalty,
            momentum: self.momentum,
            reading: self.reading.get(),
        };
        let velocity = match (self.momentum, state.and_then(|state| state.velocity)) {
            (None, _) => None,
            (Some(_), Some(velocity)) => Some(velocity),
            // The first step's velocity is the gradient itself: zeros stand in for the one
            // before, never read.
            (Some(_), None) => {
                c.momentum = None;
                Some(tensor.zeros_like())
            }
        };
        let (param, grad) = (tensor.into_dispatch(), grad.into_dispatch());
        let (param, velocity) = match velocity {
            None => (<Dispatch as FusedBackend>::sgd_update(param, grad, c), None),
            Some(velocity) => {
                let (p, v) = <Dispatch as FusedBackend>::sgd_momentum_update(
                    param,
                    grad,
                    velocity.into_dispatch(),
                    c,
                );
                (p, Some(Tensor::from_dispatch(v)))
            }
        };
        (
            Tensor::from_dispatch(param),
            Some(FusedSgdState { velocity }),
        )
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.velocity = state.velocity.map(|v| v.to_device(device));
        state
    }
}

/// burn's transformed gradient: `weight * penalty + g`, or `g` without a penalty (`weight * 0 +
/// g` would not always be `g`: the sign of a zero, an infinite weight).
#[inline(always)]
fn penalised(p: f32, g: f32, penalty: Option<f32>) -> f32 {
    match penalty {
        Some(penalty) => p * penalty + g,
        None => g,
    }
}

/// Plain SGD: `[parameter]`.
impl ElementUpdate<1> for SgdCoefficients {
    fn reading(&self) -> GradientReading {
        self.reading
    }

    #[inline(always)]
    fn update_chunk<R: RoundsInF32>(&self, [p]: [&mut [f32]; 1], g: &[f32]) {
        let (c, n) = (self, p.len());
        let g = &g[..n];
        for i in 0..n {
            let g = penalised(p[i], read::<R>(g[i], &c.reading), c.penalty);
            p[i] -= g * c.lr;
        }
    }
}

/// SGD with momentum: `[parameter, velocity]`. burn's velocity is `g * (1 - dampening) + v *
/// momentum`, with a dampening of 0 here: `g * 1` is `g`.
impl ElementUpdate<2> for SgdCoefficients {
    fn reading(&self) -> GradientReading {
        self.reading
    }

    #[inline(always)]
    fn update_chunk<R: RoundsInF32>(&self, [p, v]: [&mut [f32]; 2], g: &[f32]) {
        let (c, n) = (self, p.len());
        let (v, g) = (&mut v[..n], &g[..n]);
        match c.momentum {
            None => {
                for i in 0..n {
                    v[i] = penalised(p[i], read::<R>(g[i], &c.reading), c.penalty);
                    p[i] -= v[i] * c.lr;
                }
            }
            Some(momentum) => {
                for i in 0..n {
                    let g = penalised(p[i], read::<R>(g[i], &c.reading), c.penalty);
                    v[i] = g + v[i] * momentum;
                    p[i] -= v[i] * c.lr;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::optim::decay::WeightDecayConfig;
    use burn::optim::momentum::MomentumConfig;
    use burn::optim::{ModuleOptimizer, SgdConfig};

    use super::*;
    use crate::optim::fused::testing::{distinct_and_trained, train};
    use crate::optim::fused::{dispatch, flushed};

    const SETTINGS: [(Option<f32>, Option<f32>); 4] = [
        (None, None),
        (None, Some(0.05)),
        (Some(0.9), None),
        (Some(0.9), Some(0.05)),
    ];

    fn fused(momentum: Option<f32>, penalty: Option<f32>) -> FusedSgd {
        FusedSgd {
            momentum,
            penalty,
            reading: SharedReading::default(),
        }
    }

    fn burns(momentum: Option<f32>, penalty: Option<f32>) -> ModuleOptimizer {
        SgdConfig::new()
            .with_momentum(momentum.map(|m| {
                MomentumConfig::new()
                    .with_momentum(m as f64)
                    .with_dampening(0.0)
            }))
            .with_weight_decay(penalty.map(WeightDecayConfig::new))
            .init()
    }

    /// Plain SGD, with an L2 penalty, with momentum and with both, against burn's own.
    #[test]
    #[allow(deprecated)]
    fn the_same_bits_as_burns_sgd_at_any_thread_count() {
        for device in [Device::ndarray().autodiff(), Device::flex().autodiff()] {
            let mut outcomes = Vec::new();
            for (momentum, penalty) in SETTINGS {
                let ours = || ModuleOptimizer::from(fused(momentum, penalty));
                let reference = train(burns(momentum, penalty), &device, 1);
                assert_eq!(
                    train(ours(), &device, 1),
                    reference,
                    "{momentum:?} {penalty:?}"
                );
                assert_eq!(
                    train(ours(), &device, 2),
                    reference,
                    "{momentum:?} {penalty:?}"
                );
                outcomes.push(reference);
            }
            distinct_and_trained(outcomes, &device);
        }
    }

    /// The velocity records under burn's name for it, and reads back; plain SGD records
    /// nothing, as burn's does.
    #[test]
    #[allow(deprecated)]
    fn the_state_records_as_burns_sgd_state() {
        use burn::optim::SgdState;
        use burn::optim::momentum::MomentumState;
        let device = Device::ndarray().autodiff();
        let values = crate::kernels::test_values(70 * 30, 4);
        let velocity = Tensor::<2>::from_data(TensorData::new(values, [70, 30]), &device);
        let (mut ours, mut burns) = (StateSink::default(), StateSink::default());
        let state = FusedSgdState {
            velocity: Some(velocity.clone()),
        };
        state.state_flatten("5", &mut ours);
        SgdState::new(Some(MomentumState::new(velocity.clone()))).state_flatten("5", &mut burns);
        assert_eq!(ours.tensors, burns.tensors);
        assert_eq!(ours.tensors.len(), 1);
        assert!(ours.scalars.is_empty() && burns.scalars.is_empty());

        let mut source = StateSource::default();
        for (name, data) in ours.tensors {
            source.insert_tensor(name, data);
        }
        let back = FusedSgdState::<2>::state_unflatten("5", &mut source, &device).unwrap();
        assert_eq!(back.velocity.unwrap().into_data(), velocity.into_data());

        let (mut plain, mut burns_plain) = (StateSink::default(), StateSink::default());
        FusedSgdState::<2> { velocity: None }.state_flatten("5", &mut plain);
        SgdState::<2>::new(None).state_flatten("5", &mut burns_plain);
        assert!(plain.tensors.is_empty() && burns_plain.tensors.is_empty());
    }

    /// Where a gradient stops, the velocity decays into the subnormal range: there the flushed
    /// update stores 0 where IEEE arithmetic keeps a subnormal velocity, and every parameter
    /// ends with the same bits either way.
    #[test]
    fn a_stopped_gradient_leaves_a_zero_velocity_and_the_same_parameters() {
        use crate::kernels::test_values;
        let n = 4096;
        let start = test_values(n, 3);
        let [mut flushed_run, mut ieee] = [0, 1].map(|_| [start.clone(), vec![0.0; n]]);
        let mut subnormal_velocities = 0;
        for time in 1..=1500 {
            // Every element's gradient for five steps, then only every other one's.
            let g: Vec<f32> = test_values(n, time)
                .iter()
                .enumerate()
                .map(|(i, &v)| if time <= 5 || i % 2 == 0 { v } else { 0.0 })
                .collect();
            let c = SgdCoefficients {
                lr: 1e-3,
                penalty: None,
                momentum: (time > 1).then_some(0.9),
                reading: GradientReading::AS_THEY_ARE,
            };
            let [p, v] = &mut flushed_run;
            flushed::<2>(&c, [p, v], &g);
            let [p, v] = &mut ieee;
            dispatch::<2>(&c, [p, v], &g);
            subnormal_velocities += ieee[1].iter().filter(|v| v.is_subnormal()).count();
            assert!(
                !flushed_run[1].iter().any(|v| v.is_subnormal()),
                "step {time}"
            );
        }
        assert!(subnormal_velocities > n / 2, "{subnormal_velocities}");
        assert_ne!(flushed_run[1], ieee[1]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&flushed_run[0]), bits(&ieee[0]));
        assert_ne!(bits(&flushed_run[0]), bits(&start));
    }
}
