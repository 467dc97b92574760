//! The report of a thread sweep: from the runs' records to a table, a verdict and its files.
//!
//! [`build_report`] is pure: it takes what the runs produced and returns the [`Report`], with
//! speed-ups against the baseline thread count and the [`Verdict`] on whether the thread count
//! changed the result. The `to_*` methods render it as Markdown and CSV.
//!
//! What the runs are compared on is the [`Metric`]: a classifier's test accuracy, or a language
//! model's validation loss. Every table, the verdict and the plots speak of it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use allcores_trainer::settings::DataFormat;
use allcores_trainer::{Settings, Summary};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// The phrase of the verdict when every thread count gave the same weights.
pub const IDENTICAL: &str = "identical: the thread count changed the speed, never the result";

/// What a sweep compares its runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    /// A classifier's accuracy on its test split, a fraction: higher is better.
    #[default]
    #[serde(rename = "test_accuracy")]
    Accuracy,
    /// A language model's mean cross-entropy per character of its validation text, in nats:
    /// lower is better.
    #[serde(rename = "val_loss")]
    ValLoss,
}

impl Metric {
    /// The metric of a sweep of `settings`: validation loss for a text (language-model) config.
    pub fn of_settings(settings: &Settings) -> Self {
        match settings.data.format {
            DataFormat::Text => Metric::ValLoss,
            DataFormat::Idx | DataFormat::Csv => Metric::Accuracy,
        }
    }

    /// The metric of a run from its summary: a language model's summary has a validation loss.
    pub fn of_summary(summary: &Summary) -> Self {
        match summary.val_loss {
            Some(_) => Metric::ValLoss,
            None => Metric::Accuracy,
        }
    }

    /// The metric of a sweep's finished runs: accuracy when there is none to tell.
    pub fn of_records(runs: &[RunRecord]) -> Self {
        if runs.iter().any(|r| r.val_loss.is_some()) {
            Metric::ValLoss
        } else {
            Metric::Accuracy
        }
    }

    /// Its name in prose and table headers: "test accuracy", "validation loss".
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "test accuracy",
            Metric::ValLoss => "validation loss",
        }
    }

    /// Its name before "spread", "mean" or "min-max", where the classifier's report says
    /// "accuracy" alone.
    pub(crate) fn short_name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::ValLoss => "validation loss",
        }
    }

    /// The unit of its shown values.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Accuracy => "%",
            Metric::ValLoss => "nats per character",
        }
    }

    /// Which way a better run moves it: up for accuracy, down for a loss.
    pub fn higher_is_better(self) -> bool {
        match self {
            Metric::Accuracy => true,
            Metric::ValLoss => false,
        }
    }

    /// The stem of the JSON names of its means and spreads (`mean_accuracy`,
    /// `val_loss_spread_across_seeds`): the classifier's report says "accuracy" there.
    fn json_stem(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::ValLoss => "val_loss",
        }
    }

    /// The file of its plot against threads, in the sweep folder.
    pub fn plot_file(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy.svg",
            Metric::ValLoss => "val_loss.svg",
        }
    }

    /// Its value in a run's summary.
    pub fn of(self, summary: &Summary) -> f64 {
        match self {
            Metric::Accuracy => summary.test_accuracy,
            // A language model's test loss is its validation loss.
            Metric::ValLoss => summary.val_loss.unwrap_or(summary.test_loss),
        }
    }

    /// Its value in a run's record.
    pub fn value(self, run: &RunRecord) -> f64 {
        match self {
            Metric::Accuracy => run.test_accuracy,
            Metric::ValLoss => run.val_loss.unwrap_or(run.test_loss),
        }
    }

    /// A value as the report shows it: `90.00%`, `1.9312`.
    pub fn show(self, value: f64) -> String {
        match self {
            Metric::Accuracy => format!("{:.2}%", value * 100.0),
            Metric::ValLoss => format!("{value:.4}"),
        }
    }

    /// A difference of values as the report shows it: `0.50 pp`, `0.0012`.
    pub fn show_difference(self, difference: f64) -> String {
        match self {
            Metric::Accuracy => pp(difference),
            Metric::ValLoss => format!("{difference:.4}"),
        }
    }

    /// A finished run's figures in the sweep's log line: the metric and the matching throughput.
    pub fn run_figures(self, summary: &Summary) -> String {
        match (self, summary.tokens_per_second) {
            (Metric::ValLoss, Some(tokens)) => format!(
                "val loss {:.4} · {} tokens/s",
                self.of(summary),
                thousands(tokens)
            ),
            _ => format!(
                "{} {} · {} samples/s",
                match self {
                    Metric::Accuracy => "test accuracy",
                    Metric::ValLoss => "val loss",
                },
                self.show(self.of(summary)),
                thousands(summary.samples_per_second)
            ),
        }
    }

    /// What the metric is, for the report; `None` for test accuracy, which needs no words.
    fn note(self) -> Option<String> {
        match self {
            Metric::Accuracy => None,
            Metric::ValLoss => Some(format!(
                "Validation loss is the mean cross-entropy of the validation text's next \
                 characters, in {}: {} is better. Tokens/s counts the training characters \
                 read per second; samples/s the training sequences.",
                self.unit(),
                if self.higher_is_better() {
                    "higher"
                } else {
                    "lower"
                }
            )),
        }
    }

    /// Whether it is a language model's: its runs count their throughput in tokens
    /// (characters) too, and have a validation loss.
    pub fn language_model(self) -> bool {
        self == Metric::ValLoss
    }

    fn is_accuracy(&self) -> bool {
        *self == Metric::Accuracy
    }
}

/// `text` with its first letter in capitals.
pub(crate) fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

/// What one finished run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub threads: usize,
    pub seed: u64,
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// Mean training loss over the last epoch.
    pub train_loss: f64,
    pub samples_per_second: f64,
    /// A language model's validation loss (equal to `test_loss`); `None` for a classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// A language model's training throughput in characters; `None` for a classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    pub cpu_utilization: f64,
    /// The run's own wall time (after its config and data were loaded).
    pub wall_seconds: f64,
    pub train_seconds: f64,
    pub weights_sha256: String,
    /// Largest absolute difference of a weight against the run of the same seed at the smallest
    /// thread count: 0 when the hashes are equal, `None` when it could not be computed.
    pub max_weight_diff: Option<f64>,
    pub run_dir: String,
}

