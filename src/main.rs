//! `allcores`: the command line over the allcores libraries.
//!
//! Exit status: 0 on success, 2 for bad input (config, data, arguments), 1 when a run fails,
//! 128 + the signal's number when Ctrl-C, SIGTERM or SIGHUP stopped a run (after a checkpoint)
//! or a sweep (after its report).

// The arguments' doc comments are clap's help texts, written for a terminal (`<config name>`),
// not for rustdoc.
#![allow(rustdoc::invalid_html_tags)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use allcores_eval::{Interrupt, evaluate_run};
use allcores_trainer::language::sample::{SampleOptions, sample};
use allcores_trainer::{
    Layers, Options, Settings, Summary, default_run_dir, number, thousands, train,
};
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "allcores",
    version,
    about = "Train small models on every core of a CPU."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the model a config file describes.
    Train(TrainArgs),
    /// Score a trained run's model on the test split of its config.
    Eval(EvalArgs),
    /// Train a config at several thread counts and seeds (one process a run) and report
    /// whether the thread count changed the result or only the speed.
    Sweep(SweepArgs),
    /// Measure steady-state training throughput at several thread counts (one process
    /// each): samples/s, step-time spread, CPU use, peak memory, speed-up.
    Bench(BenchArgs),
    /// Write text from a trained language model (a GPT run) to stdout.
    Sample(SampleArgs),
    /// Predict the classes of new rows (CSV) or images (IDX) with a trained classifier.
    Predict(PredictArgs),
}

#[derive(Args)]
struct PredictArgs {
    /// The run folder of a finished classifier run.
    run_dir: PathBuf,
    /// The samples: a CSV file with the run's columns (any order; the label column may be
    /// absent), or an IDX image file for a run on images.
    input: PathBuf,
    /// Write the predictions (CSV) to this file instead of stdout.
    #[arg(long, value_name = "PREDICTIONS.csv")]
    out: Option<PathBuf>,
    /// Print the predictions as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SampleArgs {
    /// The run folder of a finished GPT run.
    run_dir: PathBuf,
    /// The text to continue (cropped to the model's context) [default: a newline].
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens (characters) to write after the prompt.
    #[arg(long, default_value_t = 500)]
    tokens: usize,
    /// Divides the logits: below 1 more likely text, above 1 more varied.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    temperature: f64,
    /// Draw among the K likeliest tokens only.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// The seed of the draws: the same seed writes the same text.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
}

#[derive(Args)]
struct TrainArgs {
    /// The TOML config file.
    config: PathBuf,
    /// Override a setting, e.g. --set training.threads=2 (repeatable, applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// The run folder [default: runs/<config name>-<unix time>].
    #[arg(long, value_name = "RUN_DIR")]
    out: Option<PathBuf>,
    /// Continue the run in --out from its newest valid checkpoint (afresh if it has none).
    #[arg(long, requires = "out")]
    resume: bool,
    /// No progress bar, no log lines.
    #[arg(long)]
    quiet: bool,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Write no run folder (no checkpoints, no weights file): for `allcores bench`.
    #[arg(long, hide = true, conflicts_with_all = ["out", "resume"])]
    no_save: bool,
    /// Record each optimizer step's wall and CPU seconds in the summary (`step_times`):
    /// for `allcores bench`.
    #[arg(long, hide = true)]
    record_steps: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// The run folder written by `allcores train`.
    run_dir: PathBuf,
    /// Override a setting of the run's config, e.g. to name another test set.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print the evaluation as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SweepArgs {
    /// The TOML config file.
    config: PathBuf,
    /// Thread counts to compare, comma-separated, e.g. 1,2,4.
    #[arg(long, value_name = "LIST", allow_hyphen_values = true)]
    threads: String,
    /// Train each thread count with seeds 0..N.
    #[arg(
        long,
        value_name = "N",
        default_value = "1",
        allow_hyphen_values = true
    )]
    seeds: String,
    /// Override a setting of every run, e.g. --set training.epochs=2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// The sweep folder [default: sweeps/<config name>-<unix time>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print the report as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// The TOML config file.
    config: PathBuf,
    /// Thread counts to measure, comma-separated, e.g. 1,2,4.
    #[arg(long, value_name = "LIST", allow_hyphen_values = true)]
    threads: String,
    /// Timed steps per thread count (1 or more; warm-up + steps at most 100,000).
    #[arg(long, value_name = "N", default_value_t = allcores_eval::bench::DEFAULT_STEPS.to_string(), allow_hyphen_values = true)]
    steps: String,
    /// Steps run before the timed ones, not timed (0 or more).
    #[arg(long, value_name = "W", default_value_t = allcores_eval::bench::DEFAULT_WARMUP.to_string(), allow_hyphen_values = true)]
    warmup: String,
    /// Override a setting of every run, e.g. --set training.batch_size=128 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// After each thread count n > 1, also run n one-thread runs at once: the efficiency
    /// this machine gives independent work, a ceiling for the runs' (needs 1 among the counts in
    /// --threads).
    #[arg(long)]
    ceiling: bool,
    /// Rounds over the thread counts (1 to 100); each thread count is reported by its
    /// median run, so that a burst of load on a shared machine spoils no figure.
    #[arg(
        long,
        value_name = "R",
        default_value = "1",
        allow_hyphen_values = true
    )]
    repeat: String,
    /// Print the report as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// A failure to show the user: one line, and whether the input was at fault.
