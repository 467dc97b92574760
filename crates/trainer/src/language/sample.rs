//! Text from a trained language model, as nanoGPT's `sample.py` writes it: the prompt, then one
//! token at a time drawn from the softmax of the last position's logits over the temperature,
//! among the `top_k` likeliest, the model seeing at most its context (the prompt cropped to its
//! end). The same text for the same seed.

use std::io::Write;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::{DType, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Gpt, load_vocabulary};
use crate::error::{Error, Result};
use crate::precision::convert;
use crate::run_dir::RunDir;
use crate::settings::{Layers, Settings};
use crate::weights;

/// What to write and how to draw it.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// The text to continue; empty starts from a newline, as nanoGPT's default does.
    pub prompt: String,
    /// Tokens to write after the prompt.
    pub tokens: usize,
    /// Divides the logits: below 1 sharper, above 1 flatter.
    pub temperature: f64,
    /// Draw among the `k` likeliest tokens only.
    pub top_k: Option<usize>,
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            tokens: 500,
            temperature: 1.0,
            top_k: None,
            seed: 1337,
        }
    }
}

/// Writes the prompt and `options.tokens` drawn tokens of the run in `run_dir` to `out`, token by
/// token as they are drawn.
pub fn sample(
    run_dir: &Path,
    layers: &Layers,
    options: &SampleOptions,
    out: &mut dyn Write,
) -> Result<()> {
    if options.tokens == 0 {
        return Err(Error::setting("--tokens", "must be at least 1"));
    }
    if !(options.temperature.is_finite() && options.temperature > 0.0) {
        return Err(Error::setting(
            "--temperature",
            format!("must be a positive number, got {}", options.temperature),
        ));
    }
    let run = RunDir::open(run_dir)?;
    let settings = Settings::load(&run.config_path(), layers)?;
    if settings.model.kind != crate::settings::ModelKind::Gpt {
        return Err(Error::RunDir {
            path: run_dir.to_path_buf(),
            message: format!(
                "holds a {} classifier, not a language model: sample writes text from a GPT run",
                settings.model.kind
            ),
        });
    }
    let vocabulary = load_vocabulary(run.path())?;
    if let Some(k) = options.top_k
        && !(1..=vocabulary.len()).contains(&k)
    {
        return Err(Error::setting(
            "--top-k",
            format!(
                "must lie between 1 and the vocabulary's {} tokens, got {k}",
                vocabulary.len()
            ),
        ));
    }
    let prompt = if options.prompt.is_empty() {
        "\n"
    } else {
        &options.prompt
    };
    let mut tokens = vocabulary
        .encode(prompt)
        .map_err(|e| Error::setting("--prompt", format!("{e}: the run's vocabulary lacks it")))?;
    let device = crate::device(settings.training.backend).inner();
    let model = Gpt::new(&settings.model, vocabulary.len(), &device);
    let model = weights::load(model, &run.weights_path())?;
    let io = |e: std::io::Error| Error::Io {
        path: "stdout".into(),
        source: e,
    };
    write!(out, "{}", options.prompt).map_err(io)?;
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    for _ in 0..options.tokens {
        let next = next_token(&model, &tokens, options, &mut rng, &device);
        tokens.push(next);
        write!(out, "{}", vocabulary.decode(&[next])).map_err(io)?;
        out.flush().map_err(io)?;
    }
    writeln!(out).map_err(io)
}

/// Draws the token after `tokens` (its last `context` tokens).
fn next_token(
    model: &Gpt,
    tokens: &[u16],
    options: &SampleOptions,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> u16 {
    let window = &tokens[tokens.len().saturating_sub(model.context())..];
    let ids: Vec<i64> = window.iter().map(|&t| t as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, window.len()]), device);
    let logits = convert(model.logits(input), DType::F32);
    let last = logits
        .slice(s![window.len() - 1..window.len(), ..])
        .into_data()
        .convert::<f32>();
    let logits: Vec<f64> = last
        .as_slice::<f32>()
        .unwrap_or(&[])
        .iter()
        .map(|&l| l as f64 / options.temperature)
        .collect();
    draw(&logits, options.top_k, rng) as u16
}

/// Index drawn from the softmax of `logits`, among the `top_k` largest when given (ties at the
/// k-th value kept, as nanoGPT's `logits < v[-1]` test keeps them).
fn draw(logits: &[f64], top_k: Option<usize>, rng: &mut ChaCha8Rng) -> usize {
    let floor = match top_k {
        Some(k) if k < logits.len() => {
            let mut sorted = logits.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[k - 1]
        }
        _ => f64::NEG_INFINITY,
    };
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| if l >= floor { (l - max).exp() } else { 0.0 })
        .collect();
    let total: f64 = weights.iter().sum();
    let mut target = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if target < *w {
            return i;
        }
        target -= w;
    }
    // Rounding can leave the target past the last weight: the last kept token.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-k keeps the k likeliest only; the draws follow the softmax's proportions.
    #[test]
    fn draws_follow_the_softmax_among_the_top_k() {
        let logits = [0.0, 2.0f64.ln(), 0.0, 1.0f64.ln() - 50.0];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut counts = [0usize; 4];
        for _ in 0..30_000 {
            counts[draw(&logits, Some(2), &mut rng)] += 1;
        }
        // Among the two largest (index 1 with weight 2, index 0 or 2 tied at 1 both kept).
        assert_eq!(counts[3], 0, "{counts:?}");
        let share = counts[1] as f64 / 30_000.0;
        assert!((share - 0.5).abs() < 0.02, "{counts:?}");
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let top1: Vec<usize> = (0..10).map(|_| draw(&logits, Some(1), &mut rng)).collect();
        assert_eq!(top1, vec![1; 10]);
    }
}
