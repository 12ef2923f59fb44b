//! Small virtio-mmio drivers at CPL3, polling (no interrupts), for testing vmfork's devices
//! from inside a guest: feature negotiation, one split virtqueue at [`VIRTQ_DESC`], one
//! request at a time.

use crate::layout::{
    mailbox, DMA_BUFFER, VIRTIO_MMIO, VIRTQ_AVAIL, VIRTQ_DESC, VIRTQ_SIZE, VIRTQ_USED, VMGENID_MMIO,
};
use crate::workloads::Asm;
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Exit codes of the drivers when the device is not what they expect.
pub mod fail {
    pub const NO_GENERATION_PAGE: u8 = 2;
    pub const NOT_VIRTIO: u8 = 3;
    pub const NO_VERSION_1: u8 = 4;
    pub const FEATURES_REFUSED: u8 = 5;
    pub const QUEUE_TOO_SMALL: u8 = 6;
    pub const NO_COMPLETION: u8 = 7;
}

/// `entropy`'s bytes per request when PARAM0 is zero, and its largest.
pub const DEFAULT_ENTROPY_BYTES: u64 = 64;
pub const MAX_ENTROPY_BYTES: u64 = 0x8000;
/// Where `entropy`'s second request lands.
pub const ENTROPY_SECOND_BUFFER: u64 = DMA_BUFFER + MAX_ENTROPY_BYTES;

/// Register offsets (virtio 1.2, 4.2.2).
const MAGIC: i32 = 0x00;
const VERSION: i32 = 0x04;
const DEVICE_ID: i32 = 0x08;
const DEVICE_FEATURES: i32 = 0x10;
const DEVICE_FEATURES_SEL: i32 = 0x14;
const DRIVER_FEATURES: i32 = 0x20;
const DRIVER_FEATURES_SEL: i32 = 0x24;
const QUEUE_SEL: i32 = 0x30;
const QUEUE_NUM_MAX: i32 = 0x34;
const QUEUE_NUM: i32 = 0x38;
const QUEUE_READY: i32 = 0x44;
const QUEUE_NOTIFY: i32 = 0x50;
const INTERRUPT_STATUS: i32 = 0x60;
const INTERRUPT_ACK: i32 = 0x64;
const STATUS: i32 = 0x70;
const QUEUE_DESC: i32 = 0x80;
const QUEUE_DRIVER: i32 = 0x90;
const QUEUE_DEVICE: i32 = 0xa0;
/// Polls of the used ring before a driver gives up on a request.
const POLL_LIMIT: u32 = 1 << 24;

/// A driver being assembled: `r14` holds the device's MMIO base throughout.
struct Driver {
    g: Asm,
    fail: CodeLabel,
}

impl Driver {
    fn new() -> Result<Self, IcedError> {
        let mut g = Asm::new()?;
        let fail = g.a.create_label();
        Ok(Self { g, fail })
    }

    /// Exits with `code` unless the flags say equal.
    fn fail_unless_equal(&mut self, code: u8) -> Result<(), IcedError> {
        let mut ok = self.g.a.create_label();
        self.g.a.je(ok)?;
        self.g.a.mov(eax, code as u32)?;
        self.g.a.jmp(self.fail)?;
        self.g.a.set_label(&mut ok)?;
        self.g.a.nop()
    }

