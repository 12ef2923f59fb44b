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
pub use server::ApiServer;

use crate::snapshot::SnapshotCache;
use crate::vm::{Vm, VmStatus};
use crate::Error;
use http::Response;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Boots a new VM from a JSON request (`POST /vms`); the CLI supplies it, so the library does
/// not need to know the built-in guests. Errors are messages for a 400 response.
pub type BootFn = dyn Fn(&serde_json::Value) -> Result<Vm, String> + Send + Sync;

/// The VMs one process hosts, by id.
pub struct Registry {
    vms: Mutex<BTreeMap<u64, Arc<Vm>>>,
    boot: Option<Box<BootFn>>,
    /// Snapshots restored lately, kept open so restoring one again is a warm restore.
    pub(crate) snapshots: SnapshotCache,
}

/// How many opened snapshots the API keeps for warm restores.
const SNAPSHOTS_KEPT_OPEN: usize = 8;

impl Registry {
    /// A registry; with `boot`, `POST /vms` can create new VM families.
    pub fn new(boot: Option<Box<BootFn>>) -> Arc<Self> {
        Arc::new(Self {
            vms: Mutex::new(BTreeMap::new()),
            boot,
            snapshots: SnapshotCache::new(SNAPSHOTS_KEPT_OPEN),
        })
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
        Error::State { .. } | Error::NotAFork(_) | Error::Busy(_) => 409,
        Error::Invalid(_)
        | Error::Config(_)
        | Error::Memory(_)
        | Error::Load(_)
        | Error::Snapshot { .. } => 400,
        Error::KvmUnavailable(_) | Error::Kvm { .. } | Error::Io(_) => 500,
    };
    Response::error(status, e.to_string())
}
