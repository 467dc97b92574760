//! The kernels as a burn backend extension: one implementation per CPU backend, plus an
//! `Autodiff<B, C>` implementation whose backward pass calls the hand-written gradient kernels.
//!
//! Inside an implementation the tensor is a plain slice of its elements ([`HostSlices`]): f32, or
//! f16 and bf16 on burn-flex; borrowed when the backend's storage is contiguous, copied
//! otherwise; results go back without a copy.
#![allow(deprecated)] // burn-ndarray is deprecated upstream but still a backend here

use std::borrow::Cow;
use std::sync::Arc;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Flex, NdArray, TensorMetadata, backend_extension};
use burn::tensor::{DType, TensorData};
use half::{bf16, f16};

use super::conv::{self, ConvGrads, ConvShape};
use super::linear::{self, LinearGrads, LinearShape};
use super::values::{Buffer, Format, Held, Values};
use super::{conv_pool, loss, pool};

/// Convolution and max-pool kernels for the CNN. Shapes are checked by the wrappers in
/// [`super`]; the operations panic on dtypes that [`HostSlices`] cannot read.
#[backend_extension(NdArray, Flex, Autodiff)]
pub trait CnnBackend: Backend {
    /// Valid (no padding), stride-1 convolution of `x: [n, c_in, h, w]` with
    /// `weight: [c_out, c_in, k, k]` plus `bias: [c_out]`; then ReLU when `relu`.
    fn conv2d_valid(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self>;

    /// 2x2 max-pool with stride 2 of `x: [n, c, h, w]`: `[n, c, h/2, w/2]`.
    fn max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `max_pool2x2(conv2d_valid(x, weight, bias, relu = true))` in one pass per sample.
    fn conv2d_relu_pool(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// The dense-layer kernel for the MLP and the CNN's dense layers. Shapes are checked by the
/// wrapper in [`super`]; the operation panics on dtypes that [`HostSlices`] cannot read.
#[backend_extension(NdArray, Flex, Autodiff)]
pub trait DenseBackend: Backend {
    /// `x · weight + bias` for `x: [batch, inputs]`, `weight: [inputs, outputs]` (burn's
    /// `Linear` layout) and `bias: [outputs]`; then ReLU when `relu`.
    fn linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self>;

    /// `x · weight` for `x: [rows, inputs]` and `weight: [inputs, outputs]` (burn's `Linear`
    /// layout; a transposed view is read through a copy), without bias.
    fn matmul(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The loss of the built-in training loop.
#[backend_extension(NdArray, Flex, Autodiff)]
pub trait LossBackend: Backend {
    /// The softmax cross-entropy of f32 `logits: [n, classes]` against the class indices
    /// `targets: [n]`, summed over the rows and divided by `divisor`: a `[1]` tensor. Rows whose
    /// target is negative add nothing and get a zero gradient; with none counted the loss is 0.
    fn cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        divisor: f32,
    ) -> FloatTensor<Self>;
}

/// Backends whose tensors the kernels can read as a slice of f32 (or, on burn-flex, f16 and bf16)
/// and build from a `Buffer` without a copy.
///
/// The kernels compute in f32. Half-precision tensors (burn-flex's F16 and BF16) are widened
/// piece by piece where the kernels use them and their results rounded back to the format
/// (the `values` module), so that what a kernel keeps for its backward pass stays half precision:
/// the arithmetic of CPU half-precision kernels (this CPU has no half arithmetic in AVX2), the
/// memory of half storage.
pub trait HostSlices: Backend {
    /// The elements in row-major order, in their format: borrowed when the storage is contiguous.
    fn read(tensor: &FloatTensor<Self>) -> Held<'_>;

    /// A tensor owning `buffer` (no copy).
    fn write(buffer: Buffer, shape: Vec<usize>) -> FloatTensor<Self>;

    /// The elements in row-major order, for writing in place: `Some` only when the tensor is f32,
    /// contiguous and its storage shared with no other tensor.
    fn f32_mut(tensor: &mut FloatTensor<Self>) -> Option<&mut [f32]>;

    /// The class indices held by an integer tensor (i64 or i32), in row-major order: `None` for
    /// a negative one, a row to ignore ([`class_index`]).
    fn read_classes(tensor: &IntTensor<Self>) -> Vec<Option<usize>>;

    /// The elements in row-major order, as f32 (a copy unless they are f32 and contiguous).
    fn read_f32(tensor: &FloatTensor<Self>) -> Cow<'_, [f32]> {
        match Self::read(tensor) {
            Held::Borrowed(Values::F32(values)) => Cow::Borrowed(values),
            other => Cow::Owned(other.values().to_f32().into_owned()),
        }
    }

    /// An f32 tensor owning `data` (no copy).
    fn write_f32(data: Vec<f32>, shape: Vec<usize>) -> FloatTensor<Self> {
        Self::write(Buffer::F32(data), shape)
    }

    /// A tensor of `dtype` holding `data`, rounded to it when it is a half format.
    fn write_as(data: Vec<f32>, shape: Vec<usize>, dtype: DType) -> FloatTensor<Self> {
        Self::write(Buffer::from_f32(data, format_of(dtype)), shape)
    }

    /// A tensor of `dtype` holding a copy of `data`, rounded to it when it is a half format.
    fn write_slice_as(data: &[f32], shape: Vec<usize>, dtype: DType) -> FloatTensor<Self> {
        Self::write(Buffer::from_f32_slice(data, format_of(dtype)), shape)
    }
}

/// The kernels' format for a tensor dtype.
fn format_of(dtype: DType) -> Format {
    match dtype {
        DType::F32 => Format::F32,
        DType::F16 => Format::F16,
        DType::BF16 => Format::Bf16,
        other => not_f32(other),
    }
}

fn not_f32(dtype: DType) -> ! {
    panic!("the CPU kernels run on f32 (or, on burn-flex, f16 and bf16) tensors, got {dtype:?}")
}

impl HostSlices for NdArray {
    fn read(tensor: &NdArrayTensor) -> Held<'_> {
        match tensor {
            NdArrayTensor::F32(storage) => {
                let view = storage.view();
                match view.to_slice() {
                    Some(slice) => Held::Borrowed(Values::F32(slice)),
                    None => Held::Owned(Buffer::F32(view.iter().copied().collect())),
                }
            }
            other => not_f32(other.dtype()),
        }
    }

    fn f32_mut(tensor: &mut NdArrayTensor) -> Option<&mut [f32]> {
        match tensor {
            // Unique means owned (borrowed storage never is): `ensure_owned` copies nothing.
            NdArrayTensor::F32(storage) if storage.is_unique() => {
                storage.ensure_owned().as_slice_mut()
            }
            _ => None,
        }
    }

    fn read_classes(tensor: &NdArrayTensor) -> Vec<Option<usize>> {
        match tensor {
            NdArrayTensor::I64(storage) => storage.view().iter().map(|&c| class_index(c)).collect(),
            NdArrayTensor::I32(storage) => {
                let classes = storage.view();
                classes.iter().map(|&c| class_index(c.into())).collect()
            }
            other => not_classes(other.dtype()),
        }
    }

    fn write(buffer: Buffer, shape: Vec<usize>) -> NdArrayTensor {
        match buffer {
            Buffer::F32(data) => NdArrayTensor::from_data(TensorData::new(data, shape)),
            _ => panic!("burn-ndarray has no half-precision tensors"),
        }
    }
}

impl HostSlices for Flex {
    fn read(tensor: &FlexTensor) -> Held<'_> {
        /// Borrowed when contiguous, else a contiguous copy.
        macro_rules! held {
            ($element:ty, $variant:ident) => {
                match tensor.as_slice::<$element>() {
                    Some(values) => Held::Borrowed(Values::$variant(values)),
                    None => Held::Owned(Buffer::$variant(
                        tensor
                            .to_contiguous()
                            .as_slice::<$element>()
                            .expect("a contiguous tensor")
                            .to_vec(),
                    )),
                }
            };
        }
        match tensor.dtype() {
            DType::F32 => held!(f32, F32),
            DType::F16 => held!(f16, F16),
            DType::BF16 => held!(bf16, Bf16),
            other => not_f32(other),
        }
    }

    fn f32_mut(tensor: &mut FlexTensor) -> Option<&mut [f32]> {
        if tensor.dtype() != DType::F32 {
            return None;
        }
        let (start, end) = tensor.layout().contiguous_offsets()?;
        Some(&mut tensor.try_storage_mut::<f32>()?[start..end])
    }

    fn read_classes(tensor: &FlexTensor) -> Vec<Option<usize>> {
        let tensor = tensor.to_contiguous();
        let classes = match tensor.dtype() {
            DType::I64 => tensor
                .as_slice::<i64>()
                .map(|c| c.iter().map(|&c| class_index(c)).collect()),
            DType::I32 => tensor
                .as_slice::<i32>()
                .map(|c| c.iter().map(|&c| class_index(c.into())).collect()),
            other => not_classes(other),
        };
        classes.expect("a contiguous tensor")
    }

    fn write(buffer: Buffer, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::from_data(match buffer {
            Buffer::F32(data) => TensorData::new(data, shape),
            Buffer::F16(data) => TensorData::new(data, shape),
            Buffer::Bf16(data) => TensorData::new(data, shape),
        })
    }
}

/// A target class as an index, or `None` for a negative one: a row the loss ignores (PyTorch's
/// `ignore_index`), never a huge index. One too large for `usize` stays too large, and the loss
/// refuses it as it refuses any class past the last.
fn class_index(class: i64) -> Option<usize> {
    (class >= 0).then(|| usize::try_from(class).unwrap_or(usize::MAX))
}

fn not_classes(dtype: DType) -> ! {
    panic!("the cross-entropy kernel reads class indices as i64 or i32, got {dtype:?}")
}

fn dims4<T: TensorMetadata>(tensor: &T) -> [usize; 4] {
    let shape = tensor.shape();
    assert_eq!(shape.num_dims(), 4, "expected a 4-D tensor");
    [shape[0], shape[1], shape[2], shape[3]]
}

fn conv_shape<B: Backend>(x: &FloatTensor<B>, weight: &FloatTensor<B>) -> ConvShape {
    let [batch, c_in, height, width] = dims4(x);
    let [c_out, w_in, kh, kw] = dims4(weight);
    assert_eq!(w_in, c_in, "conv2d: weight input channels");
    assert_eq!(kh, kw, "conv2d: the kernel must be square");
    ConvShape {
        batch,
        c_in,
        height,
        width,
        c_out,
        kernel: kh,
    }
}

fn dims2<T: TensorMetadata>(tensor: &T) -> [usize; 2] {
    let shape = tensor.shape();
    assert_eq!(shape.num_dims(), 2, "expected a 2-D tensor");
    [shape[0], shape[1]]
}

fn linear_shape<B: Backend>(x: &FloatTensor<B>, weight: &FloatTensor<B>) -> LinearShape {
    let [batch, inputs] = dims2(x);
    let [w_in, outputs] = dims2(weight);
    assert_eq!(w_in, inputs, "linear: weight inputs");
    LinearShape {
        batch,
        inputs,
        outputs,
    }
}

fn linear_forward<B: HostSlices>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    relu: bool,
) -> FloatTensor<B> {
    let s = linear_shape::<B>(&x, &weight);
    let (x, weight, bias) = (B::read(&x), B::read(&weight), B::read(&bias));
    let y = linear::forward(x.values(), weight.values(), bias.values(), s, relu);
    B::write(y, vec![s.batch, s.outputs])
}

