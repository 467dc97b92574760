//! The IDX format of the original MNIST distribution: a big-endian header (magic number, then
//! one u32 per dimension) followed by unsigned bytes. Pixels are scaled to [0, 1].

use std::path::Path;

use super::{Dataset, SampleShape, read_maybe_gzip};
use crate::error::{Error, Result};

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Loads an image file and its label file into one dataset.
pub fn load(images_path: &Path, labels_path: &Path) -> Result<Dataset> {
    let images = read_maybe_gzip(images_path)?;
    let labels = read_maybe_gzip(labels_path)?;
    let (image_dims, pixels) = parse(&images, IMAGES_MAGIC, images_path)?;
    let (label_dims, labels) = parse(&labels, LABELS_MAGIC, labels_path)?;
    let [count, height, width] = image_dims[..] else {
        unreachable!("the magic number fixes three dimensions")
    };
    if label_dims[0] != count {
        return Err(Error::data(
            labels_path,
            format!(
                "holds {} labels but {} holds {count} images",
                label_dims[0],
                images_path.display()
            ),
        ));
    }
    let features = pixels.iter().map(|&p| p as f32 / 255.0).collect();
    let shape = SampleShape {
        channels: 1,
        height,
        width,
    };
    Ok(Dataset::new(features, labels.to_vec(), shape))
}

/// Checks the header and the data length; returns the dimensions and the data bytes.
fn parse<'a>(bytes: &'a [u8], magic: u32, path: &Path) -> Result<(Vec<usize>, &'a [u8])> {
    let read_u32 = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let found = read_u32(0).ok_or_else(|| Error::data(path, "too short for an IDX header"))?;
    if found != magic {
        return Err(Error::data(
            path,
            format!("wrong IDX magic number 0x{found:08x}, expected 0x{magic:08x}"),
        ));
    }
    let rank = (magic & 0xff) as usize;
    let mut dims = Vec::with_capacity(rank);
    for d in 0..rank {
        let dim = read_u32(4 + 4 * d).ok_or_else(|| Error::data(path, "truncated IDX header"))?;
        dims.push(dim as usize);
    }
    let header = 4 + 4 * rank;
    let expected: usize = dims.iter().product();
    let data = &bytes[header..];
    if data.len() != expected {
        let what = if data.len() < expected {
            "truncated"
        } else {
            "longer than its header says"
        };
        return Err(Error::data(
            path,
            format!(
                "{what}: the header {dims:?} calls for {expected} data bytes, the file has {}",
                data.len()
            ),
        ));
    }
    Ok((dims, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut bytes = magic.to_be_bytes().to_vec();
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(data);
        bytes
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn reads_images_and_labels_and_scales_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let images = write(
            dir.path(),
            "i",
            &idx(IMAGES_MAGIC, &[2, 1, 2], &[0, 255, 51, 102]),
        );
        let labels = write(dir.path(), "l", &idx(LABELS_MAGIC, &[2], &[3, 7]));
        let data = load(&images, &labels).unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data.labels(), &[3, 7]);
        assert_eq!(data.features, vec![0.0, 1.0, 0.2, 0.4]);
        assert_eq!(data.shape().height, 1);
        assert_eq!(data.shape().width, 2);
    }

    #[test]
    fn refuses_wrong_magic_truncation_and_count_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let images = write(
            dir.path(),
            "i",
            &idx(IMAGES_MAGIC, &[2, 1, 2], &[0, 1, 2, 3]),
        );
        let labels = write(dir.path(), "l", &idx(LABELS_MAGIC, &[2], &[3, 7]));

        let swapped = load(&labels, &images).unwrap_err().to_string();
        assert!(swapped.contains("wrong IDX magic number"), "{swapped}");

        let short = write(dir.path(), "s", &idx(IMAGES_MAGIC, &[2, 1, 2], &[0, 1, 2]));
        let truncated = load(&short, &labels).unwrap_err().to_string();
        assert!(truncated.contains("truncated"), "{truncated}");

        let three = write(dir.path(), "3", &idx(LABELS_MAGIC, &[3], &[1, 2, 3]));
        let mismatch = load(&images, &three).unwrap_err().to_string();
        assert!(mismatch.contains("3 labels but"), "{mismatch}");
    }
}
