//! The run's configuration: typed settings, loaded in layers.
//!
//! Layers, lowest first: the TOML file, environment variables (`ALLCORES__TRAINING__THREADS=4`),
//! then `key=value` overrides from the command line. Every section rejects unknown keys, and
//! [`Settings::validate`] checks ranges, so a typo or a bad value stops the run before it starts.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::progress::number;

/// The classes of numeric labels when `data.classes` is not set: the ten digits.
pub const DEFAULT_CLASSES: usize = 10;
/// The most classes a classifier may have: labels are held as bytes, as IDX files store them.
pub const MAX_CLASSES: usize = 256;

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "ALLCORES";

/// The largest config file read, in bytes: a config is a few hundred bytes; 1 MiB is no
/// config anyone wrote.
pub(crate) const CONFIG_LIMIT: u64 = 1 << 20;

/// Everything a run needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub data: DataSettings,
    #[serde(default)]
    pub model: ModelSettings,
    #[serde(default)]
    pub optimizer: OptimizerSettings,
    #[serde(default)]
    pub training: TrainingSettings,
    #[serde(default)]
    pub checkpoint: CheckpointSettings,
    #[serde(default)]
    pub precision: PrecisionSettings,
}

/// Dynamic loss scaling of half-precision training (`training.precision`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [precision] table of keys")]
pub struct PrecisionSettings {
    /// Whether the loss is scaled: `auto` scales for f16 only (bf16 has f32's exponent range).
    #[serde(default, deserialize_with = "named::variant")]
    pub loss_scaling: LossScaling,
    /// The first loss scale.
    #[serde(default = "defaults::init_scale")]
    pub init_scale: f64,
    /// Clean steps in a row after which the scale grows.
    #[serde(
        default = "defaults::growth_interval",
        deserialize_with = "whole::number"
    )]
    pub growth_interval: u64,
    /// What the scale is multiplied by when it grows (> 1).
    #[serde(default = "defaults::growth_factor")]
    pub growth_factor: f64,
    /// What the scale is multiplied by after a step with inf or NaN gradients (in (0, 1)).
    #[serde(default = "defaults::backoff_factor")]
    pub backoff_factor: f64,
}

impl Default for PrecisionSettings {
    fn default() -> Self {
        Self {
            loss_scaling: LossScaling::Auto,
            init_scale: defaults::init_scale(),
            growth_interval: defaults::growth_interval(),
            growth_factor: defaults::growth_factor(),
            backoff_factor: defaults::backoff_factor(),
        }
    }
}

/// `precision.loss_scaling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossScaling {
    /// Dynamic scaling for f16, none for bf16 and f32.
    #[default]
    Auto,
    Dynamic,
    Off,
}

/// `training.precision`: the format of the forward and backward passes. The master weights and
/// the optimizer state are f32 whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

/// When the run saves checkpoints, and how many it keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [checkpoint] table of keys")]
pub struct CheckpointSettings {
    /// Save every this many optimizer steps.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole::optional"
    )]
    pub every_steps: Option<u64>,
    /// Save at the end of every this many epochs (0: never at epoch ends).
    #[serde(default = "defaults::every_epochs", deserialize_with = "whole::number")]
    pub every_epochs: u64,
    /// How many of the newest checkpoints to keep.
    #[serde(default = "defaults::keep", deserialize_with = "whole::number")]
    pub keep: usize,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        Self {
            every_steps: None,
            every_epochs: defaults::every_epochs(),
            keep: defaults::keep(),
        }
    }
}

/// Where the data is and how to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [data] table of keys")]
pub struct DataSettings {
    #[serde(deserialize_with = "named::variant")]
    pub format: DataFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_images: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_labels: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_images: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_labels: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_csv: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_csv: Option<PathBuf>,
    /// Text: the UTF-8 text the language model trains on (gzip allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_text: Option<PathBuf>,
    /// Text: a separate validation text, or else `val_fraction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_text: Option<PathBuf>,
    /// Text: the fraction at the end of `train_text` that validates instead of training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_fraction: Option<f64>,
    /// Text: how the text becomes tokens; `"char"`, one token a character, is the only one.
    #[serde(default, deserialize_with = "named::variant")]
    pub tokenizer: Tokenizer,
    /// With a single CSV file: the fraction of its rows held out for testing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_fraction: Option<f64>,
    /// CSV features are divided by this (IDX pixels are always scaled to [0, 1]).
    #[serde(default = "defaults::scale")]
    pub scale: f32,
    /// CSV: whether the first row names the columns (`auto`: when one of its cells outside the
    /// label column is not a number).
    #[serde(default)]
    pub header: Header,
    /// CSV: the column holding the label, by name or number (from 1) [default: the last].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Column>,
    /// CSV: columns that are neither a feature nor the label, by name or number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<Column>,
    /// CSV: how features are rescaled, with statistics of the training rows only.
    #[serde(default, deserialize_with = "named::variant")]
    pub normalize: Normalize,
    /// Number of classes: numeric labels must lie in `0..classes` (10 when not set); text
    /// labels are as many classes as they have names, which must be at most this when set.
    #[serde(
        default,
        deserialize_with = "whole::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub classes: Option<usize>,
    /// Seed of the fixed shuffle that splits a single CSV file (independent of `training.seed`,
    /// so that runs with different seeds are scored on the same test rows).
    #[serde(default, deserialize_with = "whole::number")]
    pub split_seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Idx,
    Csv,
    /// Plain text, for a language model.
    Text,
}

/// `data.header`: whether a CSV file's first row names its columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Header {
    /// A header when one of the first row's cells outside the label column is not a number.
    #[default]
    Auto,
    Present,
    Absent,
}

impl Serialize for Header {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Header::Auto => s.serialize_str("auto"),
            Header::Present => s.serialize_bool(true),
            Header::Absent => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct HeaderVisitor;
        impl Visitor<'_> for HeaderVisitor {
            type Value = Header;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Header, E> {
                Ok(if v { Header::Present } else { Header::Absent })
            }
            // Environment variables arrive as text.
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Header, E> {
                match v.trim() {
                    "auto" => Ok(Header::Auto),
                    "true" => Ok(Header::Present),
                    "false" => Ok(Header::Absent),
                    other => Err(E::custom(format!(
                        "expected true, false or \"auto\", got \"{other}\""
                    ))),
                }
            }
        }
        d.deserialize_any(HeaderVisitor)
    }
}

/// A CSV column, by its name in the header or by its number, counted from 1 as spreadsheets,
/// `cut` and every error message count them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    Name(String),
    Number(usize),
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Column::Name(name) => write!(f, "'{name}'"),
            Column::Number(n) => write!(f, "column {n}"),
        }
    }
}

impl Serialize for Column {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Column::Name(name) => s.serialize_str(name),
            Column::Number(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Column {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct ColumnVisitor;
        impl Visitor<'_> for ColumnVisitor {
            type Value = Column;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a column name or a column number (from 1)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Column, E> {
                match usize::try_from(v) {
                    Ok(0) => Err(E::custom("columns are numbered from 1; 0 names none")),
                    Ok(n) => Ok(Column::Number(n)),
                    Err(_) => Err(E::custom(format!("column {v} is too large"))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Column, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("columns are numbered from 1, got {v}"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Column, E> {
                Ok(Column::Name(v.to_string()))
            }
        }
        d.deserialize_any(ColumnVisitor)
    }
}

/// `data.normalize`: how CSV features are rescaled before training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// As read, divided by `data.scale`.
    #[default]
    None,
    /// Each feature less its mean, divided by its standard deviation.
    Standard,
    /// Each feature mapped onto [0, 1] by its least and largest value.
    Minmax,
}

impl fmt::Display for Normalize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Normalize::None => "none",
            Normalize::Standard => "standard",
            Normalize::Minmax => "minmax",
        })
    }
}

