//! Property tests: random and mutated dataset files and checkpoints never panic, never hang,
//! and never take memory out of proportion to their own size; an error is one line that names
//! the file at fault. Each case runs on a thread of its own, which counts what it allocates
//! (this test binary's allocator keeps a count per thread) and must finish within 10 s.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use allcores_trainer::checkpoint::{self, LoopState};
use allcores_trainer::data::{ModelInput, load_to_predict};
use allcores_trainer::precision::ScalerState;
use allcores_trainer::settings::DataSettings;
use allcores_trainer::{EpochMetrics, Splits};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRng, TestRunner};
use sha2::{Digest, Sha256};

/// Cases each property runs: enough to reach the loaders' branches, few enough for CI.
const CASES: u32 = 256;

/// Runs `test` on `CASES` values of `strategy`, drawn from a fixed seed (the same cases on every
/// run, as every other test here; a failure shrinks to a small input and prints it). Prints
/// how many cases ran.
fn check_cases<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = Config {
        // The cases come from a fixed seed: a failure recurs without a file of them.
        failure_persistence: None,
        ..Config::with_cases(CASES)
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    let ran = Cell::new(0u32);
    TestRunner::new_with_rng(config, rng)
        .run(&strategy, |value| {
            ran.set(ran.get() + 1);
            test(value)
        })
        .unwrap();
    eprintln!("{name}: {} cases", ran.get());
    assert_eq!(ran.get(), CASES, "{name}");
}

/// The system allocator, counting each thread's live bytes and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: a thread being torn down has no counters left, and frees all the same.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call goes to the system allocator as it came; the counting touches only
// thread-local cells, which allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            count(layout.size() as isize);
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on as it came.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            count(layout.size() as isize);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on as it came.
        unsafe { System.dealloc(pointer, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on as it came.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most a loader may allocate at once for an input of `size` bytes (decompressed): a few
/// copies of it as f32 features and their train/test split, plus the parser's and the gzip
/// decoder's buffers.
fn allowance(size: usize) -> usize {
    (1 << 20) + 16 * size
}

/// Runs `f` on a thread of its own; fails when it panics, takes more than 10 s, or allocates
/// more than [`allowance`] of `size` at its peak. Returns its result and that peak.
fn contained<T: Send + 'static>(size: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (send, receive) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let base = LIVE.with(Cell::get);
        PEAK.with(|peak| peak.set(base));
        let result = f();
        let peak = (PEAK.with(Cell::get) - base).max(0) as usize;
        let _ = send.send(());
        (result, peak)
    });
    match receive.recv_timeout(Duration::from_secs(10)) {
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("still running after 10 s"),
        // Done, or panicked: the join says which.
        _ => match worker.join() {
            Ok((result, peak)) => {
                assert!(
                    peak <= allowance(size),
                    "allocated {peak} bytes at the peak for an input of {size} bytes"
                );
                result
            }
            Err(panic) => std::panic::resume_unwind(panic),
        },
    }
}

/// A change to a file's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// The byte at this index (modulo the length) becomes this one.
    Set(usize, u8),
    /// Cut at this index (modulo the length + 1).
    Truncate(usize),
    /// These bytes go in at this index (modulo the length + 1).
    Insert(usize, Vec<u8>),
    /// A big-endian u32 over the word at this index (an IDX header field for the first few).
    Word(usize, u32),
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::Set(at, byte) => {
            if !bytes.is_empty() {
                let at = at % bytes.len();
                bytes[at] = *byte;
            }
        }
        Mutation::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
        Mutation::Insert(at, inserted) => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, inserted.iter().copied());
        }
        Mutation::Word(index, word) => {
            let at = 4 * index;
            if let Some(slot) = bytes.get_mut(at..at + 4) {
                slot.copy_from_slice(&word.to_be_bytes());
            }
        }
    }
}

/// Bytes that matter to the parsers: CSV syntax, NUL, line ends, numbers at the edges.
fn token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 1..8),
        prop::sample::select(vec![
            "\"",
            ",",
            "\n",
            "\r\n",
            "\r",
            "\0",
            " ",
            "\"\"",
            "nan",
            "inf",
            "-1",
            "1e40",
            "255",
            "256",
            "18446744073709551616",
            "1.5",
            "\u{feff}",
            "\u{ff}",
        ])
        .prop_map(|t| t.as_bytes().to_vec()),
    ]
}

