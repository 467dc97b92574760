//! Convolution + bias + ReLU + 2x2 max-pool in one pass per sample: the convolution's output
//! (the largest tensor of a small CNN) lives only in a per-task buffer that stays in cache.
//!
//! The forward pass keeps the pooled output and the index of each window's maximum (one byte);
//! the backward pass rebuilds each sample's convolution-output gradient from them and runs the
//! convolution's backward ([`conv::backward_with`]). Same determinism as the convolution: work
//! per sample, batch sums over fixed chunks in order.

use rayon::prelude::*;

use super::conv::{self, ConvGrads, ConvShape};
use super::pool;
use super::{CHUNK, assume_init, init, uninit};

/// The output of [`forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled {
    /// `[batch, c_out, oh / 2, ow / 2]`, where `oh x ow` is the convolution's output.
    pub y: Vec<f32>,
    /// For each element of `y`, the window position (0..4, row-major) of its maximum.
    pub argmax: Vec<u8>,
}

fn pooled_len(s: &ConvShape) -> usize {
    s.c_out * (s.out_height() / 2) * (s.out_width() / 2)
}

/// `maxpool2x2(relu(conv(x, weight) + bias))`.
pub fn forward(x: &[f32], weight: &[f32], bias: &[f32], s: ConvShape) -> Pooled {
    s.check(x, weight);
    assert_eq!(bias.len(), s.c_out, "conv2d: bias size");
    let (oh, ow) = (s.out_height(), s.out_width());
    let (in_len, conv_len, out_len) = (s.in_len(), s.out_len(), pooled_len(&s));
    let plane = (oh / 2) * (ow / 2);
    if out_len == 0 {
        return Pooled {
            y: Vec::new(),
            argmax: Vec::new(),
        };
    }
    let (mut y, mut argmax) = (uninit(s.batch * out_len), uninit(s.batch * out_len));
    y.par_chunks_mut(CHUNK * out_len)
        .zip(argmax.par_chunks_mut(CHUNK * out_len))
        .zip(x.par_chunks(CHUNK * in_len))
        .for_each(|((y, argmax), x)| {
            let (y, argmax) = (init(y, 0.0), init(argmax, 0));
            let mut cols = vec![0.0f32; s.patch() * s.positions()];
            let mut conv_out = vec![0.0f32; conv_len];
            let samples = y.chunks_mut(out_len).zip(argmax.chunks_mut(out_len));
            for ((y, argmax), x) in samples.zip(x.chunks(in_len)) {
                conv::sample_forward(x, weight, bias, &s, &mut cols, &mut conv_out);
                let planes = y.chunks_mut(plane).zip(argmax.chunks_mut(plane));
                for ((y, argmax), c) in planes.zip(conv_out.chunks(oh * ow)) {
                    pool::plane_forward(c, oh, ow, y, argmax, true);
                }
            }
        });
    // SAFETY: the chunks of `y` and `argmax` pair up with those of `x` (one per CHUNK samples,
    // `s.check` verified the sizes), so every chunk went through `init`.
    unsafe {
        Pooled {
            y: assume_init(y),
            argmax: assume_init(argmax),
        }
    }
}

/// The gradients of [`forward`] given the gradient `dy` of its pooled output `y` (with the
/// `argmax` the forward pass returned).
pub fn backward(
    x: &[f32],
    weight: &[f32],
    y: &[f32],
    argmax: &[u8],
    dy: &[f32],
    s: ConvShape,
    input_grad: bool,
) -> ConvGrads {
    let (oh, ow) = (s.out_height(), s.out_width());
    let (out_len, plane) = (pooled_len(&s), (oh / 2) * (ow / 2));
    assert_eq!(
        dy.len(),
        s.batch * out_len,
        "conv2d+pool backward: gradient size"
    );
    assert_eq!(y.len(), dy.len(), "conv2d+pool backward: output size");
    assert_eq!(argmax.len(), dy.len(), "conv2d+pool backward: index size");
    conv::backward_with(x, weight, s, input_grad, |n, g| {
        let range = n * out_len..(n + 1) * out_len;
        let (dy, y, argmax) = (&dy[range.clone()], &y[range.clone()], &argmax[range]);
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
            batch: CHUNK + 3,
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
        assert_eq!(fused.y, pool::forward(&conv_out, planes, oh, ow));

        let dy = values(fused.y.len(), 4);
        let fused_grads = backward(&x, &w, &fused.y, &fused.argmax, &dy, s, true);
        let dconv = pool::backward(&conv_out, &dy, planes, oh, ow);
        let grads = conv::backward(&x, &w, &dconv, Some(&conv_out), s, true);
        assert_eq!(fused_grads, grads);
    }
}