/// `data.tokenizer`: how a text becomes token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tokenizer {
    /// One token per character of the training text's vocabulary.
    #[default]
    Char,
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Idx => "idx",
            DataFormat::Csv => "csv",
            DataFormat::Text => "text",
        })
    }
}

/// The network to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [model] table of keys")]
pub struct ModelSettings {
    #[serde(default = "defaults::model_kind", deserialize_with = "named::variant")]
    pub kind: ModelKind,
    /// MLP: sizes of the hidden layers.
    #[serde(default = "defaults::hidden", deserialize_with = "whole::list")]
    pub hidden: Vec<usize>,
    /// CNN: output channels of the two convolution blocks.
    #[serde(default = "defaults::channels", deserialize_with = "whole::pair")]
    pub channels: [usize; 2],
    /// CNN: square kernel size of both convolutions (stride 1, no padding).
    #[serde(default = "defaults::kernel_size", deserialize_with = "whole::number")]
    pub kernel_size: usize,
    /// CNN: width of the dense layer before the classifier.
    #[serde(default = "defaults::dense", deserialize_with = "whole::number")]
    pub dense: usize,
    /// GPT: transformer blocks.
    #[serde(default = "defaults::layers", deserialize_with = "whole::number")]
    pub layers: usize,
    /// GPT: attention heads per block; they divide `width`.
    #[serde(default = "defaults::heads", deserialize_with = "whole::number")]
    pub heads: usize,
    /// GPT: the embedding width (the MLP is four times as wide).
    #[serde(default = "defaults::width", deserialize_with = "whole::number")]
    pub width: usize,
    /// GPT: tokens a window holds, the longest prompt the model sees.
    #[serde(default = "defaults::context", deserialize_with = "whole::number")]
    pub context: usize,
    /// GPT: the probability of dropping an element of the residual stream in training.
    #[serde(default)]
    pub dropout: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Mlp,
    Cnn,
    /// A character-level transformer language model (nanoGPT's architecture).
    Gpt,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
            ModelKind::Gpt => "gpt",
        })
    }
}

/// The optimizer and its learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [optimizer] table of keys")]
pub struct OptimizerSettings {
    #[serde(
        default = "defaults::optimizer_kind",
        deserialize_with = "named::variant"
    )]
    pub kind: OptimizerKind,
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Adam and AdamW: the term added to the denominator (PyTorch's default).
    #[serde(default = "defaults::epsilon")]
    pub epsilon: f64,
    /// SGD only.
    #[serde(default = "defaults::momentum")]
    pub momentum: f64,
    #[serde(default = "defaults::schedule", deserialize_with = "named::variant")]
    pub schedule: Schedule,
    /// Cosine only: steps of linear warm-up before the cosine decay.
    #[serde(default, deserialize_with = "whole::number")]
    pub warmup_steps: u64,
    /// Cosine only: the rate the decay ends at.
    #[serde(default)]
    pub min_lr: f64,
    /// Adam and AdamW: the decay rates of the first and second moments.
    #[serde(default = "defaults::beta1")]
    pub beta1: f64,
    #[serde(default = "defaults::beta2")]
    pub beta2: f64,
    /// Clip the step's gradients to this global norm (all parameters together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Cosine,
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::Adamw => "adamw",
        })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Cosine => "cosine",
        })
    }
}

/// How long and how wide to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [training] table of keys")]
pub struct TrainingSettings {
    #[serde(default = "defaults::epochs", deserialize_with = "whole::number")]
    pub epochs: u64,
    /// Stop after this many optimizer steps, even mid-epoch.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole::optional"
    )]
    pub max_steps: Option<u64>,
    #[serde(default = "defaults::batch_size", deserialize_with = "whole::number")]
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed into one optimizer step.
    #[serde(
        default = "defaults::accumulation_steps",
        deserialize_with = "whole::number"
    )]
    pub accumulation_steps: usize,
    #[serde(default, deserialize_with = "whole::number")]
    pub seed: u64,
    #[serde(default)]
    pub threads: Threads,
    #[serde(default, deserialize_with = "named::variant")]
    pub backend: Backend,
    /// Forward and backward in f32, f16 or bf16 (f32 master weights in every case).
    #[serde(default, deserialize_with = "named::variant")]
    pub precision: Precision,
    /// Each micro-batch is split into this many shards, each its own forward and backward, their
    /// gradients summed in order. Part of the result (a different split rounds differently); the
    /// thread count is not.
    #[serde(default = "defaults::shards", deserialize_with = "whole::number")]
    pub shards: usize,
    /// How the step's micro-batches and shards use the threads. Never changes the result.
    #[serde(default, deserialize_with = "named::variant")]
    pub execution: Execution,
    /// What the threads without work do between the parallel regions of a step. Never changes
    /// the result.
    #[serde(default, deserialize_with = "named::variant")]
    pub idle_threads: IdleThreads,
    /// Score the model every this many steps (besides at each epoch's end): for a language
    /// model, the train and validation loss.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole::optional"
    )]
    pub eval_every: Option<u64>,
}

/// `training.idle_threads`: what a thread without work does during a step ([`crate::polling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleThreads {
    /// Polls for the next piece of work for up to a millisecond, as OpenMP's threads spin before
    /// they sleep, yielding its core to any other thread between two looks: the next parallel
    /// region starts at once. Only with several threads, no more than the cores.
    #[default]
    Poll,
    /// Sleeps after rayon's few rounds of looking: the next region waits for the thread to
    /// wake.
    Sleep,
}

impl fmt::Display for IdleThreads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdleThreads::Poll => "poll",
            IdleThreads::Sleep => "sleep",
        })
    }
}

/// `training.execution`: how the pieces of a step (micro-batches x shards) share the threads.
/// Both orders sum the same gradients in the same order: the same result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Execution {
    /// Concurrent when a step has several pieces and the run several threads; with
    /// `threads = "auto"`, what a short calibration finds fastest.
    #[default]
    Auto,
    /// Each piece on its own thread (its own copy of the autodiff graph), all at once.
    Concurrent,
    /// One piece after the other, each using every thread inside its operations.
    Sequential,
}

impl fmt::Display for Execution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Execution::Auto => "auto",
            Execution::Concurrent => "concurrent",
            Execution::Sequential => "sequential",
        })
    }
}

/// The compute backend: one config key apart, both CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn-ndarray: f32 tensors, matmul by matrixmultiply.
    #[default]
    Ndarray,
    /// burn-flex: pure Rust, matmul by gemm on rayon, f16/bf16 tensors.
    Flex,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Ndarray => "ndarray",
            Backend::Flex => "flex",
        })
    }
}

/// The largest `training.threads`: a pool that size is a typo, not a machine. Each thread is an
/// OS thread with its own stack, and a run with a thousand of them on 2 cores already took
/// seconds a step; larger counts made a run look hung while it spawned them.
pub const MAX_THREADS: usize = 1024;

/// `training.threads`: a positive count, or `"auto"` for what the process may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threads {
    #[default]
    Auto,
    Count(NonZeroUsize),
}