impl RunRecord {
    /// The record of a run at `threads` and `seed` from its summary.
    pub fn from_summary(threads: usize, seed: u64, summary: &Summary, run_dir: String) -> Self {
        Self {
            threads,
            seed,
            test_accuracy: summary.test_accuracy,
            test_loss: summary.test_loss,
            train_loss: summary.train_loss,
            samples_per_second: summary.samples_per_second,
            val_loss: summary.val_loss,
            tokens_per_second: summary.tokens_per_second,
            cpu_utilization: summary.cpu_utilization,
            wall_seconds: summary.wall_seconds,
            train_seconds: summary.train_seconds,
            weights_sha256: summary.weights_sha256.clone(),
            max_weight_diff: None,
            run_dir,
        }
    }
}

/// A run that did not finish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFailure {
    pub threads: usize,
    pub seed: u64,
    /// The run's exit status; `None` when it was killed by a signal or never started.
    pub exit_status: Option<i32>,
    /// The run's error line.
    pub message: String,
}

/// What was asked of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPlan {
    /// The config file, as given.
    pub config: String,
    /// The thread counts, ascending.
    pub threads: Vec<usize>,
    /// Seeds `0..seeds`.
    pub seeds: u64,
    /// The `--set` overrides given to every run.
    pub overrides: Vec<String>,
    /// Threads this machine allows the process.
    pub threads_available: usize,
}

/// A run with its speed-up against the baseline run of the same seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    #[serde(flatten)]
    pub run: RunRecord,
    /// samples/s over the baseline's samples/s; `None` when the baseline run failed.
    pub speedup: Option<f64>,
    /// speed-up / (threads / baseline threads).
    pub efficiency: Option<f64>,
}

/// The runs at one thread count, over the seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadSummary {
    pub threads: usize,
    pub runs: usize,
    /// What `mean`, `min` and `max` are of (in the JSON: `mean_accuracy`, `mean_val_loss`, ...).
    pub metric: Metric,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub mean_samples_per_second: f64,
    /// A language model's mean training characters per second; `None` for a classifier.
    pub mean_tokens_per_second: Option<f64>,
    pub mean_speedup: Option<f64>,
    pub mean_efficiency: Option<f64>,
}

/// By hand, for the metric's names: a classifier's JSON keeps the `mean_accuracy` it always had.
impl Serialize for ThreadSummary {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let stem = self.metric.json_stem();
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("threads", &self.threads)?;
        map.serialize_entry("runs", &self.runs)?;
        map.serialize_entry(&format!("mean_{stem}"), &self.mean)?;
        map.serialize_entry(&format!("min_{stem}"), &self.min)?;
        map.serialize_entry(&format!("max_{stem}"), &self.max)?;
        map.serialize_entry("mean_samples_per_second", &self.mean_samples_per_second)?;
        if let Some(tokens) = self.mean_tokens_per_second {
            map.serialize_entry("mean_tokens_per_second", &tokens)?;
        }
        map.serialize_entry("mean_speedup", &self.mean_speedup)?;
        map.serialize_entry("mean_efficiency", &self.mean_efficiency)?;
        map.end()
    }
}

/// Did the thread count change the result?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Equal weight hashes at every thread count, for each seed.
    Identical,
    /// Some seed's weights differ between thread counts.
    Different,
    /// No seed has finished runs at two thread counts: nothing to compare.
    Inconclusive,
}

/// The verdict and the numbers behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// What the spreads are of (in the JSON: `accuracy_spread_across_threads`,
    /// `val_loss_spread_across_threads`, ...).
    pub metric: Metric,
    pub outcome: Outcome,
    /// The verdict as one line of text.
    pub line: String,
    /// Seeds with finished runs at two thread counts or more.
    pub seeds_compared: usize,
    /// Runs whose weights hash differs from their seed's baseline run.
    pub runs_differing: usize,
    /// The largest absolute weight difference of any run against its seed's baseline run.
    pub max_weight_diff: Option<f64>,
    /// Where that difference is: (threads, seed).
    pub max_weight_diff_at: Option<(usize, u64)>,
    /// Max over seeds of (max - min of the metric across thread counts); the name is the
    /// classifier's, the value that of `metric`.
    pub accuracy_spread_across_threads: Option<f64>,
    /// Max over thread counts of (max - min of the metric across seeds); `None` with one seed.
    pub accuracy_spread_across_seeds: Option<f64>,
    /// Whether the spread across thread counts is no larger than the spread across seeds.
    pub within_seed_spread: Option<bool>,
}

/// By hand, for the metric's names: a classifier's JSON keeps the names it always had.
impl Serialize for Verdict {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let stem = self.metric.json_stem();
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("outcome", &self.outcome)?;
        map.serialize_entry("line", &self.line)?;
        map.serialize_entry("seeds_compared", &self.seeds_compared)?;
        map.serialize_entry("runs_differing", &self.runs_differing)?;
        map.serialize_entry("max_weight_diff", &self.max_weight_diff)?;
        map.serialize_entry("max_weight_diff_at", &self.max_weight_diff_at)?;
        map.serialize_entry(
            &format!("{stem}_spread_across_threads"),
            &self.accuracy_spread_across_threads,
        )?;
        map.serialize_entry(
            &format!("{stem}_spread_across_seeds"),
            &self.accuracy_spread_across_seeds,
        )?;
        map.serialize_entry("within_seed_spread", &self.within_seed_spread)?;
        map.end()
    }
}

/// Wall times of the sweep against those of its runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    /// From the first check of the input until every run finished.
    pub sweep_seconds: f64,
    /// Sum of the runs' own `wall_seconds` (which start after a run loaded its data).
    pub runs_wall_seconds: f64,
    /// Sum of the run processes' lifetimes, from spawn to exit.
    pub processes_seconds: f64,
    /// `sweep_seconds - runs_wall_seconds`: process start-up, config and data loading in each
    /// run, and the sweep's own work.
    pub overhead_seconds: f64,
    /// `sweep_seconds - processes_seconds`: the sweep's own work only.
    pub launcher_seconds: f64,
}

/// Why a sweep ended before its last run: a signal (Ctrl-C, SIGTERM, SIGHUP).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interruption {
    /// The signal that stopped the sweep: "SIGINT", "SIGTERM" or "SIGHUP".
    pub signal: String,
    /// Planned runs that did not run to their end (the one stopped included).
    pub runs_not_run: u64,
    /// The run the signal stopped part-way (its message names the command that resumes it
    /// when it saved a checkpoint); `None` when the sweep stopped between runs.
    pub stopped_run: Option<RunFailure>,
}

