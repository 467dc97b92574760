//! Datasets in memory, their loaders, and the seeded order in which training visits them.
//!
//! A [`Dataset`] holds every sample as scaled `f32` features plus a class label. Loaders read
//! IDX (the MNIST format) and CSV, gzip or plain. The shuffle of each epoch depends on the seed
//! and the epoch number only, never on the thread count.

mod csv;
mod idx;
mod order;
pub mod text;

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::files::{self, ReadError};
use crate::settings::{DataFormat, DataSettings};

pub use order::{epoch_order, split_rows};

/// The shape of one sample as an image: channels, height, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SampleShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl SampleShape {
    /// Features in one sample.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// True when a sample holds no feature at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Labelled samples, features already scaled.
#[derive(Debug, Clone)]
pub struct Dataset {
    features: Vec<f32>,
    labels: Vec<u8>,
    shape: SampleShape,
}

impl Dataset {
    /// Builds a dataset; `features` holds `labels.len()` samples of `shape.len()` values.
    pub fn new(features: Vec<f32>, labels: Vec<u8>, shape: SampleShape) -> Self {
        assert_eq!(features.len(), labels.len() * shape.len());
        Self {
            features,
            labels,
            shape,
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn shape(&self) -> SampleShape {
        self.shape
    }

    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The samples at `indices`, in that order, as a `[n, channels, height, width]` tensor and
    /// their labels.
    pub fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
        let features = self.gather(indices);
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i] as i64).collect();
        let SampleShape {
            channels,
            height,
            width,
        } = self.shape;
        let x = Tensor::from_data(
            TensorData::new(features, [indices.len(), channels, height, width]),
            device,
        );
        let y = Tensor::from_data(TensorData::new(labels, [indices.len()]), device);
        (x, y)
    }

    /// Keeps the rows at `indices`, in that order.
    fn select(&self, indices: &[usize]) -> Dataset {
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        Dataset::new(self.gather(indices), labels, self.shape)
    }

    /// The features of the samples at `indices`, in that order, one after another.
    /// Rows are copied on the pool, a block of them per task (a copy: the split changes nothing).
    fn gather(&self, indices: &[usize]) -> Vec<f32> {
        const ROWS: usize = 16;
        let width = self.shape.len();
        let copy_rows = |block: usize, out: &mut [std::mem::MaybeUninit<f32>]| {
            let rows = &indices[block * ROWS..];
            for (row, &i) in out.chunks_exact_mut(width.max(1)).zip(rows) {
                row.write_copy_of_slice(&self.features[i * width..(i + 1) * width]);
            }
        };
        // SAFETY: a block of `out` holds whole rows, one per index, and each is copied in.
        unsafe {
            crate::kernels::build_in_parallel_uninit(indices.len() * width, ROWS * width, copy_rows)
        }
    }

    fn check_labels(&self, classes: usize, source: &Path) -> Result<()> {
        match self.labels.iter().position(|&l| l as usize >= classes) {
            Some(i) => Err(Error::data(
                source,
                format!(
                    "label {} of sample {i} lies outside the class range 0..{classes} \
                     (set data.classes)",
                    self.labels[i]
                ),
            )),
            None => Ok(()),
        }
    }
}

/// The training and test sets of a run.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
    pub classes: usize,
}

impl Splits {
    /// Loads both splits as the settings describe; every error names the file at fault.
    pub fn load(settings: &DataSettings) -> Result<Self> {
        let (train, test) = match settings.format {
            DataFormat::Idx => {
                let train = load_idx(settings, &settings.train_images, &settings.train_labels)?;
                let test = load_idx(settings, &settings.test_images, &settings.test_labels)?;
                // A model takes one image size: test images of another would fail the first
                // scoring pass, after an epoch of training.
                let (a, b) = (train.shape(), test.shape());
                if a != b {
                    return Err(Error::data(
                        required(&settings.test_images),
                        format!(
                            "images are {}x{}, the training images {}x{}",
                            b.height, b.width, a.height, a.width
                        ),
                    ));
                }
                (train, test)
            }
            DataFormat::Csv => load_csv(settings)?,
            DataFormat::Text => return Err(text_is_no_split(settings)),
        };
        Ok(Splits {
            train,
            test,
            classes: settings.classes,
        })
    }

    /// Loads the test split alone (a single CSV file is still read whole, to split it).
    pub fn load_test(settings: &DataSettings) -> Result<Dataset> {
        match settings.format {
            DataFormat::Idx => load_idx(settings, &settings.test_images, &settings.test_labels),
            DataFormat::Csv => Ok(load_csv(settings)?.1),
            DataFormat::Text => Err(text_is_no_split(settings)),
        }
    }
}

/// Text is read by [`text::load_text`] for a language model, never as labelled samples.
fn text_is_no_split(settings: &DataSettings) -> Error {
    Error::setting(
        "data.format",
        format!(
            "\"{}\" holds a text for a language model (model.kind = \"gpt\"), not labelled samples",
            settings.format
        ),
    )
}

