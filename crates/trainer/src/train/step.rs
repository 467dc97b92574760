//! One optimizer step, in the order it runs: the step's pieces (micro-batches x shards) forward
//! and backward, their gradients summed in the pieces' order, the overflow check under a loss
//! scale, clipping by the global norm, then the optimizer's update.

use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::module::{ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use rayon::prelude::*;

use super::plan::StepPlan;
use super::task::Task;
use crate::optim::Optimizer;
use crate::polling::Poller;
use crate::precision::{self, Compute, GradientReading, LossScaler, ScalerState};

/// The summed gradients of a step, ready for the optimizer.
pub(super) struct StepGradients {
    grads: GradientsParams,
    /// Whether they are all finite (checked only with loss scaling: `true` without).
    finite: bool,
    /// The step's loss (mean over its loss units: samples, or target tokens).
    pub loss: f32,
    /// What the optimizer is still to do to them as it reads them.
    reading: GradientReading,
}

/// What the forward and backward passes of a step need.
pub(super) struct Pass<'a, T> {
    pub task: &'a T,
    pub plan: &'a StepPlan,
    pub device: &'a Device,
    pub compute: Compute,
    /// With loss scaling, the scale the loss is multiplied by before backward.
    pub loss_scale: Option<f32>,
    /// Run the step's pieces at once, one per thread, rather than one after the other.
    pub concurrent: bool,
    /// Keeps the pool's other threads polling for work through the step.
    pub poller: Poller,
    /// Optimizer steps taken before this one.
    pub step: u64,
}

impl<T: Task> Pass<'_, T> {
    /// Forward and backward over the pieces of one step (micro-batches x shards), on the step's
    /// working copy of `model` (half precision or the f32 master itself): the summed gradients,
    /// checked for overflow under a loss scale, and left to the optimizer to unscale (and,
    /// emulated, round) as it reads them: every optimizer is a fused update
    /// ([`GradientReading`]).
    ///
    /// Each piece's loss is its samples' summed loss over the whole step's loss units (samples,
    /// or target tokens), so the summed gradient is exactly that of the step's mean loss, the
    /// large batch's, however the step is cut. Concurrent or not, every piece computes the same
    /// gradients and they are summed in the pieces' order: the result does not depend on how the
    /// threads were spent.
    pub fn accumulate_gradients(&self, model: &T::Model, group: &[usize]) -> StepGradients {
        self.poller.arm();
        let working = self.compute.working_copy(model);
        let pieces = self.plan.pieces(group);
        let divisor = self.task.loss_units(group).max(1) as f32;
        if let [piece] = &pieces[..] {
            // One piece: its gradients are the step's, made ready for the optimizer in one pass.
            let (grads, loss) = self.piece_gradients(&working, piece, divisor);
            let (grads, finite, reading) =
                self.compute
                    .gradients_for_optimizer(grads, model, self.loss_scale);
            return StepGradients {
                grads,
                finite,
                loss,
                reading,
            };
        }
        let mut grads = GradientsAccumulator::new();
        let mut loss_sum = 0.0f32;
        let mut add = |(piece_grads, loss): (GradientsParams, f32)| {
            // Each piece's gradients rounded as its own would be, and in f32 to be summed.
            grads.accumulate(
                model,
                self.compute.piece_gradients_in_f32(piece_grads, model),
            );
            loss_sum += loss;
        };
        if self.concurrent && pieces.len() > 1 {
            // As many pieces at once as there are threads, then their gradients summed (in
            // order) before the next ones start: a step holds a wave's gradients and
            // activations, never all of its pieces', so accumulation keeps its promise of a
            // large batch in the memory of a small one. Each piece runs on a fork: its own
            // autodiff graph (clones would share one graph and its lock, and deadlock inside
            // the pool).
            for wave in pieces.chunks(rayon::current_num_threads().max(1)) {
                let results: Vec<_> = wave
                    .par_iter()
                    .map(|piece| {
                        let fork = working.clone().fork(self.device);
                        self.piece_gradients(&fork, piece, divisor)
                    })
                    .collect();
                results.into_iter().for_each(&mut add);
            }
        } else {
            for piece in pieces {
                add(self.piece_gradients(&working, piece, divisor));
            }
        }
        // Scaling and the overflow check apply to the step's summed gradients.
        let mut grads = grads.grads();
        let (finite, reading) =
            precision::check_for_optimizer(&mut grads, model, self.loss_scale, None);
        StepGradients {
            grads,
            finite,
            loss: loss_sum,
            reading,
        }
    }

    /// The gradients (in the working copy's precision, keyed by the master's parameter ids) and
    /// the loss of one piece: its loss units' summed loss over the step's `divisor`.
    fn piece_gradients(
        &self,
        working: &T::Model,
        piece: &[usize],
        divisor: f32,
    ) -> (GradientsParams, f32) {
        let loss = self.task.piece_loss(
            working,
            &self.compute,
            piece,
            divisor,
            self.step,
            self.device,
        );
        let value = loss.clone().into_scalar::<f32>();
        let loss = match self.loss_scale {
            Some(scale) => loss.mul_scalar(scale),
            None => loss,
        };
        (GradientsParams::from_grads(loss.backward(), working), value)
    }
}

