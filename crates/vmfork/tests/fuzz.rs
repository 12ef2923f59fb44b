//! The fuzzing loop finds the harness's crash and keeps the fork pristine between inputs.

mod common;

use common::*;
use guests::layout::{mailbox, INPUT, MAILBOX};
use guests::{Workload, HARNESS_CRASH_INPUT};
use std::time::Duration;
use vmfork::fuzz::{fuzz, FuzzConfig};
use vmfork::{ForkOptions, VmConfig};

fn harness_config(max_execs: u64) -> FuzzConfig {
    FuzzConfig {
        input_addr: INPUT,
        input_len_addr: MAILBOX + mailbox::INPUT_LEN,
        max_input: 16,
        max_execs,
        max_time: Duration::from_secs(120),
        stop_on_crash: true,
        seed: 7,
    }
}

#[test]
fn fuzzing_the_harness_finds_its_crash() {
    let cfg = VmConfig {
        irqchip: false,
        ..config(16)
    };
    let (parent, _) = guest_vm(Workload::Harness, cfg, &[]);
    let opts = ForkOptions {
        no_devices: true,
        block_interrupts: true,
        ..ForkOptions::default()
    };
    let target = parent.fork(&opts).unwrap();
    let report = fuzz(&target, &harness_config(500_000)).unwrap();
    assert_eq!(report.crashes.len(), 1, "{report:?}");
    let (input, what) = &report.crashes[0];
    assert!(input.starts_with(HARNESS_CRASH_INPUT), "{input:?}");
    assert!(what.contains("triple-faulted"), "{what}");
    // Every score below the crash was seen on the way.
    for code in 0..HARNESS_CRASH_INPUT.len() as u8 {
        assert!(report.exit_codes.contains_key(&code), "{report:?}");
    }
    // The target was reset after the crash: a fresh fork and it agree on the input page.
    let fresh = parent.fork(&opts).unwrap();
    let mut a = [0u8; 16];
    let mut b = [0u8; 16];
    target.ram().read(INPUT, &mut a).unwrap();
    fresh.ram().read(INPUT, &mut b).unwrap();
    assert_eq!(a, b);
}

#[test]
fn fuzzing_needs_a_fork() {
    let (parent, _) = guest_vm(Workload::Harness, config(16), &[]);
    let err = fuzz(&parent, &harness_config(10)).unwrap_err().to_string();
    assert!(err.contains("must be a fork"), "{err}");
}
