//! What the fused optimizers share: one backend operation per update rule, each a single
//! parallel pass that updates a parameter and its state in place, element by element.
//!
//! burn's optimizers update a parameter with a handful of tensor operations, each a pass over
//! memory on one thread. An element-wise rule can instead read each element once and write it
//! back once, split over the pool in fixed chunks: the split changes nothing, since no element
//! depends on another. Each rule ([`ElementUpdate`]) is written as burn writes it, operation by
//! operation in the same order, so that it gives burn's bits.
//!
//! One difference from burn's arithmetic: the updates run with subnormal numbers (below f32's
//! smallest normal value, 1.2e-38) flushed to zero ([`flushed`]). A moment or velocity whose
//! gradient has stopped (an input pixel that is almost always 0) decays by a constant factor a
//! step into that range, where every operation on it takes a slow microcode path: an MLP step
//! took twice as long after 700 steps of Adam. Flushed, such a state stops at 0 where burn's
//! would stay subnormal a while; a parameter's own bits differ only where its update is smaller
//! than 1e-30 and the parameter itself smaller than that update's precision. An L2 penalty is
//! the exception: it pulls the weights themselves into the subnormal range, and those then
//! differ from burn's (docs/guide.md, "The optimizer step", has the figures).
#![allow(deprecated)] // burn-ndarray is deprecated upstream but still a backend here

use crate::kernels::ELEMENTS_PER_TASK;
use std::sync::{Arc, Mutex, PoisonError};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, NdArray, TensorMetadata, backend_extension};
use half::{bf16, f16};
use rayon::prelude::*;

use super::adam::AdamCoefficients;
use super::sgd::SgdCoefficients;
use crate::kernels::convert::RoundsInF32;
use crate::kernels::extension::HostSlices;
use crate::precision::{GradientReading, HalfFormat};

/// How a fused optimizer reads the gradients of the next step ([`GradientReading`]), set before
/// each step: multiplied by `1 / loss scale` when it is handed the gradients of a scaled loss,
/// as PyTorch's GradScaler hands its `grad_scale` to a fused optimizer, and rounded to a half
/// format first when it is handed emulated half precision's gradients unrounded. The gradients
/// of a half-precision step then go from the backward pass to the update as they are, read
/// once, instead of being rounded, or widened and divided, in a pass of their own first. A
/// handle: clones share it.
#[derive(Debug, Clone)]
pub struct SharedReading(Arc<Mutex<GradientReading>>);

impl SharedReading {
    pub fn set(&self, reading: GradientReading) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = reading;
    }

    pub fn get(&self) -> GradientReading {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for SharedReading {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(GradientReading::AS_THEY_ARE)))
    }
}

/// One step's rule for the `N` f32 arrays of a parameter (the parameter first, then its state),
/// element by element.
pub(super) trait ElementUpdate<const N: usize>: Sync {
    /// How the rule reads the gradient.
    fn reading(&self) -> GradientReading;

    /// Updates one chunk in place, each gradient read with [`read`] as `R` rounds it. Must be
    /// `#[inline(always)]`, with plain loops over inlined functions only: it is compiled into
    /// [`wide`]'s vector-width functions, and anything left out of line (an iterator's
    /// `for_each`) would be compiled without their vector width (that made Adam 1.28x slower).
    fn update_chunk<R: RoundsInF32>(&self, arrays: [&mut [f32]; N], g: &[f32]);
}

/// A gradient as a rule reads it ([`SharedReading`]): rounded to `R`'s values, then multiplied
/// by the reading's factor (for f32 and by 1, the same bits).
#[inline(always)]
pub(super) fn read<R: RoundsInF32>(g: f32, reading: &GradientReading) -> f32 {
    R::round_in_f32(g) * reading.factor
}

