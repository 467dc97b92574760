//! Accumulation by tokens is the large batch: a step's loss is the sum of the cross-entropy of
//! every target token of all its micro-batches divided by their total token count, not the mean
//! of the micro-batches' means (the error Hugging Face transformers fixed in 4.46). One step of
//! batch 12 and one of 4 micro-batches of 3 move a GPT's weights alike, also when the
//! micro-batches hold different numbers of target tokens (masked targets); the mean of means
//! does not.

mod common;

use common::{largest_relative_difference, updates};

use allcores_trainer::burn::prelude::*;
use allcores_trainer::data::text::{TextSplits, TokenText, Vocabulary};
use allcores_trainer::language::{Gpt, NextToken};
use allcores_trainer::precision::Compute;
use allcores_trainer::score::Score;
use allcores_trainer::weights::parameters;
use allcores_trainer::{Layers, Options, Settings, Task, fit_task};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CONTEXT: usize = 8;

fn settings(batch_size: usize, accumulation_steps: usize, lr: f64) -> Settings {
    let text = format!(
        "[data]\nformat = \"text\"\ntrain_text = \"unused.txt\"\nval_fraction = 0.5\n\
         [model]\nkind = \"gpt\"\nlayers = 2\nheads = 2\nwidth = 16\ncontext = {CONTEXT}\n\
         [optimizer]\nkind = \"sgd\"\nlr = {lr}\nmomentum = 0.0\n\
         [training]\nbatch_size = {batch_size}\naccumulation_steps = {accumulation_steps}\n\
         max_steps = 1\nthreads = 1\nseed = 3\n"
    );
    Settings::parse(&text, "test.toml".as_ref(), &Layers::default()).expect("valid settings")
}

/// A random text of 12 distinct characters, as token ids: exactly 12 windows of `CONTEXT + 1`.
fn text() -> TextSplits {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut ids = |n: usize| TokenText::new((0..n).map(|_| rng.random_range(0..12u16)).collect());
    let vocabulary = Vocabulary::from_text("abcdefghijkl").unwrap();
    TextSplits {
        vocabulary,
        train: ids(12 + CONTEXT),
        val: ids(3 * CONTEXT),
    }
}

/// How a step's loss is averaged.
#[derive(Clone, Copy, PartialEq)]
enum Mean {
    /// Over all the step's target tokens (what the loop does).
    OfTokens,
    /// Each micro-batch's own mean, averaged over the 4 micro-batches (the error).
    OfMicroBatchMeans,
}

/// Next-token prediction whose targets are masked (-1) in a pattern that gives windows, and so
/// micro-batches, different numbers of target tokens: window `p` keeps `CONTEXT - p % 5`.
struct Masked {
    inner: NextToken,
    mean: Mean,
}

impl Masked {
    fn kept(position: usize) -> usize {
        CONTEXT - position % 5
    }
}

impl Task for Masked {
    type Model = Gpt;

    fn samples(&self) -> usize {
        self.inner.samples()
    }

    fn loss_units(&self, group: &[usize]) -> usize {
        group.iter().map(|&p| Self::kept(p)).sum()
    }

    fn piece_loss(
        &self,
        model: &Gpt,
        compute: &Compute,
        piece: &[usize],
        divisor: f32,
        _step: u64,
        device: &Device,
    ) -> Tensor<1> {
        let (x, y) = self.inner.text.train.batch(piece, CONTEXT, device);
        let mut targets: Vec<i64> = y.into_data().convert::<i64>().try_into_vec().unwrap();
        for (row, &p) in piece.iter().enumerate() {
            for t in Self::kept(p)..CONTEXT {
                targets[row * CONTEXT + t] = -1;
            }
        }
        let y = Tensor::from_data(TensorData::new(targets, [piece.len(), CONTEXT]), device);
        let divisor = match self.mean {
            Mean::OfTokens => divisor,
            Mean::OfMicroBatchMeans => (self.loss_units(piece) * 4) as f32,
        };
        compute.forward_with(|| model.loss(x, y, divisor, None))
    }

    fn evaluate(&self, model: &Gpt, device: &Device, batch_size: usize) -> Score {
        self.inner.evaluate(model, device, batch_size)
    }

    fn model_name(&self, _: &Gpt) -> String {
        "gpt".into()
    }
}

fn one_step(settings: Settings, task: &impl Task<Model = Gpt>) -> Vec<Vec<f32>> {
    let options = Options {
        quiet: true,
        ..Options::default()
    };
    let vocabulary = 12;
    let outcome = fit_task(&settings, &options, task, |device| {
        Ok(Gpt::new(&settings.model, vocabulary, device))
    })
    .expect("trains");
    parameters(&outcome.model)
}

/// `settings` with `model.dropout = dropout`.
fn with_dropout(mut settings: Settings, dropout: f64) -> Settings {
    settings.model.dropout = dropout;
    settings
}

fn update_difference(mask: bool, mean: Mean) -> f32 {
    update_difference_with(mask, mean, 0.0).0
}

/// The largest relative difference between the updates of (12, 1) and (3, 4), and the large
/// step's weights.
fn update_difference_with(mask: bool, mean: Mean, dropout: f64) -> (f32, Vec<Vec<f32>>) {
    let settings = |batch, k, lr| with_dropout(settings(batch, k, lr), dropout);
    let task = |batch| {
        let inner = NextToken::new(text(), &settings(batch, 1, 0.5).model, 3);
        Masked {
            inner,
            mean: if mask { mean } else { Mean::OfTokens },
        }
    };
    let step = |batch, k, lr| {
        let t = task(batch);
        if mask {
            one_step(settings(batch, k, lr), &t)
        } else {
            one_step(settings(batch, k, lr), &t.inner)
        }
    };
    let large = step(12, 1, 0.5);
    let accumulated = step(3, 4, 0.5);
    // A rate so small that the step leaves every f32 weight as it was.
    let before = step(12, 1, 1e-30);
    let moved = largest_relative_difference(&large, &before);
    assert!(moved > 1e-3, "the step moved the weights by {moved} only");
    let difference =
        largest_relative_difference(&updates(&large, &before), &updates(&accumulated, &before));
    (difference, large)
}

#[test]
fn four_micro_batches_of_three_make_the_step_of_one_batch_of_twelve() {
    let difference = update_difference(false, Mean::OfTokens);
    assert!(difference <= 1e-5, "{difference}");
}

#[test]
fn the_same_with_masked_targets_and_not_with_a_mean_of_means() {
    let difference = update_difference(true, Mean::OfTokens);
    assert!(difference <= 1e-5, "{difference}");
    let wrong = update_difference(true, Mean::OfMicroBatchMeans);
    assert!(wrong > 1e-3, "the mean of means went unnoticed: {wrong}");
}

/// Dropout is drawn by window and step, so the micro-batches of a step drop what the large
/// batch drops: the same update. And it does drop: the step differs from one without.
#[test]
fn with_dropout_the_micro_batches_drop_what_the_large_batch_drops() {
    let (difference, dropped) = update_difference_with(false, Mean::OfTokens, 0.3);
    assert!(difference <= 1e-5, "{difference}");
    let (_, kept) = update_difference_with(false, Mean::OfTokens, 0.0);
    let apart = largest_relative_difference(&dropped, &kept);
    assert!(apart > 1e-4, "dropout changed the step by {apart} only");
}
