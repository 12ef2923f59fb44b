//! Opened snapshots kept for reuse: restoring one again skips reading its state and finds
//! pooled shells still mapping its memory (what makes a warm restore flat in RAM size). An
//! entry is opened afresh when its files or any of its diff bases' files change (a snapshot or
//! a base replaced or deleted under the same path), and entries whose files changed are let go
//! at every lookup, so a deleted snapshot's space is freed.

use super::{Snapshot, MEMORY_FILE, STATE_FILE};
use crate::error::Result;
use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What tells one version of a file from another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

/// The identity of the files of the snapshot at `path` and of its diff bases `chain` (`None`
/// when one cannot be read: then nothing is cached).
fn identity(path: &Path, chain: &[PathBuf]) -> Option<Vec<FileIdentity>> {
    let mut files = Vec::new();
    for dir in std::iter::once(path).chain(chain.iter().map(PathBuf::as_path)) {
        if dir.is_dir() {
            files.push(dir.join(STATE_FILE));
            files.push(dir.join(MEMORY_FILE));
        } else {
            files.push(dir.to_path_buf());
        }
    }
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some(FileIdentity {
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            })
        })
        .collect()
}

struct Entry {
    path: PathBuf,
    identity: Vec<FileIdentity>,
    snapshot: Arc<Snapshot>,
}

/// The most recently used snapshots, at most `capacity` of them.
pub struct SnapshotCache {
    entries: Mutex<VecDeque<Entry>>,
    capacity: usize,
}

impl SnapshotCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// The snapshot at `path`: the cached one if its files are unchanged, else opened (and
    /// checked) now.
    pub fn open(&self, path: &Path) -> Result<Arc<Snapshot>> {
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            // Every entry whose files (or bases' files) changed or went is let go.
            entries.retain(|e| identity(&e.path, e.snapshot.chain()).as_ref() == Some(&e.identity));
            if let Some(i) = entries.iter().position(|e| e.path == key) {
                if let Some(entry) = entries.remove(i) {
                    let snapshot = Arc::clone(&entry.snapshot);
                    entries.push_front(entry);
                    return Ok(snapshot);
                }
            }
        }
        // Opened outside the lock: reading a long chain must not hold up other restores.
        let before = identity(&key, &[]);
        let snapshot = Arc::new(Snapshot::open(&key)?);
        // Cached only if its own files did not change while it was opened (its bases are
        // checked by id and checksum as it opens).
        let Some(identity) = identity(&key, snapshot.chain()) else {
            return Ok(snapshot);
        };
        if before.as_deref() != identity.get(..before.as_ref().map_or(0, Vec::len)) {
            return Ok(snapshot);
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|e| e.path != key);
        entries.push_front(Entry {
            path: key,
            identity,
            snapshot: Arc::clone(&snapshot),
        });
        entries.truncate(self.capacity);
        Ok(snapshot)
    }

    /// How many snapshots are kept open.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
