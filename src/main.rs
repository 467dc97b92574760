//! `allcores`: the command line over the allcores libraries.
//!
//! Exit status: 0 on success, 2 for bad input (config, data, arguments), 1 when a run fails.

use std::path::PathBuf;
use std::process::ExitCode;

use allcores_eval::evaluate_run;
use allcores_trainer::{Layers, Options, Settings, Summary, default_run_dir, train};
use clap::{Parser, Subcommand};

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
    Train {
        /// The TOML config file.
        config: PathBuf,
        /// Override a setting, e.g. --set training.threads=2 (repeatable, applied last).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// The run folder [default: runs/<config name>-<unix time>].
        #[arg(long, value_name = "RUN_DIR")]
        out: Option<PathBuf>,
        /// No progress bar, no log lines.
        #[arg(long)]
        quiet: bool,
        /// Print the summary as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Score a trained run's model on the test split of its config.
    Eval {
        /// The run folder written by `allcores train`.
        run_dir: PathBuf,
        /// Override a setting of the run's config, e.g. to name another test set.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Print the evaluation as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
}

/// A failure to show the user: one line, and whether the input was at fault.
struct Failure {
    message: String,
    bad_input: bool,
}

impl From<allcores_trainer::Error> for Failure {
    fn from(e: allcores_trainer::Error) -> Self {
        Failure {
            bad_input: e.is_bad_input(),
            message: e.to_string(),
        }
    }
}

impl From<allcores_eval::EvalError> for Failure {
    fn from(e: allcores_eval::EvalError) -> Self {
        Failure {
            bad_input: e.is_bad_input(),
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(if failure.bad_input { 2 } else { 1 })
        }
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Train {
            config,
            overrides,
            out,
            quiet,
            json,
        } => {
            let settings = Settings::load(&config, &layers(overrides))?;
            let run_dir = out.unwrap_or_else(|| default_run_dir(&config));
            let options = Options {
                quiet,
                run_dir: Some(run_dir),
            };
            let summary = train(&settings, options)?;
            print_summary(&summary, json);
        }
        Command::Eval {
            run_dir,
            overrides,
            json,
        } => {
            let evaluation = evaluate_run(&run_dir, &layers(overrides))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&evaluation).expect("serializes")
                );
            } else {
                println!("{}", evaluation.to_text());
            }
        }
    }
    Ok(())
}

fn layers(overrides: Vec<String>) -> Layers {
    Layers {
        overrides,
        environment: None,
    }
}

fn print_summary(summary: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(summary).expect("serializes"));
        return;
    }
    println!(
        "test accuracy {:.2}% · test loss {:.4} · train loss {:.4}",
        summary.test_accuracy * 100.0,
        summary.test_loss,
        summary.train_loss
    );
    println!(
        "{} epochs · {} steps · {} samples in {:.1} s ({:.0} samples/s) · {} threads, CPU {:.0}% \
         busy · peak RSS {} MiB",
        summary.epochs,
        summary.steps,
        summary.samples,
        summary.wall_seconds,
        summary.samples_per_second,
        summary.threads,
        summary.cpu_utilization * 100.0,
        summary.peak_rss_bytes >> 20
    );
    println!("weights_sha256 {}", summary.weights_sha256);
    if let Some(dir) = &summary.run_dir {
        println!("run folder {dir}");
    }
}
