//! Guest time across snapshots, forks and resets: kvmclock comes back at its saved value, the
//! TSC the guest reads (at CPL3) is the one KVM reports, and after a fork or restore vmfork says
//! how far that TSC is from the saved one: nothing where KVM sets a guest's TSC, the state's age
//! on hosts whose KVM keeps the host's TSC (this development host).

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use std::time::Duration;
use vmfork::Vm;

const IA32_TSC: u32 = 0x10;

/// How long a snapshot (or a fork before its reset) waits: long enough to tell a TSC that was
/// set from one that ran on.
const AGE: Duration = Duration::from_secs(3);
/// Allowed disagreement between clock reads that are not atomic (CI hosts are noisy).
const MARGIN_NS: i64 = 500_000_000;

/// A paused VM's kvmclock (ns) and vCPU 0's TSC as KVM has them.
fn clocks(vm: &Vm) -> (u64, u64) {
    let tsc = vm.vcpu_state(0).unwrap().msr(IA32_TSC).unwrap();
    (vm.clock().unwrap().clock, tsc)
}

fn ns_between(vm: &Vm, tsc_before: u64, tsc_after: u64) -> i64 {
    let khz = i128::from(vm.tsc_khz().unwrap());
    ((i128::from(tsc_after) - i128::from(tsc_before)) * 1_000_000 / khz) as i64
}

/// Runs the `clock` guest to its next ready write and checks that the TSC it read at CPL3 is
/// the TSC KVM reports (just before it, within the margin).
fn guest_reads_kvms_tsc(vm: &Vm) {
    vm.run_to_ready(QUICK).unwrap();
    let guest = vm.ram().read_u64(MAILBOX + mailbox::CLOCK_TSC).unwrap();
    let kvm = vm.vcpu_state(0).unwrap().msr(IA32_TSC).unwrap();
    let behind = ns_between(vm, guest, kvm);
    assert!(
        (0..MARGIN_NS).contains(&behind),
        "guest read TSC {guest}, KVM has {kvm} ({behind} ns apart)"
    );
}

/// After a state load: kvmclock is the saved one.
fn check_kvmclock(vm: &Vm, saved: (u64, u64)) -> (u64, u64) {
    let loaded = clocks(vm);
    let clock_moved = loaded.0 as i64 - saved.0 as i64;
    assert!(
        (0..MARGIN_NS).contains(&clock_moved),
        "kvmclock {clock_moved} ns from the saved one"
    );
    loaded
}

/// After a fork's or restore's state load `age` after its save: kvmclock is the saved one; the
/// reported TSC jump is what KVM's TSC shows, and either none (KVM set the TSC) or the age (the
/// host's TSC ran on).
fn check_load(vm: &Vm, saved: (u64, u64), age: Duration) {
    let loaded = check_kvmclock(vm, saved);
    let jump = vm.tsc_jump_at_load_ns();
    let seen = ns_between(vm, saved.1, loaded.1);
    assert!(
        (seen - jump).abs() < MARGIN_NS,
        "reported a TSC jump of {jump} ns, KVM's TSC shows {seen}"
    );
    let age = age.as_nanos() as i64;
    assert!(
        jump.abs() < MARGIN_NS || (jump > age - MARGIN_NS && jump < 10 * age),
        "a TSC jump of {jump} ns is neither none nor the state's age ({age} ns)"
    );
}

#[test]
fn a_restore_loads_the_saved_kvmclock_and_reports_where_the_tsc_is() {
    let (vm, _serial) = guest_vm(Workload::Clock, config(64), &[]);
    guest_reads_kvms_tsc(&vm);
    assert_eq!(vm.tsc_jump_at_load_ns(), 0, "a booted VM loaded no state");
    let saved = clocks(&vm);
    let dir = temp_dir("clock-restore");
    let path = dir.join("snap");
    vm.snapshot(&path, &vmfork::SnapshotOptions::default())
        .unwrap();
    std::thread::sleep(AGE);
    let restored = vmfork::Snapshot::open(&path)
        .unwrap()
        .restore(vmfork::devices::SerialSink::Discard)
        .unwrap();
    check_load(&restored, saved, AGE);
    guest_reads_kvms_tsc(&restored);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fork_and_its_reset_load_the_fork_instants_kvmclock() {
    let (vm, _serial) = guest_vm(Workload::Clock, config(64), &[]);
    guest_reads_kvms_tsc(&vm);
    let parent = clocks(&vm);
    let child = vm.fork(&vmfork::ForkOptions::default()).unwrap();
    check_load(&child, parent, Duration::ZERO);
    guest_reads_kvms_tsc(&child);
    std::thread::sleep(AGE);
    child.reset().unwrap();
    check_kvmclock(&child, parent);
    guest_reads_kvms_tsc(&child);
}
