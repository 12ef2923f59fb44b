//! The emulation assist: on hosts whose KVM emulates guest ring 0 (nested, paravirtual KVM),
//! its instruction emulator refuses a few instructions a kernel uses (`lock cmpxchg16b`,
//! `int3`, `clac`/`stac`, `popcnt`, `fwait`, `ldmxcsr`, the XSAVE family: `xsave.rs`) and the
//! vCPU stops with an emulation failure. With the assist on, the
//! VMM decodes the instruction at the guest's RIP (iced-x86) and completes it itself: the
//! 16-byte compare-exchange as one atomic host instruction on guest memory, `int3` as the #BP
//! it raises, `clac`/`stac` on RFLAGS.AC. Off by default: on bare-metal KVM these instructions never reach the VMM.

use crate::introspect::{walk, PagingMode};
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::x86::CR4_PSE;
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

mod xsave;

/// IA32_XSS: the supervisor components XSAVES/XRSTORS handle.
const MSR_IA32_XSS: u32 = 0xda0;

/// The #BP and #MF vectors.
const BP_VECTOR: u8 = 3;
const MF_VECTOR: u8 = 16;
/// The SSE bit of an XSAVE header's XSTATE_BV.
const XSTATE_SSE: u32 = 1 << 1;
/// The x87 status word's exception summary bit.
const FSW_ES: u16 = 1 << 7;
/// RFLAGS.ZF and RFLAGS.AC.
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_AC: u64 = 1 << 18;
const RFLAGS_CF: u64 = 1;
/// CF, PF, AF, ZF, SF, OF.
const RFLAGS_ARITHMETIC: u64 = 0x8d5;

