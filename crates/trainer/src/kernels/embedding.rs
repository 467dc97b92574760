//! Token plus position embedding on plain slices (f32, f16 or bf16; computed in f32), nanoGPT's
//! `wte(idx) + wpe(pos)`: `out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]`.
//!
//! The forward pass writes each position's row on its own (rayon over fixed chunks of
//! positions). The backward pass is two sums per element: `dwte[v]` over the positions holding
//! token `v`, in position order (batch-major, then time), and `dwpe[t]` over the batch, in batch
//! order. Both are computed row by row of the gradient, rayon over fixed chunks of rows, each
//! row's sum in that one order: the result does not depend on the thread count.

use super::build_in_parallel_with;
use super::values::{Buffer, Values, build_as};

/// Positions per rayon task in the forward pass.
const POSITIONS: usize = 64;

/// Rows of `dwte` or `dwpe` per rayon task in the backward pass.
const GRAD_ROWS: usize = 8;

/// The sizes of an embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedShape {
    pub batch: usize,
    pub time: usize,
    /// Rows of the token table `wte`.
    pub vocab: usize,
    /// Rows of the position table `wpe`: at least `time`.
    pub context: usize,
    pub width: usize,
}

impl EmbedShape {
    /// # Panics
    /// When the sizes or a token do not fit.
    fn check(&self, tokens: &[usize]) {
        assert_eq!(
            tokens.len(),
            self.batch * self.time,
            "embed: tokens for [batch, time]"
        );
        assert!(
            self.time <= self.context,
            "embed: {} positions for a context of {}",
            self.time,
            self.context
        );
        if let Some((at, token)) = tokens.iter().enumerate().find(|(_, t)| **t >= self.vocab) {
            panic!(
                "embed: token {token} at [{}, {}] is not below the vocabulary size {}",
                at / self.time.max(1),
                at % self.time.max(1),
                self.vocab
            );
        }
    }
}

/// `[batch, time, width]` in the format of `wte`, for `tokens: [batch, time]` (row-major),
/// `wte: [vocab, width]` and `wpe: [context, width]`.
///
/// # Panics
/// When a token is not below `vocab`, `time` exceeds `context` or the sizes do not match.
pub fn forward(tokens: &[usize], wte: Values<'_>, wpe: Values<'_>, s: EmbedShape) -> Buffer {
    s.check(tokens);
    assert_eq!(wte.len(), s.vocab * s.width, "embed: wte size");
    assert_eq!(wpe.len(), s.context * s.width, "embed: wpe size");
    let width = s.width;
    if width == 0 {
        return Buffer::from_f32(Vec::new(), wte.format());
    }
    build_as(
        wte.format(),
        tokens.len() * width,
        POSITIONS * width,
        |i, out| {
            let (mut token_row, mut position_row) = (Vec::new(), Vec::new());
            for (j, out) in out.chunks_exact_mut(width).enumerate() {
                let at = i * POSITIONS + j;
                let token = tokens[at] * width;
                let position = (at % s.time) * width;
                let token = wte.read(token..token + width, &mut token_row);
                let position = wpe.read(position..position + width, &mut position_row);
                for ((o, &a), &b) in out.iter_mut().zip(token).zip(position) {
                    *o = a + b;
                }
            }
        },
    )
}

/// The gradients of the two tables given the gradient `dy: [batch, time, width]` of
/// [`forward`]'s output: `(dwte [vocab, width], dwpe [context, width])`, in f32. Rows of tokens
/// that do not occur, and positions from `time` on, are zero.
///
/// # Panics
/// When a token is not below `vocab`, `time` exceeds `context` or the sizes do not match.
pub fn backward(tokens: &[usize], dy: Values<'_>, s: EmbedShape) -> (Vec<f32>, Vec<f32>) {
    s.check(tokens);
    assert_eq!(
        dy.len(),
        tokens.len() * s.width,
        "embed backward: gradient size"
    );
    let positions = positions_by_token(tokens, s.vocab);
    let batch_positions = |t: usize| (0..s.batch).map(move |b| b * s.time + t);
    let dwte = sum_rows(s.vocab, s.width, dy, |v| positions[v].iter().copied());
    let dwpe = sum_rows(s.context, s.width, dy, |t| {
        // Positions from `time` on never occur: no batch rows to sum.
        let batches = if t < s.time { s.batch } else { 0 };
        batch_positions(t).take(batches)
    });
    (dwte, dwpe)
}

/// For each token, the positions holding it, in increasing order.
fn positions_by_token(tokens: &[usize], vocab: usize) -> Vec<Vec<usize>> {
    let mut positions = vec![Vec::new(); vocab];
    for (at, &token) in tokens.iter().enumerate() {
        positions[token].push(at);
    }
    positions
}

