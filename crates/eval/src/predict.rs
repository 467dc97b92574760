//! `allcores predict`: a finished classifier run's model on new rows (a CSV file with the
//! columns of its training file, in any order) or images (an IDX image file): each sample's
//! predicted class, its probability and every class's, and the accuracy where the file holds
//! labels.

use std::io::Write;
use std::path::Path;

use allcores_trainer::data::csv::Classes;
use allcores_trainer::data::{ModelInput, load_to_predict, trained_image_shape};
use allcores_trainer::settings::DataFormat;
use allcores_trainer::weights::{self, weights_sha256};
use allcores_trainer::{BuiltinModel, Classifier, Dataset, Layers, RunDir, Settings, ThreadPlan};
use burn::prelude::*;
use serde::Serialize;

use crate::EvalError;
use crate::evaluate::check_weights_are_the_runs;

/// A run's model on the samples of one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Predictions {
    pub run_dir: String,
    pub input: String,
    /// Each class's name, in class order: the order of `probabilities`.
    pub classes: Vec<String>,
    /// The fraction of samples predicted right, where the file holds labels.
    pub accuracy: Option<f64>,
    pub predictions: Vec<Prediction>,
    pub weights_sha256: String,
}

/// One sample's prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The sample's place in the file, from 1 (the header not counted).
    pub row: usize,
    /// Its label, where the file holds one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub predicted: String,
    /// The predicted class's probability.
    pub probability: f64,
    /// Every class's probability, in class order.
    pub probabilities: Vec<f64>,
}

/// The model of the finished run in `run_dir` on the samples of `input`.
pub fn predict(run_dir: &Path, input: &Path) -> Result<Predictions, EvalError> {
    let run = RunDir::open(run_dir)?;
    let settings = Settings::load(&run.config_path(), &Layers::default())?;
    let refuse = |message: &str| allcores_trainer::Error::RunDir {
        path: run.path().to_path_buf(),
        message: message.to_string(),
    };
    let table = run.table()?;
    let (model_input, classes) = match (settings.data.format, &table) {
        (DataFormat::Csv, Some(table)) => (ModelInput::Rows(table), table.classes.names()),
        (DataFormat::Csv, None) => {
            return Err(refuse(
                "holds no table.json (the run predates it): train it again to predict with it",
            )
            .into());
        }
        (DataFormat::Idx, _) => (
            ModelInput::Images(trained_image_shape(&settings.data)?),
            Classes::Numbers(settings.data.numeric_classes()).names(),
        ),
        (DataFormat::Text, _) => {
            return Err(refuse(
                "holds a language model: predict scores a classifier's samples (write text \
                 with allcores sample)",
            )
            .into());
        }
    };
    let (data, labelled) = load_to_predict(input, model_input)?;
    let plan = ThreadPlan::new(settings.training.threads);
    let pool = plan.install()?;
    pool.install(|| {
        let device = allcores_trainer::device(settings.training.backend).inner();
        let model = BuiltinModel::new(&settings.model, data.shape(), classes.len(), &device)?;
        let model = weights::load(model, &run.weights_path())?;
        let weights_sha256 = weights_sha256(&model);
        check_weights_are_the_runs(&run, &weights_sha256)?;
        let probabilities = probabilities(&model, &data, &device, settings.training.batch_size);
        let predictions: Vec<Prediction> = probabilities
            .into_iter()
            .enumerate()
            .map(|(i, probabilities)| {
                let class = most_likely(&probabilities);
                Prediction {
                    row: i + 1,
                    label: labelled.then(|| classes[data.labels()[i] as usize].clone()),
                    predicted: classes[class].clone(),
                    probability: probabilities[class],
                    probabilities,
                }
            })
            .collect();
        let accuracy = labelled.then(|| right(&predictions) as f64 / predictions.len() as f64);
        Ok(Predictions {
            run_dir: run.path().display().to_string(),
            input: input.display().to_string(),
            classes,
            accuracy,
            predictions,
            weights_sha256,
        })
    })
}

