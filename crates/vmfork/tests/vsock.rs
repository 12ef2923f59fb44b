//! virtio-vsock seen from inside a guest: the `vsock` test driver connects to a host Unix
//! socket and has counters echoed back; a fork or a restore gets a transport-reset event and
//! finds the parent's connection gone (reset), while the parent keeps it; each VM listens on a
//! socket of its own; bad configurations are clear errors.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmfork::devices::VsockConfig;
use vmfork::{ExitReason, ForkOptions, Vm, VmConfig};

const PORT: u64 = 5000;
const OP_RST: u64 = 3;
const OP_RW: u64 = 5;

/// Echoes every connection made to `<uds>_<PORT>`, until the test process ends.
fn echo_server(uds: &Path) {
    let listener = UnixListener::bind(format!("{}_{PORT}", uds.display())).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn vsock_config(uds: &Path) -> VmConfig {
    VmConfig {
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: uds.to_path_buf(),
        }),
        ..config(16)
    }
}

fn mailbox_u64(vm: &Vm, field: u64) -> u64 {
    vm.ram().read_u64(MAILBOX + field).unwrap()
}

/// A VM's socket goes with it: closed when its devices are, on a reaper thread, so soon after
/// the drop rather than at once.
fn assert_gone(socket: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!socket.exists(), "{} is left behind", socket.display());
}

fn setup(name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let uds = dir.join("v.sock");
    echo_server(&uds);
    (dir, uds)
}

#[test]
fn a_guest_connects_to_the_host_and_forks_and_restores_find_their_connections_reset() {
    let (dir, uds) = setup("vsock-echo");
    let (vm, _) = guest_vm(
        Workload::Vsock,
        vsock_config(&uds),
        &[(mailbox::PARAM0, PORT), (mailbox::PARAM1, 100)],
    );
    assert!(uds.exists(), "the root VM listens at its uds_path");
    vm.run_to_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(mailbox_u64(&vm, mailbox::PROGRESS), 100);
    // A fork: its own socket, a reset event, the parent's connection gone.
    let child = vm.fork(&ForkOptions::default()).unwrap();
    let child_socket = PathBuf::from(format!("{}.{}", uds.display(), child.id()));
    assert!(child_socket.exists(), "{}", child_socket.display());
    // Listings say where each VM listens.
    let listed = child.describe_devices();
    assert_eq!(listed["virtio"][1]["type"], "vsock");
    assert_eq!(
        listed["virtio"][1]["socket"],
        child_socket.display().to_string()
    );
    let dir_snap = dir.join("snap");
    let restored = snapshot_and_restore(&vm, &dir_snap);
    assert_eq!(run_to_exit(&child), ExitReason::GuestExit(0));
    assert_eq!(mailbox_u64(&child, mailbox::VSOCK_LAST_OP), OP_RST);
    assert_eq!(mailbox_u64(&child, mailbox::VSOCK_RESETS), 1);
    // The parent's connection lives on.
    assert_eq!(run_to_exit(&vm), ExitReason::GuestExit(0));
    assert_eq!(mailbox_u64(&vm, mailbox::VSOCK_LAST_OP), OP_RW);
    assert_eq!(mailbox_u64(&vm, mailbox::VSOCK_RESETS), 0);
    // A restore is a fork of the snapshot: the same.
    assert_eq!(run_to_exit(&restored), ExitReason::GuestExit(0));
    assert_eq!(mailbox_u64(&restored, mailbox::VSOCK_LAST_OP), OP_RST);
    assert_eq!(mailbox_u64(&restored, mailbox::VSOCK_RESETS), 1);
    // A reset returns the fork to its instant: told again.
    child.reset().unwrap();
    assert_eq!(run_to_exit(&child), ExitReason::GuestExit(0));
    assert_eq!(mailbox_u64(&child, mailbox::VSOCK_LAST_OP), OP_RST);
    assert_eq!(mailbox_u64(&child, mailbox::VSOCK_RESETS), 1);
    // Sockets go with their VMs.
    drop(child);
    assert_gone(&child_socket);
    drop((vm, restored));
    assert_gone(&uds);
    let _ = std::fs::remove_dir_all(dir);
}

/// VM ids count from 1 in every vmfork process, so a fork's `<uds>.<id>` may be a live socket
/// of another process's VM: the fork then listens at `<uds>.<pid>.<id>`; a socket file nobody
/// listens on (a dead process's) is replaced. (The test holds the sockets the next forks would
/// take, as another process would; other tests of this binary make few VMs.)
#[test]
fn a_fork_whose_socket_another_process_holds_listens_at_a_name_of_its_own() {
    const WINDOW: u64 = 32;
    let (dir, uds) = setup("vsock-taken");
    let (vm, _) = guest_vm(
        Workload::Vsock,
        vsock_config(&uds),
        &[(mailbox::PARAM0, PORT), (mailbox::PARAM1, 1)],
    );
    vm.run_to_ready(Duration::from_secs(30)).unwrap();
    let first = vm.fork(&ForkOptions::default()).unwrap();
    let held: Vec<_> = (first.id() + 1..=first.id() + WINDOW)
        .map(|id| UnixListener::bind(format!("{}.{id}", uds.display())).unwrap())
        .collect();
    let second = vm.fork(&ForkOptions::default()).unwrap();
    assert!(
        second.id() <= first.id() + WINDOW,
        "more VMs made meanwhile than the window"
    );
    let own = format!("{}.{}.{}", uds.display(), std::process::id(), second.id());
    assert_eq!(second.describe_devices()["virtio"][1]["socket"], own);
    // It works there: a fork's connection is reset, and it exits 0.
    assert_eq!(run_to_exit(&second), ExitReason::GuestExit(0));
    assert_eq!(mailbox_u64(&second, mailbox::VSOCK_RESETS), 1);
    drop(second);
    assert_gone(Path::new(&own));
    // A stale socket file (its listener gone) is taken over under the plain name.
    drop(held);
    let third = vm.fork(&ForkOptions::default()).unwrap();
    assert_eq!(
        third.describe_devices()["virtio"][1]["socket"],
        format!("{}.{}", uds.display(), third.id())
    );
    drop((third, first, vm));
    let _ = std::fs::remove_dir_all(dir);
}