fn matmul_forward<B: HostSlices>(x: FloatTensor<B>, weight: FloatTensor<B>) -> FloatTensor<B> {
    let s = linear_shape::<B>(&x, &weight);
    let (x, weight) = (B::read(&x), B::read(&weight));
    let y = linear::forward_without_bias(x.values(), weight.values(), s);
    B::write(y, vec![s.batch, s.outputs])
}

impl DenseBackend for NdArray {
    fn linear(
        x: NdArrayTensor,
        weight: NdArrayTensor,
        bias: NdArrayTensor,
        relu: bool,
    ) -> NdArrayTensor {
        linear_forward::<Self>(x, weight, bias, relu)
    }

    fn matmul(x: NdArrayTensor, weight: NdArrayTensor) -> NdArrayTensor {
        matmul_forward::<Self>(x, weight)
    }
}

impl DenseBackend for Flex {
    fn linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, relu: bool) -> FlexTensor {
        linear_forward::<Self>(x, weight, bias, relu)
    }

    fn matmul(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        matmul_forward::<Self>(x, weight)
    }
}

/// Backward step of [`DenseBackend::linear`].
#[derive(Debug)]
struct LinearBackward;

impl<B: HostSlices> Backward<B, 3> for LinearBackward {
    /// Input, weight and (when the ReLU was fused) output of the forward pass.
    type State = ConvState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let mut grad = grads.consume::<B>(&ops.node);
        let (x, weight, output) = ops.state;
        let s = linear_shape::<B>(&x, &weight);
        // The fused ReLU's mask goes in place where the gradient is f32 and this step's alone;
        // otherwise `linear::backward` masks a copy.
        let output = match (output, B::f32_mut(&mut grad)) {
            (Some(y), Some(dy)) => {
                linear::relu_mask_in_place(dy, B::read(&y).values(), s);
                None
            }
            (output, _) => output,
        };
        let output = output.as_ref().map(|y| B::read(y));
        let (x, weight, grad) = (B::read(&x), B::read(&weight), B::read(&grad));
        let LinearGrads {
            x: dx,
            weight: dw,
            bias: db,
        } = linear::backward(
            x.values(),
            weight.values(),
            grad.values(),
            output.as_ref().map(Held::values),
            s,
            node_x.is_some(),
        );
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<B>(node.id, B::write(dx, vec![s.batch, s.inputs]));
        }
        if let Some(node) = node_weight {
            grads.register::<B>(node.id, B::write(dw, vec![s.inputs, s.outputs]));
        }
        if let (Some(node), Some(db)) = (node_bias, db) {
            grads.register::<B>(node.id, B::write(db, vec![s.outputs]));
        }
    }
}

