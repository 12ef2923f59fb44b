//! The virtio-mmio transport (virtio 1.2, 4.2; version 2 registers): one page of registers per
//! device, feature negotiation, queue setup, the interrupt status, and the device's config
//! space from offset 0x100. A queue-notify write asks the VMM (through [`Signals`]) to serve
//! the queue on the writing vCPU's thread, with guest memory at hand.

use super::{DeviceSpecific, QueueRegisters, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::irq::raise;
use crate::devices::{lock, Signals};
use crate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;
use vmm_sys_util::eventfd::EventFd;

pub(crate) const MAGIC: u32 = 0x7472_6976; // "virt"
pub(crate) const VERSION: u32 = 2;
/// Vendor id "VMFK".
pub(crate) const VENDOR: u32 = 0x4b46_4d56;

// Register offsets.
pub(crate) const REG_MAGIC: u64 = 0x000;
pub(crate) const REG_VERSION: u64 = 0x004;
pub(crate) const REG_DEVICE_ID: u64 = 0x008;
pub(crate) const REG_VENDOR_ID: u64 = 0x00c;
pub(crate) const REG_DEVICE_FEATURES: u64 = 0x010;
pub(crate) const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(crate) const REG_DRIVER_FEATURES: u64 = 0x020;
pub(crate) const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub(crate) const REG_QUEUE_SEL: u64 = 0x030;
pub(crate) const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub(crate) const REG_QUEUE_NUM: u64 = 0x038;
pub(crate) const REG_QUEUE_READY: u64 = 0x044;
pub(crate) const REG_QUEUE_NOTIFY: u64 = 0x050;
pub(crate) const REG_INTERRUPT_STATUS: u64 = 0x060;
pub(crate) const REG_INTERRUPT_ACK: u64 = 0x064;
pub(crate) const REG_STATUS: u64 = 0x070;
pub(crate) const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub(crate) const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub(crate) const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub(crate) const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub(crate) const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub(crate) const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub(crate) const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub(crate) const CONFIG_SPACE: u64 = 0x100;

// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

/// The ring feature: descriptors pointing to a table of descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// Interrupt status: a used buffer was added; the config space changed.
pub const INTERRUPT_USED_BUFFER: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGED: u32 = 2;

/// The transport's registers and its device's state, as a fork or snapshot carries them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueRegisters>,
    pub device: DeviceSpecific,
}

struct Inner {
    device: Box<dyn VirtioDevice>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
}

/// One device on the MMIO bus.
pub struct MmioTransport {
    inner: Mutex<Inner>,
    slot: u8,
    irq: Option<EventFd>,
    signals: Signals,
}

fn power_on_queues(device: &dyn VirtioDevice) -> crate::Result<Vec<Queue>> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| {
            Queue::new(max)
                .map_err(|e| crate::devices::DeviceError::state(format!("virtqueue size: {e}")))
        })
        .collect()
}

impl MmioTransport {
    /// `device` in its power-on state in slot `slot`, raising `irq`.
    pub fn new(
        slot: u8,
        device: Box<dyn VirtioDevice>,
        irq: Option<EventFd>,
        signals: Signals,
    ) -> crate::Result<Self> {
        let queues = power_on_queues(device.as_ref())?;
        Ok(Self {
            inner: Mutex::new(Inner {
                device,
                status: 0,
                device_features_select: 0,
                driver_features_select: 0,
                driver_features: 0,
                queue_select: 0,
                interrupt_status: 0,
                config_generation: 0,
                queues,
            }),
            slot,
            irq,
            signals,
        })
    }

    pub fn device_type(&self) -> u32 {
        lock(&self.inner).device.device_type()
    }

    /// Serves queue `index` (a notify the guest wrote) and raises the interrupt if the driver
    /// wants one. Nothing happens unless the driver set the device up and the queue is ready.
    pub fn serve(&self, index: usize, memory: &GuestMemory) {
        let mut inner = lock(&self.inner);
        if inner.status & STATUS_DRIVER_OK == 0 || inner.status & STATUS_FAILED != 0 {
            return;
        }
        let Inner { device, queues, .. } = &mut *inner;
        let Some(queue) = queues.get(index) else {
            return;
        };
        if !queue.ready() || !queue.is_valid(memory) {
            return;
        }
        if !device.serve_on_notify(index) {
            return;
        }
        if device.serve(index, queues, memory) {
            self.interrupt(&mut inner, index, memory);
        }
    }

    /// Serves the device's host side (on its worker's thread).
    pub fn serve_host(&self, memory: &GuestMemory) {
        let mut inner = lock(&self.inner);
        if inner.status & STATUS_DRIVER_OK == 0 || inner.status & STATUS_FAILED != 0 {
            return;
        }
        let Inner { device, queues, .. } = &mut *inner;
        // A queue the driver left unusable is served as empty.
        let usable = queues.iter().all(|q| q.ready() && q.is_valid(memory));
        if usable && device.serve_host(queues, memory) {
            self.interrupt(&mut inner, 0, memory);
        }
    }

