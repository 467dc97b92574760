//! The kernels as a burn backend extension: one implementation per CPU backend, plus an
//! `Autodiff<B, C>` implementation whose backward pass calls the hand-written gradient kernels.
//!
//! Inside an implementation the tensor is a plain f32 slice ([`HostF32`]): borrowed when the
//! backend's storage is contiguous, copied otherwise; results go back without a copy.
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
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, NdArray, TensorMetadata, backend_extension};
use burn::tensor::{DType, TensorData};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::conv::{self, ConvGrads, ConvShape};
use super::linear::{self, LinearGrads, LinearShape};
use super::{fused, pool};

/// Convolution and max-pool kernels for the CNN. Shapes are checked by the wrappers in
/// [`super`]; the operations panic on anything but f32.
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
/// wrapper in [`super`]; the operation panics on dtypes that [`HostF32`] cannot read.
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
}

/// Backends whose tensors the kernels can read as an f32 slice and build from an f32 `Vec`.
///
/// The kernels compute in f32. Half-precision tensors (burn-flex's F16 and BF16) are converted
/// on the way in and rounded back to their format on the way out, so that what a kernel keeps
/// for its backward pass stays half precision: the arithmetic of CPU half-precision kernels
/// (this CPU has no half arithmetic in AVX2), the memory of half storage.
pub trait HostF32: Backend {
    /// The elements in row-major order, as f32.
    fn read_f32(tensor: &FloatTensor<Self>) -> Cow<'_, [f32]>;
    /// An f32 tensor owning `data` (no copy).
    fn write_f32(data: Vec<f32>, shape: Vec<usize>) -> FloatTensor<Self>;
    /// A tensor of `dtype` holding `data`, rounded to it when it is a half format.
    fn write_as(data: Vec<f32>, shape: Vec<usize>, dtype: DType) -> FloatTensor<Self> {
        match dtype {
            DType::F32 => Self::write_f32(data, shape),
            other => not_f32(other),
        }
    }
    /// A tensor of `dtype` holding a copy of `data`, rounded to it when it is a half format.
    fn write_slice_as(data: &[f32], shape: Vec<usize>, dtype: DType) -> FloatTensor<Self> {
        Self::write_as(data.to_vec(), shape, dtype)
    }
    /// A tensor holding `data` in the dtype of `like`.
    fn write_like(
        data: Vec<f32>,
        shape: Vec<usize>,
        like: &FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::write_as(data, shape, like.dtype())
    }
}

fn not_f32(dtype: DType) -> ! {
    panic!("the CPU kernels run on f32 (or, on burn-flex, f16 and bf16) tensors, got {dtype:?}")
}

/// Elements per rayon task when converting between f32 and a half format (element-wise: the
/// split changes no value).
const CONVERT_CHUNK: usize = 1 << 15;

/// `values` widened to f32.
fn widen<E: Sync>(values: &[E]) -> Vec<f32>
where
    [E]: HalfFloatSliceExt,
{
    super::build_in_parallel(values.len(), CONVERT_CHUNK, |i, out| {
        values[i * CONVERT_CHUNK..][..out.len()].convert_to_f32_slice(out)
    })
}

/// `values` rounded to a half format (to nearest, ties to even).
fn narrow<E>(values: &[f32]) -> Vec<E>
where
    E: Copy + Default + Send + Sync,
    [E]: HalfFloatSliceExt,
{
    super::build_in_parallel(values.len(), CONVERT_CHUNK, |i, out: &mut [E]| {
        out.convert_from_f32_slice(&values[i * CONVERT_CHUNK..][..out.len()])
    })
}

impl HostF32 for NdArray {
    fn read_f32(tensor: &NdArrayTensor) -> Cow<'_, [f32]> {
        match tensor {
            NdArrayTensor::F32(storage) => {
                let view = storage.view();
                match view.to_slice() {
                    Some(slice) => Cow::Borrowed(slice),
                    None => Cow::Owned(view.iter().copied().collect()),
                }
            }
            other => not_f32(other.dtype()),
        }
    }

    fn write_f32(data: Vec<f32>, shape: Vec<usize>) -> NdArrayTensor {
        NdArrayTensor::from_data(TensorData::new(data, shape))
    }
}

impl HostF32 for Flex {
    fn read_f32(tensor: &FlexTensor) -> Cow<'_, [f32]> {
        match tensor.dtype() {
            DType::F32 => {}
            DType::F16 => {
                return Cow::Owned(match tensor.as_slice::<f16>() {
                    Some(values) => widen(values),
                    None => widen(
                        tensor
                            .to_contiguous()
                            .as_slice::<f16>()
                            .expect("contiguous"),
                    ),
                });
            }
            DType::BF16 => {
                return Cow::Owned(match tensor.as_slice::<bf16>() {
                    Some(values) => widen(values),
                    None => widen(
                        tensor
                            .to_contiguous()
                            .as_slice::<bf16>()
                            .expect("contiguous"),
                    ),
                });
            }
            other => not_f32(other),
        }
        match tensor.as_slice::<f32>() {
            Some(slice) => Cow::Borrowed(slice),
            None => Cow::Owned(
                tensor
                    .to_contiguous()
                    .as_slice::<f32>()
                    .expect("a contiguous f32 tensor")
                    .to_vec(),
            ),
        }
    }

    fn write_f32(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(data, shape))
    }

    fn write_slice_as(data: &[f32], shape: Vec<usize>, dtype: DType) -> FlexTensor {
        match dtype {
            DType::F16 => FlexTensor::from_data(TensorData::new(narrow::<f16>(data), shape)),
            DType::BF16 => FlexTensor::from_data(TensorData::new(narrow::<bf16>(data), shape)),
            _ => Self::write_as(data.to_vec(), shape, dtype),
        }
    }

    fn write_as(data: Vec<f32>, shape: Vec<usize>, dtype: DType) -> FlexTensor {
        match dtype {
            DType::F32 => Self::write_f32(data, shape),
            DType::F16 => FlexTensor::from_data(TensorData::new(narrow::<f16>(&data), shape)),
            DType::BF16 => FlexTensor::from_data(TensorData::new(narrow::<bf16>(&data), shape)),
            other => not_f32(other),
        }
    }
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

