//! The IDX format of the original MNIST distribution: a big-endian header (magic number, then
//! one u32 per dimension) followed by unsigned bytes. Pixels are scaled to [0, 1].
//!
//! A file is read as a stream (gunzipped on the fly): the header is checked first, and the body
//! read only as far as the header allows, plus one byte to tell a longer file. Memory grows with
//! the bytes read, never with what a header claims.

use std::io::Read;
use std::path::Path;

use super::{Dataset, Input, SampleShape, features_beyond, read_up_to};
use crate::error::{Error, Result};

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Loads an image file and its label file into one dataset.
pub fn load(images_path: &Path, labels_path: &Path) -> Result<Dataset> {
    let images = Images::open(images_path)?;
    let count = images.dims[0];
    // Both headers before either body: a file that does not match the other is refused before
    // gigabytes of it are read.
    let mut labels = Input::open(labels_path)?;
    let label_dims = read_header(&mut labels, LABELS_MAGIC, labels_path)?;
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
    let (features, shape) = images.read(images_path)?;
    let labels = read_body(&mut labels, &label_dims, count, labels_path)?;
    Ok(Dataset::new(features, labels, shape))
}

/// Loads an image file alone: its pixels scaled to [0, 1], and the images' shape.
pub fn load_images(path: &Path) -> Result<(Vec<f32>, SampleShape)> {
    Images::open(path)?.read(path)
}

/// The shape of the images of a file, from its header alone.
pub fn image_shape(path: &Path) -> Result<SampleShape> {
    Ok(Images::open(path)?.shape())
}

/// An image file whose header was read and checked: its stream is at the first pixel.
struct Images {
    input: Input,
    /// Images, height, width.
    dims: Vec<usize>,
    /// The pixels the header calls for.
    expected: usize,
}

impl Images {
    fn open(path: &Path) -> Result<Self> {
        let mut input = Input::open(path)?;
        let dims = read_header(&mut input, IMAGES_MAGIC, path)?;
        let [count, height, width] = dims[..] else {
            unreachable!("the magic number fixes three dimensions")
        };
        if count == 0 {
            return Err(Error::data(path, "holds no images"));
        }
        if height == 0 || width == 0 {
            return Err(Error::data(
                path,
                format!("holds images of {height}x{width} pixels"),
            ));
        }
        let expected = data_bytes(&dims, path)?;
        if let Some(why) = features_beyond(expected as u64, crate::usage::memory_limit_bytes()) {
            return Err(Error::data(
                path,
                format!("the header {dims:?} calls for {expected} pixels: {why}"),
            ));
        }
        Ok(Images {
            input,
            dims,
            expected,
        })
    }

    fn shape(&self) -> SampleShape {
        SampleShape {
            channels: 1,
            height: self.dims[1],
            width: self.dims[2],
        }
    }

    /// The pixels, scaled to [0, 1].
    fn read(mut self, path: &Path) -> Result<(Vec<f32>, SampleShape)> {
        let pixels = read_body(&mut self.input, &self.dims, self.expected, path)?;
        let features = pixels.iter().map(|&p| p as f32 / 255.0).collect();
        Ok((features, self.shape()))
    }
}

/// Reads and checks the magic number; returns the dimensions it announces.
fn read_header(input: &mut Input, magic: u32, path: &Path) -> Result<Vec<usize>> {
    let mut read_u32 = || -> Result<Option<u32>> {
        let mut word = [0u8; 4];
        let found = read_up_to(&mut input.reader, &mut word).map_err(|e| input.error(path, e))?;
        Ok((found == word.len()).then(|| u32::from_be_bytes(word)))
    };
    let found = read_u32()?.ok_or_else(|| Error::data(path, "too short for an IDX header"))?;
    if found != magic {
        return Err(Error::data(
            path,
            format!("wrong IDX magic number 0x{found:08x}, expected 0x{magic:08x}"),
        ));
    }
    let rank = (magic & 0xff) as usize;
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        let dim = read_u32()?.ok_or_else(|| Error::data(path, "truncated IDX header"))?;
        // A u32 fits a usize on every target this crate builds for (64 bits).
        let dim = usize::try_from(dim).map_err(|_| {
            Error::data(path, format!("dimension {dim} too large for this machine"))
        })?;
        dims.push(dim);
    }
    Ok(dims)
}

