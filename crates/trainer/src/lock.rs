//! One process owns a run (or sweep) folder at a time.
//!
//! The lock is the operating system's exclusive advisory lock (`flock`, through the standard
//! library's `File::try_lock`) on the folder itself: the system releases it when its holder
//! exits or dies, so a crashed run never leaves a stale lock behind, and taking it writes
//! nothing, so a folder that is then refused is left exactly as it was. Once a process owns a
//! folder it records its pid in [`OWNER_FILE`], for the message a second process gets.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The file in an owned folder that names the process holding it (`pid 1234`).
pub const OWNER_FILE: &str = ".owner";

/// The exclusive lock on a folder, held until it is dropped.
#[derive(Debug)]
pub struct FolderLock {
    folder: File,
}

impl Drop for FolderLock {
    /// Unlocks before the file closes: a child process forked by another thread shares the open
    /// file (until it runs its program, which closes it), and closing this copy alone would
    /// leave the folder locked for that moment; unlocking releases it for every copy.
    fn drop(&mut self) {
        let _ = self.folder.unlock();
    }
}

impl FolderLock {
    /// Takes the lock of the folder at `path` (which must exist), or refuses at once, naming
    /// the process that holds it.
    pub fn acquire(path: &Path) -> Result<Self> {
        let refuse = |message: String| Error::RunDir {
            path: path.to_path_buf(),
            message,
        };
        let folder =
            File::open(path).map_err(|e| refuse(format!("cannot open the folder: {e}")))?;
        match folder.try_lock() {
            Ok(()) => Ok(Self { folder }),
            Err(fs::TryLockError::WouldBlock) => Err(refuse(format!(
                "is in use by another allcores process{}: wait for it to end, or choose another \
                 folder",
                holder(path).map_or(String::new(), |pid| format!(" (pid {pid})"))
            ))),
            Err(fs::TryLockError::Error(e)) => Err(refuse(format!("cannot lock the folder: {e}"))),
        }
    }

    /// Records this process as the folder's holder: call once the folder is this process's to
    /// write.
    pub fn record_owner(&self, path: &Path) -> Result<()> {
        let owner = path.join(OWNER_FILE);
        fs::write(&owner, format!("pid {}\n", std::process::id())).map_err(|e| Error::io(&owner, e))
    }
}

/// The pid recorded by the folder's holder, when it has recorded one.
fn holder(path: &Path) -> Option<u32> {
    // Read as any input: an owner record that is a FIFO must not block the refusal.
    let bytes = crate::files::read_regular(&path.join(OWNER_FILE), Some(64)).ok()?;
    std::str::from_utf8(&bytes)
        .ok()?
        .trim()
        .strip_prefix("pid ")?
        .parse()
        .ok()
}

/// Makes (or takes, while it is empty) the folder of a new run or sweep at `path`, and takes its
/// lock. With `numbered`, an existing `path` is passed over for the first free `path-2`,
/// `path-3`... (default folders are named by the second they start in: two started in one
/// second must not meet). Returns the folder, recorded as this process's, and its lock.
pub fn claim_new_folder(path: &Path, numbered: bool) -> Result<(PathBuf, FolderLock)> {
    let folder_error = |path: &Path, message: String| Error::RunDir {
        path: path.to_path_buf(),
        message,
    };
    // A folder that cannot be made (a file in its path, a read-only file system, no
    // permission) is the --out the user gave: bad input, not a failed run.
    let cannot_create =
        |e: std::io::Error| folder_error(path, format!("cannot create the folder: {e}"));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(cannot_create)?;
    }
    let path = match numbered {
        true => create_numbered(path).map_err(cannot_create)?,
        false => match fs::create_dir(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(cannot_create(e));
            }
            _ => path.to_path_buf(),
        },
    };
    // Only the lock's holder looks inside: two processes started at once on one folder cannot
    // both find it empty.
    let lock = FolderLock::acquire(&path)?;
    let empty = is_empty_folder(&path)
        .map_err(|e| folder_error(&path, format!("cannot use the folder: {e}")))?;
    if !empty {
        return Err(folder_error(
            &path,
            "already exists and is not empty: choose another --out".into(),
        ));
    }
    lock.record_owner(&path)?;
    Ok((path, lock))
}

/// Creates the first of `path`, `path-2`, `path-3`... that does not exist yet: `create_dir`
/// fails on an existing folder, so two processes never get the same one.
fn create_numbered(path: &Path) -> std::io::Result<PathBuf> {
    for n in 1u32.. {
        let candidate = match n {
            1 => path.to_path_buf(),
            _ => {
                let mut name = path.as_os_str().to_owned();
                name.push(format!("-{n}"));
                PathBuf::from(name)
            }
        };
        match fs::create_dir(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("one of 4 billion names is free")
}

/// Whether `path` holds nothing but an owner record: a folder a new run may use.
pub fn is_empty_folder(path: &Path) -> std::io::Result<bool> {
    for entry in fs::read_dir(path)? {
        if entry?.file_name() != OWNER_FILE {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = FolderLock::acquire(dir.path()).unwrap();
        // Before the holder records itself the message has no pid; nothing was written.
        let err = FolderLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("is in use by another allcores process:"),
            "{err}"
        );
        assert!(is_empty_folder(dir.path()).unwrap());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

        first.record_owner(dir.path()).unwrap();
        let err = FolderLock::acquire(dir.path()).unwrap_err();
        assert!(err.is_bad_input());
        let pid = std::process::id();
        assert!(err.to_string().contains(&format!("(pid {pid})")), "{err}");
        assert!(
            is_empty_folder(dir.path()).unwrap(),
            "the owner record alone"
        );

        drop(first);
        FolderLock::acquire(dir.path()).unwrap();
        fs::write(dir.path().join("x"), "").unwrap();
        assert!(!is_empty_folder(dir.path()).unwrap());
    }
}
