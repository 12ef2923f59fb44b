//! The CPUID a vCPU sees: what KVM supports, with this vCPU's APIC ID and topology filled in,
//! less the features the VM's configuration hides.

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};

/// CPU features a VM can be made not to see (CPUID bits cleared).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuFeature {
    /// XSAVE and everything that needs it (AVX, AVX2, AVX-512, the XSAVE leaf): the guest
    /// saves its FPU with FXSAVE/FXRSTOR. What a kernel needs on hosts whose KVM cannot emulate
    /// XRSTOR at ring 0.
    Xsave,
    /// AVX-512 (every subset).
    Avx512,
    /// RDRAND.
    Rdrand,
    /// RDSEED.
    Rdseed,
    /// Transactional memory (HLE, RTM).
    Tsx,
}

impl CpuFeature {
    pub const ALL: [CpuFeature; 5] = [
        CpuFeature::Xsave,
        CpuFeature::Avx512,
        CpuFeature::Rdrand,
        CpuFeature::Rdseed,
        CpuFeature::Tsx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CpuFeature::Xsave => "xsave",
            CpuFeature::Avx512 => "avx512",
            CpuFeature::Rdrand => "rdrand",
            CpuFeature::Rdseed => "rdseed",
            CpuFeature::Tsx => "tsx",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// One bit per feature, for telling CPUID shapes apart.
    pub fn mask(features: &[CpuFeature]) -> u32 {
        features.iter().fold(0, |m, &f| m | 1 << f as u32)
    }

    /// (leaf, register, bits) this feature clears: register 0 EAX, 1 EBX, 2 ECX, 3 EDX.
    fn clears(self) -> &'static [(u32, u8, u32)] {
        const AVX512_EBX: u32 = (1 << 16)
            | (1 << 17)
            | (1 << 21)
            | (1 << 26)
            | (1 << 27)
            | (1 << 28)
            | (1 << 30)
            | (1 << 31);
        const AVX512_ECX: u32 = (1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);
        const AVX512_EDX: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23);
        match self {
            // XSAVE, OSXSAVE, AVX, F16C, FMA; AVX2 and AVX-512 in leaf 7.
            CpuFeature::Xsave => &[
                (
                    1,
                    2,
                    (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 12),
                ),
                (7, 1, (1 << 5) | AVX512_EBX),
                (7, 2, AVX512_ECX),
                (7, 3, AVX512_EDX),
            ],
            CpuFeature::Avx512 => &[(7, 1, AVX512_EBX), (7, 2, AVX512_ECX), (7, 3, AVX512_EDX)],
            CpuFeature::Rdrand => &[(1, 2, 1 << 30)],
            CpuFeature::Rdseed => &[(7, 1, 1 << 18)],
            CpuFeature::Tsx => &[(7, 1, (1 << 4) | (1 << 11))],
        }
    }
}

const HYPERVISOR_BIT: u32 = 1 << 31;

/// The features a vCPU's saved CPUID hides from what `supported` offers (a snapshot of a VM
/// made with hidden features restores into shells with the same CPUID).
pub(crate) fn hidden_in(
    saved: &[kvm_bindings::kvm_cpuid_entry2],
    supported: &CpuId,
) -> Vec<CpuFeature> {
    let bits = |entries: &[kvm_bindings::kvm_cpuid_entry2],
                (leaf, register, mask): (u32, u8, u32)| {
        entries
            .iter()
            .find(|e| e.function == leaf && (leaf != 7 || e.index == 0))
            .map_or(0, |e| {
                mask & match register {
                    0 => e.eax,
                    1 => e.ebx,
                    2 => e.ecx,
                    _ => e.edx,
                }
            })
    };
    CpuFeature::ALL
        .into_iter()
        .filter(|f| {
            let defining = f.clears()[0];
            bits(supported.as_slice(), defining) != 0 && bits(saved, defining) == 0
        })
        .collect()
}

/// KVM's supported CPUID adjusted for vCPU `index` of `count`, without the `hidden` features.
pub(crate) fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8, hidden: &[CpuFeature]) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        for feature in hidden {
            for &(leaf, register, bits) in feature.clears() {
                if entry.function == leaf && (leaf != 7 || entry.index == 0) {
                    match register {
                        0 => entry.eax &= !bits,
                        1 => entry.ebx &= !bits,
                        2 => entry.ecx &= !bits,
                        _ => entry.edx &= !bits,
                    }
                }
            }
            // Without XSAVE there is no XSAVE state leaf.
            if *feature == CpuFeature::Xsave && entry.function == 0xd {
                (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_features_are_cleared_and_found_again() {
        let supported = crate::vm::KvmSystem::get().unwrap().supported_cpuid.clone();
        let hidden = CpuFeature::ALL;
        let cpuid = vcpu_cpuid(&supported, 0, 1, &hidden);
        let leaf = |c: &[kvm_bindings::kvm_cpuid_entry2], f: u32| {
            *c.iter().find(|e| e.function == f && e.index == 0).unwrap()
        };
        let (leaf1, leaf7) = (leaf(cpuid.as_slice(), 1), leaf(cpuid.as_slice(), 7));
        assert_eq!(
            leaf1.ecx & (1 << 26 | 1 << 28 | 1 << 30),
            0,
            "{:#x}",
            leaf1.ecx
        );
        assert_eq!(
            leaf7.ebx & (1 << 5 | 1 << 16 | 1 << 18 | 1 << 4 | 1 << 11),
            0
        );
        // Nothing else changed (but the topology and hypervisor bits every vCPU gets).
        let plain = vcpu_cpuid(&supported, 0, 1, &[]);
        let plain1 = leaf(plain.as_slice(), 1);
        assert_eq!(
            leaf1.ecx,
            plain1.ecx & !(1 << 26 | 1 << 27 | 1 << 28 | 1 << 29 | 1 << 12 | 1 << 30)
        );
        assert_eq!(leaf1.edx, plain1.edx);
        // A saved CPUID says which features it hides (those the host offers at all).
        let offered: Vec<_> = CpuFeature::ALL
            .into_iter()
            .filter(|f| {
                let (l, r, m) = f.clears()[0];
                let e = leaf(supported.as_slice(), l);
                m & [e.eax, e.ebx, e.ecx, e.edx][r as usize] != 0
            })
            .collect();
        assert_eq!(hidden_in(cpuid.as_slice(), &supported), offered);
        assert!(hidden_in(plain.as_slice(), &supported).is_empty());
        assert_eq!(CpuFeature::from_name("xsave"), Some(CpuFeature::Xsave));
        assert_eq!(CpuFeature::from_name("nope"), None);
    }
}