fn linear_forward<B: HostF32>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    relu: bool,
) -> FloatTensor<B> {
    let s = linear_shape::<B>(&x, &weight);
    let y = linear::forward(
        &B::read_f32(&x),
        &B::read_f32(&weight),
        &B::read_f32(&bias),
        s,
        relu,
    );
    B::write_like(y, vec![s.batch, s.outputs], &x)
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
}

impl DenseBackend for Flex {
    fn linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, relu: bool) -> FlexTensor {
        linear_forward::<Self>(x, weight, bias, relu)
    }
}

/// Backward step of [`DenseBackend::linear`].
#[derive(Debug)]
struct LinearBackward;

impl<B: HostF32> Backward<B, 3> for LinearBackward {
    /// Input, weight and (when the ReLU was fused) output of the forward pass.
    type State = ConvState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, output) = ops.state;
        let s = linear_shape::<B>(&x, &weight);
        let output = output.as_ref().map(|y| B::read_f32(y));
        let LinearGrads {
            x: dx,
            weight: dw,
            bias: db,
        } = linear::backward(
            &B::read_f32(&x),
            &B::read_f32(&weight),
            &B::read_f32(&grad),
            output.as_deref(),
            s,
            node_x.is_some(),
        );
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<B>(node.id, B::write_like(dx, vec![s.batch, s.inputs], &x));
        }
        if let Some(node) = node_weight {
            grads.register::<B>(
                node.id,
                B::write_like(dw, vec![s.inputs, s.outputs], &weight),
            );
        }
        if let Some(node) = node_bias {
            grads.register::<B>(node.id, B::write_like(db, vec![s.outputs], &weight));
        }
    }
}

impl<B: DenseBackend + HostF32, C: CheckpointStrategy> DenseBackend for Autodiff<B, C> {
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
}

fn conv_forward<B: HostF32>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    relu: bool,
) -> FloatTensor<B> {
    let s = conv_shape::<B>(&x, &weight);
    let y = conv::forward(
        &B::read_f32(&x),
        &B::read_f32(&weight),
        &B::read_f32(&bias),
        s,
        relu,
    );
    B::write_like(y, vec![s.batch, s.c_out, s.out_height(), s.out_width()], &x)
}

/// The fused forward pass: pooled output and the index of each window's maximum.
fn fused_forward<B: HostF32>(
    x: &FloatTensor<B>,
    weight: &FloatTensor<B>,
    bias: &FloatTensor<B>,
) -> (FloatTensor<B>, Vec<u8>) {
    let s = conv_shape::<B>(x, weight);
    let pooled = fused::forward(&B::read_f32(x), &B::read_f32(weight), &B::read_f32(bias), s);
    let shape = vec![s.batch, s.c_out, s.out_height() / 2, s.out_width() / 2];
    (B::write_like(pooled.y, shape, x), pooled.argmax)
}

fn pool_forward<B: HostF32>(x: FloatTensor<B>) -> FloatTensor<B> {
    let [n, c, h, w] = dims4(&x);
    let y = pool::forward(&B::read_f32(&x), n * c, h, w);
    B::write_like(y, vec![n, c, h / 2, w / 2], &x)
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
    B: HostF32,
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

impl<B: HostF32> Backward<B, 3> for ConvBackward {
    type State = ConvState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, output) = ops.state;
        let s = conv_shape::<B>(&x, &weight);
        let output = output.as_ref().map(|y| B::read_f32(y));
        let g = conv::backward(
            &B::read_f32(&x),
            &B::read_f32(&weight),
            &B::read_f32(&grad),
            output.as_deref(),
            s,
            node_x.is_some(),
        );
        let ids = [node_x, node_weight, node_bias].map(|node| node.map(|node| node.id));
        register_conv_grads::<B>(grads, ids, g, &s, [x.dtype(), weight.dtype()]);
    }
}

/// Hands the convolution's gradients to the parents that want them.
/// `dtypes`: those of the input and of the parameters.
fn register_conv_grads<B: HostF32>(
    grads: &mut Gradients,
    [node_x, node_weight, node_bias]: [Option<NodeId>; 3],
    g: ConvGrads,
    s: &ConvShape,
    [x_dtype, param_dtype]: [DType; 2],
) {
    if let (Some(node), Some(dx)) = (node_x, g.x) {
        let shape = vec![s.batch, s.c_in, s.height, s.width];
        grads.register::<B>(node, B::write_as(dx, shape, x_dtype));
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

impl<B: HostF32> Backward<B, 3> for ConvReluPoolBackward {
    type State = ConvReluPoolState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, y, argmax) = ops.state;
        let s = conv_shape::<B>(&x, &weight);
        let g = fused::backward(
            &B::read_f32(&x),
            &B::read_f32(&weight),
            &B::read_f32(&y),
            &argmax,
            &B::read_f32(&grad),
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

impl<B: HostF32> Backward<B, 1> for PoolBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            let x = ops.state;
            let [n, c, h, w] = dims4(&x);
            let dx = pool::backward(&B::read_f32(&x), &B::read_f32(&grad), n * c, h, w);
            grads.register::<B>(node.id, B::write_like(dx, vec![n, c, h, w], &x));
        }
    }
}

impl<B: CnnBackend + HostF32, C: CheckpointStrategy> CnnBackend for Autodiff<B, C> {
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
