//! Rounding f32 tensors to the values of a half format: how burn-ndarray, which has no half
//! dtypes, emulates half-precision training.
//!
//! An autodiff operation of its own, because the rounding must apply in both directions: the
//! forward value, and the gradient that flows back through it (in real half precision the
//! gradient of a half activation is itself half). A straight-through `x + (round(x) - x).detach()`
//! would round only the forward value.
#![allow(deprecated)] // burn-ndarray is deprecated upstream but still a backend here

use crate::kernels::ELEMENTS_PER_TASK;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, Backend, Dispatch, Flex, NdArray, TensorMetadata, backend_extension,
};
use burn::prelude::*;
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;

use burn::tensor::DType;

use super::HalfFormat;
use crate::kernels::build_in_parallel_uninit;
use crate::kernels::convert::{HalfFloat, round_in_f32, round_in_f32_in_place};
use crate::kernels::extension::HostSlices;

/// Values the overflow check rounds at a time, into a buffer that stays in the L1 cache.
const ROUND_BLOCK: usize = 1024;

/// Rounding to a half format, values kept in f32; and the loss scaler's unscaling.
#[backend_extension(NdArray, Flex, Autodiff)]
pub trait RoundBackend: Backend {
    /// Every element of an f32 tensor rounded to the nearest value of `format` (round to
    /// nearest, ties to even), as f32.
    fn round_to_half(x: FloatTensor<Self>, format: HalfFormat) -> FloatTensor<Self>;

    /// `x * factor` as f32, and whether every element of it is finite: one parallel pass where
    /// tensor operations would take three, one of them serial.
    fn scale_and_check(x: FloatTensor<Self>, factor: f32) -> (FloatTensor<Self>, bool);

    /// Whether every element of `x * factor` is finite, computed in f32 as
    /// [`RoundBackend::scale_and_check`] computes it, without writing it: one pass that reads.
    /// With `round_to`, of `x` rounded to that format first (rounded in cache, not stored).
    fn all_finite(x: FloatTensor<Self>, factor: f32, round_to: Option<HalfFormat>) -> bool;

    /// `x` in `dtype` (f32, or on burn-flex f16 or bf16): burn's cast, with the CPU's vector
    /// conversions on every thread rather than one element at a time.
    fn convert(x: FloatTensor<Self>, dtype: DType) -> FloatTensor<Self>;
}

/// `x` in `dtype` (f32, f16 or bf16), converted on every thread of the pool.
pub fn convert<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if x.dtype() == dtype {
        return x;
    }
    Tensor::from_dispatch(<Dispatch as RoundBackend>::convert(
        x.into_dispatch(),
        dtype,
    ))
}

fn convert_tensor<B: HostSlices>(x: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    let shape = x.shape().to_vec();
    match B::read_f32(&x) {
        Cow::Owned(values) => B::write_as(values, shape, dtype),
        Cow::Borrowed(values) => B::write_slice_as(values, shape, dtype),
    }
}

/// `x * factor` in f32, and whether all of it is finite.
pub fn scale_and_check<const D: usize>(x: Tensor<D>, factor: f32) -> (Tensor<D>, bool) {
    let (x, finite) = <Dispatch as RoundBackend>::scale_and_check(x.into_dispatch(), factor);
    (Tensor::from_dispatch(x), finite)
}