    /// Checks the device in `slot` is a virtio 1.x device of `device_id`, negotiates
    /// VIRTIO_F_VERSION_1 only and sets up queue 0 with [`VIRTQ_SIZE`] entries; leaves the
    /// device running (DRIVER_OK) with r14 = its base.
    fn set_up(&mut self, slot: u64, device_id: u32) -> Result<(), IcedError> {
        use fail::*;
        let base = VIRTIO_MMIO + slot * crate::layout::VIRTIO_MMIO_STRIDE;
        self.g.a.mov(r14, base)?;
        self.g
            .a
            .cmp(dword_ptr(r14 + MAGIC), 0x7472_6976u32 as i32)?;
        self.fail_unless_equal(NOT_VIRTIO)?;
        self.g.a.cmp(dword_ptr(r14 + VERSION), 2)?;
        self.fail_unless_equal(NOT_VIRTIO)?;
        self.g.a.cmp(dword_ptr(r14 + DEVICE_ID), device_id as i32)?;
        self.fail_unless_equal(NOT_VIRTIO)?;
        let a = &mut self.g.a;
        a.mov(dword_ptr(r14 + STATUS), 0)?; // reset
        a.mov(dword_ptr(r14 + STATUS), 1)?; // ACKNOWLEDGE
        a.mov(dword_ptr(r14 + STATUS), 3)?; // | DRIVER
        a.mov(dword_ptr(r14 + DEVICE_FEATURES_SEL), 1)?;
        a.test(dword_ptr(r14 + DEVICE_FEATURES), 1)?; // bit 32: VERSION_1
        let mut has_v1 = a.create_label();
        a.jnz(has_v1)?;
        a.mov(eax, NO_VERSION_1 as u32)?;
        a.jmp(self.fail)?;
        a.set_label(&mut has_v1)?;
        a.mov(dword_ptr(r14 + DRIVER_FEATURES_SEL), 1)?;
        a.mov(dword_ptr(r14 + DRIVER_FEATURES), 1)?;
        a.mov(dword_ptr(r14 + DRIVER_FEATURES_SEL), 0)?;
        a.mov(dword_ptr(r14 + DRIVER_FEATURES), 0)?;
        a.mov(dword_ptr(r14 + STATUS), 0xb)?; // | FEATURES_OK
        a.test(dword_ptr(r14 + STATUS), 8)?;
        let mut accepted = a.create_label();
        a.jnz(accepted)?;
        a.mov(eax, FEATURES_REFUSED as u32)?;
        a.jmp(self.fail)?;
        a.set_label(&mut accepted)?;
        a.mov(dword_ptr(r14 + QUEUE_SEL), 0)?;
        a.cmp(dword_ptr(r14 + QUEUE_NUM_MAX), VIRTQ_SIZE as i32)?;
        let mut big_enough = a.create_label();
        a.jae(big_enough)?;
        a.mov(eax, QUEUE_TOO_SMALL as u32)?;
        a.jmp(self.fail)?;
        a.set_label(&mut big_enough)?;
        a.mov(dword_ptr(r14 + QUEUE_NUM), VIRTQ_SIZE as i32)?;
        for (reg, addr) in [
            (QUEUE_DESC, VIRTQ_DESC),
            (QUEUE_DRIVER, VIRTQ_AVAIL),
            (QUEUE_DEVICE, VIRTQ_USED),
        ] {
            a.mov(dword_ptr(r14 + reg), addr as i32)?;
            a.mov(dword_ptr(r14 + reg + 4), 0)?;
        }
        a.mov(dword_ptr(r14 + QUEUE_READY), 1)?;
        a.mov(dword_ptr(r14 + STATUS), 0xf) // | DRIVER_OK
    }

    /// Emits `request(rdi = buffer, ecx = length) -> eax = bytes used`: one device-writable
    /// descriptor made available at the ring's next index, the queue notified, the used ring
    /// polled, the interrupt acknowledged. The ring indices live in guest memory, so a
    /// restored or forked guest carries on where its image left off.
    fn emit_request(&mut self, label: &mut CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.g.a;
        a.set_label(label)?;
        a.mov(rdx, VIRTQ_AVAIL)?;
        a.movzx(r8d, word_ptr(rdx + 2))?; // the index this request takes
        a.mov(eax, r8d)?;
        a.and(eax, (VIRTQ_SIZE - 1) as i32)?;
        // Descriptor number = ring slot: the descriptor is free once its slot is reused.
        a.mov(r9, VIRTQ_DESC)?;
        a.mov(r10d, eax)?;
        a.shl(r10d, 4)?;
        a.add(r9, r10)?;
        a.mov(qword_ptr(r9), rdi)?;
        a.mov(dword_ptr(r9 + 8), ecx)?;
        a.mov(word_ptr(r9 + 12), 2)?; // VIRTQ_DESC_F_WRITE
        a.mov(word_ptr(r9 + 14), 0)?;
        a.mov(word_ptr(rdx + rax * 2 + 4), ax)?;
        a.lea(r10d, ptr(r8 + 1))?;
        a.mov(word_ptr(rdx + 2), r10w)?; // publish (stores stay in order on x86)
        a.mov(dword_ptr(r14 + QUEUE_NOTIFY), 0)?;
        a.mov(rdx, VIRTQ_USED)?;
        a.mov(ecx, POLL_LIMIT)?;
        let mut poll = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut poll)?;
        a.cmp(word_ptr(rdx + 2), r10w)?;
        a.je(done)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(poll)?;
        a.mov(eax, fail::NO_COMPLETION as u32)?;
        a.jmp(self.fail)?;
        a.set_label(&mut done)?;
        a.mov(ecx, dword_ptr(r14 + INTERRUPT_STATUS))?;
        a.mov(dword_ptr(r14 + INTERRUPT_ACK), ecx)?;
        a.and(r8d, (VIRTQ_SIZE - 1) as i32)?;
        a.mov(eax, dword_ptr(rdx + r8 * 8 + 8))?; // used element: id, then len
        a.ret()
    }

    fn finish(mut self) -> Result<Vec<u8>, IcedError> {
        self.g.a.set_label(&mut self.fail)?;
        self.g.a.jmp(self.g.exit)?;
        self.g.finish()
    }
}