    /// Raises the used-buffer interrupt unless the driver asked for none on `index`.
    fn interrupt(&self, inner: &mut Inner, index: usize, memory: &GuestMemory) {
        let wanted = inner
            .queues
            .get_mut(index)
            .is_none_or(|q| q.needs_notification(memory).unwrap_or(true));
        if wanted {
            inner.interrupt_status |= INTERRUPT_USED_BUFFER;
            raise(&self.irq);
        }
    }

    /// What a listing shows of the device.
    pub fn describe(&self) -> serde_json::Value {
        lock(&self.inner).device.describe()
    }

    /// Whether the device has a worker (a host side that changes it on its own).
    pub fn has_worker(&self) -> bool {
        matches!(
            lock(&self.inner).device.device_type(),
            super::vsock::TYPE_VSOCK | super::net::TYPE_NET
        )
    }

    /// Starts the device's worker (if it has one) for this transport in the VM `memory` is.
    pub fn start_worker(
        self: &Arc<Self>,
        memory: std::sync::Weak<dyn super::worker::GuestMemoryAccess>,
        quiesce: Arc<std::sync::RwLock<()>>,
        vm_id: u64,
    ) -> crate::Result<()> {
        let handle = super::worker::WorkerHandle {
            transport: Arc::downgrade(self),
            memory,
            quiesce,
            vm_id,
        };
        lock(&self.inner).device.start_worker(handle)
    }

    /// Raises the line for a config change (after the irqchip state is in, the line reaches the
    /// guest; raising it earlier is harmless: the status bit stays set for the driver).
    fn announce_config_change(&self) {
        raise(&self.irq);
    }

    /// Raises the interrupt again for a config change still unacknowledged (a new VM's devices,
    /// once its irqchip state is loaded).
    pub fn announce(&self) {
        if lock(&self.inner).interrupt_status & INTERRUPT_CONFIG_CHANGED != 0 {
            raise(&self.irq);
        }
    }

    /// Back to the power-on state (what a slot missing from saved state loads).
    pub fn power_on(&self) {
        let mut inner = lock(&self.inner);
        inner.reset();
        inner.config_generation = 0;
    }

    /// The registers and device state.
    pub fn save(&self) -> VirtioState {
        let mut inner = lock(&self.inner);
        VirtioState {
            device_type: inner.device.device_type(),
            status: inner.status,
            device_features_select: inner.device_features_select,
            driver_features_select: inner.driver_features_select,
            driver_features: inner.driver_features,
            queue_select: inner.queue_select,
            interrupt_status: inner.interrupt_status,
            config_generation: inner.config_generation,
            queues: inner.queues.iter().map(QueueRegisters::of).collect(),
            device: inner.device.save(),
        }
    }

    /// Loads saved registers and device state; a state of another device type or queue shape
    /// is refused and leaves the device as it was.
    pub fn load(&self, state: &VirtioState) -> crate::Result<()> {
        let mut inner = lock(&self.inner);
        let device_type = inner.device.device_type();
        let max_sizes = inner.device.queue_max_sizes();
        if state.device_type != device_type
            || state.queues.len() != max_sizes.len()
            || state
                .queues
                .iter()
                .zip(max_sizes)
                .any(|(q, &m)| q.max_size != m)
        {
            return Err(crate::devices::DeviceError::state(format!(
                "virtio slot {}: saved state is for device type {} with {} queues; the slot \
                 holds type {device_type} with {}",
                self.slot,
                state.device_type,
                state.queues.len(),
                max_sizes.len()
            )));
        }
        // Before FEATURES_OK the driver may have written anything; after, only what was offered.
        if state.status & STATUS_FEATURES_OK != 0 && state.driver_features & !inner.offered() != 0 {
            return Err(crate::devices::DeviceError::state(format!(
                "virtio slot {}: saved driver features {:#x} were never offered",
                self.slot, state.driver_features
            )));
        }
        let queues = state
            .queues
            .iter()
            .map(QueueRegisters::to_queue)
            .collect::<crate::Result<Vec<_>>>()?;
        inner.device.load(&state.device)?;
        inner.status = state.status;
        inner.device_features_select = state.device_features_select;
        inner.driver_features_select = state.driver_features_select;
        inner.driver_features = state.driver_features;
        inner.queue_select = state.queue_select;
        inner.interrupt_status = state.interrupt_status;
        inner.config_generation = state.config_generation;
        if inner.device.config_changed(&state.device) {
            // The driver re-reads a config space whose generation moved (virtio 1.2, 4.2.2.1).
            inner.config_generation = inner.config_generation.wrapping_add(1);
            inner.interrupt_status |= INTERRUPT_CONFIG_CHANGED;
            self.announce_config_change();
        }
        inner.queues = queues;
        Ok(())
    }
}

impl Inner {
    /// What the driver may accept: the device's features, and indirect descriptors (the
    /// split-ring code follows them for every device, bounds-checked like the rest).
    fn offered(&self) -> u64 {
        self.device.features() | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may be written between FEATURES_OK and DRIVER_OK only.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.2, 2.1.2); anything else fails the device.
        if value & self.status != self.status {
            self.status |= STATUS_FAILED;
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.offered();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // FEATURES_OK not taken: the driver reads it back and gives up.
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
    }

