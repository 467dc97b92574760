//! The GPT's dropout, drawn from no shared generator: whether an element is dropped is a hash of
//! the run's seed, the step, the window (its start in the text), where in the network it is,
//! and its place in the activation. So a step drops the same elements however it is cut into
//! micro-batches and shards, at any thread count, and after a resume; nanoGPT's
//! `torch.nn.Dropout` draws from one generator in the order the pieces happen to run.
//!
//! Applied where nanoGPT applies it: the embeddings, each block's attention probabilities, and
//! the outputs of each block's attention and MLP.

use burn::prelude::*;
use rayon::prelude::*;

/// What a training step's dropout draws from.
#[derive(Debug, Clone)]
pub struct Dropout {
    /// The probability of dropping an element, in (0, 1).
    pub rate: f64,
    pub seed: u64,
    pub step: u64,
    /// Each batch row's window: its start in the training text.
    pub windows: Vec<u64>,
}

/// The place of the embeddings' dropout; block `l`'s attention output is `1 + 2l`, its MLP
/// output `2 + 2l`, its attention probabilities `ATTENTION_PROBABILITIES + l`.
pub const EMBEDDINGS: u64 = 0;
/// The first place of the attention probabilities' dropout, far above the others'.
pub const ATTENTION_PROBABILITIES: u64 = 1 << 32;

impl Dropout {
    /// `x: [B*T, C]` (row `b * T + t` of window `b`) with each element dropped with probability
    /// `rate`, or kept and divided by `1 - rate`, as `site` draws it.
    pub fn apply(&self, x: Tensor<2>, site: u64) -> Tensor<2> {
        let [rows, width] = x.dims();
        let mask = self.mask(rows, width, site);
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [rows, width]), &x.device());
        let dtype = x.dtype();
        x * mask.cast(dtype)
    }

    /// The mask of the attention probabilities at `site` for `heads` heads over windows of
    /// `time` tokens: `[batch, heads, time, time]` on `device`, in f32.
    pub fn attention_mask(
        &self,
        heads: usize,
        time: usize,
        site: u64,
        device: &Device,
    ) -> Tensor<4> {
        let batch = self.windows.len();
        let mask = self.mask(batch * heads * time, time, site);
        Tensor::from_data(TensorData::new(mask, [batch, heads, time, time]), device)
    }

    /// The mask of `site`: `0` or `1 / (1 - rate)` for each element of a `[rows, width]` stream.
    fn mask(&self, rows: usize, width: usize, site: u64) -> Vec<f32> {
        let windows = self.windows.len().max(1);
        let time = rows / windows;
        let keep = 1.0 / (1.0 - self.rate) as f32;
        // An element is dropped when the top 53 bits of its hash, as a fraction, fall below it.
        let threshold = (self.rate * (1u64 << 53) as f64) as u64;
        let mut mask = vec![0.0f32; rows * width];
        // A task per window: large enough that rayon's splitting costs nothing beside it.
        mask.par_chunks_mut((time * width).max(1))
            .zip(&self.windows)
            .for_each(|(out, &window)| {
                let base = mix(mix(mix(self.seed ^ mix(self.step)) ^ window) ^ site);
                for (position, out) in out.chunks_mut(width.max(1)).enumerate() {
                    let row_key = mix(base ^ position as u64);
                    for (column, value) in out.iter_mut().enumerate() {
                        let draw = mix(row_key ^ (column as u64).wrapping_mul(GOLDEN)) >> 11;
                        *value = if draw < threshold { 0.0 } else { keep };
                    }
                }
            });
        mask
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijection of 64-bit words whose outputs pass the usual
/// tests of randomness for consecutive inputs. Hand-written rather than a generator crate's:
/// what is needed is a hash of a key, not a stream, and its bits must never change with a
/// crate's version (the weights of a run depend on them).
fn mix(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dropout(step: u64, windows: Vec<u64>) -> Dropout {
        Dropout {
            rate: 0.25,
            seed: 7,
            step,
            windows,
        }
    }

    #[test]
    fn drops_at_the_rate_and_scales_what_it_keeps() {
        let mask = dropout(3, vec![10, 500]).mask(2 * 64, 128, 1);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0 / 0.75));
    }

    /// A window's mask depends on the window, not on the rows beside it: a step cut into
    /// micro-batches draws what the whole batch draws.
    #[test]
    fn a_window_draws_the_same_in_any_batch() {
        let whole = dropout(3, vec![10, 500]).mask(2 * 8, 16, 2);
        let second = dropout(3, vec![500]).mask(8, 16, 2);
        assert_eq!(&whole[8 * 16..], &second[..]);
        // Another step, site or window draws otherwise.
        assert_ne!(dropout(4, vec![500]).mask(8, 16, 2), second);
        assert_ne!(dropout(3, vec![500]).mask(8, 16, 1), second);
        assert_ne!(dropout(3, vec![501]).mask(8, 16, 2), second);
    }

    #[test]
    fn backward_passes_the_gradient_where_it_kept() {
        let device = Device::flex().autodiff();
        let d = dropout(1, vec![3]);
        let x = Tensor::<2>::ones([4, 8], &device).require_grad();
        let y = d.apply(x.clone(), EMBEDDINGS);
        let grads = y.clone().sum().backward();
        let (y, g) = (
            y.into_data().try_to_vec::<f32>().unwrap(),
            x.grad(&grads)
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
        assert_eq!(y, g);
        assert_eq!(y, d.mask(4, 8, EMBEDDINGS));
    }
}