impl Serialize for Threads {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Threads::Auto => serializer.serialize_str("auto"),
            Threads::Count(n) => serializer.serialize_u64(n.get() as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Threads {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct ThreadsVisitor;
        const EXPECTED: &str = "a positive integer or \"auto\"";

        impl Visitor<'_> for ThreadsVisitor {
            type Value = Threads;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Threads, E> {
                usize::try_from(v)
                    .ok()
                    .and_then(NonZeroUsize::new)
                    .map(Threads::Count)
                    .ok_or_else(|| E::custom(format!("expected {EXPECTED}, got {v}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Threads, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("expected {EXPECTED}, got {v}"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Threads, E> {
                if v.eq_ignore_ascii_case("auto") {
                    return Ok(Threads::Auto);
                }
                match v.trim().parse::<i64>() {
                    Ok(n) => self.visit_i64(n),
                    Err(_) => Err(E::custom(format!("expected {EXPECTED}, got \"{v}\""))),
                }
            }
        }
        deserializer.deserialize_any(ThreadsVisitor)
    }
}

impl fmt::Display for Threads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threads::Auto => f.write_str("auto"),
            Threads::Count(n) => write!(f, "{n}"),
        }
    }
}

/// Whole numbers that refuse fractions: config-rs would otherwise truncate `2.5` to `2`.
mod whole {
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;
    use std::marker::PhantomData;

    struct WholeVisitor<T>(PhantomData<T>);

    impl<T: TryFrom<u64>> Visitor<'_> for WholeVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a whole number")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("expected a whole number of 0 or more, got {v}")))
                .and_then(|v| self.visit_u64(v))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
            let v = super::number(v);
            Err(E::custom(format!("expected a whole number, got {v}")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            let text = v.trim();
            if let Ok(n) = text.parse::<i64>() {
                return self.visit_i64(n);
            }
            // A number past TOML's integers arrives as text: say so, rather than "not a number".
            if text.parse::<u64>().is_ok() {
                return Err(E::custom(format!(
                    "{text} is too large: config whole numbers stop at {}",
                    i64::MAX
                )));
            }
            Err(E::custom(format!("expected a whole number, got \"{v}\"")))
        }
    }

    pub fn number<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
        d.deserialize_any(WholeVisitor(PhantomData))
    }

    pub fn optional<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        number(d).map(Some)
    }

    /// One element of a list, read as [`number`] reads a key.
    struct Element(usize);

    impl<'de> de::Deserialize<'de> for Element {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            number(d).map(Element)
        }
    }

    /// A list of whole numbers: config-rs would truncate `[1.5]` to `[1]`.
    pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
        let elements: Vec<Element> = de::Deserialize::deserialize(d)?;
        Ok(elements.into_iter().map(|Element(n)| n).collect())
    }

    /// Exactly two whole numbers: config-rs hands serde's arrays a longer list's first two.
    pub fn pair<'de, D: Deserializer<'de>>(d: D) -> Result<[usize; 2], D::Error> {
        let elements = list(d)?;
        <[usize; 2]>::try_from(elements.as_slice())
            .map_err(|_| de::Error::invalid_length(elements.len(), &"a list of two numbers"))
    }
}

/// Named values (`backend = "flex"`): config-rs refuses an unknown name without saying which
/// names it knows ("enum Backend does not have variant constructor cuda"); read as a plain
/// string, serde's own message lists them ("unknown variant `cuda`, expected `ndarray` or
/// `flex`").
mod named {
    use serde::Deserialize;
    use serde::de::value::{Error as ValueError, StrDeserializer};
    use serde::de::{DeserializeOwned, Deserializer, Error};

    pub fn variant<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
        let name = String::deserialize(d)?;
        T::deserialize(StrDeserializer::<ValueError>::new(&name)).map_err(D::Error::custom)
    }
}

mod defaults {
    use super::*;
    pub fn scale() -> f32 {
        1.0
    }
    pub fn model_kind() -> ModelKind {
        ModelKind::Mlp
    }
    pub fn hidden() -> Vec<usize> {
        vec![512, 512]
    }
    pub fn channels() -> [usize; 2] {
        [32, 64]
    }
    pub fn kernel_size() -> usize {
        3
    }
    pub fn dense() -> usize {
        128
    }
    pub fn layers() -> usize {
        4
    }
    pub fn heads() -> usize {
        4
    }
    pub fn width() -> usize {
        128
    }
    pub fn context() -> usize {
        64
    }
    pub fn beta1() -> f64 {
        0.9
    }
    pub fn beta2() -> f64 {
        0.999
    }
    pub fn optimizer_kind() -> OptimizerKind {
        OptimizerKind::Adam
    }
    pub fn lr() -> f64 {
        1e-3
    }
    pub fn epsilon() -> f64 {
        1e-8
    }
    pub fn momentum() -> f64 {
        0.9
    }
    pub fn schedule() -> Schedule {
        Schedule::Constant
    }
    pub fn epochs() -> u64 {
        1
    }
    pub fn batch_size() -> usize {
        64
    }
    pub fn accumulation_steps() -> usize {
        1
    }
    pub fn shards() -> usize {
        1
    }
    pub fn every_epochs() -> u64 {
        1
    }
    pub fn keep() -> usize {
        3
    }
    pub fn init_scale() -> f64 {
        65536.0
    }
    pub fn growth_interval() -> u64 {
        2000
    }
    pub fn growth_factor() -> f64 {
        2.0
    }
    pub fn backoff_factor() -> f64 {
        0.5
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            kind: defaults::model_kind(),
            hidden: defaults::hidden(),
            channels: defaults::channels(),
            kernel_size: defaults::kernel_size(),
            dense: defaults::dense(),
            layers: defaults::layers(),
            heads: defaults::heads(),
            width: defaults::width(),
            context: defaults::context(),
            dropout: 0.0,
        }
    }
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        Self {
            kind: defaults::optimizer_kind(),
            lr: defaults::lr(),
            weight_decay: 0.0,
            epsilon: defaults::epsilon(),
            momentum: defaults::momentum(),
            schedule: defaults::schedule(),
            warmup_steps: 0,
            min_lr: 0.0,
            beta1: defaults::beta1(),
            beta2: defaults::beta2(),
            grad_clip: None,
        }
    }
}

impl Default for TrainingSettings {
    fn default() -> Self {
        Self {
            epochs: defaults::epochs(),
            max_steps: None,
            batch_size: defaults::batch_size(),
            accumulation_steps: defaults::accumulation_steps(),
            seed: 0,
            threads: Threads::Auto,
            backend: Backend::Ndarray,
            precision: Precision::F32,
            shards: defaults::shards(),
            execution: Execution::Auto,
            idle_threads: IdleThreads::Poll,
            eval_every: None,
        }
    }
}

/// Where a key acts, for [`Settings::refuse_ignored_keys`].
struct Scope {
    /// Whether it acts in this config.
    holds: bool,
    /// The refusal where it does not: where it would act, and what this config has instead.
    otherwise: String,
}

/// Where the settings come from, besides the file.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// `key=value` overrides, applied last, in order. Values are read as TOML (`4`, `[256, 128]`,
    /// `"flex"`); a value that is not TOML is taken as a string (`flex`).
    pub overrides: Vec<String>,
    /// Environment variables to read; `None` reads the process environment.
    pub environment: Option<HashMap<String, String>>,
}

impl Settings {
    /// Loads `path` (TOML), then the environment, then `layers.overrides`, and validates the
    /// result. Relative data paths are resolved against the config file's folder.
    pub fn load(path: &Path, layers: &Layers) -> Result<Self> {
        let config_error = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        // Read here, not by config-rs: a FIFO named as the config would block it, and a device
        // would never end.
        use crate::files::ReadError;
        let text = crate::files::read_regular(path, Some(CONFIG_LIMIT))
            .map_err(|e| {
                config_error(match e {
                    ReadError::NotFound => "config file not found".into(),
                    ReadError::TooLarge { .. } => format!(
                        "larger than {} MiB, the most a config file may be",
                        CONFIG_LIMIT >> 20
                    ),
                    ReadError::Io(e) => format!("cannot read the config file: {e}"),
                    other => other.to_string(),
                })
            })
            .and_then(|bytes| {
                String::from_utf8(bytes).map_err(|e| config_error(format!("not UTF-8 text: {e}")))
            })?;
        Self::parse(&text, path, layers)
    }

