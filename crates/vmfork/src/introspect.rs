//! Introspection of a stopped VM: guest virtual memory through the guest's own page tables.
//!
//! What VMI tools and fuzzers need beyond physical memory and registers (which [`Vm::ram`] and
//! [`Vm::registers`] give): translate a guest virtual address the way vCPU `n` would, and read or
//! write through that translation. The walk reads page tables only; it never sets Accessed or
//! Dirty bits, so looking does not change the guest.

use crate::error::{Error, Result};
use crate::memory::PAGE_SIZE;
use crate::vm::Vm;
use crate::x86::{CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA};

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical address bits 12..51 of a 64-bit (long mode or PAE) entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The paging mode of a vCPU, from its control registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// Paging off: virtual = physical.
    None,
    /// 32-bit two-level paging (4 KiB and, with PSE, 4 MiB pages).
    Legacy32,
    /// PAE three-level paging.
    Pae,
    /// Long mode, four levels.
    Long4,
    /// Long mode, five levels (LA57).
    Long5,
}

impl PagingMode {
    pub fn from_registers(cr0: u64, cr4: u64, efer: u64) -> Self {
        if cr0 & CR0_PG == 0 {
            PagingMode::None
        } else if efer & EFER_LMA != 0 {
            if cr4 & CR4_LA57 != 0 {
                PagingMode::Long5
            } else {
                PagingMode::Long4
            }
        } else if cr4 & CR4_PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::Legacy32
        }
    }
}

impl Vm {
    /// The guest physical address vCPU `vcpu` reaches at virtual address `vaddr`; the VM must not
    /// be running.
    pub fn translate(&self, vcpu: usize, vaddr: u64) -> Result<u64> {
        let _op = self.exclusive();
        let sregs = self.registers(vcpu)?.sregs;
        let mode = PagingMode::from_registers(sregs.cr0, sregs.cr4, sregs.efer);
        let pse = sregs.cr4 & CR4_PSE != 0;
        walk(mode, pse, sregs.cr3, vaddr, |addr| {
            self.ram().read_u64(addr)
        })
    }

    /// Reads guest virtual memory as vCPU `vcpu` sees it; the VM must not be running.
    pub fn read_virtual(&self, vcpu: usize, vaddr: u64, buf: &mut [u8]) -> Result<()> {
        let _op = self.exclusive();
        for_each_page(vaddr, buf.len(), |va, at, len| {
            let pa = self.translate(vcpu, va)?;
            self.ram().read(pa, &mut buf[at..at + len])
        })
    }

    /// Writes guest virtual memory as vCPU `vcpu` sees it (a fork copies the pages on write
    /// and its reset puts them back); the VM must not be running.
    pub fn write_virtual(&self, vcpu: usize, vaddr: u64, data: &[u8]) -> Result<()> {
        let _op = self.exclusive();
        for_each_page(vaddr, data.len(), |va, at, len| {
            let pa = self.translate(vcpu, va)?;
            self.ram().write(pa, &data[at..at + len])
        })
    }
}

/// Calls `f(virtual address, offset in buffer, length)` for each page-bounded piece of
/// `[vaddr, vaddr+len)`.
fn for_each_page(
    vaddr: u64,
    len: usize,
    mut f: impl FnMut(u64, usize, usize) -> Result<()>,
) -> Result<()> {
    if vaddr.checked_add(len as u64).is_none() {
        return Err(Error::Memory(format!(
            "virtual range {vaddr:#x}+{len:#x} wraps around"
        )));
    }
    let mut done = 0usize;
    while done < len {
        let va = vaddr + done as u64;
        let in_page = (PAGE_SIZE - va % PAGE_SIZE) as usize;
        let n = in_page.min(len - done);
        f(va, done, n)?;
        done += n;
    }
    Ok(())
}

