//! End to end: a CSV as people have it (a header, the label first as text, a column to leave
//! out, features on scales a million apart) trains, evaluates with class names and predicts,
//! the same at every thread count; and every bad table or prediction input is refused on one
//! line, exit status 2.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CLASSES: [&str; 3] = ["alpha", "beta", "gamma"];

/// `rows` seeded rows: `kind,id,big,small,mid`. The class is the largest of the three features
/// once each is brought to one scale (big is in thousands, small in thousandths), so a model
/// learns it only well where it sees them on one scale.
fn table_rows(rows: usize, seed: u64) -> Vec<[String; 5]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows)
        .map(|i| {
            let unit: [f64; 3] = std::array::from_fn(|_| rng.random_range(0.0..1.0));
            let class = (0..3).max_by(|&a, &b| unit[a].total_cmp(&unit[b])).unwrap();
            [
                CLASSES[class].to_string(),
                format!("{}", 1000 + i),
                format!("{:.2}", unit[0] * 4000.0 + 1000.0),
                format!("{:.6}", unit[1] * 0.004),
                format!("{:.4}", unit[2] * 3.0 - 1.0),
            ]
        })
        .collect()
}

fn csv_text(header: &[&str], rows: &[[String; 5]], columns: &[usize]) -> String {
    let mut text = columns
        .iter()
        .map(|&c| header[c])
        .collect::<Vec<_>>()
        .join(",");
    text.push('\n');
    for row in rows {
        let cells: Vec<&str> = columns.iter().map(|&c| row[c].as_str()).collect();
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    text
}

const HEADER: [&str; 5] = ["kind", "id", "big", "small", "mid"];
const ALL: [usize; 5] = [0, 1, 2, 3, 4];

/// A training file of 300 rows and a test file of 100, and a config that names the label and
/// the column to leave out, and standardizes.
fn table_config(dir: &Path) -> PathBuf {
    write(
        dir,
        "train.csv",
        csv_text(&HEADER, &table_rows(300, 1), &ALL),
    );
    write(
        dir,
        "test.csv",
        csv_text(&HEADER, &table_rows(100, 2), &ALL),
    );
    write(
        dir,
        "table.toml",
        "[data]\nformat = \"csv\"\ntrain_csv = \"train.csv\"\ntest_csv = \"test.csv\"\n\
         label = \"kind\"\nignore = [\"id\"]\nnormalize = \"standard\"\n\n\
         [model]\nhidden = [16]\n\n[optimizer]\nkind = \"adam\"\nlr = 0.01\n\n\
         [training]\nepochs = 8\nbatch_size = 16\nseed = 3\nthreads = 1\n",
    )
}

fn predict(run: &Path, input: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["predict", run.to_str().unwrap(), input.to_str().unwrap()];
    args.extend(extra);
    allcores(&args)
}

/// The `predicted` column of a predictions CSV.
fn predicted(csv: &str) -> Vec<String> {
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let column = header.iter().position(|&h| h == "predicted").unwrap();
    csv.lines()
        .skip(1)
        .map(|line| line.split(',').nth(column).unwrap().to_string())
        .collect()
}

#[test]
fn a_table_with_text_labels_trains_evaluates_and_predicts_the_same_at_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = table_config(dir.path());
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let a = train_json(&config, &one, &["training.threads=1"]);
    let b = train_json(&config, &two, &["training.threads=2"]);
    assert_eq!(a["weights_sha256"], b["weights_sha256"]);
    let accuracy = a["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.85, "test accuracy {accuracy}");

    // The table: the features in order, the classes by name, the training rows' statistics.
    let table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.join("table.json")).unwrap()).unwrap();
    assert_eq!(
        table["features"],
        serde_json::json!(["big", "small", "mid"])
    );
    assert_eq!(table["classes"]["names"], serde_json::json!(CLASSES));
    let big: Vec<f64> = table_rows(300, 1)
        .iter()
        .map(|r| r[2].parse().unwrap())
        .collect();
    let mean = big.iter().sum::<f64>() / big.len() as f64;
    let shift = table["scaling"]["shift"][0].as_f64().unwrap();
    assert!((shift - mean).abs() < 1e-3 * mean, "{shift} vs {mean}");

    // eval names the classes, and scores as the run did.
    let eval = allcores(&["eval", one.to_str().unwrap(), "--json"]);
    assert!(eval.status.success(), "{}", stderr(&eval));
    let scored = last_json(&eval);
    assert_eq!(scored["test_accuracy"], a["test_accuracy"]);
    assert_eq!(scored["class_names"], serde_json::json!(CLASSES));
    let text = stdout(&allcores(&["eval", one.to_str().unwrap()]));
    for class in CLASSES {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(class)),
            "{text}"
        );
    }

    // predict: the eval's accuracy, and the same bytes from the run at 1 thread and at 2.
    let test = dir.path().join("test.csv");
    let (p1, p2) = (dir.path().join("p1.csv"), dir.path().join("p2.csv"));
    let out = predict(&one, &test, &["--out", p1.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("100 predictions · accuracy"),
        "{}",
        stdout(&out)
    );
    assert!(
        predict(&two, &test, &["--out", p2.to_str().unwrap()])
            .status
            .success()
    );
    let csv = std::fs::read_to_string(&p1).unwrap();
    assert_eq!(csv, std::fs::read_to_string(&p2).unwrap());
    assert!(
        csv.starts_with("row,label,predicted,probability,p_alpha,p_beta,p_gamma\n"),
        "{csv}"
    );
    let json = last_json(&predict(&one, &test, &["--json"]));
    assert_eq!(json["accuracy"], scored["test_accuracy"]);
    assert_eq!(json["predictions"].as_array().unwrap().len(), 100);

    // The columns in another order, without the label: the same predictions, no accuracy.
    let shuffled = write(
        dir.path(),
        "shuffled.csv",
        csv_text(&HEADER, &table_rows(100, 2), &[4, 2, 1, 3]),
    );
    let out = predict(&one, &shuffled, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(predicted(&stdout(&out)), predicted(&csv));
    assert!(stdout(&out).starts_with("row,predicted,probability,"));
    assert!(stderr(&out).contains("holds no labels"), "{}", stderr(&out));
}

/// A header found by itself, the label by number, minmax scaling, and a split of one file:
/// eval scores the run's test rows with the saved statistics, as the run did.
#[test]
fn a_split_file_with_a_label_by_number_scores_in_eval_as_in_the_run() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "all.csv",
        csv_text(&HEADER, &table_rows(300, 5), &[1, 2, 3, 0, 4]),
    );
    let config = write(
        dir.path(),
        "split.toml",
        "[data]\nformat = \"csv\"\ntrain_csv = \"all.csv\"\ntest_fraction = 0.25\n\
         label = 4\nignore = [1]\nnormalize = \"minmax\"\nsplit_seed = 4\n\n\
         [model]\nhidden = [16]\n\n[optimizer]\nkind = \"adam\"\nlr = 0.01\n\n\
         [training]\nepochs = 4\nbatch_size = 16\nseed = 1\nthreads = 2\n",
    );
    let run = dir.path().join("run");
    let trained = train_json(&config, &run, &["training.accumulation_steps=2"]);
    let again = train_json(
        &config,
        &dir.path().join("again"),
        &["training.accumulation_steps=2", "training.threads=1"],
    );
    assert_eq!(trained["weights_sha256"], again["weights_sha256"]);
    // In bf16 too.
    let half = |threads: &str, out: &str| {
        train_json(
            &config,
            &dir.path().join(out),
            &["training.precision=bf16", threads],
        )["weights_sha256"]
            .clone()
    };
    assert_eq!(
        half("training.threads=1", "bf16-1"),
        half("training.threads=2", "bf16-2")
    );
    let scored = last_json(&allcores(&["eval", run.to_str().unwrap(), "--json"]));
    assert_eq!(scored["test_accuracy"], trained["test_accuracy"]);
    assert_eq!(scored["samples"], 75);
    let table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("table.json")).unwrap()).unwrap();
    assert_eq!(
        table["features"],
        serde_json::json!(["big", "small", "mid"])
    );
    assert_eq!(table["scaling"]["kind"], "minmax");
}

