//! Small virtio-mmio drivers at CPL3, polling (no interrupts), for testing vmfork's devices
//! from inside a guest: feature negotiation, one split virtqueue at [`VIRTQ_DESC`], one
//! request at a time; and `interrupts`, at ring 0, which takes the devices' interrupts.

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
/// Where the block driver keeps a request's header (16 bytes) and status byte (at +16).
const BLOCK_HEADER: u64 = VIRTQ_DESC + 0x400;
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

    /// Finds the first virtio-mmio slot holding a virtio 1.x device of `device_id`, negotiates
    /// VIRTIO_F_VERSION_1 only and sets up `queues` queues of [`VIRTQ_SIZE`] entries (queue q
    /// in the page at [`VIRTQ_DESC`] + q × 4 KiB: descriptors, then the available ring at
    /// +0x100, the used ring at +0x200); leaves the device running (DRIVER_OK) with r14 = its
    /// base.
    fn set_up(&mut self, device_id: u32, queues: u32) -> Result<(), IcedError> {
        use fail::*;
        let a = &mut self.g.a;
        let mut scan = a.create_label();
        let mut next = a.create_label();
        let mut found = a.create_label();
        a.mov(r14, VIRTIO_MMIO)?;
        a.mov(ecx, 8u32)?;
        a.set_label(&mut scan)?;
        a.cmp(dword_ptr(r14 + MAGIC), 0x7472_6976u32 as i32)?;
        a.jne(next)?;
        a.cmp(dword_ptr(r14 + VERSION), 2)?;
        a.jne(next)?;
        a.cmp(dword_ptr(r14 + DEVICE_ID), device_id as i32)?;
        a.je(found)?;
        a.set_label(&mut next)?;
        a.add(r14, crate::layout::VIRTIO_MMIO_STRIDE as i32)?;
        a.dec(ecx)?;
        a.jnz(scan)?;
        a.mov(eax, NOT_VIRTIO as u32)?;
        a.jmp(self.fail)?;
        a.set_label(&mut found)?;
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
        for q in 0..queues {
            let page = u64::from(q) * 0x1000;
            a.mov(dword_ptr(r14 + QUEUE_SEL), q as i32)?;
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
                a.mov(dword_ptr(r14 + reg), (addr + page) as i32)?;
                a.mov(dword_ptr(r14 + reg + 4), 0)?;
            }
            a.mov(dword_ptr(r14 + QUEUE_READY), 1)?;
        }
        a.mov(dword_ptr(r14 + STATUS), 0xf) // | DRIVER_OK
    }

    /// Emits `submit() -> eax = bytes used`: makes the chain at descriptor 0 available at the
    /// ring's next index, notifies the queue, polls the used ring, acknowledges the
    /// interrupt. The ring indices live in guest memory, so a restored or forked guest carries
    /// on where its image left off.
    fn emit_submit(&mut self, label: &mut CodeLabel) -> Result<(), IcedError> {
        self.emit_submit_with(label, true)
    }

    /// [`Self::emit_submit`]; without `ack` the interrupt status is left alone (a polling
    /// loop that never enables interrupts saves two MMIO exits per request).
    fn emit_submit_with(&mut self, label: &mut CodeLabel, ack: bool) -> Result<(), IcedError> {
        let a = &mut self.g.a;
        a.set_label(label)?;
        a.mov(rdx, VIRTQ_AVAIL)?;
        a.movzx(r8d, word_ptr(rdx + 2))?; // the index this request takes
        a.mov(eax, r8d)?;
        a.and(eax, (VIRTQ_SIZE - 1) as i32)?;
        a.mov(word_ptr(rdx + rax * 2 + 4), 0)?; // head: descriptor 0
        a.lea(r10d, ptr(r8 + 1))?;
        a.mov(word_ptr(rdx + 2), r10w)?; // publish (stores stay in order on x86)
        a.mov(dword_ptr(r14 + QUEUE_NOTIFY), 0)?;
        a.mov(rdx, VIRTQ_USED)?;
        self.emit_poll(word_ptr(rdx + 2), r10w, POLL_LIMIT)?;
        let a = &mut self.g.a;
        if ack {
            a.mov(ecx, dword_ptr(r14 + INTERRUPT_STATUS))?;
            a.mov(dword_ptr(r14 + INTERRUPT_ACK), ecx)?;
        }
        a.and(r8d, (VIRTQ_SIZE - 1) as i32)?;
        a.mov(eax, dword_ptr(rdx + r8 * 8 + 8))?; // used element: id, then len
        a.ret()
    }

    /// Emits `fill(rdi = buffer, ecx = length) -> eax = bytes used`: one device-writable
    /// buffer (an entropy request).
    fn emit_fill(&mut self, label: &mut CodeLabel, submit: CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.g.a;
        a.set_label(label)?;
        a.mov(r9, VIRTQ_DESC)?;
        a.mov(qword_ptr(r9), rdi)?;
        a.mov(dword_ptr(r9 + 8), ecx)?;
        a.mov(word_ptr(r9 + 12), 2)?; // VIRTQ_DESC_F_WRITE
        a.mov(word_ptr(r9 + 14), 0)?;
        a.jmp(submit)
    }

    /// Emits `block(eax = type, r11 = sector, rdi = buffer, ecx = length) -> eax = status`: a
    /// virtio-blk request of three descriptors (header, data, status byte).
    fn emit_block(&mut self, label: &mut CodeLabel, submit: CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.g.a;
        a.set_label(label)?;
        a.mov(r9, BLOCK_HEADER)?;
        a.mov(dword_ptr(r9), eax)?;
        a.mov(dword_ptr(r9 + 4), 0)?;
        a.mov(qword_ptr(r9 + 8), r11)?;
        a.mov(byte_ptr(r9 + 16), 0xff)?; // the device overwrites it
        a.mov(r10, VIRTQ_DESC)?;
        a.mov(qword_ptr(r10), r9)?;
        a.mov(dword_ptr(r10 + 8), 16)?;
        a.mov(word_ptr(r10 + 12), 1)?; // NEXT
        a.mov(word_ptr(r10 + 14), 1)?;
        a.mov(qword_ptr(r10 + 16), rdi)?;
        a.mov(dword_ptr(r10 + 24), ecx)?;
        a.mov(edx, 1u32)?; // NEXT, and WRITE for a read (type 0)
        let mut is_out = a.create_label();
        a.test(eax, eax)?;
        a.jnz(is_out)?;
        a.or(edx, 2)?;
        a.set_label(&mut is_out)?;
        a.mov(word_ptr(r10 + 28), dx)?;
        a.mov(word_ptr(r10 + 30), 2)?;
        a.lea(rax, ptr(r9 + 16))?;
        a.mov(qword_ptr(r10 + 32), rax)?;
        a.mov(dword_ptr(r10 + 40), 1)?;
        a.mov(word_ptr(r10 + 44), 2)?; // WRITE
        a.mov(word_ptr(r10 + 46), 0)?;
        a.call(submit)?;
        a.mov(r9, BLOCK_HEADER)?;
        a.movzx(eax, byte_ptr(r9 + 16))?;
        a.ret()
    }

    /// Emits `push(rsi = queue page, edi = queue index, r9 = buffer, ecx = length, edx =
    /// flags) -> eax = the available index after it`: descriptor 0 of the queue made available
    /// (one buffer at a time per queue), the queue notified.
    fn emit_push(&mut self, label: &mut CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.g.a;
        a.set_label(label)?;
        a.mov(qword_ptr(rsi), r9)?;
        a.mov(dword_ptr(rsi + 8), ecx)?;
        a.mov(word_ptr(rsi + 12), dx)?;
        a.mov(word_ptr(rsi + 14), 0)?;
        a.movzx(eax, word_ptr(rsi + 0x102))?;
        a.mov(r8d, eax)?;
        a.and(r8d, (VIRTQ_SIZE - 1) as i32)?;
        a.mov(word_ptr(rsi + r8 * 2 + 0x104), 0)?;
        a.inc(eax)?;
        a.mov(word_ptr(rsi + 0x102), ax)?;
        a.mov(dword_ptr(r14 + QUEUE_NOTIFY), edi)?;
        a.ret()
    }

    /// Emits `wait_used(rsi = queue page, eax = index to reach)`: polls the used ring (an
    /// asynchronous device answers from its worker), at most `limit` times.
    fn emit_wait_used(&mut self, label: &mut CodeLabel, limit: u32) -> Result<(), IcedError> {
        self.g.a.set_label(label)?;
        self.emit_poll(word_ptr(rsi + 0x202), ax, limit)?;
        self.g.a.ret()
    }

    /// Emits a loop polling the 16-bit used index at `used` until it equals `target` (ecx
    /// counts down from `limit`; at zero the driver fails with NO_COMPLETION).
    fn emit_poll(
        &mut self,
        used: AsmMemoryOperand,
        target: AsmRegister16,
        limit: u32,
    ) -> Result<(), IcedError> {
        let a = &mut self.g.a;
        a.mov(ecx, limit)?;
        let mut poll = a.create_label();
        let mut reached = a.create_label();
        a.set_label(&mut poll)?;
        a.cmp(used, target)?;
        a.je(reached)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(poll)?;
        a.mov(eax, fail::NO_COMPLETION as u32)?;
        a.jmp(self.fail)?;
        a.set_label(&mut reached)?;
        a.nop()
    }

    fn finish(mut self) -> Result<Vec<u8>, IcedError> {
        self.g.a.set_label(&mut self.fail)?;
        self.g.a.jmp(self.g.exit)?;
        self.g.finish()
    }

    /// [`Self::finish`] for a ring-0 driver with an IDT (see `Asm::finish_with_idt`).
    fn finish_with_idt(
        mut self,
        handler: CodeLabel,
        own: &[(u8, CodeLabel)],
        vectors: usize,
    ) -> Result<Vec<u8>, IcedError> {
        self.g.a.set_label(&mut self.fail)?;
        self.g.a.jmp(self.g.exit)?;
        self.g.finish_with_idt(handler, own, vectors)
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
    let mut submit = d.g.a.create_label();
    d.g.a.mov(rbx, VMGENID_MMIO)?;
    d.g.a.cmp(dword_ptr(rbx), 0x4947_4d56)?; // "VMGI"
    d.fail_unless_equal(fail::NO_GENERATION_PAGE)?;
    read_generation(&mut d.g.a, mailbox::GENERATION_BEFORE)?;
    d.set_up(4, 1)?;
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
    d.emit_fill(&mut request, submit)?;
    d.emit_submit(&mut submit)?;
    d.finish()
}