/// Everything the sweep found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// What the runs are compared on; left out of a classifier's JSON, whose report has always
    /// been of test accuracy.
    #[serde(skip_serializing_if = "Metric::is_accuracy")]
    pub metric: Metric,
    pub plan: SweepPlan,
    /// The thread count speed-ups are measured against: 1, or the smallest in the sweep.
    pub baseline_threads: usize,
    /// Finished runs, by seed then thread count.
    pub runs: Vec<ReportRow>,
    pub failures: Vec<RunFailure>,
    pub by_threads: Vec<ThreadSummary>,
    pub verdict: Verdict,
    pub timing: Option<Timing>,
    /// Set when a signal stopped the sweep: the report then covers the runs that ended.
    pub interrupted: Option<Interruption>,
}

/// Builds the report of a sweep from its finished runs and its failures, on the metric the runs
/// tell ([`Metric::of_records`]).
pub fn build_report(plan: SweepPlan, runs: Vec<RunRecord>, failures: Vec<RunFailure>) -> Report {
    build_report_on(Metric::of_records(&runs), plan, runs, failures)
}

/// Builds the report of a sweep on `metric`: known from the config even when no run finished.
pub fn build_report_on(
    metric: Metric,
    plan: SweepPlan,
    runs: Vec<RunRecord>,
    failures: Vec<RunFailure>,
) -> Report {
    let mut runs = runs;
    runs.sort_by_key(|r| (r.seed, r.threads));
    let baseline_threads = plan
        .threads
        .iter()
        .copied()
        .min()
        .or_else(|| runs.iter().map(|r| r.threads).min())
        .unwrap_or(1);

    let baseline_speed: BTreeMap<u64, f64> = runs
        .iter()
        .filter(|r| r.threads == baseline_threads)
        .map(|r| (r.seed, r.samples_per_second))
        .collect();
    let rows: Vec<ReportRow> = runs
        .into_iter()
        .map(|run| {
            let speedup = baseline_speed
                .get(&run.seed)
                .filter(|base| **base > 0.0)
                .map(|base| run.samples_per_second / base);
            let efficiency =
                speedup.map(|s| s * baseline_threads as f64 / run.threads.max(1) as f64);
            ReportRow {
                run,
                speedup,
                efficiency,
            }
        })
        .collect();

    let by_threads = summarize_by_threads(metric, &plan.threads, &rows);
    let verdict = verdict(metric, &rows, baseline_threads);
    Report {
        metric,
        plan,
        baseline_threads,
        runs: rows,
        failures,
        by_threads,
        verdict,
        timing: None,
        interrupted: None,
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The spread (max - min) of the values; `None` for fewer than two.
fn spread(values: impl Iterator<Item = f64>) -> Option<f64> {
    let values: Vec<f64> = values.collect();
    if values.len() < 2 {
        return None;
    }
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    Some(max - min)
}

fn max_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.fold(None, |best: Option<f64>, v| {
        Some(best.map_or(v, |b| b.max(v)))
    })
}

fn summarize_by_threads(
    metric: Metric,
    threads: &[usize],
    rows: &[ReportRow],
) -> Vec<ThreadSummary> {
    threads
        .iter()
        .filter_map(|&t| {
            let at: Vec<&ReportRow> = rows.iter().filter(|r| r.run.threads == t).collect();
            let values = || at.iter().map(|r| metric.value(&r.run));
            Some(ThreadSummary {
                threads: t,
                runs: at.len(),
                metric,
                mean: mean(values())?,
                min: values().fold(f64::INFINITY, f64::min),
                max: values().fold(f64::NEG_INFINITY, f64::max),
                mean_samples_per_second: mean(at.iter().map(|r| r.run.samples_per_second))?,
                mean_tokens_per_second: mean(at.iter().filter_map(|r| r.run.tokens_per_second)),
                mean_speedup: mean(at.iter().filter_map(|r| r.speedup)),
                mean_efficiency: mean(at.iter().filter_map(|r| r.efficiency)),
            })
        })
        .collect()
}

/// Percentage points, from a difference of fractions.
fn pp(fraction: f64) -> String {
    format!("{:.2} pp", fraction * 100.0)
}

/// The answer to "does the result depend on the thread count?", with its evidence: each seed's
/// runs against the seed's run at the smallest thread count, and the metric's spread across
/// thread counts against its spread across seeds.
fn verdict(metric: Metric, rows: &[ReportRow], baseline_threads: usize) -> Verdict {
    let by_seed = grouped(rows, |run| run.seed);
    let by_threads = grouped(rows, |run| run.threads);
    let compared: Vec<&Vec<&RunRecord>> = by_seed.values().filter(|runs| runs.len() >= 2).collect();
    // Runs are sorted by thread count within a seed: the first is the seed's reference.
    let differing: Vec<&RunRecord> = compared
        .iter()
        .flat_map(|runs| {
            runs.iter()
                .skip(1)
                .filter(|r| r.weights_sha256 != runs[0].weights_sha256)
                .copied()
        })
        .collect();
    let threads_spread = max_of(
        compared
            .iter()
            .filter_map(|runs| spread(runs.iter().map(|r| metric.value(r)))),
    );
    let seeds_spread = max_of(
        by_threads
            .values()
            .filter_map(|runs| spread(runs.iter().map(|r| metric.value(r)))),
    );
    let max_diff = largest_weight_diff(&differing);

    let (outcome, line) = if compared.is_empty() {
        (
            Outcome::Inconclusive,
            "inconclusive: no seed has finished runs at two thread counts, so nothing could be \
             compared"
                .into(),
        )
    } else if differing.is_empty() {
        let runs: usize = compared.iter().map(|r| r.len()).sum();
        let line = format!(
            "{IDENTICAL} (equal weights hashes across thread counts for each of {} seed{}, \
             {runs} runs)",
            compared.len(),
            if compared.len() == 1 { "" } else { "s" }
        );
        (Outcome::Identical, line)
    } else {
        let compared_runs: usize = compared.iter().map(|r| r.len() - 1).sum();
        let line = different_line(
            metric,
            (differing.len(), compared_runs),
            baseline_threads,
            max_diff,
            threads_spread.unwrap_or(0.0),
            seeds_spread,
        );
        (Outcome::Different, line)
    };
    Verdict {
        metric,
        outcome,
        line,
        seeds_compared: compared.len(),
        runs_differing: differing.len(),
        max_weight_diff: max_diff.map(|m| m.0),
        max_weight_diff_at: max_diff.map(|m| (m.1, m.2)),
        accuracy_spread_across_threads: threads_spread,
        accuracy_spread_across_seeds: seeds_spread,
        within_seed_spread: match outcome {
            Outcome::Inconclusive => None,
            Outcome::Identical => threads_spread.map(|_| true),
            Outcome::Different => seeds_spread.map(|seeds| threads_spread.unwrap_or(0.0) <= seeds),
        },
    }
}

/// The rows' runs grouped by `key`, in the rows' order within a group.
fn grouped<K: Ord>(
    rows: &[ReportRow],
    key: impl Fn(&RunRecord) -> K,
) -> BTreeMap<K, Vec<&RunRecord>> {
    let mut groups: BTreeMap<K, Vec<&RunRecord>> = BTreeMap::new();
    for row in rows {
        groups.entry(key(&row.run)).or_default().push(&row.run);
    }
    groups
}

/// The largest absolute weight difference among `runs`, with its thread count and seed.
fn largest_weight_diff(runs: &[&RunRecord]) -> Option<(f64, usize, u64)> {
    runs.iter()
        .filter_map(|r| r.max_weight_diff.map(|d| (d, r.threads, r.seed)))
        .fold(None, |best: Option<(f64, usize, u64)>, item| match best {
            Some(b) if b.0 >= item.0 => Some(b),
            _ => Some(item),
        })
}

/// The verdict's line when weights differ: how many runs, by how much, and whether the metric
/// moved more across thread counts than across seeds.
fn different_line(
    metric: Metric,
    (differing, compared): (usize, usize),
    baseline_threads: usize,
    max_diff: Option<(f64, usize, u64)>,
    threads_spread: f64,
    seeds_spread: Option<f64>,
) -> String {
    let mut line = format!(
        "different: the weights depend on the thread count ({differing} of {compared} runs \
         differ from their seed's {baseline_threads}-thread run"
    );
    match max_diff {
        Some((d, t, s)) => {
            let _ = write!(
                line,
                "; largest absolute weight difference {d:.3e} at threads {t}, seed {s})"
            );
        }
        None => line.push_str("; the largest weight difference is unknown)"),
    }
    match seeds_spread {
        Some(seeds_spread) => {
            let _ = write!(
                line,
                "; the {} spread across thread counts, {} (max over seeds of max-min), is {} \
                 the spread across seeds, {} (max over thread counts of max-min)",
                metric.short_name(),
                metric.show_difference(threads_spread),
                if threads_spread <= seeds_spread {
                    "within"
                } else {
                    "larger than"
                },
                metric.show_difference(seeds_spread)
            );
        }
        None => {
            let _ = write!(
                line,
                "; the {} spread across thread counts is {} (max over seeds of max-min), and \
                 the spread across seeds is unknown with one seed (use --seeds 2 or more)",
                metric.short_name(),
                metric.show_difference(threads_spread)
            );
        }
    }
    line
}

/// `12345.6` as `12,346`: the trainer's formatting, so both speak alike.
pub(crate) use allcores_trainer::thousands;

/// The plots' section of the Markdown report: the files the sweep draws (see `write_report`).
fn plots_section(metric: Metric) -> String {
    format!(
        "\n## Plots\n\n![{} against threads]({})\n\n\
         ![throughput and parallel efficiency against threads](throughput.svg)\n",
        metric.short_name(),
        metric.plot_file()
    )
}

/// A Markdown table row of `cells`.
fn table_row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

/// A Markdown table's header: its titles, then the alignment of each column (`--:` right,
/// `:--` left).
fn table_header(columns: &[(&str, &str)]) -> String {
    let titles: Vec<String> = columns.iter().map(|c| c.0.to_string()).collect();
    let aligns: Vec<&str> = columns.iter().map(|c| c.1).collect();
    format!("{}|{}|\n", table_row(&titles), aligns.join("|"))
}

fn opt(value: Option<f64>, show: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "-".to_string(), show)
}

fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

impl Report {
    /// The planned runs, threads x seeds (saturating: a sweep refuses a count past `u64::MAX`).
    pub fn runs_planned(&self) -> u64 {
        (self.plan.threads.len() as u64).saturating_mul(self.plan.seeds)
    }

    /// The planned runs that neither finished nor failed.
    pub fn runs_not_run(&self) -> u64 {
        let ended = (self.runs.len() + self.failures.len()) as u64;
        self.runs_planned().saturating_sub(ended)
    }

    /// What a signal left undone, as a sentence; `None` when none stopped the sweep.
    pub fn interruption_note(&self) -> Option<String> {
        let i = self.interrupted.as_ref()?;
        let mut note = format!(
            "Interrupted by {}: {} of {} planned run{} did not run; the report covers the {} \
             that ended.",
            i.signal,
            i.runs_not_run,
            self.runs_planned(),
            if self.runs_planned() == 1 { "" } else { "s" },
            self.runs.len() + self.failures.len()
        );
        if let Some(run) = &i.stopped_run {
            let _ = write!(
                note,
                " The run at threads {}, seed {} was stopped: {}",
                run.threads, run.seed, run.message
            );
        }
        Some(note)
    }

    /// The basis of the speed-ups, as a sentence.
    pub fn baseline_note(&self) -> String {
        if self.baseline_threads == 1 {
            "Speed-up and parallel efficiency are against the 1-thread run of the same seed.".into()
        } else {
            format!(
                "Speed-up and parallel efficiency are against the {b}-thread run of the same \
                 seed: 1 thread is not in the sweep, so {b} threads, the smallest count, is the \
                 baseline (efficiency = speed-up / (threads / {b})).",
                b = self.baseline_threads
            )
        }
    }

    /// The runs as a Markdown table: a language model's with tokens/s next to samples/s.
    pub fn runs_table(&self) -> String {
        let metric = self.metric;
        let tokens = metric.language_model();
        let mut columns = vec![
            ("threads", "--:"),
            ("seed", "--:"),
            (metric.name(), "--:"),
            ("final train loss", "--:"),
            ("samples/s", "--:"),
        ];
        if tokens {
            columns.push(("tokens/s", "--:"));
        }
        columns.extend([
            ("speed-up", "--:"),
            ("parallel efficiency", "--:"),
            ("CPU utilisation", "--:"),
            ("weights (SHA-256)", ":--"),
        ]);
        let mut out = table_header(&columns);
        for row in &self.runs {
            let r = &row.run;
            let mut cells = vec![
                r.threads.to_string(),
                r.seed.to_string(),
                metric.show(metric.value(r)),
                format!("{:.4}", r.train_loss),
                thousands(r.samples_per_second),
            ];
            if tokens {
                cells.push(opt(r.tokens_per_second, thousands));
            }
            cells.extend([
                opt(row.speedup, |s| format!("{s:.2}x")),
                opt(row.efficiency, |e| format!("{:.0}%", e * 100.0)),
                format!("{:.0}%", r.cpu_utilization * 100.0),
                format!("`{}`", short_hash(&r.weights_sha256)),
            ]);
            out.push_str(&table_row(&cells));
        }
        out
    }

