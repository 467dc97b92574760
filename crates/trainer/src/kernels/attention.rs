//! Causal multi-head self-attention on plain f32 slices, forward and backward: nanoGPT's
//! `CausalSelfAttention` between its two projections, PyTorch's
//! `scaled_dot_product_attention(q, k, v, is_causal=True)`.
//!
//! The input is the `c_attn` projection's output `qkv: [batch, time, 3 * width]`: queries, keys
//! and values side by side, each `width` columns cut into `heads` heads of `width / heads`
//! columns. For every (sample, head) pair: `softmax(q kᵀ / sqrt(head_dim))` over the keys up to
//! the query's own position, times the values; the heads' outputs side by side again:
//! `[batch, time, width]`.
//!
//! Every pair is one rayon task, computed whole on its thread with single-threaded GEMMs (the
//! `gemm` crate) on strided views of `qkv`; only the factor that a product reads transposed (the
//! keys in `q kᵀ`, the values in `dO vᵀ`) is copied out, transposed, into the task's scratch. A
//! task writes only its own head's columns of its own sample's rows, and no sum crosses pairs,
//! so the results do not depend on the thread count. The products skip the masked upper
//! triangle in row blocks of [`BLOCK`]: rows `r0..r1` of the scores need the keys `0..r1` only.
//! The softmax rows and the transpositions run in 8 vector lanes ([`simd`]).
//!
//! The forward pass keeps the softmax probabilities, `[batch, heads, time, time]` in f32, for the
//! backward pass, which then needs neither an exponential nor the product `q kᵀ` again. At the
//! character-level GPT's shape (batch 12, time 64, 4 heads) that is 0.75 MiB a layer; it grows
//! with the square of the context, where keeping each row's log-sum-exp and recomputing the
//! scores would start to pay.

use std::marker::PhantomData;

use rayon::prelude::*;

/// Rows of the scores per causal block: each block's products stop at its last row's keys.
/// Smaller blocks skip more of the masked triangle (at time 64, blocks of 16 compute 5/8 of the
/// full products, blocks of 8 9/16) but make more, smaller GEMM calls; 16 was the fastest of 8,
/// 16, 32 and 64 at the GPT's shape.
pub const BLOCK: usize = 16;

/// The sizes of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub time: usize,
    /// Columns of q (and of k, of v and of the output): `heads * head_dim`.
    pub width: usize,
    pub heads: usize,
}

