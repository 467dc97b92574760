//! Language models: next-token prediction on a text, with a character-level [`Gpt`], and
//! sampling from a trained one.
//!
//! A training sample is a window of `context + 1` tokens of the training text (inputs and their
//! next tokens); the windows a step takes are those of the run's seeded order over every window
//! position, so a run is a function of its seed and a resume continues it exactly. A step's loss
//! is the mean over all its target tokens. The validation loss is the mean cross-entropy over a
//! fixed set of windows spread evenly over the validation text: the same number at every thread
//! count, after a resume, and in `eval`.

pub mod dropout;
mod gpt;
pub mod sample;

use dropout::Dropout;
use std::path::Path;

use burn::prelude::*;

use crate::data::text::{self, TextSplits, TokenText, ValSource, Vocabulary};
use crate::error::{Error, Result};
use crate::kernels;
use crate::model::{RunMemory, ensure_memory_for_run};
use crate::optim::values_per_parameter;
use crate::precision::Compute;
use crate::score::Score;
use crate::settings::{ModelSettings, Settings, Threads};
use crate::threads::ThreadPlan;
use crate::train::task::Task;
use crate::train::{Options, Outcome, fit_task};

pub use gpt::{Gpt, activations_per_window, parameter_count};

/// The vocabulary's file in a run folder: `eval` and `sample` map text to tokens with it.
pub const VOCABULARY_FILE: &str = "vocabulary.json";

/// Validation windows scored: spread evenly over the validation text (all of them when fewer
/// fit). Enough tokens that the loss's sampling noise lies well under the differences that
/// matter (0.01), few enough that scoring stays a small part of a run.
pub const EVALUATION_WINDOWS: usize = 1024;

/// Next-token prediction on a training text, scored on a validation text.
pub struct NextToken {
    pub text: TextSplits,
    model: ModelSettings,
    /// Start positions of the validation windows.
    evaluation: Vec<usize>,
    /// `training.seed`, which dropout's draws are keyed by.
    seed: u64,
}

impl NextToken {
    /// Reads the texts the settings name and builds the vocabulary from the training text.
    pub fn load(settings: &Settings) -> Result<Self> {
        let data = &settings.data;
        let context = settings.model.context;
        let train = data
            .train_text
            .as_deref()
            .ok_or_else(|| Error::setting("data.train_text", "required for a text run"))?;
        let val = match (&data.val_text, data.val_fraction) {
            (Some(path), _) => ValSource::Text(path),
            (None, Some(fraction)) => ValSource::Fraction(fraction),
            (None, None) => {
                return Err(Error::setting(
                    "data.val_text",
                    "required (or data.val_fraction)",
                ));
            }
        };
        let text = text::load_text(train, val, context)?;
        Ok(Self::new(text, &settings.model, settings.training.seed))
    }

    /// The task of training `model` on `text`, dropout (if any) keyed by `seed`.
    pub fn new(text: TextSplits, model: &ModelSettings, seed: u64) -> Self {
        let evaluation = text
            .val
            .evaluation_positions(model.context, EVALUATION_WINDOWS);
        Self {
            text,
            model: model.clone(),
            evaluation,
            seed,
        }
    }

    /// Trains the GPT that `model.*` describes on this text; refuses, before building it, one
    /// that cannot train in this machine's memory, and a run not measured in steps.
    pub fn fit(&self, settings: &Settings, options: &Options) -> Result<Outcome<Gpt>> {
        if settings.training.max_steps.is_none() {
            return Err(Error::setting(
                "training.max_steps",
                "required for a text run: it is measured in steps (nanoGPT's max_iters)",
            ));
        }
        self.ensure_memory(settings)?;
        let vocabulary = self.text.vocabulary.len();
        fit_task(settings, options, self, |device| {
            Ok(Gpt::new(&settings.model, vocabulary, device))
        })
    }

