//! Snapshots: a VM on disk, and restore, which is a fork of a snapshot's memory image.
//!
//! A snapshot directory holds `state.vmfs`, the record stream (see `vmfork-format` and
//! docs/snapshot-format.md) with every component's state, and `memory.bin`, guest RAM as a
//! sparse file. Taking one pauses the VM only to save its state and freeze its memory image
//! (what a fork does); the image is written while the VM runs on. A diff snapshot writes only
//! the pages dirtied since the VM's previous snapshot and names that snapshot (id and memory
//! checksum) as its base. Writes go to a temporary directory that is synced and renamed into
//! place, so an interrupted snapshot never appears under the requested name.
//!
//! Memory can instead be embedded in the stream (MEMORY_PAGES records): for pipes (`-`) and
//! small self-contained files such as the golden snapshots the tests keep.
//!
//! `take.rs` takes one (the pause, then the writing), `directory.rs` writes a directory,
//! `stream.rs` writes and reads the record stream, `records.rs` turns state into records and
//! back, `memory_file.rs` and `disks.rs` write and read memory and disks, `open.rs` opens a
//! snapshot and restores it, `cache.rs` keeps opened ones.

mod cache;
mod directory;
mod disks;
mod memory_file;
mod open;
mod records;
mod stream;
mod take;

pub use cache::SnapshotCache;
pub use memory_file::MemoryDigest;
pub use open::{RecordSummary, Snapshot};
pub use records::{BaseRecord, LoadedState, MemoryFileRecord, SnapshotIdRecord, StateRecord};

use crate::devices::SerialSink;
use crate::error::{Error, Result};
use crate::fork::ForkOptions;
use crate::memory::{
    create_memfd, page_runs, DirtyPages, FrozenImage, HostMapping, SnapshotMark, PAGE_SIZE,
};
use crate::vm::{ForkOrigin, ForkSource, Vm};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use vmfork_format::{Header, Reader, Record, RecordType, Writer};

/// The record stream inside a snapshot directory.
pub const STATE_FILE: &str = "state.vmfs";
/// The sparse memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
/// Longest chain of diff snapshots a restore follows.
pub const MAX_CHAIN: usize = 64;

fn producer() -> String {
    format!("vmfork {}", env!("CARGO_PKG_VERSION"))
}

fn problem(path: &Path, problem: impl std::fmt::Display) -> Error {
    Error::Snapshot {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

/// How to take a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Write only the pages dirtied since this VM's previous snapshot (or the snapshot it was
    /// restored from), chained to it.
    pub diff: bool,
}

pub use crate::vm::SnapshotProgress;

/// What a snapshot took.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotReport {
    pub id: String,
    pub path: PathBuf,
    pub diff: bool,
    /// How long the VM was paused (state saved, memory image frozen).
    pub pause_us: u64,
    pub total_us: u64,
    /// Pages examined, and the non-zero ones written.
    pub pages: u64,
    pub data_pages: u64,
}

/// Random bytes for a snapshot id (from the getrandom system call: a jailed server has no
/// /dev/urandom).
fn new_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)
        .map_err(|e| Error::Io(std::io::Error::other(format!("no random bytes: {e}"))))?;
    Ok(id)
}

pub fn hex_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
