//! Opened snapshots kept for reuse: restoring one again skips reading its state and finds
//! pooled shells still mapping its memory (what makes a warm restore flat in RAM size). An
//! entry is opened afresh when its files change (a snapshot replaced under the same path).

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

/// The identity of a snapshot's files (`None` when one cannot be read: then nothing is cached).
fn identity(path: &Path) -> Option<Vec<FileIdentity>> {
    let files = if path.is_dir() {
        vec![path.join(STATE_FILE), path.join(MEMORY_FILE)]
    } else {
        vec![path.to_path_buf()]
    };
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
        let identity = identity(&key);
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = entries.iter().position(|e| e.path == key) {
                // Taken out: put back only while its files are unchanged.
                if let Some(entry) = entries.remove(i) {
                    if identity.as_ref() == Some(&entry.identity) {
                        let snapshot = Arc::clone(&entry.snapshot);
                        entries.push_front(entry);
                        return Ok(snapshot);
                    }
                }
            }
        }
        let Some(identity) = identity else {
            return Snapshot::open(path).map(Arc::new);
        };
        // Opened outside the lock: reading a long chain must not hold up other restores.
        let snapshot = Arc::new(Snapshot::open(&key)?);
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
