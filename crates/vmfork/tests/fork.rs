//! Fork, fork of fork and reset on real guests.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX, MEMTOUCH_BASE};
use guests::{memtouch_pattern, Workload};
use std::time::Duration;
use vmfork::devices::SerialSink;
use vmfork::{ExitReason, ForkOptions, ResetScope, Vm, VmConfig};

const PAGES: u64 = 16;

fn set(vm: &Vm, field: u64, value: u64) {
    vm.ram().write_u64(MAILBOX + field, value).unwrap();
}

fn page_word(vm: &Vm, page: u64) -> u64 {
    vm.ram().read_u64(MEMTOUCH_BASE + page * 4096).unwrap()
}

fn run_memtouch(vm: &Vm, seed: u64) {
    set(vm, mailbox::PARAM1, seed);
    assert_eq!(vm.run_inline().unwrap(), ExitReason::GuestExit(0));
}

fn memtouch_parent() -> Vm {
    let cfg = VmConfig {
        irqchip: false,
        ..config(16)
    };
    guest_vm(Workload::Memtouch, cfg, &[(mailbox::PARAM0, PAGES)]).0
}

#[test]
fn forks_are_isolated_from_parent_and_siblings() {
    let parent = memtouch_parent();
    let opts = ForkOptions::default();
    let a = parent.fork(&opts).unwrap();
    let b = parent.fork(&opts).unwrap();
    run_memtouch(&a, 1);
    run_memtouch(&b, 2);
    for page in [0, PAGES - 1] {
        assert_eq!(page_word(&a, page), memtouch_pattern(1, page));
        assert_eq!(page_word(&b, page), memtouch_pattern(2, page));
        assert_eq!(
            page_word(&parent, page),
            0,
            "a child's write reached the parent"
        );
    }
    // The parent writes after the fork: invisible to the children.
    run_memtouch(&parent, 3);
    assert_eq!(page_word(&parent, 0), memtouch_pattern(3, 0));
    assert_eq!(page_word(&a, 0), memtouch_pattern(1, 0));
    parent.ram().write_u64(0x50_0000, 77).unwrap();
    assert_eq!(a.ram().read_u64(0x50_0000).unwrap(), 0);
    assert_eq!(a.serial().unwrap().text(), "memtouch done 16\n");
    assert!(a.is_fork() && !parent.is_fork());
    assert_eq!(a.parent_id(), Some(parent.id()));
}

#[test]
fn fork_of_fork_sees_every_ancestor_up_to_its_fork_instant() {
    let root = memtouch_parent();
    root.ram().write_u64(0x60_0000, 0xAAAA).unwrap();
    let child = root.fork(&ForkOptions::default()).unwrap();
    root.ram().write_u64(0x60_0000, 0xDEAD).unwrap(); // after the fork: not seen
    run_memtouch(&child, 5); // guest writes in the child
    child.ram().write_u64(0x60_1000, 0xBBBB).unwrap(); // VMM write in the child
    let grandchild = child.fork(&ForkOptions::default()).unwrap();
    child.ram().write_u64(0x60_2000, 0xCCCC).unwrap(); // after: not seen
    child.ram().write_u64(MEMTOUCH_BASE + 3 * 4096, 6).unwrap();

    assert_eq!(grandchild.ram().read_u64(0x60_0000).unwrap(), 0xAAAA);
    assert_eq!(grandchild.ram().read_u64(0x60_1000).unwrap(), 0xBBBB);
    assert_eq!(grandchild.ram().read_u64(0x60_2000).unwrap(), 0);
    assert_eq!(page_word(&grandchild, 3), memtouch_pattern(5, 3));
    // And a great-grandchild of the grandchild, after the grandchild wrote too.
    grandchild.ram().write_u64(0x60_3000, 0xDDDD).unwrap();
    let great = grandchild.fork(&ForkOptions::default()).unwrap();
    assert_eq!(great.ram().read_u64(0x60_3000).unwrap(), 0xDDDD);
    assert_eq!(great.ram().read_u64(0x60_1000).unwrap(), 0xBBBB);
    // Resetting the grandchild returns it to its own fork instant, not the root's.
    grandchild.reset().unwrap();
    assert_eq!(grandchild.ram().read_u64(0x60_3000).unwrap(), 0);
    assert_eq!(page_word(&grandchild, 3), memtouch_pattern(5, 3));
}