/// The fused updates, one operation per rule.
#[backend_extension(NdArray, Flex, Autodiff)]
pub trait FusedBackend: Backend {
    /// `(parameter, first moment, second moment)` after one Adam step with the constants `c`.
    fn adam_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        c: AdamCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `(parameter, velocity)` after one step of SGD with momentum, with the constants `c`.
    fn sgd_momentum_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: FloatTensor<Self>,
        c: SgdCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The parameter after one step of plain SGD, with the constants `c`.
    fn sgd_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        c: SgdCoefficients,
    ) -> FloatTensor<Self>;

    /// A copy of `tensor` (f32) that shares its storage with nothing.
    fn unshared_copy(tensor: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The arrays `tensors` (a parameter and its state) after one step of `rule`, updated in place:
/// no new buffers, one pass over memory.
fn update_tensors<B: HostSlices, const N: usize>(
    tensors: [FloatTensor<B>; N],
    grad: FloatTensor<B>,
    rule: &impl ElementUpdate<N>,
) -> [FloatTensor<B>; N] {
    let mut tensors = tensors.map(writable::<B>);
    // A half-precision gradient is widened chunk by chunk, in cache, as the update reads it; an
    // emulated one is rounded value by value.
    let g = B::read(&grad);
    let g = g.values();
    let arrays = tensors
        .each_mut()
        .map(|t| B::f32_mut(t).expect("a tensor just made writable"));
    assert!(
        arrays.iter().all(|a| a.len() == g.len()),
        "fused update: sizes differ"
    );
    chunks(arrays)
        .into_par_iter()
        .enumerate()
        .for_each(|(i, arrays)| {
            let mut scratch = Vec::new();
            let g = g.read(
                i * ELEMENTS_PER_TASK..i * ELEMENTS_PER_TASK + arrays[0].len(),
                &mut scratch,
            );
            flushed(rule, arrays, g)
        });
    tensors
}

/// The arrays (of one length: the caller checks) cut into chunks of [`ELEMENTS_PER_TASK`] elements, the `N`
/// chunks of each range together.
fn chunks<const N: usize>(arrays: [&mut [f32]; N]) -> Vec<[&mut [f32]; N]> {
    let len = arrays.first().map_or(0, |a| a.len());
    let mut pieces = arrays.map(|a| a.chunks_mut(ELEMENTS_PER_TASK));
    (0..len.div_ceil(ELEMENTS_PER_TASK))
        .map(|_| std::array::from_fn(|k| pieces[k].next().expect("arrays of one length")))
        .collect()
}

/// [`dispatch`] with subnormal inputs read as 0 and subnormal results flushed to 0 (the CPU's
/// flush-to-zero and denormals-are-zero flags, set for the chunk on the thread that runs it and
/// restored after, so no other computation sees them; the module's doc says why). Which thread
/// runs a chunk changes nothing: the flags are the same on every one.
///
/// No other task can run under the flags: a rayon thread takes another task only inside a
/// rayon call (`join`, `scope`, a parallel iterator), and [`dispatch`] makes none, down to the
/// rules' `update_chunk` loops. Keep it so: a rayon call in there would let a stolen task (a
/// matrix product, a loss) run with subnormals flushed, and round differently on that thread.
#[cfg(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) fn flushed<const N: usize>(
    rule: &impl ElementUpdate<N>,
    arrays: [&mut [f32]; N],
    g: &[f32],
) {
    // SAFETY: the flags change how subnormal numbers round, nothing else, and only inside this
    // call. Rust assumes the default floating-point environment, so the compiler may evaluate
    // an operation at build time as IEEE rounds it, which would give burn's value for that
    // element; every operation here reads its operands from memory at run time.
    unsafe { no_denormals::no_denormals(|| dispatch(rule, arrays, g)) }
}

/// Elsewhere the updates keep IEEE's subnormals (and their slow path).
#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
pub(super) fn flushed<const N: usize>(
    rule: &impl ElementUpdate<N>,
    arrays: [&mut [f32]; N],
    g: &[f32],
) {
    dispatch(rule, arrays, g)
}

/// The rule's chunk update compiled for wider vectors where the CPU has them, the gradient
/// rounded as the reading says. Rust never fuses a multiply and an add, and IEEE
/// multiplication, addition, division and square root round the same at every vector width:
/// the same bits on any of these paths.
pub(super) fn dispatch<const N: usize>(
    rule: &impl ElementUpdate<N>,
    arrays: [&mut [f32]; N],
    g: &[f32],
) {
    match rule.reading().round_to {
        None => wide::<f32, N>(rule, arrays, g),
        Some(HalfFormat::F16) => wide::<f16, N>(rule, arrays, g),
        Some(HalfFormat::Bf16) => wide::<bf16, N>(rule, arrays, g),
    }
}

