//! LayerNorm over the last dimension without a bias, on plain slices (f32, f16 or bf16; computed
//! in f32): `y = (x - mean) / sqrt(var + eps) · gain` with the biased variance and eps 1e-5, as
//! PyTorch's `nn.LayerNorm(c, bias=False)` (nanoGPT's blocks). The forward pass keeps each row's
//! mean and `1 / std` for the backward pass, which recomputes `x̂` from them (llm.c's
//! `layernorm_forward` / `layernorm_backward`).
//!
//! Rows are independent: rayon runs fixed chunks of [`ROWS`] rows. A sum along a row runs in
//! [`LANES`] interleaved partial sums, added pairwise at the end: one fixed order, which
//! vectorises. The gain's gradient is a sum over the rows: each chunk sums its own rows in order,
//! then the chunks' sums are added in chunk order. None of it depends on the thread count.

use rayon::prelude::*;

use super::gelu::widest_vectors;
use super::values::{Buffer, Values, build_as_with};

/// The variance's epsilon (PyTorch's default).
pub const EPS: f32 = 1e-5;

/// Rows per rayon task, and per partial sum of the gain's gradient.
const ROWS: usize = 32;

/// Partial sums along a row: as many as the widest vectors (AVX-512) hold f32s.
const LANES: usize = 16;

/// The mean and `1 / sqrt(var + eps)` of one row.
pub type RowStats = [f32; 2];

/// The forward pass's output and what its backward pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    /// `[rows, width]`, in the format of `x`.
    pub y: Buffer,
    /// One per row.
    pub stats: Vec<RowStats>,
}

/// The gradients of a LayerNorm: the input's in its format, the gain's in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormGrads {
    /// `None` when the input gradient was not asked for.
    pub x: Option<Buffer>,
    pub gain: Vec<f32>,
}

/// LayerNorm of the row-major `x: [rows, width]` with `gain: [width]`.
///
/// # Panics
/// When `width` is 0, `gain` is not `width` long or `x` is not a whole number of rows.
pub fn forward(x: Values<'_>, gain: Values<'_>, width: usize) -> Normalized {
    let rows = check(x, gain, width);
    let gain = gain.to_f32();
    let (y, stats) = build_as_with(x.format(), rows * width, ROWS * width, |i, y| {
        let first = i * ROWS * width;
        let mut scratch = Vec::new();
        let x = x.read(first..first + y.len(), &mut scratch);
        normalize_chunk(x, &gain, y)
    });
    Normalized {
        y,
        stats: stats.concat(),
    }
}

/// The gradients of [`forward`] given the gradient `dy` of its output and the forward pass's
/// `stats`. The input gradient is computed only when `input_grad` is set.
///
/// # Panics
/// On sizes that do not match.
pub fn backward(
    x: Values<'_>,
    gain: Values<'_>,
    stats: &[RowStats],
    dy: Values<'_>,
    width: usize,
    input_grad: bool,
) -> LayerNormGrads {
    let rows = check(x, gain, width);
    assert_eq!(
        stats.len(),
        rows,
        "layer norm backward: one mean and std a row"
    );
    assert_eq!(dy.len(), x.len(), "layer norm backward: gradient size");
    let gain = gain.to_f32();
    // Chunk `i`'s rows, its input gradient written into `dx` when there is one, and its share of
    // the gain's gradient returned.
    let chunk = |i: usize, dx: Option<&mut [f32]>| {
        let range = i * ROWS * width..((i + 1) * ROWS * width).min(x.len());
        let (mut x_scratch, mut dy_scratch) = (Vec::new(), Vec::new());
        let x = x.read(range.clone(), &mut x_scratch);
        let dy = dy.read(range.clone(), &mut dy_scratch);
        let stats = &stats[range.start / width..range.end / width];
        let mut dgain = vec![0.0f32; width];
        backward_chunk(x, dy, &gain, stats, &mut dgain, dx);
        dgain
    };
    let (dx, partial_dgains) = if input_grad {
        let (dx, partials) = build_as_with(x.format(), x.len(), ROWS * width, |i, dx| {
            chunk(i, Some(dx))
        });
        (Some(dx), partials)
    } else {
        let chunks = rows.div_ceil(ROWS);
        (
            None,
            (0..chunks)
                .into_par_iter()
                .map(|i| chunk(i, None))
                .collect(),
        )
    };
    LayerNormGrads {
        x: dx,
        gain: sum_in_order(partial_dgains, width),
    }
}

