//! Forks and snapshots of a guest that keeps writing: each one is exactly one instant (also when
//! the guest writes faster than pre-copy converges), and
//! several threads acting on one VM at once never tear a child, hang, or undo each other.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX, MEMTOUCH_BASE};
use guests::{dirty_instant_problem, Workload};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmfork::devices::SerialSink;
use vmfork::{ForkOptions, ResetScope, Snapshot, SnapshotOptions, Vm, VmStatus};

const PAGES: u64 = 3000;

fn dirty_parent(pages: u64, delay: u64) -> Vm {
    let (vm, _) = guest_vm(
        Workload::Dirty,
        config(64),
        &[(mailbox::PARAM0, pages), (mailbox::PARAM1, delay)],
    );
    vm
}

/// Why `vm` (paused or not started) is not one instant of a `dirty` guest, if it is not.
fn instant_problem(vm: &Vm, pages: u64) -> Option<String> {
    let regs = vm.registers(0).unwrap().regs;
    let progress = vm.ram().read_u64(MAILBOX + mailbox::PROGRESS).unwrap();
    dirty_instant_problem(regs.rip, regs.rbx, regs.r14, progress, pages, |i| {
        let page = MEMTOUCH_BASE + i * 4096;
        (
            vm.ram().read_u64(page).unwrap(),
            vm.ram().read_u64(page + 4088).unwrap(),
        )
    })
}

fn wait_generations(vm: &Vm, more: u64) {
    let start = progress(vm);
    wait_for_progress(vm, start + more - 1);
}