fn wide<R: RoundsInF32, const N: usize>(
    rule: &impl ElementUpdate<N>,
    arrays: [&mut [f32]; N],
    g: &[f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<R: RoundsInF32, const N: usize>(
            rule: &impl ElementUpdate<N>,
            arrays: [&mut [f32]; N],
            g: &[f32],
        ) {
            rule.update_chunk::<R>(arrays, g)
        }
        #[target_feature(enable = "avx2")]
        fn avx2<R: RoundsInF32, const N: usize>(
            rule: &impl ElementUpdate<N>,
            arrays: [&mut [f32]; N],
            g: &[f32],
        ) {
            rule.update_chunk::<R>(arrays, g)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { avx512::<R, N>(rule, arrays, g) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2::<R, N>(rule, arrays, g) };
        }
    }
    rule.update_chunk::<R>(arrays, g)
}

/// `tensor`, owned by nobody else and writable in place as f32: itself when it already is (the
/// usual case: the step's working copy and graph are gone by the time the optimizer runs), else
/// a copy.
fn writable<B: HostSlices>(mut tensor: FloatTensor<B>) -> FloatTensor<B> {
    if B::f32_mut(&mut tensor).is_some() {
        return tensor;
    }
    copied::<B>(&tensor)
}

/// A copy of `tensor` as f32, in a buffer of its own.
fn copied<B: HostSlices>(tensor: &FloatTensor<B>) -> FloatTensor<B> {
    let shape = tensor.shape().to_vec();
    B::write_f32(B::read_f32(tensor).into_owned(), shape)
}

/// The rules on plain slices, for both host backends.
macro_rules! host_fused_backend {
    ($backend:ty, $tensor:ty) => {
        impl FusedBackend for $backend {
            fn adam_update(
                param: $tensor,
                grad: $tensor,
                moment_1: $tensor,
                moment_2: $tensor,
                c: AdamCoefficients,
            ) -> ($tensor, $tensor, $tensor) {
                let [p, m1, m2] = update_tensors::<Self, 3>([param, moment_1, moment_2], grad, &c);
                (p, m1, m2)
            }

            fn sgd_momentum_update(
                param: $tensor,
                grad: $tensor,
                velocity: $tensor,
                c: SgdCoefficients,
            ) -> ($tensor, $tensor) {
                let [p, v] = update_tensors::<Self, 2>([param, velocity], grad, &c);
                (p, v)
            }

            fn sgd_update(param: $tensor, grad: $tensor, c: SgdCoefficients) -> $tensor {
                let [p] = update_tensors::<Self, 1>([param], grad, &c);
                p
            }

            fn unshared_copy(tensor: $tensor) -> $tensor {
                copied::<Self>(&tensor)
            }
        }
    };
}

host_fused_backend!(NdArray, NdArrayTensor);
host_fused_backend!(Flex, FlexTensor);

/// The optimizers run on tensors without a graph; should one carry a graph, the update is a
/// constant to it.
#[derive(Debug)]
struct Constant;

impl<B: Backend> Backward<B, 1> for Constant {
    type State = ();

    fn backward(self, _: Ops<Self::State, 1>, _: &mut Gradients, _: &mut Checkpointer) {}
}

impl<B: FusedBackend, C: CheckpointStrategy> FusedBackend for Autodiff<B, C> {
    fn adam_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        c: AdamCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (param, param_node) = param.into_parts();
        let (moment_1, moment_1_node) = moment_1.into_parts();
        let (moment_2, moment_2_node) = moment_2.into_parts();
        let (p, m1, m2) = B::adam_update(param, grad.into_parts().0, moment_1, moment_2, c);
        (
            constant::<B, C>(param_node, p),
            constant::<B, C>(moment_1_node, m1),
            constant::<B, C>(moment_2_node, m2),
        )
    }

    fn sgd_momentum_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: FloatTensor<Self>,
        c: SgdCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (param, param_node) = param.into_parts();
        let (velocity, velocity_node) = velocity.into_parts();
        let (p, v) = B::sgd_momentum_update(param, grad.into_parts().0, velocity, c);
        (
            constant::<B, C>(param_node, p),
            constant::<B, C>(velocity_node, v),
        )
    }

    fn sgd_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        c: SgdCoefficients,
    ) -> FloatTensor<Self> {
        let (param, param_node) = param.into_parts();
        constant::<B, C>(param_node, B::sgd_update(param, grad.into_parts().0, c))
    }

    fn unshared_copy(tensor: FloatTensor<Self>) -> FloatTensor<Self> {
        let (tensor, node) = tensor.into_parts();
        constant::<B, C>(node, B::unshared_copy(tensor))
    }
}

