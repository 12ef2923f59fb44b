//! Every built-in workload on real KVM: boot, run, exit codes, faults.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX, MEMTOUCH_BASE};
use guests::{memtouch_pattern, Workload};
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{ExitReason, Vm, VmConfig};

#[test]
fn hello_prints_and_exits_zero() {
    let (vm, serial) = guest_vm(Workload::Hello, config(64), &[]);
    let exit = run_to_exit(&vm);
    assert_eq!(exit, ExitReason::GuestExit(0), "{exit}");
    assert_eq!(serial.text(), "Hello from the vmfork guest!\n");
}

#[test]
fn hello_boots_through_the_64_bit_entry_and_as_a_flat_binary() {
    for kernel in [
        Kernel::ElfLongMode(Workload::Hello.elf()),
        Kernel::Elf(Workload::Hello.elf_without_pvh()),
        Kernel::Flat {
            image: Workload::Hello.image(),
            load_addr: guests::layout::LOAD_ADDR,
        },
    ] {
        let (sink, serial) = SerialSink::buffer();
        let vm = Vm::boot(config(64), sink, &BootSpec::new(kernel)).unwrap();
        assert_eq!(run_to_exit(&vm), ExitReason::GuestExit(0));
        assert!(serial.text().starts_with("Hello"));
    }
}

#[test]
fn memtouch_writes_its_pattern() {
    let pages = 64;
    let seed = 0x1234;
    let (vm, serial) = guest_vm(
        Workload::Memtouch,
        config(64),
        &[(mailbox::PARAM0, pages), (mailbox::PARAM1, seed)],
    );
    assert_eq!(run_to_exit(&vm), ExitReason::GuestExit(0));
    assert_eq!(serial.text(), format!("memtouch done {pages}\n"));
    for page in [0, 17, pages - 1] {
        let addr = MEMTOUCH_BASE + page * 4096;
        assert_eq!(
            vm.ram().read_u64(addr).unwrap(),
            memtouch_pattern(seed, page)
        );
        assert_eq!(
            vm.ram().read_u64(addr + 4088).unwrap(),
            memtouch_pattern(seed, page)
        );
    }
    assert_eq!(vm.ram().read_u64(MEMTOUCH_BASE + pages * 4096).unwrap(), 0);
    assert_eq!(
        vm.ram().read_u64(MAILBOX + mailbox::PROGRESS).unwrap(),
        pages
    );
}

#[test]
fn memtouch_past_the_end_of_ram_is_stopped_with_a_report() {
    // 8 MiB of RAM; memtouch starts at 4 MiB, so page 1024 is past the end.
    let (vm, _) = guest_vm(Workload::Memtouch, config(8), &[(mailbox::PARAM0, 2000)]);
    let exit = run_to_exit(&vm);
    match &exit {
        ExitReason::UnmappedWrite { addr, .. } => assert_eq!(*addr, 8 << 20),
        other => panic!("expected an unmapped write, got {other}"),
    }
    assert!(exit.is_fault());
    assert!(exit.to_string().contains("rip="), "{exit}");
}

#[test]
fn harness_scores_its_input_and_crashes_on_the_magic() {
    for (input, expected) in [
        (&b""[..], ExitReason::GuestExit(0)),
        (b"F", ExitReason::GuestExit(1)),
        (b"FUx", ExitReason::GuestExit(2)),
        (b"FUZ", ExitReason::GuestExit(3)),
        (b"xFUZZ", ExitReason::GuestExit(0)),
    ] {
        let (vm, _) = guest_vm(Workload::Harness, config(16), &[]);
        vm.ram().write(guests::layout::INPUT, input).unwrap();
        vm.ram()
            .write_u64(MAILBOX + mailbox::INPUT_LEN, input.len() as u64)
            .unwrap();
        assert_eq!(run_to_exit(&vm), expected, "input {input:?}");
    }
    let (vm, _) = guest_vm(Workload::Harness, config(16), &[]);
    vm.ram().write(guests::layout::INPUT, b"FUZZ").unwrap();
    vm.ram().write_u64(MAILBOX + mailbox::INPUT_LEN, 4).unwrap();
    let exit = run_to_exit(&vm);
    assert!(matches!(exit, ExitReason::TripleFault(_)), "{exit}");
}

#[test]
fn triple_fault_is_reported_and_the_vmm_survives() {
    let (vm, serial) = guest_vm(Workload::Triple, config(16), &[]);
    let exit = run_to_exit(&vm);
    assert!(matches!(exit, ExitReason::TripleFault(_)), "{exit}");
    assert_eq!(exit.status(), vmfork::vm::GUEST_FAULT_STATUS);
    assert_eq!(serial.text(), "triple: faulting now\n");
    // The process goes on: another VM runs fine.
    let (vm, _) = guest_vm(Workload::Hello, config(16), &[]);
    assert_eq!(run_to_exit(&vm), ExitReason::GuestExit(0));
}

#[test]
fn a_spinning_guest_is_stopped_by_the_host() {
    let (vm, _) = guest_vm(Workload::Spin, config(16), &[]);
    vm.start().unwrap();
    assert!(vm
        .wait_timeout(std::time::Duration::from_millis(200))
        .is_none());
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::Stopped);
}

#[test]
fn run_inline_runs_on_the_calling_thread() {
    let (vm, serial) = guest_vm(Workload::Hello, config(16), &[]);
    assert_eq!(vm.run_inline().unwrap(), ExitReason::GuestExit(0));
    assert!(serial.text().starts_with("Hello"));
}

#[test]
fn many_vcpus_and_large_ram_boot() {
    let cfg = VmConfig {
        vcpus: 8,
        mem_bytes: 5 << 30,
        irqchip: true,
    };
    let (vm, serial) = guest_vm(Workload::Hello, cfg, &[]);
    assert_eq!(vm.ram().layout().regions.len(), 2);
    assert_eq!(run_to_exit(&vm), ExitReason::GuestExit(0));
    assert!(serial.text().starts_with("Hello"));
}
