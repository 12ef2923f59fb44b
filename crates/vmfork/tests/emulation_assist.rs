//! The emulation assist: a ring-0 guest runs `lock cmpxchg16b` (a hit and a miss), `stac` and
//! `clac`, `int3` with its own #BP handler, and XRSTOR/XSAVE/XSAVEC. With the assist every result is right on any host; without it a
//! host that emulates ring 0 (nested paravirtual KVM) stops the guest with an emulation
//! failure, and bare-metal KVM runs it natively.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX};
use guests::workloads::{
    ASSIST_PLANTED, ASSIST_SWAPPED, ASSIST_VALUE, ASSIST_XSAVEC_OUT, ASSIST_XSAVE_IN,
    ASSIST_XSAVE_OUT,
};
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

/// The XMM registers `assist` restores (bytes 160-415 of the XSAVE area).
fn planted_xmm() -> Vec<u8> {
    (0..256).map(|i| (i * 7 + 3) as u8).collect()
}

/// Puts the XSAVE area `assist` restores in place: SSE state only (XSTATE_BV = 2), MXCSR at
/// its power-on value.
fn plant_xsave_area(vm: &Vm) {
    let mut area = vec![0u8; 576];
    area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    area[160..416].copy_from_slice(&planted_xmm());
    area[512] = 2;
    vm.ram().write(ASSIST_XSAVE_IN, &area).unwrap();
}

fn bytes_at(vm: &Vm, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    vm.ram().read(addr, &mut b).unwrap();
    b
}

fn check_results(vm: &Vm) {
    // XRSTOR then XSAVE (standard format) and XSAVEC (compacted): the XMM registers went in
    // and came out; x87 was put in its initial state (FCW 0x37f); XCOMP_BV marks compaction.
    let saved = bytes_at(vm, ASSIST_XSAVE_OUT, 576);
    assert_eq!(
        saved[160..416],
        planted_xmm()[..],
        "XMM through XRSTOR and XSAVE"
    );
    assert_eq!(saved[0..2], [0x7f, 0x03], "x87 initialised");
    assert_eq!(saved[512] & 2, 2, "XSTATE_BV says SSE");
    let compact = bytes_at(vm, ASSIST_XSAVEC_OUT, 576);
    assert_eq!(compact[160..416], planted_xmm()[..], "XMM through XSAVEC");
    assert_eq!(
        u64::from_le_bytes(compact[520..528].try_into().unwrap()),
        (1 << 63) | 3,
        "XCOMP_BV"
    );
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
    plant_xsave_area(&vm);
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
    plant_xsave_area(&root);
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
    plant_xsave_area(&vm);
    match run_to_exit(&vm) {
        ExitReason::GuestExit(0) => check_results(&vm),
        ExitReason::InternalError { detail, .. } => {
            assert!(detail.contains("emulation failure"), "{detail}");
            assert_eq!(vm.assisted_instructions(), 0);
        }
        other => panic!("unexpected: {other}"),
    }
}

#[test]
fn a_restore_turns_the_assist_on_when_asked() {
    // A snapshot records the VM, not the host's need for the assist: restores ask for it.
    let dir = temp_dir("assist-restore");
    let (vm, _) = guest_vm(
        Workload::Assist,
        VmConfig {
            emulation_assist: true,
            ..config(16)
        },
        &[],
    );
    plant_xsave_area(&vm);
    vm.snapshot(&dir.join("s"), &vmfork::SnapshotOptions::default())
        .unwrap();
    let snap = vmfork::Snapshot::open(&dir.join("s")).unwrap();
    let opts = vmfork::ForkOptions {
        emulation_assist: true,
        ..Default::default()
    };
    let restored = snap
        .restore_with(vmfork::devices::SerialSink::Discard, &opts)
        .unwrap();
    assert!(restored.config().emulation_assist);
    assert_eq!(run_to_exit(&restored), ExitReason::GuestExit(0));
    check_results(&restored);
    let plain = snap.restore(vmfork::devices::SerialSink::Discard).unwrap();
    assert!(!plain.config().emulation_assist);
    match run_to_exit(&plain) {
        ExitReason::GuestExit(0) => check_results(&plain),
        ExitReason::InternalError { detail, .. } => {
            assert!(detail.contains("emulation failure"), "{detail}")
        }
        other => panic!("unexpected: {other}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}
