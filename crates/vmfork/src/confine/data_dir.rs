//! The one directory a server's API requests may name files in (`vmfork serve --data-dir`):
//! kernels, initrds, flat images and snapshots resolve inside it; `..`, absolute paths
//! elsewhere and symlinks that lead out are refused.
//!
//! Resolution canonicalizes the longest existing part of the path (following its symlinks)
//! and checks that it is still inside the directory, so a link planted in the directory
//! cannot point the server at `/etc/shadow`. It assumes nobody but the server's own user can
//! write into the directory (the server creates it 0700): someone who can would race a
//! check against a use.

use crate::error::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// A server's data directory (canonical, so prefix checks are exact).
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
    /// In a jail (chrooted into the directory, so `root` is `/`): the directory's path outside,
    /// which clients still name it by.
    outside: Option<PathBuf>,
}

impl DataDir {
    /// Opens (creating it, mode 0700, if missing) the data directory at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .create(path)
                .map_err(|e| Error::Invalid(format!("cannot create {}: {e}", path.display())))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                path,
                std::fs::Permissions::from_mode(crate::files::DIR_MODE),
            )?;
        }
        let root = path
            .canonicalize()
            .map_err(|e| Error::Invalid(format!("data directory {}: {e}", path.display())))?;
        if !root.is_dir() {
            return Err(Error::Invalid(format!(
                "data directory {} is not a directory",
                root.display()
            )));
        }
        Ok(Self {
            root,
            outside: None,
        })
    }

    /// This directory as seen from inside a jail chrooted into it: `/`, still named by its
    /// outside path in requests and messages.
    pub fn jailed(&self) -> Self {
        Self {
            root: PathBuf::from("/"),
            outside: Some(self.shown().to_path_buf()),
        }
    }

    /// The directory's path as clients know it.
    fn shown(&self) -> &Path {
        self.outside.as_deref().unwrap_or(&self.root)
    }

    /// The directory itself (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `requested` (relative to the directory, or absolute inside it) is, or why it may
    /// not be used: [`Error::Forbidden`] for anything outside the directory.
    pub fn resolve(&self, requested: &Path) -> Result<PathBuf> {
        let outside = |why: &str| {
            Error::Forbidden(format!(
                "{} {why}: this server reads and writes files only inside its data directory {} \
                 (--data-dir); name a path inside it (a relative path in a request is taken from \
                 it)",
                requested.display(),
                self.shown().display()
            ))
        };
        if requested.as_os_str().is_empty() {
            return Err(Error::Invalid("an empty path names no file".into()));
        }
        if requested.components().any(|c| c == Component::ParentDir) {
            return Err(outside("has a '..' component"));
        }
        let requested_here;
        let requested = match &self.outside {
            // Jailed: an absolute path must name the directory by its outside path.
            Some(outside_path) if requested.is_absolute() => {
                let inner = requested
                    .strip_prefix(outside_path)
                    .map_err(|_| outside("is not inside it"))?;
                requested_here = self.root.join(inner);
                requested_here.as_path()
            }
            _ => requested,
        };
        let joined = if requested.is_absolute() {
            // Compared lexically first (the caller may name the directory by a symlink to it:
            // then the canonical form of its existing part decides).
            requested.to_path_buf()
        } else {
            self.root.join(requested)
        };
        // The longest part that exists, canonicalized (its symlinks followed), plus the rest.
        let mut existing = joined.as_path();
        let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
        let canonical = loop {
            match existing.canonicalize() {
                Ok(c) => break c,
                Err(_) => {
                    // A dangling symlink must not be created through: refuse it.
                    if std::fs::symlink_metadata(existing).is_ok() {
                        return Err(outside("is a symbolic link that leads nowhere"));
                    }
                    match (existing.parent(), existing.file_name()) {
                        (Some(parent), Some(name)) => {
                            rest.push(name);
                            existing = parent;
                        }
                        _ => return Err(outside("is not inside it")),
                    }
                }
            }
        };
        if !canonical.starts_with(&self.root) {
            return Err(outside(if requested.is_absolute() {
                "is not inside it"
            } else {
                "leads out of it through a symbolic link"
            }));
        }
        let mut resolved = canonical;
        for name in rest.into_iter().rev() {
            resolved.push(name);
        }
        // The directory itself is no file to read, and a snapshot written "into" it would be
        // staged beside it, outside.
        if resolved == self.root {
            return Err(outside(
                "is the data directory itself, not a file inside it",
            ));
        }
        Ok(resolved)
    }
}