impl AttentionShape {
    /// The shape of an attention over `qkv: [batch, time, columns]` with `heads` heads.
    ///
    /// # Panics
    /// When `columns` is not `3 * heads * head_dim`, or `heads` is zero.
    pub fn of_qkv([batch, time, columns]: [usize; 3], heads: usize) -> Self {
        assert!(
            heads > 0 && columns % (3 * heads) == 0,
            "causal attention: {columns} columns are not q, k and v of {heads} equal heads"
        );
        Self {
            batch,
            time,
            width: columns / 3,
            heads,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    fn pairs(&self) -> usize {
        self.batch * self.heads
    }

    pub fn qkv_len(&self) -> usize {
        self.batch * self.time * 3 * self.width
    }

    pub fn output_len(&self) -> usize {
        self.batch * self.time * self.width
    }

    pub fn probs_len(&self) -> usize {
        self.pairs() * self.time * self.time
    }

    /// Where pair `pair` (sample `pair / heads`, head `pair % heads`) starts in `qkv` (and in
    /// its gradient) and in the output.
    fn pair_at(&self, pair: usize) -> PairAt {
        let (sample, head) = (pair / self.heads, pair % self.heads);
        let q = sample * self.time * 3 * self.width + head * self.head_dim();
        PairAt {
            q,
            k: q + self.width,
            v: q + 2 * self.width,
            output: sample * self.time * self.width + head * self.head_dim(),
        }
    }
}

/// The first element of one pair's q, k and v in `qkv`, and of its output columns.
struct PairAt {
    q: usize,
    k: usize,
    v: usize,
    output: usize,
}

/// `[batch, time, width]`: the attention of every query over the keys up to its own position,
/// and, when `keep_probs`, the softmax probabilities `[batch, heads, time, time]` (zero above
/// each row's diagonal) that [`backward`] needs. With a dropout `mask` (`[batch, heads, time,
/// time]`: 0, or the factor that keeps an element), the probabilities are multiplied by it
/// before they weigh the values; the kept probabilities are the unmasked ones.
///
/// # Panics
/// When `qkv` or `mask` does not have the size of `s`.
pub fn forward(
    qkv: &[f32],
    s: AttentionShape,
    keep_probs: bool,
    mask: Option<&[f32]>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    assert_eq!(qkv.len(), s.qkv_len(), "causal attention: qkv size");
    assert!(
        mask.is_none_or(|m| m.len() == s.probs_len()),
        "causal attention: mask size"
    );
    let mut output = vec![0.0f32; s.output_len()];
    let mut probs = keep_probs.then(|| vec![0.0f32; s.probs_len()]);
    if output.is_empty() {
        return (output, probs);
    }
    let dst = SharedRows::new(&mut output);
    let scratch = || Scratch::new(s);
    match &mut probs {
        Some(kept) => kept
            .par_chunks_mut(s.time * s.time)
            .enumerate()
            .for_each_init(scratch, |scratch, (pair, probs)| {
                let Scratch {
                    transposed, masked, ..
                } = scratch;
                let mask = pair_mask(mask, s, pair).map(|m| (m, masked.as_mut_slice()));
                pair_forward(qkv, s, pair, probs, transposed, mask, dst)
            }),
        None => (0..s.pairs())
            .into_par_iter()
            .for_each_init(scratch, |scratch, pair| {
                let Scratch {
                    square,
                    transposed,
                    masked,
                } = scratch;
                let mask = pair_mask(mask, s, pair).map(|m| (m, masked.as_mut_slice()));
                pair_forward(qkv, s, pair, square, transposed, mask, dst)
            }),
    }
    (output, probs)
}

/// The gradient of [`forward`]'s output with respect to `qkv`, given `qkv`, the probabilities
/// [`forward`] kept and the output's gradient `d_output: [batch, time, width]`.
///
/// # Panics
/// When a slice does not have the size of `s`.
pub fn backward(
    qkv: &[f32],
    probs: &[f32],
    d_output: &[f32],
    s: AttentionShape,
    mask: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(qkv.len(), s.qkv_len(), "causal attention: qkv size");
    assert_eq!(
        probs.len(),
        s.probs_len(),
        "causal attention: probabilities size"
    );
    assert_eq!(
        d_output.len(),
        s.output_len(),
        "causal attention: gradient size"
    );
    let mut d_qkv = vec![0.0f32; s.qkv_len()];
    if d_output.is_empty() {
        return d_qkv;
    }
    let square = s.time * s.time;
    let dst = SharedRows::new(&mut d_qkv);
    (0..s.pairs()).into_par_iter().for_each_init(
        || Scratch::new(s),
        |scratch, pair| {
            let probs = &probs[pair * square..][..square];
            let mask = pair_mask(mask, s, pair);
            pair_backward(qkv, probs, mask, d_output, s, pair, scratch, dst);
        },
    );
    d_qkv
}

/// A task's working memory, reused from pair to pair: every pair writes what it reads.
struct Scratch {
    /// `time x time`: scores and probabilities, or their gradients.
    square: Vec<f32>,
    /// `head_dim x time`: a head's keys or values, transposed.
    transposed: Vec<f32>,
    /// `time x time`, with dropout: the probabilities times the mask.
    masked: Vec<f32>,
}

impl Scratch {
    fn new(s: AttentionShape) -> Self {
        Self {
            square: vec![0.0; s.time * s.time],
            transposed: vec![0.0; s.head_dim() * s.time],
            masked: vec![0.0; s.time * s.time],
        }
    }
}

/// Pair `pair`'s `time x time` part of a dropout mask.
fn pair_mask(mask: Option<&[f32]>, s: AttentionShape, pair: usize) -> Option<&[f32]> {
    let square = s.time * s.time;
    mask.map(|m| &m[pair * square..][..square])
}

/// `probs` times `mask`, element by element, into `out`.
fn apply_mask(probs: &[f32], mask: &[f32], out: &mut [f32]) {
    for ((o, p), m) in out.iter_mut().zip(probs).zip(mask) {
        *o = p * m;
    }
}

/// The `time x head_dim` block of `qkv` at `start` (rows `row` apart), transposed into `dst`,
/// row-major `head_dim x time`. The products `q kᵀ` and `dO vᵀ` read it so: `gemm` wants its
/// right factor's rows contiguous, and would pack a strided one again in every call.
fn transpose_head(qkv: &[f32], start: usize, row: usize, time: usize, dst: &mut [f32]) {
    let head_dim = dst.len() / time;
    assert!(
        head_dim <= row && start + (time - 1) * row + head_dim <= qkv.len(),
        "causal attention: head outside qkv"
    );
    simd::transpose(&qkv[start..], row, time, dst);
}

/// One pair's forward pass: its scores, then probabilities, in `probs` (`time x time`), and its
/// output columns in `output`. `transposed` (`head_dim x time`, any contents) takes its keys.
fn pair_forward(
    qkv: &[f32],
    s: AttentionShape,
    pair: usize,
    probs: &mut [f32],
    transposed: &mut [f32],
    mask: Option<(&[f32], &mut [f32])>,
    output: SharedRows<'_>,
) {
    let (time, head_dim, row) = (s.time, s.head_dim(), 3 * s.width);
    let at = s.pair_at(pair);
    transpose_head(qkv, at.k, row, time, transposed);
    let (q, k_t, v) = (
        View::rows(qkv, at.q, row),
        View::rows(transposed, 0, time),
        View::rows(qkv, at.v, row),
    );
    let scale = 1.0 / (head_dim as f32).sqrt();
    for (r0, r1) in blocks(time) {
        let dims = (r1 - r0, head_dim, r1);
        product_into(&mut probs[r0 * time..], time, q.at(r0, 0), k_t, dims, scale);
    }
    for (query, row) in probs.chunks_exact_mut(time).enumerate() {
        causal_softmax(row, query);
    }
    // With dropout the values are weighed by the masked probabilities; `probs` keeps the
    // softmax's own for the backward pass.
    let weights: &[f32] = match mask {
        Some((mask, masked)) => {
            apply_mask(probs, mask, masked);
            masked
        }
        None => probs,
    };
    let p = View::rows(weights, 0, time);
    for (r0, r1) in blocks(time) {
        let dst = (at.output + r0 * s.width, s.width);
        // SAFETY: rows `r0..r1` of this pair's head columns of its sample's output: written by
        // this task alone (every pair has its own sample and head).
        unsafe { product(output, dst, p.at(r0, 0), v, (r1 - r0, r1, head_dim), 1.0) };
    }
}

/// One pair's backward pass: its columns of q's, k's and v's gradients in `d_qkv`. The
/// scratch's square holds the probabilities' gradient, then the scores'.
#[allow(clippy::too_many_arguments)]
fn pair_backward(
    qkv: &[f32],
    probs: &[f32],
    mask: Option<&[f32]>,
    d_output: &[f32],
    s: AttentionShape,
    pair: usize,
    scratch: &mut Scratch,
    d_qkv: SharedRows<'_>,
) {
    let (time, head_dim, row) = (s.time, s.head_dim(), 3 * s.width);
    let at = s.pair_at(pair);
    transpose_head(qkv, at.v, row, time, &mut scratch.transposed);
    let (q, k, v_t) = (
        View::rows(qkv, at.q, row),
        View::rows(qkv, at.k, row),
        View::rows(&scratch.transposed, 0, time),
    );
    let d_out = View::rows(d_output, at.output, s.width);
    // The values were weighed by the masked probabilities, with dropout.
    let weights: &[f32] = match mask {
        Some(mask) => {
            apply_mask(probs, mask, &mut scratch.masked);
            &scratch.masked
        }
        None => probs,
    };
    let p = View::rows(weights, 0, time);
    let scale = 1.0 / (head_dim as f32).sqrt();
    // SAFETY (of every `product` into `d_qkv` below): the rows written lie in this pair's head
    // columns of q, k or v of its own sample, which no other task writes.

    // dV = Pᵀ · dO: key `j` collects the gradients of the queries from `j` on.
    for (c0, c1) in blocks(time) {
        let dst = (at.v + c0 * row, row);
        let dims = (c1 - c0, time - c0, head_dim);
        unsafe { product(d_qkv, dst, p.at(c0, c0).t(), d_out.at(c0, 0), dims, 1.0) };
    }
    // dP = dO · Vᵀ, then the softmax's backward step in place: dS.
    let d_scores = &mut scratch.square;
    for (r0, r1) in blocks(time) {
        let dims = (r1 - r0, head_dim, r1);
        product_into(
            &mut d_scores[r0 * time..],
            time,
            d_out.at(r0, 0),
            v_t,
            dims,
            1.0,
        );
    }
    // dP' = dO · Vᵀ is the masked probabilities' gradient: the softmax's is dP' times the mask.
    if let Some(mask) = mask {
        d_scores.iter_mut().zip(mask).for_each(|(d, m)| *d *= m);
    }
    for (query, (d_row, p_row)) in d_scores
        .chunks_exact_mut(time)
        .zip(probs.chunks_exact(time))
        .enumerate()
    {
        causal_softmax_backward(d_row, p_row, query);
    }
    let d_scores = View::rows(d_scores, 0, time);
    // dQ = dS · K / sqrt(head_dim)
    for (r0, r1) in blocks(time) {
        let dst = (at.q + r0 * row, row);
        let dims = (r1 - r0, r1, head_dim);
        // SAFETY: this pair's rows of q, as above.
        unsafe { product(d_qkv, dst, d_scores.at(r0, 0), k, dims, scale) };
    }
    // dK = dSᵀ · Q / sqrt(head_dim): key `j` from the queries from `j` on.
    for (c0, c1) in blocks(time) {
        let dst = (at.k + c0 * row, row);
        let dims = (c1 - c0, time - c0, head_dim);
        // SAFETY: this pair's rows of k, as above.
        unsafe {
            product(
                d_qkv,
                dst,
                d_scores.at(c0, c0).t(),
                q.at(c0, 0),
                dims,
                scale,
            )
        };
    }
}

/// The row blocks `(r0, r1)` of a `time x time` score matrix.
fn blocks(time: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..time)
        .step_by(BLOCK)
        .map(move |r0| (r0, (r0 + BLOCK).min(time)))
}

/// Query `query`'s scores (`row[..=query]`) become its probabilities; the masked ones after it
/// become 0.
fn causal_softmax(row: &mut [f32], query: usize) {
    let (live, masked) = row.split_at_mut(query + 1);
    simd::softmax(live);
    masked.fill(0.0);
}

/// The softmax's backward step for query `query`: its probabilities' gradient `d_row[..=query]`
/// becomes its scores' gradient `p * (dp - Σ p dp)`; the masked ones after it become 0.
fn causal_softmax_backward(d_row: &mut [f32], p_row: &[f32], query: usize) {
    let (live, masked) = d_row.split_at_mut(query + 1);
    simd::softmax_backward(live, &p_row[..=query]);
    masked.fill(0.0);
}

/// The element-wise work of a pair, in [`LANES`] lanes: the softmax and its backward step on
/// one row, and the transposition of a head's keys or values. With AVX2 and FMA where the CPU
/// has them (chosen at run time), else in plain code that does the same operations in the same
/// order, so that both give the same bits. A row's sums run lane by lane over its chunks of
/// [`LANES`] (the last one partial), then over the lanes in order: an order that depends on the
/// row's length alone.
///
/// The exponential is Cephes' `expf` (a degree-5 polynomial after `e^x = 2^n e^r`, within 2 ulp):
/// the C library's, one call per element, would be most of the forward pass.
mod simd {
    pub const LANES: usize = 8;

    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 in two parts: `n * LN2_HI` is exact for the `n` here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// The inputs are clamped to these, where `2^n` stays a normal number. A score 87 below its
    /// row's maximum gets 1.2e-38 instead of less: nothing next to the maximum's 1.
    const EXP_MIN: f32 = -87.336_55;
    const EXP_MAX: f32 = 88.0;
    /// The polynomial's coefficients, highest degree first.
    const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];