/// A header field worth trying: zero, one, the edges of u8 and u16 and u32, or any.
fn word() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            2,
            255,
            65_535,
            1 << 24,
            1 << 31,
            u32::MAX,
            0x0000_0801,
            0x0000_0803
        ]),
        any::<u32>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), token()).prop_map(|(at, t)| Mutation::Insert(at, t)),
        (0..5usize, word()).prop_map(|(at, w)| Mutation::Word(at, w)),
    ]
}

/// How a file is stored: plain, gzip, gzip in two members, or gzip whose compressed bytes are
/// then changed.
#[derive(Debug, Clone)]
enum Storage {
    Plain,
    Gzip,
    TwoMembers(usize),
    MutatedGzip(Vec<Mutation>),
}

fn storage() -> impl Strategy<Value = Storage> {
    prop_oneof![
        Just(Storage::Plain),
        Just(Storage::Gzip),
        any::<usize>().prop_map(Storage::TwoMembers),
        vec(mutation(), 1..4).prop_map(Storage::MutatedGzip),
    ]
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// `bytes` as `storage` stores them; true where the content is still exactly `bytes`.
fn store(bytes: &[u8], storage: &Storage) -> (Vec<u8>, bool) {
    match storage {
        Storage::Plain => (bytes.to_vec(), true),
        Storage::Gzip => (gzip(bytes), true),
        Storage::TwoMembers(at) => {
            let (a, b) = bytes.split_at(at % (bytes.len() + 1));
            ([gzip(a), gzip(b)].concat(), true)
        }
        Storage::MutatedGzip(mutations) => {
            let mut stored = gzip(bytes);
            let before = stored.clone();
            for m in mutations {
                apply(&mut stored, m);
            }
            let same = stored == before;
            (stored, same)
        }
    }
}

/// Checks an error: one line, naming one of `files`.
fn check_error(error: &allcores_trainer::Error, files: &[&Path]) {
    let text = error.to_string();
    assert!(!text.contains('\n'), "more than one line: {text}");
    assert!(
        files
            .iter()
            .any(|f| text.starts_with(&format!("{}: ", f.display()))),
        "names none of {files:?}: {text}"
    );
}

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = magic.to_be_bytes().to_vec();
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

fn idx_settings(images: &Path, labels: &Path) -> DataSettings {
    toml::from_str(&format!(
        "format = \"idx\"\ntest_images = {:?}\ntest_labels = {:?}\n",
        images.display().to_string(),
        labels.display().to_string()
    ))
    .unwrap()
}

fn csv_settings(csv: &Path) -> DataSettings {
    toml::from_str(&format!(
        "format = \"csv\"\ntrain_csv = {:?}\ntest_fraction = 0.5\nclasses = 10\n",
        csv.display().to_string()
    ))
    .unwrap()
}

/// Loads the IDX test split from `images` and `labels` (stored bytes, of `size` bytes
/// decompressed), contained; checks any error.
fn load_idx(images: Vec<u8>, labels: Vec<u8>, size: usize) -> Option<allcores_trainer::Dataset> {
    let dir = tempfile::tempdir().unwrap();
    let (images_path, labels_path) = (dir.path().join("images"), dir.path().join("labels"));
    std::fs::write(&images_path, images).unwrap();
    std::fs::write(&labels_path, labels).unwrap();
    let settings = idx_settings(&images_path, &labels_path);
    match contained(size, move || Splits::load_test(&settings)) {
        Ok(data) => Some(data),
        Err(e) => {
            check_error(&e, &[&images_path, &labels_path]);
            None
        }
    }
}

fn load_csv(stored: Vec<u8>, size: usize) -> Option<allcores_trainer::Dataset> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.csv");
    std::fs::write(&path, stored).unwrap();
    let settings = csv_settings(&path);
    match contained(size, move || Splits::load_test(&settings)) {
        Ok(data) => Some(data),
        Err(e) => {
            check_error(&e, &[&path]);
            None
        }
    }
}

/// A valid IDX pair: images of `count` x `height` x `width` random pixels, and their labels.
fn valid_idx() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (1..6u32, 1..6u32, 1..6u32).prop_flat_map(|(count, height, width)| {
        let pixels = vec(any::<u8>(), (count * height * width) as usize);
        let labels = vec(0..10u8, count as usize);
        (pixels, labels).prop_map(move |(pixels, labels)| {
            (
                idx(0x0803, &[count, height, width], &pixels),
                idx(0x0801, &[count], &labels),
            )
        })
    })
}