fn scale_and_check_tensor<B: HostSlices>(x: FloatTensor<B>, factor: f32) -> (FloatTensor<B>, bool) {
    let shape = x.shape().to_vec();
    // Half tensors are widened chunk by chunk: one pass, and the result is f32.
    let held = B::read(&x);
    let values = held.values();
    // A logical "and" over chunks: the same answer whatever the split.
    let finite = std::sync::atomic::AtomicBool::new(true);
    let scale_chunk = |i: usize, out: &mut [MaybeUninit<f32>]| {
        let mut scratch = Vec::new();
        let values = values.read(
            i * ELEMENTS_PER_TASK..i * ELEMENTS_PER_TASK + out.len(),
            &mut scratch,
        );
        let mut all = true;
        for (o, &v) in out.iter_mut().zip(values) {
            all &= o.write(v * factor).is_finite();
        }
        if !all {
            finite.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    };
    // SAFETY: `values.read` gives as many values as `out` has elements, and each is written.
    let out = unsafe { build_in_parallel_uninit(values.len(), ELEMENTS_PER_TASK, scale_chunk) };
    let finite = finite.into_inner();
    (B::write_f32(out, shape), finite)
}

/// Whether every element of `x * factor` is finite (in f32), `x` rounded `round_to` first.
pub fn all_finite<const D: usize>(
    x: &Tensor<D>,
    factor: f32,
    round_to: Option<HalfFormat>,
) -> bool {
    <Dispatch as RoundBackend>::all_finite(x.clone().into_dispatch(), factor, round_to)
}

fn all_finite_tensor<B: HostSlices>(
    x: FloatTensor<B>,
    factor: f32,
    round_to: Option<HalfFormat>,
) -> bool {
    let held = B::read(&x);
    let values = held.values();
    let finite = |values: &[f32]| {
        values
            .iter()
            .fold(true, |all, &v| all & (v * factor).is_finite())
    };
    // When the factor cannot carry the format's largest value past f32's range, a rounded
    // value times the factor is finite exactly when the rounded value is, that is when the
    // value lies below the format's overflow point: a comparison, no rounding.
    let overflow = round_to
        .filter(|format| (format.max() * factor).is_finite())
        .map(HalfFormat::overflow);
    // A logical "and": the same answer whatever the split.
    (0..values.len().div_ceil(ELEMENTS_PER_TASK))
        .into_par_iter()
        .all(|i| {
            let mut scratch = Vec::new();
            let range = i * ELEMENTS_PER_TASK
                ..(i * ELEMENTS_PER_TASK + ELEMENTS_PER_TASK).min(values.len());
            let values = values.read(range, &mut scratch);
            match (round_to, overflow) {
                (None, _) => finite(values),
                (Some(_), Some(overflow)) => values
                    .iter()
                    .fold(true, |all, &v| all & (v.abs() < overflow)),
                // Rounded a block at a time in a buffer that stays in the L1 cache.
                (Some(format), None) => values.chunks(ROUND_BLOCK).all(|block| {
                    let mut rounded = [0.0; ROUND_BLOCK];
                    let rounded = &mut rounded[..block.len()];
                    rounded.copy_from_slice(block);
                    match format {
                        HalfFormat::F16 => round_in_f32_in_place::<f16>(rounded),
                        HalfFormat::Bf16 => round_in_f32_in_place::<bf16>(rounded),
                    }
                    finite(rounded)
                }),
            }
        })
}

/// `x` with every element rounded to `format` (to nearest, ties to even), still f32.
pub fn round_to_half<const D: usize>(x: Tensor<D>, format: HalfFormat) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as RoundBackend>::round_to_half(
        x.into_dispatch(),
        format,
    ))
}

/// `values` rounded to `T` and back, in a new buffer.
fn round_slice<T: HalfFloat>(values: &[f32]) -> Vec<f32> {
    let round_chunk = |i: usize, out: &mut [MaybeUninit<f32>]| {
        round_in_f32::<T>(&values[i * ELEMENTS_PER_TASK..][..out.len()], out)
    };
    // SAFETY: `round_in_f32` writes every element of each chunk's `out`.
    unsafe { build_in_parallel_uninit(values.len(), ELEMENTS_PER_TASK, round_chunk) }
}

/// `values` rounded to `T` and back where they lie: no new buffer to write, for a tensor no one
/// else holds.
fn round_in_place<T: HalfFloat>(values: &mut [f32]) {
    values
        .par_chunks_mut(ELEMENTS_PER_TASK)
        .for_each(round_in_f32_in_place::<T>);
}

/// Rounds to bf16 (or f16) values: in place when the tensor is unshared f32 (a fresh
/// activation, a gradient), else into a copy (the working copy of a weight, whose storage the
/// master shares).
fn round_tensor<B: HostSlices>(x: FloatTensor<B>, format: HalfFormat) -> FloatTensor<B> {
    fn round_as<B: HostSlices, T: HalfFloat>(mut x: FloatTensor<B>) -> FloatTensor<B> {
        if let Some(values) = B::f32_mut(&mut x) {
            round_in_place::<T>(values);
            return x;
        }
        let shape = x.shape().to_vec();
        B::write_f32(round_slice::<T>(&B::read_f32(&x)), shape)
    }
    match format {
        HalfFormat::F16 => round_as::<B, f16>(x),
        HalfFormat::Bf16 => round_as::<B, bf16>(x),
    }
}

impl RoundBackend for NdArray {
    fn round_to_half(x: NdArrayTensor, format: HalfFormat) -> NdArrayTensor {
        round_tensor::<Self>(x, format)
    }

    fn scale_and_check(x: NdArrayTensor, factor: f32) -> (NdArrayTensor, bool) {
        scale_and_check_tensor::<Self>(x, factor)
    }

    fn all_finite(x: NdArrayTensor, factor: f32, round_to: Option<HalfFormat>) -> bool {
        all_finite_tensor::<Self>(x, factor, round_to)
    }

    fn convert(x: NdArrayTensor, dtype: DType) -> NdArrayTensor {
        convert_tensor::<Self>(x, dtype)
    }
}

