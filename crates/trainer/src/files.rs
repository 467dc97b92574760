//! Reading input files so that a FIFO, a device or a directory named as one is refused instead
//! of blocking or growing without end; writing files so that a crash leaves either the old file
//! or the new one, never half of it.

use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Why an input file was not read.
#[derive(Debug)]
pub enum ReadError {
    /// Nothing at the path.
    NotFound,
    /// Something other than a regular file: what it is, "a FIFO (named pipe)" for one.
    NotRegular(&'static str),
    /// A regular file of more than `limit` bytes.
    TooLarge { limit: u64 },
    /// The file system refused (permissions, I/O error).
    Io(std::io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::NotFound => f.write_str("not found"),
            ReadError::NotRegular(what) => write!(f, "is {what}, not a regular file"),
            ReadError::TooLarge { limit } => write!(f, "larger than {limit} bytes"),
            ReadError::Io(e) => e.fmt(f),
        }
    }
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::NotFound,
            _ => ReadError::Io(e),
        }
    }
}

/// What a file is when it is not a regular one; `None` for a regular file.
fn irregular(file_type: fs::FileType) -> Option<&'static str> {
    #[cfg(unix)]
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_file() {
        return None;
    }
    if file_type.is_dir() {
        return Some("a directory");
    }
    #[cfg(unix)]
    {
        if file_type.is_fifo() {
            return Some("a FIFO (named pipe)");
        }
        if file_type.is_socket() {
            return Some("a socket");
        }
        if file_type.is_char_device() {
            return Some("a character device");
        }
        if file_type.is_block_device() {
            return Some("a block device");
        }
    }
    Some("a special file")
}

/// Opens `path` for reading if it is a regular file, or a symbolic link to one.
///
/// Opening a FIFO blocks until something writes to it, and a device such as `/dev/zero` never
/// ends: both are refused, by what they are, before they are opened. The file is opened
/// non-blocking and looked at again, so that one swapped in between cannot block the open
/// either.
pub fn open_regular(path: &Path) -> Result<File, ReadError> {
    if let Some(what) = irregular(fs::metadata(path)?.file_type()) {
        return Err(ReadError::NotRegular(what));
    }
    let mut options = fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    if let Some(what) = irregular(file.metadata()?.file_type()) {
        return Err(ReadError::NotRegular(what));
    }
    #[cfg(unix)]
    clear_nonblocking(&file)?;
    Ok(file)
}

/// Back to blocking reads: Linux ignores the flag on a regular file, POSIX leaves it open.
#[cfg(unix)]
fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this `File` owns, with flag arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The whole of the regular file at `path` (see [`open_regular`]), refused when it holds more
/// than `limit` bytes.
pub fn read_regular(path: &Path, limit: Option<u64>) -> Result<Vec<u8>, ReadError> {
    let file = open_regular(path)?;
    let size = file.metadata()?.len();
    let limit = limit.unwrap_or(u64::MAX);
    if size > limit {
        return Err(ReadError::TooLarge { limit });
    }
    // The size is a hint only (a file can grow or shrink while it is read; a sparse one claims
    // what it does not hold): where the reservation fails, the bytes are read all the same.
    let mut bytes = Vec::new();
    let _ = bytes.try_reserve_exact(usize::try_from(size).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it, renames it over `path`, then
/// fsyncs the folder so the rename itself is durable.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = folder.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        File::open(folder)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temporary);
        Error::io(path, e)
    })
}

/// Helpers for tests that name FIFOs as input files.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    /// Makes a FIFO at `path`.
    pub fn mkfifo(path: &Path) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
        path.to_path_buf()
    }

    /// Runs `f` on a thread of its own and gives its result, or fails the test after 10 s: an
    /// open of a FIFO blocks until something writes to it, so a reader that opens one would
    /// hang the test instead of failing it.
    pub fn within_10_s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || send.send(f()));
        receive
            .recv_timeout(Duration::from_secs(10))
            .expect("still reading after 10 s: blocked on a FIFO?")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{mkfifo, within_10_s};
    use super::*;

    fn refusal(path: &Path) -> String {
        let path = path.to_path_buf();
        within_10_s(move || read_regular(&path, None).unwrap_err().to_string())
    }

    #[test]
    fn refuses_fifos_directories_sockets_and_devices_by_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = mkfifo(&dir.path().join("fifo"));
        assert_eq!(refusal(&fifo), "is a FIFO (named pipe), not a regular file");
        assert_eq!(refusal(dir.path()), "is a directory, not a regular file");
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(refusal(&socket), "is a socket, not a regular file");
        assert_eq!(
            refusal(Path::new("/dev/zero")),
            "is a character device, not a regular file"
        );
        assert!(matches!(
            read_regular(&dir.path().join("missing"), None),
            Err(ReadError::NotFound)
        ));
    }

    /// A link is judged by what it leads to.
    #[test]
    fn follows_links_to_what_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"content").unwrap();
        let to_file = dir.path().join("to-file");
        std::os::unix::fs::symlink(&file, &to_file).unwrap();
        assert_eq!(read_regular(&to_file, None).unwrap(), b"content");
        let fifo = mkfifo(&dir.path().join("fifo"));
        let to_fifo = dir.path().join("to-fifo");
        std::os::unix::fs::symlink(&fifo, &to_fifo).unwrap();
        assert_eq!(
            refusal(&to_fifo),
            "is a FIFO (named pipe), not a regular file"
        );
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
        assert!(matches!(
            read_regular(&dangling, None),
            Err(ReadError::NotFound)
        ));
    }

    #[test]
    fn refuses_a_file_past_the_limit() {
        let file = tempfile::NamedTempFile::new().unwrap();
        fs::write(file.path(), b"0123456789").unwrap();
        assert_eq!(read_regular(file.path(), Some(10)).unwrap(), b"0123456789");
        assert!(matches!(
            read_regular(file.path(), Some(9)),
            Err(ReadError::TooLarge { limit: 9 })
        ));
    }

    /// The file is read with blocking reads, as it was opened without the non-blocking flag.
    #[test]
    fn the_open_file_is_left_blocking() {
        use std::os::unix::io::AsRawFd;
        let file = tempfile::NamedTempFile::new().unwrap();
        let opened = open_regular(file.path()).unwrap();
        // SAFETY: F_GETFL on a descriptor the `File` owns.
        let flags = unsafe { libc::fcntl(opened.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
