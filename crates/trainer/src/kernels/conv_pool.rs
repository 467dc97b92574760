//! Convolution + bias + ReLU + 2x2 max-pool in one pass per sample: the convolution's output
//! (the largest tensor of a small CNN) lives only in a per-task buffer that stays in cache.
//!
//! The forward pass keeps the pooled output and the index of each window's maximum (one byte);
//! the backward pass rebuilds each sample's convolution-output gradient from them and runs the
//! convolution's backward ([`conv::backward_with`]). Same determinism as the convolution: work
//! per sample, batch sums over fixed chunks in order.

use super::SAMPLES_PER_TASK;
use super::conv::{self, ConvGrads, ConvShape};
use super::pool;
use super::values::{Buffer, Values, build_as_with};

/// The output of [`forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled {
    /// `[batch, c_out, oh / 2, ow / 2]`, where `oh x ow` is the convolution's output, in the
    /// format of the input.
    pub y: Buffer,
    /// For each element of `y`, the window position (0..4, row-major) of its maximum.
    pub argmax: Vec<u8>,
}

fn pooled_len(s: &ConvShape) -> usize {
    s.c_out * (s.out_height() / 2) * (s.out_width() / 2)
}

/// `maxpool2x2(relu(conv(x, weight) + bias))`.
pub fn forward<'a>(
    x: impl Into<Values<'a>>,
    weight: impl Into<Values<'a>>,
    bias: impl Into<Values<'a>>,
    s: ConvShape,
) -> Pooled {
    let (x, weight) = (x.into(), weight.into());
    s.check(x, weight);
    let (weight, bias) = (weight.to_f32(), bias.into().to_f32());
    assert_eq!(bias.len(), s.c_out, "conv2d: bias size");
    let (oh, ow) = (s.out_height(), s.out_width());
    let (in_len, conv_len, out_len) = (s.in_len(), s.out_len(), pooled_len(&s));
    let plane = (oh / 2) * (ow / 2);
    if out_len == 0 {
        return Pooled {
            y: Buffer::from_f32(Vec::new(), x.format()),
            argmax: Vec::new(),
        };
    }
    let (y, argmax) = build_as_with(
        x.format(),
        s.batch * out_len,
        SAMPLES_PER_TASK * out_len,
        |chunk, y| {
            let mut argmax = vec![0u8; y.len()];
            let mut cols = vec![0.0f32; s.patch() * s.positions()];
            let mut conv_out = vec![0.0f32; conv_len];
            let mut sample = Vec::new();
            let samples = y.chunks_mut(out_len).zip(argmax.chunks_mut(out_len));
            for (i, (y, argmax)) in samples.enumerate() {
                let n = chunk * SAMPLES_PER_TASK + i;
                let x = x.read(n * in_len..(n + 1) * in_len, &mut sample);
                conv::sample_forward(x, &weight, &bias, &s, &mut cols, &mut conv_out);
                let planes = y.chunks_mut(plane).zip(argmax.chunks_mut(plane));
                for ((y, argmax), c) in planes.zip(conv_out.chunks(oh * ow)) {
                    pool::plane_forward(c, oh, ow, y, argmax, true);
                }
            }
            argmax
        },
    );
    Pooled {
        y,
        argmax: argmax.concat(),
    }
}

/// The gradients of [`forward`] given the gradient `dy` of its pooled output `y` (with the
/// `argmax` the forward pass returned).
pub fn backward<'a>(
    x: impl Into<Values<'a>>,
    weight: impl Into<Values<'a>>,
    y: impl Into<Values<'a>>,
    argmax: &[u8],
    dy: impl Into<Values<'a>>,
    s: ConvShape,
    input_grad: bool,
) -> ConvGrads {
    let (y, dy) = (y.into(), dy.into());
    let (oh, ow) = (s.out_height(), s.out_width());
    let (out_len, plane) = (pooled_len(&s), (oh / 2) * (ow / 2));
    assert_eq!(
        dy.len(),
        s.batch * out_len,
        "conv2d+pool backward: gradient size"
    );
    assert_eq!(y.len(), dy.len(), "conv2d+pool backward: output size");
    assert_eq!(argmax.len(), dy.len(), "conv2d+pool backward: index size");
    conv::backward_with(x.into(), weight.into(), s, input_grad, |n, g| {
        let range = n * out_len..(n + 1) * out_len;
        let (mut dy_scratch, mut y_scratch) = (Vec::new(), Vec::new());
        let dy = dy.read(range.clone(), &mut dy_scratch);
        let y = y.read(range.clone(), &mut y_scratch);
        let argmax = &argmax[range];
        for (((g, dy), y), argmax) in g
            .chunks_mut(oh * ow)
            .zip(dy.chunks(plane))
            .zip(y.chunks(plane))
            .zip(argmax.chunks(plane))
        {
            pool::plane_backward(dy, argmax, Some(y), oh, ow, g);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as values;

    /// The fused pass equals the separate kernels, bit for bit: same GEMMs, same sums.
    #[test]
    fn fused_equals_convolution_then_pool() {
        let s = ConvShape {
            batch: SAMPLES_PER_TASK + 3,
            c_in: 2,
            height: 10,
            width: 9,
            c_out: 3,
            kernel: 3,
        };
        let (oh, ow) = (s.out_height(), s.out_width());
        let planes = s.batch * s.c_out;
        let x = values(s.batch * s.c_in * s.height * s.width, 1);
        let w = values(s.c_out * s.c_in * 9, 2);
        let b = values(s.c_out, 3);
        let fused = forward(&x, &w, &b, s);
        let conv_out = conv::forward(&x, &w, &b, s, true);
        assert_eq!(fused.y, pool::forward(conv_out.values(), planes, oh, ow));

        let dy = values(fused.y.len(), 4);
        let fused_grads = backward(&x, &w, fused.y.values(), &fused.argmax, &dy, s, true);
        let dconv = pool::backward(conv_out.values(), &dy, planes, oh, ow);
        let grads = conv::backward(&x, &w, dconv.values(), Some(conv_out.values()), s, true);
        assert_eq!(fused_grads, grads);
    }
}
