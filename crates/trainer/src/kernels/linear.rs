//! Dense layer on plain slices (f32, f16 or bf16; computed in f32): `y = x · W + b`, optionally
//! followed by ReLU, with burn's `Linear` layout (`x: [batch, inputs]`, `W: [inputs, outputs]`,
//! `b: [outputs]`).
//!
//! Every product is cut into output tiles of at most [`TILE`] or [`WEIGHT_TILE`], equal parts of
//! each dimension (smaller where that leaves fewer tiles than threads), and each tile is one
//! single-threaded GEMM holding the whole sum over `k` ([`for_each_tile`]); rayon spreads the
//! tiles over the threads. No sum is ever split between tasks, and tiles are cut for more threads
//! only where `gemm` sums each element the same way: every element of every result is computed
//! by the same operations in the same order at any thread count. The bias gradient is summed
//! column block by column block, each column over the batch in sample order.

use std::ops::Range;

use rayon::prelude::*;

use super::matmul::{Mat, for_each_tile, for_each_tile_in_place};
use super::relu_in_place;
use super::values::{Buffer, Held, Values};

/// Tile of the `[batch, features]` products (the output and the input gradient): samples x
/// features. A batch of 128 through a 512-wide layer is 4 equal tasks. Smaller tiles made the
/// MLP's products slower (each tile packs its share of both factors again; `time_mlp_layers`).
pub const TILE: (usize, usize) = (128, 128);

/// Tile of the weight gradient `[inputs, outputs]`, whose sums run over the batch. More than 128
/// columns: `gemm` packs the transposed input only for wider tiles, and reading it strided made
/// the weight gradient 1.4x slower at batch 256.
pub const WEIGHT_TILE: (usize, usize) = (128, 256);

/// Output columns per task when summing the bias gradient over the batch.
const BIAS_COLUMNS: usize = 128;

/// The sizes of one dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    pub batch: usize,
    pub inputs: usize,
    pub outputs: usize,
}

impl LinearShape {
    fn check(&self, x: Values<'_>, weight: Values<'_>) {
        assert_eq!(x.len(), self.batch * self.inputs, "linear: input size");
        assert_eq!(
            weight.len(),
            self.inputs * self.outputs,
            "linear: weight size"
        );
    }
}

/// Gradients of a dense layer: the input's in the input's format, the parameters' in the
/// weight's.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGrads {
    /// `None` when the input gradient was not asked for.
    pub x: Option<Buffer>,
    pub weight: Buffer,
    /// `None` for a product without bias ([`backward_without_bias`]).
    pub bias: Option<Buffer>,
}

/// `y = x · weight + bias`, then `max(y, 0)` when `relu`: `[batch, outputs]`, in the format of
/// `x`.
pub fn forward<'a>(
    x: impl Into<Values<'a>>,
    weight: impl Into<Values<'a>>,
    bias: impl Into<Values<'a>>,
    s: LinearShape,
    relu: bool,
) -> Buffer {
    let bias = bias.into().to_f32();
    assert_eq!(bias.len(), s.outputs, "linear: bias size");
    product(x.into(), weight.into(), Some(&bias), s, relu)
}

/// `y = x · weight` (no bias, no ReLU): `[batch, outputs]`, in the format of `x`.
pub fn forward_without_bias<'a>(
    x: impl Into<Values<'a>>,
    weight: impl Into<Values<'a>>,
    s: LinearShape,
) -> Buffer {
    product(x.into(), weight.into(), None, s, false)
}

/// `x · weight (+ bias)`, then the ReLU when `relu`.
fn product(
    x: Values<'_>,
    weight: Values<'_>,
    bias: Option<&[f32]>,
    s: LinearShape,
    relu: bool,
) -> Buffer {
    s.check(x, weight);
    let format = x.format();
    let (x, weight) = (Held::operand(x), Held::operand(weight));
    let (x, weight) = (
        Mat::rows(x.values(), s.inputs),
        Mat::rows(weight.values(), s.outputs),
    );
    for_each_tile(format, (s.batch, s.outputs), TILE, Some(s.inputs), |tile| {
        // Bias first, then the product on top of it, then the ReLU while the tile is in cache.
        match bias {
            Some(bias) => {
                tile.fill_rows(bias);
                tile.matmul(x, weight, s.inputs, true);
            }
            None => tile.matmul(x, weight, s.inputs, false),
        }
        if relu {
            tile.for_each_row(|_, row| relu_in_place(row));
        }
    })
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
    s: LinearShape,
    input_grad: bool,
) -> LinearGrads {
    let (x, weight, dy) = (x.into(), weight.into(), dy.into());
    gradients(x, weight, dy, relu_output, s, input_grad, true)
}