/// What turns a step's gradients into new weights: the optimizer, its learning-rate schedule,
/// clipping by the global norm and, with loss scaling, the scaler that decides whether a step is
/// applied.
pub(super) struct Updater {
    pub optimizer: Optimizer,
    pub scheduler: ModuleLrScheduler,
    pub scaler: Option<LossScaler>,
    /// `optimizer.grad_clip`: the largest global gradient norm a step applies.
    pub clip: Option<f64>,
    /// The learning rate of the last step taken (0 before the first).
    pub lr: f64,
}

impl Updater {
    /// The scale the next step's loss is multiplied by before backward, with loss scaling.
    pub fn loss_scale(&self) -> Option<f32> {
        self.scaler.as_ref().map(LossScaler::scale)
    }

    /// Applies a step's summed gradients to `model`, unless loss scaling found one that is inf
    /// or NaN: the step is then skipped (and counted in `scaler_state`) and the scale shrinks.
    /// The schedule advances on skipped steps too: it is a function of the step.
    pub fn apply<M: Module>(
        &mut self,
        model: M,
        gradients: StepGradients,
        scaler_state: &mut ScalerState,
    ) -> M {
        let apply = match &mut self.scaler {
            Some(scaler) => {
                let apply = scaler.update(gradients.finite);
                *scaler_state = scaler.state;
                apply
            }
            None => true,
        };
        let rate = self.scheduler.step();
        self.lr = rate.base();
        if !apply {
            return model;
        }
        let (mut grads, mut reading) = (gradients.grads, gradients.reading);
        if let Some(clip) = self.clip {
            reading.factor *= clip_factor(&model, &mut grads, reading, clip);
        }
        self.optimizer.reading.set(reading);
        self.optimizer.module.step(rate, model, grads)
    }
}

/// What the gradients are multiplied by so that their global norm (all parameters together, as
/// the optimizer will read them) is at most `clip`: PyTorch's `clip_grad_norm_`, with its
/// `1e-6` guard. The squares are summed in f64, parameter by parameter in the model's order and
/// element by element: a fixed order, whatever the thread count.
fn clip_factor<M: Module>(
    model: &M,
    grads: &mut GradientsParams,
    reading: GradientReading,
    clip: f64,
) -> f32 {
    struct SumOfSquares<'a> {
        grads: &'a mut GradientsParams,
        sum: f64,
    }
    impl ModuleVisitor for SumOfSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // Taken out and put back: a gradient no other handle shares hands its values over
            // without a copy (burn-ndarray copies a shared one element by element).
            let Some(grad) = self.grads.remove::<D>(param.id) else {
                return;
            };
            let device = grad.device();
            let data = grad.into_data();
            let mut add = |values: &[f32]| {
                self.sum += values.iter().map(|&g| g as f64 * g as f64).sum::<f64>();
            };
            match data.as_slice::<f32>() {
                Ok(values) => add(values),
                Err(_) => add(data
                    .clone()
                    .convert::<f32>()
                    .as_slice::<f32>()
                    .unwrap_or(&[])),
            }
            self.grads
                .register::<D>(param.id, Tensor::from_data(data, &device));
        }
    }
    let mut squares = SumOfSquares { grads, sum: 0.0 };
    model.visit(&mut squares);
    let norm = squares.sum.sqrt() * reading.factor as f64;
    (clip / (norm + 1e-6)).min(1.0) as f32
}
