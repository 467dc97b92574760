//! How a run's samples fall into steps, pieces and epochs, and the seeded order it visits them in.

use crate::data::epoch_order;
use crate::error::{Error, Result};
use crate::settings::TrainingSettings;

#[derive(Debug, Clone, Copy)]
pub(super) struct StepPlan {
    pub batch_size: usize,
    /// Shards per micro-batch.
    pub shards: usize,
    /// Samples per optimizer step: `batch_size x accumulation_steps`.
    pub step_size: usize,
    /// Samples in the training set: a step never holds more.
    pub samples: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub epochs: u64,
}

impl StepPlan {
    /// Refuses a run whose step count does not fit in 64 bits (`epochs` near `u64::MAX`): in a
    /// release build the product wrapped, and the run stopped after a few steps.
    pub(super) fn new(samples: usize, training: &TrainingSettings) -> Result<Self> {
        let step_size = training.effective_batch_size();
        let steps_per_epoch = samples.div_ceil(step_size) as u64;
        let all = steps_per_epoch
            .checked_mul(training.epochs)
            .ok_or_else(|| {
                Error::setting(
                    "training.epochs",
                    format!(
                        "{} epochs of {steps_per_epoch} steps are more steps than a run can count",
                        training.epochs
                    ),
                )
            })?;
        let total_steps = training.max_steps.map_or(all, |max| max.min(all));
        Ok(Self {
            batch_size: training.batch_size,
            shards: training.shards,
            step_size,
            samples,
            steps_per_epoch,
            total_steps,
            epochs: total_steps.div_ceil(steps_per_epoch),
        })
    }

    /// The pieces of a step, in the order their gradients are summed: its micro-batches of
    /// `batch_size`, each split into `shards` contiguous shards whose sizes differ by at most one
    /// (a micro-batch shorter than `shards` has fewer, none empty).
    pub(super) fn pieces<'a>(&self, group: &'a [usize]) -> Vec<&'a [usize]> {
        // No piece is empty: there are at most as many as samples, whatever `shards` says.
        let mut pieces = Vec::with_capacity(group.len());
        for micro in group.chunks(self.batch_size) {
            let (size, longer) = (micro.len() / self.shards, micro.len() % self.shards);
            let mut start = 0;
            for shard in 0..self.shards.min(micro.len()) {
                let end = start + size + usize::from(shard < longer);
                pieces.push(&micro[start..end]);
                start = end;
            }
        }
        pieces
    }

    /// Micro-batches in a full step: fewer than `accumulation_steps` where the training set is
    /// smaller than a step.
    pub(super) fn micro_batches_per_step(&self) -> usize {
        self.step_size.min(self.samples).div_ceil(self.batch_size)
    }

    /// Pieces in a full step.
    pub(super) fn pieces_per_step(&self) -> usize {
        self.micro_batches_per_step() * self.shards
    }
}

#[derive(Debug)]
pub(super) struct EpochOrder {
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
}

impl EpochOrder {
    pub(super) fn new(samples: usize, seed: u64, epoch: u64) -> Self {
        Self {
            seed,
            epoch,
            order: epoch_order(samples, seed, epoch),
        }
    }

    /// Moves to `epoch`, drawing its order: whether it is a new one.
    pub(super) fn follow(&mut self, epoch: u64) -> bool {
        let new = epoch != self.epoch;
        if new {
            *self = Self::new(self.order.len(), self.seed, epoch);
        }
        new
    }

    /// The samples of the epoch's next step, after `groups_done` steps of `step_size`.
    pub(super) fn group(&self, groups_done: u64, step_size: usize) -> &[usize] {
        let start = groups_done as usize * step_size;
        &self.order[start..(start + step_size).min(self.order.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(batch_size: usize, accumulation_steps: usize, shards: usize) -> StepPlan {
        StepPlan::new(
            1000,
            &TrainingSettings {
                batch_size,
                accumulation_steps,
                shards,
                ..TrainingSettings::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn pieces_split_micro_batches_into_near_equal_shards_in_order() {
        let group: Vec<usize> = (0..23).collect();
        // Micro-batches of 10, 10 and 3; 3 shards each: 4+3+3, 4+3+3, then 1+1+1.
        let pieces = plan(10, 3, 3).pieces(&group);
        let sizes: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        assert_eq!(sizes, [4, 3, 3, 4, 3, 3, 1, 1, 1]);
        assert_eq!(pieces.concat(), group, "every sample once, in order");
        // A micro-batch shorter than the shard count gives no empty piece.
        let sizes: Vec<usize> = plan(4, 1, 4)
            .pieces(&group[..2])
            .iter()
            .map(|p| p.len())
            .collect();
        assert_eq!(sizes, [1, 1]);
        assert_eq!(plan(10, 3, 3).pieces_per_step(), 9);
        // A step larger than the 1,000 samples holds them all: 7 micro-batches of 150, not 10.
        assert_eq!(plan(150, 10, 2).micro_batches_per_step(), 7);
        assert_eq!(plan(150, 10, 2).pieces_per_step(), 14);
    }
}
