//! virtio 1.x devices on the virtio-mmio transport (`mmio.rs`), with rust-vmm `virtio-queue`
//! for the split rings. Each device implements [`VirtioDevice`]: its type, features, config
//! space, and how it serves the buffers the driver makes available.
//!
//! Queues are served on the vCPU thread that wrote the queue-notify register, before the vCPU
//! runs on: a request is complete when the guest's notify returns. So no I/O is ever in flight
//! when a VM pauses, and a fork, a snapshot or a migration carries the device at its pause
//! instant with nothing to drain.

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
mod test_support;
pub mod vsock;
pub mod worker;

use crate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// Where the virtio-mmio slots start in the MMIO hole (after the generation-id page).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_1000;
/// Bytes of MMIO space each slot takes.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// How many virtio-mmio slots a VM has (each with its own interrupt line).
pub const VIRTIO_SLOTS: usize = 8;

/// virtio device ids (virtio 1.2, 5).
pub const TYPE_NET: u32 = net::TYPE_NET;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;

/// The feature every virtio 1.x device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id ([`TYPE_RNG`], [`TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32;
    /// The features offered (with [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Each queue's largest size.
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Reads the device's config space at `offset`; bytes past its end read as zero.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Serves the buffers the driver made available on queue `index` (of `queues`, the
    /// device's queues); says whether any was used. Bad descriptors are the guest's problem:
    /// they are returned with nothing written.
    fn serve(&mut self, index: usize, queues: &mut [Queue], memory: &GuestMemory) -> bool;
    /// The guest notified queue `index`: serve it now on the notifying vCPU's thread (true),
    /// or leave it to the device's worker (false, after waking it).
    fn serve_on_notify(&mut self, _index: usize) -> bool {
        true
    }
    /// Starts the device's worker thread, for devices with a host side to wait on (sockets):
    /// it serves through `worker` once the VM's memory is at hand.
    fn start_worker(&mut self, _worker: worker::WorkerHandle) -> crate::Result<()> {
        Ok(())
    }
    /// Serves what the host side has for the guest, and the queues left to the worker
    /// (called on the worker's thread); says whether any buffer was used.
    fn serve_host(&mut self, _queues: &mut [Queue], _memory: &GuestMemory) -> bool {
        false
    }
    /// What a listing shows of the device: its kind and host-side identity (image, socket,
    /// tap, MAC).
    fn describe(&self) -> serde_json::Value;
    /// The device-specific state a fork or snapshot carries (a disk freezes its writes so far
    /// into the state: the instant both sides go on from).
    fn save(&mut self) -> DeviceSpecific;
    /// Whether the config space differs from what the loaded state had (a fork's new MAC):
    /// the transport then bumps the config generation and raises a config-change interrupt.
    fn config_changed(&self, _loaded: &DeviceSpecific) -> bool {
        false
    }
    /// Loads device-specific state saved by [`Self::save`].
    fn load(&mut self, state: &DeviceSpecific) -> crate::Result<()>;
}

/// Copies the bytes of a config space (or any small register file) `config` at `offset` into
/// `data`, at any width; bytes past its end read as zero.
pub(crate) fn read_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// Device-specific state, by device kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSpecific {
    /// The entropy device keeps none.
    Rng,
    Block(block::BlockState),
    Vsock(vsock::VsockState),
    Net(net::NetState),
}

impl DeviceSpecific {
    /// A device of the kind this state is for, ready to load it; a vsock or network device
    /// `rewiring` names takes the endpoint in its config exactly (not a per-clone one).
    pub(crate) fn device(
        &self,
        rewiring: &crate::devices::Rewiring,
    ) -> crate::Result<Box<dyn VirtioDevice>> {
        Ok(match self {
            DeviceSpecific::Rng => Box::new(rng::Rng),
            DeviceSpecific::Block(state) => Box::new(block::Block::from_state(state)?),
            DeviceSpecific::Vsock(state) => Box::new(vsock::Vsock::from_state(
                state,
                rewiring.vsock_path.is_some(),
            )?),
            DeviceSpecific::Net(state) => {
                Box::new(net::Net::from_state(state, rewiring.tap.is_some())?)
            }
        })
    }
}

/// A split virtqueue's registers as saved (virtio-queue's `QueueState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegisters {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl QueueRegisters {
    pub(crate) fn of(queue: &Queue) -> Self {
        Self {
            max_size: queue.max_size(),
            size: queue.size(),
            ready: queue.ready(),
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
        }
    }

    /// The queue these registers describe; sizes and ring alignment are checked.
    pub(crate) fn to_queue(&self) -> crate::Result<Queue> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: false,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| crate::devices::DeviceError::state(format!("virtqueue state: {e}")))
    }
}
