//! Helpers shared by the integration tests: boot a built-in guest with its serial in a buffer.
#![allow(dead_code)]

use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use std::time::Duration;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::{SerialBuffer, SerialSink};
use vmfork::{ExitReason, Vm, VmConfig};

/// Generous bound for guests that should finish in milliseconds (CI machines are noisy).
pub const QUICK: Duration = Duration::from_secs(30);

pub fn config(mem_mib: u64) -> VmConfig {
    VmConfig {
        mem_bytes: mem_mib << 20,
        ..VmConfig::default()
    }
}

/// Builds a VM with `workload` loaded and mailbox parameters `(offset, value)` written.
pub fn guest_vm(workload: Workload, cfg: VmConfig, params: &[(u64, u64)]) -> (Vm, SerialBuffer) {
    let (sink, buffer) = SerialSink::buffer();
    let vm = Vm::boot(cfg, sink, &BootSpec::new(Kernel::Elf(workload.elf()))).expect("boot");
    for &(offset, value) in params {
        vm.ram().write_u64(MAILBOX + offset, value).unwrap();
    }
    (vm, buffer)
}

/// Runs a guest on its vCPU threads until it stops.
pub fn run_to_exit(vm: &Vm) -> ExitReason {
    vm.start().unwrap();
    vm.wait_timeout(QUICK).unwrap_or_else(|| {
        vm.stop();
        panic!("guest did not stop within {QUICK:?}")
    })
}

pub fn counter_params(delay: u64) -> Vec<(u64, u64)> {
    vec![(mailbox::PARAM0, delay)]
}

/// A hash of all guest RAM.
pub fn ram_hash(vm: &Vm) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in &vm.ram().layout().regions {
        let mut addr = region.guest_addr;
        while addr < region.end() {
            let n = (region.end() - addr).min(buf.len() as u64) as usize;
            vm.ram().read(addr, &mut buf[..n]).unwrap();
            std::hash::Hasher::write(&mut h, &buf[..n]);
            addr += n as u64;
        }
    }
    std::hash::Hasher::finish(&h)
}

/// The counter guest's current number.
pub fn progress(vm: &Vm) -> u64 {
    vm.ram().read_u64(MAILBOX + mailbox::PROGRESS).unwrap()
}

/// Waits (at most [`QUICK`]) until the counter is past `above`; returns its number.
pub fn wait_for_progress(vm: &Vm, above: u64) -> u64 {
    let deadline = std::time::Instant::now() + QUICK;
    loop {
        let p = progress(vm);
        if p > above {
            return p;
        }
        assert!(std::time::Instant::now() < deadline, "counter stuck at {p}");
        std::thread::sleep(Duration::from_millis(1));
    }
}
