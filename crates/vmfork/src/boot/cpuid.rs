//! The CPUID a vCPU sees: what KVM supports, with this vCPU's APIC ID and topology filled in.

use kvm_bindings::CpuId;

const HYPERVISOR_BIT: u32 = 1 << 31;

/// KVM's supported CPUID adjusted for vCPU `index` of `count`.
pub(crate) fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                entry.ecx |= HYPERVISOR_BIT;
            }
            // Extended topology: EDX is the x2APIC ID.
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}
