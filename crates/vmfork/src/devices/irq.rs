//! Interrupt lines: every VM shell registers one irqfd per line a device may raise (the
//! keyboard's, the serial's, the generation-id device's and one per virtio-mmio slot), so every
//! shell has the same shape and a pooled one fits any VM.

use super::legacy::i8042::I8042_IRQ;
use super::legacy::serial::SERIAL_IRQ;
use super::virtio::VIRTIO_SLOTS;
use vmm_sys_util::eventfd::EventFd;

/// The generation-id device's line.
pub const VMGENID_IRQ: u32 = 5;
/// The first virtio-mmio slot's line; slot `i` raises `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 6;

/// Every GSI a shell registers an irqfd for (all below the IOAPIC's 24 pins).
pub fn device_gsis() -> impl Iterator<Item = u32> {
    [I8042_IRQ, SERIAL_IRQ, VMGENID_IRQ]
        .into_iter()
        .chain((0..VIRTIO_SLOTS as u32).map(|i| VIRTIO_IRQ_BASE + i))
}

/// The irqfds a VM's devices raise, by GSI (empty without an in-kernel irqchip, or when a fork
/// blocks interrupts: the devices then raise nothing).
#[derive(Debug, Default)]
pub struct IrqLines(Vec<(u32, EventFd)>);

impl IrqLines {
    /// No lines: devices raise nothing.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn new(lines: Vec<(u32, EventFd)>) -> Self {
        Self(lines)
    }

    /// A handle on `gsi`'s irqfd, if there is one.
    pub fn line(&self, gsi: u32) -> crate::Result<Option<EventFd>> {
        self.0
            .iter()
            .find(|(g, _)| *g == gsi)
            .map(|(_, e)| e.try_clone().map_err(crate::Error::Io))
            .transpose()
    }

    /// Handles on every line (for a device set built from this shell).
    pub fn try_clone(&self) -> crate::Result<Self> {
        self.0
            .iter()
            .map(|(g, e)| Ok((*g, e.try_clone().map_err(crate::Error::Io)?)))
            .collect::<crate::Result<Vec<_>>>()
            .map(Self)
    }
}

/// Raises an edge on an optional irqfd (a write of 1; a full counter means one is pending).
pub(crate) fn raise(line: &Option<EventFd>) {
    if let Some(fd) = line {
        let _ = fd.write(1);
    }
}