/// Where `disk` keeps its buffers (each 4 KiB but the first, PARAM0 bytes).
pub mod disk_buffers {
    use crate::layout::DMA_BUFFER;
    /// Sectors 0.. as first read (PARAM0 bytes).
    pub const FIRST_READ: u64 = DMA_BUFFER;
    /// What `disk` writes to sector 8 (PARAM1 repeated) and reads back.
    pub const WRITTEN_BEFORE: u64 = DMA_BUFFER + 0x1_0000;
    pub const READ_BACK_BEFORE: u64 = DMA_BUFFER + 0x2_0000;
    /// Sector 16 as found after the ready port, what is written there (PARAM2 repeated) and
    /// what is read back.
    pub const FOUND_AFTER: u64 = DMA_BUFFER + 0x3_0000;
    pub const WRITTEN_AFTER: u64 = DMA_BUFFER + 0x4_0000;
    pub const READ_BACK_AFTER: u64 = DMA_BUFFER + 0x5_0000;
    /// Sector 8 read again after the ready port (from the disk a fork or restore has).
    pub const REREAD_BEFORE: u64 = DMA_BUFFER + 0x6_0000;
    /// Largest first read.
    pub const FIRST_READ_MAX: u64 = 0x1_0000;
}

/// The sectors `disk` writes before and after the ready port.
pub const DISK_SECTOR_BEFORE: u64 = 8;
pub const DISK_SECTOR_AFTER: u64 = 16;
/// `disk` exits with this plus the step (1-7) whose request did not end with status 0.
pub const DISK_FAILED_STEP: u8 = 10;