#[test]
fn reset_restores_memory_and_registers_bit_for_bit_over_1000_resets() {
    let parent = memtouch_parent();
    let fork = parent.fork(&ForkOptions::default()).unwrap();
    let hash0 = ram_hash(&fork);
    let regs0 = fork.registers(0).unwrap();
    let state0 = fork.vcpu_state(0).unwrap();
    for i in 0..1000u64 {
        run_memtouch(&fork, i + 1);
        assert_eq!(
            page_word(&fork, PAGES - 1),
            memtouch_pattern(i + 1, PAGES - 1)
        );
        let stats = fork.reset().unwrap();
        // 16 pages, the mailbox, the stack.
        assert!(stats.pages_restored >= PAGES as usize, "{stats:?}");
        assert_eq!(
            fork.registers(0).unwrap(),
            regs0,
            "registers differ after reset {i}"
        );
        assert_eq!(page_word(&fork, 0), 0);
        if i % 250 == 0 || i == 999 {
            assert_eq!(ram_hash(&fork), hash0, "RAM differs after reset {i}");
            let s = fork.vcpu_state(0).unwrap();
            assert_eq!(s.xsave, state0.xsave);
            assert_eq!(s.sregs, state0.sregs);
        }
    }
    // A fork of the parent made now is identical to the reset fork.
    let fresh = parent.fork(&ForkOptions::default()).unwrap();
    assert_eq!(ram_hash(&fresh), hash0);
}

#[test]
fn reset_scopes_restore_only_what_they_name() {
    let parent = memtouch_parent();
    let fork = parent.fork(&ForkOptions::default()).unwrap();
    let regs0 = fork.registers(0).unwrap();
    run_memtouch(&fork, 9);
    let after_run = fork.registers(0).unwrap();
    fork.reset_with(ResetScope::MemoryOnly).unwrap();
    assert_eq!(page_word(&fork, 0), 0);
    assert_eq!(fork.registers(0).unwrap(), after_run);
    run_memtouch_without_rerun_check(&fork);
    fork.reset_with(ResetScope::StateOnly).unwrap();
    assert_eq!(fork.registers(0).unwrap(), regs0);
}

fn run_memtouch_without_rerun_check(vm: &Vm) {
    vm.ram().write_u64(MEMTOUCH_BASE, 1234).unwrap();
}

#[test]
fn forks_of_a_running_counter_continue_from_the_fork_point() {
    let (parent, _) = guest_vm(Workload::Counter, config(32), &counter_params(100_000));
    parent.start().unwrap();
    wait_for_progress(&parent, 4);
    let child = parent.fork(&ForkOptions::default()).unwrap();
    assert_eq!(parent.status(), vmfork::VmStatus::Running);
    let at_fork = child.ram().read_u64(MAILBOX + mailbox::PROGRESS).unwrap();
    set(&child, mailbox::PARAM2, at_fork + 3); // stop three numbers later
    child.start().unwrap();
    assert_eq!(child.wait_timeout(QUICK).unwrap(), ExitReason::GuestExit(0));
    let text = child.serial().unwrap().text();
    // The fork may have caught the guest between storing N and printing it, or in the middle
    // of printing a line (the child then prints the rest of it): skip a partial first line.
    let numbers: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("counter ")?.parse().ok())
        .collect();
    assert!(numbers[0] == at_fork || numbers[0] == at_fork + 1, "{text}");
    assert_eq!(*numbers.last().unwrap(), at_fork + 3, "{text}");
    // The parent kept counting on its own.
    let p = parent.ram().read_u64(MAILBOX + mailbox::PROGRESS).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(parent.ram().read_u64(MAILBOX + mailbox::PROGRESS).unwrap() > p);
    parent.stop();
    parent.wait();
}

#[test]
fn block_interrupts_forks_start_and_reset_with_every_line_masked() {
    let cfg = VmConfig {
        irqchip: true,
        ..config(16)
    };
    let (parent, _) = guest_vm(Workload::Memtouch, cfg, &[(mailbox::PARAM0, PAGES)]);
    let masked = |vm: &Vm| {
        let chip = vm.irqchip_state().unwrap().expect("irqchip");
        let lapic = vm.vcpu_state(0).unwrap().local_interrupts_masked();
        (chip.all_lines_masked(), lapic)
    };
    assert_eq!(masked(&parent), (false, false));
    let opts = ForkOptions {
        block_interrupts: true,
        ..ForkOptions::default()
    };
    let fork = parent.fork(&opts).unwrap();
    assert_eq!(masked(&fork), (true, true));
    run_memtouch(&fork, 2);
    fork.reset().unwrap();
    assert_eq!(
        masked(&fork),
        (true, true),
        "a reset keeps interrupts blocked"
    );
    assert_eq!(masked(&parent), (false, false), "the parent is untouched");
    let plain = parent.fork(&ForkOptions::default()).unwrap();
    assert_eq!(masked(&plain), (false, false));
}