/// The number of rows, after checking the sizes.
fn check(x: Values<'_>, gain: Values<'_>, width: usize) -> usize {
    assert!(width > 0, "layer norm: rows of width 0");
    assert_eq!(gain.len(), width, "layer norm: gain size");
    assert_eq!(x.len() % width, 0, "layer norm: a whole number of rows");
    x.len() / width
}

/// The element-wise sum of `parts`, added one after another in order.
fn sum_in_order(parts: Vec<Vec<f32>>, width: usize) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let mut sum = parts.next().unwrap_or_else(|| vec![0.0; width]);
    for part in parts {
        for (s, p) in sum.iter_mut().zip(&part) {
            *s += p;
        }
    }
    sum
}

widest_vectors! {
    /// [`normalize_rows`] for the CPU's widest vectors.
    fn normalize_chunk(x: &[f32], gain: &[f32], y: &mut [f32]) -> Vec<RowStats> = normalize_rows;
}

widest_vectors! {
    /// [`backward_rows`] for the CPU's widest vectors.
    fn backward_chunk(
        x: &[f32],
        dy: &[f32],
        gain: &[f32],
        stats: &[RowStats],
        dgain: &mut [f32],
        dx: Option<&mut [f32]>,
    ) = backward_rows;
}

/// Normalises each row of `x` into `y` (both `rows x gain.len()`): each row's statistics.
#[inline(always)]
fn normalize_rows(x: &[f32], gain: &[f32], y: &mut [f32]) -> Vec<RowStats> {
    let width = gain.len();
    let mut stats = Vec::with_capacity(x.len() / width);
    // A `for` loop, not `map` and `collect`: the iterator's `fold` would be a function of its
    // own, compiled outside the vector variant that inlines this one.
    for (x, y) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
        stats.push(normalize_row(x, gain, y));
    }
    stats
}

#[inline(always)]
fn normalize_row(x: &[f32], gain: &[f32], y: &mut [f32]) -> RowStats {
    let n = x.len() as f32;
    let mean = lane_sum(x, x, |x, _| x) / n;
    let var = lane_sum(x, x, |x, _| (x - mean) * (x - mean)) / n;
    let rstd = 1.0 / (var + EPS).sqrt();
    for ((y, &x), &g) in y.iter_mut().zip(x).zip(gain) {
        *y = (x - mean) * rstd * g;
    }
    [mean, rstd]
}

/// The backward pass over the rows of `x` and `dy`: `dgain += Σ dy · x̂` over the rows in order,
/// and each row's input gradient into `dx` when it is there.
#[inline(always)]
fn backward_rows(
    x: &[f32],
    dy: &[f32],
    gain: &[f32],
    stats: &[RowStats],
    dgain: &mut [f32],
    mut dx: Option<&mut [f32]>,
) {
    let width = gain.len();
    let n = width as f32;
    for (row, (x, dy)) in x
        .chunks_exact(width)
        .zip(dy.chunks_exact(width))
        .enumerate()
    {
        let [mean, rstd] = stats[row];
        let [sum_d, sum_d_xhat] = gain_gradient_and_sums(x, dy, gain, [mean, rstd], dgain);
        if let Some(dx) = dx.as_deref_mut() {
            let dx = &mut dx[row * width..(row + 1) * width];
            let (mean_d, mean_d_xhat) = (sum_d / n, sum_d_xhat / n);
            // `dx = (dŷ - mean(dŷ) - x̂ · mean(dŷ · x̂)) · rstd` with `dŷ = dy · gain`.
            for (((dx, &x), &dy), &g) in dx.iter_mut().zip(x).zip(dy).zip(gain) {
                let xhat = (x - mean) * rstd;
                *dx = (dy * g - mean_d - xhat * mean_d_xhat) * rstd;
            }
        }
    }
}

