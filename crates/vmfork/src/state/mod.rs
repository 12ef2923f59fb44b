//! The saved state of every stateful part of a VM. Fork, snapshot and migration all move VM
//! state through these types: a fork saves and loads them in memory, a snapshot through a file.

pub(crate) mod clock;
pub(crate) mod vcpu;

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

/// The interrupt mask bit of an IOAPIC redirection entry and of a local APIC LVT register.
const MASKED: u32 = 1 << 16;
/// Local APIC LVT registers (timer, thermal, perf counters, LINT0, LINT1, error), by offset.
const LAPIC_LVT_OFFSETS: [usize; 6] = [0x320, 0x330, 0x340, 0x350, 0x360, 0x370];
/// Local APIC interrupt request registers (8 × 32 vectors, 16 bytes apart): interrupts
/// accepted but not yet delivered.
const LAPIC_IRR: usize = 0x200;

impl IrqchipState {
    /// Masks every interrupt line: all PIC inputs and all IOAPIC redirection entries (so neither
    /// the PIT nor a device can raise an interrupt).
    pub fn mask_all(&mut self) {
        for chip in [&mut self.pic_master, &mut self.pic_slave] {
            chip.chip.pic.imr = 0xff;
            // Requests already latched would still be delivered once.
            chip.chip.pic.irr = 0;
        }
        // SAFETY: as above, for the IOAPIC chip id: `ioapic` is the active field, plain data.
        let ioapic = unsafe { &mut self.ioapic.chip.ioapic };
        for entry in ioapic.redirtbl.iter_mut() {
            // SAFETY: `bits` spans the whole 64-bit entry; any value is valid.
            unsafe { entry.bits |= u64::from(MASKED) };
        }
    }

    /// Whether every PIC input and IOAPIC redirection entry is masked.
    pub fn all_lines_masked(&self) -> bool {
        // SAFETY: KVM filled these unions for PIC and IOAPIC chip ids (KVM_GET_IRQCHIP), so
        // `pic` and `ioapic` are the active fields; both are plain integers.
        let (master, slave, ioapic) = unsafe {
            (
                self.pic_master.chip.pic,
                self.pic_slave.chip.pic,
                self.ioapic.chip.ioapic,
            )
        };
        master.imr == 0xff
            && slave.imr == 0xff
            // SAFETY: `bits` spans the whole 64-bit entry; any value is valid.
            && ioapic.redirtbl.iter().all(|e| unsafe { e.bits } & u64::from(MASKED) != 0)
    }
}

impl VcpuState {
    fn lvt(lapic: &kvm_bindings::kvm_lapic_state, offset: usize) -> u32 {
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
            *b = *r as u8;
        }
        u32::from_le_bytes(bytes)
    }

    /// Whether every local vector table entry of this vCPU's local APIC is masked (true when
    /// it has none).
    pub fn local_interrupts_masked(&self) -> bool {
        self.lapic.as_ref().is_none_or(|lapic| {
            LAPIC_LVT_OFFSETS
                .iter()
                .all(|&o| Self::lvt(lapic, o) & MASKED != 0)
        })
    }

    /// Masks every local vector table entry of this vCPU's local APIC (its timer included).
    pub fn mask_local_interrupts(&mut self) {
        // An interrupt being injected at the instant, or pending in the local APIC, would still
        // reach the guest once: drop them too.
        self.events.interrupt.injected = 0;
        self.events.interrupt.nr = 0;
        let Some(lapic) = &mut self.lapic else { return };
        for i in 0..8 {
            let at = LAPIC_IRR + i * 0x10;
            lapic.regs[at..at + 4].fill(0);
        }
        for offset in LAPIC_LVT_OFFSETS {
            let value = Self::lvt(lapic, offset) | MASKED;
            for (r, b) in lapic.regs[offset..offset + 4]
                .iter_mut()
                .zip(value.to_le_bytes())
            {
                *r = b as _;
            }
        }
    }
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

impl VmState {
    /// This state with no interrupt deliverable: PIC, IOAPIC and every local APIC LVT masked.
    /// What a `block_interrupts` fork starts from (and returns to at each reset).
    pub fn with_interrupts_masked(&self) -> Self {
        let mut state = self.clone();
        if let Some(chip) = &mut state.irqchip {
            chip.mask_all();
        }
        for vcpu in &mut state.vcpus {
            vcpu.mask_local_interrupts();
        }
        state
    }
}