struct Failure {
    message: String,
    bad_input: bool,
    /// Stopped by a signal after saving a checkpoint (a run) or its report (a sweep): exit
    /// status 128 + the signal's number, as shells expect.
    interrupted: bool,
}

impl From<allcores_trainer::Error> for Failure {
    fn from(e: allcores_trainer::Error) -> Self {
        Failure {
            interrupted: matches!(e, allcores_trainer::Error::Interrupted { .. }),
            bad_input: e.is_bad_input(),
            message: e.to_string(),
        }
    }
}

impl From<allcores_eval::EvalError> for Failure {
    fn from(e: allcores_eval::EvalError) -> Self {
        use allcores_eval::EvalError;
        Failure {
            interrupted: matches!(
                e,
                EvalError::Interrupted { .. }
                    | EvalError::Trainer(allcores_trainer::Error::Interrupted { .. })
            ),
            bad_input: e.is_bad_input(),
            message: e.to_string(),
        }
    }
}

/// Writes a line to stdout. A reader that went away (`allcores eval RUN | head -1`) is no
/// failure of the command: the write error is dropped, where `println!` would panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return argument_error(&e),
    };
    if let Command::Train(args) = &cli.command {
        // A config that does not load is reported by the command itself, below.
        if let Ok(settings) = Settings::load(&args.config, &layers(args.overrides.clone())) {
            // SAFETY: no thread has started yet: the signal handlers start below.
            unsafe { allcores_trainer::threads::limit_matmul_threads(settings.training.threads) };
        }
    }
    // Only the commands that can stop at a safe point catch the signals; the others end at once,
    // as by default.
    let interrupt = match &cli.command {
        Command::Train(_) => Some(Interrupt::catch(
            "saving a checkpoint at the end of this step",
        )),
        Command::Sweep(_) => Some(Interrupt::catch(
            "the run in progress saves a checkpoint and stops, then the sweep writes the report \
             of the runs that ended",
        )),
        Command::Eval(_) | Command::Bench(_) | Command::Sample(_) | Command::Predict(_) => None,
    };
    match run(cli.command, interrupt.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // After SIGHUP the terminal may be gone: the status must still come out, no panic.
            let _ = writeln!(std::io::stderr().lock(), "error: {}", failure.message);
            ExitCode::from(match (failure.interrupted, failure.bad_input) {
                (true, _) => interrupt.map_or(130, |i| i.exit_status()),
                (false, true) => 2,
                (false, false) => 1,
            })
        }
    }
}

/// Prints a command-line error as one line, `error: <clap's message>`, and returns exit status
/// 2; help and the version print as clap writes them.
fn argument_error(e: &clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
        _ => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: {}",
                one_line(&e.render().to_string())
            );
            ExitCode::from(2)
        }
    }
}

