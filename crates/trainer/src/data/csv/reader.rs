//! A CSV file as a stream of rows (gunzipped on the fly), within limits on a row and on the
//! whole text: a gzip bomb is refused as it inflates, not after it filled memory.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::data::{Input, read_error};
use crate::error::{Error, Result};

/// The longest row: 8 MiB of text. A row of a 1024 x 1024 image written with 7 characters a
/// value ("0.12345,") fits; a gzip stream of zeros with no line end is refused after inflating
/// this much, not after filling memory.
pub(super) const ROW_LIMIT: u64 = 8 << 20;
/// The most text a CSV file may hold: 64 GiB. Memory is bounded by the features' check; this
/// bounds the time spent on text that holds no features (blank lines), far past any dataset
/// that fits in the memory of the machines this trainer runs on.
pub(super) const TEXT_LIMIT: u64 = 64 << 30;

/// The rows of one CSV file, read one at a time, each trimmed of the spaces around its cells.
pub(super) struct Rows {
    reader: ::csv::Reader<Limited<Box<dyn Read>>>,
    path: PathBuf,
    gzip: bool,
    /// The row last read, counted from 1: the line it is on when no cell holds a line end.
    line: usize,
}

impl Rows {
    /// Opens the CSV file at `path` (gzip or plain) with limits, in bytes, on a row and on the
    /// whole text.
    pub(super) fn open(path: &Path, row_limit: u64, text_limit: u64) -> Result<Self> {
        let input = Input::open(path)?;
        let reader = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(::csv::Trim::All)
            .from_reader(Limited::with_limits(input.reader, row_limit, text_limit));
        Ok(Rows {
            reader,
            path: path.to_path_buf(),
            gzip: input.gzip,
            line: 0,
        })
    }

    /// Reads the next row into `record` (a buffer used again for every row); false at the end
    /// of the file.
    pub(super) fn next_row(&mut self, record: &mut ::csv::StringRecord) -> Result<bool> {
        self.line += 1;
        match self.reader.read_record(record) {
            Ok(true) => {
                self.reader.get_mut().row_read();
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => Err(refusal(
                &self.path,
                self.line,
                self.gzip,
                self.reader.get_ref(),
                e,
            )),
        }
    }

    /// The number of the row last read, from 1.
    pub(super) fn line(&self) -> usize {
        self.line
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// An error in this file, at the row last read.
    pub(super) fn error(&self, message: impl std::fmt::Display) -> Error {
        Error::data(&self.path, format!("line {}: {message}", self.line))
    }
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
pub(super) fn size(bytes: u64) -> String {
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