/// `disk`: sets up the virtio-blk in slot 1, stores its capacity (mailbox DISK_CAPACITY),
/// reads PARAM0 bytes (default 4096) from sector 0, writes 4 KiB of PARAM1 to sector
/// [`DISK_SECTOR_BEFORE`] and reads it back; writes the ready port (where a test forks or
/// snapshots it); then reads sector [`DISK_SECTOR_BEFORE`] again and sector
/// [`DISK_SECTOR_AFTER`] as it finds it, writes 4 KiB of
/// PARAM2 (read from the mailbox only now) there, reads it back and exits 0. A request that
/// fails exits with [`DISK_FAILED_STEP`] + its step, its status in mailbox DISK_STATUS.
pub fn disk() -> Result<Vec<u8>, IcedError> {
    use disk_buffers::*;
    let mut d = Driver::new()?;
    let mut block = d.g.a.create_label();
    let mut submit = d.g.a.create_label();
    let mut fill = d.g.a.create_label();
    d.set_up(2, 1)?;
    let a = &mut d.g.a;
    a.mov(rax, qword_ptr(r14 + 0x100))?;
    a.mov(qword_ptr(r15 + mailbox::DISK_CAPACITY as i32), rax)?;
    let mut have = a.create_label();
    a.mov(r12, qword_ptr(r15 + mailbox::PARAM0 as i32))?;
    a.test(r12, r12)?;
    a.jnz(have)?;
    a.mov(r12, 4096u64)?;
    a.set_label(&mut have)?;
    a.mov(rax, FIRST_READ_MAX)?;
    a.cmp(r12, rax)?;
    a.cmova(r12, rax)?;
    // (type, sector, buffer, length register or 4 KiB, PARAM to fill the buffer with first)
    let steps: [(u32, u64, u64, bool, Option<u64>); 7] = [
        (0, 0, FIRST_READ, true, None),
        (
            1,
            DISK_SECTOR_BEFORE,
            WRITTEN_BEFORE,
            false,
            Some(mailbox::PARAM1),
        ),
        (0, DISK_SECTOR_BEFORE, READ_BACK_BEFORE, false, None),
        (0, DISK_SECTOR_BEFORE, REREAD_BEFORE, false, None),
        (0, DISK_SECTOR_AFTER, FOUND_AFTER, false, None),
        (
            1,
            DISK_SECTOR_AFTER,
            WRITTEN_AFTER,
            false,
            Some(mailbox::PARAM2),
        ),
        (0, DISK_SECTOR_AFTER, READ_BACK_AFTER, false, None),
    ];
    for (step, (kind, sector, buffer, first, pattern)) in steps.into_iter().enumerate() {
        if step == 3 {
            d.g.announce_ready()?;
        }
        let a = &mut d.g.a;
        if let Some(param) = pattern {
            a.mov(rax, qword_ptr(r15 + param as i32))?;
            a.mov(rdi, buffer)?;
            a.call(fill)?;
        }
        a.mov(eax, kind)?;
        a.mov(r11, sector)?;
        a.mov(rdi, buffer)?;
        if first {
            a.mov(ecx, r12d)?;
        } else {
            a.mov(ecx, 4096u32)?;
        }
        a.call(block)?;
        a.mov(qword_ptr(r15 + mailbox::DISK_STATUS as i32), rax)?;
        a.test(eax, eax)?;
        let mut ok = a.create_label();
        a.jz(ok)?;
        a.mov(eax, (DISK_FAILED_STEP + step as u8 + 1) as u32)?;
        a.jmp(d.fail)?;
        a.set_label(&mut ok)?;
    }
    d.g.exit_with(0)?;
    // fill(rax = pattern, rdi = buffer): 4 KiB of the pattern.
    let a = &mut d.g.a;
    a.set_label(&mut fill)?;
    a.mov(ecx, 512u32)?;
    a.rep().stosq()?;
    a.ret()?;
    d.emit_block(&mut block, submit)?;
    d.emit_submit(&mut submit)?;
    d.finish()
}

