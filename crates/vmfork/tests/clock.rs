//! Guest time across snapshots, forks and resets: kvmclock keeps its distance to the TSC the
//! guest really reads, on hosts whose KVM can set a guest's TSC and on hosts whose cannot.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use std::time::Duration;
use vmfork::Vm;

const IA32_TSC: u32 = 0x10;

/// How long a snapshot waits before its restore: long enough that a kvmclock left at the saved
/// instant while the TSC ran on would be far outside the margin.
const SNAPSHOT_AGE: Duration = Duration::from_secs(3);
/// Allowed disagreement between the two clocks (the reads are not atomic; CI hosts are noisy).
const MARGIN_NS: i128 = 500_000_000;

/// A paused VM's kvmclock (ns) and vCPU 0's TSC as KVM has them.
fn clocks(vm: &Vm) -> (u64, u64) {
    let tsc = vm.vcpu_state(0).unwrap().msr(IA32_TSC).unwrap();
    (vm.clock().unwrap().clock, tsc)
}

/// kvmclock's advance minus the TSC's advance (in ns) from `before` to `after`.
fn drift_ns(vm: &Vm, before: (u64, u64), after: (u64, u64)) -> i128 {
    let khz = i128::from(vm.tsc_khz().unwrap());
    let clock = i128::from(after.0) - i128::from(before.0);
    let tsc = (i128::from(after.1) - i128::from(before.1)) * 1_000_000 / khz;
    clock - tsc
}

/// Runs the `clock` guest to its next ready write and checks that the TSC it read at CPL3 is
/// the TSC KVM reports (just before it, within the margin).
fn guest_reads_kvms_tsc(vm: &Vm) {
    vm.run_to_ready(QUICK).unwrap();
    let guest = vm.ram().read_u64(MAILBOX + mailbox::CLOCK_TSC).unwrap();
    let kvm = vm.vcpu_state(0).unwrap().msr(IA32_TSC).unwrap();
    let khz = i128::from(vm.tsc_khz().unwrap());
    let behind_ns = (i128::from(kvm) - i128::from(guest)) * 1_000_000 / khz;
    assert!(
        (0..MARGIN_NS).contains(&behind_ns),
        "guest read TSC {guest}, KVM has {kvm} ({behind_ns} ns apart)"
    );
}

#[test]
fn a_restore_keeps_kvmclock_with_the_tsc() {
    let (vm, _serial) = guest_vm(Workload::Clock, config(64), &[]);
    guest_reads_kvms_tsc(&vm);
    let saved = clocks(&vm);
    let dir = temp_dir("clock-restore");
    let path = dir.join("snap");
    vm.snapshot(&path, &vmfork::SnapshotOptions::default())
        .unwrap();
    std::thread::sleep(SNAPSHOT_AGE);
    let restored = vmfork::Snapshot::open(&path)
        .unwrap()
        .restore(vmfork::devices::SerialSink::Discard)
        .unwrap();
    let loaded = clocks(&restored);
    let drift = drift_ns(&restored, saved, loaded);
    assert!(
        drift.abs() < MARGIN_NS,
        "kvmclock moved {drift} ns apart from the TSC across a restore {SNAPSHOT_AGE:?} later"
    );
    guest_reads_kvms_tsc(&restored);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fork_and_its_reset_keep_kvmclock_with_the_tsc() {
    let (vm, _serial) = guest_vm(Workload::Clock, config(64), &[]);
    guest_reads_kvms_tsc(&vm);
    let parent = clocks(&vm);
    let child = vm.fork(&vmfork::ForkOptions::default()).unwrap();
    let forked = clocks(&child);
    assert!(drift_ns(&child, parent, forked).abs() < MARGIN_NS);
    guest_reads_kvms_tsc(&child);
    std::thread::sleep(SNAPSHOT_AGE);
    child.reset().unwrap();
    let reset = clocks(&child);
    let drift = drift_ns(&child, parent, reset);
    assert!(
        drift.abs() < MARGIN_NS,
        "kvmclock moved {drift} ns apart from the TSC across a reset {SNAPSHOT_AGE:?} later"
    );
    guest_reads_kvms_tsc(&child);
}
