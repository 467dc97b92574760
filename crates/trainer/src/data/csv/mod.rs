//! CSV datasets: one sample a row, numeric features, the class label in the last column, no
//! header. Features are divided by `data.scale`. A row count of features that is a perfect
//! square (64 = 8 x 8) is read as a square one-channel image, so a CNN can train on it too.
//!
//! The file is parsed as a stream (gunzipped on the fly), within limits on a row, on the whole
//! text and on the memory its features take: a gzip bomb is refused as it inflates.

use std::io::Read;
use std::path::Path;

use super::{Dataset, Input, SampleShape, features_beyond, read_error};
use crate::error::{Error, Result};

/// The longest row: 8 MiB of text. A row of a 1024 x 1024 image written with 7 characters a
/// value ("0.12345,") fits; a gzip stream of zeros with no line end is refused after inflating
/// this much, not after filling memory.
const ROW_LIMIT: u64 = 8 << 20;
/// The most text a CSV file may hold: 64 GiB. Memory is bounded by the features' check; this
/// bounds the time spent on text that holds no features (blank lines), far past any dataset
/// that fits in the memory of the machines this trainer runs on.
const TEXT_LIMIT: u64 = 64 << 30;

/// Loads a CSV file (gzip or plain).
pub fn load(path: &Path, scale: f32, classes: usize) -> Result<Dataset> {
    load_within(path, scale, classes, ROW_LIMIT, TEXT_LIMIT)
}

/// [`load`] with limits of its own on a row and on the whole text, in bytes.
fn load_within(
    path: &Path,
    scale: f32,
    classes: usize,
    row_limit: u64,
    text_limit: u64,
) -> Result<Dataset> {
    let input = Input::open(path)?;
    let gzip = input.gzip;
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(::csv::Trim::All)
        .from_reader(Limited::with_limits(input.reader, row_limit, text_limit));
    let memory = crate::usage::memory_limit_bytes();
    let mut record = ::csv::StringRecord::new();
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut columns = None;
    for line in 1.. {
        match reader.read_record(&mut record) {
            Ok(true) => reader.get_mut().row_read(),
            Ok(false) => break,
            Err(e) => return Err(refusal(path, line, gzip, reader.get_ref(), e)),
        }
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
        let held = (features.len() + expected - 1) as u64;
        if let Some(why) = features_beyond(held, memory) {
            return Err(Error::data(
                path,
                format!("line {line}: the rows up to here hold {held} features: {why}"),
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
            let scaled = value / scale;
            if !scaled.is_finite() {
                // A tiny scale, not the file, is at fault: the run would diverge at step 1.
                return Err(Error::setting(
                    "data.scale",
                    format!(
                        "{} makes a feature infinite: {value} on line {line}, column {}, of {} \
                         divided by it",
                        crate::number(scale as f64),
                        column + 1,
                        path.display()
                    ),
                ));
            }
            features.push(scaled);
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

/// The error of a row the parser could not read.
fn refusal<R>(path: &Path, line: usize, gzip: bool, text: &Limited<R>, e: ::csv::Error) -> Error {
    match text.exceeded {
        Some(Exceeded::Row) => Error::data(
            path,
            format!(
                "line {line}: longer than {}, the most a CSV row may take",
                size(text.row_limit)
            ),
        ),
        Some(Exceeded::Text) => Error::data(
            path,
            format!(
                "more than {} of text, the most a CSV file may hold",
                size(text.text_limit)
            ),
        ),
        None if e.is_io_error() => match e.into_kind() {
            ::csv::ErrorKind::Io(e) => read_error(path, gzip, e),
            other => Error::data(path, format!("line {line}: {other:?}")),
        },
        None => Error::data(path, format!("line {line}: {e}")),
    }
}

/// `bytes` in GiB or MiB where it is a whole number of them.
fn size(bytes: u64) -> String {
    match bytes {
        b if b > 0 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b > 0 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

/// Which limit a CSV file went past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exceeded {
    Row,
    Text,
}

/// The CSV text on its way to the parser, counted: the bytes since the parser last finished a
/// row, and all of them.
///
/// The parser asks for more only once it has taken in every byte it was given, so all that came
/// since it finished its last row belongs to the row it is reading: when that is past
/// [`ROW_LIMIT`], so is the row, and the read fails before the parser's buffer grows further.
struct Limited<R> {
    inner: R,
    since_row: u64,
    total: u64,
    row_limit: u64,
    text_limit: u64,
    exceeded: Option<Exceeded>,
}

impl<R> Limited<R> {
    fn with_limits(inner: R, row_limit: u64, text_limit: u64) -> Self {
        Self {
            inner,
            since_row: 0,
            total: 0,
            row_limit,
            text_limit,
            exceeded: None,
        }
    }

    /// The parser finished a row.
    fn row_read(&mut self) {
        self.since_row = 0;
    }
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.since_row > self.row_limit {
            self.exceeded = Some(Exceeded::Row);
        } else if self.total > self.text_limit {
            self.exceeded = Some(Exceeded::Text);
        }
        if self.exceeded.is_some() {
            return Err(std::io::Error::other("past a CSV limit"));
        }
        let n = self.inner.read(buffer)?;
        self.since_row += n as u64;
        self.total += n as u64;
        Ok(n)
    }
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

    /// Features divided by a tiny scale became infinite, and the run diverged at step 1 (a
    /// failed run, exit 1) instead of naming the setting.
    #[test]
    fn a_scale_that_makes_a_feature_infinite_is_named() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "1,2,0\n3,100,1\n").unwrap();
        let err = load(file.path(), 1e-37, 10).unwrap_err();
        assert!(err.is_bad_input());
        let err = err.to_string();
        assert!(
            err.starts_with("data.scale: 1e-37 makes a feature infinite: 100 on line 2, column 2"),
            "{err}"
        );
        load(file.path(), 1e-30, 10).unwrap();
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

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn load_bytes(bytes: &[u8]) -> Result<Dataset> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        load(file.path(), 2.0, 10)
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
        let err = load_within(file.path(), 1.0, 10, 1 << 20, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("more than 1 MiB of text, the most a CSV file may hold"),
            "{err}"
        );
        let wide = [b"1,2,3\n".as_slice(), &b"1,".repeat(10_000), b"3\n"].concat();
        std::fs::write(file.path(), wide).unwrap();
        let err = load_within(file.path(), 1.0, 10, 1000, 1 << 20)
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
        let err = within_10_s(move || load(&fifo, 1.0, 10).unwrap_err().to_string());
        assert!(
            err.ends_with("rows.csv: is a FIFO (named pipe), not a regular file"),
            "{err}"
        );
        let err = load(Path::new("/dev/zero"), 1.0, 10)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "/dev/zero: is a character device, not a regular file");
    }
}