/// Every sample's class probabilities, `batch_size` samples a forward pass. The softmax runs
/// here, in f64 and in class order, on the f32 logits: the same bits at every thread count.
fn probabilities(
    model: &BuiltinModel,
    data: &Dataset,
    device: &Device,
    batch_size: usize,
) -> Vec<Vec<f64>> {
    let model = model.valid();
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(data.len());
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, _) = data.batch(chunk, device);
        let logits = model.forward(x);
        let [_, classes] = logits.dims();
        let logits = logits.into_data().convert::<f32>();
        let logits = logits.as_slice::<f32>().expect("f32 logits");
        out.extend(logits.chunks_exact(classes).map(softmax));
    }
    out
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// How many of `predictions` name their sample's label.
fn right(predictions: &[Prediction]) -> usize {
    predictions
        .iter()
        .filter(|p| p.label.as_ref() == Some(&p.predicted))
        .count()
}

/// The first class of the largest probability.
fn most_likely(probabilities: &[f64]) -> usize {
    let mut best = 0;
    for (class, &p) in probabilities.iter().enumerate() {
        if p > probabilities[best] {
            best = class;
        }
    }
    best
}

impl Predictions {
    /// One CSV row per sample: `row`, `label` (where the file holds labels), `predicted`,
    /// `probability`, then `p_<class>` for every class; probabilities with 6 decimals.
    pub fn write_csv(&self, out: impl Write) -> std::io::Result<()> {
        let mut writer = csv::Writer::from_writer(out);
        let labelled = self.accuracy.is_some();
        let mut header = vec!["row".to_string()];
        if labelled {
            header.push("label".into());
        }
        header.extend(["predicted".into(), "probability".into()]);
        header.extend(self.classes.iter().map(|c| format!("p_{c}")));
        writer.write_record(&header)?;
        for p in &self.predictions {
            let mut record = vec![p.row.to_string()];
            record.extend(p.label.clone());
            record.push(p.predicted.clone());
            record.push(format!("{:.6}", p.probability));
            record.extend(p.probabilities.iter().map(|q| format!("{q:.6}")));
            writer.write_record(&record)?;
        }
        writer.flush()
    }

    /// The summary line: how many samples, and the accuracy where they hold labels.
    pub fn summary(&self) -> String {
        let samples = self.predictions.len();
        let right = right(&self.predictions);
        match self.accuracy {
            Some(accuracy) => format!(
                "{} predictions · accuracy {:.2}% ({} of {} right)",
                allcores_trainer::thousands(samples as f64),
                accuracy * 100.0,
                allcores_trainer::thousands(right as f64),
                allcores_trainer::thousands(samples as f64)
            ),
            None => format!(
                "{} predictions (the file holds no labels to score them by)",
                allcores_trainer::thousands(samples as f64)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_1_and_keeps_the_order_of_the_logits() {
        let p = softmax(&[1.0, 3.0, 2.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[1] > p[2] && p[2] > p[0]);
        assert_eq!(most_likely(&p), 1);
        // Logits far apart do not overflow.
        assert_eq!(softmax(&[1000.0, 0.0])[0], 1.0);
        assert_eq!(most_likely(&[0.5, 0.5]), 0);
    }

    #[test]
    fn the_csv_has_a_label_column_only_with_labels() {
        let prediction = |label: Option<&str>| Prediction {
            row: 1,
            label: label.map(String::from),
            predicted: "b,c".into(),
            probability: 0.75,
            probabilities: vec![0.25, 0.75],
        };
        let mut predictions = Predictions {
            run_dir: "r".into(),
            input: "i".into(),
            classes: vec!["a".into(), "b,c".into()],
            accuracy: Some(1.0),
            predictions: vec![prediction(Some("b,c"))],
            weights_sha256: String::new(),
        };
        let mut out = Vec::new();
        predictions.write_csv(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "row,label,predicted,probability,p_a,\"p_b,c\"\n\
             1,\"b,c\",\"b,c\",0.750000,0.250000,0.750000\n"
        );
        assert_eq!(
            predictions.summary(),
            "1 predictions · accuracy 100.00% (1 of 1 right)"
        );
        predictions.accuracy = None;
        predictions.predictions = vec![prediction(None)];
        let mut out = Vec::new();
        predictions.write_csv(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "row,predicted,probability,p_a,\"p_b,c\"\n1,\"b,c\",0.750000,0.250000,0.750000\n"
        );
    }
}
