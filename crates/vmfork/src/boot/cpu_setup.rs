//! Registers, page tables and GDT for the first instruction of the guest.

use super::layout::*;
use super::EntryPoint;
use crate::error::{KvmContext, Result};
use crate::memory::GuestRam;
use crate::x86::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Page-table flags: present, writable, accessed (and dirty + 2 MiB for leaves), pre-set so the
/// CPU never writes the tables (each write would copy the page in every fork).
const TABLE: u64 = 0x1 | 0x2 | 0x20;
const LEAF_2M: u64 = TABLE | 0x40 | 0x80;

/// Which flavour of boot GDT entry 1 holds.
#[derive(Clone, Copy)]
enum CodeSegment {
    Flat32,
    Long64,
}

fn gdt(code: CodeSegment) -> [u64; 4] {
    let code_flags: u64 = match code {
        CodeSegment::Flat32 => 0xc09b,
        CodeSegment::Long64 => 0xa09b,
    };
    [
        0,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The hidden part of a segment register, decoded from a GDT entry.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry >> 32) & 0xf_0000) | (entry & 0xffff);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 {
            ((raw_limit << 12) | 0xfff) as u32
        } else {
            raw_limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        ..Default::default()
    }
}

/// Puts the boot vCPU at `entry`, writing the boot GDT (and page tables for long mode).
pub fn setup_boot_vcpu(vcpu: &VcpuFd, ram: &GuestRam, entry: EntryPoint) -> Result<()> {
    let mut sregs = vcpu.get_sregs().kvm("KVM_GET_SREGS")?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    let code = match entry {
        EntryPoint::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            CodeSegment::Flat32
        }
        EntryPoint::LongMode { entry, zero_page } => {
            regs.rip = entry;
            regs.rsi = zero_page;
            write_identity_page_tables(ram)?;
            sregs.cr3 = PML4;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            CodeSegment::Long64
        }
    };
    load_gdt(&mut sregs, ram, code)?;
    vcpu.set_sregs(&sregs).kvm("KVM_SET_SREGS")?;
    vcpu.set_regs(&regs).kvm("KVM_SET_REGS")?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).kvm("KVM_SET_FPU")?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|_| crate::Error::Invalid("MSR list".into()))?;
    vcpu.set_msrs(&msrs).kvm("KVM_SET_MSRS")?;
    Ok(())
}

fn load_gdt(sregs: &mut kvm_sregs, ram: &GuestRam, code: CodeSegment) -> Result<()> {
    let table = gdt(code);
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(BOOT_GDT, &bytes)?;
    ram.write_u64(BOOT_IDT, 0)?;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (bytes.len() - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = segment(table[1], 1);
    let data = segment(table[2], 2);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(table[3], 3);
    Ok(())
}

fn write_identity_page_tables(ram: &GuestRam) -> Result<()> {
    ram.write_u64(PML4, PDPT | TABLE)?;
    ram.write_u64(PDPT, PD | TABLE)?;
    let entries: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | LEAF_2M).to_le_bytes())
        .collect();
    ram.write(PD, &entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(gdt(CodeSegment::Long64)[1], 1);
        assert_eq!((code.l, code.db, code.type_, code.present), (1, 0, 0xb, 1));
        assert_eq!(code.limit, 0xffff_ffff);
        let tss = segment(gdt(CodeSegment::Flat32)[3], 3);
        assert_eq!((tss.type_, tss.limit, tss.s), (0xb, 0x67, 0));
    }
}
