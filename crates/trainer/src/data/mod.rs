//! Datasets in memory, their loaders, and the seeded order in which training visits them.
//!
//! A [`Dataset`] holds every sample as scaled `f32` features plus a class label. Loaders read
//! IDX (the MNIST format) and CSV, gzip or plain. The shuffle of each epoch depends on the seed
//! and the epoch number only, never on the thread count.

pub mod csv;
mod idx;
pub mod normalize;
mod order;
pub mod text;

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::files::{self, ReadError};
use crate::settings::{DataFormat, DataSettings};
use csv::{LabelColumn, Table};
use normalize::Scaling;

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

    /// Every sample's features, one after another.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// The classes the labels hold, in order.
    fn distinct_labels(&self) -> Vec<u8> {
        let mut seen = [false; 256];
        self.labels.iter().for_each(|&l| seen[l as usize] = true);
        (0..=255u8).filter(|&l| seen[l as usize]).collect()
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

    /// (the rows at `train_rows`, those at `test_rows`), each in that order: every row in one of
    /// them. The test rows are copied out; the training rows are moved into place, so that a
    /// large file's features are held once, plus its test rows, not twice.
    fn split(mut self, train_rows: &[usize], test_rows: &[usize]) -> (Dataset, Dataset) {
        let test = self.select(test_rows);
        let order: Vec<usize> = train_rows.iter().chain(test_rows).copied().collect();
        permute_rows(&mut self.features, self.shape.len(), &order);
        self.features.truncate(train_rows.len() * self.shape.len());
        self.labels = train_rows.iter().map(|&i| self.labels[i]).collect();
        (self, test)
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
    /// A CSV run's columns, classes and statistics, which its run folder keeps.
    pub table: Option<Table>,
    /// What the user should know of the data before the run starts (a constant column).
    pub warnings: Vec<String>,
}

impl Splits {
    /// Loads both splits as the settings describe; every error names the file at fault.
    pub fn load(settings: &DataSettings) -> Result<Self> {
        match settings.format {
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
                Ok(Splits {
                    train,
                    test,
                    classes: settings.numeric_classes(),
                    table: None,
                    warnings: Vec::new(),
                })
            }
            DataFormat::Csv => load_csv(settings),
            DataFormat::Text => Err(text_is_no_split(settings)),
        }
    }

    /// Loads the test split alone (a single CSV file is still read whole, to split it).
    pub fn load_test(settings: &DataSettings) -> Result<Dataset> {
        match settings.format {
            DataFormat::Idx => load_idx(settings, &settings.test_images, &settings.test_labels),
            DataFormat::Csv => Ok(load_csv(settings)?.test),
            DataFormat::Text => Err(text_is_no_split(settings)),
        }
    }

    /// Loads the test split of a CSV run with the table its training saved: the columns found
    /// by name, the classes and the statistics those of the training rows.
    pub fn load_test_with(settings: &DataSettings, table: &Table) -> Result<Dataset> {
        let (path, split) = match (&settings.test_csv, settings.test_fraction) {
            (Some(path), _) => (path.as_path(), None),
            (None, fraction) => (required(&settings.train_csv), fraction),
        };
        let (features, labels) = csv::load_with(path, table, LabelColumn::Required)?;
        let labels = labels.expect("a label column is required");
        let mut data = Dataset::new(features, labels, table.shape());
        if let Some(fraction) = split {
            let (_, test_rows) = split_rows(data.len(), fraction, settings.split_seed);
            data = data.select(&test_rows);
        }
        if let Some(scaling) = &table.scaling {
            scaling.apply(&mut data.features);
        }
        Ok(data)
    }
}

/// What a run's model takes, for [`load_to_predict`].
#[derive(Debug, Clone, Copy)]
pub enum ModelInput<'a> {
    /// Rows with the columns of a CSV run's table.
    Rows(&'a Table),
    /// Images of this shape, in an IDX image file.
    Images(SampleShape),
}

/// The samples of `path` to predict, read as the run's training data was, and whether they
/// hold labels (a CSV file may hold its label column; an image file holds none, and its
/// dataset's labels are 0).
pub fn load_to_predict(path: &Path, input: ModelInput) -> Result<(Dataset, bool)> {
    match input {
        ModelInput::Rows(table) => {
            let (mut features, labels) = csv::load_with(path, table, LabelColumn::Optional)?;
            if let Some(scaling) = &table.scaling {
                scaling.apply(&mut features);
            }
            let labelled = labels.is_some();
            let rows = features.len() / table.width();
            let labels = labels.unwrap_or_else(|| vec![0; rows]);
            Ok((Dataset::new(features, labels, table.shape()), labelled))
        }
        ModelInput::Images(shape) => {
            let (features, found) = idx::load_images(path)?;
            if found != shape {
                return Err(Error::data(
                    path,
                    format!(
                        "images are {}x{}, the model's {}x{}",
                        found.height, found.width, shape.height, shape.width
                    ),
                ));
            }
            let labels = vec![0; features.len() / shape.len()];
            Ok((Dataset::new(features, labels, shape), false))
        }
    }
}

/// The shape of the images an IDX run trained on, from its training file's header.
pub fn trained_image_shape(settings: &DataSettings) -> Result<SampleShape> {
    idx::image_shape(required(&settings.train_images))
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
    data.check_labels(settings.numeric_classes(), required(labels))?;
    Ok(data)
}

