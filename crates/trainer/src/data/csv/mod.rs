//! CSV datasets as people have them: a header row or none, the label in any column (a whole
//! number, or text naming a class), columns to leave out, numeric features. A feature count
//! that is a perfect square (64 = 8 x 8) is read as a square one-channel image, so that a CNN
//! can train on it too.
//!
//! The training file teaches a [`Table`]: its columns, its classes, and (once the rows are
//! split) the statistics that normalize its features. The run folder keeps it, so that every
//! file read later (a test file, rows to predict) is read the same way, its columns found by
//! name. Files are parsed as a stream, each value held once as an `f32`.

mod columns;
mod labels;
mod reader;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use columns::{LabelColumn, Layout};
pub use labels::Classes;

use super::normalize::Scaling;
use super::{SampleShape, features_beyond};
use crate::error::{Error, Result};
use crate::settings::DataSettings;
use columns::{Mapping, describe};
use labels::LabelTexts;
use reader::{ROW_LIMIT, Rows, TEXT_LIMIT};

/// What a CSV run learnt of its training file, saved in its run folder as `table.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// The feature columns in the order the model takes them.
    pub features: Vec<String>,
    pub layout: Layout,
    pub classes: Classes,
    /// `data.scale`, which every feature is divided by as it is read.
    pub scale: f32,
    /// `data.normalize`'s statistics of the training rows (none for `"none"`).
    pub scaling: Option<Scaling>,
}

impl Table {
    /// Features in a row.
    pub fn width(&self) -> usize {
        self.features.len()
    }

    /// The shape of a row as a sample.
    pub fn shape(&self) -> SampleShape {
        shape_of(self.width())
    }

    /// Whether a table read back from a run folder holds together: a saved file is input too.
    pub fn is_consistent(&self) -> bool {
        let layout = &self.layout;
        layout.label < layout.cells
            && layout
                .ignored
                .iter()
                .all(|&c| c < layout.cells && c != layout.label)
            && layout
                .names
                .as_ref()
                .is_none_or(|n| n.len() == layout.cells)
            && layout.feature_cells().len() == self.width()
            && self.width() > 0
            && (2..=crate::settings::MAX_CLASSES).contains(&self.classes.count())
            && self.scale.is_finite()
            && self.scale > 0.0
            && self.scaling.as_ref().is_none_or(|s| s.fits(self.width()))
    }
}

/// The rows of the training file, and what they taught.
#[derive(Debug)]
pub(crate) struct TrainingFile {
    /// Without statistics yet: they come from the training split.
    pub table: Table,
    pub features: Vec<f32>,
    pub labels: Vec<u8>,
}

/// Loads the training file (gzip or plain) as the `data.*` keys describe it.
pub(crate) fn load_training(path: &Path, data: &DataSettings) -> Result<TrainingFile> {
    load_training_within(path, data, ROW_LIMIT, TEXT_LIMIT)
}

/// [`load_training`] with limits of its own on a row and on the whole text, in bytes.
fn load_training_within(
    path: &Path,
    data: &DataSettings,
    row_limit: u64,
    text_limit: u64,
) -> Result<TrainingFile> {
    let mut rows = Rows::open(path, row_limit, text_limit)?;
    let mut first = ::csv::StringRecord::new();
    if !rows.next_row(&mut first)? {
        return Err(Error::data(path, "no rows"));
    }
    let (layout, header) = Layout::learn(&first, data, &rows)?;
    let mut labels = LabelTexts::default();
    let features = read_samples(
        &mut rows,
        &layout.own_mapping(),
        &layout,
        data.scale,
        first,
        !header,
        |text, line| labels.push(text, line),
    )?;
    if labels.is_empty() {
        return Err(Error::data(path, "no rows under the header"));
    }
    let (classes, labels) = labels
        .into_classes(data)
        .map_err(|(line, e)| Error::data(path, format!("line {line}: {e}")))?;
    Ok(TrainingFile {
        table: Table {
            features: layout.feature_names(),
            layout,
            classes,
            scale: data.scale,
            scaling: None,
        },
        features,
        labels,
    })
}

/// Loads a file of rows with `table`'s columns (found by name, in any order): its features
/// divided by the table's scale (not normalized), and its classes where it holds labels.
pub(crate) fn load_with(
    path: &Path,
    table: &Table,
    label: LabelColumn,
) -> Result<(Vec<f32>, Option<Vec<u8>>)> {
    let mut rows = Rows::open(path, ROW_LIMIT, TEXT_LIMIT)?;
    let mut first = ::csv::StringRecord::new();
    if !rows.next_row(&mut first)? {
        return Err(Error::data(path, "no rows"));
    }
    let (mapping, header) = table.layout.map(&first, label, &rows)?;
    let mut labels = Vec::new();
    let features = read_samples(
        &mut rows,
        &mapping,
        &table.layout,
        table.scale,
        first,
        !header,
        |text, _| {
            labels.push(table.classes.class_of(text)?);
            Ok(())
        },
    )?;
    if features.is_empty() {
        return Err(Error::data(path, "no rows under the header"));
    }
    Ok((features, mapping.label.map(|_| labels)))
}