fn required(path: &Option<PathBuf>) -> &Path {
    path.as_deref()
        .expect("validated settings name every file of their format")
}

fn load_idx(
    settings: &DataSettings,
    images: &Option<PathBuf>,
    labels: &Option<PathBuf>,
) -> Result<Dataset> {
    let data = idx::load(required(images), required(labels))?;
    data.check_labels(settings.classes, required(labels))?;
    Ok(data)
}

/// (train, test) from `train_csv` and `test_csv`, or from `train_csv` split by `test_fraction`.
fn load_csv(settings: &DataSettings) -> Result<(Dataset, Dataset)> {
    let path = required(&settings.train_csv);
    let all = csv::load(path, settings.scale, settings.classes)?;
    if let Some(test_path) = &settings.test_csv {
        let test = csv::load(test_path, settings.scale, settings.classes)?;
        if test.shape() != all.shape() {
            return Err(Error::data(
                test_path,
                format!(
                    "rows have {} features, the training file's have {}",
                    test.shape().len(),
                    all.shape().len()
                ),
            ));
        }
        return Ok((all, test));
    }
    let fraction = settings
        .test_fraction
        .expect("validated: test_csv or test_fraction");
    let (train_rows, test_rows) = split_rows(all.len(), fraction, settings.split_seed);
    if train_rows.is_empty() || test_rows.is_empty() {
        return Err(Error::data(
            path,
            format!(
                "{} too few to split with data.test_fraction = {}",
                match all.len() {
                    1 => "1 row is".to_string(),
                    rows => format!("{rows} rows are"),
                },
                crate::number(fraction)
            ),
        ));
    }
    Ok((all.select(&train_rows), all.select(&test_rows)))
}

/// The first bytes of every gzip member.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A dataset file open for reading: its bytes come gunzipped on the fly when it starts with the
/// gzip magic bytes, so that a file is never inflated whole before its content is checked.
struct Input {
    reader: Box<dyn Read>,
    gzip: bool,
    /// The size of the file on disk (compressed, for a gzip file).
    file_size: u64,
}

impl Input {
    /// Opens the regular file at `path`: a FIFO or a device is refused by what it is.
    fn open(path: &Path) -> Result<Self> {
        let mut file = files::open_regular(path).map_err(|e| {
            let message = match e {
                ReadError::NotFound => "dataset file not found".to_string(),
                ReadError::Io(e) => format!("cannot read dataset file: {e}"),
                other => other.to_string(),
            };
            Error::data(path, message)
        })?;
        let cannot_read =
            |e: std::io::Error| Error::data(path, format!("cannot read dataset file: {e}"));
        let file_size = file.metadata().map_err(cannot_read)?.len();
        let mut head = [0u8; GZIP_MAGIC.len()];
        let found = read_up_to(&mut file, &mut head).map_err(cannot_read)?;
        let head = std::io::Cursor::new(head[..found].to_vec());
        let gzip = head.get_ref()[..] == GZIP_MAGIC;
        let bytes = head.chain(file);
        // Every member: pigz and bgzip write several, one after another.
        let reader: Box<dyn Read> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(bytes))
        } else {
            Box::new(bytes)
        };
        Ok(Input {
            reader,
            gzip,
            file_size,
        })
    }

    /// The error of a failed read of this input.
    fn error(&self, path: &Path, e: std::io::Error) -> Error {
        read_error(path, self.gzip, e)
    }
}

fn read_error(path: &Path, gzip: bool, e: std::io::Error) -> Error {
    if gzip {
        Error::data(path, format!("corrupt gzip stream: {e}"))
    } else {
        Error::data(path, format!("cannot read dataset file: {e}"))
    }
}

/// Fills `buffer` from `reader` as far as the reader goes; returns how many bytes it holds.
fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Why `features` f32 values cannot be held by a process that may use `memory` bytes (see
/// [`crate::usage::memory_limit_bytes`]), or `None` where they fit. More than half that memory
/// is refused: a loaded set is copied once more before training (the split of a single CSV
/// file; an IDX file's bytes into features), and a growing one doubles its buffer on the way.
fn features_beyond(features: u64, memory: Option<u64>) -> Option<String> {
    let memory = memory?;
    let bytes = features.saturating_mul(4);
    (bytes > memory / 2).then(|| {
        const GIB: f64 = (1u64 << 30) as f64;
        format!(
            "as f32 features they take {:.1} GiB, more than half the {:.1} GiB this process may \
             use",
            bytes as f64 / GIB,
            memory as f64 / GIB
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_beyond_half_the_memory_are_refused() {
        assert_eq!(features_beyond(125, Some(1000)), None);
        let gib = 1u64 << 30;
        assert_eq!(
            features_beyond(gib, Some(6 * gib)).as_deref(),
            Some(
                "as f32 features they take 4.0 GiB, more than half the 6.0 GiB this process may use"
            )
        );
        // Where the memory cannot be read, nothing is refused for it.
        assert_eq!(features_beyond(u64::MAX, None), None);
    }
}
