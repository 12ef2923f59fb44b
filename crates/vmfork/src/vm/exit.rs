//! Why a VM stopped, with enough of the vCPU's state to debug a guest that went wrong.

use kvm_bindings::{kvm_regs, kvm_sregs};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Registers of the vCPU that stopped the VM, for reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuDump {
    pub vcpu: usize,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

impl fmt::Display for VcpuDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        let s = &self.sregs;
        writeln!(f, "vCPU {}:", self.vcpu)?;
        writeln!(
            f,
            "  rip={:#018x} rsp={:#018x} rflags={:#x} cpl={}",
            r.rip,
            r.rsp,
            r.rflags,
            s.cs.selector & 3
        )?;
        writeln!(
            f,
            "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
            r.rax, r.rbx, r.rcx, r.rdx
        )?;
        writeln!(
            f,
            "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}",
            r.rsi, r.rdi, r.rbp, r.r8
        )?;
        writeln!(
            f,
            "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        )?;
        write!(
            f,
            "  cs={:#x} ss={:#x} gdt={:#x}/{:#x} idt={:#x}/{:#x}",
            s.cs.selector, s.ss.selector, s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
        )
    }
}

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The guest wrote this code to the exit port.
    GuestExit(u8),
    /// The guest reset the machine (i8042 reset line, or a KVM system reset event).
    Reset,
    /// The guest powered off (KVM system shutdown event).
    PowerOff,
    /// The guest triple-faulted.
    TripleFault(VcpuDump),
    /// The guest halted with no way to wake up (no in-kernel irqchip).
    Halted(VcpuDump),
    /// The guest wrote to a guest-physical address with no RAM and no device.
    UnmappedWrite {
        addr: u64,
        len: usize,
        dump: VcpuDump,
    },
    /// KVM could not run or emulate the guest (e.g. an instruction its emulator refuses).
    InternalError {
        detail: String,
        dump: Option<VcpuDump>,
    },
    /// The guest wrote to the ready port during a run that stops there
    /// ([`Vm::run_to_ready`](crate::Vm::run_to_ready)); it can run on from there.
    Ready,
    /// The guest executed an `int3` while breakpoint exits were on; `rip` is its address.
    Breakpoint { vcpu: usize, rip: u64 },
    /// The host stopped the VM (stop request, Ctrl-C, timeout).
    Stopped,
}

/// `vmfork run`'s exit status for a guest fault (not the guest's own exit code).
pub const GUEST_FAULT_STATUS: i32 = 125;
/// Exit status when the host stopped the VM.
pub const STOPPED_STATUS: i32 = 130;

impl ExitReason {
    /// A process exit status: the guest's code, 0 for a reset or power-off,
    /// [`GUEST_FAULT_STATUS`] for a guest fault, [`STOPPED_STATUS`] when stopped by the host.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::GuestExit(code) => i32::from(*code),
            ExitReason::Reset | ExitReason::PowerOff => 0,
            ExitReason::Stopped | ExitReason::Ready => STOPPED_STATUS,
            _ => GUEST_FAULT_STATUS,
        }
    }

    /// Whether the guest stopped because something went wrong in it.
    pub fn is_fault(&self) -> bool {
        self.status() == GUEST_FAULT_STATUS
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        match self {
            ExitReason::GuestExit(code) => format!("guest exited with code {code}"),
            ExitReason::Reset => "guest reset the machine".into(),
            ExitReason::PowerOff => "guest powered off".into(),
            ExitReason::TripleFault(d) => {
                format!("guest triple-faulted (vCPU {} at rip {:#x})", d.vcpu, d.regs.rip)
            }
            ExitReason::Halted(d) => format!(
                "guest halted with interrupts off (vCPU {} at rip {:#x})",
                d.vcpu, d.regs.rip
            ),
            ExitReason::UnmappedWrite { addr, len, dump } => format!(
                "guest wrote {len} bytes to unmapped guest-physical address {addr:#x} (vCPU {} at rip {:#x})",
                dump.vcpu, dump.regs.rip
            ),
            ExitReason::InternalError { detail, .. } => format!("KVM could not run the guest: {detail}"),
            ExitReason::Breakpoint { vcpu, rip } => {
                format!("guest hit a breakpoint (vCPU {vcpu} at rip {rip:#x})")
            }
            ExitReason::Stopped => "stopped by the host".into(),
            ExitReason::Ready => "guest is ready for input (ready port)".into(),
        }
    }

    /// The register dump, where the exit has one.
    pub fn dump(&self) -> Option<&VcpuDump> {
        match self {
            ExitReason::TripleFault(d) | ExitReason::Halted(d) => Some(d),
            ExitReason::UnmappedWrite { dump, .. } => Some(dump),
            ExitReason::InternalError { dump, .. } => dump.as_ref(),
            _ => None,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.summary())?;
        if let Some(d) = self.dump() {
            write!(f, "\n{d}")?;
        }
        Ok(())
    }
}
