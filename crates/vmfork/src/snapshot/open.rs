//! An opened snapshot: its checked state and memory image (a diff chain folded in), and
//! restore, a fork of that image.

use super::stream::read_state;
use super::*;

/// The CPU features the snapshot's VM was made without, from its saved CPUID: its restores
/// take shells with the same CPUID.
fn hidden_cpu_features(loaded: &mut LoadedState) -> Result<()> {
    if let Some(vcpu) = loaded.state.vcpus.first() {
        let supported = &crate::vm::KvmSystem::get()?.supported_cpuid;
        loaded.config.hide_cpu_features = crate::boot::cpuid::hidden_in(&vcpu.cpuid, supported);
    }
    Ok(())
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
        let config = crate::vm::VmConfig {
            emulation_assist: opts.emulation_assist,
            ..self.loaded.config.clone()
        };
        let vm = Vm::from_image(&config, origin, sink, opts)?;
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
