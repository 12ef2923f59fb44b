//! Memory of forks of a parent that keeps writing: each page is stored once per generation.
//! Its own test binary: it reads the process's and the system's memory counters, which tests
//! running in parallel would disturb.

mod common;

use common::*;
use guests::layout::mailbox;
use guests::Workload;
use std::time::{Duration, Instant};
use vmfork::vm::pool;
use vmfork::ForkOptions;

/// The process's anonymous pages plus the system's shared memory (memfds: RAM files, layers).
fn memory_bytes() -> u64 {
    let kib = |path: &str, key: &str| -> u64 {
        let text = std::fs::read_to_string(path).unwrap();
        let line = text.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    kib("/proc/self/status", "RssAnon:") + kib("/proc/meminfo", "Shmem:")
}

#[test]
fn forks_of_a_writing_parent_store_each_page_once() {
    const PAGES: u64 = 40_000; // 156 MiB written between forks
    let (parent, _) = guest_vm(Workload::Dirty, config(256), &[(mailbox::PARAM0, PAGES)]);
    pool::drain();
    let baseline = memory_bytes();
    parent.start().unwrap();
    wait_for_progress(&parent, 0);
    drop(parent.fork(&ForkOptions::default()).unwrap());
    let since = progress(&parent);
    wait_for_progress(&parent, since + 1);
    parent.pause().unwrap();
    let before = memory_bytes();
    // The first of these forks saves the 40,000 pages into a layer; the parent then gives up
    // its private copies for the layer's. The others cost no page at all.
    let forks: Vec<_> = (0..10)
        .map(|_| parent.fork(&ForkOptions::default()).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let grown = loop {
        let grown = memory_bytes() as i64 - before as i64;
        if grown < 10 << 20 || Instant::now() > deadline {
            break grown;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        grown < 10 << 20,
        "10 forks grew memory by {} KiB (a copy of the layer would be {} KiB)",
        grown >> 10,
        PAGES * 4
    );
    // The children see the parent's instant and share it: reading it costs nothing either.
    for f in &forks {
        assert_eq!(
            f.ram()
                .read_u64(guests::layout::MAILBOX + mailbox::PROGRESS)
                .unwrap(),
            progress(&parent)
        );
    }
    drop(forks);
    // With its forks gone, the parent folds back into its own RAM file: about the pages it
    // touched (its working set), not that plus its layer plus its frozen base.
    parent.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while parent.has_frozen_image() {
        assert!(Instant::now() < deadline, "not folded back");
        std::thread::sleep(Duration::from_millis(20));
    }
    let working_set = (PAGES * 4096) as i64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let kept = loop {
        let kept = memory_bytes() as i64 - baseline as i64;
        if kept < working_set + working_set / 8 || Instant::now() > deadline {
            break kept;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        kept < working_set + working_set / 8,
        "the parent keeps {} KiB for a {} KiB working set",
        kept >> 10,
        working_set >> 10
    );
    parent.stop();
    drop(parent);
    pool::drain();
}
