//! No state crosses VM families: family A writes a secret into every page of its RAM, every
//! general register, the MSRs a guest kernel owns, LAPIC registers (and its TSC), the XMM and
//! debug registers and pending events (exception, NMI), forks, resets, snapshots and restores,
//! and is destroyed; family B, built right after in the same process (from the shells A's VMs
//! gave back), is scanned for the secret in its memory, registers and MSRs. Many rounds.
//! Its own test binary: no other test's VMs take the recycled shells meanwhile.

mod common;

use common::*;
use guests::Workload;
use vmfork::{ForkOptions, Vm, VmConfig};

const SECRET: u64 = 0x5ec2_e7a1_1ce5_0b0b;
/// What A's LAPIC timer initial count (APIC offset 0x380) is set to.
const LAPIC_SECRET: u32 = 0x5ec2_e7a1;
const APIC_TMICT: usize = 0x380;
/// Other LAPIC registers A sets, with values a fresh VM never has: task priority, the timer's
/// LVT entry (masked, vector 0xa1) and its divide configuration.
const LAPIC_PLANTED: [(usize, u32); 3] = [(0x80, 0xa0), (0x320, 0x1_00a1), (0x3e0, 0xb)];
/// Where the XMM registers sit in the legacy XSAVE area, in 32-bit words.
const XMM_WORDS: std::ops::Range<usize> = 40..104;
const XSTATE_BV_WORD: usize = 512 / 4;
/// A's TSC, far ahead of any real one: B's must not be near it.
const TSC_SECRET: u64 = 0x5ec2_0000_0000_0000;
const MSR_TSC: u32 = 0x10;
/// MSRs a guest kernel sets and another family must never see: STAR, LSTAR, CSTAR, SFMASK,
/// KERNEL_GS_BASE, FS_BASE, GS_BASE, TSC_AUX.
const GUEST_MSRS: [u32; 8] = [
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0xc000_0100,
    0xc000_0101,
    0xc000_0103,
];

fn cfg() -> VmConfig {
    config(32)
}

/// Plants the secret in every page and register and in the guest-owned MSRs it keeps.
fn plant(vm: &Vm) {
    let page = SECRET.to_le_bytes().repeat(512);
    let size = vm.ram().size();
    for region in &vm.ram().layout().regions {
        let mut addr = region.guest_addr;
        while addr < region.end() && addr - region.guest_addr < size {
            vm.ram().write(addr, &page).unwrap();
            addr += 4096;
        }
    }
    let mut state = vm.vcpu_state(0).unwrap();
    let r = &mut state.regs;
    for reg in [
        &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rbp,
        &mut r.r8, &mut r.r9, &mut r.r10, &mut r.r11, &mut r.r12, &mut r.r13, &mut r.r14,
    ] {
        *reg = SECRET;
    }
    if let Some(lapic) = &mut state.lapic {
        for (i, b) in LAPIC_SECRET.to_le_bytes().iter().enumerate() {
            lapic.regs[APIC_TMICT + i] = *b as _;
        }
    }
    for msr in &mut state.msrs {
        if msr.index == MSR_TSC {
            msr.data = TSC_SECRET;
        }
        if GUEST_MSRS.contains(&msr.index) {
            // TSC_AUX holds 32 bits; the others take canonical addresses or masks.
            msr.data = if msr.index == 0xc000_0103 {
                SECRET & 0xffff_ffff
            } else {
                SECRET & 0x0000_7fff_ffff_f000
            };
        }
    }
    vm.set_vcpu_state(0, &state).unwrap();
}

/// Plants the secret where only a VM that will not run again may keep it: the XMM registers,
/// the debug address registers, other LAPIC registers, and a pending exception's error code
/// and a pending NMI (which would fault a running guest).
fn plant_more(vm: &Vm) {
    let mut state = vm.vcpu_state(0).unwrap();
    for pair in state.xsave[XMM_WORDS].chunks_exact_mut(2) {
        pair[0] = SECRET as u32;
        pair[1] = (SECRET >> 32) as u32;
    }
    // XSTATE_BV (the header at byte 512): the SSE state is in the area, not in its init state.
    state.xsave[XSTATE_BV_WORD] |= 0b10;
    state.debugregs.db = [SECRET & 0x0000_7fff_ffff_f000; 4];
    if let Some(lapic) = &mut state.lapic {
        for (offset, value) in LAPIC_PLANTED {
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[offset + i] = *b as _;
            }
        }
    }
    let e = &mut state.events;
    e.exception.injected = 1;
    e.exception.nr = 13;
    e.exception.has_error_code = 1;
    e.exception.error_code = SECRET as u32;
    e.nmi.pending = 1;
    e.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING;
    vm.set_vcpu_state(0, &state).unwrap();
}