impl RoundBackend for Flex {
    fn round_to_half(x: FlexTensor, format: HalfFormat) -> FlexTensor {
        round_tensor::<Self>(x, format)
    }

    fn scale_and_check(x: FlexTensor, factor: f32) -> (FlexTensor, bool) {
        scale_and_check_tensor::<Self>(x, factor)
    }

    fn all_finite(x: FlexTensor, factor: f32, round_to: Option<HalfFormat>) -> bool {
        all_finite_tensor::<Self>(x, factor, round_to)
    }

    fn convert(x: FlexTensor, dtype: DType) -> FlexTensor {
        convert_tensor::<Self>(x, dtype)
    }
}

/// Backward step of [`RoundBackend::round_to_half`]: the gradient, rounded the same way.
#[derive(Debug)]
struct RoundBackward;

impl<B: RoundBackend> Backward<B, 1> for RoundBackward {
    type State = HalfFormat;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::round_to_half(grad, ops.state));
        }
    }
}

impl<B: RoundBackend, C: CheckpointStrategy> RoundBackend for Autodiff<B, C> {
    fn round_to_half(x: FloatTensor<Self>, format: HalfFormat) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        match RoundBackward
            .prepare::<C>([x_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(format, B::round_to_half(x, format)),
            OpsKind::UnTracked(prep) => prep.finish(B::round_to_half(x, format)),
        }
    }