    /// [`Settings::load`] of a config's `text` as if read from `path` (whose folder relative data
    /// paths are resolved against).
    pub fn parse(text: &str, path: &Path, layers: &Layers) -> Result<Self> {
        let config_error = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        // The environment, then `--set`: both as overrides, which config-rs applies in order
        // over the file.
        let mut overrides = environment_overrides(layers.environment.as_ref())?;
        for item in &layers.overrides {
            overrides.push(parse_override(item)?);
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        for (key, value) in overrides {
            builder = builder
                .set_override(key.clone(), value)
                .map_err(|e| Error::setting(key, e.to_string()))?;
        }
        let merged = builder
            .build()
            .map_err(|e| config_error(one_line(&e.to_string())))?;
        let mut settings: Settings = merged
            .try_deserialize()
            .map_err(|e| config_error(one_line(&e.to_string())))?;
        // Absolute, so that the copy saved in a run folder still finds the data from there.
        // `rel.toml` has the parent "", which does not canonicalize: it is the current folder.
        let folder = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let base = folder
            .canonicalize()
            .unwrap_or_else(|_| folder.to_path_buf());
        settings.data.resolve_paths(&base);
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value against its range, and that no key is set where the rest of the
    /// config ignores it; the error names the key.
    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        self.model.validate()?;
        self.optimizer.validate()?;
        self.training.validate()?;
        self.checkpoint.validate()?;
        self.precision.validate()?;
        self.refuse_ignored_keys()
    }

    /// Refuses a key set away from its default where the rest of the config makes it do
    /// nothing (`momentum` with Adam, `hidden` for the CNN): whoever set it meant it to act, as
    /// with a data file key of the other format. A key at its default passes, so the run
    /// folders of earlier builds, which save every key, still load.
    fn refuse_ignored_keys(&self) -> Result<()> {
        let (data, model, optimizer) = (&self.data, &self.model, &self.optimizer);
        let (default_model, default_optimizer) =
            (ModelSettings::default(), OptimizerSettings::default());
        let default_precision = PrecisionSettings::default();
        let model_kind = |kind: ModelKind| Scope {
            holds: model.kind == kind,
            otherwise: format!(
                "applies to model.kind = \"{kind}\" only; this config trains \"{}\"",
                model.kind
            ),
        };
        let mlp = model_kind(ModelKind::Mlp);
        let cnn = model_kind(ModelKind::Cnn);
        let gpt = model_kind(ModelKind::Gpt);
        let text = data.format == DataFormat::Text;
        if text != (model.kind == ModelKind::Gpt) {
            let (key, message) = match text {
                true => (
                    "model.kind",
                    format!(
                        "\"{}\" is a classifier: data.format = \"text\" trains model.kind = \"gpt\"",
                        model.kind
                    ),
                ),
                false => (
                    "data.format",
                    format!(
                        "model.kind = \"gpt\" trains on data.format = \"text\", not \"{}\"",
                        data.format
                    ),
                ),
            };
            return Err(Error::setting(key, message));
        }
        let sgd = Scope {
            holds: optimizer.kind == OptimizerKind::Sgd,
            otherwise: format!(
                "applies to optimizer.kind = \"sgd\" only; this config uses \"{}\"",
                optimizer.kind
            ),
        };
        let adam = Scope {
            holds: optimizer.kind != OptimizerKind::Sgd,
            otherwise:
                "applies to optimizer.kind = \"adam\" or \"adamw\" only; this config uses \"sgd\""
                    .into(),
        };
        let cosine = Scope {
            holds: optimizer.schedule == Schedule::Cosine,
            otherwise: format!(
                "applies to optimizer.schedule = \"cosine\" only; this config uses \"{}\"",
                optimizer.schedule
            ),
        };
        let csv = Scope {
            holds: data.format == DataFormat::Csv,
            otherwise: format!(
                "applies to data.format = \"csv\" only; this config reads \"{}\"",
                data.format
            ),
        };
        let unscaled = Scope {
            holds: data.normalize == Normalize::None,
            otherwise: format!(
                "applies with data.normalize = \"none\" only; this config normalizes with \"{}\"",
                data.normalize
            ),
        };
        let split = Scope {
            holds: data.test_fraction.is_some(),
            otherwise: "applies to a split of data.train_csv (data.test_fraction) only; this \
                        config has none"
                .into(),
        };
        let scaled = Scope {
            holds: self.precision.scales(self.training.precision),
            otherwise: format!(
                "applies only where the loss is scaled (training.precision = \"f16\", or \
                 precision.loss_scaling = \"dynamic\"); this config trains in {} without scaling",
                self.training.precision
            ),
        };
        let precision = &self.precision;
        let checks: [(&str, bool, &Scope); 26] = [
            ("model.layers", model.layers != default_model.layers, &gpt),
            ("model.heads", model.heads != default_model.heads, &gpt),
            ("model.width", model.width != default_model.width, &gpt),
            (
                "model.context",
                model.context != default_model.context,
                &gpt,
            ),
            ("model.dropout", model.dropout != 0.0, &gpt),
            (
                "optimizer.beta1",
                optimizer.beta1 != default_optimizer.beta1,
                &adam,
            ),
            (
                "optimizer.beta2",
                optimizer.beta2 != default_optimizer.beta2,
                &adam,
            ),
            ("model.hidden", model.hidden != default_model.hidden, &mlp),
            (
                "model.channels",
                model.channels != default_model.channels,
                &cnn,
            ),
            (
                "model.kernel_size",
                model.kernel_size != default_model.kernel_size,
                &cnn,
            ),
            ("model.dense", model.dense != default_model.dense, &cnn),
            (
                "optimizer.momentum",
                optimizer.momentum != default_optimizer.momentum,
                &sgd,
            ),
            (
                "optimizer.epsilon",
                optimizer.epsilon != default_optimizer.epsilon,
                &adam,
            ),
            (
                "optimizer.warmup_steps",
                optimizer.warmup_steps != 0,
                &cosine,
            ),
            ("data.scale", data.scale != defaults::scale(), &csv),
            ("data.scale", data.scale != defaults::scale(), &unscaled),
            ("data.header", data.header != Header::Auto, &csv),
            ("data.label", data.label.is_some(), &csv),
            ("data.ignore", !data.ignore.is_empty(), &csv),
            ("data.normalize", data.normalize != Normalize::None, &csv),
            ("data.split_seed", data.split_seed != 0, &split),
            ("optimizer.min_lr", optimizer.min_lr != 0.0, &cosine),
            (
                "precision.init_scale",
                precision.init_scale != default_precision.init_scale,
                &scaled,
            ),
            (
                "precision.growth_interval",
                precision.growth_interval != default_precision.growth_interval,
                &scaled,
            ),
            (
                "precision.growth_factor",
                precision.growth_factor != default_precision.growth_factor,
                &scaled,
            ),
            (
                "precision.backoff_factor",
                precision.backoff_factor != default_precision.backoff_factor,
                &scaled,
            ),
        ];
        match checks.iter().find(|(_, set, scope)| *set && !scope.holds) {
            Some((key, _, scope)) => Err(Error::setting(*key, scope.otherwise.clone())),
            None => Ok(()),
        }
    }

    /// The settings as TOML, as saved in a run folder.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("settings always serialize to TOML")
    }
}

