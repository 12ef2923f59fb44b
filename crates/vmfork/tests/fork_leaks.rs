//! Destroying many forks leaks nothing. Its own test binary: it counts the process's file
//! descriptors and RSS, which tests running in parallel would disturb.

mod common;

use common::*;
use guests::layout::mailbox;
use guests::Workload;
use vmfork::vm::pool;
use vmfork::{ExitReason, ForkOptions, VmConfig};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn destroying_1000_forks_leaks_no_fds_or_memory() {
    let cfg = VmConfig {
        irqchip: false,
        ..config(16)
    };
    let (parent, _) = guest_vm(Workload::Memtouch, cfg, &[(mailbox::PARAM0, 16)]);
    // Warm up allocator and caches.
    for _ in 0..20 {
        let f = parent.fork(&ForkOptions::default()).unwrap();
        assert_eq!(f.run_inline().unwrap(), ExitReason::GuestExit(0));
    }
    // Idle pooled shells hold fds of their own: count with the pool empty.
    pool::drain();
    let fds = open_fds();
    let rss = rss_kib();
    for i in 0..1000 {
        let f = parent.fork(&ForkOptions::default()).unwrap();
        if i % 10 == 0 {
            assert_eq!(f.run_inline().unwrap(), ExitReason::GuestExit(0));
        }
    }
    let idle: usize = pool::idle_shells().iter().map(|s| s.3).sum();
    assert!(
        idle <= 16,
        "{idle} idle shells pooled; the pool should cap them"
    );
    pool::drain();
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    let grown = rss_kib().saturating_sub(rss);
    assert!(grown < 32 * 1024, "RSS grew by {grown} KiB over 1000 forks");
}
