//! The guest-physical memory layout every built-in guest shares. The host side (tests, CLI,
//! benchmarks) uses these constants to talk to a guest through its mailbox page.

/// Where the ELF image is loaded (the boot stub lives at the start).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// 64-bit entry point (long mode, Linux-style): the ELF's `e_entry`, and the entry of the flat
/// binary (which is the same image).
pub const ENTRY64: u64 = LOAD_ADDR;
/// 32-bit PVH entry point (protected mode, paging off): the ELF's Xen PVH note.
pub const PVH_ENTRY: u64 = LOAD_ADDR + 0x100;
/// The CPL3 workload starts here.
pub const USER_CODE: u64 = LOAD_ADDR + 0x1000;
/// GDT and its pseudo-descriptor.
pub const GDT: u64 = LOAD_ADDR + 0x3000;
/// Four-level page tables: PML4, PDPT, then four page directories (identity map of 0..4 GiB).
pub const PML4: u64 = LOAD_ADDR + 0x4000;
/// Bytes of guest physical address space the guest page tables map.
pub const IDENTITY_MAPPED: u64 = 4 << 30;

/// The host/guest mailbox: parameters in, results out. Zero means "use the default".
pub const MAILBOX: u64 = 0x20_0000;
/// Harness input bytes (up to [`INPUT_MAX`]); its length is at [`mailbox::INPUT_LEN`].
pub const INPUT: u64 = 0x20_1000;
/// Largest harness input.
pub const INPUT_MAX: u64 = 0x1000;
/// Top of the stack (ring 0 boot and CPL3 share it; it grows down).
pub const STACK_TOP: u64 = 0x30_0000;
/// First page `memtouch` writes.
pub const MEMTOUCH_BASE: u64 = 0x40_0000;
/// The test drivers' virtqueue: descriptor table, available ring and used ring in one page.
pub const VIRTQ_DESC: u64 = 0x38_0000;
pub const VIRTQ_AVAIL: u64 = VIRTQ_DESC + 0x100;
pub const VIRTQ_USED: u64 = VIRTQ_DESC + 0x200;
/// Entries in the test drivers' virtqueue.
pub const VIRTQ_SIZE: u32 = 8;
/// Buffers the test drivers hand to devices (up to [`DMA_MAX`] bytes from here).
pub const DMA_BUFFER: u64 = 0x39_0000;
pub const DMA_MAX: u64 = 0x7_0000;
/// Smallest guest RAM the built-in guests need (stack, mailbox, code and a few memtouch pages).
pub const MIN_RAM: u64 = 8 << 20;

/// Serial port (8250 THR) the guests print on.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Exit port: a byte written here ends the run with that exit code (QEMU: `isa-debug-exit`).
pub const EXIT_PORT: u16 = 0x501;
/// Ready port: fuzzing targets write here just before they read their input (vmfork forks the
/// fuzzing targets there; elsewhere the write is ignored).
pub const READY_PORT: u16 = 0x503;

/// The generation id page (vmfork's VMGenID) and the first virtio-mmio slot.
pub const VMGENID_MMIO: u64 = 0xd000_0000;
pub const VIRTIO_MMIO: u64 = 0xd000_1000;
/// Bytes between virtio-mmio slots.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;

/// Offsets of the mailbox fields (each a little-endian u64).
pub mod mailbox {
    /// First parameter: `memtouch` and `dirty` page count, `counter` delay loop iterations.
    pub const PARAM0: u64 = 0x08;
    /// Second parameter: `memtouch` pattern seed, `dirty` delay loop iterations per page.
    pub const PARAM1: u64 = 0x10;
    /// Third parameter: `counter` stop value (0 = count forever).
    pub const PARAM2: u64 = 0x18;
    /// Written by the guest: `counter`'s current value, `memtouch`'s pages written, `dirty`'s
    /// last complete generation.
    pub const PROGRESS: u64 = 0x20;
    /// Harness input length in bytes.
    pub const INPUT_LEN: u64 = 0x28;
    /// `entropy`: the generation id read first (16 bytes) and after the ready port (16 bytes).
    pub const GENERATION_BEFORE: u64 = 0x30;
    pub const GENERATION_AFTER: u64 = 0x40;
    /// `entropy`: bytes the device wrote in the first and second request.
    pub const USED_LEN_BEFORE: u64 = 0x50;
    pub const USED_LEN_AFTER: u64 = 0x58;
    /// `disk`: the disk's capacity in sectors, and the last request's status.
    pub const DISK_CAPACITY: u64 = 0x60;
    pub const DISK_STATUS: u64 = 0x68;
    /// `vsock`: the op of the reply to the counter sent after the ready port, and the
    /// transport-reset events received.
    pub const VSOCK_LAST_OP: u64 = 0x70;
    pub const VSOCK_RESETS: u64 = 0x78;
    /// `net`: its MAC before and after the ready port (six bytes each), the payload of the
    /// frame it received and that frame's source MAC.
    pub const NET_MAC: u64 = 0x80;
    pub const NET_MAC_AFTER: u64 = 0x88;
    pub const NET_RECEIVED: u64 = 0x90;
    pub const NET_FROM: u64 = 0x98;
    /// `assist`: the two compare-exchanges' ZF, the 16 bytes the second found, the address
    /// after its int3 and the return address its #BP handler was given.
    pub const ASSIST_FIRST: u64 = 0xa0;
    pub const ASSIST_SECOND: u64 = 0xa8;
    pub const ASSIST_FOUND: u64 = 0xb0;
    pub const ASSIST_AFTER: u64 = 0xc0;
    pub const ASSIST_BP_RIP: u64 = 0xc8;
    pub const ASSIST_FLAGS: u64 = 0xd0;
    /// `assist`: popcnt and tzcnt of ASSIST_BITS_INPUT, popcnt of its value's low half. (No
    /// lzcnt: this development host's KVM emulates it, wrongly, as bsr.)
    pub const ASSIST_POPCNT: u64 = 0xd8;
    pub const ASSIST_TZCNT: u64 = 0xe0;
    pub const ASSIST_POPCNT_MEMORY: u64 = 0xf0;
    /// `assist`: MXCSR as stored first (low half) and after loading ASSIST_MXCSR_LOADED (the
    /// value loaded in the high half of ASSIST_MXCSR).
    pub const ASSIST_MXCSR: u64 = 0xf8;
    pub const ASSIST_MXCSR_AFTER: u64 = 0x200;
    /// `clock`: the TSC it read (at CPL3) just before its last write to the ready port.
    pub const CLOCK_TSC: u64 = 0x208;
    /// `interrupts`: the two bytes the i8042 keyboard answered its reset with, each read after
    /// its interrupt.
    pub const KEYBOARD_ANSWER: u64 = 0x210;
}
