//! The emulation assist: a ring-0 guest runs `lock cmpxchg16b` (a hit and a miss), `stac` and
//! `clac`, and `int3` with its own #BP handler. With the assist every result is right on any host; without it a
//! host that emulates ring 0 (nested paravirtual KVM) stops the guest with an emulation
//! failure, and bare-metal KVM runs it natively.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX};
use guests::workloads::{ASSIST_PLANTED, ASSIST_SWAPPED, ASSIST_VALUE};
use guests::Workload;
use vmfork::{ExitReason, Vm, VmConfig};

fn u128_at(vm: &Vm, addr: u64) -> u128 {
    let mut b = [0u8; 16];
    vm.ram().read(addr, &mut b).unwrap();
    u128::from_le_bytes(b)
}

fn mailbox_u64(vm: &Vm, field: u64) -> u64 {
    vm.ram().read_u64(MAILBOX + field).unwrap()
}

fn check_results(vm: &Vm) {
    assert_eq!(mailbox_u64(vm, mailbox::ASSIST_FIRST), 1, "the hit set ZF");
    assert_eq!(
        mailbox_u64(vm, mailbox::ASSIST_SECOND),
        0,
        "the miss cleared ZF"
    );
    assert_eq!(u128_at(vm, MAILBOX + mailbox::ASSIST_FOUND), ASSIST_SWAPPED);
    assert_eq!(u128_at(vm, ASSIST_VALUE), ASSIST_SWAPPED);
    assert_ne!(ASSIST_PLANTED, ASSIST_SWAPPED);
    let bits = guests::workloads::ASSIST_BITS_INPUT;
    assert_eq!(
        mailbox_u64(vm, mailbox::ASSIST_POPCNT),
        u64::from(bits.count_ones())
    );
    assert_eq!(
        mailbox_u64(vm, mailbox::ASSIST_TZCNT),
        u64::from(bits.trailing_zeros())
    );
    assert_eq!(
        mailbox_u64(vm, mailbox::ASSIST_POPCNT_MEMORY),
        u64::from((ASSIST_SWAPPED as u32).count_ones())
    );
    let mxcsr = mailbox_u64(vm, mailbox::ASSIST_MXCSR) as u32;
    assert_eq!(mxcsr, 0x1f80, "the power-on MXCSR");
    assert_eq!(
        mailbox_u64(vm, mailbox::ASSIST_MXCSR_AFTER) as u32,
        guests::workloads::ASSIST_MXCSR_LOADED
    );
    let flags = mailbox_u64(vm, mailbox::ASSIST_FLAGS);
    const AC: u64 = 1 << 18;
    assert_eq!((flags >> 32) & AC, AC, "stac set RFLAGS.AC");
    assert_eq!(flags & AC, 0, "clac cleared it");
    let after = mailbox_u64(vm, mailbox::ASSIST_AFTER);
    assert_ne!(after, 0);
    assert_eq!(
        mailbox_u64(vm, mailbox::ASSIST_BP_RIP),
        after,
        "#BP returns after the int3"
    );
}

#[test]
fn the_assist_completes_cmpxchg16b_and_int3_at_ring_0() {
    let cfg = VmConfig {
        emulation_assist: true,
        ..config(16)
    };
    let (vm, _) = guest_vm(Workload::Assist, cfg, &[]);
    assert_eq!(run_to_exit(&vm), ExitReason::GuestExit(0));
    check_results(&vm);
    // A fork of it (the assist is part of its configuration) and a reset work the same way.
    let (root, _) = guest_vm(
        Workload::Assist,
        VmConfig {
            emulation_assist: true,
            ..config(16)
        },
        &[],
    );
    let fork = root.fork(&vmfork::ForkOptions::default()).unwrap();
    assert_eq!(run_to_exit(&fork), ExitReason::GuestExit(0));
    check_results(&fork);
    fork.reset().unwrap();
    assert_eq!(
        u128_at(&fork, ASSIST_VALUE),
        0,
        "the reset put the page back"
    );
    assert_eq!(run_to_exit(&fork), ExitReason::GuestExit(0));
    check_results(&fork);
    eprintln!(
        "instructions the assist completed: {} (0 where KVM runs ring 0 natively)",
        vm.assisted_instructions()
    );
}

#[test]
fn without_the_assist_the_guest_runs_natively_or_stops_with_the_emulation_failure() {
    let (vm, _) = guest_vm(Workload::Assist, config(16), &[]);
    match run_to_exit(&vm) {
        ExitReason::GuestExit(0) => check_results(&vm),
        ExitReason::InternalError { detail, .. } => {
            assert!(detail.contains("emulation failure"), "{detail}");
            assert_eq!(vm.assisted_instructions(), 0);
        }
        other => panic!("unexpected: {other}"),
    }
}