/// The gradients of [`forward_without_bias`] given the gradient `dy` of its output (no bias
/// gradient). The input gradient is computed only when `input_grad` is set.
pub fn backward_without_bias<'a>(
    x: impl Into<Values<'a>>,
    weight: impl Into<Values<'a>>,
    dy: impl Into<Values<'a>>,
    s: LinearShape,
    input_grad: bool,
) -> LinearGrads {
    let (x, weight, dy) = (x.into(), weight.into(), dy.into());
    gradients(x, weight, dy, None, s, input_grad, false)
}

/// [`backward`], with the bias gradient only when `bias_grad` is set.
fn gradients(
    x: Values<'_>,
    weight: Values<'_>,
    dy: Values<'_>,
    relu_output: Option<Values<'_>>,
    s: LinearShape,
    input_grad: bool,
    bias_grad: bool,
) -> LinearGrads {
    s.check(x, weight);
    assert_eq!(
        dy.len(),
        s.batch * s.outputs,
        "linear backward: gradient size"
    );
    // The masked gradient holds values of `dy` or zeros: exact in `dy`'s format.
    let masked = relu_output.map(|y| {
        assert_eq!(y.len(), dy.len(), "linear backward: output size");
        relu_mask(dy, y, s)
    });
    let g = masked.as_ref().map_or(dy, Buffer::values);
    let (x_format, param_format) = (x.format(), weight.format());
    let (x_operand, g_operand) = (Held::operand(x), Held::operand(g));
    let g_rows = Mat::rows(g_operand.values(), s.outputs);
    let x_t = Mat::transposed(x_operand.values(), s.inputs);
    // dW = xᵀ · g: the sum over the batch of each element inside one tile's GEMM.
    let weight_grad = || {
        for_each_tile(
            param_format,
            (s.inputs, s.outputs),
            WEIGHT_TILE,
            Some(s.batch),
            |tile| {
                tile.matmul(x_t, g_rows, s.batch, false);
            },
        )
    };
    // dx = g · Wᵀ. Each tile copies out the part of Wᵀ it multiplies by, row-major and in f32,
    // while it is in cache: GEMM packs a transposed operand slowly (reading Wᵀ in place made
    // this product much slower than the forward one), and transposing the whole of W first was
    // a pass over memory of its own. With several rows of tiles (batches over 128) each tile
    // still copies its own: sharing one block per column of tiles was no faster at one thread
    // and slower at two.
    let x_grad = || {
        input_grad.then(|| {
            // No depth: cut as the ReLU mask below this layer, which rewrites it in place.
            for_each_tile(x_format, (s.batch, s.inputs), TILE, None, |tile| {
                let columns = tile.columns();
                let weight_t = transposed_rows(weight, columns.clone(), s.outputs);
                let weight_t = Mat::rows(&weight_t[..], columns.len());
                tile.matmul_block(g_rows, weight_t, s.outputs, false);
            })
        })
    };
    let bias_grad =
        || bias_grad.then(|| Buffer::from_f32(column_sums(g, s.batch, s.outputs), param_format));
    // The three gradients depend on `g` only: one parallel region rather than three, so that a
    // thread done with its share of one product takes tiles of the next instead of waiting for
    // the slowest tile of each. Scheduling only: every tile computes what it did alone.
    let (weight, (x, bias)) = rayon::join(weight_grad, || rayon::join(x_grad, bias_grad));
    LinearGrads { x, weight, bias }
}

