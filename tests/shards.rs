//! End to end: parallel micro-batches. The pieces of a step (micro-batches x shards) run at
//! once or one after the other, on any number of threads: the same weights every time.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn config(dir: &Path) -> PathBuf {
    write(
        dir,
        "digits.toml",
        format!(
            "{}\n[model]\nhidden = [32]\n[training]\nmax_steps = 30\nbatch_size = 30\n\
             accumulation_steps = 2\nshards = 3\n[checkpoint]\nevery_epochs = 0\n",
            digits_data()
        ),
    )
}

fn hash(summary: &serde_json::Value) -> &str {
    summary["weights_sha256"].as_str().unwrap()
}

#[test]
fn shards_give_the_same_weights_at_any_thread_count_and_either_execution() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    for backend in ["ndarray", "flex"] {
        let mut hashes = Vec::new();
        for (threads, execution) in [(1, "sequential"), (2, "sequential"), (2, "concurrent")] {
            let run = dir.path().join(format!("{backend}-{threads}-{execution}"));
            let summary = train_json(
                &config,
                &run,
                &[
                    &format!("training.backend={backend}"),
                    &format!("training.threads={threads}"),
                    &format!("training.execution={execution}"),
                ],
            );
            assert_eq!(summary["execution"], execution);
            assert_eq!(summary["shards"], 3);
            hashes.push(hash(&summary).to_string());
        }
        assert!(
            hashes.iter().all(|h| *h == hashes[0]),
            "{backend}: {hashes:?}"
        );

        // The split is part of the result: one shard rounds differently.
        let unsharded = train_json(
            &config,
            &dir.path().join(format!("{backend}-unsharded")),
            &[&format!("training.backend={backend}"), "training.shards=1"],
        );
        assert_ne!(hash(&unsharded), hashes[0], "{backend}");
    }
}

#[test]
fn auto_threads_calibrate_say_what_they_chose_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let fixed = train_json(&config, &dir.path().join("fixed"), &["training.threads=1"]);
    let run = dir.path().join("auto");
    let output = allcores(&train_command(
        &config,
        &run,
        &["--json"],
        &["training.threads=auto"],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(
        log.contains("threads = \"auto\": calibrated in") && log.contains("; chose "),
        "{log}"
    );
    let auto = last_json(&output);
    let available = auto["threads_available"].as_u64().unwrap();
    let chosen = auto["threads"].as_u64().unwrap();
    assert!((1..=available).contains(&chosen), "{auto}");
    assert_eq!(hash(&auto), hash(&fixed));
}

#[test]
fn auto_threads_time_part_of_a_step_of_many_micro_batches() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let sets = [
        "training.batch_size=8",
        "training.accumulation_steps=40",
        "training.shards=1",
        "training.max_steps=3",
    ];
    let fixed = train_json(
        &config,
        &dir.path().join("fixed"),
        &[&sets[..], &["training.threads=1"]].concat(),
    );
    let run = dir.path().join("auto");
    let mut args = vec!["train", config.to_str().unwrap(), "--out"];
    args.extend([run.to_str().unwrap(), "--json"]);
    for set in sets.iter().chain(&["training.threads=auto"]) {
        args.extend(["--set", set]);
    }
    let output = allcores(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let auto = last_json(&output);
    // Two pieces for each thread the machine offers, out of the step's 40.
    let available = auto["threads_available"].as_u64().unwrap();
    let timed = (2 * available).min(40);
    let line = if timed < 40 {
        format!("threads = \"auto\": calibrated on {timed} of a step's 40 micro-batches in ")
    } else {
        "threads = \"auto\": calibrated in ".to_string()
    };
    assert!(stderr(&output).contains(&line), "{}", stderr(&output));
    assert_eq!(hash(&auto), hash(&fixed));
}
