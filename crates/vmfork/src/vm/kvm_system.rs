//! The process-wide handle to /dev/kvm and what it tells once: supported CPUID and MSRs.

use crate::error::{Error, KvmContext, Result};
use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;
use std::sync::{Mutex, OnceLock};

/// /dev/kvm, opened once per process, with facts about it cached.
pub struct KvmSystem {
    pub(crate) kvm: Kvm,
    pub(crate) supported_cpuid: CpuId,
    msr_candidates: Vec<u32>,
    saved_msrs: OnceLock<Vec<u32>>,
    /// KVM copies registers to `kvm_run` at each exit on request (`KVM_CAP_SYNC_REGS`).
    pub(crate) sync_regs: bool,
}

static SYSTEM: OnceLock<KvmSystem> = OnceLock::new();
static OPENING: Mutex<()> = Mutex::new(());

impl KvmSystem {
    /// Opens /dev/kvm (once; later calls return the same handle).
    pub fn get() -> Result<&'static KvmSystem> {
        if let Some(s) = SYSTEM.get() {
            return Ok(s);
        }
        let _guard = OPENING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = SYSTEM.get() {
            return Ok(s);
        }
        let kvm = Kvm::new().map_err(|e| Error::KvmUnavailable(e.into()))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .kvm("KVM_GET_SUPPORTED_CPUID")?;
        let msr_candidates = kvm
            .get_msr_index_list()
            .kvm("KVM_GET_MSR_INDEX_LIST")?
            .as_slice()
            .to_vec();
        Ok(SYSTEM.get_or_init(|| KvmSystem {
            supported_cpuid,
            sync_regs: kvm.check_extension(kvm_ioctls::Cap::SyncRegs),
            kvm,
            msr_candidates,
            saved_msrs: OnceLock::new(),
        }))
    }

    /// The MSRs vmfork saves and restores, probed on the first vCPU this process creates.
    pub(crate) fn saved_msrs(&self, vcpu: &kvm_ioctls::VcpuFd) -> &[u32] {
        self.saved_msrs
            .get_or_init(|| crate::state::probe_msrs(vcpu, &self.msr_candidates))
    }

    /// Most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }
}
