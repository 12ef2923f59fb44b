//! A snapshot's memory file truncated or rewritten under the VMs restored from it fails those
//! VMs with a clear reason, never the process, and no other VM.

mod common;

use common::*;
use guests::layout::{mailbox, MEMTOUCH_BASE};
use guests::Workload;
use std::time::Duration;
use vmfork::devices::SerialSink;
use vmfork::{Error, ExitReason, ForkOptions, Snapshot, Vm};

const PAGES: u64 = 2000;

/// A memtouch guest that wrote `PAGES` pages and exited, snapshotted into `dir/snap`.
fn snapshotted_memtouch(dir: &std::path::Path) -> (Vm, std::path::PathBuf) {
    let (vm, _) = guest_vm(Workload::Memtouch, config(64), &[(mailbox::PARAM0, PAGES)]);
    assert_eq!(run_to_exit(&vm), ExitReason::GuestExit(0));
    let snap = dir.join("snap");
    vm.snapshot(&snap, &vmfork::SnapshotOptions::default())
        .unwrap();
    (vm, snap)
}

fn internal_error(reason: Option<ExitReason>) -> String {
    match reason {
        Some(ExitReason::InternalError { detail, .. }) => detail,
        other => panic!("expected an internal error, got {other:?}"),
    }
}

#[test]
fn a_truncated_memory_file_fails_its_vms_not_the_process() {
    let dir = temp_dir("truncated");
    let (root, snap) = snapshotted_memtouch(&dir);
    let sibling = root.fork(&ForkOptions::default()).unwrap();
    let page = MEMTOUCH_BASE + (PAGES / 2) * 4096;
    let expected = root.ram().read_u64(page).unwrap();
    let restored = Snapshot::open(&snap)
        .unwrap()
        .restore(SerialSink::Discard)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory.bin"))
        .unwrap()
        .set_len(0)
        .unwrap();
    // Reading a page past the new end raised SIGBUS: it reads as zeroes, and is known to.
    assert_eq!(restored.ram().read_u64(page).unwrap(), 0);
    let err = restored.check_memory_intact().unwrap_err();
    assert!(
        matches!(&err, Error::Damaged(m) if m.contains("truncated")),
        "{err}"
    );
    // Neither a fork nor a snapshot of it pretends those zeroes are its memory.
    let err = restored.fork(&ForkOptions::default()).err().unwrap();
    assert!(matches!(err, Error::Damaged(_)), "{err}");
    // It was stopped, saying why.
    let why = internal_error(restored.wait_timeout(Duration::from_secs(5)));
    assert!(why.contains("truncated"), "{why}");
    // A VM not on that file is untouched, and forks on.
    assert_eq!(sibling.ram().read_u64(page).unwrap(), expected);
    let child = sibling.fork(&ForkOptions::default()).unwrap();
    assert_eq!(child.ram().read_u64(page).unwrap(), expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_running_vm_whose_memory_file_is_rewritten_in_place_is_stopped() {
    let dir = temp_dir("rewritten");
    let (parent, _) = guest_vm(Workload::Counter, config(32), &counter_params(1000));
    parent.start().unwrap();
    let snap = dir.join("snap");
    let restored = snapshot_and_restore(&parent, &snap);
    restored.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // Someone writes into the memory file the running VM maps.
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory.bin"))
        .unwrap();
    file.write_all_at(&[0xcc; 4096], MEMTOUCH_BASE).unwrap();
    let why = internal_error(restored.wait_timeout(Duration::from_secs(5)));
    assert!(why.contains("written"), "{why}");
    // The parent (its memory its own) runs on.
    assert_eq!(parent.status(), vmfork::VmStatus::Running);
    parent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