impl DataSettings {
    fn resolve_paths(&mut self, base: &Path) {
        for path in [
            &mut self.train_images,
            &mut self.train_labels,
            &mut self.test_images,
            &mut self.test_labels,
            &mut self.train_csv,
            &mut self.test_csv,
            &mut self.train_text,
            &mut self.val_text,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    fn validate(&self) -> Result<()> {
        let required = |key: &str| {
            Error::setting(
                format!("data.{key}"),
                format!("required when data.format = \"{}\"", self.format),
            )
        };
        // A key of the other format would be ignored: a test_fraction on IDX files would not
        // split anything. Refuse it rather than train on what the user did not mean.
        let formats = [DataFormat::Idx, DataFormat::Csv, DataFormat::Text];
        for other in formats.into_iter().filter(|&f| f != self.format) {
            if let Some((key, _)) = self.file_keys(other).into_iter().find(|(_, set)| *set) {
                return Err(Error::setting(
                    format!("data.{key}"),
                    format!(
                        "applies to data.format = \"{}\" only; this config reads \"{}\"",
                        other, self.format
                    ),
                ));
            }
        }
        match self.format {
            DataFormat::Idx => {
                let keys = self.file_keys(DataFormat::Idx);
                if let Some((key, _)) = keys.into_iter().find(|(_, set)| !set) {
                    return Err(required(key));
                }
            }
            DataFormat::Csv => {
                if self.train_csv.is_none() {
                    return Err(required("train_csv"));
                }
                match (&self.test_csv, self.test_fraction) {
                    (Some(_), Some(_)) => {
                        return Err(Error::setting(
                            "data.test_fraction",
                            "give either data.test_csv or data.test_fraction, not both",
                        ));
                    }
                    (None, None) => {
                        return Err(Error::setting(
                            "data.test_csv",
                            "required (or data.test_fraction to split data.train_csv)",
                        ));
                    }
                    (None, Some(f)) if !(f > 0.0 && f < 1.0) => {
                        return Err(Error::setting(
                            "data.test_fraction",
                            format!("must lie strictly between 0 and 1, got {}", number(f)),
                        ));
                    }
                    _ => {}
                }
            }
            DataFormat::Text => self.validate_text()?,
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(Error::setting(
                "data.scale",
                format!("must be a positive number, got {}", number(self.scale)),
            ));
        }
        // Labels are held as bytes, as IDX files store them: label 300 would wrap to 44.
        if let Some(classes) = self.classes.filter(|c| !(2..=MAX_CLASSES).contains(c)) {
            return Err(Error::setting(
                "data.classes",
                format!("must be 2 to {MAX_CLASSES}, got {classes}"),
            ));
        }
        if let Some(column) = self.label.as_ref().filter(|l| self.ignore.contains(l)) {
            return Err(Error::setting(
                "data.ignore",
                format!("names the label column ({column}, data.label)"),
            ));
        }
        Ok(())
    }

    /// The classes of numeric labels: `data.classes`, or 10.
    pub fn numeric_classes(&self) -> usize {
        self.classes.unwrap_or(DEFAULT_CLASSES)
    }

    /// The text keys: a training text, and a validation text or fraction (not both).
    fn validate_text(&self) -> Result<()> {
        if self.train_text.is_none() {
            return Err(Error::setting(
                "data.train_text",
                "required when data.format = \"text\"",
            ));
        }
        match (&self.val_text, self.val_fraction) {
            (Some(_), Some(_)) => Err(Error::setting(
                "data.val_fraction",
                "give either data.val_text or data.val_fraction, not both",
            )),
            (None, None) => Err(Error::setting(
                "data.val_text",
                "required (or data.val_fraction to validate on the end of data.train_text)",
            )),
            (None, Some(f)) if !(f > 0.0 && f < 1.0) => Err(Error::setting(
                "data.val_fraction",
                format!("must lie strictly between 0 and 1, got {}", number(f)),
            )),
            _ => Ok(()),
        }
    }

    /// The file keys of `format`, each with whether this config sets it.
    fn file_keys(&self, format: DataFormat) -> Vec<(&'static str, bool)> {
        match format {
            DataFormat::Idx => vec![
                ("train_images", self.train_images.is_some()),
                ("train_labels", self.train_labels.is_some()),
                ("test_images", self.test_images.is_some()),
                ("test_labels", self.test_labels.is_some()),
            ],
            DataFormat::Csv => vec![
                ("train_csv", self.train_csv.is_some()),
                ("test_csv", self.test_csv.is_some()),
                ("test_fraction", self.test_fraction.is_some()),
            ],
            DataFormat::Text => vec![
                ("train_text", self.train_text.is_some()),
                ("val_text", self.val_text.is_some()),
                ("val_fraction", self.val_fraction.is_some()),
            ],
        }
    }
}

impl ModelSettings {
    fn validate(&self) -> Result<()> {
        if let Some(i) = self.hidden.iter().position(|&h| h == 0) {
            return Err(Error::setting(
                format!("model.hidden[{i}]"),
                "layer sizes must be positive",
            ));
        }
        if self.channels.contains(&0) {
            return Err(Error::setting(
                "model.channels",
                "channel counts must be positive",
            ));
        }
        if self.kernel_size == 0 {
            return Err(Error::setting("model.kernel_size", "must be positive"));
        }
        if self.dense == 0 {
            return Err(Error::setting("model.dense", "must be positive"));
        }
        for (key, value) in [
            ("layers", self.layers),
            ("heads", self.heads),
            ("width", self.width),
            ("context", self.context),
        ] {
            if value == 0 {
                return Err(Error::setting(format!("model.{key}"), "must be positive"));
            }
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(Error::setting(
                "model.heads",
                format!(
                    "{} heads do not divide model.width = {}",
                    self.heads, self.width
                ),
            ));
        }
        // Tensor sizes follow from these: refuse a model whose sizes no machine holds before
        // any product of them is taken.
        if self.width > 1 << 16 || self.context > 1 << 20 || self.layers > 1 << 12 {
            return Err(Error::setting(
                "model.width",
                format!(
                    "a GPT of width {}, context {} and {} layers is larger than allcores trains \
                     (at most 65,536 wide, 1,048,576 long, 4,096 layers)",
                    self.width, self.context, self.layers
                ),
            ));
        }
        if !(self.dropout >= 0.0 && self.dropout < 1.0) {
            return Err(Error::setting(
                "model.dropout",
                format!(
                    "must be at least 0 and below 1, got {}",
                    number(self.dropout)
                ),
            ));
        }
        Ok(())
    }
}

impl OptimizerSettings {
    fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::setting(
                "optimizer.lr",
                format!("must be a positive number, got {}", number(self.lr)),
            ));
        }
        if self.schedule == Schedule::Cosine && self.lr > 1.0 {
            return Err(Error::setting(
                "optimizer.lr",
                format!(
                    "must be at most 1 with the cosine schedule, got {}",
                    number(self.lr)
                ),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::setting(
                "optimizer.weight_decay",
                format!(
                    "must be zero or positive, got {}",
                    number(self.weight_decay)
                ),
            ));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(Error::setting(
                "optimizer.epsilon",
                format!("must be a positive number, got {}", number(self.epsilon)),
            ));
        }
        for (key, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::setting(
                    format!("optimizer.{key}"),
                    format!("must lie in [0, 1), got {}", number(beta)),
                ));
            }
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(Error::setting(
                "optimizer.min_lr",
                format!(
                    "must lie between 0 and optimizer.lr ({}), got {}",
                    number(self.lr),
                    number(self.min_lr)
                ),
            ));
        }
        if let Some(clip) = self.grad_clip
            && !(clip.is_finite() && clip > 0.0)
        {
            return Err(Error::setting(
                "optimizer.grad_clip",
                format!("must be a positive number, got {}", number(clip)),
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::setting(
                "optimizer.momentum",
                format!("must lie in [0, 1), got {}", number(self.momentum)),
            ));
        }
        Ok(())
    }
}

