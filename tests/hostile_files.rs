//! End to end: files that are not what they claim to be (a FIFO, a device, a gzip bomb, an IDX
//! file without images) end with one line naming the file, exit status 2, no run folder left,
//! and no hang; a gzip file in several members trains as the single-member file.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Trains `config` with `sets` and checks the refusal: exit status 2, one line that names
/// `file` and holds `expected`, no run folder. Returns the line.
fn refused(dir: &Path, config: &Path, sets: &[String], file: &Path, expected: &str) -> String {
    let run = dir.join("run");
    let mut args = vec![
        "train",
        config.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    // Bounded: a reader blocked on a FIFO would never end.
    let output = finish(spawn_allcores(&args, false), Duration::from_secs(10));
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{sets:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "{sets:?}: {err}");
    assert!(
        err.starts_with(&format!("error: {}: ", file.display())),
        "expected {} named first in: {err}",
        file.display()
    );
    assert!(err.contains(expected), "expected '{expected}' in: {err}");
    assert!(!run.exists(), "a failed run left {}", run.display());
    err
}

fn mkfifo(path: &Path) -> PathBuf {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success(), "mkfifo {}", path.display());
    path.to_path_buf()
}

fn set(key: &str, path: &Path) -> String {
    format!("data.{key}=\"{}\"", path.display())
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A gzip file of at least `size` bytes that inflates to zeros, about a thousand times its
/// size: members of 64 MiB of zeros each, one after another (as pigz writes them), so that the
/// test need not compress gigabytes.
fn gzip_of_zeros(size: usize) -> Vec<u8> {
    let member = gzip(&vec![0u8; 64 << 20]);
    member.repeat(size.div_ceil(member.len()))
}

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = magic.to_be_bytes().to_vec();
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

fn csv_config(dir: &Path) -> PathBuf {
    write(
        dir,
        "csv.toml",
        format!(
            "[data]\nformat = \"csv\"\ntrain_csv = \"{}\"\ntest_fraction = 0.2\nscale = 16.0\n\
             [model]\nhidden = [16]\n[training]\nmax_steps = 5\nthreads = 1\n",
            dataset("uci-digits.csv.gz")
        ),
    )
}

#[test]
fn a_fifo_as_a_data_file_or_the_config_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = mkfifo(&dir.path().join("fifo"));
    let mnist = write(dir.path(), "mnist.toml", mnist_data());
    let expected = "is a FIFO (named pipe), not a regular file";
    refused(
        dir.path(),
        &mnist,
        &[set("train_images", &fifo)],
        &fifo,
        expected,
    );
    refused(
        dir.path(),
        &mnist,
        &[set("test_labels", &fifo)],
        &fifo,
        expected,
    );
    let csv = csv_config(dir.path());
    refused(
        dir.path(),
        &csv,
        &[set("train_csv", &fifo)],
        &fifo,
        expected,
    );
    refused(dir.path(), &fifo, &[], &fifo, expected);
    // A link to a FIFO is a FIFO.
    let link = dir.path().join("link.toml");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    refused(dir.path(), &link, &[], &link, expected);
}

#[test]
fn a_device_or_a_directory_is_refused_by_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let zero = Path::new("/dev/zero");
    let device = "is a character device, not a regular file";
    let mnist = write(dir.path(), "mnist.toml", mnist_data());
    refused(
        dir.path(),
        &mnist,
        &[set("train_images", zero)],
        zero,
        device,
    );
    let csv = csv_config(dir.path());
    refused(dir.path(), &csv, &[set("train_csv", zero)], zero, device);
    refused(dir.path(), zero, &[], zero, device);
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    refused(
        dir.path(),
        &csv,
        &[set("train_csv", &folder)],
        &folder,
        "is a directory, not a regular file",
    );
    refused(
        dir.path(),
        &folder,
        &[],
        &folder,
        "is a directory, not a regular file",
    );
}

#[test]
fn a_config_file_past_its_size_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = digits_data();
    text.push_str(&"# padding\n".repeat(110_000));
    let config = write(dir.path(), "large.toml", text);
    refused(
        dir.path(),
        &config,
        &[],
        &config,
        "larger than 1 MiB, the most a config file may be",
    );
}

/// Gzip files that inflate to 2 and 8 GiB of zeros are refused as they inflate: the IDX
/// loader at the magic number, the CSV loader at its row limit. (Their time and memory are
/// measured by hand: a test asserts only that they end.)
#[test]
fn gzip_bombs_are_refused_as_they_inflate() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = write(dir.path(), "mnist.toml", mnist_data());
    let csv = csv_config(dir.path());
    for megabytes in [2, 8] {
        let bomb = write(
            dir.path(),
            &format!("zeros-{megabytes}mb.gz"),
            gzip_of_zeros(megabytes << 20),
        );
        refused(
            dir.path(),
            &mnist,
            &[set("train_images", &bomb)],
            &bomb,
            "wrong IDX magic number 0x00000000, expected 0x00000803",
        );
        refused(
            dir.path(),
            &csv,
            &[set("train_csv", &bomb)],
            &bomb,
            "line 1: longer than 8 MiB, the most a CSV row may take",
        );
    }
}

/// An IDX file without images, or with images of no pixel, used to panic in the first batch.
#[test]
fn idx_files_without_images_or_pixels_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = write(dir.path(), "mnist.toml", mnist_data());
    let labels = write(dir.path(), "labels", idx(0x0801, &[0], &[]));
    let none = write(dir.path(), "none", idx(0x0803, &[0, 28, 28], &[]));
    refused(
        dir.path(),
        &mnist,
        &[set("train_images", &none), set("train_labels", &labels)],
        &none,
        "holds no images",
    );
    let empty = write(dir.path(), "empty", idx(0x0803, &[5, 0, 0], &[]));
    refused(
        dir.path(),
        &mnist,
        &[set("test_images", &empty), set("test_labels", &labels)],
        &empty,
        "holds images of 0x0 pixels",
    );
    // An empty test set trained, then reported "test accuracy 0.00%" with exit 0.
    refused(
        dir.path(),
        &mnist,
        &[set("test_images", &none), set("test_labels", &labels)],
        &none,
        "holds no images",
    );
}

/// pigz and bgzip write a gzip file in several members: every member is read, and the run is
/// the one the single-member file gives.
#[test]
fn a_multi_member_gzip_csv_trains_as_the_single_member_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(dataset("uci-digits.csv.gz")).unwrap())
        .read_to_end(&mut text)
        .unwrap();
    // Split inside a row: a member need not end at a line.
    let (first, second) = text.split_at(text.len() / 2 + 7);
    let one = write(dir.path(), "one.csv.gz", gzip(&text));
    let two = write(
        dir.path(),
        "two.csv.gz",
        [gzip(first), gzip(second)].concat(),
    );
    let config = csv_config(dir.path());
    let train = |csv: &Path, out: &str| {
        train_json(&config, &dir.path().join(out), &[&set("train_csv", csv)])
    };
    let single = train(&one, "single");
    let multi = train(&two, "multi");
    assert_eq!(single["weights_sha256"], multi["weights_sha256"]);
    assert_eq!(single["test_accuracy"], multi["test_accuracy"]);
    assert_eq!(single["samples"], multi["samples"]);
    assert_eq!(single["train_loss"], multi["train_loss"]);
    assert!(single["weights_sha256"].as_str().unwrap().len() == 64);
}
