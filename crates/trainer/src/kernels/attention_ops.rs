//! The causal self-attention kernel ([`super::attention`]) as a burn backend extension: one
//! implementation per CPU backend and one for `Autodiff<B, C>` whose backward pass calls the
//! kernel's own gradient.
//!
//! The kernel computes in f32: a half-precision `qkv` (burn-flex's f16 and bf16) is widened
//! whole, and the output and the gradient are rounded back to its format. The probabilities the
//! backward pass needs stay f32: they are the kernel's own state, never a tensor.
#![allow(deprecated)] // burn-ndarray is deprecated upstream but still a backend here

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, NdArray, TensorMetadata, backend_extension};

use super::attention::{self, AttentionShape};
use super::extension::HostSlices;

/// Causal multi-head self-attention for the GPT. The shape is checked by the wrapper in
/// [`super`]; the operation panics on dtypes that [`HostSlices`] cannot read.
#[backend_extension(NdArray, Flex, Autodiff)]
pub trait AttentionBackend: Backend {
    /// `qkv: [batch, time, 3 * width]` (q, k and v side by side, each cut into `heads` heads):
    /// every head's `softmax(q kᵀ / sqrt(width / heads))` over the keys up to the query's
    /// position, times its values, heads side by side: `[batch, time, width]`.
    fn causal_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;

    /// [`AttentionBackend::causal_attention`] with dropout: the probabilities multiplied by
    /// `mask: [batch, heads, time, time]` (0, or the factor that keeps an element, f32) before
    /// they weigh the values. The mask is a constant: it gets no gradient.
    fn causal_attention_masked(
        qkv: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
}

fn attention_shape<T: TensorMetadata>(qkv: &T, heads: usize) -> AttentionShape {
    let shape = qkv.shape();
    assert_eq!(shape.num_dims(), 3, "causal attention: qkv must be 3-D");
    AttentionShape::of_qkv([shape[0], shape[1], shape[2]], heads)
}

/// The output in the format of `qkv`, and the probabilities when `keep_probs`.
fn attention_forward<B: HostSlices>(
    qkv: &FloatTensor<B>,
    heads: usize,
    keep_probs: bool,
    mask: Option<&[f32]>,
) -> (FloatTensor<B>, Option<Vec<f32>>) {
    let s = attention_shape(qkv, heads);
    let (output, probs) = attention::forward(&B::read_f32(qkv), s, keep_probs, mask);
    let shape = vec![s.batch, s.time, s.width];
    (B::write_as(output, shape, qkv.dtype()), probs)
}

impl AttentionBackend for NdArray {
    fn causal_attention(qkv: NdArrayTensor, heads: usize) -> NdArrayTensor {
        attention_forward::<Self>(&qkv, heads, false, None).0
    }

    fn causal_attention_masked(
        qkv: NdArrayTensor,
        mask: NdArrayTensor,
        heads: usize,
    ) -> NdArrayTensor {
        attention_forward::<Self>(&qkv, heads, false, Some(&Self::read_f32(&mask))).0
    }
}

impl AttentionBackend for Flex {
    fn causal_attention(qkv: FlexTensor, heads: usize) -> FlexTensor {
        attention_forward::<Self>(&qkv, heads, false, None).0
    }

    fn causal_attention_masked(qkv: FlexTensor, mask: FlexTensor, heads: usize) -> FlexTensor {
        attention_forward::<Self>(&qkv, heads, false, Some(&Self::read_f32(&mask))).0
    }
}

/// Backward step of [`AttentionBackend::causal_attention`].
#[derive(Debug)]
struct AttentionBackward;

/// The forward pass's input, its probabilities, the head count and the dropout mask (if any).
type AttentionState<B> = (FloatTensor<B>, Arc<Vec<f32>>, usize, Option<Arc<Vec<f32>>>);

impl<B: HostSlices> Backward<B, 1> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_qkv] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let Some(node) = node_qkv else { return };
        let (qkv, probs, heads, mask) = ops.state;
        let s = attention_shape(&qkv, heads);
        let d_qkv = attention::backward(
            &B::read_f32(&qkv),
            &probs,
            &B::read_f32(&grad),
            s,
            mask.as_deref().map(Vec::as_slice),
        );
        let shape = vec![s.batch, s.time, 3 * s.width];
        grads.register::<B>(node.id, B::write_as(d_qkv, shape, qkv.dtype()));
    }
}

