//! End to end: every command-line error is one line starting `error: `, with exit status 2;
//! help and the version still print in full, with exit status 0.

mod common;

use common::*;

/// Runs `allcores args` (colours forced on, which the one line must not carry) and checks the
/// refusal; returns the error line.
fn refused(args: &[&str], expected: &str) -> String {
    let output = allcores_env(args, &[("CLICOLOR_FORCE", "1")]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert!(!err.contains('\u{1b}'), "{args:?}: styles in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end(), expected, "{args:?}");
    assert!(stdout(&output).is_empty(), "{args:?}");
    err
}

#[test]
fn argument_errors_take_one_line() {
    refused(
        &["train", "c.toml", "--foo"],
        "error: unexpected argument '--foo' found",
    );
    refused(
        &["train"],
        "error: the following required arguments were not provided: <CONFIG>",
    );
    refused(
        &["sweep"],
        "error: the following required arguments were not provided: --threads <LIST>, <CONFIG>",
    );
    refused(
        &["frobnicate"],
        "error: unrecognized subcommand 'frobnicate'",
    );
    refused(
        &["train", "c.toml", "--resume"],
        "error: the following required arguments were not provided: --out <RUN_DIR>",
    );
    refused(
        &["train", "c.toml", "--out"],
        "error: a value is required for '--out <RUN_DIR>' but none was supplied",
    );
    refused(
        &["train", "c.toml", "--no-save", "--out", "run"],
        "error: the argument '--no-save' cannot be used with '--out <RUN_DIR>'",
    );
}

#[test]
fn bad_seed_counts_take_one_line() {
    let sweep = |seeds: &'static str| ["sweep", "c.toml", "--threads", "1,2", "--seeds", seeds];
    refused(
        &sweep("abc"),
        "error: --seeds: \"abc\" is not a number of seeds (a whole number, 1 to \
         9223372036854775808)",
    );
    refused(
        &sweep("-1"),
        "error: --seeds: \"-1\" is not a number of seeds (a whole number, 1 to \
         9223372036854775808)",
    );
    refused(&sweep("0"), "error: --seeds: must be at least 1");
    // Past the last seed a run takes (a u64 or not).
    let past = |value: &str| {
        format!(
            "error: --seeds: {value} is past the limit of 9223372036854775808 seeds (the seeds \
             run from 0 to N - 1, and a run's training.seed stops at 9223372036854775807)"
        )
    };
    refused(&sweep("9223372036854775809"), &past("9223372036854775809"));
    refused(
        &sweep("18446744073709551615"),
        &past("18446744073709551615"),
    );
    refused(
        &sweep("123456789012345678901234567890"),
        &past("123456789012345678901234567890"),
    );
    // At the limit, the run count of two thread counts overflows: it once wrapped to "0 runs".
    refused(
        &sweep("9223372036854775808"),
        "error: --seeds: 9223372036854775808 seeds x 2 thread counts is 18446744073709551616 \
         runs, past the 18446744073709551615 a sweep can count",
    );
}

#[test]
fn help_and_version_print_in_full() {
    let help = allcores(&["train", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = stdout(&help);
    assert!(text.contains("Usage: allcores train"), "{text}");
    assert!(text.contains("--resume"), "{text}");
    assert!(stderr(&help).is_empty());

    let version = allcores(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert_eq!(
        stdout(&version).trim(),
        format!("allcores {}", env!("CARGO_PKG_VERSION"))
    );

    // No command at all: the help, as clap shows it, with the status of a usage error.
    let bare = allcores(&[]);
    assert_eq!(bare.status.code(), Some(2));
    let text = stderr(&bare);
    assert!(text.contains("Usage: allcores <COMMAND>"), "{text}");
    assert!(text.contains("sweep"), "{text}");
}
