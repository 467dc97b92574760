//! What a run reports: one line of metrics per epoch, and the summary at the end.

use serde::{Deserialize, Serialize};

use crate::precision::PrecisionMode;

/// Metrics after one epoch (one JSON line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: u64,
    /// Optimizer steps so far.
    pub steps: u64,
    /// Training samples seen so far.
    pub samples: u64,
    /// Mean training loss over this epoch's samples.
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Training throughput over this epoch (scoring excluded).
    pub samples_per_second: f64,
    pub cpu_utilization: f64,
    /// An evaluation inside the epoch (`training.eval_every`), not the epoch's end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mid_epoch: bool,
}

/// The outcome of a run (`summary.json`, and the last stdout line with `--json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// Mean training loss over the last epoch.
    pub train_loss: f64,
    pub epochs: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Training samples processed.
    pub samples: u64,
    /// This process's wall time, scoring and saving included: the whole run, or for a resumed
    /// run the part since the resume.
    pub wall_seconds: f64,
    /// Training only (forward, backward, optimizer, data batching), over the whole run: every
    /// part of a resumed run, like `steps` and `samples`.
    pub train_seconds: f64,
    /// Writing checkpoints, in this process.
    pub checkpoint_seconds: f64,
    /// `samples / train_seconds`.
    pub samples_per_second: f64,
    /// A language model's figures: the validation loss (mean cross-entropy per token, the same
    /// as `test_loss`), in bits per character, and the training throughput in tokens (`test_accuracy`
    /// is then the fraction of next characters predicted right).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_char: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    pub threads: usize,
    pub threads_available: usize,
    /// How the pieces of a step (micro-batches x shards) ran: "concurrent" or "sequential".
    pub execution: String,
    /// `training.shards`: pieces each micro-batch is split into.
    pub shards: usize,
    /// What the threads without work did during a step: "poll" or "sleep"
    /// ([`crate::polling`]).
    #[serde(default)]
    pub idle_threads: String,
    /// Working CPU time (polling for work not counted) / (wall time x threads) over the run.
    pub cpu_utilization: f64,
    pub backend: String,
    /// What [`crate::Classifier::name`] calls the model: `model.kind` for the built-in networks.
    pub model: String,
    /// The model's trainable values, all tensors together.
    pub parameters: usize,
    pub batch_size: usize,
    pub accumulation_steps: usize,
    pub effective_batch_size: usize,
    pub seed: u64,
    /// `training.precision` of the forward and backward passes: "f32", "f16" or "bf16".
    pub precision: String,
    /// "native" (tensors of that format) or "emulated" (f32 tensors rounded to it).
    pub precision_mode: PrecisionMode,
    /// Steps whose gradients overflowed: counted, their update not applied.
    pub skipped_steps: u64,
    /// The loss scale at the end of the run; `None` when the run did not scale its loss.
    pub loss_scale: Option<f64>,
    pub peak_rss_bytes: u64,
    /// SHA-256 of the final f32 weights in a fixed parameter order.
    pub weights_sha256: String,
    pub run_dir: Option<String>,
    /// Each optimizer step's times, in order, when [`Options::record_steps`] asked for them
    /// (`allcores bench`); left out of the JSON when empty.
    ///
    /// [`Options::record_steps`]: crate::Options::record_steps
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub step_times: Vec<StepTime>,
}

/// The times of one optimizer step: batch gathering, forward, backward and optimizer update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    /// Samples in the step (fewer than the effective batch at the end of an epoch).
    pub samples: usize,
    pub wall_seconds: f64,
    /// Process CPU time (user + system, all threads) spent working during the step: polling for
    /// work ([`crate::polling`]) not counted.
    pub cpu_seconds: f64,
    /// Time the pool's threads spent polling for work during the step, all threads together.
    #[serde(default)]
    pub polling_seconds: f64,
}
