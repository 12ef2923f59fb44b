//! Test helpers: a transport set up by the book over a small RAM, and descriptor chains
//! offered to it.

use super::mmio::*;
use super::VirtioDevice;
use crate::devices::Signals;
use crate::memory::GuestMemory;
use vm_device::bus::MmioAddress;
use vm_device::DeviceMmio;
use vm_memory::{Address, Bytes, GuestAddress};

pub(crate) const DESC: u64 = 0x1000;
pub(crate) const AVAIL: u64 = 0x2000;
pub(crate) const USED: u64 = 0x3000;
pub(crate) const RAM: usize = 0x10000;

pub(crate) fn write(t: &MmioTransport, offset: u64, value: u32) {
    t.mmio_write(MmioAddress(0), offset, &value.to_le_bytes());
}

pub(crate) fn read(t: &MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.mmio_read(MmioAddress(0), offset, &mut b);
    u32::from_le_bytes(b)
}

/// An rng with queue 0 (8 entries) set up by the book.
pub(crate) fn running_rng() -> (MmioTransport, GuestMemory) {
    running(Box::new(super::rng::Rng), 1)
}

/// `device` with queue 0 (8 entries) set up by the book, its driver accepting feature word 1
/// = `features_high` (VERSION_1 and what else the test wants).
pub(crate) fn running(
    device: Box<dyn VirtioDevice>,
    features_high: u32,
) -> (MmioTransport, GuestMemory) {
    let memory = GuestMemory::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let t = MmioTransport::new(0, device, None, Signals::default()).unwrap();
    assert_eq!(read(&t, REG_MAGIC), MAGIC);
    write(&t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write(&t, REG_DRIVER_FEATURES_SEL, 1);
    write(&t, REG_DRIVER_FEATURES, features_high);
    write(&t, REG_STATUS, 0xb);
    assert_eq!(read(&t, REG_STATUS), 0xb);
    write(&t, REG_QUEUE_NUM, 8);
    write(&t, REG_QUEUE_DESC_LOW, DESC as u32);
    write(&t, REG_QUEUE_DRIVER_LOW, AVAIL as u32);
    write(&t, REG_QUEUE_DEVICE_LOW, USED as u32);
    write(&t, REG_QUEUE_READY, 1);
    write(&t, REG_STATUS, 0xf);
    (t, memory)
}

/// Puts descriptor `i` and makes `head` available; returns the used length after serving.
pub(crate) fn offer(
    t: &MmioTransport,
    memory: &GuestMemory,
    descriptors: &[Descriptor],
    head: u16,
) -> Option<u32> {
    for &(i, addr, len, flags, next) in descriptors {
        let at = GuestAddress(DESC + u64::from(i) * 16);
        memory.write_obj(addr, at).unwrap();
        memory.write_obj(len, at.unchecked_add(8)).unwrap();
        memory.write_obj(flags, at.unchecked_add(12)).unwrap();
        memory.write_obj(next, at.unchecked_add(14)).unwrap();
    }
    let idx: u16 = memory.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    memory
        .write_obj(head, GuestAddress(AVAIL + 4 + u64::from(idx % 8) * 2))
        .unwrap();
    memory
        .write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
        .unwrap();
    let used_before: u16 = memory.read_obj(GuestAddress(USED + 2)).unwrap();
    t.serve(0, memory);
    let used: u16 = memory.read_obj(GuestAddress(USED + 2)).unwrap();
    (used != used_before).then(|| {
        memory
            .read_obj(GuestAddress(USED + 4 + u64::from(used_before % 8) * 8 + 4))
            .unwrap()
    })
}

/// A descriptor as the test writes it: (index, address, length, flags, next).
pub(crate) type Descriptor = (u16, u64, u32, u16, u16);

pub(crate) const NEXT: u16 = 1;
pub(crate) const WRITE: u16 = 2;
