//! CPU kernels for the built-in models: dense layer (bias, optional fused ReLU), valid stride-1
//! convolution (bias, optional fused ReLU) and 2x2 stride-2 max-pool, forward and backward, on
//! burn-ndarray and burn-flex.
//!
//! They reach burn as a backend extension ([`extension::CnnBackend`]): one implementation per
//! CPU backend and one for `Autodiff<B, C>` whose backward pass calls the gradient kernels here,
//! so a model keeps burn's `Linear` and `Conv2d` parameters (same names and shapes) and only its
//! forward changes. Inside, a kernel works on plain slices (f32, or burn-flex's f16 and bf16,
//! widened where they are used: the `values` module) and packed single-threaded f32 GEMMs (the `gemm`
//! crate): for a convolution, im2col and one GEMM per sample, rayon over chunks of samples; for
//! a dense layer, one GEMM per output tile, rayon over the tiles.
//!
//! Results do not depend on the thread count. Convolutions: the forward pass and the input
//! gradient are computed sample by sample, and the reductions over the batch (weight and bias
//! gradients) are summed over fixed chunks of [`SAMPLES_PER_TASK`] samples, then chunk by chunk in order.
//! Dense layers: every output element's whole sum lies inside one tile's GEMM, and the tile sizes
//! follow from the shapes alone. The rounding still depends on the GEMM kernel that `gemm` picks
//! for the CPU (AVX2, AVX-512...).

mod conv;
mod conv_pool;
pub(crate) mod convert;
mod embedding;
pub mod extension;
mod gelu;
pub mod gpt_ops;
mod layer_norm;
mod linear;
mod loss;
mod matmul;
mod pool;
pub(crate) mod values;

use std::mem::MaybeUninit;

use burn::backend::Dispatch;
use burn::prelude::*;
use burn::tensor::DType;

use extension::{CnnBackend, DenseBackend, LossBackend};

/// Samples per rayon task, and per partial sum of the weight and bias gradients. A constant: the
/// order of every sum must not depend on the thread count.
pub const SAMPLES_PER_TASK: usize = 4;

/// Elements per rayon task of an element-wise pass (GELU, rounding to a half format, the
/// optimizers' update): each element is computed on its own, so the split changes no result.
pub const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Large outputs are allocated uninitialised and each rayon task initialises its own chunk
/// ([`init`]) right before writing it: zeroing them first on the calling thread would be serial
/// work, with all the page faults on one thread.
pub(crate) fn uninit<T>(len: usize) -> Box<[MaybeUninit<T>]> {
    Box::new_uninit_slice(len)
}

/// Fills `chunk` with `value` and hands it back initialised.
pub(crate) fn init<T: Copy>(chunk: &mut [MaybeUninit<T>], value: T) -> &mut [T] {
    chunk.fill(MaybeUninit::new(value));
    // SAFETY: every element was just written; `MaybeUninit<T>` has the layout of `T`.
    unsafe { &mut *(chunk as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// # Safety
/// Every element of `buffer` must have been initialised (by [`init`]).
pub(crate) unsafe fn assume_init<T>(buffer: Box<[MaybeUninit<T>]>) -> Vec<T> {
    // SAFETY: the caller guarantees that every element is initialised.
    unsafe { buffer.assume_init() }.into_vec()
}

/// A `Vec` of `len` elements built in chunks of `chunk` on the pool: `fill(i, part)` writes
/// chunk `i` (elements `i * chunk ..`), which starts out as `T::default()`, and returns a value:
/// those come back in chunk order. No serial zeroing pass, and each chunk's pages are touched by
/// the thread that writes them.
pub(crate) fn build_in_parallel_with<T, F, R>(len: usize, chunk: usize, fill: F) -> (Vec<T>, Vec<R>)
where
    T: Copy + Default + Send + Sync,
    F: Fn(usize, &mut [T]) -> R + Sync,
    R: Send,
{
    use rayon::prelude::*;
    let mut buffer = uninit(len);
    let results = buffer
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, part)| fill(i, init(part, T::default())))
        .collect();
    // SAFETY: every chunk went through `init`.
    (unsafe { assume_init(buffer) }, results)
}

/// [`build_in_parallel_with`] for a `fill` that writes every element of its chunk: the chunks are
/// handed over uninitialised, without the zeroing pass (a memory pass as long as the writing
/// one, a measurable part of an emulated half-precision MLP step).
///
/// # Safety
/// `fill(i, part)` must initialise every element of `part`.
pub(crate) unsafe fn build_in_parallel_uninit<T, F>(len: usize, chunk: usize, fill: F) -> Vec<T>
where
    T: Send + Sync,
    F: Fn(usize, &mut [MaybeUninit<T>]) + Sync,
{
    use rayon::prelude::*;
    let mut buffer = uninit(len);
    buffer
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, part)| fill(i, part));
    // SAFETY: the caller's contract: every chunk was initialised by `fill`.
    unsafe { assume_init(buffer) }
}