/// Where a server keeps its files by default: `/var/lib/vmfork` for root, else
/// `$XDG_STATE_HOME/vmfork` (or `~/.local/state/vmfork`).
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no failure mode and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/vmfork");
    }
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(state).join("vmfork");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/state/vmfork")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmfork-datadir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn paths_resolve_inside_and_nowhere_else() {
        let top = scratch("paths");
        let data = DataDir::open(&top.join("data")).unwrap();
        let root = data.root().to_path_buf();
        std::fs::create_dir(root.join("kernels")).unwrap();
        std::fs::write(root.join("kernels/k"), b"x").unwrap();
        // Relative, absolute inside, and not yet existing (a snapshot to create) all resolve.
        assert_eq!(
            data.resolve(Path::new("kernels/k")).unwrap(),
            root.join("kernels/k")
        );
        assert_eq!(
            data.resolve(&root.join("kernels/k")).unwrap(),
            root.join("kernels/k")
        );
        assert_eq!(
            data.resolve(Path::new("snaps/new")).unwrap(),
            root.join("snaps/new")
        );
        let forbidden = |p: &Path| matches!(data.resolve(p), Err(Error::Forbidden(_)));
        assert!(forbidden(Path::new("/etc/shadow")));
        assert!(forbidden(Path::new("../outside")));
        assert!(forbidden(Path::new("kernels/../../outside")));
        assert!(forbidden(&top.join("sibling")));
        // Symlinks out (to a file, to a directory, or dangling) are refused.
        std::os::unix::fs::symlink("/etc/shadow", root.join("shadow")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/x", root.join("dangling")).unwrap();
        assert!(forbidden(Path::new("shadow")));
        assert!(forbidden(Path::new("etc/passwd")));
        assert!(forbidden(Path::new("etc/new-file")));
        assert!(forbidden(Path::new("dangling")));
        // A symlink that stays inside is fine.
        std::os::unix::fs::symlink(root.join("kernels"), root.join("k2")).unwrap();
        assert_eq!(
            data.resolve(Path::new("k2/k")).unwrap(),
            root.join("kernels/k")
        );
        assert!(matches!(
            data.resolve(Path::new("")),
            Err(Error::Invalid(_))
        ));
        assert!(forbidden(Path::new(".")));
        assert!(forbidden(&root));
        let _ = std::fs::remove_dir_all(&top);
    }

    #[test]
    fn a_jailed_directory_is_the_root_named_by_its_outside_path() {
        let top = scratch("jailed");
        let data = DataDir::open(&top).unwrap();
        let jailed = data.jailed();
        let outside = data.root().join("snaps/one");
        assert_eq!(jailed.resolve(&outside).unwrap(), Path::new("/snaps/one"));
        assert_eq!(
            jailed.resolve(Path::new("snaps/one")).unwrap(),
            Path::new("/snaps/one")
        );
        let err = jailed.resolve(Path::new("/etc/shadow")).unwrap_err();
        assert!(matches!(err, Error::Forbidden(_)), "{err}");
        assert!(err.to_string().contains(&data.root().display().to_string()));
        let _ = std::fs::remove_dir_all(&top);
    }

    #[test]
    fn a_new_data_directory_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let top = scratch("mode");
        let data = DataDir::open(&top.join("a/b")).unwrap();
        let mode = std::fs::metadata(data.root()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(top.join("file"), b"x").unwrap();
        assert!(DataDir::open(&top.join("file")).is_err());
        let _ = std::fs::remove_dir_all(&top);
    }
}
