//! 2-D convolution on plain f32 slices: NCHW, square kernel, stride 1, no padding, with bias and an
//! optional fused ReLU. Weights are `[c_out, c_in, k, k]`, as in burn's `Conv2d`.
//!
//! Each sample is one im2col and one packed GEMM, run single-threaded; rayon spreads whole chunks
//! of [`SAMPLES_PER_TASK`] samples over the threads. The weight and bias gradients are sums over the batch:
//! each chunk sums its own samples in order, and the chunk partials are added in chunk order, so
//! every sum is taken in the same order at any thread count.

use rayon::prelude::*;

use super::matmul::{Mat, matmul};
use super::values::{Buffer, Values, build_as, build_as_with};
use super::{SAMPLES_PER_TASK, relu_in_place};

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub height: usize,
    pub width: usize,
    pub c_out: usize,
    pub kernel: usize,
}

impl ConvShape {
    pub fn out_height(&self) -> usize {
        self.height + 1 - self.kernel
    }

    pub fn out_width(&self) -> usize {
        self.width + 1 - self.kernel
    }

    /// Rows of the im2col matrix: one per (input channel, kernel row, kernel column).
    pub(crate) fn patch(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }

    /// Output positions per channel: columns of the im2col matrix.
    pub(crate) fn positions(&self) -> usize {
        self.out_height() * self.out_width()
    }

    pub(crate) fn in_len(&self) -> usize {
        self.c_in * self.height * self.width
    }

    pub(crate) fn out_len(&self) -> usize {
        self.c_out * self.positions()
    }

    pub(crate) fn check(&self, x: Values<'_>, weight: Values<'_>) {
        assert!(
            self.kernel >= 1 && self.kernel <= self.height && self.kernel <= self.width,
            "conv2d: a {k}x{k} kernel does not fit {h}x{w} inputs",
            k = self.kernel,
            h = self.height,
            w = self.width
        );
        assert_eq!(x.len(), self.batch * self.in_len(), "conv2d: input size");
        assert_eq!(
            weight.len(),
            self.c_out * self.patch(),
            "conv2d: weight size"
        );
    }
}

/// Gradients of a convolution: the input's in the input's format, the parameters' in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvGrads {
    /// `None` when the input gradient was not asked for.
    pub x: Option<Buffer>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// `cols[(c, ki, kj), (i, j)] = x[c, i + ki, j + kj]` for one sample.