    /// The whole report as Markdown (`report.md`): what ran and the verdict, the runs, each
    /// thread count's summary, the comparison behind the verdict, failed runs, timing, plots.
    pub fn to_markdown(&self) -> String {
        [
            self.markdown_header(),
            self.runs_table(),
            self.by_threads_table(),
            self.comparison(),
            self.failures_list(),
            self.timing_paragraph(),
            // Without a finished run the sweep draws no plot.
            if self.runs.is_empty() {
                String::new()
            } else {
                plots_section(self.metric)
            },
        ]
        .concat()
    }

    /// The title, the verdict, what was run and the basis of the speed-ups.
    fn markdown_header(&self) -> String {
        let plan = &self.plan;
        let mut out = String::new();
        let _ = writeln!(out, "# Thread sweep of `{}`\n", plan.config);
        let _ = writeln!(out, "**Verdict:** {}\n", self.verdict.line);
        if let Some(note) = self.interruption_note() {
            let _ = writeln!(out, "{note}\n");
        }
        let threads: Vec<String> = plan.threads.iter().map(|t| t.to_string()).collect();
        let seeds = match plan.seeds {
            1 => "seed 0".to_string(),
            n => format!("seeds 0 to {}", n - 1),
        };
        let _ = writeln!(
            out,
            "{} run{} of {} planned: threads {} x {seeds}, one process each, on a machine that \
             allows {} thread{}.{}",
            self.runs.len(),
            if self.runs.len() == 1 { "" } else { "s" },
            self.runs_planned(),
            threads.join(", "),
            plan.threads_available,
            if plan.threads_available == 1 { "" } else { "s" },
            if plan.overrides.is_empty() {
                String::new()
            } else {
                format!(" Overrides: `{}`.", plan.overrides.join("`, `"))
            }
        );
        let _ = writeln!(out, "{}\n", self.baseline_note());
        if let Some(note) = self.metric.note() {
            let _ = writeln!(out, "{note}\n");
        }
        out
    }

    /// Each thread count's means over its seeds, as a Markdown section (empty without runs).
    fn by_threads_table(&self) -> String {
        if self.by_threads.is_empty() {
            return String::new();
        }
        let metric = self.metric;
        let tokens = metric.language_model();
        let (mean, min_max) = (
            format!("mean {}", metric.short_name()),
            format!("{} min-max", metric.short_name()),
        );
        let mut columns = vec![
            ("threads", "--:"),
            ("runs", "--:"),
            (mean.as_str(), "--:"),
            (min_max.as_str(), "--:"),
            ("mean samples/s", "--:"),
        ];
        if tokens {
            columns.push(("mean tokens/s", "--:"));
        }
        columns.extend([("mean speed-up", "--:"), ("mean efficiency", "--:")]);
        let mut out = format!("\n## By thread count\n\n{}", table_header(&columns));
        for t in &self.by_threads {
            let mut cells = vec![
                t.threads.to_string(),
                t.runs.to_string(),
                metric.show(t.mean),
                format!("{} - {}", metric.show(t.min), metric.show(t.max)),
                thousands(t.mean_samples_per_second),
            ];
            if tokens {
                cells.push(opt(t.mean_tokens_per_second, thousands));
            }
            cells.extend([
                opt(t.mean_speedup, |s| format!("{s:.2}x")),
                opt(t.mean_efficiency, |e| format!("{:.0}%", e * 100.0)),
            ]);
            out.push_str(&table_row(&cells));
        }
        out
    }

    /// The evidence behind the verdict, as a Markdown section.
    fn comparison(&self) -> String {
        let v = &self.verdict;
        let mut out = String::from("\n## Comparison\n\n");
        let _ = writeln!(
            out,
            "- Seeds compared across thread counts: {}; runs whose weights differ from their \
             seed's {}-thread run: {}.",
            v.seeds_compared, self.baseline_threads, v.runs_differing
        );
        let _ = writeln!(
            out,
            "- Largest absolute weight difference: {}.",
            match (v.max_weight_diff, v.max_weight_diff_at, v.runs_differing) {
                (_, _, 0) => "0 (equal hashes)".to_string(),
                (Some(d), Some((t, s)), _) => format!("{d:.3e} at threads {t}, seed {s}"),
                _ => "unknown".to_string(),
            }
        );
        let (name, metric) = (capitalized(self.metric.short_name()), self.metric);
        let _ = writeln!(
            out,
            "- {name} spread across thread counts (max over seeds of max-min): {}.",
            opt(v.accuracy_spread_across_threads, |d| {
                metric.show_difference(d)
            })
        );
        let _ = writeln!(
            out,
            "- {name} spread across seeds (max over thread counts of max-min): {}.",
            v.accuracy_spread_across_seeds.map_or_else(
                || "unknown (one seed)".to_string(),
                |d| { metric.show_difference(d) }
            )
        );
        out
    }

    /// The runs that did not finish, as a Markdown section (empty when all did).
    fn failures_list(&self) -> String {
        if self.failures.is_empty() {
            return String::new();
        }
        let mut out = String::from("\n## Failed runs\n\n");
        for f in &self.failures {
            let _ = writeln!(
                out,
                "- threads {}, seed {} ({}): {}",
                f.threads,
                f.seed,
                f.exit_status
                    .map_or("no exit status".to_string(), |s| format!("exit status {s}")),
                f.message
            );
        }
        out
    }

    /// Where the sweep's time went, as a Markdown section (empty when it was not timed).
    fn timing_paragraph(&self) -> String {
        let Some(t) = &self.timing else {
            return String::new();
        };
        format!(
            "\n## Timing\n\n\
             The sweep took {:.2} s; the runs' own wall time adds up to {:.2} s and their \
             processes lived {:.2} s in all. Overhead over the runs' wall time: {:.2} s \
             (process start-up, config and data loading in each run, and the sweep's own \
             work); the sweep's own work alone: {:.2} s.\n",
            t.sweep_seconds,
            t.runs_wall_seconds,
            t.processes_seconds,
            t.overhead_seconds,
            t.launcher_seconds
        )
    }