/// A row-major `rows x width` matrix whose row `r` is the sum of the rows `sources(r)` of `dy`
/// (`width` wide), added in the order given; rayon over chunks of [`GRAD_ROWS`] rows.
fn sum_rows<I>(
    rows: usize,
    width: usize,
    dy: Values<'_>,
    sources: impl Fn(usize) -> I + Sync,
) -> Vec<f32>
where
    I: Iterator<Item = usize>,
{
    if width == 0 {
        return Vec::new();
    }
    // Each chunk starts zeroed.
    let (sums, _) = build_in_parallel_with(rows * width, GRAD_ROWS * width, |i, out| {
        let mut scratch = Vec::new();
        for (j, sum) in out.chunks_exact_mut(width).enumerate() {
            for source in sources(i * GRAD_ROWS + j) {
                let row = dy.read(source * width..(source + 1) * width, &mut scratch);
                for (s, &g) in sum.iter_mut().zip(row) {
                    *s += g;
                }
            }
        }
    });
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values;
    use crate::kernels::values::Format;

    const SHAPE: EmbedShape = EmbedShape {
        batch: 3,
        time: 5,
        vocab: 7,
        context: 8,
        width: 6,
    };

    fn tokens(s: EmbedShape) -> Vec<usize> {
        // Token 6 never occurs; token 2 repeats.
        (0..s.batch * s.time).map(|i| (i * 3 + i / 4) % 6).collect()
    }

    #[test]
    fn forward_and_backward_match_the_definition() {
        let s = SHAPE;
        let tokens = tokens(s);
        let wte = test_values(s.vocab * s.width, 1);
        let wpe = test_values(s.context * s.width, 2);
        let dy = test_values(tokens.len() * s.width, 3);
        let out = forward(&tokens, Values::from(&wte), Values::from(&wpe), s).into_f32();
        let (mut dwte, mut dwpe) = (vec![0.0f32; wte.len()], vec![0.0f32; wpe.len()]);
        for (at, &token) in tokens.iter().enumerate() {
            let t = at % s.time;
            for c in 0..s.width {
                let o = at * s.width + c;
                assert_eq!(out[o], wte[token * s.width + c] + wpe[t * s.width + c]);
                dwte[token * s.width + c] += dy[o];
                dwpe[t * s.width + c] += dy[o];
            }
        }
        // The same sums in the same order: the same bits.
        assert_eq!(
            backward(&tokens, Values::from(&dy), s),
            (dwte.clone(), dwpe.clone())
        );
        assert!(dwte[6 * s.width..].iter().all(|&g| g == 0.0));
        assert!(dwpe[s.time * s.width..].iter().all(|&g| g == 0.0));
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let s = EmbedShape {
            batch: 12,
            time: 64,
            vocab: 65,
            context: 64,
            width: 24,
        };
        let tokens: Vec<usize> = test_values(s.batch * s.time, 4)
            .iter()
            .map(|v| ((v + 1.0) * 32.0) as usize % s.vocab)
            .collect();
        let wte = test_values(s.vocab * s.width, 5);
        let wpe = test_values(s.context * s.width, 6);
        let dy = test_values(tokens.len() * s.width, 7);
        let run = || {
            (
                forward(&tokens, Values::from(&wte), Values::from(&wpe), s),
                backward(&tokens, Values::from(&dy), s),
            )
        };
        let in_pool = |threads| crate::test_data::in_pool(threads, run);
        let bits = |(y, (dwte, dwpe)): (Buffer, (Vec<f32>, Vec<f32>))| {
            [y.into_f32(), dwte, dwpe].map(|v| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        assert_eq!(bits(in_pool(1)), bits(in_pool(3)));
    }

    #[test]
    fn half_tables_give_the_f32_sums_rounded() {
        let s = SHAPE;
        let tokens = tokens(s);
        let wte = Buffer::from_f32(test_values(s.vocab * s.width, 1), Format::Bf16);
        let wpe = Buffer::from_f32(test_values(s.context * s.width, 2), Format::Bf16);
        let out = forward(&tokens, wte.values(), wpe.values(), s);
        let (wte32, wpe32) = (wte.clone().into_f32(), wpe.clone().into_f32());
        let want = forward(&tokens, Values::from(&wte32), Values::from(&wpe32), s);
        assert_eq!(out, Buffer::from_f32(want.into_f32(), Format::Bf16));
    }

    #[test]
    #[should_panic(expected = "embed: token 7 at [1, 2] is not below the vocabulary size 7")]
    fn a_token_outside_the_vocabulary_panics() {
        let s = SHAPE;
        let mut tokens = tokens(s);
        tokens[s.time + 2] = 7;
        let wte = vec![0.0; s.vocab * s.width];
        let wpe = vec![0.0; s.context * s.width];
        forward(&tokens, Values::from(&wte), Values::from(&wpe), s);
    }
}