/// The splits of a CSV run: `train_csv` and `test_csv`, or `train_csv` split by
/// `test_fraction`; features normalized with statistics of the training split.
fn load_csv(settings: &DataSettings) -> Result<Splits> {
    let path = required(&settings.train_csv);
    let csv::TrainingFile {
        mut table,
        features,
        labels,
    } = csv::load_training(path, settings)?;
    let all = Dataset::new(features, labels, table.shape());
    let (mut train, mut test) = match &settings.test_csv {
        Some(test_path) => {
            check_classes(&all, &table, path)?;
            let (features, labels) = csv::load_with(test_path, &table, LabelColumn::Required)?;
            let labels = labels.expect("a label column is required");
            (all, Dataset::new(features, labels, table.shape()))
        }
        None => {
            let (train, test) = split(all, path, settings)?;
            check_classes(&train, &table, path)?;
            (train, test)
        }
    };
    table.scaling = Scaling::fit(settings.normalize, &train.features, table.width());
    let mut warnings = Vec::new();
    if let Some(scaling) = &table.scaling {
        scaling.apply(&mut train.features);
        scaling.apply(&mut test.features);
        for column in scaling.constant_columns() {
            warnings.push(format!(
                "warning: column '{}' of {} holds one value in every training row: it is left \
                 at 0 (or list it in data.ignore)",
                table.features[column],
                path.display()
            ));
        }
    }
    Ok(Splits {
        train,
        test,
        classes: table.classes.count(),
        table: Some(table),
        warnings,
    })
}

/// Rearranges the rows of `data` (`width` values each) so that row `i` holds what row `order[i]`
/// held; `order` is a permutation of the rows. Each cycle of the permutation is followed once,
/// with one row of scratch.
fn permute_rows(data: &mut [f32], width: usize, order: &[usize]) {
    let mut placed = vec![false; order.len()];
    let mut held = vec![0.0f32; width];
    for start in 0..order.len() {
        if placed[start] {
            continue;
        }
        held.copy_from_slice(&data[start * width..(start + 1) * width]);
        let mut row = start;
        loop {
            placed[row] = true;
            let from = order[row];
            if from == start {
                data[row * width..(row + 1) * width].copy_from_slice(&held);
                break;
            }
            data.copy_within(from * width..(from + 1) * width, row * width);
            row = from;
        }
    }
}

/// Refuses training rows of a single class: there is nothing to tell apart.
fn check_classes(train: &Dataset, table: &Table, path: &Path) -> Result<()> {
    match train.distinct_labels()[..] {
        [class] => Err(Error::data(
            path,
            format!(
                "the training rows hold a single class ('{}'): there is nothing to tell apart",
                table.classes.names()[class as usize]
            ),
        )),
        _ => Ok(()),
    }
}

/// `all` split into (train, test) by `data.test_fraction` and `data.split_seed`.
fn split(all: Dataset, path: &Path, settings: &DataSettings) -> Result<(Dataset, Dataset)> {
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
    Ok(all.split(&train_rows, &test_rows))
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

    /// The split moves the training rows into place: the same rows, in the same order, as
    /// copying them out.
    #[test]
    fn a_split_in_place_keeps_what_a_copy_would() {
        let width = 3;
        let rows = 50;
        let features: Vec<f32> = (0..rows * width).map(|v| v as f32).collect();
        let labels: Vec<u8> = (0..rows).map(|r| (r % 7) as u8).collect();
        let shape = SampleShape {
            channels: 1,
            height: 1,
            width,
        };
        let all = Dataset::new(features, labels, shape);
        for seed in 0..5 {
            let (train_rows, test_rows) = split_rows(rows, 0.3, seed);
            let (train, test) = all.clone().split(&train_rows, &test_rows);
            assert_eq!(train.features, all.select(&train_rows).features);
            assert_eq!(train.labels, all.select(&train_rows).labels);
            assert_eq!(test.features, all.select(&test_rows).features);
            assert_eq!(test.labels, all.select(&test_rows).labels);
        }
    }

    /// The statistics are the training split's: its columns come out with mean 0, the test
    /// rows' do not, and eval's reading with the saved table gives the test rows' very bits.
    #[test]
    fn a_split_file_is_normalized_with_its_training_rows_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.csv");
        let text: String = (0..40)
            .map(|i| format!("{},{},{}\n", i * i, 1000 - 3 * i, ["a", "b"][i % 2]))
            .collect();
        std::fs::write(&path, format!("x,y,class\n{text}")).unwrap();
        let settings: DataSettings = toml::from_str(&format!(
            "format = \"csv\"\ntrain_csv = {:?}\ntest_fraction = 0.25\nnormalize = \"standard\"\n",
            path.display().to_string()
        ))
        .unwrap();
        let splits = Splits::load(&settings).unwrap();
        let mean = |data: &Dataset, column: usize| {
            let values: Vec<f64> = data
                .features()
                .iter()
                .skip(column)
                .step_by(2)
                .map(|&v| v as f64)
                .collect();
            values.iter().sum::<f64>() / values.len() as f64
        };
        assert!(mean(&splits.train, 0).abs() < 1e-6);
        assert!(mean(&splits.test, 0).abs() > 1e-3);
        let table = splits.table.clone().unwrap();
        let again = Splits::load_test_with(&settings, &table).unwrap();
        assert_eq!(again.features(), splits.test.features());
        assert_eq!(again.labels(), splits.test.labels());
        assert!(splits.warnings.is_empty());
    }

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