/// Rows `rows` of the row-major matrix `m` with `cols` columns, transposed: a row-major
/// `cols x rows.len()` matrix in f32. The rows are contiguous in `m`.
fn transposed_rows(m: Values<'_>, rows: Range<usize>, cols: usize) -> Vec<f32> {
    let block = m.f32_range(rows.start * cols..rows.end * cols);
    let mut t = vec![0.0; block.len()];
    transpose::transpose(&block, &mut t, cols, rows.len());
    t
}

/// `dy` where the fused ReLU's output `y` is positive, zero elsewhere, in the format of `dy`.
fn relu_mask(dy: Values<'_>, y: Values<'_>, s: LinearShape) -> Buffer {
    for_each_tile(dy.format(), (s.batch, s.outputs), TILE, None, |tile| {
        let columns = tile.columns();
        let (mut dy_row, mut y_row) = (Vec::new(), Vec::new());
        tile.write_rows(|row, g| {
            let range = row * s.outputs + columns.start..row * s.outputs + columns.end;
            g.copy_from_slice(dy.read(range.clone(), &mut dy_row));
            zero_where_not_positive(g, y.read(range, &mut y_row));
        });
    })
}

/// [`relu_mask`] in place, for an f32 `dy` that the caller owns: its elements where `y` is not
/// positive become zero, the same bits as [`relu_mask`]'s. Writing where it reads, in the tiles
/// the product above wrote `dy` in, rather than into a fresh matrix (whose memory, at two
/// threads, was often last written by the other core), nearly halved the masks' time.
pub fn relu_mask_in_place(dy: &mut [f32], y: Values<'_>, s: LinearShape) {
    assert_eq!(y.len(), dy.len(), "linear backward: output size");
    for_each_tile_in_place(dy, (s.batch, s.outputs), TILE, |tile| {
        let columns = tile.columns();
        let mut y_row = Vec::new();
        tile.for_each_row(|row, g| {
            let range = row * s.outputs + columns.start..row * s.outputs + columns.end;
            zero_where_not_positive(g, y.read(range, &mut y_row));
        });
    });
}

/// The ReLU's gradient mask on one row: `g` zeroed wherever `y` is not positive (NaN included).
fn zero_where_not_positive(g: &mut [f32], y: &[f32]) {
    // A select, not a branch per element: a ReLU mask's branches go either way at random, and
    // written as a branch the in-place mask made the MLP's whole step 1.11x slower.
    for (g, &y) in g.iter_mut().zip(y) {
        *g = if y > 0.0 { *g } else { 0.0 };
    }
}

/// The sum of each column of the row-major `rows x cols` matrix `g`. Each block of
/// [`BIAS_COLUMNS`] columns is one task, which adds the rows in order: one fixed order per sum.
fn column_sums(g: Values<'_>, rows: usize, cols: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; cols];
    if rows == 0 {
        return sums;
    }
    sums.par_chunks_mut(BIAS_COLUMNS)
        .enumerate()
        .for_each(|(block, sums)| {
            let start = block * BIAS_COLUMNS;
            let mut scratch = Vec::new();
            for row in 0..rows {
                let first = row * cols + start;
                let values = g.read(first..first + sums.len(), &mut scratch);
                for (s, v) in sums.iter_mut().zip(values) {
                    *s += v;
                }
            }
        });
    sums
}