fn im2col(x: &[f32], s: &ConvShape, cols: &mut [f32]) {
    let (k, oh, ow, p) = (s.kernel, s.out_height(), s.out_width(), s.positions());
    let plane = s.height * s.width;
    for c in 0..s.c_in {
        let xc = &x[c * plane..(c + 1) * plane];
        for ki in 0..k {
            for kj in 0..k {
                let row = &mut cols[((c * k + ki) * k + kj) * p..][..p];
                for i in 0..oh {
                    let src = &xc[(i + ki) * s.width + kj..][..ow];
                    row[i * ow..(i + 1) * ow].copy_from_slice(src);
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds every column entry back onto the input position it came from.
/// `dx` must be zeroed by the caller. The order of the additions is fixed.
fn col2im(cols: &[f32], s: &ConvShape, dx: &mut [f32]) {
    let (k, oh, ow, p) = (s.kernel, s.out_height(), s.out_width(), s.positions());
    let plane = s.height * s.width;
    for c in 0..s.c_in {
        let dxc = &mut dx[c * plane..(c + 1) * plane];
        for ki in 0..k {
            for kj in 0..k {
                let row = &cols[((c * k + ki) * k + kj) * p..][..p];
                for i in 0..oh {
                    let dst = &mut dxc[(i + ki) * s.width + kj..][..ow];
                    for (d, v) in dst.iter_mut().zip(&row[i * ow..(i + 1) * ow]) {
                        *d += v;
                    }
                }
            }
        }
    }
}

/// `y = conv(x, weight) + bias`, then `max(y, 0)` when `relu`. Returns `[batch, c_out, oh, ow]`
/// in the format of `x`.
pub fn forward<'a>(
    x: impl Into<Values<'a>>,
    weight: impl Into<Values<'a>>,
    bias: impl Into<Values<'a>>,
    s: ConvShape,
    relu: bool,
) -> Buffer {
    let (x, weight) = (x.into(), weight.into());
    s.check(x, weight);
    let (weight, bias) = (weight.to_f32(), bias.into().to_f32());
    assert_eq!(bias.len(), s.c_out, "conv2d: bias size");
    let (kk, p) = (s.patch(), s.positions());
    let (in_len, out_len) = (s.in_len(), s.out_len());
    if out_len == 0 {
        return Buffer::from_f32(Vec::new(), x.format());
    }
    build_as(
        x.format(),
        s.batch * out_len,
        SAMPLES_PER_TASK * out_len,
        |chunk, y| {
            let mut cols = vec![0.0f32; kk * p];
            let mut sample = Vec::new();
            for (i, y) in y.chunks_mut(out_len).enumerate() {
                let n = chunk * SAMPLES_PER_TASK + i;
                let x = x.read(n * in_len..(n + 1) * in_len, &mut sample);
                sample_forward(x, &weight, &bias, &s, &mut cols, y);
                if relu {
                    relu_in_place(y);
                }
            }
        },
    )
}

/// `y = conv(x, weight) + bias` for one sample, `cols` a scratch buffer of the im2col size.
pub(crate) fn sample_forward(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: &ConvShape,
    cols: &mut [f32],
    y: &mut [f32],
) {
    let (kk, p) = (s.patch(), s.positions());
    im2col(x, s, cols);
    for (row, &b) in y.chunks_mut(p).zip(bias) {
        row.fill(b);
    }
    matmul(
        y,
        Mat::rows(weight, kk),
        Mat::rows(&*cols, p),
        (s.c_out, kk, p),
        true,
    );
}

/// The gradients of [`forward`] given the gradient `dy` of its output.
///
/// `relu_output` is the forward output when the ReLU was fused: the gradient is zero wherever
/// that output is not positive. The input gradient is computed only when `input_grad` is set.
pub fn backward<'a>(
    x: impl Into<Values<'a>>,
    weight: impl Into<Values<'a>>,
    dy: impl Into<Values<'a>>,
    relu_output: Option<Values<'a>>,
    s: ConvShape,
    input_grad: bool,
) -> ConvGrads {
    let dy = dy.into();
    let out_len = s.out_len();
    assert_eq!(
        dy.len(),
        s.batch * out_len,
        "conv2d backward: gradient size"
    );
    if let Some(y) = relu_output {
        assert_eq!(y.len(), dy.len(), "conv2d backward: output size");
    }
    backward_with(x.into(), weight.into(), s, input_grad, |n, g| {
        let range = n * out_len..(n + 1) * out_len;
        match relu_output {
            Some(y) => {
                let (mut dy_scratch, mut y_scratch) = (Vec::new(), Vec::new());
                let dy = dy.read(range.clone(), &mut dy_scratch);
                let y = y.read(range, &mut y_scratch);
                for ((g, &d), &y) in g.iter_mut().zip(dy).zip(y) {
                    *g = if y > 0.0 { d } else { 0.0 };
                }
            }
            None => dy.widen_into(range.start, g),
        }
    })
}

/// The gradients of a convolution whose output gradient for sample `n` the caller writes into
/// the `[c_out, oh, ow]` buffer it is handed: `output_grad(n, buffer)` (the buffer holds
/// garbage; every element must be written).
pub(crate) fn backward_with<F>(
    x: Values<'_>,
    weight: Values<'_>,
    s: ConvShape,
    input_grad: bool,
    output_grad: F,
) -> ConvGrads
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    s.check(x, weight);
    let weight = weight.to_f32();
    let (kk, p, o) = (s.patch(), s.positions(), s.c_out);
    let (in_len, out_len) = (s.in_len(), s.out_len());

    // The samples of one chunk: their weight and bias gradients summed in order, and their
    // input gradients written into `dx` (zeroed) when asked for.
    let chunk_grads = |chunk: usize, mut dx: Option<&mut [f32]>| {
        let mut dw = vec![0.0f32; o * kk];
        let mut db = vec![0.0f32; o];
        let mut cols = vec![0.0f32; kk * p];
        let mut dcols = vec![0.0f32; if dx.is_some() { kk * p } else { 0 }];
        let mut g = vec![0.0f32; out_len];
        let mut sample = Vec::new();
        let first = chunk * SAMPLES_PER_TASK;
        for (i, n) in (first..s.batch.min(first + SAMPLES_PER_TASK)).enumerate() {
            output_grad(n, &mut g);
            for (b, row) in db.iter_mut().zip(g.chunks(p)) {
                *b += lane_sum(row);
            }
            im2col(
                x.read(n * in_len..(n + 1) * in_len, &mut sample),
                &s,
                &mut cols,
            );
            // dW += g · colsᵀ
            matmul(
                &mut dw,
                Mat::rows(&g, p),
                Mat::transposed(&cols, p),
                (o, p, kk),
                i > 0,
            );
            if let Some(dx) = dx.as_mut() {
                // dcols = Wᵀ · g, then back onto the input positions.
                matmul(
                    &mut dcols,
                    Mat::transposed(&weight[..], kk),
                    Mat::rows(&g, p),
                    (kk, o, p),
                    false,
                );
                col2im(&dcols, &s, &mut dx[i * in_len..(i + 1) * in_len]);
            }
        }
        (dw, db)
    };
    let (dx, partials): (_, Vec<(Vec<f32>, Vec<f32>)>) = if input_grad {
        let (dx, partials) = build_as_with(
            x.format(),
            s.batch * in_len,
            SAMPLES_PER_TASK * in_len,
            |chunk, dx| chunk_grads(chunk, Some(dx)),
        );
        (Some(dx), partials)
    } else {
        let chunks = s.batch.div_ceil(SAMPLES_PER_TASK);
        let partials = (0..chunks)
            .into_par_iter()
            .map(|chunk| chunk_grads(chunk, None))
            .collect();
        (None, partials)
    };

    let (weight_parts, bias_parts): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    ConvGrads {
        x: dx,
        weight: sum_in_order(&weight_parts, o * kk),
        bias: sum_in_order(&bias_parts, o),
    }
}

/// The sum of `values` in 8 interleaved partial sums (vectorisable; a fixed order all the same).
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    for (lane, v) in lanes.iter_mut().zip(rest) {
        *lane += v;
    }
    let [a, b, c, d, e, f, g, h] = lanes;
    ((a + b) + (c + d)) + ((e + f) + (g + h))
}

/// The element-wise sum of `parts` (each of `len` elements), taken in the order of `parts` for
/// every element; elements are spread over the threads, which does not change any sum.
fn sum_in_order(parts: &[Vec<f32>], len: usize) -> Vec<f32> {
    const BLOCK: usize = 4096;
    let Some((first, rest)) = parts.split_first() else {
        return vec![0.0; len];
    };
    let mut sum = first.clone();
    sum.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(block, sum)| {
            for part in rest {
                for (s, p) in sum.iter_mut().zip(&part[block * BLOCK..]) {
                    *s += p;
                }
            }
        });
    sum
}

