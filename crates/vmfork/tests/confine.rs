//! Seccomp confinement: a system call outside the vCPU allow-list kills the process; a VM runs,
//! forks, resets, snapshots and restores with its threads confined (the rest of the suite runs
//! that way too: filters are on by default).

mod common;

use common::*;
use guests::Workload;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use vmfork::confine::seccomp::{install, ThreadKind};
use vmfork::{ExitReason, ForkOptions};

const CHILD: &str = "VMFORK_SECCOMP_CHILD";

/// In the child process: a thread confined as a vCPU thread opens a TCP socket.
#[test]
#[ignore = "the child half of a_forbidden_syscall_from_a_vcpu_thread_kills_the_process"]
fn child_forbidden_syscall() {
    assert!(std::env::var(CHILD).is_ok(), "run by its parent test only");
    std::thread::spawn(|| {
        install(ThreadKind::Vcpu).unwrap();
        // SAFETY: a plain system call with no memory arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        // Not reached: the filter kills the process.
        println!("socket returned {fd}");
    })
    .join()
    .unwrap();
    std::process::exit(0);
}

#[test]
fn a_forbidden_syscall_from_a_vcpu_thread_kills_the_process() {
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_forbidden_syscall",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert_eq!(
        status.status.signal(),
        Some(libc::SIGSYS),
        "{status:?} {}",
        String::from_utf8_lossy(&status.stdout)
    );
}

#[test]
fn confined_threads_run_fork_reset_snapshot_and_restore() {
    assert!(vmfork::confine::seccomp::enabled());
    let (vm, serial) = guest_vm(Workload::Memtouch, config(32), &[]);
    vm.start().unwrap();
    assert_eq!(
        vm.wait_timeout(QUICK).expect("memtouch exits"),
        ExitReason::GuestExit(0)
    );
    assert!(serial.text().contains("memtouch done"));
    let (parent, _) = guest_vm(Workload::Counter, config(32), &counter_params(100_000));
    parent.start().unwrap();
    let child = parent.fork(&ForkOptions::default()).unwrap();
    child.start().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    child.pause().unwrap();
    child.reset().unwrap();
    let dir = temp_dir("confine");
    let snap = dir.join("snap");
    let restored = snapshot_and_restore(&parent, &snap);
    restored.start().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(restored.status(), vmfork::VmStatus::Running);
    restored.stop();
    parent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