impl CheckpointSettings {
    fn validate(&self) -> Result<()> {
        if self.every_steps == Some(0) {
            return Err(Error::setting(
                "checkpoint.every_steps",
                "must be at least 1",
            ));
        }
        if self.keep == 0 {
            return Err(Error::setting("checkpoint.keep", "must be at least 1"));
        }
        Ok(())
    }
}

impl PrecisionSettings {
    fn validate(&self) -> Result<()> {
        // The scale must stay a normal f32 number: it multiplies an f32 loss.
        if !(self.init_scale.is_finite() && self.init_scale > 0.0 && self.init_scale <= 1e38) {
            return Err(Error::setting(
                "precision.init_scale",
                format!(
                    "must be a positive number of at most 1e38, got {}",
                    number(self.init_scale)
                ),
            ));
        }
        if self.growth_interval == 0 {
            return Err(Error::setting(
                "precision.growth_interval",
                "must be at least 1",
            ));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return Err(Error::setting(
                "precision.growth_factor",
                format!("must be greater than 1, got {}", number(self.growth_factor)),
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(Error::setting(
                "precision.backoff_factor",
                format!(
                    "must lie strictly between 0 and 1, got {}",
                    number(self.backoff_factor)
                ),
            ));
        }
        Ok(())
    }

    /// Whether a run in `precision` scales its loss.
    pub fn scales(&self, precision: Precision) -> bool {
        match self.loss_scaling {
            LossScaling::Auto => precision == Precision::F16,
            LossScaling::Dynamic => true,
            LossScaling::Off => false,
        }
    }
}

impl TrainingSettings {
    fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::setting("training.epochs", "must be at least 1"));
        }
        if self.max_steps == Some(0) {
            return Err(Error::setting("training.max_steps", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::setting("training.batch_size", "must be at least 1"));
        }
        if self.accumulation_steps == 0 {
            return Err(Error::setting(
                "training.accumulation_steps",
                "must be at least 1",
            ));
        }
        if let Threads::Count(n) = self.threads
            && n.get() > MAX_THREADS
        {
            return Err(Error::setting(
                "training.threads",
                format!("must be at most {MAX_THREADS}, got {n}"),
            ));
        }
        if self
            .batch_size
            .checked_mul(self.accumulation_steps)
            .is_none()
        {
            return Err(Error::setting(
                "training.accumulation_steps",
                format!(
                    "training.batch_size x training.accumulation_steps ({} x {}) is too large",
                    self.batch_size, self.accumulation_steps
                ),
            ));
        }
        if self.shards == 0 {
            return Err(Error::setting("training.shards", "must be at least 1"));
        }
        if self.eval_every == Some(0) {
            return Err(Error::setting("training.eval_every", "must be at least 1"));
        }
        if self.shards > self.batch_size {
            return Err(Error::setting(
                "training.shards",
                format!(
                    "must be at most training.batch_size ({}), got {}",
                    self.batch_size, self.shards
                ),
            ));
        }
        Ok(())
    }

    /// Samples in one optimizer step: `batch_size x accumulation_steps` (validated settings
    /// never overflow it; unvalidated ones saturate rather than wrap to a small step).
    pub fn effective_batch_size(&self) -> usize {
        self.batch_size.saturating_mul(self.accumulation_steps)
    }
}

/// Splits `key=value` and reads the value as TOML, falling back to a plain string.
fn parse_override(item: &str) -> Result<(String, config::Value)> {
    let Some((key, raw)) = item.split_once('=') else {
        return Err(Error::setting(
            item,
            "an override must have the form key=value",
        ));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(Error::setting(item, "an override needs a key before '='"));
    }
    check_key(key).map_err(|message| Error::setting(item, message))?;
    Ok((key.to_string(), override_value(raw)))
}

/// Refuses a key that is not `section.key` in plain words before it reaches config-rs: that
/// crate reads `model.hidden[N]` as an index and grows the list up to it (a 30-byte argument
/// could allocate gigabytes), and answers other malformed paths with multi-line errors that do
/// not name the argument.
fn check_key(key: &str) -> std::result::Result<(), String> {
    if key.contains(['[', ']']) {
        return Err(format!(
            "'{key}' indexes a list: set the whole list instead, e.g. model.hidden=[256, 128]"
        ));
    }
    let word = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    match key.split('.').all(word) {
        true => Ok(()),
        false => Err(format!(
            "'{key}' is not a config key: expected section.key, e.g. training.threads"
        )),
    }
}

/// An override's value, read as TOML (`4`, `[256, 128]`, `"flex"`); one that is not TOML is
/// taken as a string (`flex`).
fn override_value(raw: &str) -> config::Value {
    let raw = raw.trim();
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut table) => table
            .remove("v")
            .map(toml_to_config)
            .unwrap_or_else(|| raw.into()),
        Err(_) => raw.into(),
    }
}

/// The `ALLCORES__SECTION__KEY` variables of `environment` (the process's where `None`) as
/// `section.key` overrides, their values read as `--set` reads them, in the variables' name
/// order. A variable whose name is no config key is refused, naming the variable.
fn environment_overrides(
    environment: Option<&HashMap<String, String>>,
) -> Result<Vec<(String, config::Value)>> {
    let prefix = format!("{ENV_PREFIX}__");
    let variables: BTreeMap<String, String> = match environment {
        Some(variables) => variables.clone().into_iter().collect(),
        // Variables that are not Unicode cannot name a key: leave them, not panic on them.
        None => std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect(),
    };
    let mut overrides = Vec::new();
    for (name, value) in variables {
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let key = rest.to_lowercase().replace("__", ".");
        check_key(&key).map_err(|message| Error::setting(&name, message))?;
        overrides.push((key, override_value(&value)));
    }
    Ok(overrides)
}

