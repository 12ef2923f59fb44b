//! virtio-net on tap devices: two VMs on a host bridge exchange frames through the `net` test
//! driver; their forks get taps and MACs of their own and exchange frames the same way; the
//! interfaces go away with their VMs; bad tap names and MACs are clear errors. Needs root (tap
//! and bridge creation) and `ip` (iproute2).

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use std::process::Command;
use std::time::Duration;
use vmfork::devices::NetConfig;
use vmfork::{ExitReason, ForkOptions, Vm, VmConfig};

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2)");
    assert!(status.success(), "ip {args:?}");
}

/// A host bridge, removed when dropped.
struct Bridge(String);

impl Bridge {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["link", "add", name, "type", "bridge"]);
        ip(&["link", "set", name, "up"]);
        Self(name.into())
    }

    fn attach(&self, tap: &str) {
        ip(&["link", "set", tap, "master", &self.0]);
        ip(&["link", "set", tap, "up"]);
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// A VM's taps go with it: closed when its devices are, on a reaper thread, so soon after the
/// drop rather than at once.
fn assert_gone(names: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while names.iter().any(|n| interface_exists(n)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for name in names {
        assert!(!interface_exists(name), "{name} is left behind");
    }
}

fn net_vm(tap: &str, id: u64) -> Vm {
    let cfg = VmConfig {
        net: Some(NetConfig {
            tap: tap.into(),
            mac: None,
            keep_mac: false,
        }),
        ..config(16)
    };
    let (vm, _) = guest_vm(Workload::Net, cfg, &[(mailbox::PARAM0, id)]);
    vm
}

fn mailbox_u64(vm: &Vm, field: u64) -> u64 {
    vm.ram().read_u64(MAILBOX + field).unwrap()
}

/// Runs both VMs at once until each has the other's frame.
fn exchange(a: &Vm, b: &Vm) {
    a.start().unwrap();
    b.start().unwrap();
    for vm in [a, b] {
        let exit = vm.wait_timeout(QUICK).unwrap_or_else(|| {
            a.stop();
            b.stop();
            panic!("no frame within {QUICK:?}")
        });
        assert_eq!(exit, ExitReason::GuestExit(0));
    }
}

#[test]
fn vms_on_a_bridge_exchange_frames_and_their_forks_get_taps_and_macs_of_their_own() {
    let n = std::process::id() % 10_000;
    let bridge = Bridge::new(&format!("vmfbr{n}"));
    let (tap_a, tap_b) = (format!("vmfa{n}"), format!("vmfb{n}"));
    let a = net_vm(&tap_a, 0xaaaa);
    let b = net_vm(&tap_b, 0xbbbb);
    bridge.attach(&tap_a);
    bridge.attach(&tap_b);
    a.run_to_ready(Duration::from_secs(30)).unwrap();
    b.run_to_ready(Duration::from_secs(30)).unwrap();
    let (mac_a, mac_b) = (
        mailbox_u64(&a, mailbox::NET_MAC),
        mailbox_u64(&b, mailbox::NET_MAC),
    );
    assert_ne!(mac_a, mac_b);
    assert_eq!(mac_a & 3, 2, "a locally administered unicast MAC");

    // Forks at the ready port: their own taps (not yet on the bridge) and MACs.
    let a1 = a.fork(&ForkOptions::default()).unwrap();
    let b1 = b.fork(&ForkOptions::default()).unwrap();
    let (tap_a1, tap_b1) = (
        format!("{tap_a}-{}", a1.id()),
        format!("{tap_b}-{}", b1.id()),
    );
    assert!(interface_exists(&tap_a1) && interface_exists(&tap_b1));
    // The fork's driver is told its config space changed (the new MAC): a new config
    // generation and the config-change interrupt bit.
    let (parent_net, child_net) = (&a.device_state().virtio[1], &a1.device_state().virtio[1]);
    assert_eq!(
        child_net.config_generation,
        parent_net.config_generation + 1
    );
    assert_eq!(child_net.interrupt_status & 2, 2);
    assert_eq!(parent_net.interrupt_status & 2, 0);

    exchange(&a, &b);
    assert_eq!(mailbox_u64(&a, mailbox::NET_RECEIVED), 0xbbbb);
    assert_eq!(mailbox_u64(&a, mailbox::NET_FROM), mac_b);
    assert_eq!(mailbox_u64(&b, mailbox::NET_RECEIVED), 0xaaaa);
    assert_eq!(mailbox_u64(&b, mailbox::NET_FROM), mac_a);
    assert_eq!(mailbox_u64(&a, mailbox::NET_MAC_AFTER), mac_a);

    bridge.attach(&tap_a1);
    bridge.attach(&tap_b1);
    exchange(&a1, &b1);
    let (mac_a1, mac_b1) = (
        mailbox_u64(&a1, mailbox::NET_MAC_AFTER),
        mailbox_u64(&b1, mailbox::NET_MAC_AFTER),
    );
    assert_ne!(mac_a1, mac_a, "a fork kept its parent's MAC");
    assert_ne!(mac_b1, mac_b);
    assert_eq!(mailbox_u64(&a1, mailbox::NET_FROM), mac_b1);
    assert_eq!(mailbox_u64(&b1, mailbox::NET_FROM), mac_a1);
    assert_eq!(mailbox_u64(&a1, mailbox::NET_RECEIVED), 0xbbbb);

    // Interfaces go with their VMs.
    drop((a1, b1));
    assert_gone(&[&tap_a1, &tap_b1]);
    drop((a, b));
    assert_gone(&[&tap_a]);
}

#[test]
fn bad_network_configurations_are_clear_errors() {
    for (net, why) in [
        (
            NetConfig {
                tap: "this-name-is-too-long".into(),
                mac: None,
                keep_mac: false,
            },
            "tap name",
        ),
        (
            NetConfig {
                tap: "vmfbad0".into(),
                mac: Some([1, 2, 3, 4, 5, 6]),
                keep_mac: false,
            },
            "multicast",
        ),
    ] {
        let cfg = VmConfig {
            net: Some(net),
            ..config(16)
        };
        let err = Vm::new(cfg, vmfork::devices::SerialSink::Discard)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(why), "{err}");
    }
    assert!(!interface_exists("vmfbad0"));
}

/// VM ids count from 1 in every vmfork process, so a fork's `<tap>-<id>` may be held by a VM of
/// another process: the fork then takes `<tap>-<pid>-<id>`. (The test holds the taps the next
/// forks would take, as another process would; other tests of this binary make few VMs.)
#[test]
fn a_fork_whose_tap_name_another_process_holds_takes_a_name_of_its_own() {
    const WINDOW: u64 = 16;
    let n = std::process::id() % 10_000;
    let tap = format!("vmfc{n}");
    let vm = net_vm(&tap, 0xcccc);
    vm.run_to_ready(Duration::from_secs(30)).unwrap();
    let first = vm.fork(&ForkOptions::default()).unwrap();
    let held: Vec<_> = (first.id() + 1..=first.id() + WINDOW)
        .map(|id| vmfork::devices::virtio::net::tap::Tap::open(&format!("{tap}-{id}")).unwrap())
        .collect();
    let second = vm.fork(&ForkOptions::default()).unwrap();
    assert!(
        second.id() <= first.id() + WINDOW,
        "more VMs made meanwhile than the window"
    );
    // Cut, as every tap name, to the 15 bytes an interface name holds.
    let suffix = format!("-{}-{}", std::process::id(), second.id());
    let own = format!("{}{suffix}", &tap[..tap.len().min(15 - suffix.len())]);
    assert_eq!(second.describe_devices()["virtio"][1]["tap"], own);
    assert!(interface_exists(&own));
    drop(second);
    assert_gone(&[&own]);
    drop(held);
}

/// A restore rewired to a tap takes that tap exactly (not `<tap>-<id>`) and keeps it through a
/// reset; its forks get `<rewired tap>-<id>`.
#[test]
fn a_restore_rewired_to_a_tap_takes_it() {
    let n = std::process::id() % 10_000;
    let (tap, rewired) = (format!("vmfd{n}"), format!("vmfr{n}"));
    let vm = net_vm(&tap, 0xdddd);
    vm.run_to_ready(Duration::from_secs(30)).unwrap();
    let dir = temp_dir("net-rewired");
    vm.snapshot(&dir.join("snap"), &vmfork::SnapshotOptions::default())
        .unwrap();
    let opts = ForkOptions {
        rewiring: vmfork::devices::Rewiring {
            tap: Some(rewired.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let restored = vmfork::Snapshot::open(&dir.join("snap"))
        .unwrap()
        .restore_with(vmfork::devices::SerialSink::Discard, &opts)
        .unwrap();
    assert_eq!(restored.describe_devices()["virtio"][1]["tap"], rewired);
    assert!(interface_exists(&rewired));
    restored.reset().unwrap();
    let child = restored.fork(&ForkOptions::default()).unwrap();
    let child_tap = format!("{rewired}-{}", child.id());
    assert_eq!(child.describe_devices()["virtio"][1]["tap"], child_tap);
    drop((child, restored));
    assert_gone(&[&rewired, &child_tap]);
    drop(vm);
    let _ = std::fs::remove_dir_all(dir);
}