/// Backward step of [`DenseBackend::matmul`]; the state is the forward pass's two factors.
#[derive(Debug)]
struct MatmulBackward;

impl<B: HostSlices> Backward<B, 2> for MatmulBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        let s = linear_shape::<B>(&x, &weight);
        let (x, weight, grad) = (B::read(&x), B::read(&weight), B::read(&grad));
        let g = linear::backward_without_bias(
            x.values(),
            weight.values(),
            grad.values(),
            s,
            node_x.is_some(),
        );
        if let (Some(node), Some(dx)) = (node_x, g.x) {
            grads.register::<B>(node.id, B::write(dx, vec![s.batch, s.inputs]));
        }
        if let Some(node) = node_weight {
            grads.register::<B>(node.id, B::write(g.weight, vec![s.inputs, s.outputs]));
        }
    }
}

impl<B: DenseBackend + HostSlices, C: CheckpointStrategy> DenseBackend for Autodiff<B, C> {
    fn linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self> {
        keep_for_backward::<B, C, _>(LinearBackward, [x, weight, bias], relu, |[x, w, b]| {
            <B as DenseBackend>::linear(x, w, b, relu)
        })
    }

    fn matmul(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (weight, weight_node) = weight.into_parts();
        match MatmulBackward
            .prepare::<C>([x_node, weight_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = <B as DenseBackend>::matmul(x.clone(), weight.clone());
                prep.finish((x, weight), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as DenseBackend>::matmul(x, weight)),
        }
    }
}

fn conv_forward<B: HostSlices>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    relu: bool,
) -> FloatTensor<B> {
    let s = conv_shape::<B>(&x, &weight);
    let (x, weight, bias) = (B::read(&x), B::read(&weight), B::read(&bias));
    let y = conv::forward(x.values(), weight.values(), bias.values(), s, relu);
    B::write(y, vec![s.batch, s.c_out, s.out_height(), s.out_width()])
}

