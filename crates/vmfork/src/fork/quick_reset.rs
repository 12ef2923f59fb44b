//! The fuzzing reset: restore only what a guest confined to CPL3 can have changed.
//!
//! A fork whose origin state leaves ring 0 unreachable from the guest (one vCPU at CPL3, no
//! interrupts, no in-kernel irqchip, an IDT too short to hold any gate, `syscall` and
//! `sysenter` disabled, no LDT) cannot change its MSRs, control, debug or extended control
//! registers, or its mode: every way into ring 0 ends in a triple fault instead. Its reset
//! needs the pages it dirtied, the general registers, the FPU/SSE state, and segment/event
//! state only where they differ from the origin; the copy of those KVM leaves in `kvm_run` at
//! every exit (`KVM_CAP_SYNC_REGS`) says whether they do, without an ioctl. The one way left to
//! ring 0 is a call gate the guest writes into its own GDT: a run that dirtied the GDT's page
//! gets the full reset. Device state is reloaded only when a device was accessed (other
//! than vmfork's exit and ready ports). Time (TSC, kvmclock) is not rewound by this reset.

use super::ResetStats;
use crate::error::{Error, KvmContext, Result};
use crate::introspect::{walk, PagingMode};
use crate::memory::PAGE_SIZE;
use crate::state::VmState;
use crate::vm::{ForkOrigin, KvmSystem, Vm};
use crate::x86::CR4_PSE;
use kvm_ioctls::SyncReg;
use std::sync::atomic::Ordering;

/// `syscall` enable bit of EFER.
const EFER_SCE: u64 = 1;
/// IA32_SYSENTER_CS: zero makes `sysenter` raise #GP.
const MSR_SYSENTER_CS: u32 = 0x174;
/// The smallest IDT limit that holds a complete 64-bit gate (vector 0).
const IDT_LIMIT_ONE_GATE: u16 = 15;

/// Whether a guest started from `state` cannot reach ring 0 without a triple fault (but for
/// a call gate in its GDT, checked at each reset).
pub(crate) fn ring0_unreachable(state: &VmState, interrupts_blocked: bool) -> bool {
    let [vcpu] = state.vcpus.as_slice() else {
        return false;
    };
    let s = &vcpu.sregs;
    interrupts_blocked
        && state.irqchip.is_none()
        && vcpu.lapic.is_none()
        && s.cs.dpl == 3
        && s.idt.limit < IDT_LIMIT_ONE_GATE
        && s.efer & EFER_SCE == 0
        && vcpu.msr(MSR_SYSENTER_CS) == Some(0)
        && (s.ldt.selector == 0 || s.ldt.unusable != 0)
        && (s.gdt.base % PAGE_SIZE) + u64::from(s.gdt.limit) < PAGE_SIZE
}

impl Vm {
    /// Puts a fork back to its fork instant, restoring only what the guest can have changed
    /// when its origin confines it to CPL3 (see the module notes); otherwise, or when the run
    /// wrote its GDT's page, it is [`Vm::reset`]. For fuzzing loops: after a run that ended in
    /// a triple fault or a KVM error, use [`Vm::reset`].
    pub fn reset_quick(&self) -> Result<ResetStats> {
        let _op = self.exclusive();
        let origin = self.origin()?;
        if !origin.ring0_unreachable {
            return self.reset();
        }
        self.require_stopped()?;
        if self.exit_reason().is_some() {
            // Runnable again (a run on vCPU threads left its exit recorded).
            self.rearm();
        }
        let gdt_page = self.origin_gdt_page(origin)?;
        let (mut stats, wrote_gdt) = self.restore_dirty_pages(origin, Some(gdt_page))?;
        if wrote_gdt {
            return self.reset_with(crate::ResetScope::StateOnly).map(|_| stats);
        }
        let shared = self.shared();
        let slot = &shared.vcpus[0];
        let mut vcpu = slot.fd.lock().unwrap_or_else(|p| p.into_inner());
        let saved = &origin.state.vcpus[0];
        if slot.exit_synced.swap(false, Ordering::AcqRel) {
            // KVM copied these out at the last exit, and nothing set them since.
            let now = vcpu.sync_regs();
            if now.regs != saved.regs {
                vcpu.set_regs(&saved.regs).kvm("KVM_SET_REGS")?;
            }
            if now.sregs != saved.sregs {
                vcpu.set_sregs(&saved.sregs).kvm("KVM_SET_SREGS")?;
            }
            if now.events != saved.events {
                vcpu.set_vcpu_events(&saved.events)
                    .kvm("KVM_SET_VCPU_EVENTS")?;
            }
        } else {
            vcpu.set_regs(&saved.regs).kvm("KVM_SET_REGS")?;
            vcpu.set_sregs(&saved.sregs).kvm("KVM_SET_SREGS")?;
            vcpu.set_vcpu_events(&saved.events)
                .kvm("KVM_SET_VCPU_EVENTS")?;
            if KvmSystem::get()?.sync_regs {
                vcpu.set_sync_valid_reg(SyncReg::Register);
                vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
                vcpu.set_sync_valid_reg(SyncReg::VcpuEvents);
            }
        }
        saved.restore_xsave(&vcpu)?;
        // Devices the run touched (a disk written, the serial's registers) go back too.
        if shared.devices.touched() {
            let _quiet = shared.devices.quiesce();
            shared.devices.load_state(&origin.state.devices)?;
        }
        stats.quick = true;
        Ok(stats)
    }

    /// The RAM file offset of the page holding the origin's GDT (found once, by walking the
    /// origin's page tables in the reset memory).
    fn origin_gdt_page(&self, origin: &ForkOrigin) -> Result<u64> {
        if let Some(&page) = origin.gdt_page.get() {
            return Ok(page);
        }
        let s = &origin.state.vcpus[0].sregs;
        let mode = PagingMode::from_registers(s.cr0, s.cr4, s.efer);
        let layout = self.ram().layout();
        let phys = walk(mode, s.cr4 & CR4_PSE != 0, s.cr3, s.gdt.base, |addr| {
            let offset = layout
                .file_offset(addr)
                .ok_or_else(|| Error::Memory(format!("page table at {addr:#x} is not in RAM")))?;
            let mut page = vec![0u8; PAGE_SIZE as usize];
            origin
                .image
                .read_range(offset - offset % PAGE_SIZE, &mut page)?;
            let at = (offset % PAGE_SIZE) as usize;
            let word: [u8; 8] = page[at..at + 8]
                .try_into()
                .map_err(|_| Error::Memory("unaligned page table entry".into()))?;
            Ok(u64::from_le_bytes(word))
        })?;
        let offset = self
            .ram()
            .layout()
            .file_offset(phys)
            .ok_or_else(|| Error::Memory(format!("the GDT at {phys:#x} is not in RAM")))?;
        let page = offset - offset % PAGE_SIZE;
        let _ = origin.gdt_page.set(page);
        Ok(page)
    }
}
