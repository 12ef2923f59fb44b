//! The control API: HTTP+JSON on a Unix socket, in the style of Firecracker's.
//!
//! One process hosts a [`Registry`] of VMs (one family for `vmfork run --api-sock`, many for
//! `vmfork serve`); the API forks, resets, pauses, resumes, destroys and inspects them. The
//! routes are in [`routes`], the HTTP framing in [`http`], the socket server in [`server`];
//! `docs/api.yaml` is the OpenAPI description.

pub mod http;
mod registers;
mod routes;
pub mod server;

pub use routes::{from_hex, parse_number, to_hex};
pub use server::{ApiServer, BoundSocket};

use crate::confine::data_dir::DataDir;
use crate::snapshot::SnapshotCache;
use crate::vm::{Vm, VmStatus};
use crate::Error;
use http::Response;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Boots a new VM from a JSON request (`POST /vms`); the CLI supplies it, so the library does
/// not need to know the built-in guests. Its errors answer the request like any other
/// ([`Error::Invalid`] for a bad request: 400).
pub type BootFn = dyn Fn(&serde_json::Value) -> Result<Vm, Error> + Send + Sync;

/// What one server may host at once; each limit hit is a clear error (429, or 507 for RAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// VMs hosted (every fork and restore counts).
    pub max_vms: usize,
    /// The sum of the hosted VMs' RAM sizes (nominal: forks share pages, but each may come
    /// to write all of its RAM).
    pub max_guest_ram: u64,
    /// Snapshots being written at once, over all VMs.
    pub max_snapshots_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_vms: 4096,
            max_guest_ram: 64 << 40,
            max_snapshots_in_flight: 8,
        }
    }
}

/// The VMs one process hosts, by id.
pub struct Registry {
    vms: Mutex<BTreeMap<u64, Arc<Vm>>>,
    boot: Option<Box<BootFn>>,
    /// Snapshots restored lately, kept open so restoring one again is a warm restore.
    pub(crate) snapshots: SnapshotCache,
    limits: Limits,
    snapshots_in_flight: std::sync::atomic::AtomicUsize,
    /// Where request paths resolve; `None`: anywhere the process can reach (`vmfork run`).
    data_dir: Option<DataDir>,
}

/// A snapshot being written, counted against [`Limits::max_snapshots_in_flight`] while alive.
pub(crate) struct SnapshotTicket<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for SnapshotTicket<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How many opened snapshots the API keeps for warm restores.
const SNAPSHOTS_KEPT_OPEN: usize = 8;

impl Registry {
    /// A registry; with `boot`, `POST /vms` can create new VM families.
    pub fn new(boot: Option<Box<BootFn>>) -> Arc<Self> {
        Self::with_limits(boot, Limits::default())
    }

    /// A registry that refuses to grow past `limits`.
    pub fn with_limits(boot: Option<Box<BootFn>>, limits: Limits) -> Arc<Self> {
        Self::confined(boot, limits, None)
    }

    /// A registry within `limits` whose requests name files only inside `data_dir`.
    pub fn confined(
        boot: Option<Box<BootFn>>,
        limits: Limits,
        data_dir: Option<DataDir>,
    ) -> Arc<Self> {
        Arc::new(Self {
            vms: Mutex::new(BTreeMap::new()),
            boot,
            snapshots: SnapshotCache::new(SNAPSHOTS_KEPT_OPEN),
            limits,
            snapshots_in_flight: Default::default(),
            data_dir,
        })
    }

    /// Where a path named in a request is: inside the data directory (if the server has
    /// one), or [`Error::Forbidden`].
    pub fn path(&self, requested: &str) -> Result<std::path::PathBuf, Error> {
        let requested = std::path::Path::new(requested);
        match &self.data_dir {
            Some(dir) => dir.resolve(requested),
            None if requested.as_os_str().is_empty() => {
                Err(Error::Invalid("an empty path names no file".into()))
            }
            None => Ok(requested.to_path_buf()),
        }
    }