    fn ensure_memory(&self, settings: &Settings) -> Result<()> {
        let vocabulary = self.text.vocabulary.len();
        let too_large = || {
            Error::setting(
                "model.width",
                "a GPT of these sizes has more values than a machine can count",
            )
        };
        let (values_each, values_are) = values_per_parameter(&settings.optimizer);
        let training = &settings.training;
        let threads = match training.threads {
            Threads::Count(n) => n.get(),
            Threads::Auto => ThreadPlan::new(Threads::Auto).threads,
        };
        let piece = training.batch_size.div_ceil(training.shards);
        let pieces = training.accumulation_steps.saturating_mul(training.shards);
        ensure_memory_for_run(RunMemory {
            parameters: parameter_count(&settings.model, vocabulary).ok_or_else(too_large)? as f64,
            values_each,
            values_are,
            activations_per_sample: activations_per_window(&settings.model, vocabulary)
                .ok_or_else(too_large)? as f64,
            samples_in_flight: (piece * pieces.min(threads).max(1)) as f64,
        })
    }
}

impl Task for NextToken {
    type Model = Gpt;

    fn samples(&self) -> usize {
        self.text.train.windows(self.model.context).unwrap_or(0)
    }

    fn loss_units(&self, group: &[usize]) -> usize {
        group.len() * self.model.context
    }

    fn piece_loss(
        &self,
        model: &Gpt,
        compute: &Compute,
        piece: &[usize],
        divisor: f32,
        step: u64,
        device: &Device,
    ) -> Tensor<1> {
        let (x, y) = self.text.train.batch(piece, self.model.context, device);
        let dropout = (self.model.dropout > 0.0).then(|| Dropout {
            rate: self.model.dropout,
            seed: self.seed,
            step,
            windows: piece.iter().map(|&p| p as u64).collect(),
        });
        compute.forward_with(|| model.loss(x, y, divisor, dropout.as_ref()))
    }

    fn evaluate(&self, model: &Gpt, device: &Device, batch_size: usize) -> Score {
        evaluate(
            model,
            &self.text.val,
            &self.evaluation,
            self.model.context,
            device,
            batch_size,
        )
    }

    fn model_name(&self, _: &Gpt) -> String {
        "gpt".into()
    }

    fn units_per_sample(&self) -> usize {
        self.model.context
    }

    fn held_out(&self) -> &'static str {
        "val"
    }

    fn is_language_model(&self) -> bool {
        true
    }

    fn write_run_files(&self, folder: &Path) -> Result<()> {
        self.text.vocabulary.save(&folder.join(VOCABULARY_FILE))
    }
}

/// The mean cross-entropy per target token (`loss`) and the fraction of next tokens predicted
/// right (`accuracy`) over the windows of `text` at `positions`, without gradients, in a fixed
/// order, `batch_size` windows per forward pass. `samples` counts the target tokens.
pub fn evaluate(
    model: &Gpt,
    text: &TokenText,
    positions: &[usize],
    context: usize,
    device: &Device,
    batch_size: usize,
) -> Score {
    let model = model.valid();
    let device = device.clone().inner();
    let (mut loss_sum, mut correct, mut tokens) = (0.0f64, 0u64, 0usize);
    for chunk in positions.chunks(batch_size.max(1)) {
        let (x, y) = text.batch(chunk, context, &device);
        let [batch, time] = y.dims();
        let targets = y.reshape([batch * time]);
        let logits = crate::precision::convert(model.logits(x), burn::tensor::DType::F32);
        let sum: f32 = kernels::cross_entropy(logits.clone(), targets.clone(), 1.0).into_scalar();
        loss_sum += sum as f64;
        let hits: i64 = logits
            .argmax(1)
            .reshape([batch * time])
            .equal(targets)
            .int()
            .sum()
            .into_scalar();
        correct += hits as u64;
        tokens += batch * time;
    }
    Score {
        loss: loss_sum / tokens.max(1) as f64,
        accuracy: correct as f64 / tokens.max(1) as f64,
        samples: tokens,
        confusion: Vec::new(),
    }
}

/// Bits per character of a mean cross-entropy in nats (one token is one character).
pub fn bits_per_char(loss: f64) -> f64 {
    loss / std::f64::consts::LN_2
}

/// A run folder's vocabulary.
pub fn load_vocabulary(run_dir: &Path) -> Result<Vocabulary> {
    Vocabulary::load(&run_dir.join(VOCABULARY_FILE))
}
