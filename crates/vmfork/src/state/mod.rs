//! The saved state of every stateful part of a VM. Fork, snapshot and migration all move VM
//! state through these types: a fork saves and loads them in memory, a snapshot through a file.

mod vcpu;

pub(crate) use vcpu::probe_msrs;
pub use vcpu::{CpuRegisters, VcpuState};

use crate::devices::DeviceState;
use crate::memory::MemoryLayout;
use serde::{Deserialize, Serialize};

/// In-kernel interrupt controllers and timer of a VM (PIC master, PIC slave, IOAPIC, PIT).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_bindings::kvm_irqchip,
    pub pic_slave: kvm_bindings::kvm_irqchip,
    pub ioapic: kvm_bindings::kvm_irqchip,
    pub pit: kvm_bindings::kvm_pit_state2,
}

/// The whole VM but its RAM contents.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub vcpus: Vec<VcpuState>,
    pub irqchip: Option<IrqchipState>,
    pub clock: Option<kvm_bindings::kvm_clock_data>,
    pub devices: DeviceState,
    pub memory: MemoryLayout,
}
