//! Mixed precision: forward and backward in f16 or bf16, over f32 master weights.
//!
//! Each step the trainer makes a half-precision working copy of the master weights
//! ([`Compute::working_copy`]: the same parameter ids, so its gradients are keyed like the
//! master's), runs forward and backward on it, hands the gradients to the optimizer
//! ([`Compute::gradients_for_optimizer`]: checked under a loss scale) and the optimizer updates
//! the f32 master with its f32 state. The fused optimizers take them as they are, in half
//! precision (or, emulated, in f32 not yet rounded), and divide (and round) them as they read
//! them ([`GradientReading`]). The loss and its softmax run in f32, on
//! logits cast up, as PyTorch's autocast does.
//!
//! - burn-flex has F16 and BF16 tensors: there the working copy, the inputs and every activation
//!   are real half precision ("native").
//! - burn-ndarray has f32 only: there the working copy, the inputs, the activations between
//!   layers ([`round_activations`]) and the gradients are rounded to the half format and computed
//!   in f32 ("emulated"): half precision's rounding and range, f32's speed and memory.

mod round;
mod scaler;

use std::cell::Cell;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use serde::{Deserialize, Serialize};

pub use round::{convert, round_to_half};
pub use scaler::{LossScaler, ScalerState};

use crate::kernels::convert::RoundsInF32;
use crate::model::Classifier;
use crate::settings::{Backend, Precision};

/// A 16-bit floating-point format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfFormat {
    /// IEEE half: 5 exponent bits, 10 fraction bits (largest 65504).
    F16,
    /// bfloat16: f32's 8 exponent bits, 7 fraction bits.
    Bf16,
}

impl HalfFormat {
    fn dtype(self) -> DType {
        match self {
            HalfFormat::F16 => DType::F16,
            HalfFormat::Bf16 => DType::BF16,
        }
    }

    /// The largest finite value ([`RoundsInF32::MAX`]).
    fn max(self) -> f32 {
        match self {
            HalfFormat::F16 => <half::f16 as RoundsInF32>::MAX,
            HalfFormat::Bf16 => <half::bf16 as RoundsInF32>::MAX,
        }
    }

    /// The magnitude from which an f32 rounds to infinity ([`RoundsInF32::OVERFLOW`]).
    fn overflow(self) -> f32 {
        match self {
            HalfFormat::F16 => <half::f16 as RoundsInF32>::OVERFLOW,
            HalfFormat::Bf16 => <half::bf16 as RoundsInF32>::OVERFLOW,
        }
    }
}

/// How the half precision of a run is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionMode {
    /// Tensors of the format itself (and f32 runs).
    Native,
    /// f32 tensors rounded to the format's values.
    Emulated,
}

impl std::fmt::Display for PrecisionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrecisionMode::Native => "native",
            PrecisionMode::Emulated => "emulated",
        })
    }
}

/// What is left to do to each gradient of a step as the optimizer reads it: round it to a half
/// format, then multiply it by a factor (the
/// inverse of the loss scale). Each element in turn, in cache: the gradients of a step go from
/// the backward pass to the update without a pass over memory of their own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradientReading {
    /// Emulated half precision: the format the gradients are rounded to.
    pub round_to: Option<HalfFormat>,
    pub factor: f32,
}

impl GradientReading {
    /// Gradients taken as they are.
    pub const AS_THEY_ARE: Self = Self {
        round_to: None,
        factor: 1.0,
    };
}

/// The precision of a run's forward and backward passes on its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compute {
    /// `None`: f32 throughout.
    half: Option<HalfFormat>,
    mode: PrecisionMode,
}

impl Compute {
    pub fn new(precision: Precision, backend: Backend) -> Self {
        let half = match precision {
            Precision::F32 => None,
            Precision::F16 => Some(HalfFormat::F16),
            Precision::Bf16 => Some(HalfFormat::Bf16),
        };
        let mode = match (half, backend) {
            (Some(_), Backend::Ndarray) => PrecisionMode::Emulated,
            _ => PrecisionMode::Native,
        };
        Self { half, mode }
    }

    pub fn mode(&self) -> PrecisionMode {
        self.mode
    }

    /// The weights the step's forward and backward run on. In f32, the master itself.
    pub fn working_copy<M: Module>(&self, master: &M) -> M {
        match self.half {
            None => master.clone(),
            Some(format) => master.clone().map(&mut WorkingCopy {
                format,
                mode: self.mode,
            }),
        }
    }

    /// The model's logits for `inputs`, in f32, computed in this precision on `working`.
    pub fn forward<M: Classifier>(&self, working: &M, inputs: Tensor<4>) -> Tensor<2> {
        let Some(format) = self.half else {
            return working.forward(inputs);
        };
        match self.mode {
            PrecisionMode::Native => {
                convert(working.forward(convert(inputs, format.dtype())), DType::F32)
            }
            PrecisionMode::Emulated => {
                let _scope = EmulationScope::enter(format);
                round_activations(working.forward(round_to_half(inputs, format)))
            }
        }
    }