#[test]
fn children_survive_the_parent_and_no_device_forks_attach_later() {
    let parent = memtouch_parent();
    let opts = ForkOptions {
        no_devices: true,
        block_interrupts: true,
        ..ForkOptions::default()
    };
    let child = parent.fork(&opts).unwrap();
    drop(parent);
    run_memtouch(&child, 4); // exit port works without devices
    assert_eq!(
        child.serial().unwrap().text(),
        "",
        "no serial before attach"
    );
    assert_eq!(page_word(&child, 1), memtouch_pattern(4, 1));
    child.reset().unwrap();
    let (sink, serial) = SerialSink::buffer();
    child.attach_devices(sink).unwrap();
    let err = child
        .attach_devices(SerialSink::Discard)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already attached"), "{err}");
    run_memtouch(&child, 4);
    assert_eq!(serial.text(), "memtouch done 16\n");

    let (harness, _) = guest_vm(
        Workload::Harness,
        VmConfig {
            irqchip: false,
            ..config(16)
        },
        &[],
    );
    let fork = harness.fork(&opts).unwrap();
    fork.ram().write(guests::layout::INPUT, b"FU").unwrap();
    set(&fork, mailbox::INPUT_LEN, 2);
    assert_eq!(fork.run_inline().unwrap(), ExitReason::GuestExit(2));
}

#[test]
fn reset_and_fork_refuse_what_they_cannot_do() {
    let parent = memtouch_parent();
    let err = parent.reset().unwrap_err().to_string();
    assert!(err.contains("not a fork"), "{err}");
    let (spin, _) = guest_vm(Workload::Spin, config(16), &[]);
    let fork = spin.fork(&ForkOptions::default()).unwrap();
    fork.start().unwrap();
    assert!(fork.reset().unwrap_err().to_string().contains("running"));
    fork.stop();
    fork.wait();
    spin.stop();
    assert!(
        spin.fork(&ForkOptions::default()).is_err(),
        "fork of a stopped VM"
    );
}

#[test]
fn forks_on_recycled_shells_start_clean() {
    // Shells of destroyed forks are reused (memslots, RAM range and RAM mapping kept): a new
    // fork must see only its parent's memory and state, nothing of the fork that used the shell
    // before, whether that fork was of the same family or of another.
    let cfg = VmConfig {
        irqchip: true,
        ..config(16)
    };
    let (parent, _) = guest_vm(Workload::Memtouch, cfg.clone(), &[(mailbox::PARAM0, PAGES)]);
    let (other, _) = guest_vm(Workload::Memtouch, cfg, &[(mailbox::PARAM0, PAGES)]);
    other.ram().write_u64(0x30_0000, 0xfeed).unwrap();
    let pristine = parent.fork(&ForkOptions::default()).unwrap();
    let expected = ram_hash(&pristine);
    let regs = pristine.registers(0).unwrap();
    drop(pristine);
    let other_expected = ram_hash(&other.fork(&ForkOptions::default()).unwrap());
    for seed in 1..=20 {
        let fork = parent.fork(&ForkOptions::default()).unwrap();
        assert_eq!(ram_hash(&fork), expected, "fork {seed} sees old memory");
        let now = fork.registers(0).unwrap();
        assert_eq!(now.regs.rip, regs.regs.rip);
        assert_eq!(now.regs.rsp, regs.regs.rsp);
        run_memtouch(&fork, seed);
        assert_eq!(page_word(&fork, 3), memtouch_pattern(seed, 3));
        assert!(fork.reset().unwrap().pages_restored as u64 >= PAGES);
        run_memtouch(&fork, seed);
        // The VMM's own writes must be undone for the shell's next VM too.
        fork.ram().write_u64(0x20_0000 + seed * 4096, seed).unwrap();
        drop(fork);
        if seed % 5 == 0 {
            let stranger = other.fork(&ForkOptions::default()).unwrap();
            assert_eq!(
                ram_hash(&stranger),
                other_expected,
                "fork of another family"
            );
            run_memtouch(&stranger, seed);
        }
    }
    let idle: usize = vmfork::vm::pool::idle_shells().iter().map(|s| s.3).sum();
    assert!(idle >= 1, "destroyed forks should leave shells in the pool");
}