/// Reads the samples of `rows`, from `row` (the row read last) when `from_row`, else from the
/// next: the features `mapping` places, divided by `scale`, and the label cell given to `label`.
fn read_samples(
    rows: &mut Rows,
    mapping: &Mapping,
    layout: &Layout,
    scale: f32,
    mut row: ::csv::StringRecord,
    from_row: bool,
    mut label: impl FnMut(&str, usize) -> std::result::Result<(), String>,
) -> Result<Vec<f32>> {
    let memory = crate::usage::memory_limit_bytes();
    let feature_cells = layout.feature_cells();
    let column = |k: usize| describe(layout.names.as_deref(), feature_cells[k]);
    let mut features = Vec::new();
    if !from_row && !rows.next_row(&mut row)? {
        return Ok(features);
    }
    loop {
        let cells = mapping.cells;
        if row.len() != cells {
            return Err(if layout.names.is_some() {
                rows.error(format!("{} cells, but the header has {cells}", row.len()))
            } else {
                rows.error(format!(
                    "{} columns, expected {cells} like the first row",
                    row.len()
                ))
            });
        }
        let held = (features.len() + mapping.features.len()) as u64;
        if let Some(why) = features_beyond(held, memory) {
            return Err(rows.error(format!("the rows up to here hold {held} features: {why}")));
        }
        for (k, &cell) in mapping.features.iter().enumerate() {
            features.push(feature(&row[cell], scale, rows, || column(k))?);
        }
        if let Some(cell) = mapping.label {
            label(&row[cell], rows.line())
                .map_err(|e| rows.error(format!("{e}, in {}", layout.label_name())))?;
        }
        if !rows.next_row(&mut row)? {
            return Ok(features);
        }
    }
}

/// A feature cell as a number divided by `scale`; `column` names its column for an error.
fn feature(text: &str, scale: f32, rows: &Rows, column: impl Fn() -> String) -> Result<f32> {
    // A missing value written as NaN (or an infinity) would reach the first step and show as
    // a diverging loss: name the cell instead.
    let value = text.parse::<f32>().ok().filter(|v| v.is_finite());
    let value = value.ok_or_else(|| {
        Error::data(
            rows.path(),
            format!(
                "line {}, {}: '{text}' is not a finite number",
                rows.line(),
                column()
            ),
        )
    })?;
    let scaled = value / scale;
    if !scaled.is_finite() {
        // A tiny scale, not the file, is at fault: the run would diverge at step 1.
        return Err(Error::setting(
            "data.scale",
            format!(
                "{} makes a feature infinite: {value} on line {}, {}, of {} divided by it",
                crate::number(scale as f64),
                rows.line(),
                column(),
                rows.path().display()
            ),
        ));
    }
    Ok(scaled)
}