    /// The data directory request paths resolve in, if any.
    pub fn data_dir(&self) -> Option<&DataDir> {
        self.data_dir.as_ref()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether `count` more VMs of `ram` bytes each would fit, given `vms` (the map, locked).
    fn room_in(&self, vms: &BTreeMap<u64, Arc<Vm>>, count: usize, ram: u64) -> Result<(), Error> {
        if vms.len() + count > self.limits.max_vms {
            return Err(Error::Limit(format!(
                "this server hosts {} VMs and takes at most {} (--max-vms)",
                vms.len(),
                self.limits.max_vms
            )));
        }
        let used: u64 = vms.values().map(|vm| vm.config().mem_bytes).sum();
        let wanted = ram.saturating_mul(count as u64);
        if used.saturating_add(wanted) > self.limits.max_guest_ram {
            return Err(Error::NoRoom(format!(
                "{} MiB more guest RAM would pass this server's {} MiB limit ({} MiB in use; \
                 --max-guest-ram)",
                wanted >> 20,
                self.limits.max_guest_ram >> 20,
                used >> 20
            )));
        }
        Ok(())
    }

    /// Whether `count` more VMs of `ram` bytes each would fit now.
    pub fn room_for(&self, count: usize, ram: u64) -> Result<(), Error> {
        self.room_in(&self.lock(), count, ram)
    }

    /// Adds a VM if it fits the limits (it is dropped, and so torn down, if not).
    pub fn admit(&self, vm: Vm) -> Result<Arc<Vm>, Error> {
        let mut vms = self.lock();
        self.room_in(&vms, 1, vm.config().mem_bytes)?;
        let vm = Arc::new(vm);
        vms.insert(vm.id(), Arc::clone(&vm));
        Ok(vm)
    }

    /// Counts a snapshot in flight, if the limit allows one more.
    pub(crate) fn snapshot_ticket(&self) -> Result<SnapshotTicket<'_>, Error> {
        use std::sync::atomic::Ordering;
        let n = self.snapshots_in_flight.fetch_add(1, Ordering::SeqCst);
        let ticket = SnapshotTicket(&self.snapshots_in_flight);
        if n >= self.limits.max_snapshots_in_flight {
            return Err(Error::Limit(format!(
                "{n} snapshots are being written and this server takes at most {} at once",
                self.limits.max_snapshots_in_flight
            )));
        }
        Ok(ticket)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Vm>>> {
        // Inserts and removes are single calls: the map is consistent after a panic.
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a VM and returns its id.
    pub fn add(&self, vm: Vm) -> Arc<Vm> {
        let vm = Arc::new(vm);
        self.lock().insert(vm.id(), Arc::clone(&vm));
        vm
    }

    pub fn get(&self, id: u64) -> Option<Arc<Vm>> {
        self.lock().get(&id).cloned()
    }

    /// Removes a VM and stops it; it is torn down once no request uses it any more.
    pub fn destroy(&self, id: u64) -> Option<Arc<Vm>> {
        let vm = self.lock().remove(&id)?;
        vm.stop();
        Some(vm)
    }

    /// Every hosted VM, by id.
    pub fn all(&self) -> Vec<Arc<Vm>> {
        self.lock().values().cloned().collect()
    }

    /// Whether any hosted VM can still run (not exited).
    pub fn any_alive(&self) -> bool {
        self.lock()
            .values()
            .any(|vm| vm.status() != VmStatus::Exited)
    }

    /// Stops and drops every VM.
    pub fn destroy_all(&self) {
        let vms: Vec<_> = std::mem::take(&mut *self.lock()).into_values().collect();
        for vm in &vms {
            vm.stop();
        }
    }
}

/// The HTTP status for a library error: the caller's fault (400), the VM's state (409), or
/// the host's (500).
pub(crate) fn error_response(e: &Error) -> Response {
    let status = match e {
        Error::State { .. } | Error::NotAFork(_) | Error::Busy(_) | Error::Damaged(_) => 409,
        Error::Limit(_) => 429,
        Error::NoRoom(_) => 507,
        Error::Forbidden(_) => 403,
        Error::Invalid(_)
        | Error::Config(_)
        | Error::Memory(_)
        | Error::Load(_)
        | Error::Device(_)
        | Error::Snapshot { .. } => 400,
        Error::KvmUnavailable(_) | Error::Kvm { .. } | Error::Io(_) => 500,
    };
    Response::error(status, e.to_string())
}
