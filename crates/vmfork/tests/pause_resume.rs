//! Pausing and resuming a running guest, and reading/writing vCPU state while paused.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use std::time::Duration;
use vmfork::{ExitReason, VmConfig, VmStatus};

#[test]
fn counter_pauses_resumes_and_exposes_its_state() {
    let (vm, serial) = guest_vm(Workload::Counter, config(32), &counter_params(200_000));
    vm.start().unwrap();
    wait_for_progress(&vm, 3);

    vm.pause().unwrap();
    assert_eq!(vm.status(), VmStatus::Paused);
    let frozen = progress(&vm);
    let state = vm.vcpu_state(0).unwrap();
    // The workload runs at CPL3 in long mode.
    assert_eq!(state.sregs.cs.selector & 3, 3);
    assert_eq!(state.sregs.efer & 0x400, 0x400);
    assert!(!state.msrs.is_empty());
    assert!(state.lapic.is_some());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(progress(&vm), frozen, "counter advanced while paused");
    // Writing the same state back is accepted, and so is a register edit.
    vm.set_vcpu_state(0, &state).unwrap();
    let mut regs = vm.registers(0).unwrap();
    regs.regs.rbx = 1_000_000; // the counter's register: the guest continues from here
    vm.set_registers(0, &regs).unwrap();

    vm.resume().unwrap();
    assert_eq!(vm.status(), VmStatus::Running);
    // The guest stores N before printing `counter N`: N+1 stored means line N is complete.
    let after = wait_for_progress(&vm, 1_000_001);
    assert!(after > 1_000_001);
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::Stopped);
    assert!(
        serial.text().contains("counter 1000001\n"),
        "{}",
        serial.text()
    );
}

#[test]
fn state_operations_refuse_a_running_vm() {
    let (vm, _) = guest_vm(Workload::Spin, config(16), &[]);
    vm.start().unwrap();
    let err = vm.vcpu_state(0).unwrap_err().to_string();
    assert!(err.contains("running"), "{err}");
    assert!(vm.resume().is_ok());
    vm.pause().unwrap();
    assert!(vm
        .vcpu_state(5)
        .unwrap_err()
        .to_string()
        .contains("does not exist"));
    vm.stop();
    vm.wait();
    assert!(vm.pause().is_err());
    assert!(vm.resume().is_err());
}

#[test]
fn counter_stops_at_its_limit_and_multi_vcpu_vms_pause() {
    let cfg = VmConfig {
        vcpus: 4,
        ..config(32)
    };
    let (vm, serial) = guest_vm(
        Workload::Counter,
        cfg,
        &[(mailbox::PARAM0, 1000), (mailbox::PARAM2, 500)],
    );
    vm.start().unwrap();
    // Pause and resume a few times while it counts; all four vCPU threads must park.
    for _ in 0..5 {
        if vm.pause().is_err() {
            break; // it may already have finished
        }
        vm.resume().unwrap();
    }
    assert_eq!(vm.wait(), ExitReason::GuestExit(0));
    assert!(serial.text().ends_with("counter 500\n"));
}

#[test]
fn bad_configurations_are_refused_with_clear_errors() {
    use vmfork::devices::SerialSink;
    use vmfork::Vm;
    for (cfg, needle) in [
        (
            VmConfig {
                vcpus: 0,
                ..config(16)
            },
            "vCPUs",
        ),
        (
            VmConfig {
                vcpus: 255,
                ..config(16)
            },
            "vCPUs",
        ),
        (config(0), "RAM size"),
        (config(1 << 30), "more than this host has"), // 1 TiB
    ] {
        let err = Vm::new(cfg, SerialSink::Discard)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
    let boot_error = |kernel: Vec<u8>| {
        let spec = vmfork::boot::BootSpec::new(vmfork::boot::Kernel::Elf(kernel));
        Vm::boot(config(16), SerialSink::Discard, &spec)
            .err()
            .expect("boot refused")
            .to_string()
    };
    let err = boot_error(b"not an elf".to_vec());
    assert!(err.contains("not an ELF"), "{err}");
    // An ELF whose segment lands at 1 GiB, past the end of 16 MiB of RAM.
    let mut elf = Workload::Hello.elf();
    for field in [64 + 0x10, 64 + 0x18] {
        elf[field..field + 8].copy_from_slice(&(1u64 << 30).to_le_bytes());
    }
    let err = boot_error(elf);
    assert!(err.contains("does not fit"), "{err}");
    // A truncated ELF.
    let mut elf = Workload::Hello.elf();
    elf.truncate(elf.len() / 2);
    let err = boot_error(elf);
    assert!(
        err.contains("does not fit") || err.contains("past the end"),
        "{err}"
    );
}

#[test]
fn virtual_memory_goes_through_the_guest_page_tables() {
    let (vm, _) = guest_vm(Workload::Counter, config(32), &counter_params(200_000));
    vm.start().unwrap();
    wait_for_progress(&vm, 0);
    vm.pause().unwrap();
    // Running in long mode now; the guest runtime maps the low 4 GiB 1:1 with 2 MiB pages.
    let sregs = vm.registers(0).unwrap().sregs;
    assert_eq!(
        vmfork::introspect::PagingMode::from_registers(sregs.cr0, sregs.cr4, sregs.efer),
        vmfork::introspect::PagingMode::Long4
    );
    let addr = MAILBOX + mailbox::PROGRESS;
    assert_eq!(vm.translate(0, addr).unwrap(), addr);
    let mut by_virtual = [0u8; 8];
    vm.read_virtual(0, addr, &mut by_virtual).unwrap();
    assert_eq!(u64::from_le_bytes(by_virtual), progress(&vm));
    // A write across a page boundary lands in both pages.
    vm.write_virtual(0, MAILBOX + 0xffc, &[1, 2, 3, 4, 5, 6, 7, 8])
        .unwrap();
    assert_eq!(
        vm.ram().read_u64(MAILBOX + 0xffc).unwrap(),
        0x0807_0605_0403_0201
    );
    // Beyond the identity map: not mapped, a clear error, nothing read.
    let err = vm.translate(0, 1 << 40).unwrap_err().to_string();
    assert!(err.contains("not mapped"), "{err}");
    // Running VMs refuse (their registers move under us).
    vm.resume().unwrap();
    assert!(vm.translate(0, addr).is_err());
    vm.stop();
}