/// clap's error text (plain, its styles dropped by `to_string`) as one line: its message lines
/// without the `error: ` label, the tips, the usage and the pointer to `--help`. Lines listed
/// under a line that ends with `:` follow it after a space, separated by commas; other lines
/// are joined with "; ".
fn one_line(text: &str) -> String {
    let mut line = String::new();
    let mut listing = false;
    for part in text.lines().map(str::trim) {
        if part.starts_with("Usage:") || part.starts_with("For more information") {
            break;
        }
        if part.is_empty() || part.starts_with("tip:") {
            continue;
        }
        let part = part.strip_prefix("error:").map_or(part, str::trim_start);
        if line.is_empty() {
            line.push_str(part);
        } else if line.ends_with(':') {
            line.push(' ');
            line.push_str(part);
            listing = true;
            continue;
        } else if listing {
            line.push_str(", ");
            line.push_str(part);
            continue;
        } else {
            line.push_str("; ");
            line.push_str(part);
        }
        listing = false;
    }
    line
}

fn run(command: Command, interrupt: Option<&Arc<Interrupt>>) -> Result<(), Failure> {
    match command {
        Command::Train(args) => train_command(args, interrupt),
        Command::Eval(args) => eval_command(args),
        Command::Sweep(args) => sweep_command(args, interrupt),
        Command::Bench(args) => bench_command(args),
        Command::Sample(args) => sample_command(args),
        Command::Predict(args) => predict_command(args),
    }
}

fn train_command(args: TrainArgs, interrupt: Option<&Arc<Interrupt>>) -> Result<(), Failure> {
    let settings = Settings::load(&args.config, &layers(args.overrides))?;
    let numbered_run_dir = args.out.is_none();
    let run_dir =
        (!args.no_save).then(|| args.out.unwrap_or_else(|| default_run_dir(&args.config)));
    let options = Options {
        quiet: args.quiet,
        run_dir,
        resume: args.resume,
        numbered_run_dir,
        stop: interrupt.map(|i| i.stop_flag()),
        record_steps: args.record_steps,
    };
    let summary = train(&settings, options)?;
    print_summary(&summary, args.json);
    Ok(())
}

fn eval_command(args: EvalArgs) -> Result<(), Failure> {
    let evaluation = evaluate_run(&args.run_dir, &layers(args.overrides))?;
    if args.json {
        out!(
            "{}",
            serde_json::to_string(&evaluation).expect("serializes")
        );
    } else {
        out!("{}", evaluation.to_text());
    }
    Ok(())
}

fn sweep_command(args: SweepArgs, interrupt: Option<&Arc<Interrupt>>) -> Result<(), Failure> {
    let outcome = allcores_eval::run_sweep(&allcores_eval::SweepRequest {
        config: args.config,
        threads: args.threads,
        seeds: allcores_eval::parse_seeds(&args.seeds)?,
        overrides: args.overrides,
        out: args.out,
        program: None,
        interrupt: interrupt.cloned(),
    })?;
    if args.json {
        out!("{}", outcome.report.verdict.line);
        out!("{}", outcome.to_json());
    } else {
        out!("{}", outcome.to_text());
    }
    Ok(outcome.status()?)
}

fn bench_command(args: BenchArgs) -> Result<(), Failure> {
    use allcores_eval::bench::{parse_count, parse_rounds};
    let report = allcores_eval::run_bench(&allcores_eval::BenchRequest {
        config: args.config,
        threads: args.threads,
        steps: parse_count("--steps", &args.steps)?,
        warmup: parse_count("--warmup", &args.warmup)?,
        overrides: args.overrides,
        program: None,
        ceiling: args.ceiling,
        repeat: parse_rounds(&args.repeat)?,
    })?;
    if args.json {
        out!("{}", report.to_json());
    } else {
        out!("{}", report.to_text());
    }
    Ok(())
}

