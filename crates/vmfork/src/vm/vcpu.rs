//! Running one vCPU: KVM_RUN and the handling of its exits.

use super::control::RunControl;
use super::exit::{ExitReason, VcpuDump};
use crate::devices::{Devices, PioOutcome};
use crate::memory::GuestRam;
use kvm_ioctls::{VcpuExit, VcpuFd};

/// What stopped a stretch of KVM_RUN calls.
#[derive(Debug)]
pub enum RunEvent {
    /// The controller asked the vCPU to stop running (pause, stop, or a kick).
    Interrupted,
    /// The VM must stop for this reason.
    Exit(Box<ExitReason>),
}

impl RunEvent {
    fn exit(reason: ExitReason) -> Self {
        RunEvent::Exit(Box::new(reason))
    }
}

/// KVM's `KVM_SYSTEM_EVENT_*` types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
/// KVM_INTERNAL_ERROR_EMULATION: the instruction emulator refused an instruction.
const SUBERROR_EMULATION: u32 = 1;
/// The #BP exception vector, reported in KVM's debug exit for an `int3`.
const BP_VECTOR: u32 = 3;

/// What else ends a stretch of KVM_RUN calls (inline runs).
#[derive(Clone, Copy, Debug, Default)]
pub struct RunLimits {
    /// A kick after this instant ends the run.
    pub deadline: Option<std::time::Instant>,
    /// A write to the ready port ends the run.
    pub stop_at_ready: bool,
}

/// Runs `vcpu` until the controller interrupts it, the guest does something that stops the VM,
/// or one of `limits` is reached.
pub fn run_vcpu(
    index: usize,
    vcpu: &mut VcpuFd,
    devices: &Devices,
    ram: &GuestRam,
    control: &RunControl,
    assist: Option<&std::sync::atomic::AtomicU64>,
    limits: RunLimits,
) -> RunEvent {
    loop {
        if !control.should_run() {
            return RunEvent::Interrupted;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if limits
                    .deadline
                    .is_some_and(|d| std::time::Instant::now() >= d)
                {
                    return RunEvent::Interrupted;
                }
                continue;
            }
            Err(e) => {
                return RunEvent::exit(ExitReason::InternalError {
                    detail: format!("KVM_RUN failed: {e}"),
                    dump: dump(index, vcpu),
                })
            }
        };
        match exit {
            VcpuExit::IoOut(port, data) => match devices.pio_write(port, data) {
                PioOutcome::Continue => {}
                PioOutcome::Exit(code) => return RunEvent::exit(ExitReason::GuestExit(code)),
                PioOutcome::Reset => return RunEvent::exit(ExitReason::Reset),
                PioOutcome::Ready if limits.stop_at_ready => {
                    return RunEvent::exit(ExitReason::Ready)
                }
                PioOutcome::Ready => {}
            },
            VcpuExit::IoIn(port, data) => devices.pio_read(port, data),
            // Unmapped reads see all ones, as on a PC bus.
            VcpuExit::MmioRead(addr, data) => {
                if !devices.mmio_read(addr, data) {
                    data.fill(0xff)
                }
            }
            VcpuExit::MmioWrite(addr, data) if devices.mmio_write(addr, data, ram) => {}
            // A write where no device is stops the VM: a guest bug worth seeing.
            VcpuExit::MmioWrite(addr, data) => {
                let len = data.len();
                let Some(dump) = dump(index, vcpu) else {
                    return RunEvent::exit(unreadable(index));
                };
                return RunEvent::exit(ExitReason::UnmappedWrite { addr, len, dump });
            }
            VcpuExit::Shutdown => {
                return RunEvent::exit(match dump(index, vcpu) {
                    Some(d) => ExitReason::TripleFault(d),
                    None => unreadable(index),
                })
            }
            VcpuExit::Hlt => {
                return RunEvent::exit(match dump(index, vcpu) {
                    Some(d) => ExitReason::Halted(d),
                    None => unreadable(index),
                })
            }
            VcpuExit::SystemEvent(kind, _) => {
                return RunEvent::exit(match kind {
                    SYSTEM_EVENT_RESET => ExitReason::Reset,
                    SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    other => ExitReason::InternalError {
                        detail: format!("unexpected KVM system event {other}"),
                        dump: dump(index, vcpu),
                    },
                })
            }
            VcpuExit::Intr => continue,
            // Only software breakpoints are enabled (see `Vm::set_breakpoint_exits`).
            VcpuExit::Debug(arch) if arch.exception == BP_VECTOR => {
                return RunEvent::exit(ExitReason::Breakpoint {
                    vcpu: index,
                    rip: arch.pc,
                })
            }
            VcpuExit::InternalError => {
                let suberror = internal_suberror(vcpu);
                let mut why = String::new();
                if let (Some(count), SUBERROR_EMULATION) = (assist, suberror) {
                    match super::emulation_assist::complete(vcpu, ram) {
                        Ok(()) => {
                            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                        Err(e) => why = format!("; {e}"),
                    }
                }
                return RunEvent::exit(ExitReason::InternalError {
                    detail: format!(
                        "KVM internal error, suberror {suberror} ({}){why}",
                        describe_suberror(suberror)
                    ),
                    dump: dump(index, vcpu),
                });
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return RunEvent::exit(ExitReason::InternalError {
                    detail: format!(
                        "VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                    ),
                    dump: dump(index, vcpu),
                })
            }
            other => {
                let detail = format!("unhandled KVM exit {other:?}");
                return RunEvent::exit(ExitReason::InternalError {
                    detail,
                    dump: dump(index, vcpu),
                });
            }
        }
    }
}

fn unreadable(index: usize) -> ExitReason {
    ExitReason::InternalError {
        detail: format!("vCPU {index} stopped and its registers could not be read"),
        dump: None,
    }
}

fn internal_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: KVM filled the `internal` member of the exit union for KVM_EXIT_INTERNAL_ERROR.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

fn describe_suberror(code: u32) -> &'static str {
    match code {
        1 => "emulation failure: KVM's instruction emulator refused an instruction",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

/// Reads the registers of a stopped vCPU for a report.
pub fn dump(index: usize, vcpu: &VcpuFd) -> Option<VcpuDump> {
    Some(VcpuDump {
        vcpu: index,
        regs: vcpu.get_regs().ok()?,
        sregs: vcpu.get_sregs().ok()?,
    })
}