    /// `e^x` as the vector version computes each lane; NaN stays NaN.
    #[inline(always)]
    fn exp(x: f32) -> f32 {
        let x = x.clamp(EXP_MIN, EXP_MAX);
        let n = (x * LOG2_E).round_ties_even();
        let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
        let p = POLY[1..].iter().fold(POLY[0], |p, &c| p.mul_add(r, c));
        let y = (p * r).mul_add(r, r) + 1.0;
        // `n` is an integer in -126..=127 (NaN gives 0 and a NaN `y`).
        y * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    /// `values` (a whole row, none masked) become their softmax.
    pub fn softmax(values: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA, checked just above.
                return unsafe { x86::softmax(values) };
            }
        }
        softmax_plain(values)
    }

    /// The gradient of a softmax's output `dp` becomes that of its input: `p * (dp - Σ p dp)`.
    pub fn softmax_backward(dp: &mut [f32], p: &[f32]) {
        assert_eq!(dp.len(), p.len(), "softmax backward: lengths");
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA, checked just above; the lengths are equal.
                return unsafe { x86::softmax_backward(dp, p) };
            }
        }
        softmax_backward_plain(dp, p)
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) fn has_avx2_fma() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    /// `dst[c * rows + r] = src[r * stride + c]` for `r < rows`, `c < dst.len() / rows`.
    pub fn transpose(src: &[f32], stride: usize, rows: usize, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA, checked just above.
                return unsafe { x86::transpose(src, stride, rows, dst) };
            }
        }
        transpose_plain(src, stride, rows, dst, (0, 0))
    }

    /// [`transpose`] of the rows and columns from `(first_row, first_col)` on.
    pub(super) fn transpose_plain(
        src: &[f32],
        stride: usize,
        rows: usize,
        dst: &mut [f32],
        (first_row, first_col): (usize, usize),
    ) {
        let cols = dst.len() / rows;
        for r in 0..rows {
            let source = &src[r * stride..][..cols];
            let first_col = if r < first_row { first_col } else { 0 };
            for (c, &value) in source.iter().enumerate().skip(first_col) {
                dst[c * rows + r] = value;
            }
        }
    }

    /// The lanes summed in order.
    fn sum_lanes(lanes: [f32; LANES]) -> f32 {
        lanes.iter().fold(0.0, |sum, &v| sum + v)
    }

    /// A row's last, partial chunk goes into lanes `0..len`: the vector code pads it with values
    /// that change no lane (`-inf` for the maximum, 0 for the sums).
    pub(super) fn softmax_plain(values: &mut [f32]) {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        for chunk in values.chunks(LANES) {
            for (m, &v) in lanes.iter_mut().zip(chunk) {
                // Keeps `m` when `v` is NaN, as the vector maximum does.
                *m = if v > *m { v } else { *m };
            }
        }
        // Shifted by the maximum so that no exponential overflows; a NaN makes the row NaN.
        let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sums = [0.0f32; LANES];
        for chunk in values.chunks_mut(LANES) {
            for (sum, v) in sums.iter_mut().zip(chunk) {
                *v = exp(*v - max);
                *sum += *v;
            }
        }
        let inverse = 1.0 / sum_lanes(sums);
        values.iter_mut().for_each(|v| *v *= inverse);
    }

    pub(super) fn softmax_backward_plain(dp: &mut [f32], p: &[f32]) {
        let mut sums = [0.0f32; LANES];
        for (d, p) in dp.chunks(LANES).zip(p.chunks(LANES)) {
            for ((sum, &d), &p) in sums.iter_mut().zip(d).zip(p) {
                *sum = d.mul_add(p, *sum);
            }
        }
        let dot = sum_lanes(sums);
        for (d, &p) in dp.iter_mut().zip(p) {
            *d = p * (*d - dot);
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use super::*;

        /// [`super::exp`] in 8 lanes, the same operations.
        #[target_feature(enable = "avx2,fma")]
        fn exp8(x: __m256) -> __m256 {
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            // `min`/`max` return their second operand when one is NaN: the NaN stays.
            let x = _mm256_min_ps(_mm256_set1_ps(EXP_MAX), x);
            let x = _mm256_max_ps(_mm256_set1_ps(EXP_MIN), x);
            let n = _mm256_round_ps::<NEAREST>(_mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)));
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(POLY[0]);
            for &c in &POLY[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let one = _mm256_set1_ps(1.0);
            let y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), one);
            let n = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n)))
        }

        #[target_feature(enable = "avx2,fma")]
        fn load8(chunk: &[f32; LANES]) -> __m256 {
            // SAFETY: `chunk` holds 8 values.
            unsafe { _mm256_loadu_ps(chunk.as_ptr()) }
        }

        #[target_feature(enable = "avx2,fma")]
        fn store8(chunk: &mut [f32; LANES], v: __m256) {
            // SAFETY: `chunk` holds 8 values.
            unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), v) }
        }

        /// The 8 values of `chunk`, or its values then `pad` for a shorter one.
        #[target_feature(enable = "avx2,fma")]
        fn load(chunk: &[f32], pad: f32) -> __m256 {
            let mut lanes = [pad; LANES];
            let values = if chunk.len() == LANES {
                chunk
            } else {
                lanes[..chunk.len()].copy_from_slice(chunk);
                &lanes
            };
            // SAFETY: `values` holds 8 values.
            unsafe { _mm256_loadu_ps(values.as_ptr()) }
        }

        /// Writes the first `chunk.len()` lanes of `v` into `chunk` (at most 8).
        #[target_feature(enable = "avx2,fma")]
        fn store(chunk: &mut [f32], v: __m256) {
            if chunk.len() == LANES {
                // SAFETY: `chunk` holds 8 values.
                unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), v) }
            } else {
                chunk.copy_from_slice(&lanes(v)[..chunk.len()]);
            }
        }

        /// The lanes of `v` past the first `len` set to 0.
        #[target_feature(enable = "avx2,fma")]
        fn keep_first(v: __m256, len: usize) -> __m256 {
            if len == LANES {
                return v;
            }
            let mut values = lanes(v);
            values[len..].fill(0.0);
            // SAFETY: `values` holds 8 values.
            unsafe { _mm256_loadu_ps(values.as_ptr()) }
        }

        #[target_feature(enable = "avx2,fma")]
        fn lanes(v: __m256) -> [f32; LANES] {
            let mut values = [0.0f32; LANES];
            // SAFETY: `values` holds 8 values.
            unsafe { _mm256_storeu_ps(values.as_mut_ptr(), v) };
            values
        }

        /// [`super::transpose`] in blocks of 8 x 8, the rest by the plain code.
        ///
        /// # Safety
        /// The CPU must have AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn transpose(src: &[f32], stride: usize, rows: usize, dst: &mut [f32]) {
            let cols = dst.len() / rows;
            let (full_rows, full_cols) = (rows / LANES * LANES, cols / LANES * LANES);
            for r in (0..full_rows).step_by(LANES) {
                for c in (0..full_cols).step_by(LANES) {
                    let block: [__m256; LANES] = std::array::from_fn(|i| {
                        load8(src[(r + i) * stride + c..][..LANES].try_into().unwrap())
                    });
                    for (i, column) in transpose8(block).into_iter().enumerate() {
                        let out = &mut dst[(c + i) * rows + r..][..LANES];
                        store8(out.try_into().unwrap(), column);
                    }
                }
            }
            // The columns past the blocks' in their rows, then the rows past the blocks'.
            super::transpose_plain(src, stride, rows, dst, (full_rows, full_cols));
        }

        /// The columns of an 8 x 8 block given as its rows.
        #[target_feature(enable = "avx2,fma")]
        fn transpose8(r: [__m256; LANES]) -> [__m256; LANES] {
            let t = [
                _mm256_unpacklo_ps(r[0], r[1]),
                _mm256_unpackhi_ps(r[0], r[1]),
                _mm256_unpacklo_ps(r[2], r[3]),
                _mm256_unpackhi_ps(r[2], r[3]),
                _mm256_unpacklo_ps(r[4], r[5]),
                _mm256_unpackhi_ps(r[4], r[5]),
                _mm256_unpacklo_ps(r[6], r[7]),
                _mm256_unpackhi_ps(r[6], r[7]),
            ];
            let u = [
                _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
            ];
            [
                _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
                _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
                _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
                _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
                _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
                _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
                _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
                _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
            ]
        }

        /// [`super::softmax_plain`] in 8 lanes.
        ///
        /// # Safety
        /// The CPU must have AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn softmax(values: &mut [f32]) {
            let (body, tail) = values.as_chunks_mut::<LANES>();
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            for chunk in body.iter() {
                m = _mm256_max_ps(load8(chunk), m);
            }
            m = _mm256_max_ps(load(tail, f32::NEG_INFINITY), m);
            let max = lanes(m).iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let (max8, mut sums) = (_mm256_set1_ps(max), _mm256_setzero_ps());
            for chunk in body.iter_mut() {
                let e = exp8(_mm256_sub_ps(load8(chunk), max8));
                store8(chunk, e);
                sums = _mm256_add_ps(sums, e);
            }
            if !tail.is_empty() {
                let e = exp8(_mm256_sub_ps(load(tail, 0.0), max8));
                store(tail, e);
                sums = _mm256_add_ps(sums, keep_first(e, tail.len()));
            }
            let inverse = 1.0 / sum_lanes(lanes(sums));
            let inverse8 = _mm256_set1_ps(inverse);
            for chunk in body.iter_mut() {
                store8(chunk, _mm256_mul_ps(load8(chunk), inverse8));
            }
            tail.iter_mut().for_each(|v| *v *= inverse);
        }

        /// [`super::softmax_backward_plain`] in 8 lanes.
        ///
        /// # Safety
        /// The CPU must have AVX2 and FMA; `dp` and `p` must have the same length.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn softmax_backward(dp: &mut [f32], p: &[f32]) {
            let (d_body, d_tail) = dp.as_chunks_mut::<LANES>();
            let (p_body, p_tail) = p.as_chunks::<LANES>();
            let mut sums = _mm256_setzero_ps();
            for (d, p) in d_body.iter().zip(p_body) {
                sums = _mm256_fmadd_ps(load8(d), load8(p), sums);
            }
            sums = _mm256_fmadd_ps(load(d_tail, 0.0), load(p_tail, 0.0), sums);
            let dot = sum_lanes(lanes(sums));
            let dot8 = _mm256_set1_ps(dot);
            for (d, p) in d_body.iter_mut().zip(p_body) {
                store8(d, _mm256_mul_ps(load8(p), _mm256_sub_ps(load8(d), dot8)));
            }
            for (d, &p) in d_tail.iter_mut().zip(p_tail) {
                *d = p * (*d - dot);
            }
        }
    }
}

