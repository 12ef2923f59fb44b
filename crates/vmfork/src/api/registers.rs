//! Registers as JSON: a flat map of names to numbers, read whole and patched by name.

use crate::state::CpuRegisters;
use serde_json::{json, Map, Value};

/// The general-purpose registers, by name.
fn general(regs: &mut kvm_bindings::kvm_regs) -> [(&'static str, &mut u64); 18] {
    [
        ("rax", &mut regs.rax),
        ("rbx", &mut regs.rbx),
        ("rcx", &mut regs.rcx),
        ("rdx", &mut regs.rdx),
        ("rsi", &mut regs.rsi),
        ("rdi", &mut regs.rdi),
        ("rsp", &mut regs.rsp),
        ("rbp", &mut regs.rbp),
        ("r8", &mut regs.r8),
        ("r9", &mut regs.r9),
        ("r10", &mut regs.r10),
        ("r11", &mut regs.r11),
        ("r12", &mut regs.r12),
        ("r13", &mut regs.r13),
        ("r14", &mut regs.r14),
        ("r15", &mut regs.r15),
        ("rip", &mut regs.rip),
        ("rflags", &mut regs.rflags),
    ]
}

/// System registers that may be written through the API (what debuggers and VMI tools set).
fn system(sregs: &mut kvm_bindings::kvm_sregs) -> [(&'static str, &mut u64); 6] {
    [
        ("cr0", &mut sregs.cr0),
        ("cr2", &mut sregs.cr2),
        ("cr3", &mut sregs.cr3),
        ("cr4", &mut sregs.cr4),
        ("cr8", &mut sregs.cr8),
        ("efer", &mut sregs.efer),
    ]
}

pub fn to_json(regs: &CpuRegisters) -> Value {
    let mut copy = regs.clone();
    let mut map = Map::new();
    for (name, value) in general(&mut copy.regs) {
        map.insert(name.into(), json!(*value));
    }
    for (name, value) in system(&mut copy.sregs) {
        map.insert(name.into(), json!(*value));
    }
    let s = &regs.sregs;
    for (name, seg) in [
        ("cs", &s.cs),
        ("ds", &s.ds),
        ("es", &s.es),
        ("fs", &s.fs),
        ("gs", &s.gs),
        ("ss", &s.ss),
        ("tr", &s.tr),
    ] {
        map.insert(
            name.into(),
            json!({"selector": seg.selector, "base": seg.base, "limit": seg.limit, "dpl": seg.dpl}),
        );
    }
    map.insert("apic_base".into(), json!(s.apic_base));
    Value::Object(map)
}

/// Applies `{"name": value, ...}` to `regs`; unknown names and non-numbers are errors.
pub fn patch(regs: &mut CpuRegisters, changes: &Value) -> Result<(), String> {
    let Value::Object(changes) = changes else {
        return Err("expected a JSON object of register names to numbers".into());
    };
    for (name, value) in changes {
        let value = value
            .as_u64()
            .ok_or_else(|| format!("register {name}: {value} is not an unsigned 64-bit number"))?;
        let slot = general(&mut regs.regs)
            .into_iter()
            .chain(system(&mut regs.sregs))
            .find(|(n, _)| n == name)
            .map(|(_, slot)| slot);
        match slot {
            Some(slot) => *slot = value,
            None => return Err(format!("unknown or read-only register '{name}'")),
        }
    }
    Ok(())
}