/// ReLU where the values lie: the kernels' fused epilogue.
pub(crate) fn relu_in_place(y: &mut [f32]) {
    for v in y {
        // A select, not a branch; NaN stays NaN, like burn's ReLU.
        *v = if *v < 0.0 { 0.0 } else { *v };
    }
}

/// Whether the kernels run for tensors of this dtype on this device (f32 on burn-ndarray; f32,
/// f16 and bf16 on burn-flex; with or without autodiff).
#[allow(deprecated)] // burn-ndarray is deprecated upstream but still a backend here
pub fn supported(device: &Device, dtype: DType) -> bool {
    match dtype {
        DType::F32 => *device == Device::ndarray() || *device == Device::flex(),
        DType::F16 | DType::BF16 => *device == Device::flex(),
        _ => false,
    }
}

/// Valid (no padding), stride-1 2-D convolution of `x: [n, c_in, h, w]` by a square kernel
/// `weight: [c_out, c_in, k, k]` plus `bias: [c_out]`, then ReLU when `relu`:
/// `[n, c_out, h - k + 1, w - k + 1]`. The same computation as burn's `Conv2d` with its default
/// configuration.
///
/// # Panics
/// On shapes that do not fit, on tensors that are not f32, on a device other than ndarray/flex.
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, relu: bool) -> Tensor<4> {
    check_conv(&x, &weight, &bias);
    Tensor::from_dispatch(<Dispatch as CnnBackend>::conv2d_valid(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        relu,
    ))
}

/// `max_pool2x2(conv2d(x, weight, bias, true))` in one pass per sample: the convolution's output
/// never becomes a tensor, and the backward pass needs only the pooled output and one byte per
/// pooled element. The same values and gradients as the two operations (the same GEMMs and sums;
/// only the sign of a zero output can differ).
pub fn conv2d_relu_pool(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>) -> Tensor<4> {
    check_conv(&x, &weight, &bias);
    Tensor::from_dispatch(<Dispatch as CnnBackend>::conv2d_relu_pool(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

fn check_conv(x: &Tensor<4>, weight: &Tensor<4>, bias: &Tensor<1>) {
    let [_, c_in, h, w] = x.dims();
    let [c_out, w_in, kh, kw] = weight.dims();
    assert_eq!(
        w_in,
        c_in,
        "conv2d: weight {:?} for {c_in} input channels",
        weight.dims()
    );
    assert!(
        kh == kw && kh >= 1,
        "conv2d: the kernel must be square, got {kh}x{kw}"
    );
    assert!(
        kh <= h && kh <= w,
        "conv2d: a {kh}x{kh} kernel does not fit {h}x{w} inputs"
    );
    assert_eq!(bias.dims(), [c_out], "conv2d: bias size");
}

/// Dense layer `x · weight + bias` for `x: [batch, inputs]`, `weight: [inputs, outputs]` and
/// `bias: [outputs]` (burn's `Linear` layout), then ReLU when `relu`: `[batch, outputs]`. The
/// same computation as burn's `Linear` (+ `Relu`).
///
/// # Panics
/// On shapes that do not fit, on tensors that are not f32, on a device other than ndarray/flex.
pub fn linear(x: Tensor<2>, weight: Tensor<2>, bias: Tensor<1>, relu: bool) -> Tensor<2> {
    let [_, inputs] = x.dims();
    let [w_in, outputs] = weight.dims();
    assert_eq!(
        w_in,
        inputs,
        "linear: weight {:?} for {inputs} inputs",
        weight.dims()
    );
    assert_eq!(bias.dims(), [outputs], "linear: bias size");
    Tensor::from_dispatch(<Dispatch as DenseBackend>::linear(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        relu,
    ))
}

/// The softmax cross-entropy of `logits: [n, classes]` against the class indices `targets: [n]`,
/// summed over the rows and divided by `divisor` (`n` gives burn's `CrossEntropyLoss`, the
/// mean): a `[1]` tensor. A row whose target is negative (PyTorch's `ignore_index`: -1, -100)
/// adds nothing and gets a zero gradient; `divisor` then counts the other rows
/// ([`counted_targets`]), and with none counted the loss is 0. One operation, forward and
/// backward, on f32 logits where the kernels run ([`supported`]); burn's operations, to the same
/// effect, elsewhere.
///
/// # Panics
/// When `targets` is not one class a row, or a target is not below `classes`.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>, divisor: f32) -> Tensor<1> {
    let [rows, _] = logits.dims();
    assert_eq!(targets.dims(), [rows], "cross-entropy: one target a row");
    if logits.dtype() != DType::F32 || !supported(&logits.device(), DType::F32) {
        return cross_entropy_with_burn_ops(logits, targets, divisor);
    }
    Tensor::from_dispatch(<Dispatch as LossBackend>::cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
        divisor,
    ))
}

/// 2x2 max-pool with stride 2 of `x: [n, c, h, w]`: `[n, c, h / 2, w / 2]` (floor, like burn's
/// `MaxPool2d`). On ties the gradient goes to the first maximum of the window in row-major order.
pub fn max_pool2x2(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as CnnBackend>::max_pool2x2(x.into_dispatch()))
}

