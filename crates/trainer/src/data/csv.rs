//! CSV datasets: one sample a row, numeric features, the class label in the last column, no
//! header. Features are divided by `data.scale`. A row count of features that is a perfect
//! square (64 = 8 x 8) is read as a square one-channel image, so a CNN can train on it too.

use std::path::Path;

use super::{Dataset, SampleShape, read_maybe_gzip};
use crate::error::{Error, Result};

/// Loads a CSV file (gzip or plain).
pub fn load(path: &Path, scale: f32, classes: usize) -> Result<Dataset> {
    let bytes = read_maybe_gzip(path)?;
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(::csv::Trim::All)
        .from_reader(bytes.as_slice());
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut columns = None;
    for (row, record) in reader.records().enumerate() {
        let line = row + 1;
        let record = record.map_err(|e| Error::data(path, format!("line {line}: {e}")))?;
        let expected = *columns.get_or_insert(record.len());
        if record.len() != expected {
            return Err(Error::data(
                path,
                format!(
                    "line {line}: {} columns, expected {expected} like the first row",
                    record.len()
                ),
            ));
        }
        if expected < 2 {
            return Err(Error::data(
                path,
                "rows need at least one feature and a label",
            ));
        }
        for (column, field) in record.iter().take(expected - 1).enumerate() {
            // A missing value written as NaN (or an infinity) would reach the first step and
            // show as a diverging loss: name the cell instead.
            let value = field.parse::<f32>().ok().filter(|v| v.is_finite());
            let value = value.ok_or_else(|| {
                Error::data(
                    path,
                    format!(
                        "line {line}, column {}: '{field}' is not a finite number",
                        column + 1
                    ),
                )
            })?;
            features.push(value / scale);
        }
        labels.push(
            parse_label(&record[expected - 1], classes)
                .map_err(|e| Error::data(path, format!("line {line}: {e}")))?,
        );
    }
    let Some(columns) = columns else {
        return Err(Error::data(path, "no rows"));
    };
    Ok(Dataset::new(features, labels, shape_of(columns - 1)))
}

/// A label: a whole number below `classes`.
fn parse_label(field: &str, classes: usize) -> std::result::Result<u8, String> {
    let label = field
        .parse::<i64>()
        .map_err(|_| format!("label '{field}' is not a whole number"))?;
    usize::try_from(label)
        .ok()
        .filter(|&l| l < classes)
        .map(|l| l as u8)
        .ok_or_else(|| {
            format!("label {label} lies outside the class range 0..{classes} (set data.classes)")
        })
}

fn shape_of(features: usize) -> SampleShape {
    let side = (features as f64).sqrt().round() as usize;
    if side * side == features {
        SampleShape {
            channels: 1,
            height: side,
            width: side,
        }
    } else {
        SampleShape {
            channels: 1,
            height: 1,
            width: features,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Dataset> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        load(file.path(), 2.0, 10)
    }

    #[test]
    fn reads_features_scaled_and_label_last() {
        let data = load_text("2,4,6,8,1\n0,0,2,2,9\n").unwrap();
        assert_eq!(data.labels(), &[1, 9]);
        assert_eq!(data.features, vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 1.0]);
        assert_eq!((data.shape().height, data.shape().width), (2, 2));
    }

    #[test]
    fn non_square_rows_are_flat() {
        let data = load_text("1,2,3,0\n").unwrap();
        assert_eq!((data.shape().height, data.shape().width), (1, 3));
    }

    #[test]
    fn refuses_ragged_rows_bad_numbers_and_bad_labels_naming_the_line() {
        let ragged = load_text("1,2,3\n1,2\n").unwrap_err().to_string();
        assert!(ragged.contains("line 2: 2 columns, expected 3"), "{ragged}");
        let text = load_text("1,x,3\n").unwrap_err().to_string();
        assert!(text.contains("line 1, column 2"), "{text}");
        for missing in ["nan", "NaN", "inf", "-inf"] {
            let text = load_text(&format!("1,2,3\n4,{missing},3\n"))
                .unwrap_err()
                .to_string();
            assert!(
                text.contains(&format!(
                    "line 2, column 2: '{missing}' is not a finite number"
                )),
                "{text}"
            );
        }
        let label = load_text("1,2,3\n1,2,10\n").unwrap_err().to_string();
        assert!(label.contains("line 2: label 10 lies outside"), "{label}");
        let negative = load_text("1,2,-1\n").unwrap_err().to_string();
        assert!(negative.contains("label -1 lies outside"), "{negative}");
        let fraction = load_text("1,2,1.5\n").unwrap_err().to_string();
        assert!(
            fraction.contains("line 1: label '1.5' is not a whole number"),
            "{fraction}"
        );
        assert!(load_text("").unwrap_err().to_string().contains("no rows"));
    }
}