/// `diskbench`'s request size when PARAM0 is zero.
pub const DEFAULT_DISKBENCH_BYTES: u64 = 4096;

/// `diskbench`: sets up the virtio-blk in slot 1 and makes PARAM2 requests of PARAM0 bytes
/// (a multiple of 512, at most 64 KiB; default 4 KiB) one after another, reads when PARAM1 is 0
/// and writes otherwise (each write's first 8 bytes its number, from 1), through sectors 0 on
/// (wrapping at the disk's end), counting them in PROGRESS; exits 0, or [`DISK_FAILED_STEP`] + 1 when a request fails. One request per
/// notify, interrupts never acknowledged (it polls): the device's cost per request.
pub fn diskbench() -> Result<Vec<u8>, IcedError> {
    let mut d = Driver::new()?;
    let mut block = d.g.a.create_label();
    let mut submit = d.g.a.create_label();
    d.set_up(2, 1)?;
    let a = &mut d.g.a;
    let mut have = a.create_label();
    a.mov(r12, qword_ptr(r15 + mailbox::PARAM0 as i32))?;
    a.test(r12, r12)?;
    a.jnz(have)?;
    a.mov(r12, DEFAULT_DISKBENCH_BYTES)?;
    a.set_label(&mut have)?;
    a.mov(rax, disk_buffers::FIRST_READ_MAX)?;
    a.cmp(r12, rax)?;
    a.cmova(r12, rax)?;
    a.and(r12, -512i32)?; // whole sectors
                          // r13 = request type, rbx = requests left, r11 = sector, rbp = sectors per request,
                          // rsi = the disk's sectors.
    a.mov(r13, qword_ptr(r15 + mailbox::PARAM1 as i32))?;
    a.test(r13, r13)?;
    a.setnz(r13b)?;
    a.movzx(r13d, r13b)?;
    a.mov(rbx, qword_ptr(r15 + mailbox::PARAM2 as i32))?;
    a.mov(rsi, qword_ptr(r14 + 0x100))?;
    a.mov(rbp, r12)?;
    a.shr(rbp, 9)?;
    a.xor(r11d, r11d)?;
    a.mov(qword_ptr(r15 + mailbox::PROGRESS as i32), 0)?;
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.test(rbx, rbx)?;
    a.jz(done)?;
    // Wrap before a request would pass the end.
    let mut fits = a.create_label();
    a.lea(rax, ptr(r11 + rbp))?;
    a.cmp(rax, rsi)?;
    a.jbe(fits)?;
    a.xor(r11d, r11d)?;
    a.set_label(&mut fits)?;
    // The request's number (PROGRESS + 1) in the buffer's first 8 bytes: a written disk says
    // which request wrote each chunk.
    a.mov(rax, qword_ptr(r15 + mailbox::PROGRESS as i32))?;
    a.inc(rax)?;
    a.mov(rdx, DMA_BUFFER)?;
    a.mov(qword_ptr(rdx), rax)?;
    a.push(r11)?;
    a.mov(eax, r13d)?;
    a.mov(rdi, DMA_BUFFER)?;
    a.mov(ecx, r12d)?;
    a.call(block)?;
    a.pop(r11)?;
    a.test(eax, eax)?;
    let mut ok = a.create_label();
    a.jz(ok)?;
    a.mov(qword_ptr(r15 + mailbox::DISK_STATUS as i32), rax)?;
    a.mov(eax, (DISK_FAILED_STEP + 1) as u32)?;
    a.jmp(d.fail)?;
    a.set_label(&mut ok)?;
    a.add(r11, rbp)?;
    a.inc(qword_ptr(r15 + mailbox::PROGRESS as i32))?;
    a.dec(rbx)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    d.g.exit_with(0)?;
    d.emit_block(&mut block, submit)?;
    d.emit_submit_with(&mut submit, false)?;
    d.finish()
}