/// `x · weight` for `x: [rows, inputs]` and `weight: [inputs, outputs]` (burn's `Linear`
/// layout), without bias: `[rows, outputs]`. The dense layer's tiled GEMMs, so the weight
/// gradient's sums over the rows do not depend on the thread count. `weight` may be a transposed
/// view (tied embeddings: `matmul(h, wte.transpose())`); it is then read through a copy.
///
/// # Panics
/// On shapes that do not fit, on tensors the kernels do not run on ([`supported`]).
pub fn matmul(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    let [_, inputs] = x.dims();
    let [w_in, _] = weight.dims();
    assert_eq!(
        w_in,
        inputs,
        "matmul: weight {:?} for {inputs} inputs",
        weight.dims()
    );
    Tensor::from_dispatch(<Dispatch as DenseBackend>::matmul(
        x.into_dispatch(),
        weight.into_dispatch(),
    ))
}

/// LayerNorm of each row of `x: [rows, width]` with `gain: [width]` and no bias term: eps 1e-5,
/// biased variance, as PyTorch's `nn.LayerNorm(width, bias=False)`. The gain's gradient is
/// summed over fixed chunks of rows, then chunk by chunk in order.
///
/// # Panics
/// When `gain` is not `width` long or `width` is 0, on tensors the kernels do not run on.
pub fn layer_norm(x: Tensor<2>, gain: Tensor<1>) -> Tensor<2> {
    let [_, width] = x.dims();
    assert!(width > 0, "layer_norm: rows of width 0");
    assert_eq!(
        gain.dims(),
        [width],
        "layer_norm: gain for rows of width {width}"
    );
    Tensor::from_dispatch(<Dispatch as gpt_ops::GptOpsBackend>::layer_norm(
        x.into_dispatch(),
        gain.into_dispatch(),
    ))
}

/// The exact GELU, `x · (1 + erf(x / √2)) / 2` (PyTorch's default `F.gelu`, not the tanh
/// approximation), element by element, with its exact derivative in the backward pass.
///
/// # Panics
/// On tensors the kernels do not run on ([`supported`]).
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as gpt_ops::GptOpsBackend>::gelu(
        x.into_dispatch(),
    ))
}

/// Token plus position embedding: `out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]` for
/// `tokens: [batch, time]` (ids below `vocab`), `wte: [vocab, width]` and
/// `wpe: [context, width]` with `time <= context`: `[batch, time, width]`. The gradients of
/// `wte` (a scatter-add over the tokens) and `wpe` (a sum over the batch) are summed in position
/// order; `tokens` gets none.
///
/// # Panics
/// On shapes that do not fit, on a token id not below `vocab`, on tensors the kernels do not
/// run on.
pub fn embed(tokens: Tensor<2, Int>, wte: Tensor<2>, wpe: Tensor<2>) -> Tensor<3> {
    let [_, time] = tokens.dims();
    let [_, width] = wte.dims();
    let [context, wpe_width] = wpe.dims();
    assert_eq!(
        wpe_width,
        width,
        "embed: wpe {:?} for wte rows of width {width}",
        wpe.dims()
    );
    assert!(
        time <= context,
        "embed: {time} positions for a context of {context}"
    );
    Tensor::from_dispatch(<Dispatch as gpt_ops::GptOpsBackend>::embed(
        tokens.into_dispatch(),
        wte.into_dispatch(),
        wpe.into_dispatch(),
    ))
}