/// One pass over a row: `dgain += dy · x̂`, and the sums of `dŷ = dy · gain` and of `dŷ · x̂`
/// (in lanes, as [`lane_sum`]).
#[inline(always)]
fn gain_gradient_and_sums(
    x: &[f32],
    dy: &[f32],
    gain: &[f32],
    [mean, rstd]: RowStats,
    dgain: &mut [f32],
) -> [f32; 2] {
    let mut sums = [[0.0f32; LANES]; 2];
    let mut add = |lane: usize, x: f32, dy: f32, g: f32, dg: &mut f32| {
        let xhat = (x - mean) * rstd;
        let d = dy * g;
        *dg += dy * xhat;
        sums[0][lane] += d;
        sums[1][lane] += d * xhat;
    };
    let (x_blocks, x_rest) = x.as_chunks::<LANES>();
    let (dy_blocks, dy_rest) = dy.as_chunks::<LANES>();
    let (gain_blocks, gain_rest) = gain.as_chunks::<LANES>();
    let (dgain_blocks, dgain_rest) = dgain.as_chunks_mut::<LANES>();
    let blocks = x_blocks.iter().zip(dy_blocks).zip(gain_blocks);
    for (((x, dy), g), dg) in blocks.zip(dgain_blocks) {
        for lane in 0..LANES {
            add(lane, x[lane], dy[lane], g[lane], &mut dg[lane]);
        }
    }
    let rest = x_rest.iter().zip(dy_rest).zip(gain_rest).zip(dgain_rest);
    for (lane, (((&x, &dy), &g), dg)) in rest.enumerate() {
        add(lane, x, dy, g, dg);
    }
    [add_lanes(sums[0]), add_lanes(sums[1])]
}

/// `Σ f(a[i], b[i])` (`a` and `b` of the same length) in [`LANES`] partial sums, element `i` in
/// sum `i % LANES`, then added pairwise: the same order at any vector width.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut sums = [0.0f32; LANES];
    let (a_blocks, a_rest) = a.as_chunks::<LANES>();
    let (b_blocks, b_rest) = b.as_chunks::<LANES>();
    for (a, b) in a_blocks.iter().zip(b_blocks) {
        for lane in 0..LANES {
            sums[lane] += f(a[lane], b[lane]);
        }
    }
    for (lane, (&a, &b)) in a_rest.iter().zip(b_rest).enumerate() {
        sums[lane] += f(a, b);
    }
    add_lanes(sums)
}