#[test]
fn every_fork_and_snapshot_of_a_writing_guest_is_one_instant() {
    let parent = dirty_parent(PAGES, 0);
    parent.start().unwrap();
    wait_generations(&parent, 1);
    let dir = temp_dir("busy");
    let mut children = Vec::new();
    for round in 0..24 {
        // A full generation written since the last fork: every page is new in each layer.
        wait_generations(&parent, 1);
        let child = parent.fork(&ForkOptions::default()).unwrap();
        assert_eq!(parent.status(), VmStatus::Running, "the parent runs on");
        if let Some(p) = instant_problem(&child, PAGES) {
            panic!("fork {round} is torn: {p}");
        }
        if round % 6 == 5 {
            let path = dir.join(format!("snap{round}"));
            parent.snapshot(&path, &SnapshotOptions::default()).unwrap();
            let restored = Snapshot::open(&path)
                .unwrap()
                .restore(SerialSink::Discard)
                .unwrap();
            if let Some(p) = instant_problem(&restored, PAGES) {
                panic!("snapshot {round} is torn: {p}");
            }
        }
        // Children that keep running and are forked in turn stay one instant too.
        if round % 4 == 0 {
            child.start().unwrap();
            wait_generations(&child, 2);
            let grandchild = child.fork(&ForkOptions::default()).unwrap();
            if let Some(p) = instant_problem(&grandchild, PAGES) {
                panic!("fork of fork {round} is torn: {p}");
            }
            children.push(child);
        }
    }
    // Old children did not change under the parent's later generations.
    for child in &children {
        child.pause().unwrap();
        assert!(instant_problem(child, PAGES).is_none());
    }
    parent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reset_of_a_forked_fork_returns_to_its_own_fork_instant() {
    let parent = dirty_parent(PAGES, 0);
    parent.start().unwrap();
    wait_generations(&parent, 2);
    let child = parent.fork(&ForkOptions::default()).unwrap();
    let at_fork = ram_hash(&child);
    child.start().unwrap();
    for _ in 0..3 {
        wait_generations(&child, 2);
        // Forking the child makes new generations of it; reset still goes back to its origin.
        let _grandchild = child.fork(&ForkOptions::default()).unwrap();
    }
    child.pause().unwrap();
    child.reset().unwrap();
    assert_eq!(ram_hash(&child), at_fork);
    assert!(instant_problem(&child, PAGES).is_none());
    // And a fork made after the reset is that instant as well.
    let again = child.fork(&ForkOptions::default()).unwrap();
    assert_eq!(ram_hash(&again), at_fork);
    parent.stop();
}

#[test]
fn a_parent_whose_children_are_gone_folds_back_and_forks_on() {
    let parent = dirty_parent(PAGES, 0);
    parent.start().unwrap();
    wait_generations(&parent, 1);
    for _ in 0..3 {
        let child = parent.fork(&ForkOptions::default()).unwrap();
        wait_generations(&parent, 2);
        assert!(instant_problem(&child, PAGES).is_none());
        drop(child);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while parent.has_frozen_image() {
        assert!(
            Instant::now() < deadline,
            "the parent was never folded back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(parent.status(), VmStatus::Running);
    // It writes its own file again; forks of it are still exactly one instant, every time.
    for _ in 0..3 {
        wait_generations(&parent, 2);
        let child = parent.fork(&ForkOptions::default()).unwrap();
        if let Some(p) = instant_problem(&child, PAGES) {
            panic!("fork after the fold is torn: {p}");
        }
        // The child keeps its instant while the parent writes on.
        wait_generations(&parent, 2);
        assert!(instant_problem(&child, PAGES).is_none());
    }
    parent.stop();
}

#[test]
fn several_threads_on_one_vm_never_tear_hang_or_undo_each_other() {
    let parent = Arc::new(dirty_parent(PAGES, 0));
    parent.start().unwrap();
    wait_generations(&parent, 1);
    let fork = Arc::new(parent.fork(&ForkOptions::default()).unwrap());
    fork.start().unwrap();
    let dir = temp_dir("busy");
    let torn = Arc::new(AtomicUsize::new(0));
    let undone = Arc::new(AtomicUsize::new(0));
    let mut work: Vec<Box<dyn FnMut() + Send>> = Vec::new();
    // A client pausing and resuming the parent; its pause must hold until it resumes.
    let (p, u) = (Arc::clone(&parent), Arc::clone(&undone));
    work.push(Box::new(move || {
        p.pause().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        if p.status() != VmStatus::Paused {
            u.fetch_add(1, Ordering::Relaxed);
        }
        p.resume().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }));
    // Clients forking the parent and checking each child.
    for _ in 0..2 {
        let (p, t) = (Arc::clone(&parent), Arc::clone(&torn));
        work.push(Box::new(move || {
            let child = p.fork(&ForkOptions::default()).unwrap();
            if let Some(problem) = instant_problem(&child, PAGES) {
                eprintln!("torn fork: {problem}");
                t.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // A client snapshotting the parent and checking the restore.
    let (p, t, d) = (Arc::clone(&parent), Arc::clone(&torn), dir.clone());
    let mut n = 0;
    work.push(Box::new(move || {
        n += 1;
        let path = d.join(format!("s{n}"));
        p.snapshot(&path, &SnapshotOptions::default()).unwrap();
        let vm = Snapshot::open(&path)
            .unwrap()
            .restore(SerialSink::Discard)
            .unwrap();
        if let Some(problem) = instant_problem(&vm, PAGES) {
            eprintln!("torn snapshot: {problem}");
            t.fetch_add(1, Ordering::Relaxed);
        }
        let _ = std::fs::remove_dir_all(&path);
    }));
    // Two clients resetting the same fork (pause, reset, resume), one forking it meanwhile.
    for _ in 0..2 {
        let f = Arc::clone(&fork);
        work.push(Box::new(move || {
            let _op = f.exclusive();
            f.pause().unwrap();
            f.reset_with(ResetScope::All).unwrap();
            f.resume().unwrap();
        }));
    }
    let (f, t) = (Arc::clone(&fork), Arc::clone(&torn));
    work.push(Box::new(move || {
        let child = f.fork(&ForkOptions::default()).unwrap();
        if let Some(problem) = instant_problem(&child, PAGES) {
            eprintln!("torn fork of a fork: {problem}");
            t.fetch_add(1, Ordering::Relaxed);
        }
    }));
    let counts = hammer(work, Duration::from_secs(6), Duration::from_secs(20));
    assert!(
        counts.iter().all(|&c| c > 0),
        "every client got work done: {counts:?}"
    );
    assert_eq!(
        torn.load(Ordering::Relaxed),
        0,
        "torn children (counts {counts:?})"
    );
    assert_eq!(
        undone.load(Ordering::Relaxed),
        0,
        "pauses undone by another client"
    );
    parent.stop();
    fork.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_writing_faster_than_pre_copy_converges_still_forks_at_one_instant() {
    // 40,000 pages rewritten at full speed: every pre-copy round finds more than enough new
    // pages written during its copy, so the rounds run out before they converge, and what the
    // last round found is copied in the pause.
    const MANY: u64 = 40_000;
    let (parent, _) = guest_vm(
        Workload::Dirty,
        config(256),
        &[(mailbox::PARAM0, MANY), (mailbox::PARAM1, 0)],
    );
    parent.start().unwrap();
    wait_generations(&parent, 1);
    for round in 0..8 {
        wait_generations(&parent, 1);
        let child = parent.fork(&ForkOptions::default()).unwrap();
        if let Some(p) = instant_problem(&child, MANY) {
            panic!("fork {round} is torn: {p}");
        }
    }
    parent.stop();
}