/// `vsock`'s buffers: the one rx buffer (re-posted after each packet), the tx packet, the
/// event buffer, and the round-trip times (TSC cycles, one u64 each).
pub mod vsock_buffers {
    use crate::layout::DMA_BUFFER;
    pub const RX: u64 = DMA_BUFFER;
    pub const RX_LEN: u32 = 4096;
    pub const TX: u64 = DMA_BUFFER + 0x1000;
    pub const EVENT: u64 = DMA_BUFFER + 0x2000;
    pub const ROUND_TRIPS: u64 = DMA_BUFFER + 0x1_0000;
    /// Round trips whose time is kept (more are made, not timed).
    pub const ROUND_TRIPS_KEPT: u64 = 0x4000;
}

/// The guest port `vsock` connects from.
pub const VSOCK_GUEST_PORT: u32 = 1234;
/// `vsock` exits with this plus the step whose reply was not what it expects (1: the
/// connection, 2: an echo).
pub const VSOCK_FAILED_STEP: u8 = 20;
const VSOCK_POLL_LIMIT: u32 = 1 << 30;
/// virtio-vsock packet fields (offsets in virtio_vsock_hdr) and ops.
const HDR_LEN: u64 = 44;
const OP_REQUEST: u32 = 1;
const OP_RESPONSE: u32 = 2;
const OP_RW: u32 = 5;