/// A row of `features` values as a sample: a square image where it can be one.
pub(crate) fn shape_of(features: usize) -> SampleShape {
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
    use crate::data::Dataset;
    use reader::size;

    fn settings(scale: f32, extra: &str) -> DataSettings {
        let mut data: DataSettings = toml::from_str(&format!(
            "format = \"csv\"\ntrain_csv = \"x.csv\"\ntest_fraction = 0.2\n{extra}"
        ))
        .unwrap();
        data.scale = scale;
        data
    }

    fn load_within(path: &Path, scale: f32, row_limit: u64, text_limit: u64) -> Result<Dataset> {
        let file = load_training_within(path, &settings(scale, ""), row_limit, text_limit)?;
        Ok(Dataset::new(file.features, file.labels, file.table.shape()))
    }

    /// The training file at `path` as a dataset, features divided by `scale`.
    fn load(path: &Path, scale: f32) -> Result<Dataset> {
        load_within(path, scale, ROW_LIMIT, TEXT_LIMIT)
    }

    fn load_text(text: &str) -> Result<Dataset> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        load(file.path(), 2.0)
    }

    /// Features divided by a tiny scale became infinite, and the run diverged at step 1 (a
    /// failed run, exit 1) instead of naming the setting.
    #[test]
    fn a_scale_that_makes_a_feature_infinite_is_named() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "1,2,0\n3,100,1\n").unwrap();
        let err = load(file.path(), 1e-37).unwrap_err();
        assert!(err.is_bad_input());
        let err = err.to_string();
        assert!(
            err.starts_with("data.scale: 1e-37 makes a feature infinite: 100 on line 2, column 2"),
            "{err}"
        );
        load(file.path(), 1e-30).unwrap();
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
        let text = load_text("1,2,3\n1,x,3\n").unwrap_err().to_string();
        assert!(
            text.ends_with("line 2, column 2: 'x' is not a finite number"),
            "{text}"
        );
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
        // A label that is not a whole number is a class name.
        let named = load_text("1,2,1.5\n3,4,2\n").unwrap();
        assert_eq!(named.labels(), &[0, 1]);
        assert!(load_text("").unwrap_err().to_string().contains("no rows"));
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn load_bytes(bytes: &[u8]) -> Result<Dataset> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        load(file.path(), 2.0)
    }

    /// Gzip files in one member or several (as pigz and bgzip write them) read as the plain file.
    #[test]
    fn reads_gzip_files_of_one_member_or_several() {
        let text: String = (0..50)
            .map(|i| format!("{},{},{},{}\n", i, i * 2, i % 7, i % 10))
            .collect();
        let plain = load_bytes(text.as_bytes()).unwrap();
        // Split inside a row: members need not end at a line.
        let (a, b) = text.as_bytes().split_at(text.len() / 2 + 3);
        for bytes in [gzip(text.as_bytes()), [gzip(a), gzip(b)].concat()] {
            let read = load_bytes(&bytes).unwrap();
            assert_eq!(read.features, plain.features);
            assert_eq!(read.labels(), plain.labels());
            assert_eq!(read.len(), 50);
        }
    }

    /// A gzip stream of zeros inflates without a line end: refused once a row is past the limit,
    /// with the parser's buffer no larger than that.
    #[test]
    fn refuses_a_row_past_the_limit_as_it_inflates() {
        let bomb = gzip(&vec![0u8; (ROW_LIMIT as usize) * 3]);
        let err = load_bytes(&bomb).unwrap_err().to_string();
        assert!(
            err.ends_with("line 1: longer than 8 MiB, the most a CSV row may take"),
            "{err}"
        );
        // Past the limit on a later row, by a little more than the parser's buffers.
        let mut text = b"1,2,3\n".to_vec();
        text.extend(b"0,".repeat((ROW_LIMIT as usize + (64 << 10)) / 2));
        text.extend(b"1\n");
        let err = load_bytes(&text).unwrap_err().to_string();
        assert!(
            err.ends_with("line 2: longer than 8 MiB, the most a CSV row may take"),
            "{err}"
        );
    }

    /// A row of exactly the limit, line end included, is read.
    #[test]
    fn reads_a_row_as_long_as_the_limit() {
        let mut text = b"0,".repeat(ROW_LIMIT as usize / 2 - 1);
        text.extend(b"1\n");
        assert_eq!(text.len() as u64, ROW_LIMIT);
        let data = load_bytes(&text).unwrap();
        assert_eq!(data.labels(), &[1]);
        assert_eq!(data.shape().len(), ROW_LIMIT as usize / 2 - 1);
    }

    /// The text limit stops a stream whatever its rows, blank lines included (here with limits
    /// of 1 MiB, for speed).
    #[test]
    fn refuses_text_past_its_limit() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let blank = [b"1,2,3\n".as_slice(), &b"\n".repeat(3 << 20)].concat();
        std::fs::write(file.path(), gzip(&blank)).unwrap();
        let err = load_within(file.path(), 1.0, 1 << 20, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("more than 1 MiB of text, the most a CSV file may hold"),
            "{err}"
        );
        let wide = [b"1,2,3\n".as_slice(), &b"1,".repeat(10_000), b"3\n"].concat();
        std::fs::write(file.path(), wide).unwrap();
        let err = load_within(file.path(), 1.0, 1000, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("line 2: longer than 1000 bytes, the most a CSV row may take"),
            "{err}"
        );
        assert_eq!(size(64 << 30), "64 GiB");
        assert_eq!(size(8 << 20), "8 MiB");
    }

    #[test]
    fn refuses_corrupt_gzip_fifos_and_devices() {
        let mut corrupt = gzip(b"1,2,3\n4,5,6\n");
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 0xff;
        corrupt.truncate(middle + 1);
        let err = load_bytes(&corrupt).unwrap_err().to_string();
        assert!(err.contains("corrupt gzip stream"), "{err}");

        use crate::files::testing::{mkfifo, within_10_s};
        let dir = tempfile::tempdir().unwrap();
        let fifo = mkfifo(&dir.path().join("rows.csv"));
        let err = within_10_s(move || load(&fifo, 1.0).unwrap_err().to_string());
        assert!(
            err.ends_with("rows.csv: is a FIFO (named pipe), not a regular file"),
            "{err}"
        );
        let err = load(Path::new("/dev/zero"), 1.0).unwrap_err().to_string();
        assert_eq!(err, "/dev/zero: is a character device, not a regular file");
    }
}