/// A restore rewired to another socket path listens there exactly, and its guest reaches the
/// host sockets under that path (`<path>_<port>`), not the snapshot's; its forks listen at
/// `<path>.<id>`; a rewiring for a device the VM lacks, or shared by two VMs, is refused.
#[test]
fn a_restore_rewired_to_another_socket_path_lives_there() {
    let dir = temp_dir("vsock-rewired");
    let original = dir.join("original.sock");
    let (vm, _) = guest_vm(
        Workload::Vsock,
        vsock_config(&original),
        &[(mailbox::PARAM0, PORT), (mailbox::PARAM1, 5)],
    );
    // Snapshot before the guest connects: after the restore it connects under the new path,
    // where alone an echo server listens.
    let snap = dir.join("snap");
    vm.snapshot(&snap, &vmfork::SnapshotOptions::default())
        .unwrap();
    drop(vm);
    let rewired = dir.join("rewired.sock");
    echo_server(&rewired);
    let opts = ForkOptions {
        rewiring: vmfork::devices::Rewiring {
            vsock_path: Some(rewired.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let snapshot = vmfork::Snapshot::open(&snap).unwrap();
    let restored = snapshot
        .restore_with(vmfork::devices::SerialSink::Discard, &opts)
        .unwrap();
    assert_eq!(
        restored.describe_devices()["virtio"][1]["socket"],
        rewired.display().to_string()
    );
    restored.run_to_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(
        mailbox_u64(&restored, mailbox::PROGRESS),
        5,
        "echoed under the new path"
    );
    let child = restored.fork(&ForkOptions::default()).unwrap();
    assert_eq!(
        child.describe_devices()["virtio"][1]["socket"],
        format!("{}.{}", rewired.display(), child.id())
    );
    drop(child);
    // The VM resets to its rewired state.
    restored.reset().unwrap();
    drop(restored);
    assert_gone(&rewired);
    let no_net = ForkOptions {
        rewiring: vmfork::devices::Rewiring {
            tap: Some("vmf-none".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = snapshot
        .restore_with(vmfork::devices::SerialSink::Discard, &no_net)
        .err()
        .expect("a tap for a VM without a network device")
        .to_string();
    assert!(err.contains("no network device"), "{err}");
    let (parent, _) = guest_vm(Workload::Vsock, vsock_config(&original), &[]);
    let sinks = vec![
        vmfork::devices::SerialSink::Discard,
        vmfork::devices::SerialSink::Discard,
    ];
    let err = parent
        .fork_many(&opts, sinks)
        .err()
        .expect("two children on one rewiring")
        .to_string();
    assert!(err.contains("cannot share one rewiring"), "{err}");
    drop(parent);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_connection_to_a_port_nobody_listens_on_is_reset_and_host_junk_is_dropped() {
    let (dir, uds) = setup("vsock-refused");
    let (vm, _) = guest_vm(
        Workload::Vsock,
        vsock_config(&uds),
        &[(mailbox::PARAM0, PORT + 1), (mailbox::PARAM1, 1)],
    );
    // Host programs that connect to the VM's socket and say nothing useful are dropped.
    for junk in [&b"HELLO\n"[..], b"CONNECT nope\n", &[b'x'; 100]] {
        let mut s = std::os::unix::net::UnixStream::connect(&uds).unwrap();
        s.write_all(junk).unwrap();
    }
    assert_eq!(
        run_to_exit(&vm),
        ExitReason::GuestExit(guests::drivers::VSOCK_FAILED_STEP + 1)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_vsock_configurations_are_clear_errors() {
    let dir = temp_dir("vsock-bad");
    for (vsock, why) in [
        (
            VsockConfig {
                guest_cid: 2,
                uds_path: dir.join("a.sock"),
            },
            "CID",
        ),
        (
            VsockConfig {
                guest_cid: 3,
                uds_path: dir.join("missing-dir/a.sock"),
            },
            "cannot listen",
        ),
    ] {
        let cfg = VmConfig {
            vsock: Some(vsock),
            ..config(16)
        };
        let err = Vm::new(cfg, vmfork::devices::SerialSink::Discard)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(why), "{err}");
    }
    // The path is taken by a live VM: the second one is refused, the first keeps it.
    let uds = dir.join("taken.sock");
    let first = Vm::new(vsock_config(&uds), vmfork::devices::SerialSink::Discard).unwrap();
    let err = Vm::new(vsock_config(&uds), vmfork::devices::SerialSink::Discard)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("cannot listen"), "{err}");
    assert!(uds.exists());
    drop(first);
    let _ = std::fs::remove_dir_all(dir);
}