#[test]
fn idx_files_of_random_bytes() {
    let images = prop_oneof![
        vec(any::<u8>(), 0..2048),
        // Past the magic number, so that the header and body are reached.
        vec(any::<u8>(), 0..2048).prop_map(|b| [&0x0803u32.to_be_bytes()[..], &b].concat()),
    ];
    let labels = prop_oneof![
        vec(any::<u8>(), 0..64),
        vec(any::<u8>(), 0..64).prop_map(|b| [&0x0801u32.to_be_bytes()[..], &b].concat()),
    ];
    check_cases(
        "idx_files_of_random_bytes",
        (images, labels, storage()),
        |(images, labels, storage)| {
            let size = images.len() + labels.len();
            let (stored, _) = store(&images, &storage);
            load_idx(stored, labels, size);
            Ok(())
        },
    );
}

#[test]
fn idx_files_with_mutated_headers_and_bodies() {
    let case = (
        valid_idx(),
        vec(mutation(), 0..4),
        vec(mutation(), 0..2),
        storage(),
    );
    check_cases(
        "idx_files_with_mutated_headers_and_bodies",
        case,
        |((images, labels), image_changes, label_changes, storage)| {
            let (mut mutated_images, mut mutated_labels) = (images.clone(), labels.clone());
            for m in &image_changes {
                apply(&mut mutated_images, m);
            }
            for m in &label_changes {
                apply(&mut mutated_labels, m);
            }
            let size = mutated_images.len() + mutated_labels.len();
            let (stored, intact) = store(&mutated_images, &storage);
            let loaded = load_idx(stored, mutated_labels.clone(), size);
            if intact && mutated_images == images && mutated_labels == labels {
                // The file as written: it loads, pixel for pixel.
                let data = loaded.expect("a valid IDX pair loads");
                prop_assert_eq!(data.labels(), &labels[8..]);
                prop_assert_eq!(data.len() * data.shape().len(), images.len() - 16);
            }
            Ok(())
        },
    );
}

/// A valid CSV: `rows` rows of `features` numbers and a label. The labels differ, so that
/// the training half of the split (2 rows or more) holds two classes or more, as it must.
fn valid_csv() -> impl Strategy<Value = String> {
    (4..8usize, 1..6usize).prop_flat_map(|(rows, features)| {
        let labels = Just((0..10u8).collect::<Vec<_>>()).prop_shuffle();
        (vec(vec(-1000..1000i32, features), rows), labels).prop_map(|(rows, labels)| {
            rows.iter()
                .zip(labels)
                .map(|(values, label)| {
                    let values: Vec<String> = values.iter().map(|v| format!("{v}")).collect();
                    format!("{},{label}\n", values.join(","))
                })
                .collect()
        })
    })
}

#[test]
fn csv_files_of_random_text() {
    let text = prop_oneof![
        vec(any::<u8>(), 0..2048),
        vec(token(), 0..256).prop_map(|tokens| tokens.concat()),
    ];
    check_cases(
        "csv_files_of_random_text",
        (text, storage()),
        |(text, storage)| {
            let (stored, _) = store(&text, &storage);
            load_csv(stored, text.len());
            Ok(())
        },
    );
}

#[test]
fn csv_files_with_mutated_cells_rows_and_quotes() {
    let case = (valid_csv(), vec(mutation(), 0..4), storage());
    check_cases(
        "csv_files_with_mutated_cells_rows_and_quotes",
        case,
        |(text, changes, storage)| {
            let mut bytes = text.clone().into_bytes();
            for m in &changes {
                apply(&mut bytes, m);
            }
            let (stored, intact) = store(&bytes, &storage);
            let loaded = load_csv(stored, bytes.len());
            if intact && bytes == text.as_bytes() {
                let rows = text.lines().count();
                let data = loaded.expect("a valid CSV loads");
                // The test half of the split.
                prop_assert!(!data.is_empty() && data.len() < rows);
            }
            Ok(())
        },
    );
}

