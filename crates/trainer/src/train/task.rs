//! What a run learns, behind one small interface: the loop, checkpoints, sweep and bench are the
//! same for every task; a [`Task`] says how a piece of a step becomes a loss and how the model is
//! scored. Two tasks exist: [`Classification`] (images and CSV rows) and the language model's
//! next-token prediction ([`crate::language::NextToken`]).

use std::marker::PhantomData;
use std::path::Path;

use burn::prelude::*;
use burn::store::ModuleSnapshot;

use crate::data::Splits;
use crate::error::Result;
use crate::kernels;
use crate::model::Classifier;
use crate::precision::Compute;
use crate::score::{Score, score};

/// A learning task: its samples, the loss of a piece of a step, and its score.
pub trait Task: Sync {
    type Model: Module + ModuleSnapshot + Sync;

    /// How many samples the epoch order runs over (images, rows, text windows).
    fn samples(&self) -> usize;

    /// What a step's loss is a mean over, for the samples of `group`: the samples themselves
    /// for a classifier, their target tokens for a language model.
    fn loss_units(&self, group: &[usize]) -> usize;

    /// The summed loss of the samples of `piece` divided by `divisor` (the step's
    /// [`loss_units`](Task::loss_units)), as a `[1]` tensor to run backward from: the pieces'
    /// losses then add up to the step's mean. `model` is the step's working copy, in `compute`'s
    /// precision; `step` counts the optimizer steps before this one (what a draw that must be
    /// the same however the step is cut, such as dropout, is keyed by).
    fn piece_loss(
        &self,
        model: &Self::Model,
        compute: &Compute,
        piece: &[usize],
        divisor: f32,
        step: u64,
        device: &Device,
    ) -> Tensor<1>;

    /// Scores the model on the held-out data, in a fixed order (the same number at every
    /// thread count): `batch_size` samples per forward pass.
    fn evaluate(&self, model: &Self::Model, device: &Device, batch_size: usize) -> Score;

    /// What the run's log and summary call the model.
    fn model_name(&self, model: &Self::Model) -> String;

    /// Loss units in one sample (1 for a classifier, the context for a language model): the
    /// throughput in tokens is the samples' times this.
    fn units_per_sample(&self) -> usize {
        1
    }

    /// Whether the model predicts tokens of a text: its log and summary speak of tokens,
    /// validation loss and bits per character rather than samples and test accuracy.
    fn is_language_model(&self) -> bool {
        false
    }

    /// What the held-out data is called in the log: "test" or "val".
    fn held_out(&self) -> &'static str {
        "test"
    }

    /// Writes what `eval` and `sample` need besides the weights and the config into a new (or
    /// resumed) run folder: a language model's vocabulary.
    fn write_run_files(&self, _folder: &Path) -> Result<()> {
        Ok(())
    }

    /// What the user should know of the data before the run starts, one log line each.
    fn warnings(&self) -> &[String] {
        &[]
    }
}

/// Classifying images or rows: cross-entropy of the class logits, accuracy on the test set.
pub struct Classification<'a, M> {
    pub data: &'a Splits,
    model: PhantomData<fn() -> M>,
}

impl<'a, M> Classification<'a, M> {
    pub fn new(data: &'a Splits) -> Self {
        Self {
            data,
            model: PhantomData,
        }
    }
}

impl<M: Classifier + ModuleSnapshot> Task for Classification<'_, M> {
    type Model = M;

    fn samples(&self) -> usize {
        self.data.train.len()
    }

    fn loss_units(&self, group: &[usize]) -> usize {
        group.len()
    }

    fn piece_loss(
        &self,
        model: &M,
        compute: &Compute,
        piece: &[usize],
        divisor: f32,
        _step: u64,
        device: &Device,
    ) -> Tensor<1> {
        let (x, y) = self.data.train.batch(piece, device);
        let logits = compute.forward(model, x);
        kernels::cross_entropy(logits, y, divisor)
    }

    fn evaluate(&self, model: &M, device: &Device, batch_size: usize) -> Score {
        score(
            model,
            &self.data.test,
            self.data.classes,
            device,
            batch_size,
        )
    }

    fn model_name(&self, model: &M) -> String {
        model.name()
    }

    /// A CSV run's table: its columns, classes and statistics, for `eval` and `predict`.
    fn write_run_files(&self, folder: &Path) -> Result<()> {
        match &self.data.table {
            Some(table) => crate::run_dir::save_table(folder, table),
            None => Ok(()),
        }
    }

    fn warnings(&self) -> &[String] {
        &self.data.warnings
    }
}
