//! The guest runtime: enter long mode with as few ring-0 instructions as possible, then drop to
//! CPL3 with IOPL=3 so the workload can `out` to the serial and exit ports at native speed.
//!
//! Everything ring 0 would otherwise compute (page tables, GDT) is pre-built data in the image,
//! with Accessed/Dirty bits already set so the CPU never writes to them (a written page-table
//! page would be copied in every fork).

use crate::layout::*;
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Kernel code (64-bit), kernel data, user data (DPL3), user code (64-bit, DPL3), all accessed;
/// then the two halves of the 64-bit TSS descriptor.
const GDT_ENTRIES: [u64; 7] = [
    0,
    0x00AF_9B00_0000_FFFF,
    0x00CF_9300_0000_FFFF,
    0x00CF_F300_0000_FFFF,
    0x00AF_FB00_0000_FFFF,
    tss_descriptor_low(),
    0,
];
const TSS_SELECTOR: u16 = 0x28;
/// The TSS, right after the GDT pseudo-descriptor. Its I/O permission bitmap lets CPL3 use
/// ports below [`IO_BITMAP_PORTS`]. IOPL=3 alone would do on bare metal, but paravirtual KVM
/// (PVM) ignores IOPL for user mode and honours only the bitmap.
const TSS: u64 = GDT + 0x100;
const TSS_HEADER: usize = 104;
const IO_BITMAP_PORTS: usize = 0x1000;
/// The TSS limit: header, bitmap, and the all-ones byte that must end the bitmap.
const TSS_LIMIT: u64 = (TSS_HEADER + IO_BITMAP_PORTS / 8) as u64;

/// A present, available 64-bit TSS (type 9) at [`TSS`] (below 4 GiB, so the high half is 0).
const fn tss_descriptor_low() -> u64 {
    (TSS_LIMIT & 0xffff)
        | ((TSS & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((TSS_LIMIT >> 16) & 0xf) << 48)
        | (((TSS >> 24) & 0xff) << 56)
}
const KERNEL_CS: u16 = 0x08;
const USER_SS: i32 = 0x18 | 3;
const USER_CS: i32 = 0x20 | 3;
/// Where in the GDT page the 10-byte pseudo-descriptor for `lgdt` sits.
const GDTR: u64 = GDT + 0x40;
/// IOPL=3 and the always-one bit 1; interrupts stay off (the guests poll).
const USER_RFLAGS: i32 = 0x3002;

const PAGE_PRESENT: u64 = 1;
const PAGE_WRITABLE: u64 = 1 << 1;
const PAGE_USER: u64 = 1 << 2;
const PAGE_ACCESSED: u64 = 1 << 5;
const PAGE_DIRTY: u64 = 1 << 6;
const PAGE_HUGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PAGE_PRESENT | PAGE_WRITABLE | PAGE_USER | PAGE_ACCESSED;
const HUGE_PAGE_FLAGS: u64 = TABLE_FLAGS | PAGE_DIRTY | PAGE_HUGE;

/// Size of the whole image from [`LOAD_ADDR`]: boot code, user code, GDT and page tables.
pub const IMAGE_SIZE: usize = (PML4 - LOAD_ADDR) as usize + 6 * 0x1000;

/// Where the workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// CPL3 with the I/O bitmap open: native speed on hosts that emulate ring 0.
    User,
    /// CPL0 (for what only ring 0 may do: `hlt`, `sti`, `lidt`); emulated, and so slow, on such
    /// hosts, so only for small loops.
    Kernel,
}

/// Builds the full load image around the assembled workload `user_code`, entered in `ring`.
pub fn build_image(user_code: &[u8], ring: Ring) -> Result<Vec<u8>, IcedError> {
    let mut image = vec![0u8; IMAGE_SIZE];
    let mut put = |addr: u64, bytes: &[u8]| {
        let off = (addr - LOAD_ADDR) as usize;
        image[off..off + bytes.len()].copy_from_slice(bytes);
    };
    put(ENTRY64, &entry64(ring)?);
    put(PVH_ENTRY, &pvh_entry()?);
    assert!(
        user_code.len() <= (GDT - USER_CODE) as usize,
        "workload too large"
    );
    put(USER_CODE, user_code);

    let gdt: Vec<u8> = GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect();
    put(GDT, &gdt);
    let mut gdtr = ((GDT_ENTRIES.len() * 8 - 1) as u16).to_le_bytes().to_vec();
    gdtr.extend_from_slice(&GDT.to_le_bytes());
    put(GDTR, &gdtr);
    // TSS: all zero but the bitmap offset; the zero bitmap allows every port; 0xff ends it.
    put(TSS + 0x66, &(TSS_HEADER as u16).to_le_bytes());
    put(TSS + TSS_LIMIT, &[0xff]);

    let pdpt = PML4 + 0x1000;
    let pd_base = PML4 + 0x2000;
    put(PML4, &(pdpt | TABLE_FLAGS).to_le_bytes());
    let gib_count = IDENTITY_MAPPED >> 30;
    for gib in 0..gib_count {
        let pd = pd_base + gib * 0x1000;
        put(pdpt + gib * 8, &(pd | TABLE_FLAGS).to_le_bytes());
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((gib << 30) + (i << 21)) | HUGE_PAGE_FLAGS).to_le_bytes())
            .collect();
        put(pd, &entries);
    }
    Ok(image)
}

/// 32-bit PVH entry: paging off, flat segments. Turn on PAE + long mode + paging, jump to 64-bit.
fn pvh_entry() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    a.mov(eax, 0x620u32)?; // PAE | OSFXSR | OSXMMEXCPT
    a.mov(cr4, eax)?;
    a.mov(eax, PML4 as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xC000_0080u32)?; // EFER
    a.mov(eax, 0x100u32)?; // LME
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.mov(eax, 0x8001_0033u32)?; // PG | WP | NE | ET | MP | PE
    a.mov(cr0, eax)?;
    a.lgdt(ptr(GDTR))?;
    // jmp far KERNEL_CS:ENTRY64
    let mut far = vec![0xEA];
    far.extend_from_slice(&(ENTRY64 as u32).to_le_bytes());
    far.extend_from_slice(&KERNEL_CS.to_le_bytes());
    a.db(&far)?;
    a.assemble(PVH_ENTRY)
}

/// 64-bit entry (from the PVH stub, or straight from a Linux-style 64-bit boot): load our own GDT
/// and page tables (they have the User bit), then `iretq` to the workload at CPL3 (or jump to it
/// at CPL0).
fn entry64(ring: Ring) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(rsp, STACK_TOP)?;
    a.mov(rax, GDTR)?;
    a.lgdt(ptr(rax))?;
    a.mov(rax, PML4)?;
    a.mov(cr3, rax)?;
    a.mov(ax, TSS_SELECTOR as u32)?;
    a.ltr(ax)?;
    if ring == Ring::Kernel {
        a.mov(rax, USER_CODE)?;
        a.jmp(rax)?;
        let code = a.assemble(ENTRY64)?;
        assert!(code.len() <= (PVH_ENTRY - ENTRY64) as usize);
        return Ok(code);
    }
    a.push(USER_SS)?;
    a.push(STACK_TOP as i32)?;
    a.push(USER_RFLAGS)?;
    a.push(USER_CS)?;
    a.push(USER_CODE as i32)?;
    a.iretq()?;
    let code = a.assemble(ENTRY64)?;
    assert!(code.len() <= (PVH_ENTRY - ENTRY64) as usize);
    Ok(code)
}