/// A valid table: a header of `names`, then rows of a text label (first) and numbers.
fn valid_table() -> impl Strategy<Value = String> {
    (4..9usize, 2..5usize).prop_flat_map(|(rows, features)| {
        let labels = Just(["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]).prop_shuffle();
        (vec(vec(-1e6..1e6f64, features), rows), labels).prop_map(move |(rows, labels)| {
            let mut text = String::from("label");
            (0..features).for_each(|f| text.push_str(&format!(",f{f}")));
            text.push('\n');
            for (values, label) in rows.iter().zip(labels) {
                let values: Vec<String> = values.iter().map(|v| format!("{v:.3}")).collect();
                text.push_str(&format!("{label},{}\n", values.join(",")));
            }
            text
        })
    })
}

/// The column keys a table config may hold: `data.header`, `data.label`, `data.ignore` and
/// `data.normalize`, with names and numbers that exist and that do not.
fn table_keys() -> impl Strategy<Value = String> {
    let column = prop_oneof![
        prop::sample::select(vec!["\"label\"", "\"f0\"", "\"f1\"", "\"nope\"", "\"\""])
            .prop_map(String::from),
        (1..8u32).prop_map(|n| n.to_string()),
    ];
    (
        prop::sample::select(vec![
            "",
            "header = true\n",
            "header = false\n",
            "header = \"auto\"\n",
        ]),
        prop::option::of(column.clone()),
        vec(column, 0..3),
        prop::sample::select(vec!["none", "standard", "minmax"]),
    )
        .prop_map(|(header, label, ignore, normalize)| {
            let label = label.map_or(String::new(), |l| format!("label = {l}\n"));
            format!(
                "{header}{label}ignore = [{}]\nnormalize = \"{normalize}\"\n",
                ignore.join(", ")
            )
        })
}

/// Tables with headers, text labels and column keys, mutated: they load, or are refused on
/// one line naming the file; a prediction file is read with the table of a valid one.
#[test]
fn tables_with_headers_labels_and_column_keys() {
    let case = (
        valid_table(),
        table_keys(),
        vec(mutation(), 0..3),
        storage(),
    );
    check_cases(
        "tables_with_headers_labels_and_column_keys",
        case,
        |(text, keys, changes, storage)| {
            let mut bytes = text.clone().into_bytes();
            for m in &changes {
                apply(&mut bytes, m);
            }
            let (stored, intact) = store(&bytes, &storage);
            let dir = tempfile::tempdir().unwrap();
            let (train, rows) = (dir.path().join("train.csv"), dir.path().join("rows.csv"));
            std::fs::write(&train, &text).unwrap();
            std::fs::write(&rows, stored).unwrap();
            let settings: DataSettings = match toml::from_str(&format!(
                "format = \"csv\"\ntrain_csv = {:?}\ntest_csv = {:?}\n{keys}",
                train.display().to_string(),
                rows.display().to_string()
            )) {
                Ok(settings) => settings,
                // A key of another type (a label of "") is the config parser's to refuse.
                Err(_) => return Ok(()),
            };
            let size = bytes.len() + text.len();
            let loaded = contained(size, move || Splits::load(&settings));
            match &loaded {
                Ok(splits) => {
                    let table = splits.table.clone().expect("a CSV run has a table");
                    let predicted = contained(size, move || {
                        load_to_predict(&rows, ModelInput::Rows(&table))
                    });
                    if let Err(e) = predicted {
                        check_error(&e, &[&dir.path().join("rows.csv")]);
                    }
                }
                Err(e) => check_error(e, &[&train, &dir.path().join("rows.csv")]),
            }
            let plain_keys =
                keys.contains("label = \"label\"\nignore = []") && !keys.contains("header = false");
            if intact && bytes == text.as_bytes() && plain_keys {
                // The file as written, its label named: the header found, every row read.
                let splits = loaded.expect("a valid table loads");
                prop_assert_eq!(splits.test.len(), text.lines().count() - 1);
            }
            Ok(())
        },
    );
}

const CHECKPOINT_FILES: [&str; 4] = ["manifest.json", "state.json", "model.bpk", "optimizer.bpk"];

/// What a case does to one file of a checkpoint.
#[derive(Debug, Clone)]
enum Damage {
    /// Its bytes changed; the manifest's checksum of it recomputed or not.
    Bytes(Vec<Mutation>, bool),
    /// A JSON value of state.json replaced (the leaf at this index, in document order), its
    /// checksum recomputed: the parser itself is reached.
    StateValue(usize, serde_json::Value),
    /// The file removed, or a directory or FIFO put in its place.
    Removed,
    Directory,
    Fifo,
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    prop_oneof![
        prop::sample::select(vec![
            Value::Null,
            json!(true),
            json!(-1),
            json!(0),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1e308),
            json!(-1e308),
            json!(0.5),
            json!(""),
            json!("step"),
            json!([]),
            json!({}),
            json!([1, 2, 3]),
        ]),
        any::<i64>().prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
    ]
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (vec(mutation(), 1..4), any::<bool>()).prop_map(|(m, r)| Damage::Bytes(m, r)),
        4 => (any::<usize>(), json_value()).prop_map(|(at, v)| Damage::StateValue(at, v)),
        1 => Just(Damage::Removed),
        1 => Just(Damage::Directory),
        1 => Just(Damage::Fifo),
    ]
}

