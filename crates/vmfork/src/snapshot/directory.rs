//! A snapshot directory on disk: written into a temporary sibling, synced, renamed into place.

use super::stream::write_state;
use super::take::Frozen;
use super::*;

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
pub(super) struct Target {
    pub(super) path: PathBuf,
    temp: PathBuf,
}

impl Target {
    pub(super) fn prepare(dir: &Path) -> Result<Self> {
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

    pub(super) fn write(
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

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| problem(dir, format!("sync: {e}")))
}
