//! Saving and loading one vCPU's architectural state.

use crate::error::{KvmContext, Result};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// The register file a debugger or fuzzer edits: general-purpose plus segment/control registers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuRegisters {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

/// Everything KVM keeps for one vCPU. The x87/SSE/AVX state is in `xsave` (a superset of
/// KVM_GET_FPU's), so the FPU is saved once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The 4 KiB legacy XSAVE area (x87, SSE, AVX) as KVM_GET_XSAVE returns it.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: Option<kvm_lapic_state>,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running. `msr_indices` are the MSRs to save.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32], has_lapic: bool) -> Result<Self> {
        let cpuid = vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .kvm("KVM_GET_CPUID2")?
            .as_slice()
            .to_vec();
        let mp_state = vcpu.get_mp_state().kvm("KVM_GET_MP_STATE")?;
        let regs = vcpu.get_regs().kvm("KVM_GET_REGS")?;
        let sregs = vcpu.get_sregs().kvm("KVM_GET_SREGS")?;
        let xsave = vcpu.get_xsave().kvm("KVM_GET_XSAVE")?.region.to_vec();
        let xcrs = vcpu.get_xcrs().kvm("KVM_GET_XCRS")?;
        let debugregs = vcpu.get_debug_regs().kvm("KVM_GET_DEBUGREGS")?;
        let lapic = if has_lapic {
            Some(vcpu.get_lapic().kvm("KVM_GET_LAPIC")?)
        } else {
            None
        };
        let msrs = read_msrs(vcpu, msr_indices)?;
        let events = vcpu.get_vcpu_events().kvm("KVM_GET_VCPU_EVENTS")?;
        Ok(Self {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
        })
    }

    /// Loads this state into a vCPU that is not running. The order follows KVM's dependencies:
    /// CPUID before the registers it gates, the LAPIC before MSRs (TSC deadline), events last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        self.restore_cpuid(vcpu)?;
        self.restore_without_cpuid(vcpu)
    }

    /// [`Self::restore`] for a vCPU whose CPUID already matches (a pooled or reset vCPU).
    pub fn restore_without_cpuid(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_mp_state(self.mp_state).kvm("KVM_SET_MP_STATE")?;
        vcpu.set_sregs(&self.sregs).kvm("KVM_SET_SREGS")?;
        vcpu.set_regs(&self.regs).kvm("KVM_SET_REGS")?;
        self.restore_xsave(vcpu)?;
        vcpu.set_xcrs(&self.xcrs).kvm("KVM_SET_XCRS")?;
        vcpu.set_debug_regs(&self.debugregs)
            .kvm("KVM_SET_DEBUGREGS")?;
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic).kvm("KVM_SET_LAPIC")?;
        }
        write_msrs(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&self.events)
            .kvm("KVM_SET_VCPU_EVENTS")?;
        Ok(())
    }

    /// Restores the x87/SSE/AVX state alone.
    pub fn restore_xsave(&self, vcpu: &VcpuFd) -> Result<()> {
        let mut xsave = kvm_xsave::default();
        if self.xsave.len() != xsave.region.len() {
            return Err(crate::Error::Invalid(format!(
                "XSAVE area of {} words, expected {}",
                self.xsave.len(),
                xsave.region.len()
            )));
        }
        xsave.region.copy_from_slice(&self.xsave);
        set_xsave(vcpu, &xsave)
    }

    /// The value of MSR `index` in this state, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    fn restore_cpuid(&self, vcpu: &VcpuFd) -> Result<()> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| {
            crate::Error::Invalid(format!("{} CPUID entries is too many", self.cpuid.len()))
        })?;
        vcpu.set_cpuid2(&cpuid).kvm("KVM_SET_CPUID2")
    }

    /// The general-purpose and system registers alone.
    pub fn registers(&self) -> CpuRegisters {
        CpuRegisters {
            regs: self.regs,
            sregs: self.sregs,
        }
    }
}

/// KVM_SET_XSAVE with the legacy 4 KiB area.
pub(crate) fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<()> {
    // SAFETY: `kvm_xsave` is the legacy 4 KiB buffer; KVM copies at most that much because
    // vmfork never enables dynamic XSAVE features (KVM_CAP_XSAVE2 sizing).
    unsafe { vcpu.set_xsave(xsave) }.kvm("KVM_SET_XSAVE")
}

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut out = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let mut msrs = Msrs::from_entries(chunk)
            .map_err(|_| crate::Error::Invalid("too many MSRs in one KVM_GET_MSRS call".into()))?;
        let n = vcpu.get_msrs(&mut msrs).kvm("KVM_GET_MSRS")?;
        if n != chunk.len() {
            return Err(crate::Error::Invalid(format!(
                "KVM_GET_MSRS read {n} of {} MSRs (MSR {:#x} failed)",
                chunk.len(),
                chunk[n].index
            )));
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

/// The current value of MSR `index` of a vCPU that is not running.
pub(crate) fn read_msr(vcpu: &VcpuFd, index: u32) -> Result<u64> {
    Ok(read_msrs(vcpu, &[index])?[0].data)
}

fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let msrs = Msrs::from_entries(chunk)
            .map_err(|_| crate::Error::Invalid("too many MSRs in one KVM_SET_MSRS call".into()))?;
        let n = vcpu.set_msrs(&msrs).kvm("KVM_SET_MSRS")?;
        if n == chunk.len() {
            rest = &rest[n..];
            continue;
        }
        // KVM refuses some writes depending on vCPU state (e.g. paravirtual MSRs); restoring
        // the value the vCPU already holds is a no-op, so only a real difference is an error.
        let refused = chunk[n];
        let current = read_msrs(vcpu, &[refused.index]).ok();
        if current.as_deref().and_then(|c| c.first()).map(|c| c.data) != Some(refused.data) {
            return Err(crate::Error::Invalid(format!(
                "KVM_SET_MSRS refused MSR {:#x} = {:#x}",
                refused.index, refused.data
            )));
        }
        rest = &rest[n + 1..];
    }
    Ok(())
}

/// Of `candidates`, the MSRs this vCPU can both read and write back, found by probing (KVM lists
/// some MSRs it then refuses, depending on the host CPU and on CPUID).
pub(crate) fn probe_msrs(vcpu: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    candidates
        .iter()
        .copied()
        .filter(|&index| {
            let entry = [kvm_msr_entry {
                index,
                ..Default::default()
            }];
            let Ok(mut msrs) = Msrs::from_entries(&entry) else {
                return false;
            };
            matches!(vcpu.get_msrs(&mut msrs), Ok(1)) && matches!(vcpu.set_msrs(&msrs), Ok(1))
        })
        .collect()
}