fn sha256(bytes: &[u8]) -> String {
    allcores_trainer::weights::hex(&Sha256::digest(bytes))
}

/// The bytes of `path` where it is a regular file (reading a FIFO that an earlier damage put
/// there would block this test).
fn read_file(path: &Path) -> Option<Vec<u8>> {
    let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
    regular.then(|| std::fs::read(path).unwrap())
}

/// Sets the manifest's checksum of `name` to that of its bytes now.
fn recompute_checksum(folder: &Path, name: &str) {
    let manifest_path = folder.join("manifest.json");
    let (Some(text), Some(bytes)) = (read_file(&manifest_path), read_file(&folder.join(name)))
    else {
        return;
    };
    let Ok(mut manifest) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return;
    };
    if let Some(files) = manifest.get_mut("files").and_then(|f| f.as_object_mut()) {
        files.insert(name.to_string(), sha256(&bytes).into());
    }
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

/// The leaves of `value`, in document order.
fn leaves(value: &mut serde_json::Value) -> Vec<&mut serde_json::Value> {
    match value {
        serde_json::Value::Array(items) => items.iter_mut().flat_map(leaves).collect(),
        serde_json::Value::Object(fields) => fields.values_mut().flat_map(leaves).collect(),
        leaf => vec![leaf],
    }
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
}

fn loop_state() -> LoopState {
    LoopState {
        epoch: 2,
        groups_done: 3,
        step: 13,
        samples: 832,
        epoch_loss_sum: 61.25,
        epoch_samples: 192,
        train_seconds: 1.5,
        epoch_seconds: 0.25,
        metrics: vec![EpochMetrics {
            epoch: 1,
            steps: 10,
            samples: 640,
            train_loss: 0.9,
            test_loss: 0.8,
            test_accuracy: 0.7,
            lr: 0.001,
            samples_per_second: 1000.0,
            cpu_utilization: 0.9,
            mid_epoch: false,
        }],
        scaler: ScalerState::default(),
        since_evaluation: (3.5, 64),
    }
}

/// A checkpoint as `checkpoint::write` leaves it, in `run_dir`; returns its folder.
fn written_checkpoint(run_dir: &Path) -> PathBuf {
    let model: Vec<u8> = (0..512u32).map(|i| (i * 31 % 251) as u8).collect();
    let optimizer: Vec<u8> = (0..768u32).map(|i| (i * 17 % 241) as u8).collect();
    checkpoint::write(
        run_dir,
        &loop_state(),
        "[training]\nepochs = 3\n",
        &model,
        &optimizer,
        1,
    )
    .unwrap()
}

/// Copies the checkpoint `template` into a fresh run folder; returns the run folder and the copy.
fn copy_checkpoint(template: &Path, into: &Path) -> PathBuf {
    let folder = into
        .join(checkpoint::CHECKPOINTS_DIR)
        .join(template.file_name().unwrap());
    std::fs::create_dir_all(&folder).unwrap();
    for name in CHECKPOINT_FILES {
        std::fs::copy(template.join(name), folder.join(name)).unwrap();
    }
    folder
}