/// Tries to complete the instruction the vCPU stopped at; `Err` says why it could not (the
/// emulation failure then stands).
pub fn complete(vcpu: &VcpuFd, ram: &GuestRam) -> Result<(), String> {
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let instruction = decode_at_rip(&regs, &sregs, ram)?;
    let next = regs.rip.wrapping_add(instruction.len() as u64);
    match instruction.mnemonic() {
        Mnemonic::Cmpxchg16b if instruction.op0_kind() == OpKind::Memory => {
            let linear = effective_address(&instruction, &regs, &sregs)?;
            let physical = translate(&sregs, ram, linear)?;
            let expected = u128::from(regs.rax) | u128::from(regs.rdx) << 64;
            let new = u128::from(regs.rbx) | u128::from(regs.rcx) << 64;
            let found = ram
                .compare_exchange_u128(physical, expected, new)
                .map_err(|e| e.to_string())?;
            if found == expected {
                regs.rflags |= RFLAGS_ZF;
            } else {
                regs.rflags &= !RFLAGS_ZF;
                regs.rax = found as u64;
                regs.rdx = (found >> 64) as u64;
            }
            regs.rip = next;
            write_back(vcpu, &regs)
        }
        Mnemonic::Int3 => {
            // A trap: the handler sees the address after the int3.
            regs.rip = next;
            write_back(vcpu, &regs)?;
            inject(vcpu, BP_VECTOR)
        }
        // fwait: raises #MF for a pending unmasked x87 exception, else does nothing.
        Mnemonic::Wait => {
            // The x87 status word: bytes 2-3 of the XSAVE area (where KVM keeps it current).
            let xsave = vcpu
                .get_xsave()
                .map_err(|e| format!("KVM_GET_XSAVE: {e}"))?;
            let fsw = (xsave.region[0] >> 16) as u16;
            regs.rip = next;
            write_back(vcpu, &regs)?;
            if fsw & FSW_ES != 0 {
                inject(vcpu, MF_VECTOR)?;
            }
            Ok(())
        }
        // The SSE control register, to and from memory.
        Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => {
            let linear = effective_address(&instruction, &regs, &sregs)?;
            let physical = translate(&sregs, ram, linear)?;
            // MXCSR as KVM keeps it: word 6 (byte 24) of the XSAVE area's legacy region.
            let mut xsave = vcpu
                .get_xsave()
                .map_err(|e| format!("KVM_GET_XSAVE: {e}"))?;
            if instruction.mnemonic() == Mnemonic::Ldmxcsr {
                let mut word = [0u8; 4];
                ram.read(physical, &mut word).map_err(|e| e.to_string())?;
                xsave.region[6] = u32::from_le_bytes(word);
                // XSTATE_BV (byte 512) must say the SSE state is there, or MXCSR is not taken.
                xsave.region[128] |= XSTATE_SSE;
                crate::state::vcpu::set_xsave(vcpu, &xsave).map_err(|e| e.to_string())?;
            } else {
                ram.write(physical, &xsave.region[6].to_le_bytes())
                    .map_err(|e| e.to_string())?;
            }
            regs.rip = next;
            write_back(vcpu, &regs)
        }
        // SMAP's access switch around a kernel's user copies.
        Mnemonic::Clac | Mnemonic::Stac => {
            if instruction.mnemonic() == Mnemonic::Clac {
                regs.rflags &= !RFLAGS_AC;
            } else {
                regs.rflags |= RFLAGS_AC;
            }
            regs.rip = next;
            write_back(vcpu, &regs)
        }
        // Bit counts (a kernel patches them in where the CPU has them).
        Mnemonic::Popcnt | Mnemonic::Lzcnt | Mnemonic::Tzcnt => {
            let bits = instruction.op0_register().size() as u32 * 8;
            let source = read_source(&instruction, &regs, &sregs, ram, bits)?;
            let (result, carry) = match instruction.mnemonic() {
                Mnemonic::Popcnt => (u64::from(source.count_ones()), false),
                Mnemonic::Lzcnt => {
                    let n = u64::from(source.leading_zeros()) - u64::from(64 - bits);
                    (n, source == 0)
                }
                _ => (
                    u64::from(source.trailing_zeros()).min(u64::from(bits)),
                    source == 0,
                ),
            };
            write_register(&mut regs, instruction.op0_register(), result)?;
            // popcnt: ZF for a zero source, the others clear; lzcnt/tzcnt: CF for a zero source,
            // ZF for a zero result.
            regs.rflags &= !RFLAGS_ARITHMETIC;
            let zf = match instruction.mnemonic() {
                Mnemonic::Popcnt => source == 0,
                _ => result == 0,
            };
            if zf {
                regs.rflags |= RFLAGS_ZF;
            }
            if carry {
                regs.rflags |= RFLAGS_CF;
            }
            regs.rip = next;
            write_back(vcpu, &regs)
        }
        Mnemonic::Xrstor
        | Mnemonic::Xrstor64
        | Mnemonic::Xrstors
        | Mnemonic::Xrstors64
        | Mnemonic::Xsave
        | Mnemonic::Xsave64
        | Mnemonic::Xsaveopt
        | Mnemonic::Xsaveopt64
        | Mnemonic::Xsavec
        | Mnemonic::Xsavec64
        | Mnemonic::Xsaves
        | Mnemonic::Xsaves64 => {
            xsave_family(vcpu, ram, &instruction, &regs, &sregs)?;
            regs.rip = next;
            write_back(vcpu, &regs)
        }
        other => Err(format!(
            "the assist does not complete {other:?} (at {:#x})",
            regs.rip
        )),
    }
}

