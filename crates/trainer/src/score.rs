//! Scoring a model on a dataset: loss, accuracy, and the confusion matrix behind them.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::kernels;
use crate::model::Classifier;

/// How well a model classifies a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction of samples whose largest logit is their label.
    pub accuracy: f64,
    pub samples: usize,
    /// `confusion[label][prediction]`: how many samples of each class went to each class.
    pub confusion: Vec<Vec<u64>>,
}

impl Score {
    /// Accuracy of each class (recall): `None` for a class with no sample.
    pub fn per_class_accuracy(&self) -> Vec<Option<f64>> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(class, row)| {
                let total: u64 = row.iter().sum();
                (total > 0).then(|| row[class] as f64 / total as f64)
            })
            .collect()
    }
}

/// Scores `model` on every sample of `data`, without gradients, in a fixed order, `batch_size`
/// samples per forward pass (the training micro-batch: scoring needs no more memory than
/// training does).
pub fn score<M: Classifier>(
    model: &M,
    data: &Dataset,
    classes: usize,
    device: &Device,
    batch_size: usize,
) -> Score {
    let model = model.valid();
    let device = device.clone().inner();
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut loss_sum = 0.0f64;
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, y) = data.batch(chunk, &device);
        let logits = model.forward(x);
        let sum: f32 = kernels::cross_entropy(logits.clone(), y, 1.0).into_scalar();
        loss_sum += sum as f64;
        let predictions = logits.argmax(1).into_data().convert::<i64>();
        for (&i, p) in chunk.iter().zip(predictions.iter::<i64>()) {
            confusion[data.labels()[i] as usize][p as usize] += 1;
        }
    }
    let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
    let samples = data.len();
    Score {
        loss: loss_sum / samples.max(1) as f64,
        accuracy: correct as f64 / samples.max(1) as f64,
        samples,
        confusion,
    }
}
