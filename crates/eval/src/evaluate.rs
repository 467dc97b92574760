//! Scoring a finished run's model.

use std::fmt::Write as _;
use std::path::Path;

use allcores_trainer::files::{ReadError, read_regular};
use allcores_trainer::run_dir::SUMMARY_FILE;
use allcores_trainer::weights::{self, weights_sha256};
use allcores_trainer::{
    BuiltinModel, Layers, RunDir, Settings, Splits, ThreadPlan, score, thousands,
};
use serde::{Deserialize, Serialize};

use crate::EvalError;

/// A run's model scored on a test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub run_dir: String,
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub samples: usize,
    /// Accuracy of each class; `null` for a class absent from the test set.
    pub per_class_accuracy: Vec<Option<f64>>,
    /// `confusion[label][prediction]`.
    pub confusion: Vec<Vec<u64>>,
    pub weights_sha256: String,
}

/// Scores the final model of the run in `run_dir` on the test split of its config, after
/// `layers` (environment, `--set` overrides) are applied over that config.
pub fn evaluate_run(run_dir: &Path, layers: &Layers) -> Result<Evaluation, EvalError> {
    let run = RunDir::open(run_dir)?;
    let settings = Settings::load(&run.config_path(), layers)?;
    let test = Splits::load_test(&settings.data)?;
    let plan = ThreadPlan::new(settings.training.threads);
    let pool = plan.install()?;
    pool.install(|| {
        let device = allcores_trainer::device(settings.training.backend).inner();
        let classes = settings.data.classes;
        let model = BuiltinModel::new(&settings.model, test.shape(), classes, &device)?;
        let model = weights::load(model, &run.weights_path())?;
        let weights_sha256 = weights_sha256(&model);
        check_weights_are_the_runs(&run, &weights_sha256)?;
        let scored = score(
            &model,
            &test,
            classes,
            &device,
            settings.training.batch_size,
        );
        Ok(Evaluation {
            run_dir: run.path().display().to_string(),
            test_accuracy: scored.accuracy,
            test_loss: scored.loss,
            samples: scored.samples,
            per_class_accuracy: scored.per_class_accuracy(),
            confusion: scored.confusion,
            weights_sha256,
        })
    })
}

/// Refuses weights that are not those the run trained: the run's summary records their hash,
/// and a `model.safetensors` changed or replaced since would be scored as the run's without a
/// word. A folder without a summary (written by hand, or by an earlier build) is scored as is.
fn check_weights_are_the_runs(run: &RunDir, hash: &str) -> Result<(), EvalError> {
    #[derive(Deserialize)]
    struct Recorded {
        weights_sha256: String,
    }
    let path = run.path().join(SUMMARY_FILE);
    let corrupt = |message: String| allcores_trainer::Error::RunDir {
        path: path.clone(),
        message,
    };
    // Read as any input: a FIFO in the summary's place must not block the evaluation.
    let bytes = match read_regular(&path, None) {
        Ok(bytes) => bytes,
        Err(ReadError::NotFound) => return Ok(()),
        Err(e) => return Err(corrupt(format!("cannot read the summary: {e}")).into()),
    };
    let recorded: Recorded =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("corrupt summary: {e}")))?;
    if recorded.weights_sha256 == hash {
        return Ok(());
    }
    Err(allcores_trainer::Error::Weights {
        path: run.weights_path(),
        message: format!(
            "these weights hash to {}, but the run trained weights that hash to {} \
             ({SUMMARY_FILE}): the file was changed or replaced after the run",
            short(hash),
            short(&recorded.weights_sha256)
        ),
    }
    .into())
}

/// The first 12 hex digits of a hash: enough to tell two apart.
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

impl Evaluation {
    /// The evaluation as text: the totals, then one row per class with its accuracy and its
    /// row of the confusion matrix.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: test accuracy {:.2}% · test loss {:.4} · {} samples",
            self.run_dir,
            self.test_accuracy * 100.0,
            self.test_loss,
            thousands(self.samples as f64)
        );
        let classes = self.confusion.len();
        let _ = write!(out, "\nclass  accuracy   predicted:");
        for c in 0..classes {
            let _ = write!(out, "{c:>6}");
        }
        out.push('\n');
        for (class, row) in self.confusion.iter().enumerate() {
            let accuracy = self.per_class_accuracy[class]
                .map_or("     -".to_string(), |a| format!("{:>7.2}%", a * 100.0));
            let _ = write!(out, "{class:>5}  {accuracy:>8}             ");
            for count in row {
                let _ = write!(out, "{count:>6}");
            }
            out.push('\n');
        }
        let _ = write!(out, "\nweights_sha256 {}", self.weights_sha256);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text form: totals with grouped digits, one row per class (a dash for a class with no
    /// test samples) with its row of the confusion matrix under the predicted classes.
    #[test]
    fn the_text_shows_totals_and_one_row_per_class() {
        let evaluation = Evaluation {
            run_dir: "runs/x".into(),
            test_accuracy: 0.9,
            test_loss: 0.25,
            samples: 1250,
            per_class_accuracy: vec![Some(0.875), Some(1.0), None],
            confusion: vec![vec![7, 1, 0], vec![0, 3, 0], vec![0, 0, 0]],
            weights_sha256: "ab".repeat(32),
        };
        let text = evaluation.to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "runs/x: test accuracy 90.00% · test loss 0.2500 · 1,250 samples"
        );
        assert_eq!(lines[2], "class  accuracy   predicted:     0     1     2");
        let cells = |line: &str| {
            line.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(cells(lines[3]), ["0", "87.50%", "7", "1", "0"]);
        assert_eq!(cells(lines[4]), ["1", "100.00%", "0", "3", "0"]);
        assert_eq!(cells(lines[5]), ["2", "-", "0", "0", "0"]);
        assert_eq!(
            lines.last(),
            Some(&&*format!("weights_sha256 {}", "ab".repeat(32)))
        );
    }
}