mod attention;
pub mod attention_ops;

/// Causal multi-head self-attention (nanoGPT's, PyTorch's `scaled_dot_product_attention` with
/// `is_causal`) of `qkv: [batch, time, 3 * width]`, the query, key and value projections side by
/// side, each cut into `heads` heads of `width / heads` columns: for every sample and head,
/// `softmax(q kᵀ / sqrt(width / heads))` over the keys up to the query's own position, times the
/// values; the heads side by side again: `[batch, time, width]`. One operation, forward and
/// backward.
///
/// # Panics
/// When the last dimension is not `3 * width` with `width` a multiple of `heads`, on tensors that
/// are not f32 (f16 and bf16 too on flex), on a device other than ndarray/flex.
pub fn causal_attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
    // Refuses columns that are not q, k and v of `heads` equal heads.
    attention::AttentionShape::of_qkv(qkv.dims(), heads);
    Tensor::from_dispatch(
        <Dispatch as attention_ops::AttentionBackend>::causal_attention(qkv.into_dispatch(), heads),
    )
}

/// [`causal_attention`] with dropout on the attention probabilities: `mask: [batch, heads,
/// time, time]` holds 0 or the factor that keeps each (an f32 constant, without gradient).
pub fn causal_attention_masked(qkv: Tensor<3>, mask: Tensor<4>, heads: usize) -> Tensor<3> {
    let s = attention::AttentionShape::of_qkv(qkv.dims(), heads);
    assert_eq!(
        mask.dims(),
        [s.batch, heads, s.time, s.time],
        "causal attention: mask shape"
    );
    Tensor::from_dispatch(
        <Dispatch as attention_ops::AttentionBackend>::causal_attention_masked(
            qkv.into_dispatch(),
            mask.into_dispatch(),
            heads,
        ),
    )
}

/// The rows [`cross_entropy`] counts among these targets: the non-negative ones.
pub fn counted_targets(targets: &[i64]) -> usize {
    targets.iter().filter(|&&t| t >= 0).count()
}

/// [`cross_entropy`] in burn's operations, for the logits its kernel does not take.
fn cross_entropy_with_burn_ops(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    divisor: f32,
) -> Tensor<1> {
    let [rows, _] = logits.dims();
    let ignored = targets.clone().lower_elem(0);
    // An ignored row gathers class 0, then its loss is replaced by 0: replaced, not multiplied,
    // so that a NaN among its logits does not reach the loss.
    let classes = targets.clamp_min(0).reshape([rows, 1]);
    let picked = burn::tensor::activation::log_softmax(logits, 1)
        .gather(1, classes)
        .reshape([rows]);
    let sum = picked.mask_fill(ignored, 0.0).sum().neg();
    // The divisor is 0 when no row counts: the sum, 0, is then the loss, as in the kernel.
    if divisor == 0.0 {
        sum
    } else {
        sum.div_scalar(divisor)
    }
}