/// Runs `train` on a table config with `sets` and checks the refusal; returns the line.
fn refused(config: &Path, sets: &[&str], expected: &str) -> String {
    let run = config.with_file_name("refused-run");
    let output = allcores(&train_args(config, &run, sets));
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{sets:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{sets:?}: {err}");
    assert!(
        err.contains(expected),
        "{sets:?}: expected '{expected}' in: {err}"
    );
    assert!(!run.exists(), "a refused run left its folder");
    err
}

#[test]
fn bad_tables_are_refused_naming_the_file_row_column_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = table_config(dir.path());
    let train = dir.path().join("train.csv").display().to_string();
    let refuse = |text: &str, sets: &[&str], expected: &str| {
        std::fs::write(dir.path().join("train.csv"), text).unwrap();
        refused(&config, sets, expected)
    };
    let good = csv_text(&HEADER, &table_rows(300, 1), &ALL);
    let err = refuse(&good, &["data.label=\"class\""], "'class' is not a column");
    assert!(
        err.contains(&train) && err.contains("'kind', 'id', 'big', 'small', 'mid'"),
        "{err}"
    );
    refuse(
        &good.replacen("kind,id,big,small,mid", "kind,id,big,big,mid", 1),
        &[],
        "line 1: columns 3 and 4 are both named 'big'",
    );
    let mut lines: Vec<String> = good.lines().map(String::from).collect();
    let cells: Vec<&str> = lines[3].split(',').collect();
    lines[3] = format!("{},{},twelve,{},{}", cells[0], cells[1], cells[3], cells[4]);
    refuse(
        &(lines.join("\n") + "\n"),
        &[],
        "line 4, column 3 (big): 'twelve' is not a finite number",
    );
    let mut empty_label = good.lines().map(String::from).collect::<Vec<_>>();
    empty_label[5] = format!(",{}", empty_label[5].split_once(',').unwrap().1);
    refuse(
        &(empty_label.join("\n") + "\n"),
        &[],
        "line 6: the label is empty, in column 1 (kind)",
    );
    let single: String = good
        .lines()
        .map(|l| match l.split_once(',') {
            Some((_, rest)) if !l.starts_with("kind") => format!("alpha,{rest}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    refuse(
        &single,
        &[],
        "the training rows hold a single class ('alpha')",
    );
    refuse(
        &good,
        &["data.classes=2"],
        "the labels name 3 classes, more than data.classes = 2 allows",
    );
    refuse(
        &good,
        &["data.ignore=[\"kind\"]"],
        "data.ignore: names the label column",
    );
    refuse(
        &good,
        &["data.ignore=[1]"],
        "data.ignore: names column 1 (kind), the label column",
    );
    refuse(
        &good.replacen("kind,id,big,small,mid", "kind,id,big,small", 1),
        &[],
        "line 2: 5 cells, but the header has 4",
    );
}

#[test]
fn bad_prediction_inputs_are_refused_naming_the_column_or_label() {
    let dir = tempfile::tempdir().unwrap();
    let config = table_config(dir.path());
    let run = dir.path().join("run");
    train_json(&config, &run, &["training.epochs=1"]);
    let rows = table_rows(10, 9);
    let check = |name: &str, text: String, expected: &str| {
        let input = write(dir.path(), name, text);
        let out = predict(&run, &input, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expected), "expected '{expected}' in: {err}");
        assert!(err.contains(name), "{err}");
        assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    };
    check(
        "missing.csv",
        csv_text(&HEADER, &rows, &[0, 1, 2, 4]),
        "line 1: the header lacks the model's feature column 'small'",
    );
    let extra: String = csv_text(&HEADER, &rows, &ALL)
        .lines()
        .enumerate()
        .map(|(i, l)| format!("{l},{}\n", if i == 0 { "colour" } else { "3" }))
        .collect();
    check(
        "extra.csv",
        extra,
        "line 1: column 'colour' is not one the model was trained on",
    );
    let mut unseen = rows.clone();
    unseen[4][0] = "delta".into();
    check(
        "unseen.csv",
        csv_text(&HEADER, &unseen, &ALL),
        "line 6: label 'delta' is not a class the model was trained on ('alpha', 'beta', 'gamma')",
    );
    // A run folder without a finished model.
    std::fs::remove_file(run.join("model.safetensors")).unwrap();
    let out = predict(&run, &dir.path().join("test.csv"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("holds an unfinished run"),
        "{}",
        stderr(&out)
    );
}

/// An IDX run predicts the classes of an image file: one row per image, its class and
/// probability, the accuracy the labels file gives them that of eval.
#[test]
fn an_image_run_predicts_an_image_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "mnist.toml",
        format!(
            "{}\n[model]\nhidden = [32]\n\n[training]\nepochs = 1\nbatch_size = 64\nthreads = 2\n",
            mnist_data()
        ),
    );
    let run = dir.path().join("run");
    let trained = train_json(&config, &run, &[]);
    let images = dataset("mnist8k-test-images-idx3-ubyte.gz");
    let out = predict(&run, Path::new(&images), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let csv = stdout(&out);
    assert!(
        csv.starts_with("row,predicted,probability,p_0,p_1,"),
        "{csv}"
    );
    let labels = {
        use std::io::Read;
        let file = std::fs::File::open(dataset("mnist8k-test-labels-idx1-ubyte.gz")).unwrap();
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut bytes)
            .unwrap();
        bytes.split_off(8)
    };
    let predictions = predicted(&csv);
    assert_eq!(predictions.len(), labels.len());
    let right = predictions
        .iter()
        .zip(&labels)
        .filter(|(p, l)| **p == l.to_string())
        .count();
    let accuracy = right as f64 / labels.len() as f64;
    assert_eq!(accuracy, trained["test_accuracy"].as_f64().unwrap());
    // Images of another size are refused by their size.
    let labels_file = dataset("mnist8k-test-labels-idx1-ubyte.gz");
    let out = predict(&run, Path::new(&labels_file), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("wrong IDX magic number"),
        "{}",
        stderr(&out)
    );
}