/// XRSTOR(S) and XSAVE(OPT/C/S) between guest memory and the vCPU's XSAVE state (see
/// `xsave.rs`).
fn xsave_family(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    instruction: &Instruction,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<(), String> {
    use Mnemonic::*;
    let mnemonic = instruction.mnemonic();
    let supervisor = matches!(mnemonic, Xrstors | Xrstors64 | Xsaves | Xsaves64);
    if supervisor {
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_XSS,
            ..Default::default()
        }])
        .map_err(|e| format!("{e:?}"))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
        if n == 1 && msrs.as_slice()[0].data != 0 {
            return Err(format!(
                "{mnemonic:?} with supervisor state enabled (IA32_XSS {:#x}) is not completed",
                msrs.as_slice()[0].data
            ));
        }
    }
    let xcr0 = vcpu
        .get_xcrs()
        .map_err(|e| format!("KVM_GET_XCRS: {e}"))?
        .xcrs
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value);
    let rfbm = xcr0 & ((regs.rdx << 32) | (regs.rax & 0xffff_ffff));
    let linear = effective_address(instruction, regs, sregs)?;
    if linear % 64 != 0 {
        return Err(format!(
            "{mnemonic:?} of an area at {linear:#x}, not 64-byte aligned (#GP)"
        ));
    }
    let mut kvm_state = vcpu
        .get_xsave()
        .map_err(|e| format!("KVM_GET_XSAVE: {e}"))?;
    let mut kvm: Vec<u8> = kvm_state
        .region
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let restoring = matches!(mnemonic, Xrstor | Xrstor64 | Xrstors | Xrstors64);
    let compact = matches!(mnemonic, Xsavec | Xsavec64 | Xsaves | Xsaves64);
    // The area's header first (a restore's XCOMP_BV says how long the area is).
    let mut header = [0u8; 64];
    read_linear(sregs, ram, linear + 512, &mut header)?;
    let xcomp_bv = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let len = if restoring {
        let compacted = xcomp_bv & xsave::COMPACTED != 0;
        xsave::area_len(
            if compacted { xcomp_bv } else { rfbm },
            compacted,
            &xsave::host_component,
        )
    } else {
        xsave::area_len(rfbm, compact, &xsave::host_component)
    };
    let mut area = vec![0u8; len];
    read_linear(sregs, ram, linear, &mut area)?;
    if restoring {
        xsave::restore(&area, rfbm, &mut kvm, &xsave::host_component)?;
        for (word, bytes) in kvm_state.region.iter_mut().zip(kvm.chunks_exact(4)) {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        crate::state::vcpu::set_xsave(vcpu, &kvm_state).map_err(|e| e.to_string())
    } else {
        xsave::save(&kvm, rfbm, compact, &mut area, &xsave::host_component)?;
        write_linear(sregs, ram, linear, &area)
    }
}

/// Reads `buf.len()` bytes at guest-linear `linear`, page by page through the page tables.
fn read_linear(
    sregs: &kvm_sregs,
    ram: &GuestRam,
    linear: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        let at = linear + done as u64;
        let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(buf.len() - done);
        ram.read(translate(sregs, ram, at)?, &mut buf[done..done + n])
            .map_err(|e| e.to_string())?;
        done += n;
    }
    Ok(())
}

/// Writes `data` at guest-linear `linear`, page by page (every page translated first, so a
/// fault leaves memory unwritten).
fn write_linear(sregs: &kvm_sregs, ram: &GuestRam, linear: u64, data: &[u8]) -> Result<(), String> {
    let mut pieces = Vec::new();
    let mut done = 0;
    while done < data.len() {
        let at = linear + done as u64;
        let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(data.len() - done);
        pieces.push((translate(sregs, ram, at)?, done..done + n));
        done += n;
    }
    for (physical, range) in pieces {
        ram.write(physical, &data[range])
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Puts the completed instruction's registers back.
fn write_back(vcpu: &VcpuFd, regs: &kvm_regs) -> Result<(), String> {
    vcpu.set_regs(regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))
}

/// Delivers exception `vector` (no error code) before the next instruction.
fn inject(vcpu: &VcpuFd, vector: u8) -> Result<(), String> {
    let mut events = vcpu
        .get_vcpu_events()
        .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_vcpu_events(&events)
        .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))
}

