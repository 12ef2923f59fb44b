//! Opening and creating the files a request names: regular files only (a FIFO or a device
//! would block a thread or read without end), read with a size cap, and created owner-only
//! (snapshot files hold guest memory).

use crate::error::{Error, Result};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of files vmfork creates: owner read/write only, whatever the umask.
pub const FILE_MODE: u32 = 0o600;
/// Mode of directories vmfork creates.
pub const DIR_MODE: u32 = 0o700;

/// Opens `path` for reading if it is a regular file. Opening does not block on a FIFO
/// (`O_NONBLOCK`, which means nothing for a regular file once open).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (FIFOs, sockets and devices are refused)",
        ));
    }
    Ok(file)
}

/// Reads a whole regular file of at most `max` bytes; `what` names it in errors.
pub fn read_regular(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let fail =
        |e: std::io::Error| Error::Invalid(format!("cannot read {what} {}: {e}", path.display()));
    let mut file = open_regular(path).map_err(fail)?;
    let len = file.metadata().map_err(fail)?.len();
    if len > max {
        return Err(Error::Invalid(format!(
            "{what} {} is {len} bytes, more than the {max}-byte limit",
            path.display()
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // The file may grow meanwhile: never read past the limit.
    file.by_ref()
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > max {
        return Err(Error::Invalid(format!(
            "{what} {} grew past the {max}-byte limit while being read",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Creates (or truncates) `path` for writing, mode 0600 whatever the umask.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    // An existing file keeps its mode on open: set it.
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Opens where a snapshot stream goes: a FIFO that already exists (a reader waits on it, as
/// `vmfork snapshot VM -` sets up), or a new file (mode 0600). An existing regular file is
/// never overwritten, and devices are refused.
pub fn create_stream_target(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_fifo() => {
            std::fs::OpenOptions::new().write(true).open(path)
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "it exists and is not a FIFO (a stream never overwrites a file)",
        )),
        Err(_) => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path),
    }
}

/// Creates directory `path`, mode 0700 whatever the umask.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(DIR_MODE).create(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("vmfork-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_regular(&fifo, "kernel", 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let err = read_regular(Path::new("/dev/zero"), "initrd", 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let big = dir.join("big");
        std::fs::write(&big, vec![0u8; 4096]).unwrap();
        let err = read_regular(&big, "kernel", 100).unwrap_err().to_string();
        assert!(err.contains("limit"), "{err}");
        assert_eq!(read_regular(&big, "kernel", 4096).unwrap().len(), 4096);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn created_files_and_directories_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vmfork-files-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_private_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let f = dir.join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        create_private(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