/// `vsock`: finds the virtio-vsock, posts an rx and an event buffer, connects from guest port
/// [`VSOCK_GUEST_PORT`] to host port PARAM0 (the host's `<uds_path>_PARAM0` socket), then
/// sends PARAM1 8-byte counters and expects each echoed back (PROGRESS counts them; each
/// round trip's TSC cycles go to [`vsock_buffers::ROUND_TRIPS`]); writes the ready port; then
/// sends one more counter and stores the op of the reply in VSOCK_LAST_OP (5: echoed; 3: reset,
/// as a fork or restore sees) and how many transport-reset events it got in VSOCK_RESETS;
/// exits 0.
pub fn vsock() -> Result<Vec<u8>, IcedError> {
    use vsock_buffers::*;
    let mut d = Driver::new()?;
    let mut push = d.g.a.create_label();
    let mut wait_used = d.g.a.create_label();
    let mut send = d.g.a.create_label();
    let mut recv = d.g.a.create_label();
    let (rx_q, tx_q, event_q) = (VIRTQ_DESC, VIRTQ_DESC + 0x1000, VIRTQ_DESC + 0x2000);
    d.set_up(19, 3)?;
    let a = &mut d.g.a;
    a.mov(r13, qword_ptr(r14 + 0x100))?; // guest CID
                                         // The event buffer and the rx buffer.
    for (queue, index, buffer, len) in [(event_q, 2, EVENT, 8u32), (rx_q, 0, RX, RX_LEN)] {
        a.mov(rsi, queue)?;
        a.mov(edi, index as u32)?;
        a.mov(r9, buffer)?;
        a.mov(ecx, len)?;
        a.mov(edx, 2u32)?; // WRITE
        a.call(push)?;
    }
    // The header every packet starts with: CIDs, ports, stream type, our buffer space.
    a.mov(r9, TX)?;
    a.mov(qword_ptr(r9), r13)?;
    a.mov(qword_ptr(r9 + 8), 2)?;
    a.mov(dword_ptr(r9 + 16), VSOCK_GUEST_PORT as i32)?;
    a.mov(rax, qword_ptr(r15 + mailbox::PARAM0 as i32))?;
    a.mov(dword_ptr(r9 + 20), eax)?;
    a.mov(word_ptr(r9 + 28), 1)?;
    a.mov(dword_ptr(r9 + 32), 0)?;
    a.mov(dword_ptr(r9 + 36), 0x1_0000)?;
    a.xor(ebp, ebp)?; // bytes received (our fwd_cnt)
                      // Connect.
    a.mov(eax, OP_REQUEST)?;
    a.xor(ecx, ecx)?;
    a.call(send)?;
    a.call(recv)?;
    a.cmp(eax, OP_RESPONSE as i32)?;
    d.fail_unless_equal(VSOCK_FAILED_STEP + 1)?;
    // Echoes.
    let a = &mut d.g.a;
    a.mov(rbx, qword_ptr(r15 + mailbox::PARAM1 as i32))?;
    a.xor(r12d, r12d)?;
    a.mov(qword_ptr(r15 + mailbox::PROGRESS as i32), 0)?;
    let mut top = a.create_label();
    let mut echoed = a.create_label();
    a.set_label(&mut top)?;
    a.test(rbx, rbx)?;
    a.jz(echoed)?;
    a.inc(r12)?;
    a.mov(r9, TX)?;
    a.mov(qword_ptr(r9 + HDR_LEN as i32), r12)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r11, rax)?;
    a.mov(eax, OP_RW)?;
    a.mov(ecx, 8u32)?;
    a.push(r11)?;
    a.call(send)?;
    a.call(recv)?;
    a.pop(r11)?;
    a.cmp(eax, OP_RW as i32)?;
    d.fail_unless_equal(VSOCK_FAILED_STEP + 2)?;
    let a = &mut d.g.a;
    a.mov(r9, RX)?;
    a.cmp(qword_ptr(r9 + HDR_LEN as i32), r12)?;
    d.fail_unless_equal(VSOCK_FAILED_STEP + 2)?;
    let a = &mut d.g.a;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, r11)?;
    let mut untimed = a.create_label();
    a.cmp(r12, ROUND_TRIPS_KEPT as i32)?;
    a.ja(untimed)?;
    a.mov(rdx, ROUND_TRIPS - 8)?;
    a.mov(qword_ptr(rdx + r12 * 8), rax)?;
    a.set_label(&mut untimed)?;
    a.mov(qword_ptr(r15 + mailbox::PROGRESS as i32), r12)?;
    a.dec(rbx)?;
    a.jmp(top)?;
    a.set_label(&mut echoed)?;
    d.g.announce_ready()?;
    // One more counter, whatever answers it.
    let a = &mut d.g.a;
    a.inc(r12)?;
    a.mov(r9, TX)?;
    a.mov(qword_ptr(r9 + HDR_LEN as i32), r12)?;
    a.mov(eax, OP_RW)?;
    a.mov(ecx, 8u32)?;
    a.call(send)?;
    a.call(recv)?;
    a.mov(qword_ptr(r15 + mailbox::VSOCK_LAST_OP as i32), rax)?;
    a.mov(rsi, event_q)?;
    a.movzx(eax, word_ptr(rsi + 0x202))?;
    a.mov(qword_ptr(r15 + mailbox::VSOCK_RESETS as i32), rax)?;
    d.g.exit_with(0)?;

    d.emit_push(&mut push)?;
    d.emit_wait_used(&mut wait_used, VSOCK_POLL_LIMIT)?;
    let a = &mut d.g.a;
    // send(eax = op, ecx = payload length): the packet at TX, our fwd_cnt = rbp.
    a.set_label(&mut send)?;
    a.mov(r9, TX)?;
    a.mov(word_ptr(r9 + 30), ax)?;
    a.mov(dword_ptr(r9 + 24), ecx)?;
    a.mov(dword_ptr(r9 + 40), ebp)?;
    a.add(ecx, HDR_LEN as i32)?;
    a.mov(rsi, tx_q)?;
    a.mov(edi, 1u32)?;
    a.xor(edx, edx)?;
    a.call(push)?;
    a.call(wait_used)?;
    a.ret()?;
    // recv() -> eax = the op of the next packet (its payload at RX + 44), re-posting the buffer.
    a.set_label(&mut recv)?;
    a.mov(rsi, rx_q)?;
    a.movzx(eax, word_ptr(rsi + 0x102))?;
    a.call(wait_used)?;
    a.mov(r9, RX)?;
    a.mov(eax, dword_ptr(r9 + 24))?;
    a.add(ebp, eax)?;
    a.movzx(eax, word_ptr(r9 + 30))?;
    a.push(rax)?;
    a.mov(rsi, rx_q)?;
    a.xor(edi, edi)?;
    a.mov(r9, RX)?;
    a.mov(ecx, RX_LEN)?;
    a.mov(edx, 2u32)?;
    a.call(push)?;
    a.pop(rax)?;
    a.ret()?;
    d.finish()
}

/// `net`'s buffers: the rx buffer (re-posted after each frame) and the tx frame.
pub mod net_buffers {
    use crate::layout::DMA_BUFFER;
    pub const RX: u64 = DMA_BUFFER;
    pub const RX_LEN: u32 = 2048;
    pub const TX: u64 = DMA_BUFFER + 0x1000;
}

/// The ethertype `net` sends and listens for (IEEE local experimental).
pub const NET_ETHERTYPE: u16 = 0x88b5;
const NET_POLL_LIMIT: u32 = 1 << 30;