fn lapic_u32(lapic: &kvm_bindings::kvm_lapic_state, offset: usize) -> u32 {
    let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
        .iter()
        .map(|&b| b as u8)
        .collect();
    u32::from_le_bytes(bytes.try_into().unwrap())
}

/// Where `vm` shows any trace of the secret.
fn traces(vm: &Vm) -> Vec<String> {
    let mut found = Vec::new();
    scan_ram(vm, |addr, bytes| {
        match bytes
            .chunks_exact(8)
            .position(|w| u64::from_le_bytes(w.try_into().unwrap()) == SECRET)
        {
            Some(at) => {
                found.push(format!("memory at {:#x}", addr + at as u64 * 8));
                std::ops::ControlFlow::Break(())
            }
            None => std::ops::ControlFlow::Continue(()),
        }
    });
    let state = vm.vcpu_state(0).unwrap();
    if format!("{:?}", state.regs).contains(&SECRET.to_string()) {
        found.push(format!("registers {:?}", state.regs));
    }
    if let Some(lapic) = &state.lapic {
        if lapic_u32(lapic, APIC_TMICT) == LAPIC_SECRET {
            found.push("LAPIC timer initial count".into());
        }
        for (offset, value) in LAPIC_PLANTED {
            if lapic_u32(lapic, offset) == value {
                found.push(format!("LAPIC register {offset:#x} = {value:#x}"));
            }
        }
    }
    let xmm = &state.xsave[XMM_WORDS];
    if xmm
        .chunks_exact(2)
        .any(|w| (w[0] as u64 | (w[1] as u64) << 32) == SECRET)
    {
        found.push("XMM registers".into());
    }
    if state
        .debugregs
        .db
        .contains(&(SECRET & 0x0000_7fff_ffff_f000))
    {
        found.push(format!("debug registers {:x?}", state.debugregs.db));
    }
    let e = &state.events;
    if e.exception.error_code == SECRET as u32 {
        found.push("pending event: exception error code".into());
    }
    if e.nmi.pending != 0 {
        found.push("pending event: NMI".into());
    }
    for msr in &state.msrs {
        if msr.index == MSR_TSC && msr.data >= TSC_SECRET - (1 << 40) {
            found.push(format!("TSC {:#x}", msr.data));
        }
        let low = SECRET & 0xffff_ffff;
        let addr = SECRET & 0x0000_7fff_ffff_f000;
        if GUEST_MSRS.contains(&msr.index) && (msr.data == low || msr.data == addr) {
            found.push(format!("MSR {:#x} = {:#x}", msr.index, msr.data));
        }
    }
    found
}

fn boot() -> Vm {
    guest_vm(Workload::Spin, cfg(), &[]).0
}

#[test]
fn a_destroyed_familys_secrets_never_reach_the_next_family() {
    let dir = temp_dir("isolation");
    for round in 0..6 {
        // Family A: root, fork, fork of the fork, reset, snapshot, restore, all planted.
        {
            let root = boot();
            plant(&root);
            let child = root.fork(&ForkOptions::default()).unwrap();
            plant(&child);
            let grandchild = child.fork(&ForkOptions::default()).unwrap();
            grandchild.start().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
            grandchild.pause().unwrap();
            plant(&grandchild);
            child.reset().unwrap();
            let restored = snapshot_and_restore(&child, &dir.join(format!("a{round}")));
            plant(&restored);
            plant_more(&restored);
            // The scan finds what was planted, in each kind of place.
            let planted = traces(&restored);
            // (The TSC is planted only where the saved MSRs include it; scanned all the same.)
            for kind in [
                "memory",
                "registers",
                "MSR",
                "LAPIC timer",
                "LAPIC register",
                "XMM",
                "debug",
                "pending event: exception",
                "pending event: NMI",
            ] {
                assert!(
                    planted.iter().any(|t| t.starts_with(kind)),
                    "{kind}: {planted:?}"
                );
            }
        }
        // Family B: everything it is made of must be clean.
        let root = boot();
        let problems = traces(&root);
        assert!(
            problems.is_empty(),
            "round {round}: new VM sees {problems:?}"
        );
        let child = root.fork(&ForkOptions::default()).unwrap();
        let problems = traces(&child);
        assert!(problems.is_empty(), "round {round}: fork sees {problems:?}");
        child.reset().unwrap();
        let problems = traces(&child);
        assert!(
            problems.is_empty(),
            "round {round}: reset fork sees {problems:?}"
        );
        let restored = snapshot_and_restore(&root, &dir.join(format!("b{round}")));
        let problems = traces(&restored);
        assert!(
            problems.is_empty(),
            "round {round}: restore sees {problems:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