#[test]
fn checkpoints_with_damaged_files() {
    let template_dir = tempfile::tempdir().unwrap();
    let template = written_checkpoint(template_dir.path());
    let template_size: usize = CHECKPOINT_FILES
        .iter()
        .map(|name| std::fs::metadata(template.join(name)).unwrap().len() as usize)
        .sum();
    let case = (0..CHECKPOINT_FILES.len(), vec(damage(), 0..3));
    check_cases(
        "checkpoints_with_damaged_files",
        case,
        |(first, damages)| {
            let run = tempfile::tempdir().unwrap();
            let folder = copy_checkpoint(&template, run.path());
            // Damage files in turn, from `first` on.
            for (i, damage) in damages.iter().enumerate() {
                let name = CHECKPOINT_FILES[(first + i) % CHECKPOINT_FILES.len()];
                let path = folder.join(name);
                match damage {
                    Damage::Bytes(mutations, recompute) => {
                        let Some(mut bytes) = read_file(&path) else {
                            continue;
                        };
                        for m in mutations {
                            apply(&mut bytes, m);
                        }
                        std::fs::write(&path, bytes).unwrap();
                        if *recompute {
                            recompute_checksum(&folder, name);
                        }
                    }
                    Damage::StateValue(at, value) => {
                        let path = folder.join("state.json");
                        let Some(text) = read_file(&path) else {
                            continue;
                        };
                        let Ok(mut state) = serde_json::from_slice(&text) else {
                            continue;
                        };
                        let mut all = leaves(&mut state);
                        if !all.is_empty() {
                            let index = at % all.len();
                            *all[index] = value.clone();
                        }
                        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
                        recompute_checksum(&folder, "state.json");
                    }
                    Damage::Removed | Damage::Directory | Damage::Fifo => {
                        if path.is_dir() {
                            std::fs::remove_dir(&path).unwrap();
                        } else {
                            let _ = std::fs::remove_file(&path);
                        }
                        match damage {
                            Damage::Directory => std::fs::create_dir(&path).unwrap(),
                            Damage::Fifo => mkfifo(&path),
                            _ => {}
                        }
                    }
                }
            }
            let size = template_size
                + CHECKPOINT_FILES
                    .iter()
                    .map(|n| std::fs::metadata(folder.join(n)).map_or(0, |m| m.len() as usize))
                    .sum::<usize>();
            let (read_folder, run_dir) = (folder.clone(), run.path().to_path_buf());
            let (read, newest) = contained(size, move || {
                let read = checkpoint::read(&read_folder).map(|c| {
                    let optimizer = c.optimizer_bytes().map(|b| b.len());
                    (c.state, optimizer.ok())
                });
                let newest = checkpoint::newest_valid(&run_dir)
                    .map(|(c, refused)| (c.map(|c| c.state), refused));
                (read, newest)
            });
            match &read {
                Ok(_) => {}
                Err(e) => check_error(
                    e,
                    &CHECKPOINT_FILES
                        .map(|n| folder.join(n))
                        .iter()
                        .map(PathBuf::as_path)
                        .collect::<Vec<_>>(),
                ),
            }
            let (found, refused) = newest.expect("newest_valid reads the folders it finds");
            // The one checkpoint either reads, or is listed as refused.
            prop_assert_eq!(found.is_some(), read.is_ok());
            prop_assert_eq!(refused.len(), usize::from(read.is_err()));
            if damages.is_empty() {
                let (state, optimizer) = read.expect("an untouched checkpoint reads");
                prop_assert_eq!(state, loop_state());
                prop_assert_eq!(optimizer, Some(768));
            }
            Ok(())
        },
    );
}

/// Each file of a checkpoint replaced by a FIFO: refused by name, at once, where an open would
/// block until something wrote to it.
#[test]
fn a_fifo_in_a_checkpoint_is_refused_by_name() {
    for name in CHECKPOINT_FILES {
        let run = tempfile::tempdir().unwrap();
        let folder = written_checkpoint(run.path());
        let path = folder.join(name);
        std::fs::remove_file(&path).unwrap();
        mkfifo(&path);
        let err = contained(0, move || {
            checkpoint::read(&folder).unwrap_err().to_string()
        });
        assert!(
            err.starts_with(&format!("{}: ", path.display())),
            "{name}: {err}"
        );
        assert!(
            err.contains("is a FIFO (named pipe), not a regular file"),
            "{err}"
        );
    }
    // The optimizer state is read again when the run resumes.
    let run = tempfile::tempdir().unwrap();
    let folder = written_checkpoint(run.path());
    let read = checkpoint::read(&folder).unwrap();
    let path = folder.join("optimizer.bpk");
    std::fs::remove_file(&path).unwrap();
    mkfifo(&path);
    let err = contained(0, move || read.optimizer_bytes().unwrap_err().to_string());
    assert_eq!(
        err,
        format!(
            "{}: cannot read: is a FIFO (named pipe), not a regular file",
            path.display()
        )
    );
}

/// A weights file that is a FIFO is refused, where reading it would block.
#[test]
fn a_fifo_as_weights_is_refused() {
    use allcores_trainer::model::Mlp;
    use allcores_trainer::settings::Backend;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    mkfifo(&path);
    let model = Mlp::new(4, &[3], 2, &allcores_trainer::device(Backend::Ndarray));
    let named = path.clone();
    let err = contained(0, move || {
        allcores_trainer::weights::load(model, &named)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    });
    assert_eq!(
        err,
        format!(
            "{}: cannot read: is a FIFO (named pipe), not a regular file",
            path.display()
        )
    );
}