#[test]
fn idle_guests_wake_on_timer_interrupts_and_blocked_forks_stay_asleep() {
    // A 1 ms LAPIC timer (count 1,000,000 at KVM's 1 GHz APIC clock, divide by 1).
    let (parent, _) = guest_vm(Workload::Idle, config(16), &[(mailbox::PARAM0, 1_000_000)]);
    parent.start().unwrap();
    let woke = wait_for_progress(&parent, 20);
    assert_eq!(parent.status(), vmfork::VmStatus::Running);
    let child = parent.fork(&ForkOptions::default()).unwrap();
    let at_fork = progress(&child);
    assert!(at_fork >= woke);
    child.start().unwrap();
    wait_for_progress(&child, at_fork + 20);
    let blocked = parent
        .fork(&ForkOptions {
            block_interrupts: true,
            ..ForkOptions::default()
        })
        .unwrap();
    let frozen_at = progress(&blocked);
    blocked.start().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        progress(&blocked),
        frozen_at,
        "a fork with interrupts blocked was woken"
    );
    // The parent kept counting meanwhile.
    assert!(progress(&parent) > at_fork);
    for vm in [&parent, &child, &blocked] {
        vm.stop();
    }
}

#[test]
fn deep_generation_chains_are_merged_and_forks_stay_exact() {
    let parent = memtouch_parent();
    drop(parent.fork(&ForkOptions::default()).unwrap());
    // Each generation writes its own pages (VMM writes, as a debugger would): a layer per
    // generation that no later one covers.
    let mut kids = Vec::new();
    for g in 0..12u64 {
        for p in 0..5 {
            let addr = 0x60_0000 + (g * 8 + p) * 4096;
            parent.ram().write_u64(addr, g * 100 + p + 1).unwrap();
        }
        let child = parent.fork(&ForkOptions::default()).unwrap();
        assert_eq!(ram_hash(&child), ram_hash(&parent), "generation {g}");
        kids.push(child);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // Twelve generations of disjoint pages would stack twelve layers; merging keeps it at 8 or
    // fewer.
    while parent.image_layers() > 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "never merged: {} layers",
            parent.image_layers()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Forks of the merged image are the parent exactly, and so are the older children still.
    parent.ram().write_u64(0x70_0000, 42).unwrap();
    let after = parent.fork(&ForkOptions::default()).unwrap();
    assert_eq!(ram_hash(&after), ram_hash(&parent));
    assert_eq!(
        kids[11].ram().read_u64(0x60_0000 + 11 * 8 * 4096).unwrap(),
        1101
    );
    assert_eq!(
        kids[3].ram().read_u64(0x60_0000 + 11 * 8 * 4096).unwrap(),
        0
    );
}

#[test]
fn scattered_writes_past_the_run_limit_are_copied_into_forks_exactly() {
    let parent = memtouch_parent();
    drop(parent.fork(&ForkOptions::default()).unwrap());
    // 700 pages, every other one: 700 runs, over the 512 a VM maps; the image is copied into
    // each child instead, and the writer keeps its private copies.
    for i in 0..700u64 {
        parent
            .ram()
            .write_u64(0x40_0000 + i * 2 * 4096, i + 1)
            .unwrap();
    }
    let a = parent.fork(&ForkOptions::default()).unwrap();
    assert_eq!(ram_hash(&a), ram_hash(&parent));
    // The child writes, resets, and is the fork instant again; a sibling is unaffected.
    a.ram().write_u64(0x40_0000, 999).unwrap();
    let b = parent.fork(&ForkOptions::default()).unwrap();
    assert_eq!(b.ram().read_u64(0x40_0000).unwrap(), 1);
    a.reset().unwrap();
    assert_eq!(ram_hash(&a), ram_hash(&parent));
    // Recycled shells that held such a view start clean for the next fork of the family.
    drop((a, b));
    parent.ram().write_u64(0x40_0000 + 4096, 5).unwrap();
    for _ in 0..4 {
        let c = parent.fork(&ForkOptions::default()).unwrap();
        assert_eq!(ram_hash(&c), ram_hash(&parent));
    }
}