/// `tensor` as an autodiff tensor that is a constant to the graph of `node`.
fn constant<B: Backend, C: CheckpointStrategy>(
    node: NodeGuard,
    tensor: FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    match Constant.prepare::<C>([node]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((), tensor),
        OpsKind::UnTracked(prep) => prep.finish(tensor),
    }
}

/// What the fused optimizers' tests share.
#[cfg(test)]
pub(super) mod testing {
    use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
    use burn::module::{ModuleVisitor, Param};
    use burn::nn::{Initializer, Linear, LinearConfig};
    use burn::optim::{GradientsParams, ModuleOptimizer};
    use burn::prelude::*;

    use crate::kernels::test_values;

    pub fn values(layer: &Linear) -> Vec<Vec<f32>> {
        struct Collect(Vec<Vec<f32>>);
        impl ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.push(param.val().into_data().to_vec().unwrap());
            }
        }
        let mut collect = Collect(Vec::new());
        layer.visit(&mut collect);
        collect.0
    }

    /// A 300-to-200 dense layer (big enough for several rayon chunks of the update) with fixed
    /// values: not the device's generator, which tests running beside this one seed and draw
    /// from, so that every call gives the same layer.
    fn layer(device: &Device) -> Linear {
        let (inputs, outputs) = (300, 200);
        let mut layer: Linear = LinearConfig::new(inputs, outputs)
            .with_initializer(Initializer::Zeros)
            .init(device);
        layer.weight = fixed(21, [inputs, outputs], device);
        layer.bias = Some(fixed(22, [outputs], device));
        layer
    }

    /// A parameter of small fixed values.
    fn fixed<const D: usize>(seed: u32, shape: [usize; D], device: &Device) -> Param<Tensor<D>> {
        let values: Vec<f32> = test_values(shape.iter().product(), seed)
            .iter()
            .map(|v| v * 0.05)
            .collect();
        Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// The parameters of [`layer`] after five steps of `optimizer`, in a pool of `threads`.
    pub fn train(mut optimizer: ModuleOptimizer, device: &Device, threads: usize) -> Vec<Vec<f32>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut layer = layer(device);
            let mut schedule = ModuleLrScheduler::from(1e-2);
            for step in 0..5 {
                let x = test_values(16 * 300, 100 + step);
                let x = Tensor::<2>::from_data(TensorData::new(x, [16, 300]), device)
                    .mul_scalar(step as f32 + 1.0);
                let loss = layer.forward(x).powi_scalar(2).mean();
                let grads = GradientsParams::from_grads(loss.backward(), &layer);
                layer = optimizer.step(schedule.step(), layer, grads);
            }
            values(&layer)
        })
    }

    /// Each of the optimizers' `outcomes` ([`train`]) differs from the others and from
    /// [`layer`] as it starts: each trained, and to weights of its own.
    pub fn distinct_and_trained(mut outcomes: Vec<Vec<Vec<f32>>>, device: &Device) {
        outcomes.push(values(&layer(device)));
        for (i, a) in outcomes.iter().enumerate() {
            assert!(outcomes[i + 1..].iter().all(|b| b != a), "outcome {i}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_element_once_in_order() {
        let n = 2 * ELEMENTS_PER_TASK + 5;
        let (mut a, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
        let pieces = chunks([&mut a[..], &mut b[..]]);
        let lengths: Vec<_> = pieces.iter().map(|[a, b]| (a.len(), b.len())).collect();
        assert_eq!(
            lengths,
            [
                (ELEMENTS_PER_TASK, ELEMENTS_PER_TASK),
                (ELEMENTS_PER_TASK, ELEMENTS_PER_TASK),
                (5, 5)
            ]
        );
        for (i, [a, b]) in pieces.into_iter().enumerate() {
            a.fill(i as f32);
            b.fill(-(i as f32));
        }
        assert_eq!(
            (a[ELEMENTS_PER_TASK - 1], a[ELEMENTS_PER_TASK], a[n - 1]),
            (0.0, 1.0, 2.0)
        );
        assert_eq!(b[n - 1], -2.0);
        assert!(chunks::<1>([&mut []]).is_empty());
    }
}