    fn read(&self, offset: u64) -> u32 {
        let features = self.offered();
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write(&mut self, offset: u64, value: u32) -> Option<u16> {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NOTIFY => return u16::try_from(value).ok(),
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.write_status(value),
            _ if self.queue_setup_allowed() => {
                let q = self.selected_queue()?;
                let (low, high) = (Some(value), None);
                match offset {
                    REG_QUEUE_NUM => q.set_size(value as u16),
                    REG_QUEUE_READY => q.set_ready(value == 1),
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                    REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                    REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                    REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
                    REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(low, high),
                    REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
                    _ => {}
                }
            }
            _ => {}
        }
        None
    }
}

impl DeviceMmio for MmioTransport {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let inner = lock(&self.inner);
        if offset >= CONFIG_SPACE {
            inner.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32 bits wide and read whole (virtio 1.2, 4.2.2.2).
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&inner.read(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= CONFIG_SPACE || data.len() != 4 || !offset.is_multiple_of(4) {
            return; // no writable config yet; registers are written whole
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let notify = lock(&self.inner).write(offset, value);
        if let Some(queue) = notify {
            self.signals.raise_notify(self.slot, queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_well_formed_request_is_served_and_interrupts() {
        let (t, memory) = running_rng();
        assert_eq!(
            offer(&t, &memory, &[(0, 0x8000, 256, WRITE, 0)], 0),
            Some(256)
        );
        assert_eq!(read(&t, REG_INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
        write(&t, REG_INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
        assert_eq!(read(&t, REG_INTERRUPT_STATUS), 0);
        // Saved and loaded into a fresh transport, the queue carries on.
        let saved = t.save();
        let other = MmioTransport::new(0, Box::new(Rng), None, Signals::default()).unwrap();
        other.load(&saved).unwrap();
        assert_eq!(
            offer(&other, &memory, &[(1, 0x9000, 16, WRITE, 0)], 1),
            Some(16)
        );
        assert_eq!(other.save().queues[0].next_used, 2);
    }

    #[test]
    fn hostile_descriptor_chains_are_returned_empty() {
        let (t, memory) = running_rng();
        let end = RAM as u64;
        // A chain looping on itself ends after a ring's worth of descriptors (virtio-queue's
        // limit), all inside RAM.
        let looping = offer(&t, &memory, &[(0, 0x8000, 64, WRITE | NEXT, 0)], 0);
        assert_eq!(looping, Some(8 * 64));
        // Outside RAM; straddling its end; lengths that overflow when summed; a
        // device-readable buffer where the rng must write.
        let hostile: [&[Descriptor]; 4] = [
            &[(0, 0x1_0000_0000, 64, WRITE, 0)],
            &[(0, end - 8, 64, WRITE, 0)],
            &[
                (0, 0x8000, u32::MAX, WRITE | NEXT, 1),
                (1, 0x8000, u32::MAX, WRITE, 0),
            ],
            &[(0, 0x8000, 64, 0, 0)],
        ];
        for chain in hostile {
            let got = offer(&t, &memory, chain, 0);
            assert!(matches!(got, Some(0) | None), "{chain:?} gave {got:?}");
        }
        // A head index past the ring and an available index that jumps too far are ignored.
        assert_eq!(offer(&t, &memory, &[], 9), None);
        memory.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        t.serve(0, &memory);
        // Queue addresses outside RAM make the queue unusable, not the VMM.
        let (t, memory) = running_rng();
        write(&t, REG_STATUS, 0);
        for (reg, value) in [
            (REG_STATUS, 0xb),
            (REG_QUEUE_DESC_LOW, 0xffff_fff0),
            (REG_QUEUE_DESC_HIGH, 0xffff_ffff),
            (REG_QUEUE_READY, 1),
            (REG_STATUS, 0xf),
        ] {
            write(&t, reg, value);
        }
        t.serve(0, &memory);
        assert_eq!(t.save().queues[0].next_used, 0);
    }

    #[test]
    fn the_driver_must_follow_the_status_protocol() {
        let (t, _) = running_rng();
        // Clearing a bit fails the device; a reset (0) brings it back.
        write(&t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_ne!(read(&t, REG_STATUS) & STATUS_FAILED, 0);
        write(&t, REG_STATUS, 0);
        assert_eq!(read(&t, REG_STATUS), 0);
        assert_eq!(read(&t, REG_QUEUE_READY), 0);
        // Features not offered, or without VERSION_1, are not accepted.
        write(&t, REG_STATUS, 3);
        write(&t, REG_DRIVER_FEATURES_SEL, 0);
        write(&t, REG_DRIVER_FEATURES, 1 << 5);
        write(&t, REG_STATUS, 0xb);
        assert_eq!(read(&t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Saved state of another device type, or with features never offered, is refused.
        let mut saved = t.save();
        saved.device_type = 2;
        assert!(t.load(&saved).is_err());
        let mut saved = t.save();
        saved.driver_features = 1 << 40;
        saved.status = 0xb;
        assert!(t.load(&saved).is_err());
        let mut saved = t.save();
        saved.queues[0].size = 3;
        assert!(t.load(&saved).is_err());
    }
}