/// Direct definition in f64, for tests.
#[cfg(test)]
pub fn reference_forward(x: &[f32], weight: &[f32], bias: &[f32], s: LinearShape) -> Vec<f32> {
    let mut y = Vec::with_capacity(s.batch * s.outputs);
    for n in 0..s.batch {
        for o in 0..s.outputs {
            let mut acc = bias[o] as f64;
            for i in 0..s.inputs {
                acc += x[n * s.inputs + i] as f64 * weight[i * s.outputs + o] as f64;
            }
            y.push(acc as f32);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as values;

    /// Times the MLP 784-512-512-10's layers, forward and backward, in f32 and f16, at batch 128
    /// and 256 and 1 and 2 threads: `cargo test --release -p allcores-trainer time_mlp_layers --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn time_mlp_layers() {
        use crate::kernels::values::Format;
        use std::time::Instant;
        let layers = [(784, 512, true), (512, 512, true), (512, 10, false)];
        for format in [Format::F32, Format::F16] {
            for (batch, threads) in [(128, 1), (128, 2), (256, 1), (256, 2)] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let data: Vec<_> = (0..3u32)
                    .map(|i| {
                        let (inputs, outputs, _) = layers[i as usize];
                        let v = |n, seed| Buffer::from_f32(values(n, seed), format);
                        (
                            v(batch * inputs, i),
                            v(inputs * outputs, 10 + i),
                            v(outputs, 20 + i),
                            v(batch * outputs, 30 + i),
                        )
                    })
                    .collect();
                let reps = 100;
                let (mut fwd, mut bwd) = ([0.0f64; 3], [0.0f64; 3]);
                pool.install(|| {
                    for rep in 0..reps + 5 {
                        for (i, &(inputs, outputs, relu)) in layers.iter().enumerate() {
                            let s = LinearShape {
                                batch,
                                inputs,
                                outputs,
                            };
                            let (x, w, b, dy) = &data[i];
                            let start = Instant::now();
                            let y = forward(x.values(), w.values(), b.values(), s, relu);
                            let middle = Instant::now();
                            let relu_output = relu.then(|| y.values());
                            let g = backward(
                                x.values(),
                                w.values(),
                                dy.values(),
                                relu_output,
                                s,
                                i > 0,
                            );
                            std::hint::black_box(g);
                            if rep >= 5 {
                                fwd[i] += (middle - start).as_secs_f64();
                                bwd[i] += middle.elapsed().as_secs_f64();
                            }
                        }
                    }
                });
                let ms = |v: &[f64; 3]| v.map(|t| format!("{:.3}", t * 1e3 / reps as f64));
                let total: f64 = fwd.iter().chain(&bwd).sum::<f64>() * 1e3 / reps as f64;
                eprintln!(
                    "{format:?}, batch {batch}, {threads} thread(s): forward {:?} backward {:?} ms, \
                     {total:.3} ms",
                    ms(&fwd),
                    ms(&bwd)
                );
            }
        }
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: size");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()) * 10.0,
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Half-precision operands give the f32 kernel's results on the widened values, rounded
    /// once: large ones (widened tile by tile) and small ones (widened whole).
    #[test]
    fn half_operands_give_the_f32_results_rounded() {
        use crate::kernels::values::{Format, WIDEN_WHOLE_MAX};
        for (batch, inputs, outputs) in [(600, 450, 140), (5, 7, 4)] {
            let s = LinearShape {
                batch,
                inputs,
                outputs,
            };
            let half = |len, seed| Buffer::from_f32(values(len, seed), Format::F16);
            let (x, w, b) = (
                half(batch * inputs, 1),
                half(inputs * outputs, 2),
                half(outputs, 3),
            );
            let dy = half(batch * outputs, 4);
            if batch == 600 {
                assert!(x.len() > WIDEN_WHOLE_MAX, "the tile-by-tile path");
            }
            let wide = |b: &Buffer| b.clone().into_f32();
            let (x32, w32, b32, dy32) = (wide(&x), wide(&w), wide(&b), wide(&dy));
            let rounded = |v: Buffer| Buffer::from_f32(v.into_f32(), Format::F16);

            let y = forward(x.values(), w.values(), b.values(), s, true);
            assert_eq!(y, rounded(forward(&x32, &w32, &b32, s, true)));
            let grads = backward(
                x.values(),
                w.values(),
                dy.values(),
                Some(y.values()),
                s,
                true,
            );
            let y32 = wide(&y);
            let want = backward(&x32, &w32, &dy32, Some(Values::from(&y32)), s, true);
            assert_eq!(grads.x, want.x.map(rounded));
            assert_eq!(grads.weight, rounded(want.weight));
            assert_eq!(grads.bias, want.bias.map(rounded));
        }
    }

    /// Shapes with edge tiles on every side, and a single sample.
    const SHAPES: [LinearShape; 3] = [
        LinearShape {
            batch: TILE.0 + 3,
            inputs: WEIGHT_TILE.0 + 5,
            outputs: TILE.1 + 7,
        },
        LinearShape {
            batch: 1,
            inputs: 9,
            outputs: 10,
        },
        LinearShape {
            batch: 5,
            inputs: 3,
            outputs: 1,
        },
    ];

    #[test]
    fn forward_matches_the_definition() {
        for s in SHAPES {
            let x = values(s.batch * s.inputs, 1);
            let w = values(s.inputs * s.outputs, 2);
            let b = values(s.outputs, 3);
            let want = reference_forward(&x, &w, &b, s);
            assert_close(&forward(&x, &w, &b, s, false).into_f32(), &want, "output");
            let relu: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
            assert_close(
                &forward(&x, &w, &b, s, true).into_f32(),
                &relu,
                "ReLU output",
            );
        }
    }

    /// The in-place mask keeps exactly the copying mask's bits, whatever the pool: `y` holds
    /// positives, negatives, zeros of both signs and NaN, `dy` a NaN and an infinity.
    #[test]
    fn the_mask_in_place_gives_the_copying_masks_bits() {
        let (mut kept, mut zeroed) = (0, 0);
        for s in SHAPES {
            let n = s.batch * s.outputs;
            let specials = [0.0, -0.0, f32::NAN, 1e-40, -1e-40];
            let y: Vec<f32> = values(n, 8)
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if i % 7 == 0 {
                        specials[i / 7 % specials.len()]
                    } else {
                        v
                    }
                })
                .collect();
            let mut dy = values(n, 9);
            dy[0] = f32::NAN;
            dy[n - 1] = f32::INFINITY;
            let want = relu_mask(Values::from(&dy), Values::from(&y), s).into_f32();
            kept += want.iter().filter(|&&g| g != 0.0).count();
            zeroed += want.iter().filter(|&&g| g == 0.0).count();
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = dy.clone();
                pool.install(|| relu_mask_in_place(&mut got, Values::from(&y), s));
                let bits = |v: &[f32]| v.iter().map(|g| g.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{s:?} at {threads} threads");
            }
        }
        assert!(kept > 1000 && zeroed > 1000, "kept {kept}, zeroed {zeroed}");
    }

    /// The gradients against their definitions, computed in f64.
    #[test]
    fn backward_matches_the_definition() {
        for s in SHAPES {
            let x = values(s.batch * s.inputs, 4);
            let w = values(s.inputs * s.outputs, 5);
            let b = values(s.outputs, 6);
            let dy = values(s.batch * s.outputs, 7);
            for relu in [false, true] {
                let y = forward(&x, &w, &b, s, relu).into_f32();
                let g: Vec<f64> = dy
                    .iter()
                    .zip(&y)
                    .map(|(&d, &y)| if !relu || y > 0.0 { d as f64 } else { 0.0 })
                    .collect();
                let grads = backward(&x, &w, &dy, relu.then_some(Values::from(&y)), s, true);
                let (n, i, o) = (s.batch, s.inputs, s.outputs);
                let dx: Vec<f32> = (0..n * i)
                    .map(|e| {
                        let (row, col) = (e / i, e % i);
                        (0..o)
                            .map(|k| g[row * o + k] * w[col * o + k] as f64)
                            .sum::<f64>() as f32
                    })
                    .collect();
                let dw: Vec<f32> = (0..i * o)
                    .map(|e| {
                        let (row, col) = (e / o, e % o);
                        (0..n)
                            .map(|k| x[k * i + row] as f64 * g[k * o + col])
                            .sum::<f64>() as f32
                    })
                    .collect();
                let db: Vec<f32> = (0..o)
                    .map(|col| (0..n).map(|k| g[k * o + col]).sum::<f64>() as f32)
                    .collect();
                assert_close(&grads.x.clone().unwrap().into_f32(), &dx, "input gradient");
                assert_close(&grads.weight.clone().into_f32(), &dw, "weight gradient");
                assert_close(
                    &grads.bias.clone().unwrap().into_f32(),
                    &db,
                    "bias gradient",
                );
                let no_x = backward(&x, &w, &dy, relu.then_some(Values::from(&y)), s, false);
                assert!(no_x.x.is_none());
                assert_eq!(no_x.weight, grads.weight);
                assert_eq!(no_x.bias, grads.bias);
            }
        }
    }
}