/// A table run stopped at step 13 and resumed on 2 threads ends as the run never stopped, its
/// table the same.
#[test]
fn a_table_run_resumes_as_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = table_config(dir.path());
    let sets = ["training.max_steps=40", "checkpoint.every_steps=5"];
    let whole = dir.path().join("whole");
    let reference = train_json(&config, &whole, &sets);
    let run = dir.path().join("resumed");
    let (first, resumed) = stopped_then_resumed(&config, &run, &sets, 13);
    assert_eq!(first["steps"], 13);
    assert_eq!(resumed["steps"], 40);
    assert_eq!(resumed["weights_sha256"], reference["weights_sha256"]);
    assert_eq!(
        std::fs::read(run.join("table.json")).unwrap(),
        std::fs::read(whole.join("table.json")).unwrap()
    );
}

/// A column constant in the training rows is named in a warning, and scaled to 0.
#[test]
fn a_constant_column_is_named_in_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..20)
        .map(|i| format!("{},7,{}\n", i, ["yes", "no"][i % 2]))
        .collect();
    write(dir.path(), "rows.csv", format!("x,flat,answer\n{rows}"));
    let config = write(
        dir.path(),
        "flat.toml",
        "[data]\nformat = \"csv\"\ntrain_csv = \"rows.csv\"\ntest_fraction = 0.2\n\
         normalize = \"minmax\"\n\n[model]\nhidden = [4]\n\n[training]\nthreads = 1\n",
    );
    let output = allcores(&["train", config.to_str().unwrap(), "--no-save"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("warning: column 'flat' of ")
            && stderr(&output).contains("holds one value in every training row: it is left at 0"),
        "{}",
        stderr(&output)
    );
}