/// The data bytes the header's dimensions call for.
fn data_bytes(dims: &[usize], path: &Path) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |product, &d| product.checked_mul(d))
        .ok_or_else(|| {
            Error::data(
                path,
                format!(
                    "the header {dims:?} calls for more data bytes than this machine can address"
                ),
            )
        })
}

/// Reads the `expected` data bytes after the header, and refuses a file that holds fewer or
/// more. The buffer grows with the bytes read: a header that claims billions of images on a
/// short file costs what the file holds, not what it claims.
fn read_body(input: &mut Input, dims: &[usize], expected: usize, path: &Path) -> Result<Vec<u8>> {
    // What the file can hold at most, for a plain file; a start, for a gzip stream.
    let header = 4 + 4 * dims.len() as u64;
    let hint = input.file_size.saturating_sub(header).min(expected as u64);
    let mut data = Vec::new();
    // Only a hint: where the reservation fails the buffer grows as it is read.
    let _ = data.try_reserve_exact(usize::try_from(hint).unwrap_or(0).saturating_add(1));
    let allowed = (expected as u64).saturating_add(1);
    let read = (&mut input.reader).take(allowed).read_to_end(&mut data);
    read.map_err(|e| input.error(path, e))?;
    if data.len() == expected {
        return Ok(data);
    }
    let (what, found) = if data.len() < expected {
        ("truncated", data.len().to_string())
    } else {
        // A plain file's size tells by how much; a gzip stream is not read further.
        let on_disk = input.file_size.saturating_sub(header);
        let found = if !input.gzip && on_disk > expected as u64 {
            on_disk.to_string()
        } else {
            "more".to_string()
        };
        ("longer than its header says", found)
    };
    Err(Error::data(
        path,
        format!(
            "{what}: the header {dims:?} calls for {expected} data bytes, the file has {found}"
        ),
    ))
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

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn error(images: &[u8], labels: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let images = write(dir.path(), "images", images);
        let labels = write(dir.path(), "labels", labels);
        load(&images, &labels).unwrap_err().to_string()
    }

    /// Gzip files in one member or several (as pigz and bgzip write them) read as the plain file.
    #[test]
    fn reads_gzip_files_of_one_member_or_several() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 7) as u8).collect();
        let images = idx(IMAGES_MAGIC, &[3, 4, 5], &pixels);
        let labels = idx(LABELS_MAGIC, &[3], &[2, 0, 1]);
        let plain = load(
            &write(dir.path(), "i", &images),
            &write(dir.path(), "l", &labels),
        )
        .unwrap();
        let split = images.len() / 3;
        let members = [gzip(&images[..split]), gzip(&images[split..])].concat();
        for (name, images) in [("one", gzip(&images)), ("two", members)] {
            let read = load(
                &write(dir.path(), name, &images),
                &write(dir.path(), "l.gz", &gzip(&labels)),
            )
            .unwrap();
            assert_eq!(read.features, plain.features, "{name}");
            assert_eq!(read.labels(), &[2, 0, 1]);
            assert_eq!(read.shape(), plain.shape());
        }
    }

    /// Zero images, or images without a pixel, used to pass the loader and panic in the first
    /// batch; they are refused by the loader, naming the file.
    #[test]
    fn refuses_no_images_and_images_without_pixels() {
        let labels = idx(LABELS_MAGIC, &[0], &[]);
        let none = error(&idx(IMAGES_MAGIC, &[0, 28, 28], &[]), &labels);
        assert!(none.ends_with("images: holds no images"), "{none}");
        let empty = error(&idx(IMAGES_MAGIC, &[3, 0, 0], &[]), &labels);
        assert!(
            empty.ends_with("images: holds images of 0x0 pixels"),
            "{empty}"
        );
        let flat = error(&idx(IMAGES_MAGIC, &[3, 5, 0], &[]), &labels);
        assert!(
            flat.ends_with("images: holds images of 5x0 pixels"),
            "{flat}"
        );
    }

    #[test]
    fn refuses_a_longer_file_plain_or_gzip() {
        let labels = idx(LABELS_MAGIC, &[2], &[1, 2]);
        let images = idx(IMAGES_MAGIC, &[2, 1, 2], &[1, 2, 3, 4, 5, 6]);
        let plain = error(&images, &labels);
        assert!(
            plain.ends_with(
                "longer than its header says: the header [2, 1, 2] calls for 4 data bytes, \
                 the file has 6"
            ),
            "{plain}"
        );
        let gzipped = error(&gzip(&images), &labels);
        assert!(
            gzipped.ends_with("calls for 4 data bytes, the file has more"),
            "{gzipped}"
        );
        let labels_longer = error(
            &idx(IMAGES_MAGIC, &[2, 1, 2], &[1, 2, 3, 4]),
            &idx(LABELS_MAGIC, &[2], &[1, 2, 3]),
        );
        assert!(
            labels_longer.contains("labels: longer than its header says"),
            "{labels_longer}"
        );
    }

    /// A header's claim costs nothing until the bytes are there: billions of images on a short
    /// file are refused as truncated (or as beyond memory), dimensions whose product overflows
    /// by name.
    #[test]
    fn refuses_headers_that_claim_more_than_the_file_or_the_machine_holds() {
        let labels = idx(LABELS_MAGIC, &[1], &[1]);
        let many_labels = idx(LABELS_MAGIC, &[100_000], &[1]);
        let short = error(
            &idx(IMAGES_MAGIC, &[100_000, 28, 28], &[0; 10]),
            &many_labels,
        );
        assert!(
            short.ends_with(
                "truncated: the header [100000, 28, 28] calls for 78400000 data bytes, the file \
                 has 10"
            ),
            "{short}"
        );
        let overflow = error(&idx(IMAGES_MAGIC, &[u32::MAX; 3], &[0; 10]), &labels);
        assert!(
            overflow.ends_with(
                "the header [4294967295, 4294967295, 4294967295] calls for more data bytes than \
                 this machine can address"
            ),
            "{overflow}"
        );
        let huge = error(
            &idx(IMAGES_MAGIC, &[u32::MAX, 1 << 15, 1 << 15], &[0; 10]),
            &labels,
        );
        assert!(
            huge.contains("calls for 4611686017353646080 pixels: as f32 features they take"),
            "{huge}"
        );
        assert!(huge.ends_with("GiB this process may use"), "{huge}");
    }

    /// The headers are matched before either body is read: a label file of another count is
    /// refused without reading the images.
    #[test]
    fn refuses_a_label_count_before_reading_the_images() {
        let images = idx(IMAGES_MAGIC, &[100_000, 28, 28], &[0; 10]);
        let err = error(&images, &idx(LABELS_MAGIC, &[3], &[1, 2, 3]));
        assert!(err.ends_with("images holds 100000 images"), "{err}");
        assert!(err.contains("labels: holds 3 labels but"), "{err}");
    }

    #[test]
    fn refuses_corrupt_gzip_and_short_headers() {
        let labels = idx(LABELS_MAGIC, &[1], &[1]);
        let mut corrupt = gzip(&idx(IMAGES_MAGIC, &[1, 2, 2], &[1, 2, 3, 4]));
        let middle = corrupt.len() / 2;
        corrupt.truncate(middle);
        let truncated = error(&corrupt, &labels);
        assert!(truncated.contains("corrupt gzip stream"), "{truncated}");
        let garbage = error(
            &[0x1f, 0x8b, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            &labels,
        );
        assert!(garbage.contains("corrupt gzip stream"), "{garbage}");
        assert!(error(&[0, 0], &labels).ends_with("too short for an IDX header"));
        assert!(error(&[0, 0, 8, 3, 0, 0, 0, 1, 0], &labels).ends_with("truncated IDX header"));
    }

    #[test]
    fn refuses_a_fifo_or_a_device_without_opening_it() {
        use crate::files::testing::{mkfifo, within_10_s};
        let dir = tempfile::tempdir().unwrap();
        let labels = write(dir.path(), "l", &idx(LABELS_MAGIC, &[1], &[1]));
        let fifo = mkfifo(&dir.path().join("images"));
        let err = within_10_s(move || load(&fifo, &labels).unwrap_err().to_string());
        assert!(
            err.ends_with("images: is a FIFO (named pipe), not a regular file"),
            "{err}"
        );
        let labels = write(dir.path(), "l", &idx(LABELS_MAGIC, &[1], &[1]));
        let zero = load(Path::new("/dev/zero"), &labels)
            .unwrap_err()
            .to_string();
        assert_eq!(zero, "/dev/zero: is a character device, not a regular file");
    }
}