/// `net`: finds the virtio-net, stores its MAC (mailbox NET_MAC, six bytes), posts an rx
/// buffer, writes the ready port (where a test forks it), reads the MAC again (NET_MAC_AFTER: a
/// fork's own), broadcasts one frame of [`NET_ETHERTYPE`] carrying PARAM0, then waits for a
/// frame of that type (others are skipped) and stores its payload in NET_RECEIVED and its
/// source MAC in NET_FROM; exits 0.
pub fn net() -> Result<Vec<u8>, IcedError> {
    use net_buffers::*;
    let mut d = Driver::new()?;
    let mut push = d.g.a.create_label();
    let mut wait_used = d.g.a.create_label();
    let mut read_mac = d.g.a.create_label();
    let (rx_q, tx_q) = (VIRTQ_DESC, VIRTQ_DESC + 0x1000);
    d.set_up(1, 2)?;
    let a = &mut d.g.a;
    a.call(read_mac)?;
    a.mov(qword_ptr(r15 + mailbox::NET_MAC as i32), rax)?;
    a.mov(rsi, rx_q)?;
    a.xor(edi, edi)?;
    a.mov(r9, RX)?;
    a.mov(ecx, RX_LEN)?;
    a.mov(edx, 2u32)?;
    a.call(push)?;
    d.g.announce_ready()?;
    let a = &mut d.g.a;
    a.call(read_mac)?;
    a.mov(qword_ptr(r15 + mailbox::NET_MAC_AFTER as i32), rax)?;
    // The frame: a zero virtio_net_hdr, broadcast, our MAC, the ethertype, PARAM0, padding.
    a.mov(rdi, TX)?;
    a.push(rax)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 10u32)?;
    a.rep().stosq()?;
    a.pop(rax)?;
    a.mov(r9, TX)?;
    a.mov(dword_ptr(r9 + 12), -1)?;
    a.mov(word_ptr(r9 + 16), -1)?;
    a.mov(dword_ptr(r9 + 18), eax)?;
    a.shr(rax, 32)?;
    a.mov(word_ptr(r9 + 22), ax)?;
    a.mov(word_ptr(r9 + 24), NET_ETHERTYPE.swap_bytes() as i32)?;
    a.mov(rax, qword_ptr(r15 + mailbox::PARAM0 as i32))?;
    a.mov(qword_ptr(r9 + 26), rax)?;
    a.mov(rsi, tx_q)?;
    a.mov(edi, 1u32)?;
    a.mov(ecx, 12 + 60)?;
    a.xor(edx, edx)?;
    a.call(push)?;
    a.call(wait_used)?;
    // Frames until one of ours.
    let mut next = a.create_label();
    let mut ours = a.create_label();
    a.set_label(&mut next)?;
    a.mov(rsi, rx_q)?;
    a.movzx(eax, word_ptr(rsi + 0x102))?;
    a.call(wait_used)?;
    a.mov(r9, RX)?;
    a.cmp(word_ptr(r9 + 24), NET_ETHERTYPE.swap_bytes() as i32)?;
    a.je(ours)?;
    a.mov(rsi, rx_q)?;
    a.xor(edi, edi)?;
    a.mov(ecx, RX_LEN)?;
    a.mov(edx, 2u32)?;
    a.call(push)?;
    a.jmp(next)?;
    a.set_label(&mut ours)?;
    a.mov(rax, qword_ptr(r9 + 26))?;
    a.mov(qword_ptr(r15 + mailbox::NET_RECEIVED as i32), rax)?;
    a.mov(eax, dword_ptr(r9 + 18))?;
    a.movzx(edx, word_ptr(r9 + 22))?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(r15 + mailbox::NET_FROM as i32), rax)?;
    d.g.exit_with(0)?;
    let a = &mut d.g.a;
    // read_mac() -> rax = the six bytes of the config space's MAC.
    a.set_label(&mut read_mac)?;
    a.mov(eax, dword_ptr(r14 + 0x100))?;
    a.movzx(edx, word_ptr(r14 + 0x104))?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.ret()?;
    d.emit_push(&mut push)?;
    d.emit_wait_used(&mut wait_used, NET_POLL_LIMIT)?;
    d.finish()
}

/// The IOAPIC's registers: the select register and the window (at +0x10).
const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// The i8042 keyboard's line, the generation id's and virtio slot 0's (vmfork's GSIs 1, 5, 6).
pub const KEYBOARD_GSI: u32 = 1;
pub const GENERATION_GSI: u32 = 5;
pub const VIRTIO_SLOT0_GSI: u32 = 6;
/// Where in the mailbox page `interrupts` counts interrupts: a u64 per vector.
pub const IRQ_COUNTS: u64 = 0x800;

/// Halts until an interrupt from `gsi` has been counted (cli before the check and `sti; hlt`
/// after it, so one arriving in between still ends the halt); leaves interrupts enabled.
fn halt_until_counted(a: &mut CodeAssembler, gsi: u32) -> Result<(), IcedError> {
    halt_until_count(a, gsi, 1)
}

/// [`halt_until_counted`] until `at_least` interrupts from `gsi` have been counted.
fn halt_until_count(a: &mut CodeAssembler, gsi: u32, at_least: i32) -> Result<(), IcedError> {
    let mut wait = a.create_label();
    let mut done = a.create_label();
    let counter = (IRQ_COUNTS + u64::from(irq_vector(gsi)) * 8) as i32;
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(qword_ptr(r15 + counter), at_least)?;
    a.jge(done)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut done)?;
    a.sti()
}

/// The vector `interrupts` routes IOAPIC pin `gsi` to.
pub const fn irq_vector(gsi: u32) -> u8 {
    0x30 + gsi as u8
}