impl<B: AttentionBackend + HostSlices, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn causal_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        let (qkv, node) = qkv.into_parts();
        match AttentionBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (output, probs) = attention_forward::<B>(&qkv, heads, true, None);
                let probs = Arc::new(probs.expect("the probabilities were kept"));
                prep.finish((qkv, probs, heads, None), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::causal_attention(qkv, heads)),
        }
    }

    fn causal_attention_masked(
        qkv: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        let (qkv, node) = qkv.into_parts();
        let (mask, _) = mask.into_parts();
        match AttentionBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let mask = Arc::new(B::read_f32(&mask).into_owned());
                let (output, probs) = attention_forward::<B>(&qkv, heads, true, Some(&mask));
                let probs = Arc::new(probs.expect("the probabilities were kept"));
                prep.finish((qkv, probs, heads, Some(mask)), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::causal_attention_masked(qkv, mask, heads)),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::prelude::*;
    use burn::tensor::DType;
    use burn::tensor::activation::softmax;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::{causal_attention, causal_attention_masked};

    #[allow(deprecated)]
    fn devices() -> [Device; 2] {
        [Device::ndarray().autodiff(), Device::flex().autodiff()]
    }

    /// Seeded values in [-2, 2): scores of a few units, so that the softmax is not flat.
    fn random<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..shape.iter().product())
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// The attention in burn's tensor operations, as nanoGPT writes it without flash attention.
    fn with_burn_ops(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
        with_burn_ops_masked(qkv, heads, None)
    }

    /// [`with_burn_ops`], the probabilities multiplied by `mask` (nanoGPT's `attn_dropout`).
    fn with_burn_ops_masked(qkv: Tensor<3>, heads: usize, mask: Option<Tensor<4>>) -> Tensor<3> {
        let [batch, time, columns] = qkv.dims();
        let (width, device) = (columns / 3, qkv.device());
        let head_dim = width / heads;
        let split = |part: usize| {
            qkv.clone()
                .narrow(2, part * width, width)
                .reshape([batch, time, heads, head_dim])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .div_scalar((head_dim as f32).sqrt());
        let future = Tensor::<2, Bool>::tril_mask([time, time], 0, &device)
            .unsqueeze::<4>()
            .expand([batch, heads, time, time]);
        let probs = softmax(scores.mask_fill(future, f32::NEG_INFINITY), 3);
        let probs = match mask {
            Some(mask) => probs * mask,
            None => probs,
        };
        probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, time, width])
    }

    /// Close within `tolerance` of the largest magnitude in `want`.
    fn assert_close<const D: usize>(got: Tensor<D>, want: Tensor<D>, tolerance: f32, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let got = got.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        let want = want.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= tolerance * scale,
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }

    /// Odd sizes, a single time step, and a context of several causal blocks.
    const SHAPES: [([usize; 3], usize); 3] = [([3, 7, 36], 3), ([2, 1, 12], 2), ([2, 37, 48], 2)];

    /// Our attention of `qkv` (with `mask`, if any) and its gradient against burn's operations
    /// on the same input, the output's gradient `probe`.
    fn assert_matches_burn_ops(
        qkv: Tensor<3>,
        heads: usize,
        mask: Option<Tensor<4>>,
        probe: Tensor<3>,
        what: &str,
    ) {
        let ours = match &mask {
            Some(mask) => causal_attention_masked(qkv.clone(), mask.clone(), heads),
            None => causal_attention(qkv.clone(), heads),
        };
        let reference = with_burn_ops_masked(qkv.clone(), heads, mask);
        assert_close(ours.clone(), reference.clone(), 1e-5, what);
        let grads = (ours * probe.clone()).sum().backward();
        let ref_grads = (reference * probe).sum().backward();
        assert_close(
            qkv.grad(&grads).expect("a gradient"),
            qkv.grad(&ref_grads).expect("a gradient"),
            1e-5,
            &format!("{what}: dqkv"),
        );
    }

    #[test]
    fn attention_and_its_gradient_match_burn_ops_on_both_backends() {
        for device in devices() {
            for (seed, (shape, heads)) in SHAPES.into_iter().enumerate() {
                let what = format!("{device:?} {shape:?} / {heads} heads");
                let qkv = random(shape, seed as u64, &device).require_grad();
                let [batch, time, columns] = shape;
                let probe = random([batch, time, columns / 3], 100 + seed as u64, &device);
                assert_matches_burn_ops(qkv, heads, None, probe, &what);
            }
        }
    }

    /// With dropout on the probabilities: the values and the gradient of burn's operations on
    /// the masked probabilities (a mask of 0s and 1 / 0.75s, a quarter dropped).
    #[test]
    fn masked_attention_and_its_gradient_match_burn_ops_on_both_backends() {
        for device in devices() {
            for (seed, (shape, heads)) in SHAPES.into_iter().enumerate() {
                let what = format!("{device:?} {shape:?} / {heads} heads, masked");
                let qkv = random(shape, seed as u64, &device).require_grad();
                let [batch, time, columns] = shape;
                let mut rng = ChaCha8Rng::seed_from_u64(50 + seed as u64);
                let mask: Vec<f32> = (0..batch * heads * time * time)
                    .map(|_| {
                        if rng.random_range(0..4) == 0 {
                            0.0
                        } else {
                            1.0 / 0.75
                        }
                    })
                    .collect();
                let mask = Tensor::<4>::from_data(
                    TensorData::new(mask, [batch, heads, time, time]),
                    &device,
                );
                let probe = random([batch, time, columns / 3], 100 + seed as u64, &device);
                assert_matches_burn_ops(qkv.clone(), heads, Some(mask.clone()), probe, &what);
                // The mask changes the result (past the first query, which has one key): a
                // kernel that ignored it would be seen.
                if time > 1 {
                    let unmasked = causal_attention(qkv.clone().detach(), heads);
                    let masked = causal_attention_masked(qkv.detach(), mask, heads);
                    let apart = (masked - unmasked).abs().max().into_scalar::<f32>();
                    assert!(apart > 1e-3, "{what}: the mask changed nothing ({apart})");
                }
            }
        }
    }

    #[test]
    fn attention_without_autodiff() {
        for device in devices() {
            let device = device.without_autodiff();
            let (shape, heads) = SHAPES[0];
            let qkv = random(shape, 7, &device);
            let want = with_burn_ops(qkv.clone(), heads);
            assert_close(causal_attention(qkv, heads), want, 1e-5, "inference");
        }
    }

    /// An input that needs no gradient gets none, and the step does not fail.
    #[test]
    fn attention_on_an_untracked_input_registers_no_gradient() {
        let device = devices()[0].clone();
        let qkv = random([2, 5, 12], 3, &device);
        let weight = random([1], 4, &device).require_grad();
        let y = causal_attention(qkv.clone(), 2) * weight.clone().reshape([1, 1, 1]);
        let grads = y.sum().backward();
        assert!(qkv.grad(&grads).is_none());
        assert!(weight.grad(&grads).is_some());
    }

    /// The GPT's shape and an odd one: output and gradient bit for bit the same in rayon pools
    /// of 1 and 3 threads.
    #[test]
    fn attention_results_do_not_depend_on_the_thread_count() {
        let run = |device: &Device, shape: [usize; 3], heads: usize| {
            let qkv = random(shape, 11, device).require_grad();
            let y = causal_attention(qkv.clone(), heads);
            let probe = random(y.dims(), 12, device);
            let grads = (y.clone() * probe).sum().backward();
            let bits = |t: Tensor<3>| -> Vec<u32> {
                let values = t.into_data().to_vec::<f32>().unwrap();
                values.into_iter().map(f32::to_bits).collect()
            };
            [bits(y), bits(qkv.grad(&grads).expect("a gradient"))]
        };
        for device in devices() {
            for (shape, heads) in [([12, 64, 384], 4), SHAPES[0]] {
                let in_pool =
                    |threads| crate::test_data::in_pool(threads, || run(&device, shape, heads));
                assert!(
                    in_pool(1) == in_pool(3),
                    "{device:?} {shape:?}: 1 and 3 threads"
                );
            }
        }
    }

    /// Half-precision `qkv` on flex: the output and the gradient in its format, exactly the f32
    /// kernel's on the rounded values, and within the format's precision of the f32 results on
    /// the unrounded ones.
    #[test]
    fn half_precision_attention_on_flex() {
        let device = Device::flex().autodiff();
        let ([batch, time, columns], heads) = SHAPES[2];
        let wide_qkv = random([batch, time, columns], 21, &device).require_grad();
        let probe = random([batch, time, columns / 3], 22, &device);
        let wide_out = causal_attention(wide_qkv.clone(), heads);
        let wide_grads = (wide_out.clone() * probe.clone()).sum().backward();
        let wide_grad = wide_qkv.grad(&wide_grads).expect("a gradient");
        for (dtype, tolerance) in [(DType::BF16, 2e-2), (DType::F16, 4e-3)] {
            let qkv = wide_qkv
                .clone()
                .detach()
                .cast(dtype)
                .detach()
                .require_grad();
            let out = causal_attention(qkv.clone(), heads);
            assert_eq!(out.dtype(), dtype);
            let grads = (out.clone().cast(DType::F32) * probe.clone())
                .sum()
                .backward();
            let grad = qkv.grad(&grads).expect("a gradient");
            assert_eq!(grad.dtype(), dtype);

            let rounded_qkv = qkv
                .clone()
                .detach()
                .cast(DType::F32)
                .detach()
                .require_grad();
            let rounded_out = causal_attention(rounded_qkv.clone(), heads);
            let rounded_probe = probe.clone().cast(dtype).cast(DType::F32);
            let rounded_grads = (rounded_out.clone() * rounded_probe).sum().backward();
            let rounded_grad = rounded_qkv.grad(&rounded_grads).expect("a gradient");
            let narrow = |t: Tensor<3>| t.cast(dtype).into_data();
            assert_eq!(out.clone().into_data(), narrow(rounded_out), "{dtype:?}");
            assert_eq!(grad.clone().into_data(), narrow(rounded_grad), "{dtype:?}");

            let what = format!("{dtype:?} against f32");
            assert_close(out, wide_out.clone(), tolerance, &what);
            assert_close(grad, wide_grad.clone(), tolerance, &format!("{what}: dqkv"));
        }
    }

    #[test]
    #[should_panic(expected = "columns are not q, k and v of 4 equal heads")]
    fn a_width_that_does_not_split_into_the_heads_is_refused() {
        causal_attention(random([1, 3, 30], 1, &devices()[0]), 4);
    }
}