/// The sum of the lanes' partial sums, added pairwise (lane `i` and `i + LANES / 2` first).
#[inline(always)]
fn add_lanes(mut sums: [f32; LANES]) -> f32 {
    let mut half = LANES;
    while half > 1 {
        half /= 2;
        for lane in 0..half {
            sums[lane] += sums[lane + half];
        }
    }
    sums[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values;
    use crate::kernels::values::Format;

    /// LayerNorm and its gradients in f64, from the definition.
    fn reference(x: &[f32], gain: &[f32], dy: &[f32]) -> [Vec<f64>; 3] {
        let width = gain.len();
        let (mut y, mut dx, mut dgain) = (vec![], vec![], vec![0.0; width]);
        for (x, dy) in x.chunks(width).zip(dy.chunks(width)) {
            let n = width as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let rstd = 1.0 / (var + EPS as f64).sqrt();
            let xhat: Vec<f64> = x.iter().map(|&v| (v as f64 - mean) * rstd).collect();
            let d: Vec<f64> = dy
                .iter()
                .zip(gain)
                .map(|(&d, &g)| d as f64 * g as f64)
                .collect();
            let mean_d = d.iter().sum::<f64>() / n;
            let mean_dx = d.iter().zip(&xhat).map(|(d, h)| d * h).sum::<f64>() / n;
            for i in 0..width {
                y.push(xhat[i] * gain[i] as f64);
                dx.push((d[i] - mean_d - xhat[i] * mean_dx) * rstd);
                dgain[i] += dy[i] as f64 * xhat[i];
            }
        }
        [y, dx, dgain]
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: size");
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * scale,
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Widths with and without a partial block of lanes; row counts over and under a chunk.
    #[test]
    fn forward_and_backward_match_the_definition() {
        for (rows, width) in [(37, 24), (2 * ROWS + 5, 128), (3, 5), (1, 1)] {
            let x: Vec<f32> = test_values(rows * width, 1)
                .iter()
                .map(|v| v * 3.0 + 0.5)
                .collect();
            let gain = test_values(width, 2);
            let dy = test_values(rows * width, 3);
            let out = forward(Values::from(&x), Values::from(&gain), width);
            let [y, dx, dgain] = reference(&x, &gain, &dy);
            assert_close(&out.y.clone().into_f32(), &y, "output");
            let g = backward(
                Values::from(&x),
                Values::from(&gain),
                &out.stats,
                Values::from(&dy),
                width,
                true,
            );
            assert_close(&g.x.unwrap().into_f32(), &dx, "input gradient");
            assert_close(&g.gain, &dgain, "gain gradient");
            let only_gain = backward(
                Values::from(&x),
                Values::from(&gain),
                &out.stats,
                Values::from(&dy),
                width,
                false,
            );
            assert!(only_gain.x.is_none());
            assert_eq!(only_gain.gain, g.gain);
        }
    }

    /// The same bits in pools of 1 and 3 threads, with several chunks of rows.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (rows, width) = (5 * ROWS + 3, 40);
        let x = test_values(rows * width, 4);
        let gain = test_values(width, 5);
        let dy = test_values(rows * width, 6);
        let run = || {
            let out = forward(Values::from(&x), Values::from(&gain), width);
            let g = backward(
                Values::from(&x),
                Values::from(&gain),
                &out.stats,
                Values::from(&dy),
                width,
                true,
            );
            (out, g)
        };
        let in_pool = |threads| crate::test_data::in_pool(threads, run);
        let (one, three) = (in_pool(1), in_pool(3));
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.0.y.into_f32()), bits(&three.0.y.into_f32()));
        assert_eq!(one.0.stats, three.0.stats);
        assert_eq!(
            bits(&one.1.x.unwrap().into_f32()),
            bits(&three.1.x.unwrap().into_f32())
        );
        assert_eq!(bits(&one.1.gain), bits(&three.1.gain));
    }

    /// A bf16 input gives the f32 kernel's results on the widened values, rounded once.
    #[test]
    fn half_inputs_give_the_f32_results_rounded() {
        let (rows, width) = (ROWS + 7, 24);
        let x = Buffer::from_f32(test_values(rows * width, 7), Format::Bf16);
        let gain = Buffer::from_f32(test_values(width, 8), Format::Bf16);
        let dy = Buffer::from_f32(test_values(rows * width, 9), Format::Bf16);
        let wide = |b: &Buffer| b.clone().into_f32();
        let (x32, gain32, dy32) = (wide(&x), wide(&gain), wide(&dy));
        let out = forward(x.values(), gain.values(), width);
        let want = forward(Values::from(&x32), Values::from(&gain32), width);
        assert_eq!(out.y, Buffer::from_f32(want.y.into_f32(), Format::Bf16));
        assert_eq!(out.stats, want.stats);
        let g = backward(
            x.values(),
            gain.values(),
            &out.stats,
            dy.values(),
            width,
            true,
        );
        let w = backward(
            Values::from(&x32),
            Values::from(&gain32),
            &want.stats,
            Values::from(&dy32),
            width,
            true,
        );
        let dx = w.x.unwrap().into_f32();
        assert_eq!(g.x.unwrap(), Buffer::from_f32(dx, Format::Bf16));
        assert_eq!(g.gain, w.gain);
    }

    #[test]
    fn lane_sums_take_every_element_once() {
        for len in [0, 1, 15, 16, 17, 40, 128] {
            let v: Vec<f32> = (1..=len).map(|i| i as f32).collect();
            let want = (len * (len + 1) / 2) as f32;
            assert_eq!(lane_sum(&v, &v, |a, _| a), want, "length {len}");
        }
    }
}