/// The fused forward pass: pooled output and the index of each window's maximum.
fn fused_forward<B: HostSlices>(
    x: &FloatTensor<B>,
    weight: &FloatTensor<B>,
    bias: &FloatTensor<B>,
) -> (FloatTensor<B>, Vec<u8>) {
    let s = conv_shape::<B>(x, weight);
    let (x, weight, bias) = (B::read(x), B::read(weight), B::read(bias));
    let pooled = conv_pool::forward(x.values(), weight.values(), bias.values(), s);
    let shape = vec![s.batch, s.c_out, s.out_height() / 2, s.out_width() / 2];
    (B::write(pooled.y, shape), pooled.argmax)
}

fn pool_forward<B: HostSlices>(x: FloatTensor<B>) -> FloatTensor<B> {
    let [n, c, h, w] = dims4(&x);
    let y = pool::forward(B::read(&x).values(), n * c, h, w);
    B::write(y, vec![n, c, h / 2, w / 2])
}

impl CnnBackend for NdArray {
    fn conv2d_valid(
        x: NdArrayTensor,
        weight: NdArrayTensor,
        bias: NdArrayTensor,
        relu: bool,
    ) -> NdArrayTensor {
        conv_forward::<Self>(x, weight, bias, relu)
    }

    fn max_pool2x2(x: NdArrayTensor) -> NdArrayTensor {
        pool_forward::<Self>(x)
    }