    /// The runs as CSV (`report.csv`), one row per finished run, full hashes.
    /// A language model's has `val_loss` after `seed` and `tokens_per_second` after
    /// `samples_per_second` (its `test_accuracy` is the next character's).
    pub fn to_csv(&self) -> String {
        let mut writer = csv::Writer::from_writer(Vec::new());
        let lm = self.metric.language_model();
        let mut header = vec!["threads", "seed"];
        if lm {
            header.push("val_loss");
        }
        header.extend([
            "test_accuracy",
            "test_loss",
            "train_loss",
            "samples_per_second",
        ]);
        if lm {
            header.push("tokens_per_second");
        }
        header.extend([
            "speedup",
            "efficiency",
            "cpu_utilization",
            "wall_seconds",
            "train_seconds",
            "weights_sha256",
            "max_weight_diff",
            "run_dir",
        ]);
        let num = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
        // Writing into a Vec cannot fail.
        let _ = writer.write_record(header);
        for row in &self.runs {
            let r = &row.run;
            let mut record = vec![r.threads.to_string(), r.seed.to_string()];
            if lm {
                record.push(num(Some(self.metric.value(r))));
            }
            record.extend([
                r.test_accuracy.to_string(),
                r.test_loss.to_string(),
                r.train_loss.to_string(),
                r.samples_per_second.to_string(),
            ]);
            if lm {
                record.push(num(r.tokens_per_second));
            }
            record.extend([
                num(row.speedup),
                num(row.efficiency),
                r.cpu_utilization.to_string(),
                r.wall_seconds.to_string(),
                r.train_seconds.to_string(),
                r.weights_sha256.clone(),
                num(r.max_weight_diff),
                r.run_dir.clone(),
            ]);
            let _ = writer.write_record(record);
        }
        let bytes = writer.into_inner().unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(threads: &[usize], seeds: u64) -> SweepPlan {
        SweepPlan {
            config: "digits.toml".into(),
            threads: threads.to_vec(),
            seeds,
            overrides: vec![],
            threads_available: 2,
        }
    }

    fn run(threads: usize, seed: u64, accuracy: f64, speed: f64, hash: &str) -> RunRecord {
        RunRecord {
            threads,
            seed,
            test_accuracy: accuracy,
            test_loss: 0.5,
            train_loss: 0.4,
            samples_per_second: speed,
            val_loss: None,
            tokens_per_second: None,
            cpu_utilization: 0.9,
            wall_seconds: 1.0,
            train_seconds: 0.8,
            weights_sha256: hash.into(),
            max_weight_diff: if hash.ends_with('x') {
                Some(1e-6)
            } else {
                Some(0.0)
            },
            run_dir: format!("runs/t{threads}-s{seed}"),
        }
    }

    #[test]
    fn equal_hashes_per_seed_give_identical() {
        let runs = vec![
            run(2, 0, 0.90, 1800.0, "aaaa"),
            run(1, 0, 0.90, 1000.0, "aaaa"),
            run(1, 1, 0.92, 1000.0, "bbbb"),
            run(2, 1, 0.92, 2000.0, "bbbb"),
        ];
        let report = build_report(plan(&[1, 2], 2), runs, vec![]);
        let v = &report.verdict;
        assert_eq!(v.outcome, Outcome::Identical);
        assert!(v.line.starts_with(IDENTICAL), "{}", v.line);
        assert_eq!(v.seeds_compared, 2);
        assert_eq!(v.runs_differing, 0);
        assert_eq!(v.accuracy_spread_across_threads, Some(0.0));
        let seeds_spread = v.accuracy_spread_across_seeds.unwrap();
        assert!((seeds_spread - 0.02).abs() < 1e-12, "{seeds_spread}");

        // Sorted by seed, then threads; speed-ups against the same seed's 1-thread run.
        let order: Vec<(u64, usize)> = report
            .runs
            .iter()
            .map(|r| (r.run.seed, r.run.threads))
            .collect();
        assert_eq!(order, [(0, 1), (0, 2), (1, 1), (1, 2)]);
        assert_eq!(report.baseline_threads, 1);
        assert_eq!(report.runs[1].speedup, Some(1.8));
        assert_eq!(report.runs[1].efficiency, Some(0.9));
        assert_eq!(report.runs[3].speedup, Some(2.0));
        assert_eq!(report.runs[3].efficiency, Some(1.0));
        assert_eq!(report.by_threads.len(), 2);
        assert_eq!(report.by_threads[1].mean_samples_per_second, 1900.0);
        assert_eq!(report.by_threads[1].mean_speedup, Some(1.9));

        let md = report.to_markdown();
        assert!(md.contains(IDENTICAL));
        assert!(
            md.contains(
                "4 runs of 4 planned: threads 1, 2 x seeds 0 to 1, one process each, on a \
                 machine that allows 2 threads."
            ),
            "{md}"
        );
        assert!(
            md.contains("| 2 | 0 | 90.00% | 0.4000 | 1,800 | 1.80x | 90% | 90% | `aaaa` |"),
            "{md}"
        );
        let csv = report.to_csv();
        assert_eq!(csv.lines().count(), 5);
        assert!(
            csv.lines()
                .nth(2)
                .unwrap()
                .starts_with("2,0,0.9,0.5,0.4,1800,1.8,0.9,"),
            "{csv}"
        );
    }

    #[test]
    fn different_hashes_within_the_seed_spread() {
        // Seed 0 differs across threads by 0.5 pp; seeds differ by 3 pp.
        let runs = vec![
            run(1, 0, 0.900, 1000.0, "aaaa"),
            run(2, 0, 0.905, 1900.0, "aaax"),
            run(1, 1, 0.930, 1000.0, "bbbb"),
            run(2, 1, 0.930, 1900.0, "bbbb"),
        ];
        let v = build_report(plan(&[1, 2], 2), runs, vec![]).verdict;
        assert_eq!(v.outcome, Outcome::Different);
        assert_eq!(v.runs_differing, 1);
        assert_eq!(v.max_weight_diff, Some(1e-6));
        assert_eq!(v.max_weight_diff_at, Some((2, 0)));
        assert!((v.accuracy_spread_across_threads.unwrap() - 0.005).abs() < 1e-12);
        assert!((v.accuracy_spread_across_seeds.unwrap() - 0.030).abs() < 1e-12);
        assert_eq!(v.within_seed_spread, Some(true));
        assert!(v.line.starts_with("different:"), "{}", v.line);
        assert!(
            v.line.contains("1.000e-6 at threads 2, seed 0"),
            "{}",
            v.line
        );
        assert!(v.line.contains("0.50 pp"), "{}", v.line);
        assert!(
            v.line
                .contains("is within the spread across seeds, 3.00 pp"),
            "{}",
            v.line
        );
    }

    #[test]
    fn different_hashes_outside_the_seed_spread() {
        // Threads move seed 1 by 5 pp; seeds differ by at most 1 pp at any thread count.
        let runs = vec![
            run(1, 0, 0.90, 1000.0, "aaaa"),
            run(4, 0, 0.91, 3000.0, "aaax"),
            run(1, 1, 0.91, 1000.0, "bbbb"),
            run(4, 1, 0.86, 3000.0, "bbbx"),
        ];
        let report = build_report(plan(&[1, 4], 2), runs, vec![]);
        let v = &report.verdict;
        assert_eq!(v.outcome, Outcome::Different);
        assert_eq!(v.runs_differing, 2);
        assert!((v.accuracy_spread_across_threads.unwrap() - 0.05).abs() < 1e-12);
        assert!((v.accuracy_spread_across_seeds.unwrap() - 0.05).abs() < 1e-12);
        // Equal spreads count as within; make the thread spread strictly larger.
        assert_eq!(v.within_seed_spread, Some(true));

        let runs = vec![
            run(1, 0, 0.90, 1000.0, "aaaa"),
            run(4, 0, 0.95, 3000.0, "aaax"),
            run(1, 1, 0.91, 1000.0, "bbbb"),
            run(4, 1, 0.94, 3000.0, "bbbb"),
        ];
        let v = build_report(plan(&[1, 4], 2), runs, vec![]).verdict;
        assert_eq!(v.within_seed_spread, Some(false));
        assert!(v.line.contains("5.00 pp"), "{}", v.line);
        assert!(
            v.line
                .contains("is larger than the spread across seeds, 1.00 pp"),
            "{}",
            v.line
        );
    }

    #[test]
    fn one_seed_leaves_the_seed_spread_unknown() {
        let runs = vec![
            run(1, 0, 0.90, 1000.0, "aaaa"),
            run(2, 0, 0.91, 1500.0, "aaax"),
        ];
        let report = build_report(plan(&[1, 2], 1), runs, vec![]);
        let v = &report.verdict;
        assert_eq!(v.outcome, Outcome::Different);
        assert_eq!(v.accuracy_spread_across_seeds, None);
        assert_eq!(v.within_seed_spread, None);
        assert!(
            v.line
                .contains("spread across seeds is unknown with one seed"),
            "{}",
            v.line
        );
        let md = report.to_markdown();
        assert!(md.contains("unknown (one seed)"));
        assert!(
            md.contains("threads 1, 2 x seed 0, one process each"),
            "{md}"
        );
    }

    #[test]
    fn without_one_thread_the_smallest_count_is_the_baseline() {
        let runs = vec![
            run(2, 0, 0.9, 1000.0, "aaaa"),
            run(4, 0, 0.9, 1500.0, "aaaa"),
        ];
        let report = build_report(plan(&[2, 4], 1), runs, vec![]);
        assert_eq!(report.baseline_threads, 2);
        assert_eq!(report.runs[1].speedup, Some(1.5));
        assert_eq!(report.runs[1].efficiency, Some(0.75));
        assert!(
            report
                .baseline_note()
                .contains("1 thread is not in the sweep")
        );
        assert!(
            report
                .to_markdown()
                .contains("1 thread is not in the sweep")
        );
    }

    #[test]
    fn an_interrupted_report_says_what_did_not_run() {
        let runs = vec![run(1, 0, 0.9, 1000.0, "aaaa")];
        let mut report = build_report(plan(&[1, 2], 3), runs, vec![]);
        assert_eq!(report.interruption_note(), None);
        assert_eq!(report.runs_planned(), 6);
        assert_eq!(report.runs_not_run(), 5);
        report.interrupted = Some(Interruption {
            signal: "SIGINT".into(),
            runs_not_run: report.runs_not_run(),
            stopped_run: Some(RunFailure {
                threads: 2,
                seed: 0,
                exit_status: Some(130),
                message: "interrupted after step 8; checkpoint saved. Resume with: allcores \
                          train r/config.toml --out r --resume"
                    .into(),
            }),
        });
        let note = "Interrupted by SIGINT: 5 of 6 planned runs did not run; the report covers \
                    the 1 that ended. The run at threads 2, seed 0 was stopped: interrupted \
                    after step 8; checkpoint saved. Resume with: allcores train r/config.toml \
                    --out r --resume";
        assert_eq!(report.interruption_note().as_deref(), Some(note));
        let md = report.to_markdown();
        assert!(md.contains(&format!("\n{note}\n")), "{md}");
        assert!(md.contains("1 run of 6 planned"), "{md}");
        assert!(md.contains("accuracy.svg"), "{md}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["interrupted"]["runs_not_run"], 5);
        assert_eq!(json["interrupted"]["stopped_run"]["exit_status"], 130);
    }

    #[test]
    fn failures_are_kept_and_a_lone_run_is_inconclusive() {
        let runs = vec![run(1, 0, 0.9, 1000.0, "aaaa")];
        let failures = vec![RunFailure {
            threads: 2,
            seed: 0,
            exit_status: Some(1),
            message: "training diverged at step 3: the loss is NaN".into(),
        }];
        let report = build_report(plan(&[1, 2], 1), runs, failures);
        assert_eq!(report.verdict.outcome, Outcome::Inconclusive);
        assert_eq!(report.verdict.seeds_compared, 0);
        let md = report.to_markdown();
        assert!(
            md.contains("- threads 2, seed 0 (exit status 1): training diverged at step 3"),
            "{md}"
        );
        // The baseline of seed 0 finished: its own speed-up is 1.
        assert_eq!(report.runs[0].speedup, Some(1.0));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["verdict"]["outcome"], "inconclusive");
        assert_eq!(json["runs"][0]["threads"], 1);
        assert_eq!(json["failures"][0]["seed"], 0);
    }

    /// A language model's run: validation loss `loss` (its test loss too), `tokens` tokens/s.
    fn lm_run(threads: usize, seed: u64, loss: f64, speed: (f64, f64), hash: &str) -> RunRecord {
        RunRecord {
            test_accuracy: 0.42,
            test_loss: loss,
            val_loss: Some(loss),
            tokens_per_second: Some(speed.1),
            ..run(threads, seed, 0.42, speed.0, hash)
        }
    }

    #[test]
    fn a_language_models_report_speaks_of_validation_loss() {
        // Seed 0 moves by 0.0040 across thread counts; the seeds differ by 0.0500.
        let runs = vec![
            lm_run(1, 0, 1.9300, (100.0, 1600.0), "aaaa"),
            lm_run(2, 0, 1.9340, (180.0, 2880.0), "aaax"),
            lm_run(1, 1, 1.9800, (100.0, 1600.0), "bbbb"),
            lm_run(2, 1, 1.9800, (200.0, 3200.0), "bbbb"),
        ];
        let report = build_report(plan(&[1, 2], 2), runs, vec![]);
        assert_eq!(report.metric, Metric::ValLoss);
        let v = &report.verdict;
        assert_eq!(v.outcome, Outcome::Different);
        assert!((v.accuracy_spread_across_threads.unwrap() - 0.004).abs() < 1e-12);
        assert!((v.accuracy_spread_across_seeds.unwrap() - 0.05).abs() < 1e-12);
        assert_eq!(v.within_seed_spread, Some(true));
        assert!(
            v.line.contains(
                "; the validation loss spread across thread counts, 0.0040 (max over seeds of \
                 max-min), is within the spread across seeds, 0.0500 (max over thread counts of \
                 max-min)"
            ),
            "{}",
            v.line
        );

        let t = &report.by_threads[1];
        assert!((t.mean - 1.957).abs() < 1e-12, "{}", t.mean);
        assert_eq!((t.min, t.max), (1.934, 1.98));
        assert_eq!(t.mean_samples_per_second, 190.0);
        assert_eq!(t.mean_tokens_per_second, Some(3040.0));

        let md = report.to_markdown();
        for text in [
            "| threads | seed | validation loss | final train loss | samples/s | tokens/s | \
             speed-up | parallel efficiency | CPU utilisation | weights (SHA-256) |\n\
             |--:|--:|--:|--:|--:|--:|--:|--:|--:|:--|\n",
            "| 2 | 0 | 1.9340 | 0.4000 | 180 | 2,880 | 1.80x | 90% | 90% | `aaax` |\n",
            "| threads | runs | mean validation loss | validation loss min-max | mean samples/s | \
             mean tokens/s | mean speed-up | mean efficiency |\n",
            "| 2 | 2 | 1.9570 | 1.9340 - 1.9800 | 190 | 3,040 | 1.90x | 95% |\n",
            "- Validation loss spread across thread counts (max over seeds of max-min): 0.0040.",
            "- Validation loss spread across seeds (max over thread counts of max-min): 0.0500.",
            "in nats per character: lower is better.",
            "![validation loss against threads](val_loss.svg)",
            "![throughput and parallel efficiency against threads](throughput.svg)",
        ] {
            assert!(md.contains(text), "report.md lacks {text:?}:\n{md}");
        }
        assert!(!md.to_lowercase().contains("accuracy"), "{md}");

        let csv = report.to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "threads,seed,val_loss,test_accuracy,test_loss,train_loss,samples_per_second,\
             tokens_per_second,speedup,efficiency,cpu_utilization,wall_seconds,train_seconds,\
             weights_sha256,max_weight_diff,run_dir"
        );
        assert!(
            lines[2].starts_with("2,0,1.934,0.42,1.934,0.4,180,2880,1.8,0.9,0.9,"),
            "{csv}"
        );

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["metric"], "val_loss");
        assert_eq!(json["verdict"]["val_loss_spread_across_seeds"], 1.98 - 1.93);
        assert_eq!(
            json["verdict"]["val_loss_spread_across_threads"],
            1.934 - 1.93
        );
        assert!(
            json["verdict"]
                .get("accuracy_spread_across_threads")
                .is_none()
        );
        assert_eq!(json["by_threads"][1]["min_val_loss"], 1.934);
        assert_eq!(json["by_threads"][1]["mean_tokens_per_second"], 3040.0);
        assert!(json["by_threads"][1].get("mean_accuracy").is_none());
        assert_eq!(json["runs"][1]["val_loss"], 1.934);
        assert_eq!(json["runs"][1]["tokens_per_second"], 2880.0);
    }

    /// A classifier's JSON has the names it always had, and nothing of a language model's.
    #[test]
    fn a_classifiers_json_keeps_its_names() {
        let runs = vec![
            run(1, 0, 0.90, 1000.0, "aaaa"),
            run(2, 0, 0.91, 1800.0, "aaax"),
        ];
        let report = build_report(plan(&[1, 2], 1), runs, vec![]);
        assert_eq!(report.metric, Metric::Accuracy);
        let json = serde_json::to_value(&report).unwrap();
        assert!(json.get("metric").is_none(), "{json}");
        // The names and their order of the derived serialization this one replaced.
        assert_eq!(
            serde_json::to_string(&report.by_threads[0]).unwrap(),
            "{\"threads\":1,\"runs\":1,\"mean_accuracy\":0.9,\"min_accuracy\":0.9,\
             \"max_accuracy\":0.9,\"mean_samples_per_second\":1000.0,\"mean_speedup\":1.0,\
             \"mean_efficiency\":1.0}"
        );
        assert_eq!(json["by_threads"][1]["mean_accuracy"], 0.91);
        assert!(
            (json["verdict"]["accuracy_spread_across_threads"]
                .as_f64()
                .unwrap()
                - 0.01)
                .abs()
                < 1e-12
        );
        assert_eq!(
            json["verdict"]["accuracy_spread_across_seeds"],
            serde_json::Value::Null
        );
        assert!(json["runs"][0].get("val_loss").is_none());
        assert!(json["runs"][0].get("tokens_per_second").is_none());
    }

    /// A language model's sweep without a finished run still speaks of validation loss: its
    /// metric comes from the config.
    #[test]
    fn a_language_models_report_without_runs_names_its_metric() {
        let failures = vec![RunFailure {
            threads: 1,
            seed: 0,
            exit_status: Some(1),
            message: "training diverged at step 3: the loss is NaN".into(),
        }];
        let report = build_report_on(Metric::ValLoss, plan(&[1], 1), vec![], failures);
        assert_eq!(report.verdict.outcome, Outcome::Inconclusive);
        let md = report.to_markdown();
        assert!(md.contains("| threads | seed | validation loss |"), "{md}");
        assert!(
            md.contains(
                "- Validation loss spread across thread counts (max over seeds of max-min): -."
            ),
            "{md}"
        );
        assert!(!md.contains("val_loss.svg"), "{md}");
        assert_eq!(serde_json::to_value(&report).unwrap()["metric"], "val_loss");
    }
}