/// Walks the page tables rooted at `cr3`; `read` fetches a 64-bit word of guest physical memory.
pub fn walk(
    mode: PagingMode,
    pse: bool,
    cr3: u64,
    vaddr: u64,
    read: impl Fn(u64) -> Result<u64>,
) -> Result<u64> {
    let unmapped = |level: &str| {
        Error::Memory(format!(
            "virtual address {vaddr:#x} is not mapped ({level} entry not present)"
        ))
    };
    match mode {
        PagingMode::None => Ok(vaddr),
        PagingMode::Legacy32 => {
            if vaddr > u64::from(u32::MAX) {
                return Err(Error::Memory(format!(
                    "virtual address {vaddr:#x} is beyond 4 GiB in 32-bit paging"
                )));
            }
            let read32 = |addr: u64| read(addr).map(|v| v & 0xffff_ffff);
            let pde = read32((cr3 & 0xffff_f000) + ((vaddr >> 22) & 0x3ff) * 4)?;
            if pde & PRESENT == 0 {
                return Err(unmapped("page directory"));
            }
            if pse && pde & PAGE_SIZE_BIT != 0 {
                // 4 MiB page: bits 31..22 of the address, plus PSE-36 bits 20..13 as 39..32.
                let high = ((pde >> 13) & 0xff) << 32;
                return Ok(high | (pde & 0xffc0_0000) | (vaddr & 0x3f_ffff));
            }
            let pte = read32((pde & 0xffff_f000) + ((vaddr >> 12) & 0x3ff) * 4)?;
            if pte & PRESENT == 0 {
                return Err(unmapped("page table"));
            }
            Ok((pte & 0xffff_f000) | (vaddr & 0xfff))
        }
        PagingMode::Pae => {
            if vaddr > u64::from(u32::MAX) {
                return Err(Error::Memory(format!(
                    "virtual address {vaddr:#x} is beyond 4 GiB in PAE paging"
                )));
            }
            let pdpte = read((cr3 & 0xffff_ffe0) + ((vaddr >> 30) & 0x3) * 8)?;
            if pdpte & PRESENT == 0 {
                return Err(unmapped("page-directory-pointer"));
            }
            walk_levels(pdpte & ADDR_MASK, vaddr, &[21, 12], &read, &unmapped)
        }
        PagingMode::Long4 | PagingMode::Long5 => {
            let bits = if mode == PagingMode::Long5 { 57 } else { 48 };
            let top = (vaddr as i64) >> (bits - 1);
            if top != 0 && top != -1 {
                return Err(Error::Memory(format!(
                    "virtual address {vaddr:#x} is not canonical for {bits}-bit addresses"
                )));
            }
            let shifts: &[u32] = if mode == PagingMode::Long5 {
                &[48, 39, 30, 21, 12]
            } else {
                &[39, 30, 21, 12]
            };
            walk_levels(cr3 & ADDR_MASK, vaddr, shifts, &read, &unmapped)
        }
    }
}

/// The 64-bit-entry levels: at each `shift`, index 9 bits; large pages end the walk at 1 GiB
/// (shift 30) and 2 MiB (shift 21).
fn walk_levels(
    mut table: u64,
    vaddr: u64,
    shifts: &[u32],
    read: &impl Fn(u64) -> Result<u64>,
    unmapped: &impl Fn(&str) -> Error,
) -> Result<u64> {
    for &shift in shifts {
        let entry = read(table + ((vaddr >> shift) & 0x1ff) * 8)?;
        if entry & PRESENT == 0 {
            return Err(unmapped(level_name(shift)));
        }
        let large = (shift == 30 || shift == 21) && entry & PAGE_SIZE_BIT != 0;
        if large || shift == 12 {
            let page_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDR_MASK & !page_mask) | (vaddr & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    Err(unmapped("last-level"))
}

fn level_name(shift: u32) -> &'static str {
    match shift {
        48 => "PML5",
        39 => "PML4",
        30 => "page-directory-pointer",
        21 => "page directory",
        _ => "page table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn memory(entries: &[(u64, u64)]) -> impl Fn(u64) -> Result<u64> {
        let map: HashMap<u64, u64> = entries.iter().copied().collect();
        move |addr| Ok(map.get(&addr).copied().unwrap_or(0))
    }

    #[test]
    fn long_mode_walk_with_4k_2m_and_1g_pages() {
        // PML4 at 0x1000 -> PDPT at 0x2000: entry 0 -> PD at 0x3000, entry 1 = 1 GiB page.
        // PD entry 0 -> PT at 0x4000 (4 KiB), entry 1 = 2 MiB page at 0x40_0000.
        let mem = memory(&[
            (0x1000, 0x2000 | 3),
            (0x2000, 0x3000 | 3),
            (0x2008, 0x8000_0000 | 0x83),
            (0x3000, 0x4000 | 3),
            (0x3008, 0x40_0000 | 0x83),
            (0x4000 + 5 * 8, 0x9000 | 3),
        ]);
        let w = |va| walk(PagingMode::Long4, false, 0x1000, va, &mem);
        assert_eq!(w(0x5123).unwrap(), 0x9123);
        assert_eq!(w(0x20_1234).unwrap(), 0x40_1234);
        assert_eq!(w(0x4000_0042).unwrap(), 0x8000_0042);
        assert!(w(0x6000).is_err(), "not present");
        assert!(w(0x0000_8000_0000_0000).is_err(), "not canonical");
    }

    #[test]
    fn legacy_and_pae_walks() {
        let mem = memory(&[(0x1000, 0x2000 | 1), (0x2000 + 3 * 4, 0x7000 | 1)]);
        let pa = walk(PagingMode::Legacy32, false, 0x1000, 0x3456, &mem).unwrap();
        assert_eq!(pa, 0x7456);
        let mem = memory(&[(0x1000, 0x2000 | 1), (0x2000, 0x20_0000 | 0x81)]);
        let pa = walk(PagingMode::Pae, false, 0x1000, 0x1_2345, &mem).unwrap();
        assert_eq!(pa, 0x21_2345);
        assert_eq!(
            walk(PagingMode::None, false, 0, 0xabc, &mem).unwrap(),
            0xabc
        );
    }
}
