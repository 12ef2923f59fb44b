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
        disks: Vec::new(),
        vsock: None,
        net: None,
        emulation_assist: false,
        hide_cpu_features: Vec::new(),
    };
    let (vm, serial) = guest_vm(Workload::Hello, cfg, &[]);
    assert_eq!(vm.ram().layout().regions.len(), 2);
    // The MP table in the EBDA lists the 8 CPUs (with the bus, IOAPIC and interrupt lines).
    let mut mp = [0u8; 64];
    vm.ram().read(0x9_fc00, &mut mp).unwrap();
    assert_eq!(&mp[..4], b"_MP_");
    assert_eq!(&mp[16..20], b"PCMP");
    assert_eq!(
        u16::from_le_bytes([mp[16 + 34], mp[16 + 35]]),
        8 + 1 + 1 + 24 + 2
    );
    assert_eq!(run_to_exit(&vm), ExitReason::GuestExit(0));
    assert!(serial.text().starts_with("Hello"));
}

/// A bzImage of boot protocol `version` with `xloadflags`: one setup sector, then a
/// protected-mode part whose 64-bit entry (0x200 into it) writes the zero page's e820 entry
/// count to the exit port.
fn bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
    let mut image = vec![0u8; 2 * 512];
    image[0x1f1] = 1; // setup_sects
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    image[0x211] = 1; // loadflags: LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    image[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    image[0x238..0x23c].copy_from_slice(&64u32.to_le_bytes()); // cmdline_size
    let mut payload = vec![0x90u8; 0x200]; // the 32-bit entry, never used here
    payload.extend_from_slice(&[
        0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00, // mov al, [rsi + 0x1e8]  (e820_entries)
        0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
        0xee, // out dx, al
        0xf4, // hlt
    ]);
    image.extend_from_slice(&payload);
    image
}

#[test]
fn a_bzimage_boots_through_its_64_bit_entry_with_its_setup_header_in_the_zero_page() {
    let image = bzimage(0x020f, 1);
    assert!(matches!(
        Kernel::from_file(image.clone()),
        Kernel::BzImage(_)
    ));
    let mut spec = BootSpec::new(Kernel::from_file(image));
    spec.cmdline = Some("console=ttyS0 quiet".into());
    let vm = Vm::boot(config(256), SerialSink::Discard, &spec).unwrap();
    let ExitReason::GuestExit(entries) = run_to_exit(&vm) else {
        panic!("the bzImage's entry did not reach the exit port");
    };
    // The zero page the guest found in RSI: the kernel's header kept, the loader's fields set.
    let zero_page = vmfork::boot::layout::ZERO_PAGE;
    let mut params = vec![0u8; 4096];
    vm.ram().read(zero_page, &mut params).unwrap();
    assert_eq!(
        params[0x1e8], entries,
        "e820 entries as the guest read them"
    );
    assert!(
        entries >= 3,
        "low RAM, the reserved EBDA..1 MiB, RAM above 1 MiB"
    );
    let u16_at = |o: usize| u16::from_le_bytes(params[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(params[o..o + 4].try_into().unwrap());
    assert_eq!(&params[0x202..0x206], b"HdrS");
    assert_eq!(u16_at(0x206), 0x020f, "the kernel's protocol version");
    assert_eq!(
        u32_at(0x238),
        64,
        "the kernel's command line limit, untouched"
    );
    assert_eq!(params[0x210], 0xff, "type_of_loader");
    let cmdline = u32_at(0x228) as u64;
    // The command line, with the virtio-mmio devices announced as Linux reads them.
    const ANNOUNCED: &[u8] = b"console=ttyS0 quiet virtio_mmio.device=4K@0xd0001000:6\0";
    let mut text = vec![0u8; ANNOUNCED.len()];
    vm.ram().read(cmdline, &mut text).unwrap();
    assert_eq!(text, ANNOUNCED);
    // What this loader cannot boot is a clear error.
    for (image, cmdline, why) in [
        (bzimage(0x020a, 1), None, "no 64-bit entry"),
        (bzimage(0x020f, 0), None, "no 64-bit entry"),
        (
            bzimage(0x020f, 1),
            Some("x".repeat(65)),
            "longer than this kernel takes",
        ),
        (bzimage(0x020f, 1)[..0x300].to_vec(), None, "bad bzImage"),
    ] {
        let mut spec = BootSpec::new(Kernel::BzImage(image));
        spec.cmdline = cmdline;
        let err = Vm::boot(config(64), SerialSink::Discard, &spec)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(why), "{why}: {err}");
    }
}