fn translate(sregs: &kvm_sregs, ram: &GuestRam, linear: u64) -> Result<u64, String> {
    let mode = PagingMode::from_registers(sregs.cr0, sregs.cr4, sregs.efer);
    walk(mode, sregs.cr4 & CR4_PSE != 0, sregs.cr3, linear, |a| {
        ram.read_u64(a)
    })
    .map_err(|e| e.to_string())
}

/// The instruction at CS:RIP, read through the guest's page tables.
fn decode_at_rip(
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    ram: &GuestRam,
) -> Result<Instruction, String> {
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    let mut bytes = [0u8; 15];
    // The instruction may end on the next page; read what the first page holds, then the rest
    // if that page is mapped.
    let first = ((PAGE_SIZE - linear % PAGE_SIZE) as usize).min(bytes.len());
    ram.read(translate(sregs, ram, linear)?, &mut bytes[..first])
        .map_err(|e| e.to_string())?;
    let mut len = first;
    if first < bytes.len() {
        if let Ok(next) = translate(sregs, ram, linear + first as u64) {
            if ram.read(next, &mut bytes[first..]).is_ok() {
                len = bytes.len();
            }
        }
    }
    let bitness = if sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    };
    let mut decoder = Decoder::with_ip(bitness, &bytes[..len], regs.rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        return Err(format!("no valid instruction at {:#x}", regs.rip));
    }
    Ok(instruction)
}

/// The 64-bit general register `full` in `regs`.
fn slot(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// The value of register `r` (its full 64 bits; none reads as 0), for an address or operand.
fn register(regs: &kvm_regs, r: Register) -> Result<u64, String> {
    if r == Register::None {
        return Ok(0);
    }
    let mut copy = *regs;
    slot(&mut copy, r.full_register())
        .map(|v| *v)
        .ok_or_else(|| format!("an address built on {r:?}"))
}

/// The instruction's second operand (a register or memory) as a `bits`-wide value.
fn read_source(
    i: &Instruction,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    ram: &GuestRam,
    bits: u32,
) -> Result<u64, String> {
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let value = match i.op1_kind() {
        OpKind::Register => register(regs, i.op1_register())?,
        OpKind::Memory => {
            let linear = effective_address(i, regs, sregs)?;
            let mut bytes = [0u8; 8];
            let len = (bits / 8) as usize;
            // (An operand crossing a page is read page by page.)
            for (k, byte) in bytes[..len].iter_mut().enumerate() {
                let at = translate(sregs, ram, linear.wrapping_add(k as u64))?;
                let mut b = [0u8; 1];
                ram.read(at, &mut b).map_err(|e| e.to_string())?;
                *byte = b[0];
            }
            u64::from_le_bytes(bytes)
        }
        other => return Err(format!("an operand of kind {other:?}")),
    };
    Ok(value & mask)
}

/// Writes a general register as the instruction would: a 32-bit write clears the upper half,
/// a 16-bit one keeps it.
fn write_register(regs: &mut kvm_regs, r: Register, value: u64) -> Result<(), String> {
    let Some(slot) = slot(regs, r.full_register()) else {
        return Err(format!("a write to {r:?}"));
    };
    *slot = match r.size() {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*slot & !0xffff) | (value & 0xffff),
        _ => return Err(format!("a write to {r:?}")),
    };
    Ok(())
}

/// The linear address of the instruction's memory operand.
fn effective_address(i: &Instruction, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<u64, String> {
    let segment = match i.memory_segment() {
        Register::FS => sregs.fs.base,
        Register::GS => sregs.gs.base,
        _ => 0,
    };
    // RIP-relative operands come decoded as absolute (iced adds the next RIP).
    let base = if i.memory_base() == Register::RIP {
        0
    } else {
        register(regs, i.memory_base())?
    };
    let index = register(regs, i.memory_index())?.wrapping_mul(u64::from(i.memory_index_scale()));
    Ok(segment
        .wrapping_add(base)
        .wrapping_add(index)
        .wrapping_add(i.memory_displacement64()))
}