    fn scale_and_check(x: FloatTensor<Self>, factor: f32) -> (FloatTensor<Self>, bool) {
        let (x, x_node) = x.into_parts();
        let (y, finite) = B::scale_and_check(x, factor);
        let y = match ScaleBackward
            .prepare::<C>([x_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(factor, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, finite)
    }

    fn all_finite(x: FloatTensor<Self>, factor: f32, round_to: Option<HalfFormat>) -> bool {
        B::all_finite(x.into_primitive(), factor, round_to)
    }

    fn convert(x: FloatTensor<Self>, dtype: DType) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let source = x.dtype();
        let y = B::convert(x, dtype);
        match ConvertBackward
            .prepare::<C>([x_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(source, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

/// Backward step of [`RoundBackend::convert`]: the gradient, in the source's dtype.
#[derive(Debug)]
struct ConvertBackward;

impl<B: RoundBackend> Backward<B, 1> for ConvertBackward {
    type State = DType;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::convert(grad, ops.state));
        }
    }
}

/// Backward step of [`RoundBackend::scale_and_check`] (gradients are not tracked in practice:
/// this keeps the operation a correct one if they are).
#[derive(Debug)]
struct ScaleBackward;

impl<B: RoundBackend> Backward<B, 1> for ScaleBackward {
    type State = f32;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::scale_and_check(grad, ops.state).0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn rounds_like_the_half_crate_and_passes_rounded_gradients_back() {
        let device = Device::ndarray().autodiff();
        // 1 + 2^-12 is between two f16 values (spacing 2^-10) and rounds down to 1; 70000 is past
        // f16's largest value (65504) and becomes inf; 1e-8 is below f16's smallest subnormal.
        let x = Tensor::<1>::from_floats([1.0 + 2f32.powi(-12), 70000.0, 1e-8, -3.3], &device)
            .require_grad();
        let y = round_to_half(x.clone(), HalfFormat::F16);
        let values: Vec<f32> = y.to_data().to_vec().unwrap();
        assert_eq!(values[0], 1.0);
        assert!(values[1].is_infinite());
        assert_eq!(values[2], 0.0);
        assert_eq!(values[3], f16::from_f32(-3.3).to_f32());
        // d(sum(y * w))/dx = round(w): w = 1e-8 underflows to 0 in f16, 1/3 is rounded.
        let w = Tensor::<1>::from_floats([1e-8, 1.0 / 3.0, 1.0, 1.0], &device);
        let grads = y.mul(w).sum().backward();
        let g: Vec<f32> = x.grad(&grads).unwrap().to_data().to_vec().unwrap();
        assert_eq!(g[0], 0.0);
        assert_eq!(g[1], f16::from_f32(1.0 / 3.0).to_f32());
        assert_ne!(g[1], 1.0 / 3.0);
    }

    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        let mut x = 0x1234_5678u32;
        let mut samples: Vec<f32> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f32::from_bits(x)
            })
            .collect();
        samples.extend([f32::MAX, f32::MIN, f32::INFINITY, -0.0, 1.0 + 2f32.powi(-8)]);
        let rounded = round_slice::<bf16>(&samples);
        for (&v, &got) in samples.iter().zip(&rounded) {
            let expected = bf16::from_f32(v).to_f32();
            assert!(
                got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan()),
                "{v:e}: {got:e} != {expected:e}"
            );
        }
    }

    /// An unshared tensor is rounded where it lies, a shared one into a copy that leaves the
    /// other holder's values alone; both give the values of `round_slice`.
    #[test]
    fn rounds_in_place_only_what_no_one_else_holds() {
        let values: Vec<f32> = (0..3 * ELEMENTS_PER_TASK + 7)
            .map(|i| (i as f32 * 0.37).sin() * 1e3)
            .collect();
        for format in [HalfFormat::F16, HalfFormat::Bf16] {
            let want = match format {
                HalfFormat::F16 => round_slice::<f16>(&values),
                HalfFormat::Bf16 => round_slice::<half::bf16>(&values),
            };
            let unshared = NdArray::write_f32(values.clone(), vec![values.len()]);
            let storage = NdArray::read_f32(&unshared).as_ptr();
            let rounded = round_tensor::<NdArray>(unshared, format);
            assert_eq!(
                NdArray::read_f32(&rounded).as_ptr(),
                storage,
                "rounded in place"
            );
            assert_eq!(NdArray::read_f32(&rounded).into_owned(), want);

            let kept = NdArray::write_f32(values.clone(), vec![values.len()]);
            let rounded = round_tensor::<NdArray>(kept.clone(), format);
            assert_ne!(
                NdArray::read_f32(&rounded).as_ptr(),
                NdArray::read_f32(&kept).as_ptr()
            );
            assert_eq!(NdArray::read_f32(&rounded).into_owned(), want);
            assert_eq!(
                NdArray::read_f32(&kept).into_owned(),
                values,
                "the other holder's values"
            );
        }
    }

    #[test]
    fn scale_and_check_multiplies_and_finds_any_non_finite_value() {
        for device in [Device::ndarray(), Device::flex()] {
            let mut values = vec![1.5f32; 100_000];
            let x = Tensor::<1>::from_floats(values.as_slice(), &device);
            let (y, finite) = scale_and_check(x, 0.5);
            assert!(finite);
            assert_eq!(y.to_data().to_vec::<f32>().unwrap()[99_999], 0.75);
            for bad in [f32::NAN, f32::INFINITY] {
                values[77_777] = bad;
                let x = Tensor::<1>::from_floats(values.as_slice(), &device);
                assert!(!scale_and_check(x, 0.5).1, "{bad}");
            }
            // Finite values that overflow when scaled.
            let x = Tensor::<1>::from_floats([3e38f32, 1.0], &device);
            assert!(!scale_and_check(x, 2.0).1);
        }
    }

    /// The check of values to be rounded answers as rounding them first and checking the
    /// rounded values would: near each format's overflow point, with NaN and infinity, with a
    /// factor that keeps the largest half finite and with one that does not.
    #[test]
    fn all_finite_once_rounded_answers_as_rounding_first() {
        let device = Device::ndarray();
        for format in [HalfFormat::F16, HalfFormat::Bf16] {
            let (max, overflow) = (format.max(), format.overflow());
            let below = f32::from_bits(overflow.to_bits() - 1);
            let cases = [
                vec![1.0, -max, below],
                vec![1.0, overflow],
                vec![-below, -overflow],
                vec![f32::NAN],
                vec![f32::NEG_INFINITY, 0.0],
                vec![1e-30, -2.5],
            ];
            for values in cases {
                for factor in [1.0, 1.0 / 65536.0, 2.0, 1e34, f32::MAX] {
                    let x = Tensor::<1>::from_floats(values.as_slice(), &device);
                    let rounded = round_to_half(x.clone(), format);
                    let want = all_finite(&rounded, factor, None);
                    assert_eq!(
                        all_finite(&x, factor, Some(format)),
                        want,
                        "{format:?} {values:?} x {factor:e}"
                    );
                }
            }
        }
        // Both answers occur.
        let x = Tensor::<1>::from_floats([65519.0f32], &device);
        assert!(all_finite(&x, 1.0, Some(HalfFormat::F16)));
        assert!(!all_finite(
            &x.clone().mul_scalar(2.0),
            1.0,
            Some(HalfFormat::F16)
        ));
        assert!(all_finite(&x.mul_scalar(2.0), 1.0, Some(HalfFormat::Bf16)));
    }

    #[test]
    fn bf16_keeps_the_f32_range() {
        let device = Device::flex();
        let x = Tensor::<1>::from_floats([70000.0, 1e-30, 1.0 + 2f32.powi(-9)], &device);
        let values: Vec<f32> = round_to_half(x, HalfFormat::Bf16)
            .to_data()
            .to_vec()
            .unwrap();
        assert_eq!(values[0], bf16::from_f32(70000.0).to_f32());
        assert!(values[1] > 0.0);
        assert_eq!(values[2], 1.0); // bf16 keeps 7 fraction bits
    }
}
