//! allcores-trainer: train small models on every core of a CPU, with results that do not
//! depend on the thread count.
//!
//! ```no_run
//! use allcores_trainer::{Layers, Options, Settings, train};
//!
//! let settings = Settings::load("examples/mnist-mlp.toml".as_ref(), &Layers::default())?;
//! let summary = train(&settings, Options::default())?;
//! println!("test accuracy {:.2}%", summary.test_accuracy * 100.0);
//! # Ok::<(), allcores_trainer::Error>(())
//! ```
//!
//! To train a model of your own, implement [`Classifier`] for your burn `Module` and call
//! [`Trainer::fit`] (see `examples/custom_model.rs`).

pub mod calibrate;
pub mod checkpoint;
pub mod data;
mod error;
pub mod files;
pub mod kernels;
pub mod language;
pub mod lock;
pub mod model;
mod optim;
pub mod polling;
pub mod precision;
mod progress;
mod resume;
pub mod run_dir;
pub mod score;
pub mod settings;
pub mod summary;
#[cfg(test)]
mod test_data;
pub mod threads;
mod train;
pub mod usage;
pub mod weights;

pub use data::{Dataset, SampleShape, Splits};
pub use error::{Error, Result};
pub use model::{BuiltinModel, Classifier};
pub use progress::{number, thousands};
pub use run_dir::RunDir;
pub use score::{Score, score};
pub use settings::{Layers, Precision, Settings};
pub use summary::{EpochMetrics, StepTime, Summary};
pub use threads::ThreadPlan;
pub use train::task::{Classification, Task};
pub use train::{Options, Outcome, Trainer, default_run_dir, device, fit_task, train};

/// Re-exported so that a user's model and this crate use the same burn.
pub use burn;