    fn conv2d_relu_pool(
        x: NdArrayTensor,
        weight: NdArrayTensor,
        bias: NdArrayTensor,
    ) -> NdArrayTensor {
        fused_forward::<Self>(&x, &weight, &bias).0
    }
}

impl CnnBackend for Flex {
    fn conv2d_valid(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, relu: bool) -> FlexTensor {
        conv_forward::<Self>(x, weight, bias, relu)
    }

    fn max_pool2x2(x: FlexTensor) -> FlexTensor {
        pool_forward::<Self>(x)
    }

    fn conv2d_relu_pool(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        fused_forward::<Self>(&x, &weight, &bias).0
    }
}

/// Backward step of [`CnnBackend::conv2d_valid`].
#[derive(Debug)]
struct ConvBackward;

/// Input, weight and (when the ReLU was fused) output of the forward pass.
type ConvState<B> = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>);

/// The autodiff side of a `(x, weight, bias)` operation whose backward needs its input, its
/// weight and, when a ReLU was fused (`relu`), its output: runs `forward` on the inner backend
/// and keeps those for `backward` when any parent is tracked.
fn keep_for_backward<B, C, BO>(
    backward: BO,
    [x, weight, bias]: [FloatTensor<Autodiff<B, C>>; 3],
    relu: bool,
    forward: impl Fn([FloatTensor<B>; 3]) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: HostSlices,
    C: CheckpointStrategy,
    BO: Backward<B, 3, State = ConvState<B>>,
{
    let (x, x_node) = x.into_parts();
    let (weight, weight_node) = weight.into_parts();
    let (bias, bias_node) = bias.into_parts();
    match backward
        .prepare::<C>([x_node, weight_node, bias_node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = forward([x.clone(), weight.clone(), bias]);
            let output = relu.then(|| y.clone());
            prep.finish((x, weight, output), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward([x, weight, bias])),
    }
}

impl<B: HostSlices> Backward<B, 3> for ConvBackward {
    type State = ConvState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, output) = ops.state;
        let s = conv_shape::<B>(&x, &weight);
        let output = output.as_ref().map(|y| B::read(y));
        let (x_held, weight_held, grad) = (B::read(&x), B::read(&weight), B::read(&grad));
        let g = conv::backward(
            x_held.values(),
            weight_held.values(),
            grad.values(),
            output.as_ref().map(Held::values),
            s,
            node_x.is_some(),
        );
        let ids = [node_x, node_weight, node_bias].map(|node| node.map(|node| node.id));
        register_conv_grads::<B>(grads, ids, g, &s, [x.dtype(), weight.dtype()]);
    }
}

/// Hands the convolution's gradients to the parents that want them.
/// `dtypes`: those of the input and of the parameters.
fn register_conv_grads<B: HostSlices>(
    grads: &mut Gradients,
    [node_x, node_weight, node_bias]: [Option<NodeId>; 3],
    g: ConvGrads,
    s: &ConvShape,
    [x_dtype, param_dtype]: [DType; 2],
) {
    if let (Some(node), Some(dx)) = (node_x, g.x) {
        let shape = vec![s.batch, s.c_in, s.height, s.width];
        debug_assert_eq!(dx.values().format(), format_of(x_dtype));
        grads.register::<B>(node, B::write(dx, shape));
    }
    if let Some(node) = node_weight {
        let shape = vec![s.c_out, s.c_in, s.kernel, s.kernel];
        grads.register::<B>(node, B::write_as(g.weight, shape, param_dtype));
    }
    if let Some(node) = node_bias {
        grads.register::<B>(node, B::write_as(g.bias, vec![s.c_out], param_dtype));
    }
}

/// Backward step of [`CnnBackend::conv2d_relu_pool`].
#[derive(Debug)]
struct ConvReluPoolBackward;

/// Input, weight, pooled output and the window index of each pooled maximum.
type ConvReluPoolState<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, Arc<Vec<u8>>);

impl<B: HostSlices> Backward<B, 3> for ConvReluPoolBackward {
    type State = ConvReluPoolState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, y, argmax) = ops.state;
        let s = conv_shape::<B>(&x, &weight);
        let (x_held, weight_held) = (B::read(&x), B::read(&weight));
        let (y, grad) = (B::read(&y), B::read(&grad));
        let g = conv_pool::backward(
            x_held.values(),
            weight_held.values(),
            y.values(),
            &argmax,
            grad.values(),
            s,
            node_x.is_some(),
        );
        let ids = [node_x, node_weight, node_bias].map(|node| node.map(|node| node.id));
        register_conv_grads::<B>(grads, ids, g, &s, [x.dtype(), weight.dtype()]);
    }
}

