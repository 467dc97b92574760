//! allcores-eval: evaluation of trained runs.
//!
//! [`evaluate_run`] scores a run's final model on the test split of its saved config (or of
//! another, through overrides): loss, accuracy, accuracy per class and the confusion matrix.

mod evaluate;

pub use evaluate::{Evaluation, evaluate_run};

/// What can stop an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Trainer(#[from] allcores_trainer::Error),
}

impl EvalError {
    /// True when the user can fix it by changing the input (exit status 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            EvalError::Trainer(e) => e.is_bad_input(),
        }
    }
}