/// A read-only strided matrix: element `(i, j)` at `data[start + i * row_stride + j *
/// col_stride]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    start: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    /// Rows of `row_stride` elements from `start` on.
    fn rows(data: &'a [f32], start: usize, row_stride: usize) -> Self {
        Self {
            data,
            start,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose.
    fn t(self) -> Self {
        Self {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The view that starts at element `(row, col)` of this one.
    fn at(self, row: usize, col: usize) -> Self {
        Self {
            start: self.start + row * self.row_stride + col * self.col_stride,
            ..self
        }
    }

    /// The first element, after asserting that an `rows x cols` block lies inside the slice.
    fn checked_ptr(self, rows: usize, cols: usize) -> *const f32 {
        let last = self.start + (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "causal attention: operand too small"
        );
        self.data[self.start..].as_ptr()
    }
}

/// A row-major buffer that the pairs' tasks write at the same time, each its own elements.
#[derive(Clone, Copy)]
struct SharedRows<'a> {
    ptr: *mut f32,
    len: usize,
    _buffer: PhantomData<&'a mut [f32]>,
}

// SAFETY: the tasks write disjoint elements only (the contract of `product`), and nothing reads
// the buffer until they are done.
unsafe impl Send for SharedRows<'_> {}
unsafe impl Sync for SharedRows<'_> {}

impl<'a> SharedRows<'a> {
    fn new(buffer: &'a mut [f32]) -> Self {
        Self {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
            _buffer: PhantomData,
        }
    }
}

/// `a · b` times `scale` into `dst` (overwritten) for an `m x k` view `a` and a `k x n` view
/// `b`, as one single-threaded GEMM: `dst` is the contiguous buffer itself, its rows `stride`
/// apart.
fn product_into(
    dst: &mut [f32],
    stride: usize,
    a: View<'_>,
    b: View<'_>,
    dims: (usize, usize, usize),
    scale: f32,
) {
    // SAFETY: `dst` is borrowed mutably: nothing else reads or writes it during the call.
    unsafe { product(SharedRows::new(dst), (0, stride), a, b, dims, scale) }
}

/// `dst[start + i * stride + j] = scale * Σ_l a[i, l] b[l, j]` for `i < m`, `j < n`, as one
/// single-threaded GEMM: the order of every sum depends on the shapes alone.
///
/// # Safety
/// No other thread may read or write those elements of `dst` during the call.
unsafe fn product(
    dst: SharedRows<'_>,
    (start, stride): (usize, usize),
    a: View<'_>,
    b: View<'_>,
    (m, k, n): (usize, usize, usize),
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m == 1 || stride >= n) && start + (m - 1) * stride + n <= dst.len,
        "causal attention: destination too small"
    );
    if k == 0 {
        for i in 0..m {
            // SAFETY: row `i` of the block, inside the buffer (asserted), ours alone.
            unsafe { std::ptr::write_bytes(dst.ptr.add(start + i * stride), 0, n) };
        }
        return;
    }
    let (a_ptr, b_ptr) = (a.checked_ptr(m, k), b.checked_ptr(k, n));
    // SAFETY: every element read lies inside `a` and `b` and every one written inside `dst`
    // (asserted); the caller vouches that those are this thread's alone; `Parallelism::None`
    // keeps the product on this thread.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.ptr.add(start),
            1,
            stride as isize,
            false,
            a_ptr,
            a.col_stride as isize,
            a.row_stride as isize,
            b_ptr,
            b.col_stride as isize,
            b.row_stride as isize,
            0.0,
            scale,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention of one pair straight from its definition, in f64.
    fn reference_output(qkv: &[f32], s: AttentionShape) -> Vec<f64> {
        let (time, hd, w) = (s.time, s.head_dim(), s.width);
        let mut out = vec![0.0f64; s.output_len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let at = |t: usize, part: usize, c: usize| {
                    f64::from(qkv[(b * time + t) * 3 * w + part * w + h * hd + c])
                };
                for i in 0..time {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| (0..hd).map(|c| at(i, 0, c) * at(j, 1, c)).sum::<f64>())
                        .map(|dot| dot / (hd as f64).sqrt())
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..hd {
                        let value: f64 = (0..=i).map(|j| e[j] / total * at(j, 2, c)).sum();
                        out[(b * time + i) * w + h * hd + c] = value;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn output_matches_its_definition_across_blocks() {
        for (batch, time, heads, head_dim) in [(2, 2 * BLOCK + 5, 3, 4), (1, 1, 2, 3)] {
            let s = AttentionShape {
                batch,
                time,
                width: heads * head_dim,
                heads,
            };
            let qkv = super::super::test_values(s.qkv_len(), 5);
            let (out, probs) = forward(&qkv, s, true, None);
            let want = reference_output(&qkv, s);
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() < 1e-5,
                    "[{i}]: {got} vs {want}"
                );
            }
            let probs = probs.expect("kept probabilities");
            for (row, p) in probs.chunks_exact(time).enumerate() {
                let query = row % time;
                let total: f32 = p.iter().sum();
                assert!((total - 1.0).abs() < 1e-5, "row {row} sums to {total}");
                assert!(p[query + 1..].iter().all(|&v| v == 0.0), "row {row} masked");
            }
        }
    }

    /// The row kernels against the softmax in f64, and the vector code against the plain one,
    /// bit for bit, over every tail length.
    #[test]
    fn softmax_rows_are_accurate_and_the_same_in_both_codes() {
        for len in [1, 2, 7, 8, 9, 16, 31, 64, 67] {
            let scores: Vec<f32> = super::super::test_values(len, len as u32)
                .iter()
                .map(|v| v * 30.0)
                .collect();
            let mut p = scores.clone();
            simd::softmax(&mut p);
            let max = scores
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let e: Vec<f64> = scores.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for (i, (&got, want)) in p.iter().zip(e.iter().map(|v| v / total)).enumerate() {
                // A score far below the maximum carries the rounding of its f32 difference.
                let error = (f64::from(got) - want).abs();
                assert!(error <= 1e-5 * want + 1e-7, "{len}[{i}]: {got} vs {want}");
            }
            let mut plain = scores.clone();
            simd::softmax_plain(&mut plain);
            assert_eq!(bits(&p), bits(&plain), "softmax of {len}");

            let dp = super::super::test_values(len, 100 + len as u32);
            let (mut ds, mut ds_plain) = (dp.clone(), dp.clone());
            simd::softmax_backward(&mut ds, &p);
            simd::softmax_backward_plain(&mut ds_plain, &p);
            assert_eq!(bits(&ds), bits(&ds_plain), "softmax backward of {len}");
            let dot: f64 = dp
                .iter()
                .zip(&p)
                .map(|(&d, &p)| f64::from(d) * f64::from(p))
                .sum();
            for (i, ((&got, &d), &p)) in ds.iter().zip(&dp).zip(&p).enumerate() {
                let want = f64::from(p) * (f64::from(d) - dot);
                assert!(
                    (f64::from(got) - want).abs() <= 1e-6,
                    "{len}[{i}]: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn transposes_match_the_definition() {
        for (rows, cols, stride) in [
            (13, 11, 20),
            (64, 32, 96),
            (8, 8, 8),
            (1, 3, 3),
            (9, 17, 17),
        ] {
            let src = super::super::test_values(rows * stride, 7);
            let mut fast = vec![f32::NAN; rows * cols];
            simd::transpose(&src, stride, rows, &mut fast);
            let want: Vec<f32> = (0..cols)
                .flat_map(|c| (0..rows).map(move |r| (r, c)))
                .map(|(r, c)| src[r * stride + c])
                .collect();
            assert_eq!(bits(&fast), bits(&want), "{rows} x {cols}");
        }
    }

    #[test]
    fn softmax_rows_keep_nan_and_far_scores() {
        for len in [3, 8, 11] {
            let mut row = vec![1.0f32; len];
            row[len / 2] = f32::NAN;
            simd::softmax(&mut row);
            assert!(row.iter().all(|v| v.is_nan()), "{len}: {row:?}");
        }
        let mut row = [0.0f32, -200.0, 5.0, f32::NEG_INFINITY];
        simd::softmax(&mut row);
        assert!(row.iter().all(|v| v.is_finite()), "{row:?}");
        assert!(row[1] < 1e-37 && row[3] < 1e-37, "{row:?}");
        assert!((row[0] + row[2] - 1.0).abs() < 1e-6, "{row:?}");
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn empty_shapes_give_empty_results() {
        let s = AttentionShape::of_qkv([3, 0, 12], 2);
        let (out, probs) = forward(&[], s, true, None);
        assert!(out.is_empty() && probs.is_some_and(|p| p.is_empty()));
        assert!(backward(&[], &[], &[], s, None).is_empty());
    }

    /// This thread's CPU time: on a machine shared with other work, the time of the
    /// computation itself rather than of the waits for a core.
    fn cpu_now() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write; the clock id is one Linux knows.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime");
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Times one attention layer of the character-level GPT (batch 12, time 64, width 128, 4
    /// heads), forward (keeping the probabilities) and backward, on one thread: the medians of
    /// the thread's CPU time and of the wall time.
    /// `cargo test --workspace time_attention -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn time_attention() {
        use std::time::Instant;
        let s = AttentionShape::of_qkv([12, 64, 3 * 128], 4);
        let qkv = super::super::test_values(s.qkv_len(), 1);
        let d_output = super::super::test_values(s.output_len(), 2);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (reps, warmup) = (300, 30);
        let mut samples = [(); 3].map(|_| Vec::new());
        pool.install(|| {
            for rep in 0..reps + warmup {
                let (start, wall) = (cpu_now(), Instant::now());
                let (out, probs) = forward(&qkv, s, true, None);
                let middle = cpu_now();
                let d_qkv = backward(&qkv, &probs.unwrap_or_default(), &d_output, s, None);
                let (end, wall) = (cpu_now(), wall.elapsed());
                std::hint::black_box((out, d_qkv));
                if rep >= warmup {
                    samples[0].push(middle - start);
                    samples[1].push(end - middle);
                    samples[2].push(wall);
                }
            }
        });
        let [fwd, bwd, wall] = samples.map(|mut v| {
            v.sort();
            v[v.len() / 2].as_secs_f64() * 1e6
        });
        println!(
            "attention {s:?}, 1 thread: CPU time forward {fwd:.0} us + backward {bwd:.0} us = \
             {:.0} us (wall {wall:.0} us)",
            fwd + bwd
        );
    }

    #[test]
    #[should_panic(expected = "10 columns are not q, k and v of 2 equal heads")]
    fn columns_that_do_not_split_into_heads_are_refused() {
        AttentionShape::of_qkv([1, 4, 10], 2);
    }
}