/// Direct definition, for tests: `y[n, o, i, j] = b[o] + Σ w[o, c, ki, kj] x[n, c, i+ki, j+kj]`.
#[cfg(test)]
pub fn reference_forward(x: &[f32], weight: &[f32], bias: &[f32], s: ConvShape) -> Vec<f32> {
    let (oh, ow, k) = (s.out_height(), s.out_width(), s.kernel);
    let mut y = vec![0.0f64; s.batch * s.out_len()];
    for n in 0..s.batch {
        for o in 0..s.c_out {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = bias[o] as f64;
                    for c in 0..s.c_in {
                        for ki in 0..k {
                            for kj in 0..k {
                                let xv =
                                    x[((n * s.c_in + c) * s.height + i + ki) * s.width + j + kj];
                                let wv = weight[((o * s.c_in + c) * k + ki) * k + kj];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[((n * s.c_out + o) * oh + i) * ow + j] = acc;
                }
            }
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as values;

    #[test]
    fn forward_matches_the_definition() {
        let s = ConvShape {
            batch: 5,
            c_in: 3,
            height: 7,
            width: 6,
            c_out: 4,
            kernel: 3,
        };
        let x = values(s.batch * s.in_len(), 1);
        let w = values(s.c_out * s.patch(), 2);
        let b = values(s.c_out, 3);
        let got = forward(&x, &w, &b, s, false).into_f32();
        let want = reference_forward(&x, &w, &b, s);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
        let relu = forward(&x, &w, &b, s, true).into_f32();
        for (r, w) in relu.iter().zip(&want) {
            assert_eq!(*r, if *w < 0.0 { 0.0 } else { *r });
            assert!((r - w.max(0.0)).abs() <= 1e-5 * (1.0 + w.abs()));
        }
    }

    /// The gradients are the adjoint of the forward map: <dy, J·v> = <Jᵀ·dy, v>, checked through
    /// finite differences of the (linear) convolution, which are exact up to rounding.
    #[test]
    fn backward_is_the_adjoint_of_forward() {
        let s = ConvShape {
            batch: 6,
            c_in: 2,
            height: 6,
            width: 5,
            c_out: 3,
            kernel: 2,
        };
        let x = values(s.batch * s.in_len(), 4);
        let w = values(s.c_out * s.patch(), 5);
        let dy = values(s.batch * s.out_len(), 7);
        let grads = backward(&x, &w, &dy, None, s, true);
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let zeros_b = vec![0.0; s.c_out];
        // Input: y is linear in x when the bias is zero.
        let vx = values(x.len(), 8);
        let lhs = dot(&dy, &reference_forward(&vx, &w, &zeros_b, s));
        let rhs = dot(&grads.x.clone().unwrap().into_f32(), &vx);
        assert!(
            (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
            "{lhs} vs {rhs}"
        );
        // Weight.
        let vw = values(w.len(), 9);
        let lhs = dot(&dy, &reference_forward(&x, &vw, &zeros_b, s));
        let rhs = dot(&grads.weight, &vw);
        assert!(
            (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
            "{lhs} vs {rhs}"
        );
        // Bias.
        let want: Vec<f32> = (0..s.c_out)
            .map(|o| {
                (0..s.batch)
                    .flat_map(|n| {
                        let start = (n * s.c_out + o) * s.positions();
                        dy[start..start + s.positions()].iter().copied()
                    })
                    .sum()
            })
            .collect();
        for (g, w) in grads.bias.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()));
        }
        // Without the input gradient, the others do not change.
        let no_x = backward(&x, &w, &dy, None, s, false);
        assert!(no_x.x.is_none());
        assert_eq!(no_x.weight, grads.weight);
        assert_eq!(no_x.bias, grads.bias);
    }
}