    /// Runs `forward`, a forward pass of a working copy whose inputs need no conversion (token
    /// ids), in this precision: emulated half precision rounds where the model calls
    /// [`round_activations`]; native half precision is in the working copy's tensors already.
    pub fn forward_with<R>(&self, forward: impl FnOnce() -> R) -> R {
        match (self.half, self.mode) {
            (Some(format), PrecisionMode::Emulated) => {
                let _scope = EmulationScope::enter(format);
                forward()
            }
            _ => forward(),
        }
    }

    /// The gradients of the working copy as gradients of the master for the optimizer (`master`
    /// names the parameters), whether all of them are finite (checked only with a loss `scale`:
    /// `true` without), and what the optimizer is still to do to them as it reads them: divide
    /// them by the scale and, emulated, round them to the half format first, as the working
    /// copy's own gradients would be. Before it they are only checked, one pass that reads, and
    /// half-precision gradients stay half.
    pub fn gradients_for_optimizer<M: Module>(
        &self,
        mut grads: GradientsParams,
        master: &M,
        scale: Option<f32>,
    ) -> (GradientsParams, bool, GradientReading) {
        let (finite, reading) = check_for_optimizer(&mut grads, master, scale, self.emulated());
        (grads, finite, reading)
    }

    /// The gradients of one piece of a step, in f32 to be summed with the others' (emulated,
    /// rounded to the half format first, as the working copy's own gradients would be). A
    /// step of several pieces is never scaled piece by piece: its sum is, once.
    pub fn piece_gradients_in_f32<M: Module>(
        &self,
        mut grads: GradientsParams,
        master: &M,
    ) -> GradientsParams {
        let emulated = self.emulated();
        master.visit(&mut EachGradient {
            grads: &mut grads,
            map: |g: Tensor<1>| match emulated {
                Some(format) => round_to_half(g, format),
                None => convert(g, DType::F32),
            },
        });
        grads
    }

    /// The half format an emulated run rounds to; `None` for f32 and native half precision.
    fn emulated(&self) -> Option<HalfFormat> {
        match self.mode {
            PrecisionMode::Emulated => self.half,
            PrecisionMode::Native => None,
        }
    }
}

/// Checks a step's gradients for the optimizer, which divides them by the loss `scale` (and
/// rounds them `round_to`) as it reads them: returns whether every one of them is finite once
/// so read (`true` without a scale, when nothing is checked), and that reading.
pub fn check_for_optimizer<M: Module>(
    grads: &mut GradientsParams,
    master: &M,
    scale: Option<f32>,
    round_to: Option<HalfFormat>,
) -> (bool, GradientReading) {
    let factor = scale.map_or(1.0, |scale| 1.0 / scale);
    let mut finite = true;
    if scale.is_some() {
        master.visit(&mut EachGradient {
            grads,
            map: |g: Tensor<1>| {
                finite &= round::all_finite(&g, factor, round_to);
                g
            },
        });
    }
    (finite, GradientReading { round_to, factor })
}

/// Whether every weight of `model` is finite.
pub fn weights_finite<M: Module>(model: &M) -> bool {
    struct Check(bool);
    impl ModuleVisitor for Check {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let flat = param.val().flatten::<1>(0, D - 1);
            self.0 &= round::scale_and_check(flat, 1.0).1;
        }
    }
    let mut check = Check(true);
    model.visit(&mut check);
    check.0
}

/// Rounds activations between layers to the half format of an emulated half-precision run, and
/// leaves them unchanged anywhere else (f32 runs, native half tensors, outside the trainer).
///
/// The built-in models call it after each layer; a model of your own can too, so that burn-ndarray
/// rounds where a half-precision backend would store.
pub fn round_activations<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    match EMULATED.get() {
        Some(format) if x.dtype() == DType::F32 => round_to_half(x, format),
        _ => x,
    }
}

thread_local! {
    /// The half format being emulated by the forward pass running on this thread, like
    /// PyTorch's thread-local autocast state.
    static EMULATED: Cell<Option<HalfFormat>> = const { Cell::new(None) };
}

/// Emulation on for this thread until dropped.
struct EmulationScope(Option<HalfFormat>);

impl EmulationScope {
    fn enter(format: HalfFormat) -> Self {
        Self(EMULATED.replace(Some(format)))
    }
}

impl Drop for EmulationScope {
    fn drop(&mut self) {
        EMULATED.set(self.0);
    }
}

/// Makes the half-precision working copy of master weights: fresh leaves that keep the ids.
struct WorkingCopy {
    format: HalfFormat,
    mode: PrecisionMode,
}

impl ModuleMapper for WorkingCopy {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (format, mode) = (self.format, self.mode);
        param.map(|t| {
            let half = match mode {
                PrecisionMode::Native => convert(t.detach(), format.dtype()),
                PrecisionMode::Emulated => round_to_half(t.detach(), format),
            };
            // The second detach makes the copy a leaf: burn refuses to track a non-leaf.
            half.detach().require_grad()
        })
    }
}

/// Replaces each parameter's gradient by `map` of it.
struct EachGradient<'a, F> {
    grads: &'a mut GradientsParams,
    map: F,
}

impl<F: FnMut(Tensor<1>) -> Tensor<1>> ModuleVisitor for EachGradient<'_, F> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let shape = grad.shape();
            let flat = (self.map)(grad.reshape([shape.num_elements()]));
            self.grads.register::<D>(param.id, flat.reshape(shape));
        }
    }
}
