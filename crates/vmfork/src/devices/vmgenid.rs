//! The generation id device: 16 random bytes that change whenever the VM becomes a new
//! instance of itself — every fork and every restore (a fork of a snapshot) — so a guest that
//! reads it after such an event knows to reseed its RNG and renew what must be unique (clone
//! uniqueness; Microsoft's VM Generation ID, without ACPI). A reset returns a fork to its own
//! generation, since it returns to the fork's instant.
//!
//! One MMIO page at [`VMGENID_BASE`], read-only but for the acknowledge register:
//! 0x00 magic "VMGI", 0x04 version (1), 0x08 interrupt status (bit 0: the id changed; write
//! bits to clear them), 0x10..0x20 the id. A change also raises [`super::irq::VMGENID_IRQ`].

use super::irq::raise;
use super::{lock, Persist};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;
use vmm_sys_util::eventfd::EventFd;

/// Where the page is in the MMIO hole.
pub const VMGENID_BASE: u64 = 0xd000_0000;
pub(crate) const VMGENID_SIZE: u64 = 0x1000;
const MAGIC: u32 = 0x4947_4d56; // "VMGI"
const VERSION: u32 = 1;
const REG_MAGIC: u64 = 0x00;
const REG_VERSION: u64 = 0x04;
const REG_STATUS: u64 = 0x08;
const REG_ID: u64 = 0x10;
const ID_LEN: u64 = 16;
/// Interrupt status: the id changed since the driver last acknowledged.
pub const GENERATION_CHANGED: u32 = 1;

/// The device's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationId {
    pub id: [u8; 16],
    pub status: u32,
}

impl GenerationId {
    /// A fresh random id, flagged as changed.
    pub fn new_generation(&mut self) -> crate::Result<()> {
        getrandom::fill(&mut self.id)
            .map_err(|e| crate::Error::Io(std::io::Error::other(format!("getrandom: {e}"))))?;
        self.status |= GENERATION_CHANGED;
        Ok(())
    }
}

/// The device on the MMIO bus.
pub struct VmGenId {
    state: Mutex<GenerationId>,
    irq: Option<EventFd>,
}

impl VmGenId {
    pub fn new(state: GenerationId, irq: Option<EventFd>) -> Self {
        Self {
            state: Mutex::new(state),
            irq,
        }
    }

    /// Tells the guest about a change made to the state it was built with (raises the line).
    pub fn announce(&self) {
        if lock(&self.state).status & GENERATION_CHANGED != 0 {
            raise(&self.irq);
        }
    }
}

impl Persist for VmGenId {
    type State = GenerationId;

    fn save(&self) -> GenerationId {
        lock(&self.state).clone()
    }

    fn load(&self, state: &GenerationId) -> crate::Result<()> {
        *lock(&self.state) = state.clone();
        Ok(())
    }
}

impl DeviceMmio for VmGenId {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let state = lock(&self.state);
        let mut page = [0u8; 0x20];
        page[REG_MAGIC as usize..][..4].copy_from_slice(&MAGIC.to_le_bytes());
        page[REG_VERSION as usize..][..4].copy_from_slice(&VERSION.to_le_bytes());
        page[REG_STATUS as usize..][..4].copy_from_slice(&state.status.to_le_bytes());
        page[REG_ID as usize..][..ID_LEN as usize].copy_from_slice(&state.id);
        // Any width at any offset; past the registers reads as zero.
        super::virtio::read_bytes(&page, offset, data);
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset == REG_STATUS && data.len() == 4 {
            let ack = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            lock(&self.state).status &= !ack;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_reads_at_any_width_and_acknowledges() {
        let mut state = GenerationId::default();
        state.new_generation().unwrap();
        let device = VmGenId::new(state.clone(), None);
        let base = MmioAddress(VMGENID_BASE);
        let mut word = [0u8; 4];
        device.mmio_read(base, REG_MAGIC, &mut word);
        assert_eq!(&word, b"VMGI");
        let mut id = [0u8; 8];
        device.mmio_read(base, REG_ID + 8, &mut id);
        assert_eq!(id, state.id[8..]);
        device.mmio_read(base, REG_STATUS, &mut word);
        assert_eq!(u32::from_le_bytes(word), GENERATION_CHANGED);
        device.mmio_write(base, REG_STATUS, &GENERATION_CHANGED.to_le_bytes());
        device.mmio_read(base, REG_STATUS, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0);
        // Writes elsewhere change nothing; reads past the registers are zero.
        device.mmio_write(base, REG_ID, &[0; 4]);
        assert_eq!(device.save().id, state.id);
        device.mmio_read(base, 0xff8, &mut id);
        assert_eq!(id, [0; 8]);
        let mut other = GenerationId::default();
        other.new_generation().unwrap();
        assert_ne!(other.id, state.id);
    }
}
