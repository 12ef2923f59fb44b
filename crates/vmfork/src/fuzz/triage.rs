//! Crash triage: what kind of crash an exit is, a signature that tells crashes apart (kind,
//! faulting RIP, the return address on the stack), and the crash store on disk.

use crate::fuzz::coverage::INT3;
use crate::{ExitReason, Vm};
use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use std::fmt;
use std::path::{Path, PathBuf};

/// What an input did to the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this code to the exit port.
    Exit(u8),
    /// The input ran past its time limit; the target was stopped.
    Timeout { rip: u64 },
    /// The input crashed the target.
    Crash(Crash),
}

/// A crash, with what tells it apart from other crashes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Crash {
    /// `triple-fault/#DE`, `crash-site`, `crash-code/66`, `int3`, ...
    pub kind: String,
    /// Where it happened (guest-virtual).
    pub rip: u64,
    /// The word on top of the stack at the crash (a return address, when the crash is in a
    /// called function): two crashes at one RIP reached from different callers differ.
    pub stack_top: u64,
}

impl Crash {
    /// A file-name-safe signature.
    pub fn signature(&self) -> String {
        let kind: String = self
            .kind
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("{kind}-{:x}-{:x}", self.rip, self.stack_top)
    }
}

impl fmt::Display for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at rip {:#x} (stack top {:#x})",
            self.kind, self.rip, self.stack_top
        )
    }
}

/// Classifies a faulting exit of `target` (still stopped where it faulted).
pub fn classify(target: &Vm, exit: &ExitReason) -> Crash {
    let (kind, rip, rsp) = match exit {
        ExitReason::TripleFault(d) => {
            let vector = guess_vector(target, d.regs.rip, d.sregs.cr2);
            (format!("triple-fault/{vector}"), d.regs.rip, d.regs.rsp)
        }
        // An `int3` of the guest's own (not a coverage block or crash site), handed to the
        // VMM because breakpoint exits are on.
        ExitReason::Breakpoint { rip, .. } => {
            let rsp = target.registers(0).map(|r| r.regs.rsp).unwrap_or(0);
            ("int3".to_string(), *rip, rsp)
        }
        other => match other.dump() {
            Some(d) => (short_kind(other), d.regs.rip, d.regs.rsp),
            None => (short_kind(other), 0, 0),
        },
    };
    let mut top = [0u8; 8];
    let stack_top = if rsp != 0 && target.read_virtual(0, rsp, &mut top).is_ok() {
        u64::from_le_bytes(top)
    } else {
        0
    };
    Crash {
        kind,
        rip,
        stack_top,
    }
}

fn short_kind(exit: &ExitReason) -> String {
    match exit {
        ExitReason::Halted(_) => "halted".into(),
        ExitReason::UnmappedWrite { .. } => "unmapped-write".into(),
        ExitReason::InternalError { .. } => "kvm-internal-error".into(),
        ExitReason::Reset => "reset".into(),
        ExitReason::PowerOff => "power-off".into(),
        _ => "fault".into(),
    }
}

/// A triple fault loses its exception vector; the instruction at RIP tells it in most cases.
fn guess_vector(target: &Vm, rip: u64, cr2: u64) -> &'static str {
    let mut code = [0u8; 16];
    if target.read_virtual(0, rip, &mut code).is_err() {
        return "#PF-fetch";
    }
    let insn = Decoder::with_ip(64, &code, rip, DecoderOptions::NONE).decode();
    if insn.is_invalid() {
        return "#UD";
    }
    match insn.mnemonic() {
        Mnemonic::Div | Mnemonic::Idiv => "#DE",
        Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 => "#UD",
        Mnemonic::Int3 => "#BP",
        _ if code[0] == INT3 => "#BP",
        _ if cr2 != 0 => "#PF",
        _ => "#GP",
    }
}

/// Unique crashes (and timeouts) written to a directory: `SIGNATURE.input` (the input bytes)
/// and `SIGNATURE.txt` (what happened, and the command that reproduces it).
pub struct CrashStore {
    dir: Option<PathBuf>,
    replay: String,
}

impl CrashStore {
    /// `replay` is the command that reproduces a crash, with `{}` where the input file goes.
    pub fn new(dir: Option<&Path>, replay: &str) -> crate::Result<Self> {
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                crate::Error::Invalid(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        Ok(Self {
            dir: dir.map(Path::to_path_buf),
            replay: replay.to_string(),
        })
    }

    /// Saves a new unique crash; returns the input file's path.
    pub fn save(&self, name: &str, input: &[u8], what: &str) -> crate::Result<Option<PathBuf>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let path = dir.join(format!("{name}.input"));
        let io = |e: std::io::Error| crate::Error::Invalid(format!("cannot save a crash: {e}"));
        std::fs::write(&path, input).map_err(io)?;
        let replay = self.replay.replace("{}", &path.display().to_string());
        let text = format!(
            "{what}\ninput: {} bytes\nreproduce: {replay}\n",
            input.len()
        );
        std::fs::write(dir.join(format!("{name}.txt")), text).map_err(io)?;
        Ok(Some(path))
    }
}
