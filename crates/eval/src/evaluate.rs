//! Scoring a finished run's model.

use std::fmt::Write as _;
use std::path::Path;

use allcores_trainer::data::csv::Classes;
use allcores_trainer::data::text::{self, ValSource};
use allcores_trainer::files::{ReadError, read_regular};
use allcores_trainer::language::{self, Gpt};
use allcores_trainer::run_dir::SUMMARY_FILE;
use allcores_trainer::settings::DataFormat;
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
    /// Each class's name: its label as the data writes it (`"0"`... for numbered classes).
    #[serde(default)]
    pub class_names: Vec<String>,
    pub weights_sha256: String,
}

/// A run's evaluation: a classifier's or a language model's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunEvaluation {
    Classifier(Evaluation),
    Text(TextEvaluation),
}

impl RunEvaluation {
    pub fn to_text(&self) -> String {
        match self {
            RunEvaluation::Classifier(e) => e.to_text(),
            RunEvaluation::Text(e) => e.to_text(),
        }
    }
}

/// A language model scored on a validation text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextEvaluation {
    pub run_dir: String,
    /// Mean cross-entropy per target token over the fixed validation windows.
    pub val_loss: f64,
    pub bits_per_char: f64,
    /// Fraction of next characters predicted right.
    pub accuracy: f64,
    /// Target tokens scored.
    pub tokens: usize,
    pub weights_sha256: String,
}

impl TextEvaluation {
    pub fn to_text(&self) -> String {
        format!(
            "{}: val loss {:.4} ({:.3} bits/char) · next-char accuracy {:.2}% · {} tokens\n\
             weights_sha256 {}",
            self.run_dir,
            self.val_loss,
            self.bits_per_char,
            self.accuracy * 100.0,
            thousands(self.tokens as f64),
            self.weights_sha256
        )
    }
}

/// Scores the final model of the run in `run_dir` on the held-out data of its config (a
/// classifier's test split, a language model's validation text), after `layers` (environment,
/// `--set` overrides) are applied over that config.
pub fn evaluate_run(run_dir: &Path, layers: &Layers) -> Result<RunEvaluation, EvalError> {
    let run = RunDir::open(run_dir)?;
    let settings = load_settings(&run, layers)?;
    if settings.data.format == DataFormat::Text {
        return evaluate_text_run(&run, &settings).map(RunEvaluation::Text);
    }
    evaluate_classifier_run(&run, &settings).map(RunEvaluation::Classifier)
}

/// The run's saved config under `layers`. A `data.val_text` override takes the place of a saved
/// `data.val_fraction` (a run validated on the end of its text is scored on another).
fn load_settings(run: &RunDir, layers: &Layers) -> Result<Settings, EvalError> {
    let path = run.config_path();
    let names_val_text = layers.overrides.iter().any(|o| {
        o.split_once('=')
            .is_some_and(|(k, _)| k.trim() == "data.val_text")
    });
    if !names_val_text {
        return Ok(Settings::load(&path, layers)?);
    }
    let corrupt = |message: String| allcores_trainer::Error::RunDir {
        path: path.clone(),
        message,
    };
    let bytes = read_regular(&path, None).map_err(|e| corrupt(format!("cannot read: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| corrupt(format!("not UTF-8: {e}")))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e| corrupt(format!("not TOML: {e}")))?;
    if let Some(toml::Value::Table(data)) = table.get_mut("data") {
        data.remove("val_fraction");
    }
    Ok(Settings::parse(&table.to_string(), &path, layers)?)
}

fn evaluate_text_run(run: &RunDir, settings: &Settings) -> Result<TextEvaluation, EvalError> {
    let vocabulary = language::load_vocabulary(run.path())?;
    let context = settings.model.context;
    // Validated settings name a validation text or a fraction of the training text.
    let val = match (&settings.data.val_text, &settings.data.train_text) {
        (Some(path), _) => text::load_with(&vocabulary, path, context)?,
        (None, Some(train)) => {
            let fraction = ValSource::Fraction(settings.data.val_fraction.unwrap_or(0.1));
            text::load_text(train, fraction, context)?.val
        }
        (None, None) => {
            return Err(allcores_trainer::Error::Setting {
                key: "data.train_text".into(),
                message: "required when data.format = \"text\"".into(),
            }
            .into());
        }
    };
    let plan = ThreadPlan::new(settings.training.threads);
    let pool = plan.install()?;
    pool.install(|| {
        let device = allcores_trainer::device(settings.training.backend).inner();
        let model = Gpt::new(&settings.model, vocabulary.len(), &device);
        let model = weights::load(model, &run.weights_path())?;
        let weights_sha256 = weights_sha256(&model);
        check_weights_are_the_runs(run, &weights_sha256)?;
        let positions = val.evaluation_positions(context, language::EVALUATION_WINDOWS);
        let scored = language::evaluate(
            &model,
            &val,
            &positions,
            context,
            &device,
            settings.training.batch_size,
        );
        Ok(TextEvaluation {
            run_dir: run.path().display().to_string(),
            val_loss: scored.loss,
            bits_per_char: language::bits_per_char(scored.loss),
            accuracy: scored.accuracy,
            tokens: scored.samples,
            weights_sha256,
        })
    })
}

fn evaluate_classifier_run(run: &RunDir, settings: &Settings) -> Result<Evaluation, EvalError> {
    // A CSV run reads its test rows with the columns, classes and statistics of its training.
    let (test, class_names) = match run.table()? {
        Some(table) => (
            Splits::load_test_with(&settings.data, &table)?,
            table.classes.names(),
        ),
        None => (
            Splits::load_test(&settings.data)?,
            Classes::Numbers(settings.data.numeric_classes()).names(),
        ),
    };
    let plan = ThreadPlan::new(settings.training.threads);
    let pool = plan.install()?;
    pool.install(|| {
        let device = allcores_trainer::device(settings.training.backend).inner();
        let classes = class_names.len();
        let model = BuiltinModel::new(&settings.model, test.shape(), classes, &device)?;
        let model = weights::load(model, &run.weights_path())?;
        let weights_sha256 = weights_sha256(&model);
        check_weights_are_the_runs(run, &weights_sha256)?;
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
            class_names,
            weights_sha256,
        })
    })
}

/// Refuses weights that are not those the run trained: the run's summary records their hash,
/// and a `model.safetensors` changed or replaced since would be scored as the run's without a
/// word. A folder without a summary (written by hand, or by an earlier build) is scored as is.
pub(crate) fn check_weights_are_the_runs(run: &RunDir, hash: &str) -> Result<(), EvalError> {
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
        // Columns as wide as the longest name: "malignant" as well as "7".
        let name = |c: usize| self.class_names.get(c).cloned().unwrap_or(c.to_string());
        let names: Vec<String> = (0..self.confusion.len()).map(name).collect();
        let first = names
            .iter()
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let cell = first.clamp(5, 12) + 1;
        let _ = write!(out, "\n{:<first$}  accuracy   predicted:", "class");
        for n in &names {
            let _ = write!(out, "{n:>cell$}");
        }
        out.push('\n');
        for ((row, n), accuracy) in self
            .confusion
            .iter()
            .zip(&names)
            .zip(&self.per_class_accuracy)
        {
            let accuracy =
                accuracy.map_or("     -".to_string(), |a| format!("{:>7.2}%", a * 100.0));
            let _ = write!(out, "{n:>first$}  {accuracy:>8}             ");
            for count in row {
                let _ = write!(out, "{count:>cell$}");
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
            class_names: vec!["0".into(), "1".into(), "2".into()],
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
