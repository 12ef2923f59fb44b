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

mod cache;
mod disks;
mod memory_file;
mod records;

pub use cache::SnapshotCache;
pub use memory_file::MemoryDigest;
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

/// Marks a VM as writing a snapshot until dropped; refuses a second one at the same time
/// (both would hand the same diff base over).
struct ProgressSlot<'a> {
    slot: &'a std::sync::Mutex<Option<SnapshotProgress>>,
}

impl<'a> ProgressSlot<'a> {
    fn claim(vm: &'a Vm, path: &Path) -> Result<Self> {
        let slot = &vm.shared().snapshot_progress;
        let mut current = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(busy) = current.as_ref() {
            return Err(Error::Busy(format!(
                "snapshot {}: VM {} is already writing a snapshot to {} (one at a time)",
                path.display(),
                vm.id(),
                busy.path.display()
            )));
        }
        *current = Some(SnapshotProgress {
            path: path.to_path_buf(),
            pages_done: 0,
            pages_total: 0,
        });
        Ok(Self { slot })
    }

    fn update(&self, pages_done: u64, pages_total: u64) {
        let mut current = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(progress) = current.as_mut() {
            progress.pages_done = pages_done;
            progress.pages_total = pages_total;
        }
    }
}

impl Drop for ProgressSlot<'_> {
    fn drop(&mut self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

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

/// What was frozen at the snapshot instant.
struct Frozen {
    state: crate::state::VmState,
    image: Arc<FrozenImage>,
    /// Pages to write: all of the image, or those dirtied since the base.
    pages: Vec<u64>,
    base: Option<BaseRecord>,
    previous: Option<SnapshotMark>,
    id: [u8; 16],
}

impl Frozen {
    fn report(
        &self,
        path: &Path,
        pause: std::time::Duration,
        started: Instant,
        digest: MemoryDigest,
    ) -> SnapshotReport {
        SnapshotReport {
            id: hex_id(&self.id),
            path: path.to_path_buf(),
            diff: self.base.is_some(),
            pause_us: pause.as_micros() as u64,
            total_us: started.elapsed().as_micros() as u64,
            pages: self.pages.len() as u64,
            data_pages: digest.data_pages,
        }
    }
}

impl Vm {
    /// Snapshots this VM into directory `dir` (which must not exist, or be empty). A running VM
    /// is paused only while its state is saved and its memory image frozen.
    pub fn snapshot(&self, dir: &Path, opts: &SnapshotOptions) -> Result<SnapshotReport> {
        self.snapshot_with_progress(dir, opts, &mut |_, _| {})
    }

    /// [`Self::snapshot`], calling `progress(pages_done, pages_total)` as memory is written.
    pub fn snapshot_with_progress(
        &self,
        dir: &Path,
        opts: &SnapshotOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SnapshotReport> {
        let started = Instant::now();
        let target = Target::prepare(dir)?;
        let slot = ProgressSlot::claim(self, &target.path)?;
        let mut frozen = self.freeze_for_snapshot(&target.path, opts)?;
        let pause = self.last_pause().unwrap_or_default();
        let written = target.write(self, &mut frozen, &mut |done, total| {
            slot.update(done, total);
            progress(done, total);
        });
        self.settle_snapshot_mark(&frozen, written.as_ref().ok().map(|d| d.crc32));
        Ok(frozen.report(&target.path, pause, started, written?))
    }

    /// Writes a snapshot with its memory embedded to `out` (a pipe, a socket, a file).
    pub fn snapshot_to_stream(&self, out: impl Write) -> Result<SnapshotReport> {
        let started = Instant::now();
        let slot = ProgressSlot::claim(self, Path::new("-"))?;
        let frozen = self.freeze_for_snapshot(Path::new("-"), &SnapshotOptions::default())?;
        let pause = self.last_pause().unwrap_or_default();
        let written = write_embedded(self, &frozen, out, &mut |done, total| {
            slot.update(done, total)
        });
        // A stream has no directory a later diff could name as its base.
        self.settle_snapshot_mark(&frozen, None);
        Ok(frozen.report(Path::new("-"), pause, started, written?))
    }

    /// How far the snapshot this VM is writing has got; `None` when it is writing none.
    pub fn snapshot_progress(&self) -> Option<SnapshotProgress> {
        self.shared()
            .snapshot_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Pre-copies, pauses (if running), saves the state, freezes the memory image, starts
    /// tracking pages for the next diff, and resumes: one operation on the VM.
    fn freeze_for_snapshot(&self, dir: &Path, opts: &SnapshotOptions) -> Result<Frozen> {
        let (mut frozen, diff) =
            self.at_one_instant(false, |image| self.freeze_paused(dir, opts, image))?;
        // Listing the pages to write takes milliseconds for a large image: done after the VM
        // runs again, from the frozen image.
        let pages = match diff {
            Some(dirty) => Ok(dirty.offsets().collect()),
            None => memory_file::full_pages(&frozen.image),
        };
        match pages {
            Ok(pages) => frozen.pages = pages,
            Err(e) => {
                self.settle_snapshot_mark(&frozen, None);
                return Err(e);
            }
        }
        Ok(frozen)
    }

    fn freeze_paused(
        &self,
        dir: &Path,
        opts: &SnapshotOptions,
        image: Arc<FrozenImage>,
    ) -> Result<(Frozen, Option<DirtyPages>)> {
        let state = self.save_state()?;
        let id = new_id()?;
        // Everything that can fail comes before the diff base is handed over below.
        let mut tracking = self.tracking();
        let previous = tracking.since_snapshot.take();
        let (diff, base) = match (&previous, opts.diff) {
            (_, false) => (None, None),
            (Some(prev), true) => (
                Some(prev.dirty.clone()),
                Some(BaseRecord {
                    id: prev.id,
                    memory_crc32: prev.memory_crc32,
                    path: prev.dir.display().to_string(),
                }),
            ),
            _ => {
                tracking.since_snapshot = previous;
                return Err(problem(
                    dir,
                    "a diff snapshot needs an earlier snapshot of this VM (or a VM restored from \
                     one); take a full snapshot first",
                ));
            }
        };
        tracking.since_snapshot = Some(SnapshotMark {
            id,
            memory_crc32: 0,
            dir: dir.to_path_buf(),
            dirty: DirtyPages::new(self.ram().size()),
            disks: disks::instants(&state),
        });
        drop(tracking);
        let frozen = Frozen {
            state,
            image,
            pages: Vec::new(),
            base,
            previous,
            id,
        };
        Ok((frozen, diff))
    }

    /// After writing: on success the new snapshot becomes the base of the next diff (with its
    /// memory checksum); on failure the previous one stays, with every page dirtied since it.
    fn settle_snapshot_mark(&self, frozen: &Frozen, written_crc: Option<u32>) {
        let mut tracking = self.tracking();
        let current = tracking.since_snapshot.take();
        tracking.since_snapshot = match (current, written_crc) {
            (Some(mut mark), Some(crc)) if mark.id == frozen.id => {
                mark.memory_crc32 = crc;
                Some(mark)
            }
            (Some(mark), _) if mark.id == frozen.id => frozen.previous.as_ref().map(|prev| {
                let mut dirty = prev.dirty.clone();
                dirty.union(&mark.dirty);
                SnapshotMark {
                    id: prev.id,
                    memory_crc32: prev.memory_crc32,
                    dir: prev.dir.clone(),
                    dirty,
                    disks: prev.disks.clone(),
                }
            }),
            (other, _) => other,
        };
    }
}

/// Removes `PREFIX<pid>` directories in `parent` left by snapshot writers that died (killed
/// mid-write); one whose process still lives may be a snapshot being written and stays.
fn remove_abandoned_partials(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Where a snapshot directory is written: a temporary sibling, renamed into place when done.
struct Target {
    path: PathBuf,
    temp: PathBuf,
}

impl Target {
    fn prepare(dir: &Path) -> Result<Self> {
        let name = dir
            .file_name()
            .ok_or_else(|| problem(dir, "not a directory name"))?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let parent = parent
            .canonicalize()
            .map_err(|e| problem(dir, format!("its parent directory: {e}")))?;
        let path = parent.join(name);
        if path.exists() {
            let empty = std::fs::read_dir(&path)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(problem(
                    &path,
                    "already exists and is not an empty directory (snapshots are never \
                     overwritten)",
                ));
            }
        }
        let prefix = format!(".{}.partial-", name.to_string_lossy());
        remove_abandoned_partials(&parent, &prefix);
        let temp = parent.join(format!("{prefix}{}", std::process::id()));
        Ok(Self { path, temp })
    }

    fn write(
        &self,
        vm: &Vm,
        frozen: &mut Frozen,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<MemoryDigest> {
        let _ = std::fs::remove_dir_all(&self.temp);
        crate::files::create_private_dir(&self.temp).map_err(|e| problem(&self.temp, e))?;
        let result = self.write_into_temp(vm, frozen, progress);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&self.temp);
        }
        result
    }

    fn write_into_temp(
        &self,
        vm: &Vm,
        frozen: &mut Frozen,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<MemoryDigest> {
        let size = vm.ram().size();
        let memory = crate::files::create_private(&self.temp.join(MEMORY_FILE))
            .map_err(|e| problem(&self.temp, e))?;
        memory.set_len(size).map_err(|e| problem(&self.temp, e))?;
        let digest = memory_file::write_pages(&frozen.image, &memory, &frozen.pages, progress)?;
        memory.sync_all().map_err(|e| problem(&self.temp, e))?;
        let record = MemoryFileRecord {
            name: MEMORY_FILE.into(),
            size,
            diff_runs: if frozen.base.is_some() {
                page_runs(frozen.pages.iter().copied())
            } else {
                Vec::new()
            },
            data_pages: digest.data_pages,
            crc32: digest.crc32,
        };
        // The disks as of the same instant as the memory (their state was saved in the pause);
        // a diff's, only what changed since its base.
        let since = match (&frozen.base, &frozen.previous) {
            (Some(_), Some(previous)) => Some(previous.disks.as_slice()),
            _ => None,
        };
        disks::write_disk_files(&self.temp, &mut frozen.state, since)?;
        let state = crate::files::create_private(&self.temp.join(STATE_FILE))
            .map_err(|e| problem(&self.temp, e))?;
        let flags = if frozen.base.is_some() {
            vmfork_format::HEADER_DIFF
        } else {
            0
        };
        let out = write_state(
            vm,
            frozen,
            &record,
            BufWriter::new(state),
            flags,
            |_| Ok(()),
        )?;
        let state = out
            .into_inner()
            .map_err(|e| problem(&self.temp, e.error()))?;
        state.sync_all().map_err(|e| problem(&self.temp, e))?;
        sync_dir(&self.temp)?;
        std::fs::rename(&self.temp, &self.path).map_err(|e| problem(&self.path, e))?;
        if let Some(parent) = self.path.parent() {
            sync_dir(parent)?;
        }
        Ok(digest)
    }
}

/// The CPU features the snapshot's VM was made without, from its saved CPUID: its restores
/// take shells with the same CPUID.
fn hidden_cpu_features(loaded: &mut LoadedState) -> Result<()> {
    if let Some(vcpu) = loaded.state.vcpus.first() {
        let supported = &crate::vm::KvmSystem::get()?.supported_cpuid;
        loaded.config.hide_cpu_features = crate::boot::cpuid::hidden_in(&vcpu.cpuid, supported);
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| problem(dir, format!("sync: {e}")))
}

/// Writes the state records (and whatever `extra` adds before END) as one stream.
fn write_state<W: Write>(
    vm: &Vm,
    frozen: &Frozen,
    memory: &MemoryFileRecord,
    out: W,
    flags: u32,
    extra: impl FnOnce(&mut Writer<W>) -> Result<()>,
) -> Result<W> {
    let here = Path::new("-");
    let id = SnapshotIdRecord {
        id: frozen.id,
        created_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let records = records::save_records(
        vm.config(),
        &frozen.state,
        &id,
        memory,
        frozen.base.as_ref(),
    )
    .map_err(|e| problem(here, e))?;
    let format = |e: vmfork_format::FormatError| problem(here, e);
    let mut writer = Writer::new(out, &Header::new(&producer(), flags)).map_err(format)?;
    for (kind, instance, body) in records {
        writer
            .record(kind as u32, instance, 0, &body)
            .map_err(format)?;
    }
    extra(&mut writer)?;
    writer.finish().map_err(format)
}

/// A snapshot with its memory embedded as MEMORY_PAGES records.
fn write_embedded(
    vm: &Vm,
    frozen: &Frozen,
    out: impl Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MemoryDigest> {
    let here = Path::new("-");
    // A first pass finds the non-zero stretches and the digest (the MEMORY_FILE record needs
    // it); the second reads each stretch again into its MEMORY_PAGES record.
    let mut stretches = Vec::new();
    let digest = memory_file::scan_pages(
        &frozen.image,
        &frozen.pages,
        &mut |_, _| {},
        &mut |b, at| {
            stretches.push((at, b.len() as u64 / PAGE_SIZE));
            Ok(())
        },
    )?;
    let record = MemoryFileRecord {
        name: String::new(),
        size: vm.ram().size(),
        diff_runs: Vec::new(),
        data_pages: digest.data_pages,
        crc32: digest.crc32,
    };
    let image = &frozen.image;
    write_state(
        vm,
        frozen,
        &record,
        BufWriter::new(out),
        vmfork_format::HEADER_MEMORY_EMBEDDED,
        |writer| {
            let total = frozen.pages.len() as u64;
            for &(at, n) in &stretches {
                let mut body = vec![0u8; 16 + (n * PAGE_SIZE) as usize];
                body[..8].copy_from_slice(&at.to_le_bytes());
                body[8..16].copy_from_slice(&n.to_le_bytes());
                image.read_range(at, &mut body[16..])?;
                writer
                    .record(RecordType::MemoryPages as u32, 0, 0, &body)
                    .map_err(|e| problem(here, e))?;
                // Zero pages are skipped, so count by position in the page list.
                let done = frozen.pages.partition_point(|&p| p < at + n * PAGE_SIZE) as u64;
                progress(done, total);
            }
            // The disks as of the same instant as the memory.
            disks::write_disk_records(writer, &frozen.state)?;
            progress(total, total);
            Ok(())
        },
    )?
    .flush()
    .map_err(|e| problem(here, e))?;
    Ok(digest)
}

/// One record as `snapshot info` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecordSummary {
    pub name: String,
    pub instance: u32,
    pub flags: u32,
    pub offset: u64,
    pub length: u64,
}

/// An opened snapshot: its checked state and its memory image (a diff chain already folded
/// in). Restoring it many times shares the memory file's page cache.
pub struct Snapshot {
    path: PathBuf,
    header: Header,
    loaded: LoadedState,
    records: Vec<RecordSummary>,
    /// Base snapshots, nearest first.
    chain: Vec<PathBuf>,
    image: Arc<FrozenImage>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("path", &self.path)
            .field("id", &hex_id(&self.loaded.id.id))
            .finish()
    }
}

/// Reads and checks a state stream: every record's checksum, the END digest, and the
/// components' consistency (in any record order). MEMORY_PAGES and DISK_CHUNKS records go to
/// `bulk`.
fn read_state(
    path: &Path,
    input: impl Read,
    mut bulk: impl FnMut(&Record) -> Result<()>,
) -> Result<(Header, LoadedState, Vec<RecordSummary>)> {
    let format = |e: vmfork_format::FormatError| problem(path, e);
    let mut reader = Reader::new(input).map_err(format)?;
    let mut kept = Vec::new();
    let mut summary = Vec::new();
    while let Some(record) = reader.next_record().map_err(format)? {
        summary.push(RecordSummary {
            name: record.name(),
            instance: record.instance,
            flags: record.flags,
            offset: record.offset,
            length: record.body.len() as u64,
        });
        if matches!(
            record.known_type(),
            Some(RecordType::MemoryPages | RecordType::DiskChunks)
        ) {
            if record.flags & vmfork_format::FLAG_IGNORE == 0 {
                bulk(&record)?;
            }
        } else {
            kept.push(record);
        }
    }
    let header = reader.header.clone();
    let loaded = records::load_records(&kept).map_err(|e| problem(path, e))?;
    let embedded = header.flags & vmfork_format::HEADER_MEMORY_EMBEDDED != 0;
    if embedded != loaded.memory.name.is_empty() {
        return Err(problem(
            path,
            "header and MEMORY_FILE record disagree on whether memory is embedded",
        ));
    }
    let diff = header.flags & vmfork_format::HEADER_DIFF != 0;
    if diff != loaded.base.is_some() {
        return Err(problem(
            path,
            "header and BASE record disagree on whether this is a diff snapshot",
        ));
    }
    Ok((header, loaded, summary))
}

impl Snapshot {
    /// Opens a snapshot directory (or a stream file with embedded memory): checks the stream,
    /// the memory file's size, and the chain of bases by id and checksum. Memory is mapped,
    /// not read.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_at_depth(path, 0)
    }

    fn open_at_depth(path: &Path, depth: usize) -> Result<Self> {
        if depth > MAX_CHAIN {
            return Err(problem(
                path,
                format!("diff chain longer than {MAX_CHAIN} snapshots (or a loop)"),
            ));
        }
        if path.is_file() {
            let file = crate::files::open_regular(path).map_err(|e| problem(path, e))?;
            return Self::from_stream(path, BufReader::new(file));
        }
        let state_path = path.join(STATE_FILE);
        let state = crate::files::open_regular(&state_path).map_err(|e| {
            problem(
                path,
                format!("cannot open {STATE_FILE}: {e} (is this a snapshot directory?)"),
            )
        })?;
        let (header, mut loaded, records) = read_state(path, BufReader::new(state), |record| {
            match record.known_type() {
                Some(RecordType::DiskChunks) => Err(problem(
                    path,
                    "a directory snapshot's disks are in their files, not in DISK_CHUNKS records",
                )),
                _ => Ok(()),
            }
        })?;
        disks::open_disk_files(path, &mut loaded.state)?;
        hidden_cpu_features(&mut loaded)?;
        if loaded.memory.name != MEMORY_FILE {
            return Err(problem(
                path,
                format!(
                    "memory file name {:?} is not {MEMORY_FILE}",
                    loaded.memory.name
                ),
            ));
        }
        let memory_path = path.join(MEMORY_FILE);
        let memory = crate::files::open_regular(&memory_path)
            .map_err(|e| problem(path, format!("cannot open {MEMORY_FILE}: {e}")))?;
        let len = memory.metadata().map_err(|e| problem(path, e))?.len();
        if len != loaded.memory.size {
            return Err(problem(
                path,
                format!(
                    "{MEMORY_FILE} is {len} bytes, the snapshot's RAM is {} bytes",
                    loaded.memory.size
                ),
            ));
        }
        // The file may be changed under the VMs that will map it: guard it (a truncation or a
        // write then fails those VMs, never the process).
        let memory = Arc::new(memory);
        crate::memory::file_guard::guard(&memory, &memory_path)?;
        let (image, chain) = match &loaded.base {
            None => (
                FrozenImage::from_file(loaded.state.memory.clone(), Arc::clone(&memory))?,
                Vec::new(),
            ),
            Some(base_ref) => {
                let base_path = PathBuf::from(&base_ref.path);
                let base = Self::open_at_depth(&base_path, depth + 1).map_err(|e| {
                    problem(path, format!("its base snapshot {}: {e}", base_ref.path))
                })?;
                if base.loaded.id.id != base_ref.id
                    || base.loaded.memory.crc32 != base_ref.memory_crc32
                {
                    return Err(problem(
                        path,
                        format!(
                            "its base {} is a different snapshot (id {}, expected {})",
                            base_ref.path,
                            hex_id(&base.loaded.id.id),
                            hex_id(&base_ref.id)
                        ),
                    ));
                }
                if base.loaded.config.mem_bytes != loaded.config.mem_bytes {
                    return Err(problem(path, "its base has a different RAM size"));
                }
                let view = HostMapping::map_file_readonly(memory.as_fd(), len as usize)?;
                let pages = loaded
                    .memory
                    .diff_runs
                    .iter()
                    .flat_map(|&(first, n)| (0..n).map(move |i| first + i * PAGE_SIZE));
                let image = base.image.with_pages_from(&view, pages)?;
                // A diff's disk files hold the chunks written since the base: layers over the
                // base's disks.
                disks::stack_on_base(path, &mut loaded.state, &base.loaded.state)?;
                // Copied: a page read past a truncation would have come in as zeroes.
                if let Some(why) = crate::memory::file_guard::damage(&memory) {
                    return Err(problem(path, why));
                }
                let mut chain = vec![base_path];
                chain.extend(base.chain);
                (image, chain)
            }
        };
        Ok(Snapshot {
            path: path.to_path_buf(),
            header,
            loaded,
            records,
            chain,
            image,
        })
    }

    /// Reads a snapshot with embedded memory from a stream (a pipe, or a file) into memory.
    pub fn from_stream(path: &Path, input: impl Read) -> Result<Self> {
        let memfd = create_memfd("vmfork-restore", 0)?;
        let mut highest = 0u64;
        let mut disks = disks::StreamDisks::default();
        let (header, mut loaded, records) = read_state(path, input, |record| {
            if record.known_type() == Some(RecordType::DiskChunks) {
                return disks.add(path, record);
            }
            let body = &record.body;
            let bad = || {
                problem(
                    path,
                    format!("MEMORY_PAGES record at byte {} is malformed", record.offset),
                )
            };
            let first = u64::from_le_bytes(
                body.get(0..8)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            );
            let count = u64::from_le_bytes(
                body.get(8..16)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            );
            let len = count.checked_mul(PAGE_SIZE).ok_or_else(bad)?;
            if first % PAGE_SIZE != 0 || body.len() as u64 != 16 + len {
                return Err(bad());
            }
            let end = first.checked_add(len).ok_or_else(bad)?;
            // Checked against the RAM size once VM_CONFIG is known (records come in any order);
            // until then, against what this host could give a VM.
            if end > crate::memory::host_memory_bytes().unwrap_or(u64::MAX) {
                return Err(bad());
            }
            memfd
                .write_all_at(&body[16..], first)
                .map_err(|e| problem(path, e))?;
            highest = highest.max(end);
            Ok(())
        })?;
        if header.flags & vmfork_format::HEADER_MEMORY_EMBEDDED == 0 {
            return Err(problem(
                path,
                "this stream's memory is in a separate file; open its directory instead",
            ));
        }
        hidden_cpu_features(&mut loaded)?;
        disks.attach(path, &mut loaded.state)?;
        if highest > loaded.memory.size {
            return Err(problem(path, "embedded pages lie outside the VM's RAM"));
        }
        memfd
            .set_len(loaded.memory.size)
            .map_err(|e| problem(path, e))?;
        let image = FrozenImage::from_file(loaded.state.memory.clone(), Arc::new(memfd))?;
        let snapshot = Snapshot {
            path: path.to_path_buf(),
            header,
            loaded,
            records,
            chain: Vec::new(),
            image,
        };
        let digest = snapshot.memory_digest_of_image()?;
        if digest.crc32 != snapshot.loaded.memory.crc32
            || digest.data_pages != snapshot.loaded.memory.data_pages
        {
            return Err(problem(path, "embedded memory does not match its checksum"));
        }
        Ok(snapshot)
    }

    fn memory_digest_of_image(&self) -> Result<MemoryDigest> {
        let pages = memory_file::full_pages(&self.image)?;
        memory_file::scan_pages(&self.image, &pages, &mut |_, _| {}, &mut |_, _| Ok(()))
    }

    /// A new VM (not started) in the snapshot's state, its serial port printing to `sink`.
    pub fn restore(&self, sink: SerialSink) -> Result<Vm> {
        self.restore_with(sink, &ForkOptions::default())
    }

    /// [`Self::restore`] as a fork with `opts` (`no_devices`, `block_interrupts`, `fresh_shell`;
    /// `pause_parent` has no meaning here): a snapshot fuzzer restores once and resets.
    pub fn restore_with(&self, sink: SerialSink, opts: &ForkOptions) -> Result<Vm> {
        // A fork of the snapshot's image: `reset` takes it back to the snapshot.
        let source = ForkSource::Snapshot(self.id());
        let origin = ForkOrigin::new(&self.loaded.state, &self.image, source, opts);
        let vm = Vm::from_image(&self.loaded.config, origin, sink, opts)?;
        // A diff snapshot of the restored VM is based on this snapshot (if it has a directory).
        if self.path.is_dir() {
            vm.tracking().since_snapshot = Some(SnapshotMark {
                id: self.loaded.id.id,
                memory_crc32: self.loaded.memory.crc32,
                dir: self
                    .path
                    .canonicalize()
                    .unwrap_or_else(|_| self.path.clone()),
                dirty: DirtyPages::new(self.loaded.config.mem_bytes),
                disks: disks::instants(&self.loaded.state),
            });
        }
        Ok(vm)
    }

    pub fn id(&self) -> String {
        hex_id(&self.loaded.id.id)
    }

    pub fn config(&self) -> &crate::vm::VmConfig {
        &self.loaded.config
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn loaded(&self) -> &LoadedState {
        &self.loaded
    }

    pub fn records(&self) -> &[RecordSummary] {
        &self.records
    }

    /// What `vmfork snapshot info` shows: header, VM shape, memory, chain and every record.
    pub fn summary(&self) -> serde_json::Value {
        let l = &self.loaded;
        let diff_pages: u64 = l.memory.diff_runs.iter().map(|r| r.1).sum();
        serde_json::json!({
            "path": self.path,
            "id": self.id(),
            "format_version": self.header.version,
            "producer": self.header.producer,
            "created_unix_s": l.id.created_unix_s,
            "diff": l.base.is_some(),
            "memory_embedded": l.memory.name.is_empty(),
            "vm": {
                "vcpus": l.config.vcpus,
                "mem_mib": l.config.mem_bytes >> 20,
                "irqchip": l.config.irqchip,
            },
            "memory": {
                "file": l.memory.name,
                "size": l.memory.size,
                "data_pages": l.memory.data_pages,
                "diff_pages": diff_pages,
                "crc32": format!("{:08x}", l.memory.crc32),
            },
            "base": l.base.as_ref().map(|b| serde_json::json!({
                "id": hex_id(&b.id),
                "path": b.path,
            })),
            "chain": self.chain,
            "disks": disks::summary(&l.state),
            "records": self.records,
        })
    }

    /// The base snapshots of a diff, nearest first.
    pub fn chain(&self) -> &[PathBuf] {
        &self.chain
    }

    /// Checks the memory of this snapshot and of every base against their checksums (reads
    /// every data page; [`Self::open`] does not).
    pub fn verify(&self) -> Result<()> {
        let mut dirs = vec![self.path.clone()];
        dirs.extend(self.chain.iter().cloned());
        if self.path.is_file() {
            return Ok(()); // embedded memory was checked when it was read
        }
        for dir in dirs {
            let snap = if dir == self.path {
                None
            } else {
                Some(Snapshot::open(&dir)?)
            };
            let loaded = snap.as_ref().map_or(&self.loaded, |s| &s.loaded);
            let memory =
                crate::files::open_regular(&dir.join(MEMORY_FILE)).map_err(|e| problem(&dir, e))?;
            let digest = memory_file::digest_of(&memory, loaded.memory.size)?;
            if digest.crc32 != loaded.memory.crc32 || digest.data_pages != loaded.memory.data_pages
            {
                return Err(problem(
                    &dir,
                    format!(
                        "{MEMORY_FILE} does not match its checksum ({} data pages, CRC32 {:08x}; \
                         expected {} and {:08x}): the file is corrupt",
                        digest.data_pages,
                        digest.crc32,
                        loaded.memory.data_pages,
                        loaded.memory.crc32
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Writes this snapshot (a diff chain folded in) as one full snapshot in `dir`.
    pub fn merge_into(&self, dir: &Path) -> Result<SnapshotReport> {
        let vm = self.restore(SerialSink::Discard)?;
        vm.tracking().since_snapshot = None;
        vm.snapshot(dir, &SnapshotOptions::default())
    }
}
