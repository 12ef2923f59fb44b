//! The library's error type. Every message is meant to be shown to a person as is; the device
//! layer's errors come typed (`devices::DeviceError`, with their sources) inside it.

use std::io;

/// Errors from building, running and inspecting VMs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and are you root or in the kvm group?)")]
    KvmUnavailable(io::Error),
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("cannot load the guest kernel: {0}")]
    Load(String),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the VM is {actual}, but this needs it {wanted}")]
    State {
        actual: &'static str,
        wanted: &'static str,
    },
    #[error("VM {0} is not a fork, so it has nothing to reset to")]
    NotAFork(u64),
    #[error("{0}")]
    Invalid(String),
    #[error("snapshot {path}: {problem}")]
    Snapshot { path: String, problem: String },
    /// The VM is doing something this would conflict with (a snapshot being written).
    #[error("{0}")]
    Busy(String),
    /// A server limit (VMs, snapshots in flight) would be exceeded.
    #[error("{0}")]
    Limit(String),
    /// The server's total guest RAM limit would be exceeded.
    #[error("{0}")]
    NoRoom(String),
    /// The VM's memory can no longer be trusted: a snapshot file its image maps was truncated
    /// or written under it.
    #[error("{0}")]
    Damaged(String),
    /// A path outside what this server may touch (its data directory).
    #[error("{0}")]
    Forbidden(String),
    /// A device cannot be built, wired or loaded.
    #[error(transparent)]
    Device(#[from] crate::devices::DeviceError),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps a KVM ioctl result with the name of the operation that failed.
pub(crate) trait KvmContext<T> {
    fn kvm(self, op: &'static str) -> Result<T>;
}

impl<T> KvmContext<T> for std::result::Result<T, vmm_sys_util::errno::Error> {
    fn kvm(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Kvm { op, source })
    }
}