/// `interrupts` (ring 0, for `sti`/`hlt`): takes the interrupts vmfork's devices raise, the
/// way a kernel's drivers do. Enables the local APIC, routes IOAPIC pins [`KEYBOARD_GSI`],
/// [`GENERATION_GSI`] and [`VIRTIO_SLOT0_GSI`] (edge, active high, to APIC 0) to
/// [`irq_vector`] of each, enables interrupts, asks the virtio-rng in slot 0 for 64 bytes
/// (USED_LEN_BEFORE) and halts until its interrupt has come, resets the i8042 keyboard and
/// reads its two answer bytes (KEYBOARD_ANSWER), each after its interrupt, writes the ready port
/// (where a test forks it), then halts until a generation-id interrupt has come and exits 0.
/// Each routed vector has its own gate, whose handler counts it at [`IRQ_COUNTS`] and sends
/// the EOI.
pub fn interrupts() -> Result<Vec<u8>, IcedError> {
    use crate::workloads::{emit_idtr, LAPIC_BASE};
    let mut d = Driver::new()?;
    let mut handler = d.g.a.create_label();
    let mut idtr = d.g.a.create_label();
    let mut eoi = d.g.a.create_label();
    let mut request = d.g.a.create_label();
    let mut submit = d.g.a.create_label();
    let a = &mut d.g.a;
    a.lidt(ptr(idtr))?;
    // Mask both 8259 PICs: their lines are the IOAPIC's pins too, and KVM wires the PIC to
    // the boot CPU's LINT0 (a kernel using the IOAPIC does the same).
    a.mov(al, 0xFFu32)?;
    a.out(0x21, al)?;
    a.out(0xA1, al)?;
    a.mov(rbx, LAPIC_BASE)?;
    a.mov(dword_ptr(rbx + 0xF0), 0x1FFu32)?; // software-enable, spurious vector 0xff
    a.mov(rbx, IOAPIC_BASE)?;
    for gsi in [KEYBOARD_GSI, GENERATION_GSI, VIRTIO_SLOT0_GSI] {
        a.mov(dword_ptr(rbx), 0x10 + 2 * gsi)?;
        a.mov(dword_ptr(rbx + 0x10), u32::from(irq_vector(gsi)))?; // fixed, edge, unmasked
        a.mov(dword_ptr(rbx), 0x11 + 2 * gsi)?;
        a.mov(dword_ptr(rbx + 0x10), 0u32)?; // APIC 0
    }
    a.sti()?;
    d.set_up(4, 1)?;
    let a = &mut d.g.a;
    a.mov(rdi, DMA_BUFFER)?;
    a.mov(ecx, DEFAULT_ENTROPY_BYTES as u32)?;
    a.call(request)?;
    a.mov(qword_ptr(r15 + mailbox::USED_LEN_BEFORE as i32), rax)?;
    // (The used ring is filled before the interrupt arrives: wait for it.)
    halt_until_counted(a, VIRTIO_SLOT0_GSI)?;
    // The keyboard's reset: its acknowledgement interrupts, and so does its self-test result
    // once the first byte is read.
    a.mov(al, 0xFFu32)?;
    a.out(0x60, al)?;
    halt_until_count(a, KEYBOARD_GSI, 1)?;
    a.in_(al, 0x60)?;
    a.mov(byte_ptr(r15 + mailbox::KEYBOARD_ANSWER as i32), al)?;
    halt_until_count(a, KEYBOARD_GSI, 2)?;
    a.in_(al, 0x60)?;
    a.mov(byte_ptr(r15 + (mailbox::KEYBOARD_ANSWER + 1) as i32), al)?;
    d.g.announce_ready()?;
    halt_until_counted(&mut d.g.a, GENERATION_GSI)?;
    d.g.exit_with(0)?;
    d.emit_fill(&mut request, submit)?;
    d.emit_submit(&mut submit)?;
    // A handler per routed vector: count it, EOI. (Each has its own gate: the local APIC's
    // in-service register would say which vector came, but this development host's KVM shows
    // it empty inside the handler.) Any other vector is counted in PROGRESS.
    let a = &mut d.g.a;
    let mut own = Vec::new();
    for gsi in [KEYBOARD_GSI, GENERATION_GSI, VIRTIO_SLOT0_GSI] {
        let vector = irq_vector(gsi);
        let mut label = a.create_label();
        a.set_label(&mut label)?;
        a.inc(qword_ptr(r15 + (IRQ_COUNTS + u64::from(vector) * 8) as i32))?;
        a.jmp(eoi)?;
        own.push((vector, label));
    }
    a.set_label(&mut handler)?;
    a.inc(qword_ptr(r15 + mailbox::PROGRESS as i32))?;
    a.set_label(&mut eoi)?;
    a.push(rax)?;
    a.mov(rax, LAPIC_BASE + 0xB0)?;
    a.mov(dword_ptr(rax), 0u32)?;
    a.pop(rax)?;
    a.iretq()?;
    emit_idtr(a, &mut idtr, 256)?;
    d.finish_with_idt(handler, &own, 256)
}