fn sample_command(args: SampleArgs) -> Result<(), Failure> {
    let options = SampleOptions {
        prompt: args.prompt,
        tokens: args.tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let stdout = std::io::stdout();
    sample(
        &args.run_dir,
        &Layers::default(),
        &options,
        &mut stdout.lock(),
    )?;
    Ok(())
}

/// The predictions go to `--out` or, without it, to stdout (the summary to stderr, so that
/// stdout holds the CSV alone); `--json` prints them as JSON instead.
fn predict_command(args: PredictArgs) -> Result<(), Failure> {
    let predictions = allcores_eval::predict(&args.run_dir, &args.input)?;
    if let Some(path) = &args.out {
        let mut csv = Vec::new();
        predictions
            .write_csv(&mut csv)
            .expect("writing to memory succeeds");
        allcores_trainer::files::write_atomically(path, &csv)?;
    }
    if args.json {
        out!(
            "{}",
            serde_json::to_string(&predictions).expect("serializes")
        );
    } else if let Some(path) = &args.out {
        out!("{} · written to {}", predictions.summary(), path.display());
    } else {
        // A reader that went away is no failure: see `out!`.
        let _ = predictions.write_csv(std::io::stdout().lock());
        let _ = writeln!(std::io::stderr().lock(), "{}", predictions.summary());
    }
    Ok(())
}

fn layers(overrides: Vec<String>) -> Layers {
    Layers {
        overrides,
        environment: None,
    }
}

/// `n` things, digits grouped: "1 epoch", "70,000 samples".
fn counted(n: u64, thing: &str) -> String {
    let plural = if n == 1 { "" } else { "s" };
    format!("{} {thing}{plural}", thousands(n as f64))
}

fn print_summary(summary: &Summary, json: bool) {
    if json {
        out!("{}", serde_json::to_string(summary).expect("serializes"));
        return;
    }
    match (
        summary.val_loss,
        summary.bits_per_char,
        summary.tokens_per_second,
    ) {
        (Some(val_loss), Some(bits), Some(tokens_per_second)) => {
            out!(
                "val loss {val_loss:.4} ({bits:.3} bits/char) · train loss {:.4} · next-char \
                 accuracy {:.2}% · {} tokens/s",
                summary.train_loss,
                summary.test_accuracy * 100.0,
                thousands(tokens_per_second)
            );
        }
        _ => out!(
            "test accuracy {:.2}% · test loss {:.4} · train loss {:.4}",
            summary.test_accuracy * 100.0,
            summary.test_loss,
            summary.train_loss
        ),
    }
    out!(
        "{} · {} · {} in {:.1} s of training ({} samples/s) · {}, CPU {:.0}% busy · peak RSS {} MiB",
        counted(summary.epochs, "epoch"),
        counted(summary.steps, "step"),
        counted(summary.samples, "sample"),
        summary.train_seconds,
        thousands(summary.samples_per_second),
        counted(summary.threads as u64, "thread"),
        summary.cpu_utilization * 100.0,
        summary.peak_rss_bytes >> 20
    );
    if let Some(scale) = summary.loss_scale {
        out!(
            "loss scaling: {} of {} skipped (inf or NaN gradients) · loss scale {} at the end",
            thousands(summary.skipped_steps as f64),
            counted(summary.steps, "step"),
            number(scale)
        );
    }
    out!("weights_sha256 {}", summary.weights_sha256);
    if let Some(dir) = &summary.run_dir {
        out!("run folder {dir}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_come_down_to_their_message() {
        let cases = [
            (
                "error: unexpected argument '--foo' found\n\n  tip: to pass '--foo' as a value, \
                 use '-- --foo'\n\nUsage: allcores train [OPTIONS] <CONFIG>\n\nFor more \
                 information, try '--help'.\n",
                "unexpected argument '--foo' found",
            ),
            (
                "error: the following required arguments were not provided:\n  <CONFIG>\n  \
                 --threads <LIST>\n\nUsage: allcores sweep --threads <LIST> <CONFIG>\n\nFor \
                 more information, try '--help'.\n",
                "the following required arguments were not provided: <CONFIG>, --threads <LIST>",
            ),
            (
                "error: first\nsecond\n\nFor more information, try '--help'.\n",
                "first; second",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(one_line(text), expected);
        }
    }
}