fn toml_to_config(value: toml::Value) -> config::Value {
    use config::ValueKind;
    let kind = match value {
        toml::Value::String(s) => ValueKind::String(s),
        toml::Value::Integer(i) => ValueKind::I64(i),
        toml::Value::Float(f) => ValueKind::Float(f),
        toml::Value::Boolean(b) => ValueKind::Boolean(b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(items) => {
            ValueKind::Array(items.into_iter().map(toml_to_config).collect())
        }
        toml::Value::Table(table) => ValueKind::Table(
            table
                .into_iter()
                .map(|(k, v)| (k, toml_to_config(v)))
                .collect(),
        ),
    };
    config::Value::new(None, kind)
}

/// Errors from the TOML parser span several lines (a snippet with a caret): keep one.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.chars().all(|c| "|^ -".contains(c)))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    const MINIMAL: &str = r#"
        [data]
        format = "csv"
        train_csv = "digits.csv"
        test_fraction = 0.2
    "#;

    fn load(text: &str, overrides: &[&str], env: &[(&str, &str)]) -> Result<Settings> {
        let file = write_config(text);
        let layers = Layers {
            overrides: overrides.iter().map(|s| s.to_string()).collect(),
            environment: Some(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        };
        Settings::load(file.path(), &layers)
    }

    #[test]
    fn defaults_fill_every_section() {
        let s = load(MINIMAL, &[], &[]).unwrap();
        assert_eq!(s.model.kind, ModelKind::Mlp);
        assert_eq!(s.model.hidden, vec![512, 512]);
        assert_eq!(s.optimizer.kind, OptimizerKind::Adam);
        assert_eq!(s.training.threads, Threads::Auto);
        assert_eq!(s.training.backend, Backend::Ndarray);
        assert_eq!(s.training.batch_size, 64);
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let file = write_config(MINIMAL);
        let s = Settings::load(file.path(), &Layers::default()).unwrap();
        let expected = file.path().parent().unwrap().join("digits.csv");
        assert_eq!(s.data.train_csv, Some(expected));
    }

    #[test]
    fn data_paths_become_absolute_even_from_a_relative_config_path() {
        let file = write_config(MINIMAL);
        let cwd = std::env::current_dir().unwrap();
        let relative = pathdiff(file.path(), &cwd);
        let s = Settings::load(&relative, &Layers::default()).unwrap();
        let csv = s.data.train_csv.unwrap();
        assert!(csv.is_absolute(), "{}", csv.display());
        assert_eq!(
            csv.parent().unwrap().canonicalize().unwrap(),
            file.path().parent().unwrap().canonicalize().unwrap()
        );
    }

    /// `path` written relative to `base` with `..` steps (both absolute).
    fn pathdiff(path: &Path, base: &Path) -> PathBuf {
        let ups = base.components().count() - 1;
        let mut relative: PathBuf = std::iter::repeat_n("..", ups).collect();
        relative.push(path.strip_prefix("/").unwrap());
        relative
    }

    #[test]
    fn layers_apply_file_then_environment_then_overrides() {
        let text = format!("{MINIMAL}\n[training]\nthreads = 1\nbatch_size = 8\n");
        let env = [
            ("ALLCORES__TRAINING__THREADS", "3"),
            ("ALLCORES__TRAINING__BATCH_SIZE", "16"),
        ];
        let s = load(&text, &["training.threads=2"], &env).unwrap();
        assert_eq!(
            s.training.threads,
            Threads::Count(NonZeroUsize::new(2).unwrap())
        );
        assert_eq!(s.training.batch_size, 16);
    }

    /// A variable's value is read as `--set` reads one: a list, a bare name, a number.
    #[test]
    fn environment_values_are_read_as_overrides_are() {
        let env = [
            ("ALLCORES__MODEL__HIDDEN", "[32, 16]"),
            ("ALLCORES__TRAINING__BACKEND", "flex"),
            ("ALLCORES__OPTIMIZER__LR", "0.5"),
            ("OTHER__MODEL__HIDDEN", "[1]"),
        ];
        let s = load(MINIMAL, &[], &env).unwrap();
        assert_eq!(s.model.hidden, vec![32, 16]);
        assert_eq!(s.training.backend, Backend::Flex);
        assert_eq!(s.optimizer.lr, 0.5);
        let env = [("ALLCORES__TRAINING__THREDS", "2")];
        let err = load(MINIMAL, &[], &env).unwrap_err().to_string();
        assert!(err.contains("unknown field `threds`"), "{err}");
    }

    #[test]
    fn overrides_take_toml_values_and_bare_strings() {
        let s = load(
            MINIMAL,
            &[
                "model.hidden=[32, 16]",
                "training.backend=flex",
                "optimizer.lr=0.5",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.model.hidden, vec![32, 16]);
        assert_eq!(s.training.backend, Backend::Flex);
        assert_eq!(s.optimizer.lr, 0.5);
    }

    #[test]
    fn threads_accept_auto_and_positive_counts_only() {
        let s = load(MINIMAL, &["training.threads=auto"], &[]).unwrap();
        assert_eq!(s.training.threads, Threads::Auto);
        let s = load(MINIMAL, &[&format!("training.threads={MAX_THREADS}")], &[]).unwrap();
        assert_eq!(s.training.threads.to_string(), MAX_THREADS.to_string());
        for bad in ["0", "-2", "many", "1.5", "1025", "100000"] {
            let err = load(MINIMAL, &[&format!("training.threads={bad}")], &[]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("training.threads"), "{bad}: {text}");
            assert!(err.is_bad_input());
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = load(&format!("{MINIMAL}\n[training]\nthreds = 2\n"), &[], &[]).unwrap_err();
        assert!(err.to_string().contains("threds"), "{err}");
        let err = load(MINIMAL, &[], &[("ALLCORES__TRAINING__SPEED", "9")]).unwrap_err();
        assert!(err.to_string().contains("speed"), "{err}");
    }

    /// The error that loading MINIMAL with `overrides` gives, as the user reads it.
    fn refusal(overrides: &[&str]) -> String {
        load(MINIMAL, overrides, &[]).unwrap_err().to_string()
    }

    /// config-rs truncated `[1.5]` to `[1]` and handed a two-element array the first two of
    /// three: both trained a model the user did not write.
    #[test]
    fn layer_lists_are_whole_numbers_of_the_right_length() {
        for (set, expected) in [
            ("model.hidden=[1.5]", "expected a whole number, got 1.5"),
            ("model.hidden=[64, -3]", "got -3"),
            (
                "model.channels=[8, 2.5]",
                "expected a whole number, got 2.5",
            ),
            (
                "model.channels=[4, 4, 4]",
                "invalid length 3, expected a list of two",
            ),
            (
                "model.channels=[4]",
                "invalid length 1, expected a list of two",
            ),
        ] {
            let err = refusal(&[set]);
            let key = set.split('=').next().unwrap();
            assert!(err.contains(expected) && err.contains(key), "{set}: {err}");
        }
        let mlp = load(MINIMAL, &["model.hidden=[3, 2]"], &[]).unwrap();
        assert_eq!(mlp.model.hidden, vec![3, 2]);
        let cnn = load(MINIMAL, &["model.kind=cnn", "model.channels=[5, 6]"], &[]).unwrap();
        assert_eq!(cnn.model.channels, [5, 6]);
    }

    /// A key that the rest of the config would ignore is refused with where it applies; the
    /// same value passes where it applies, and every key passes at its default.
    #[test]
    fn keys_the_config_would_ignore_are_refused() {
        let cnn = "model.kind=cnn";
        for (ignored, applies, expected) in [
            (
                &["model.hidden=[64]", cnn][..],
                &["model.hidden=[64]"][..],
                "model.kind = \"mlp\" only; this config trains \"cnn\"",
            ),
            (
                &["model.channels=[8, 16]"],
                &["model.channels=[8, 16]", cnn],
                "\"cnn\" only",
            ),
            (
                &["model.kernel_size=5"],
                &["model.kernel_size=5", cnn],
                "\"cnn\" only",
            ),
            (
                &["model.dense=64"],
                &["model.dense=64", cnn],
                "\"cnn\" only",
            ),
            (
                &["optimizer.momentum=0.5"],
                &["optimizer.momentum=0.5", "optimizer.kind=sgd"],
                "optimizer.kind = \"sgd\" only; this config uses \"adam\"",
            ),
            (
                &["optimizer.epsilon=1e-6", "optimizer.kind=sgd"],
                &["optimizer.epsilon=1e-6"],
                "\"adam\" or \"adamw\" only; this config uses \"sgd\"",
            ),
            (
                &["optimizer.warmup_steps=5"],
                &["optimizer.warmup_steps=5", "optimizer.schedule=cosine"],
                "\"cosine\" only; this config uses \"constant\"",
            ),
            (
                &["precision.init_scale=1024"],
                &["precision.init_scale=1024", "training.precision=f16"],
                "this config trains in f32 without scaling",
            ),
            (
                &["precision.growth_interval=10", "training.precision=bf16"],
                &[
                    "precision.growth_interval=10",
                    "precision.loss_scaling=dynamic",
                ],
                "this config trains in bf16 without scaling",
            ),
            (
                &["precision.growth_factor=4"],
                &["precision.growth_factor=4", "training.precision=f16"],
                "where the loss is scaled",
            ),
            (
                &[
                    "precision.backoff_factor=0.25",
                    "training.precision=f16",
                    "precision.loss_scaling=off",
                ],
                &["precision.backoff_factor=0.25", "training.precision=f16"],
                "this config trains in f16 without scaling",
            ),
        ] {
            let key = ignored[0].split('=').next().unwrap();
            let err = refusal(ignored);
            assert!(
                err.starts_with(&format!("{key}: applies ")),
                "{ignored:?}: {err}"
            );
            assert!(err.contains(expected), "{ignored:?}: {err}");
            load(MINIMAL, applies, &[]).unwrap_or_else(|e| panic!("{applies:?}: {e}"));
        }
        // The data keys that need another kind of file.
        let with_test_csv =
            "[data]\nformat = \"csv\"\ntrain_csv = \"d.csv\"\ntest_csv = \"t.csv\"\n";
        let err = load(with_test_csv, &["data.split_seed=3"], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("data.split_seed: applies to a split"),
            "{err}"
        );
        let idx = "[data]\nformat = \"idx\"\ntrain_images = \"a\"\ntrain_labels = \"b\"\n\
                   test_images = \"c\"\ntest_labels = \"d\"\n";
        let err = load(idx, &["data.scale=255"], &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("data.scale: applies to data.format = \"csv\" only"),
            "{err}"
        );
        load(idx, &[], &[]).unwrap();
        // Every default passes for every model, optimizer and precision.
        for sets in [
            [
                "model.kind=cnn",
                "optimizer.kind=sgd",
                "training.precision=bf16",
            ],
            [
                "model.kind=mlp",
                "optimizer.kind=adamw",
                "training.precision=f32",
            ],
        ] {
            load(MINIMAL, &sets, &[]).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
        }
    }

    #[test]
    fn a_section_given_a_value_is_named_as_a_table() {
        let err = refusal(&["training=3"]);
        assert!(err.contains("expected a [training] table of keys"), "{err}");
    }

    #[test]
    fn large_and_tiny_numbers_are_shown_with_exponents() {
        assert_eq!(
            refusal(&["optimizer.lr=1e30", "optimizer.schedule=cosine"]),
            "optimizer.lr: must be at most 1 with the cosine schedule, got 1e30"
        );
        for (set, expected) in [
            ("training.seed=1e20", "expected a whole number, got 1e20"),
            (
                "training.seed=18446744073709551615",
                "18446744073709551615 is too large: config whole numbers stop at",
            ),
        ] {
            let err = refusal(&[set]);
            assert!(err.contains(expected), "{set}: {err}");
        }
    }

    /// config-rs grows a list up to an index in a key (`model.hidden[N]`): a short argument
    /// allocated gigabytes. Such keys, and other malformed ones, are refused by name first.
    #[test]
    fn indexed_and_malformed_keys_are_refused_naming_the_argument() {
        for (item, expected) in [
            (
                "model.hidden[1000000000]=5",
                "model.hidden[1000000000]=5: 'model.hidden[1000000000]' indexes a list",
            ),
            ("model.hidden[0]=5", "indexes a list"),
            ("model..hidden=5", "'model..hidden' is not a config key"),
            (".x=5", "is not a config key"),
            ("model.hid den=5", "is not a config key"),
        ] {
            let err = refusal(&[item]);
            assert!(err.contains(expected), "{item}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        for name in [
            "ALLCORES__MODEL__HIDDEN[99999999]",
            "ALLCORES__MODEL____HIDDEN",
            "ALLCORES__",
        ] {
            let err = load(MINIMAL, &[], &[(name, "5")]).unwrap_err();
            assert!(err.is_bad_input());
            let err = err.to_string();
            assert!(err.starts_with(&format!("{name}: ")), "{name}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    /// In a release build `batch_size x accumulation_steps` wrapped around to a small step.
    #[test]
    fn a_step_size_that_overflows_is_refused() {
        let big = format!("training.batch_size={}", u64::MAX / 2);
        let err = refusal(&[&big, "training.accumulation_steps=4"]);
        assert!(
            err.starts_with("training.accumulation_steps: training.batch_size x"),
            "{err}"
        );
        assert!(err.contains("is too large"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        for (item, key) in [
            ("training.batch_size=0", "training.batch_size"),
            ("optimizer.lr=0", "optimizer.lr"),
            ("optimizer.lr=-1e-3", "optimizer.lr"),
            (
                "training.accumulation_steps=0",
                "training.accumulation_steps",
            ),
            ("data.test_fraction=1.5", "data.test_fraction"),
            ("model.hidden=[64, 0]", "model.hidden[1]"),
            ("data.classes=1", "data.classes"),
            ("data.test_images=\"t.gz\"", "data.test_images"),
            ("data.classes=257", "data.classes"),
        ] {
            let err = load(MINIMAL, &[item], &[]).unwrap_err();
            assert!(err.to_string().starts_with(key), "{item}: {err}");
        }
    }

    #[test]
    fn wrong_types_and_unknown_names_are_refused() {
        for item in [
            "model.kind=transformer",
            "training.backend=cuda",
            "training.batch_size=\"big\"",
            "training.accumulation_steps=-1",
            "training.accumulation_steps=1.5",
        ] {
            let err = load(MINIMAL, &[item], &[]).unwrap_err();
            assert!(err.is_bad_input(), "{item}");
            let key = item.split('=').next().unwrap().rsplit('.').next().unwrap();
            let text = err.to_string();
            assert!(
                text.contains(key) || text.contains("variant"),
                "{item}: {text}"
            );
        }
    }

    /// An unknown name is refused with the key, the name and the names the key knows.
    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        for (item, known) in [
            ("model.kind=rnn", "`mlp`, `cnn`, `gpt`"),
            ("training.backend=cuda", "`ndarray` or `flex`"),
            ("training.precision=fp8", "`f32`, `f16`, `bf16`"),
            (
                "training.execution=fast",
                "`auto`, `concurrent`, `sequential`",
            ),
            ("training.idle_threads=spin", "`poll` or `sleep`"),
            ("optimizer.kind=lbfgs", "`sgd`, `adam`, `adamw`"),
            ("optimizer.schedule=step", "`constant` or `cosine`"),
            ("precision.loss_scaling=maybe", "`auto`, `dynamic`, `off`"),
            ("data.format=parquet", "`idx`, `csv`, `text`"),
        ] {
            let text = load(MINIMAL, &[item], &[]).unwrap_err().to_string();
            let (key, name) = item.split_once('=').unwrap();
            for part in [key, name, known] {
                assert!(text.contains(part), "{item}: no {part} in: {text}");
            }
        }
    }

    #[test]
    fn invalid_toml_is_reported_on_one_line_with_its_position() {
        let err = load("[data\nformat = 1", &[], &[]).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("line"), "{text}");
    }

    #[test]
    fn settings_round_trip_through_toml() {
        let s = load(
            MINIMAL,
            &["training.threads=3", "training.max_steps=7"],
            &[],
        )
        .unwrap();
        let again: Settings = toml::from_str(&s.to_toml()).unwrap();
        assert_eq!(s, again);
    }
}
