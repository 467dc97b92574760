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
            let value: f32 = field.parse().map_err(|_| {
                Error::data(
                    path,
                    format!(
                        "line {line}, column {}: '{field}' is not a number",
                        column + 1
                    ),
                )
            })?;
            features.push(value / scale);
        }
        let label_field = &record[expected - 1];
        let label = label_field
            .parse::<usize>()
            .ok()
            .filter(|&l| l < classes)
            .ok_or_else(|| {
                Error::data(
                    path,
                    format!(
                        "line {line}: label '{label_field}' lies outside the class range \
                         0..{classes} (set data.classes)"
                    ),
                )
            })?;
        labels.push(label as u8);
    }
    let Some(columns) = columns else {
        return Err(Error::data(path, "no rows"));
    };
    Ok(Dataset::new(features, labels, shape_of(columns - 1)))
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
        let label = load_text("1,2,3\n1,2,10\n").unwrap_err().to_string();
        assert!(label.contains("line 2: label '10'"), "{label}");
        let negative = load_text("1,2,-1\n").unwrap_err().to_string();
        assert!(negative.contains("label '-1'"), "{negative}");
        assert!(load_text("").unwrap_err().to_string().contains("no rows"));
    }
}