/// Deterministic values in [-1, 1] for the kernels' tests (xorshift: no generator shared with
/// other tests).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::nn::LinearConfig;
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::pool::MaxPool2dConfig;
    use burn::tensor::activation::relu;
    use burn::tensor::{Distribution, Gradients};

    use super::*;
    use crate::test_data::uniform;

    #[allow(deprecated)]
    fn devices() -> [Device; 2] {
        [Device::ndarray().autodiff(), Device::flex().autodiff()]
    }

    fn assert_close<const D: usize>(got: Tensor<D>, want: Tensor<D>, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let got = got.into_data().try_to_vec::<f32>().unwrap();
        let want = want.into_data().try_to_vec::<f32>().unwrap();
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * scale.max(w.abs()),
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }

    /// Backward from `ours` and from burn's `reference` through the same `probe`: each of the
    /// gradients `of` names (flattened, see [`flat`]) is close to the reference's.
    fn assert_same_gradients<const D: usize>(
        ours: Tensor<D>,
        reference: Tensor<D>,
        probe: Tensor<D>,
        of: impl Fn(&Gradients) -> Vec<(&'static str, Tensor<1>)>,
    ) {
        let ref_grads = (reference * probe.clone()).sum().backward();
        let grads = (ours * probe).sum().backward();
        for ((what, got), (_, want)) in of(&grads).into_iter().zip(of(&ref_grads)) {
            assert_close(got, want, what);
        }
    }

    /// A gradient that must be there, as one row of its values.
    fn flat<const D: usize>(grad: Option<Tensor<D>>) -> Tensor<1> {
        grad.expect("a gradient").reshape([-1])
    }

    /// Forward output and the gradients for input, weight and bias against burn's `Conv2d`, with
    /// a batch that is not a multiple of `SAMPLES_PER_TASK`.
    #[test]
    fn conv2d_matches_burn_on_both_backends() {
        for device in devices() {
            device.seed(7);
            for (fused_relu, batch) in [(false, 7), (true, 2 * SAMPLES_PER_TASK + 3)] {
                let conv = Conv2dConfig::new([3, 5], [3, 3]).init(&device);
                let x = Tensor::<4>::random([batch, 3, 9, 8], Distribution::Default, &device)
                    .require_grad();
                let probe = Tensor::<4>::random([batch, 5, 7, 6], Distribution::Default, &device);

                let reference = conv.forward(x.clone());
                let reference = if fused_relu {
                    relu(reference)
                } else {
                    reference
                };
                let ours = conv2d(
                    x.clone(),
                    conv.weight.val(),
                    conv.bias.as_ref().unwrap().val(),
                    fused_relu,
                );
                assert_close(ours.clone(), reference.clone(), "conv2d output");

                let bias = conv.bias.as_ref().unwrap();
                assert_same_gradients(ours, reference, probe, |g| {
                    vec![
                        ("input gradient", flat(x.grad(g))),
                        ("weight gradient", flat(conv.weight.grad(g))),
                        ("bias gradient", flat(bias.grad(g))),
                    ]
                });
            }
        }
    }

    /// Half-precision tensors on flex: the f32 kernel on the widened values, every result rounded
    /// back to the input's format, and the gradients in the format of their tensor.
    #[test]
    fn half_tensors_compute_in_f32_and_come_back_in_their_format() {
        let device = Device::flex().autodiff();
        for dtype in [DType::F16, DType::BF16] {
            let half = |t: Tensor<4>| t.cast(dtype).detach().require_grad();
            let x = half(uniform([5, 2, 8, 8], 1, &device));
            let weight = half(uniform([3, 2, 3, 3], 2, &device));
            let bias = uniform([3], 3, &device).cast(dtype).detach().require_grad();
            let ours = conv2d_relu_pool(x.clone(), weight.clone(), bias.clone());
            assert_eq!(ours.dtype(), dtype);

            let wide = |t: &Tensor<4>| t.clone().detach().cast(DType::F32).detach().require_grad();
            let (x32, weight32) = (wide(&x), wide(&weight));
            let bias32 = bias
                .clone()
                .detach()
                .cast(DType::F32)
                .detach()
                .require_grad();
            let reference = conv2d_relu_pool(x32.clone(), weight32.clone(), bias32.clone());
            let same = |a: Tensor<4>, b: Tensor<4>, what: &str| {
                assert_eq!(a.dtype(), dtype, "{what}");
                let a = a.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap();
                let b = b
                    .cast(dtype)
                    .cast(DType::F32)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                assert_eq!(a, b, "{what}");
            };
            // Values of the format, so that the incoming gradient is the same in both passes.
            let probe = uniform(ours.dims(), 4, &device)
                .cast(dtype)
                .cast(DType::F32);
            let grads = (ours.clone().cast(DType::F32) * probe.clone())
                .sum()
                .backward();
            let ref_grads = (reference.clone() * probe).sum().backward();
            same(ours, reference, "output");
            same(x.grad(&grads).unwrap(), x32.grad(&ref_grads).unwrap(), "dx");
            same(
                weight.grad(&grads).unwrap(),
                weight32.grad(&ref_grads).unwrap(),
                "dw",
            );
            let db = bias.grad(&grads).unwrap();
            assert_eq!(db.dtype(), dtype);
        }
    }

    /// The dense kernel on half-precision tensors: the f32 kernel on the widened values, rounded.
    #[test]
    fn linear_on_half_tensors_computes_in_f32_and_rounds() {
        let device = Device::flex().autodiff();
        for dtype in [DType::F16, DType::BF16] {
            let leaf = |t: Tensor<2>| t.cast(dtype).detach().require_grad();
            // Several tiles of every product, with partial ones at the edges.
            let (batch, inputs, outputs) = (130, 135, 140);
            let x = leaf(uniform([batch, inputs], 5, &device));
            let w = leaf(uniform([inputs, outputs], 6, &device));
            let b = uniform([outputs], 7, &device).cast(dtype);
            let ours = linear(x.clone(), w.clone(), b.clone(), true);
            assert_eq!(ours.dtype(), dtype);
            let wide = |t: &Tensor<2>| t.clone().detach().cast(DType::F32).detach().require_grad();
            let (x32, w32) = (wide(&x), wide(&w));
            let reference = linear(x32.clone(), w32.clone(), b.cast(DType::F32), true);
            let rounded = |t: Tensor<2>| t.cast(dtype).cast(DType::F32).into_data();
            let probe = uniform([batch, outputs], 8, &device)
                .cast(dtype)
                .cast(DType::F32);
            let grads = (ours.clone().cast(DType::F32) * probe.clone())
                .sum()
                .backward();
            let ref_grads = (reference.clone() * probe).sum().backward();
            assert_eq!(rounded(ours), rounded(reference));
            let (dx, dw) = (x.grad(&grads).unwrap(), w.grad(&grads).unwrap());
            assert_eq!((dx.dtype(), dw.dtype()), (dtype, dtype));
            assert_eq!(rounded(dx), rounded(x32.grad(&ref_grads).unwrap()));
            assert_eq!(rounded(dw), rounded(w32.grad(&ref_grads).unwrap()));
        }
    }

    /// Forward output and the three gradients against burn's `Linear` (+ ReLU), with shapes that
    /// leave partial tiles on every edge, and a single sample.
    #[test]
    fn linear_matches_burn_on_both_backends() {
        let (rows, cols) = linear::TILE;
        let shapes = [
            (rows + 3, linear::WEIGHT_TILE.0 + 5, cols + 7),
            (1, 13, 10),
            (2 * rows, 2 * cols, 10),
        ];
        for device in devices() {
            device.seed(11);
            for (batch, inputs, outputs) in shapes {
                for fused_relu in [false, true] {
                    let layer = LinearConfig::new(inputs, outputs).init(&device);
                    let x = Tensor::<2>::random([batch, inputs], Distribution::Default, &device)
                        .require_grad();
                    let probe =
                        Tensor::<2>::random([batch, outputs], Distribution::Default, &device);
                    let reference = layer.forward(x.clone());
                    let reference = if fused_relu {
                        relu(reference)
                    } else {
                        reference
                    };
                    let bias = layer.bias.as_ref().unwrap();
                    let ours = linear(x.clone(), layer.weight.val(), bias.val(), fused_relu);
                    assert_close(ours.clone(), reference.clone(), "linear output");

                    assert_same_gradients(ours, reference, probe, |g| {
                        vec![
                            ("linear input gradient", flat(x.grad(g))),
                            ("linear weight gradient", flat(layer.weight.grad(g))),
                            ("linear bias gradient", flat(bias.grad(g))),
                        ]
                    });
                }
            }
        }
    }

    /// Loss and logit gradients against burn's `CrossEntropyLoss`, for the mean (`divisor` the
    /// row count) and a share of a larger step's mean, on both backends, with and without
    /// autodiff.
    #[test]
    fn cross_entropy_matches_burn_on_both_backends() {
        use burn::nn::loss::CrossEntropyLossConfig;
        for device in devices() {
            device.seed(17);
            let (rows, classes) = (37, 10);
            let logits =
                Tensor::<2>::random([rows, classes], Distribution::Normal(0.0, 4.0), &device)
                    .require_grad();
            let labels: Vec<i64> = (0..rows as i64).map(|i| (i * 7) % classes as i64).collect();
            let targets = Tensor::<1, Int>::from_ints(labels.as_slice(), &device);
            let burn_loss = CrossEntropyLossConfig::new().init(&device);
            for divisor in [rows as f32, 128.0] {
                let reference = burn_loss
                    .forward(logits.clone(), targets.clone())
                    .mul_scalar(rows as f32 / divisor);
                let ours = cross_entropy(logits.clone(), targets.clone(), divisor);
                assert_close(ours.clone(), reference.clone(), "cross-entropy");
                let inference =
                    cross_entropy(logits.clone().inner(), targets.clone().inner(), divisor);
                assert_close(
                    inference,
                    reference.clone().inner(),
                    "cross-entropy, no autodiff",
                );
                assert_close(
                    logits.grad(&ours.mul_scalar(3.0).backward()).unwrap(),
                    logits.grad(&reference.mul_scalar(3.0).backward()).unwrap(),
                    "cross-entropy logit gradient",
                );
            }
        }
    }

    /// The first layer of a model: its input needs no gradient, the parameters still get theirs.
    #[test]
    fn linear_on_an_input_without_gradient() {
        for device in devices() {
            let layer = LinearConfig::new(6, 4).init(&device);
            let x = tensor([3, 6], 1, &device);
            let bias = layer.bias.as_ref().unwrap();
            let reference = relu(layer.forward(x.clone())).sum().backward();
            let grads = linear(x, layer.weight.val(), bias.val(), true)
                .sum()
                .backward();
            assert_close(
                layer.weight.grad(&grads).unwrap(),
                layer.weight.grad(&reference).unwrap(),
                "weight gradient",
            );
            assert_close(
                bias.grad(&grads).unwrap(),
                bias.grad(&reference).unwrap(),
                "bias gradient",
            );
        }
    }

    #[test]
    fn max_pool_matches_burn_on_both_backends_with_odd_sizes() {
        for device in devices() {
            device.seed(3);
            let pool = MaxPool2dConfig::new([2, 2]).init();
            for [h, w] in [[13, 13], [8, 6], [7, 10]] {
                let x = Tensor::<4>::random([5, 3, h, w], Distribution::Default, &device)
                    .require_grad();
                let probe =
                    Tensor::<4>::random([5, 3, h / 2, w / 2], Distribution::Default, &device);
                let reference = pool.forward(x.clone());
                let ours = max_pool2x2(x.clone());
                assert_eq!(ours.dims(), [5, 3, h / 2, w / 2]);
                assert_close(ours.clone(), reference.clone(), "max-pool output");
                assert_same_gradients(ours, reference, probe, |g| {
                    vec![("max-pool input gradient", flat(x.grad(g)))]
                });
            }
        }
    }

    /// The fused op against burn's `Conv2d` + ReLU + `MaxPool2d` (odd convolution output: 11x10).
    #[test]
    fn fused_conv_relu_pool_matches_burn_on_both_backends() {
        for device in devices() {
            device.seed(5);
            let conv = Conv2dConfig::new([3, 4], [3, 3]).init(&device);
            let pool = MaxPool2dConfig::new([2, 2]).init();
            let batch = 2 * SAMPLES_PER_TASK + 1;
            let x = Tensor::<4>::random([batch, 3, 13, 12], Distribution::Default, &device)
                .require_grad();
            let probe = Tensor::<4>::random([batch, 4, 5, 5], Distribution::Default, &device);
            let reference = pool.forward(relu(conv.forward(x.clone())));
            let bias = conv.bias.as_ref().unwrap();
            let ours = conv2d_relu_pool(x.clone(), conv.weight.val(), bias.val());
            assert_close(ours.clone(), reference.clone(), "fused output");
            assert_same_gradients(ours, reference, probe, |g| {
                vec![
                    ("fused input gradient", flat(x.grad(g))),
                    ("fused weight gradient", flat(conv.weight.grad(g))),
                    ("fused bias gradient", flat(bias.grad(g))),
                ]
            });
        }
    }

    /// Without autodiff the extension runs the backend implementation directly.
    #[test]
    fn inference_without_autodiff() {
        for device in devices() {
            let device = device.without_autodiff();
            let conv = Conv2dConfig::new([2, 4], [3, 3]).init(&device);
            let x = Tensor::<4>::random([3, 2, 6, 6], Distribution::Default, &device);
            let want = MaxPool2dConfig::new([2, 2])
                .init()
                .forward(relu(conv.forward(x.clone())));
            let got = max_pool2x2(conv2d(
                x.clone(),
                conv.weight.val(),
                conv.bias.as_ref().unwrap().val(),
                true,
            ));
            assert_close(got, want.clone(), "conv-relu-pool without autodiff");
            let bias = conv.bias.as_ref().unwrap().val();
            let fused = conv2d_relu_pool(x, conv.weight.val(), bias);
            assert_close(fused, want, "fused without autodiff");

            let layer = LinearConfig::new(5, 3).init(&device);
            let x = Tensor::<2>::random([4, 5], Distribution::Default, &device);
            let bias = layer.bias.as_ref().unwrap().val();
            let got = linear(x.clone(), layer.weight.val(), bias, true);
            assert_close(got, relu(layer.forward(x)), "linear without autodiff");
        }
    }

    /// Deterministic pseudo-random values: the tests run in parallel and share burn's seeded
    /// generator, so `Tensor::random` would not give the same inputs to two runs.
    fn tensor<const D: usize>(shape: [usize; D], seed: u32, device: &Device) -> Tensor<D> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let len = shape.iter().product();
        let values: Vec<f32> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) - 0.5
            })
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// A two-layer MLP on the dense kernel: output and every gradient are bitwise the same in
    /// rayon pools of 1, 2, 3, 8 and 32 threads. The first sizes give many tiles, with partial
    /// ones; 8 and 32 threads cut them smaller; sums over more than 512 make `gemm`'s blocking
    /// of small products (which the cuts must avoid) differ from that of large ones. The second
    /// sizes' sums are at most 512 deep: 3 and more threads cut the 10-output product and its
    /// weight gradient by rows, into tiles within 64 x 64. The third ones' are 600 deep, where
    /// such cuts would change the sums.
    #[test]
    fn linear_results_do_not_depend_on_the_thread_count() {
        let (rows, cols) = linear::TILE;
        for (batch, inputs, hidden, outputs) in [
            (2 * rows + 5, 5 * cols + 1, 4 * cols + 9, 10),
            (2 * rows, 2 * cols + 44, 2 * cols + 44, 10),
            (2 * rows, 4 * cols + 88, 4 * cols + 88, 10),
        ] {
            one_mlp_at_any_thread_count(batch, inputs, hidden, outputs);
        }
    }

    fn one_mlp_at_any_thread_count(batch: usize, inputs: usize, hidden: usize, outputs: usize) {
        let run = |device: &Device| {
            let x = tensor([batch, inputs], 1, device).require_grad();
            let w1 = tensor([inputs, hidden], 2, device).require_grad();
            let b1 = tensor([hidden], 3, device).require_grad();
            let w2 = tensor([hidden, outputs], 4, device).require_grad();
            let b2 = tensor([outputs], 5, device).require_grad();
            let h = linear(x.clone(), w1.clone(), b1.clone(), true);
            let y = linear(h, w2.clone(), b2.clone(), false);
            let probe = tensor(y.dims(), 6, device);
            let grads = (y.clone() * probe).sum().backward();
            let bits = |t: Tensor<2>| -> Vec<u32> {
                let values = t.into_data().try_to_vec::<f32>().unwrap();
                values.into_iter().map(f32::to_bits).collect()
            };
            [
                bits(y),
                bits(x.grad(&grads).unwrap()),
                bits(w1.grad(&grads).unwrap()),
                bits(w2.grad(&grads).unwrap()),
                bits(b1.grad(&grads).unwrap().reshape([1, hidden])),
                bits(b2.grad(&grads).unwrap().reshape([1, outputs])),
            ]
        };
        for device in devices() {
            let in_pool = |threads| crate::test_data::in_pool(threads, || run(&device));
            let one = in_pool(1);
            for threads in [2, 3, 8, 32] {
                assert!(
                    one == in_pool(threads),
                    "{device:?}, MLP {inputs}-{hidden}-{outputs} at batch {batch}: 1 and \
                     {threads} threads"
                );
            }
        }
    }

    /// The output and every gradient are bitwise the same in rayon pools of 1 and 2 threads.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let run = |device: &Device| {
            let x = tensor([2 * SAMPLES_PER_TASK + 1, 2, 16, 15], 1, device).require_grad();
            let w1 = tensor([6, 2, 3, 3], 2, device).require_grad();
            let b1 = tensor([6], 3, device).require_grad();
            let w2 = tensor([8, 6, 3, 3], 4, device).require_grad();
            let b2 = tensor([8], 5, device).require_grad();
            // The first block on the separate kernels, the second fused.
            let y = max_pool2x2(conv2d(x.clone(), w1.clone(), b1.clone(), true));
            let y = conv2d_relu_pool(y, w2.clone(), b2.clone());
            let probe = tensor(y.dims(), 6, device);
            let grads = (y.clone() * probe).sum().backward();
            let bits = |t: Tensor<4>| -> Vec<u32> {
                let values = t.into_data().try_to_vec::<f32>().unwrap();
                values.into_iter().map(f32::to_bits).collect()
            };
            [
                bits(y),
                bits(x.grad(&grads).unwrap()),
                bits(w1.grad(&grads).unwrap()),
                bits(w2.grad(&grads).unwrap()),
                bits(b1.grad(&grads).unwrap().reshape([1, 1, 1, 6])),
                bits(b2.grad(&grads).unwrap().reshape([1, 1, 1, 8])),
            ]
        };
        for device in devices() {
            let results: Vec<_> = [1, 2]
                .into_iter()
                .map(|threads| crate::test_data::in_pool(threads, || run(&device)))
                .collect();
            assert_eq!(results[0], results[1], "{device:?}");
        }
    }
}
