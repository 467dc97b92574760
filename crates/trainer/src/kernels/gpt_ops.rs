//! The GPT's LayerNorm, GELU and embedding kernels as a burn backend extension: one
//! implementation per CPU backend (on the slices of [`HostSlices`]) and one for `Autodiff<B, C>`
//! whose backward pass calls the gradient kernels. The GPT's products without bias are
//! [`DenseBackend::matmul`](super::extension::DenseBackend::matmul).
#![allow(deprecated)] // burn-ndarray is deprecated upstream but still a backend here

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Flex, NdArray, TensorMetadata, backend_extension};
use burn::tensor::DType;

use super::embedding::{self, EmbedShape};
use super::extension::HostSlices;
use super::gelu;
use super::layer_norm::{self, Normalized, RowStats};

/// LayerNorm, GELU and the token + position embedding of the GPT. Shapes are checked by the
/// wrappers in [`super`]; the operations panic on dtypes that [`HostSlices`] cannot read.
#[backend_extension(NdArray, Flex, Autodiff)]
pub trait GptOpsBackend: Backend {
    /// LayerNorm over the last dimension of `x` with `gain: [width]` and no bias (eps 1e-5,
    /// biased variance).
    fn layer_norm(x: FloatTensor<Self>, gain: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The exact (erf) GELU of every element.
    fn gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]` for `tokens: [batch, time]`,
    /// `wte: [vocab, width]` and `wpe: [context, width]`: `[batch, time, width]`.
    fn embed(
        tokens: IntTensor<Self>,
        wte: FloatTensor<Self>,
        wpe: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

fn dims<T: TensorMetadata>(tensor: &T) -> Vec<usize> {
    tensor.shape().to_vec()
}

fn dims2<T: TensorMetadata>(tensor: &T, what: &str) -> [usize; 2] {
    match dims(tensor)[..] {
        [rows, cols] => [rows, cols],
        ref other => panic!("{what}: expected a 2-D tensor, got shape {other:?}"),
    }
}

/// The width of the rows a LayerNorm normalises: the last dimension.
fn last_dim<T: TensorMetadata>(tensor: &T) -> usize {
    dims(tensor)
        .last()
        .copied()
        .unwrap_or_else(|| panic!("layer norm: a tensor with no dimensions"))
}

fn layer_norm_forward<B: HostSlices>(x: &FloatTensor<B>, gain: &FloatTensor<B>) -> Normalized {
    let width = last_dim(x);
    let (x, gain) = (B::read(x), B::read(gain));
    layer_norm::forward(x.values(), gain.values(), width)
}

fn layer_norm_value<B: HostSlices>(x: FloatTensor<B>, gain: FloatTensor<B>) -> FloatTensor<B> {
    B::write(layer_norm_forward::<B>(&x, &gain).y, dims(&x))
}

fn gelu_value<B: HostSlices>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::write(gelu::forward(B::read(&x).values()), dims(&x))
}

/// The sizes of an embedding, checked (tokens against the vocabulary by the kernel).
fn embed_shape<B: Backend>(
    tokens: &IntTensor<B>,
    wte: &FloatTensor<B>,
    wpe: &FloatTensor<B>,
) -> EmbedShape {
    let [batch, time] = dims2(tokens, "embed tokens");
    let [vocab, width] = dims2(wte, "embed wte");
    let [context, wpe_width] = dims2(wpe, "embed wpe");
    assert_eq!(wpe_width, width, "embed: wpe rows as wide as wte's");
    EmbedShape {
        batch,
        time,
        vocab,
        context,
        width,
    }
}

/// The embedding and the token ids it read.
fn embed_forward<B: HostSlices>(
    tokens: &IntTensor<B>,
    wte: &FloatTensor<B>,
    wpe: &FloatTensor<B>,
) -> (FloatTensor<B>, Vec<usize>, EmbedShape) {
    let s = embed_shape::<B>(tokens, wte, wpe);
    // Token ids are never "ignored": a negative one is a caller's bug, as an id past the
    // vocabulary is.
    let ids: Vec<usize> = B::read_classes(tokens)
        .into_iter()
        .map(|id| id.expect("embed: a negative token id"))
        .collect();
    let (wte, wpe) = (B::read(wte), B::read(wpe));
    let out = embedding::forward(&ids, wte.values(), wpe.values(), s);
    (B::write(out, vec![s.batch, s.time, s.width]), ids, s)
}

/// The backend implementations for a host backend.
macro_rules! host_gpt_ops {
    ($backend:ty, $tensor:ty) => {
        impl GptOpsBackend for $backend {
            fn layer_norm(x: $tensor, gain: $tensor) -> $tensor {
                layer_norm_value::<Self>(x, gain)
            }

            fn gelu(x: $tensor) -> $tensor {
                gelu_value::<Self>(x)
            }

            fn embed(tokens: $tensor, wte: $tensor, wpe: $tensor) -> $tensor {
                embed_forward::<Self>(&tokens, &wte, &wpe).0
            }
        }
    };
}

host_gpt_ops!(NdArray, NdArrayTensor);
host_gpt_ops!(Flex, FlexTensor);

/// Backward step of [`GptOpsBackend::layer_norm`].
#[derive(Debug)]
struct LayerNormBackward;

/// Input, gain, and each row's mean and `1 / std`.
type LayerNormState<B> = (FloatTensor<B>, FloatTensor<B>, Arc<Vec<RowStats>>);

impl<B: HostSlices> Backward<B, 2> for LayerNormBackward {
    type State = LayerNormState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gain] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, gain, stats) = ops.state;
        let (shape, width, gain_dtype) = (dims(&x), last_dim(&x), gain.dtype());
        let (x, gain, grad) = (B::read(&x), B::read(&gain), B::read(&grad));
        let g = layer_norm::backward(
            x.values(),
            gain.values(),
            &stats,
            grad.values(),
            width,
            node_x.is_some(),
        );
        if let (Some(node), Some(dx)) = (node_x, g.x) {
            grads.register::<B>(node.id, B::write(dx, shape));
        }
        if let Some(node) = node_gain {
            grads.register::<B>(node.id, B::write_as(g.gain, vec![width], gain_dtype));
        }
    }
}

/// Backward step of [`GptOpsBackend::gelu`]; the state is the forward input.
#[derive(Debug)]
struct GeluBackward;

impl<B: HostSlices> Backward<B, 1> for GeluBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let mut grad = grads.consume::<B>(&ops.node);
        let Some(node) = node_x else { return };
        let x = ops.state;
        let x_held = B::read(&x);
        // In place where the gradient is f32 and this step's alone: no new buffer.
        if let Some(dy) = B::f32_mut(&mut grad) {
            gelu::backward_in_place(x_held.values(), dy);
            grads.register::<B>(node.id, grad);
            return;
        }
        let dx = gelu::backward(x_held.values(), B::read(&grad).values());
        grads.register::<B>(node.id, B::write(dx, dims(&x)));
    }
}

/// Backward step of [`GptOpsBackend::embed`].
#[derive(Debug)]
struct EmbedBackward;

/// The token ids, the sizes, and the dtypes of `wte` and `wpe`.
type EmbedState = (Arc<Vec<usize>>, EmbedShape, [DType; 2]);

impl<B: HostSlices> Backward<B, 2> for EmbedBackward {
    type State = EmbedState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_wte, node_wpe] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (ids, s, [wte_dtype, wpe_dtype]) = ops.state;
        let (dwte, dwpe) = embedding::backward(&ids, B::read(&grad).values(), s);
        if let Some(node) = node_wte {
            let shape = vec![s.vocab, s.width];
            grads.register::<B>(node.id, B::write_as(dwte, shape, wte_dtype));
        }
        if let Some(node) = node_wpe {
            let shape = vec![s.context, s.width];
            grads.register::<B>(node.id, B::write_as(dwpe, shape, wpe_dtype));
        }
    }
}

impl<B: GptOpsBackend + HostSlices, C: CheckpointStrategy> GptOpsBackend for Autodiff<B, C> {
    fn layer_norm(x: FloatTensor<Self>, gain: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (gain, gain_node) = gain.into_parts();
        match LayerNormBackward
            .prepare::<C>([x_node, gain_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let Normalized { y, stats } = layer_norm_forward::<B>(&x, &gain);
                let y = B::write(y, dims(&x));
                prep.finish((x, gain, Arc::new(stats)), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as GptOpsBackend>::layer_norm(x, gain)),
        }
    }

    fn gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        match GeluBackward
            .prepare::<C>([x_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = <B as GptOpsBackend>::gelu(x.clone());
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as GptOpsBackend>::gelu(x)),
        }
    }

    fn embed(
        tokens: IntTensor<Self>,
        wte: FloatTensor<Self>,
        wpe: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (wte, wte_node) = wte.into_parts();
        let (wpe, wpe_node) = wpe.into_parts();
        match EmbedBackward
            .prepare::<C>([wte_node, wpe_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, ids, s) = embed_forward::<B>(&tokens, &wte, &wpe);
                let state = (Arc::new(ids), s, [wte.dtype(), wpe.dtype()]);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::embed(tokens, wte, wpe)),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::prelude::*;
    use burn::tensor::activation;
    use burn::tensor::{DType, Gradients};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::kernels::{embed, gelu, layer_norm, matmul};

    #[allow(deprecated)]
    fn devices() -> [Device; 2] {
        [Device::ndarray().autodiff(), Device::flex().autodiff()]
    }

    /// Seeded values in `[-scale, scale)`.
    fn random<const D: usize>(
        shape: [usize; D],
        seed: u64,
        scale: f32,
        device: &Device,
    ) -> Tensor<D> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..shape.iter().product())
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// Seeded token ids below `vocab`.
    fn tokens(shape: [usize; 2], vocab: usize, seed: u64, device: &Device) -> Tensor<2, Int> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ids: Vec<i64> = (0..shape[0] * shape[1])
            .map(|_| rng.random_range(0..vocab as i64))
            .collect();
        Tensor::from_data(TensorData::new(ids, shape), device)
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap()
    }

    /// Every element within `tolerance` of the reference's largest magnitude.
    fn assert_close<const D: usize>(got: Tensor<D>, want: Tensor<D>, tolerance: f32, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let (got, want) = (values(got), values(want));
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: all zero");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= tolerance * scale,
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }

    /// Ours and burn's reference against the same probe: values, then each gradient `of` names.
    fn assert_same<const D: usize>(
        ours: Tensor<D>,
        reference: Tensor<D>,
        tolerance: f32,
        of: impl Fn(&Gradients) -> Vec<(&'static str, Tensor<1>)>,
    ) {
        assert_close(ours.clone(), reference.clone(), tolerance, "value");
        let probe = random(ours.dims(), 99, 1.0, &ours.device());
        let grads = (ours * probe.clone()).sum().backward();
        let ref_grads = (reference * probe).sum().backward();
        for ((what, got), (_, want)) in of(&grads).into_iter().zip(of(&ref_grads)) {
            assert_close(got, want, tolerance, what);
        }
    }

    fn flat<const D: usize>(grad: Option<Tensor<D>>) -> Tensor<1> {
        grad.expect("a gradient").reshape([-1])
    }

    /// LayerNorm written with burn's tensor operations.
    fn burn_layer_norm(x: Tensor<2>, gain: Tensor<1>) -> Tensor<2> {
        let centred = x.clone() - x.mean_dim(1);
        let var = (centred.clone() * centred.clone()).mean_dim(1);
        centred / (var + 1e-5).sqrt() * gain.unsqueeze()
    }

    /// The exact GELU from burn's `erf`, whose autodiff derivative is exact.
    fn burn_erf_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
        x.clone() * ((x / std::f32::consts::SQRT_2).erf() + 1.0) * 0.5
    }

    /// The embedding from burn's `select` and a broadcast add.
    fn burn_embed(tokens: Tensor<2, Int>, wte: Tensor<2>, wpe: Tensor<2>) -> Tensor<3> {
        let [batch, time] = tokens.dims();
        let [_, width] = wte.dims();
        let rows = wte.select(0, tokens.reshape([batch * time]));
        rows.reshape([batch, time, width])
            + wpe.slice(burn::tensor::s![0..time, ..]).unsqueeze::<3>()
    }

    #[test]
    fn layer_norm_matches_burn() {
        for device in devices() {
            let x = random([37, 24], 1, 3.0, &device)
                .add_scalar(0.5)
                .require_grad();
            let gain = random([24], 2, 1.0, &device).require_grad();
            let ours = layer_norm(x.clone(), gain.clone());
            let reference = burn_layer_norm(x.clone(), gain.clone());
            assert_same(ours, reference, 1e-5, |g| {
                vec![
                    ("layer norm input gradient", flat(x.grad(g))),
                    ("layer norm gain gradient", flat(gain.grad(g))),
                ]
            });
        }
    }

    /// The value against burn's `gelu`; the gradient against the erf formula's (burn-ndarray's
    /// `gelu` differentiates the tanh approximation, 1e-3 off) and, on burn-flex, whose
    /// derivative is exact, against `gelu`'s too.
    #[test]
    fn gelu_matches_burn() {
        for device in devices() {
            let x = random([37, 24], 3, 4.0, &device).require_grad();
            let ours = gelu(x.clone());
            assert_close(ours.clone(), activation::gelu(x.clone()), 1e-5, "gelu");
            let of = |g: &Gradients| vec![("gelu input gradient", flat(x.grad(g)))];
            assert_same(ours.clone(), burn_erf_gelu(x.clone()), 1e-5, of);
            if device == Device::flex().autodiff() {
                assert_same(gelu(x.clone()), activation::gelu(x.clone()), 1e-5, of);
            }
            let three_d = random([3, 5, 7], 4, 4.0, &device);
            let want = activation::gelu(three_d.clone());
            assert_close(gelu(three_d), want, 1e-5, "gelu, 3-D");
        }
    }

    #[test]
    fn embed_matches_select() {
        for device in devices() {
            let ids = tokens([5, 7], 11, 5, &device);
            let wte = random([11, 24], 6, 1.0, &device).require_grad();
            let wpe = random([9, 24], 7, 1.0, &device).require_grad();
            let ours = embed(ids.clone(), wte.clone(), wpe.clone());
            let reference = burn_embed(ids, wte.clone(), wpe.clone());
            assert_same(ours, reference, 1e-5, |g| {
                vec![
                    ("wte gradient", flat(wte.grad(g))),
                    ("wpe gradient", flat(wpe.grad(g))),
                ]
            });
        }
    }

    /// Against burn's `matmul`, with a row-major weight and with a transposed view (tied
    /// embeddings), odd sizes and more rows than one tile.
    #[test]
    fn matmul_matches_burn() {
        for device in devices() {
            for rows in [37, 150] {
                let x = random([rows, 24], 8, 1.0, &device).require_grad();
                let w = random([24, 40], 9, 1.0, &device).require_grad();
                let ours = matmul(x.clone(), w.clone());
                assert_same(ours, x.clone().matmul(w.clone()), 1e-5, |g| {
                    vec![
                        ("matmul input gradient", flat(x.grad(g))),
                        ("matmul weight gradient", flat(w.grad(g))),
                    ]
                });
                let table = random([40, 24], 10, 1.0, &device).require_grad();
                let ours = matmul(x.clone(), table.clone().transpose());
                let reference = x.clone().matmul(table.clone().transpose());
                assert_same(ours, reference, 1e-5, |g| {
                    vec![
                        ("tied input gradient", flat(x.grad(g))),
                        ("tied table gradient", flat(table.grad(g))),
                    ]
                });
            }
        }
    }

    /// Without autodiff the extension runs the backend implementations directly.
    #[test]
    fn inference_without_autodiff() {
        for device in devices() {
            let device = device.without_autodiff();
            let x = random([37, 24], 11, 2.0, &device);
            let gain = random([24], 12, 1.0, &device);
            let want = burn_layer_norm(x.clone(), gain.clone());
            assert_close(layer_norm(x.clone(), gain), want, 1e-5, "layer norm");
            assert_close(gelu(x.clone()), activation::gelu(x.clone()), 1e-5, "gelu");
            let w = random([24, 10], 13, 1.0, &device);
            assert_close(matmul(x.clone(), w.clone()), x.matmul(w), 1e-5, "matmul");
            let ids = tokens([3, 4], 6, 14, &device);
            let (wte, wpe) = (
                random([6, 24], 15, 1.0, &device),
                random([4, 24], 16, 1.0, &device),
            );
            let want = burn_embed(ids.clone(), wte.clone(), wpe.clone());
            assert_close(embed(ids, wte, wpe), want, 1e-5, "embed");
        }
    }

    /// The GPT's chain of these operations (embedding, LayerNorm, MLP with GELU, tied output
    /// layer) at its step's 768 rows: output and every gradient bit for bit the same in pools
    /// of 1 and 3 threads.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let run = |device: &Device| {
            let ids = tokens([12, 64], 65, 17, device);
            let wte = random([65, 40], 18, 1.0, device).require_grad();
            let wpe = random([64, 40], 19, 1.0, device).require_grad();
            let gain = random([40], 20, 1.0, device).require_grad();
            let w_up = random([40, 160], 21, 0.3, device).require_grad();
            let w_down = random([160, 40], 22, 0.3, device).require_grad();
            let h = embed(ids, wte.clone(), wpe.clone()).reshape([768, 40]);
            let mlp = matmul(
                gelu(matmul(layer_norm(h.clone(), gain.clone()), w_up.clone())),
                w_down.clone(),
            );
            let logits = matmul(h + mlp, wte.clone().transpose());
            let probe = random(logits.dims(), 23, 1.0, device);
            let grads = (logits.clone() * probe).sum().backward();
            let bits =
                |t: Tensor<1>| -> Vec<u32> { values(t).into_iter().map(f32::to_bits).collect() };
            [
                bits(logits.reshape([-1])),
                bits(flat(wte.grad(&grads))),
                bits(flat(wpe.grad(&grads))),
                bits(flat(gain.grad(&grads))),
                bits(flat(w_up.grad(&grads))),
                bits(flat(w_down.grad(&grads))),
            ]
        };
        for device in devices() {
            let in_pool = |threads| crate::test_data::in_pool(threads, || run(&device));
            assert!(in_pool(1) == in_pool(3), "{device:?}: 1 and 3 threads");
        }
    }

    /// bf16 tensors on burn-flex: results and gradients in bf16, within bf16's precision of the
    /// f32 operations on the same (rounded) inputs.
    #[test]
    fn bf16_tensors_give_the_f32_results_within_bf16_precision() {
        let device = Device::flex().autodiff();
        let bf16 = |t: Tensor<2>| t.cast(DType::BF16).detach().require_grad();
        let f32_of = |t: &Tensor<2>| t.clone().detach().cast(DType::F32).detach().require_grad();
        // bf16 keeps 8 significant bits: one rounding of the result is within 2^-8 of it, and
        // the gradients see the probe's gradient rounded too.
        let tolerance = 1.0 / 64.0;
        let check = |ours: Tensor<2>, reference: Tensor<2>, inputs: Vec<(Tensor<2>, Tensor<2>)>| {
            assert_eq!(ours.dtype(), DType::BF16);
            assert_close(ours.clone(), reference.clone(), tolerance, "bf16 value");
            let probe = random(ours.dims(), 24, 1.0, &device);
            let grads = (ours.cast(DType::F32) * probe.clone()).sum().backward();
            let ref_grads = (reference * probe).sum().backward();
            for (half, wide) in inputs {
                let got = half.grad(&grads).expect("a gradient");
                assert_eq!(got.dtype(), DType::BF16, "gradient dtype");
                let want = wide.grad(&ref_grads).expect("a gradient");
                assert_close(got, want, tolerance, "bf16 gradient");
            }
        };

        let x = bf16(random([37, 24], 25, 2.0, &device));
        let gain = bf16(random([1, 24], 26, 1.0, &device));
        let (x32, gain32) = (f32_of(&x), f32_of(&gain));
        let ours = layer_norm(x.clone(), gain.clone().reshape([24]));
        let reference = layer_norm(x32.clone(), gain32.clone().reshape([24]));
        check(
            ours,
            reference,
            vec![(x.clone(), x32.clone()), (gain, gain32)],
        );

        check(
            gelu(x.clone()),
            gelu(x32.clone()),
            vec![(x.clone(), x32.clone())],
        );

        let w = bf16(random([24, 40], 27, 1.0, &device));
        let w32 = f32_of(&w);
        let ours = matmul(x.clone(), w.clone());
        let reference = matmul(x32.clone(), w32.clone());
        check(ours, reference, vec![(x, x32), (w.clone(), w32.clone())]);

        // The tied table: the transposed weight, `[40, 24]`.
        let ids = tokens([5, 7], 40, 28, &device);
        let wpe = bf16(random([9, 24], 29, 1.0, &device));
        let wpe32 = f32_of(&wpe);
        let table = w.clone().transpose().detach().require_grad();
        let table32 = f32_of(&table);
        let ours = embed(ids.clone(), table.clone(), wpe.clone()).reshape([35, 24]);
        let reference = embed(ids, table32.clone(), wpe32.clone()).reshape([35, 24]);
        check(ours, reference, vec![(table, table32), (wpe, wpe32)]);
    }

    /// Times the kernels at the GPT step's shapes (batch 12 x context 64 = 768 rows, width 128,
    /// MLP 512, vocabulary 65), forward and backward, at 1 and 2 threads:
    /// `cargo test --workspace time_gpt_kernels -- --ignored --nocapture` (test builds compile
    /// this crate at opt-level 1, without the vectoriser: the release build is faster).
    #[test]
    #[ignore]
    fn time_gpt_kernels() {
        use std::time::Instant;

        use crate::kernels::linear::{self, LinearShape};
        use crate::kernels::test_values;
        use crate::kernels::values::Values;
        use crate::kernels::{embedding, gelu as gelu_kernel, layer_norm as ln};

        let (rows, width, hidden, vocab) = (768, 128, 512, 65);
        let x = test_values(rows * width, 1);
        let gain = test_values(width, 2);
        let dy = test_values(rows * width, 3);
        let h = test_values(rows * hidden, 4);
        let dh = test_values(rows * hidden, 5);
        let w = test_values(width * hidden, 6);
        let wte = test_values(vocab * width, 7);
        let wpe = test_values(64 * width, 8);
        let ids: Vec<usize> = (0..rows).map(|i| (i * 7 + i / 5) % vocab).collect();
        let embed_shape = embedding::EmbedShape {
            batch: 12,
            time: 64,
            vocab,
            context: 64,
            width,
        };
        let product = LinearShape {
            batch: rows,
            inputs: width,
            outputs: hidden,
        };
        let reps = 200;
        let time = |f: &mut dyn FnMut()| {
            for _ in 0..5 {
                f();
            }
            let start = Instant::now();
            for _ in 0..reps {
                f();
            }
            start.elapsed().as_secs_f64() * 1e6 / reps as f64
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let norm = ln::forward(Values::from(&x), Values::from(&gain), width);
                let timings = [
                    (
                        "layer norm fwd [768, 128]",
                        time(&mut || {
                            std::hint::black_box(ln::forward(
                                Values::from(&x),
                                Values::from(&gain),
                                width,
                            ));
                        }),
                    ),
                    (
                        "layer norm bwd",
                        time(&mut || {
                            std::hint::black_box(ln::backward(
                                Values::from(&x),
                                Values::from(&gain),
                                &norm.stats,
                                Values::from(&dy),
                                width,
                                true,
                            ));
                        }),
                    ),
                    (
                        "gelu fwd [768, 512]",
                        time(&mut || {
                            std::hint::black_box(gelu_kernel::forward(Values::from(&h)));
                        }),
                    ),
                    (
                        "gelu bwd (in place)",
                        time(&mut || {
                            let mut g = dh.clone();
                            gelu_kernel::backward_in_place(Values::from(&h), &mut g);
                            std::hint::black_box(g);
                        }),
                    ),
                    (
                        "matmul fwd [768, 128] x [128, 512]",
                        time(&mut || {
                            std::hint::black_box(linear::forward_without_bias(&x, &w, product));
                        }),
                    ),
                    (
                        "matmul bwd (dx, dw)",
                        time(&mut || {
                            std::hint::black_box(linear::backward_without_bias(
                                &x, &w, &h, product, true,
                            ));
                        }),
                    ),
                    (
                        "embed fwd [12, 64] x 128",
                        time(&mut || {
                            std::hint::black_box(embedding::forward(
                                &ids,
                                Values::from(&wte),
                                Values::from(&wpe),
                                embed_shape,
                            ));
                        }),
                    ),
                    (
                        "embed bwd",
                        time(&mut || {
                            std::hint::black_box(embedding::backward(
                                &ids,
                                Values::from(&dy),
                                embed_shape,
                            ));
                        }),
                    ),
                ];
                for (what, us) in timings {
                    eprintln!("{threads} thread(s): {what}: {us:.1} us");
                }
            });
        }
    }

    #[test]
    #[should_panic(expected = "embed: token 11 at [0, 3] is not below the vocabulary size 11")]
    fn a_token_outside_the_vocabulary_panics() {
        let device = Device::flex();
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 11], [1, 4]), &device);
        embed(
            ids,
            random([11, 8], 30, 1.0, &device),
            random([4, 8], 31, 1.0, &device),
        );
    }

    #[test]
    #[should_panic(expected = "layer_norm: gain for rows of width 24")]
    fn a_gain_of_the_wrong_size_panics() {
        let device = Device::flex();
        layer_norm(
            random([3, 24], 32, 1.0, &device),
            random([23], 33, 1.0, &device),
        );
    }

    #[test]
    #[should_panic(expected = "embed: 9 positions for a context of 8")]
    fn more_positions_than_the_context_panics() {
        let device = Device::flex();
        let ids = tokens([2, 9], 5, 34, &device);
        embed(
            ids,
            random([5, 8], 35, 1.0, &device),
            random([8, 8], 36, 1.0, &device),
        );
    }
}