/// Copies the 16-byte generation id into the mailbox at `field`.
fn read_generation(a: &mut CodeAssembler, field: u64) -> Result<(), IcedError> {
    a.mov(rbx, VMGENID_MMIO)?;
    a.mov(rax, qword_ptr(rbx + 0x10))?;
    a.mov(qword_ptr(r15 + field as i32), rax)?;
    a.mov(rax, qword_ptr(rbx + 0x18))?;
    a.mov(qword_ptr(r15 + field as i32 + 8), rax)
}

/// `entropy`: reads the generation id (mailbox GENERATION_BEFORE), sets up the virtio-rng in
/// slot 0 and asks it for PARAM0 bytes into [`DMA_BUFFER`] (USED_LEN_BEFORE), writes the ready
/// port (where a test forks or snapshots it), then reads the generation id again
/// (GENERATION_AFTER), asks for PARAM0 bytes into [`ENTROPY_SECOND_BUFFER`] (USED_LEN_AFTER)
/// and exits 0. Other exit codes: [`fail`].
pub fn entropy() -> Result<Vec<u8>, IcedError> {
    let mut d = Driver::new()?;
    let mut request = d.g.a.create_label();
    d.g.a.mov(rbx, VMGENID_MMIO)?;
    d.g.a.cmp(dword_ptr(rbx), 0x4947_4d56)?; // "VMGI"
    d.fail_unless_equal(fail::NO_GENERATION_PAGE)?;
    read_generation(&mut d.g.a, mailbox::GENERATION_BEFORE)?;
    d.set_up(0, 4)?;
    let a = &mut d.g.a;
    // r12 = bytes per request: PARAM0, or the default, at most the maximum.
    let mut have = a.create_label();
    a.mov(r12, qword_ptr(r15 + mailbox::PARAM0 as i32))?;
    a.test(r12, r12)?;
    a.jnz(have)?;
    a.mov(r12, DEFAULT_ENTROPY_BYTES)?;
    a.set_label(&mut have)?;
    a.mov(rax, MAX_ENTROPY_BYTES)?;
    a.cmp(r12, rax)?;
    a.cmova(r12, rax)?;
    a.mov(rdi, DMA_BUFFER)?;
    a.mov(ecx, r12d)?;
    a.call(request)?;
    a.mov(qword_ptr(r15 + mailbox::USED_LEN_BEFORE as i32), rax)?;
    d.g.announce_ready()?;
    read_generation(&mut d.g.a, mailbox::GENERATION_AFTER)?;
    let a = &mut d.g.a;
    a.mov(rdi, ENTROPY_SECOND_BUFFER)?;
    a.mov(ecx, r12d)?;
    a.call(request)?;
    a.mov(qword_ptr(r15 + mailbox::USED_LEN_AFTER as i32), rax)?;
    d.g.exit_with(0)?;
    d.emit_request(&mut request)?;
    d.finish()
}