/// Backward step of [`CnnBackend::max_pool2x2`]; the state is the forward input.
#[derive(Debug)]
struct PoolBackward;

impl<B: HostSlices> Backward<B, 1> for PoolBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            let x = ops.state;
            let [n, c, h, w] = dims4(&x);
            let dx = pool::backward(B::read(&x).values(), B::read(&grad).values(), n * c, h, w);
            grads.register::<B>(node.id, B::write(dx, vec![n, c, h, w]));
        }
    }
}

impl<B: CnnBackend + HostSlices, C: CheckpointStrategy> CnnBackend for Autodiff<B, C> {
    fn conv2d_valid(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self> {
        keep_for_backward::<B, C, _>(ConvBackward, [x, weight, bias], relu, |[x, w, b]| {
            B::conv2d_valid(x, w, b, relu)
        })
    }

    fn conv2d_relu_pool(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (weight, weight_node) = weight.into_parts();
        let (bias, bias_node) = bias.into_parts();
        match ConvReluPoolBackward
            .prepare::<C>([x_node, weight_node, bias_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, argmax) = fused_forward::<B>(&x, &weight, &bias);
                prep.finish((x, weight, y.clone(), Arc::new(argmax)), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv2d_relu_pool(x, weight, bias)),
        }
    }

    fn max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        match PoolBackward
            .prepare::<C>([x_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::max_pool2x2(x.clone());
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::max_pool2x2(x)),
        }
    }
}

/// The loss of [`LossBackend::cross_entropy`] and the softmax its backward pass needs.
fn cross_entropy_forward<B: HostSlices>(
    logits: &FloatTensor<B>,
    targets: &[Option<usize>],
    divisor: f32,
) -> loss::CrossEntropy {
    let [rows, classes] = dims2(logits);
    assert_eq!(rows, targets.len(), "cross-entropy: one target a row");
    loss::forward(&B::read_f32(logits), targets, classes, divisor)
}

fn cross_entropy_value<B: HostSlices>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    divisor: f32,
) -> FloatTensor<B> {
    let targets = B::read_classes(&targets);
    let loss = cross_entropy_forward::<B>(&logits, &targets, divisor).loss;
    B::write_f32(vec![loss], vec![1])
}

impl LossBackend for NdArray {
    fn cross_entropy(logits: NdArrayTensor, targets: NdArrayTensor, divisor: f32) -> NdArrayTensor {
        cross_entropy_value::<Self>(logits, targets, divisor)
    }
}

impl LossBackend for Flex {
    fn cross_entropy(logits: FlexTensor, targets: FlexTensor, divisor: f32) -> FlexTensor {
        cross_entropy_value::<Self>(logits, targets, divisor)
    }
}

/// Backward step of [`LossBackend::cross_entropy`].
#[derive(Debug)]
struct CrossEntropyBackward;

/// The forward pass's softmax `[rows, classes]`, the targets (`None`: ignored) and the divisor.
type CrossEntropyState = (Arc<Vec<f32>>, Arc<Vec<Option<usize>>>, [usize; 2], f32);

impl<B: HostSlices> Backward<B, 1> for CrossEntropyBackward {
    type State = CrossEntropyState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_logits] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let Some(node) = node_logits else { return };
        let (softmax, targets, [rows, classes], divisor) = ops.state;
        let upstream = B::read_f32(&grad)[0];
        // The state is this step's alone once the graph is consumed: its buffer is reused.
        let softmax = Arc::try_unwrap(softmax).unwrap_or_else(|shared| (*shared).clone());
        let dx = loss::backward(softmax, &targets, classes, upstream / divisor);
        grads.register::<B>(node.id, B::write_f32(dx, vec![rows, classes]));
    }
}

impl<B: LossBackend + HostSlices, C: CheckpointStrategy> LossBackend for Autodiff<B, C> {
    fn cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        divisor: f32,
    ) -> FloatTensor<Self> {
        let (logits, node) = logits.into_parts();
        match CrossEntropyBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let classes = B::read_classes(&targets);
                let out = cross_entropy_forward::<B>(&logits, &classes, divisor);
                let dims = dims2(&logits);
                let state = (Arc::new(out.softmax), Arc::new(classes), dims, divisor);
                prep.finish(state, B::write_f32(vec![out.loss], vec![1]))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cross_entropy(logits, targets, divisor)),
        }
    }
}
