//! vmfork: a KVM virtual machine monitor built to fork, reset, snapshot and migrate VMs.
//!
//! Where things live:
//! - [`vm`]: the VM, its vCPU threads, pause/resume/stop and exits;
//! - [`memory`]: guest RAM in a memfd, frozen images and their layers: what fork and snapshots
//!   are built on;
//! - [`devices`]: serial console, i8042, exit port;
//! - [`boot`]: loading ELF (PVH or 64-bit entry) and flat kernels;
//! - [`fork`]: fork, fork of a fork, fork reset; generations (pre-copy, layers, adoption, fold);
//! - [`fuzz`]: the snapshot-fuzzing loop (fork once, reset per input);
//! - [`introspect`]: guest virtual memory through the guest's page tables;
//! - [`api`]: the control API, HTTP+JSON on a Unix socket;
//! - [`state`]: the saved state of every stateful part (vCPUs, irqchip, clock, devices);
//! - [`snapshot`]: snapshots on disk (record stream + sparse memory file), restore, diffs.

pub mod api;
pub mod boot;
pub mod confine;
pub mod devices;
mod error;
pub mod files;
pub mod fork;
pub mod fuzz;
pub mod introspect;
pub mod memory;
pub mod snapshot;
pub mod state;
pub mod vm;
mod x86;

pub use error::{Error, Result};
pub use fork::{ForkOptions, ResetScope, ResetStats};
pub use snapshot::{Snapshot, SnapshotOptions, SnapshotProgress, SnapshotReport};
pub use vm::{ExitReason, ThreadTimer, Vm, VmConfig, VmStatus};
