//! Devices seen from inside a guest: the `entropy` test driver (CPL3, polling) sets up the
//! virtio-rng on virtio-mmio, reads random bytes and the generation id, writes the ready port,
//! and reads both again. Forks and restores must get a new generation id (resets keep the
//! fork's), random bytes of their own, and a virtqueue that carries on where the parent's was.

mod common;

use common::*;
use guests::drivers::ENTROPY_SECOND_BUFFER;
use guests::layout::{mailbox, DMA_BUFFER, MAILBOX};
use guests::Workload;
use std::time::Duration;
use vmfork::{ExitReason, ForkOptions, Vm};

const BYTES: u64 = 4096;

fn mailbox_u128(vm: &Vm, field: u64) -> u128 {
    let low = vm.ram().read_u64(MAILBOX + field).unwrap();
    let high = vm.ram().read_u64(MAILBOX + field + 8).unwrap();
    u128::from(low) | u128::from(high) << 64
}

fn mailbox_u64(vm: &Vm, field: u64) -> u64 {
    vm.ram().read_u64(MAILBOX + field).unwrap()
}

fn bytes_at(vm: &Vm, addr: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BYTES as usize];
    vm.ram().read(addr, &mut buf).unwrap();
    buf
}

/// A buffer of random bytes: not all one value, and not mostly zero.
fn looks_random(bytes: &[u8]) -> bool {
    let zeros = bytes.iter().filter(|&&b| b == 0).count();
    zeros < bytes.len() / 64 && bytes.windows(2).any(|w| w[0] != w[1])
}

/// The entropy driver, run to its ready port: the rng set up and used once.
fn at_ready() -> Vm {
    let (vm, _) = guest_vm(Workload::Entropy, config(16), &[(mailbox::PARAM0, BYTES)]);
    vm.run_to_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(mailbox_u64(&vm, mailbox::USED_LEN_BEFORE), BYTES);
    assert!(looks_random(&bytes_at(&vm, DMA_BUFFER)));
    vm
}

fn finish(vm: &Vm) {
    assert_eq!(run_to_exit(vm), ExitReason::GuestExit(0));
    assert_eq!(mailbox_u64(vm, mailbox::USED_LEN_AFTER), BYTES);
    assert!(looks_random(&bytes_at(vm, ENTROPY_SECOND_BUFFER)));
}

#[test]
fn a_guest_driver_reads_random_bytes_and_the_generation_id() {
    let vm = at_ready();
    let before = mailbox_u128(&vm, mailbox::GENERATION_BEFORE);
    assert_ne!(before, 0);
    assert_eq!(u128::from_le_bytes(vm.device_state().generation.id), before);
    finish(&vm);
    // The VM itself did not change generation between its two reads.
    assert_eq!(mailbox_u128(&vm, mailbox::GENERATION_AFTER), before);
    assert_ne!(
        bytes_at(&vm, DMA_BUFFER),
        bytes_at(&vm, ENTROPY_SECOND_BUFFER)
    );
}

#[test]
fn every_fork_is_a_new_generation_with_its_own_randomness_and_its_resets_keep_it() {
    let parent = at_ready();
    let generation = mailbox_u128(&parent, mailbox::GENERATION_BEFORE);
    let mut seen = vec![generation];
    let mut second_buffers = Vec::new();
    for _ in 0..3 {
        let child = parent.fork(&ForkOptions::default()).unwrap();
        finish(&child);
        let after = mailbox_u128(&child, mailbox::GENERATION_AFTER);
        assert!(!seen.contains(&after), "a fork reused a generation id");
        // The first request's bytes are the parent's (in the image); the second its own.
        assert_eq!(bytes_at(&child, DMA_BUFFER), bytes_at(&parent, DMA_BUFFER));
        let own = bytes_at(&child, ENTROPY_SECOND_BUFFER);
        assert!(!second_buffers.contains(&own));
        second_buffers.push(own);
        // A reset returns to the fork's instant: its generation, fresh bytes again.
        child.reset().unwrap();
        finish(&child);
        assert_eq!(mailbox_u128(&child, mailbox::GENERATION_AFTER), after);
        // A fork of the fork is a generation of its own.
        seen.push(after);
        let grandchild = child.fork(&ForkOptions::default()).unwrap();
        assert!(!seen.contains(&u128::from_le_bytes(
            grandchild.device_state().generation.id
        )));
        seen.push(u128::from_le_bytes(grandchild.device_state().generation.id));
    }
    // The parent carries on with its own generation.
    finish(&parent);
    assert_eq!(mailbox_u128(&parent, mailbox::GENERATION_AFTER), generation);
}

#[test]
fn a_restored_guest_carries_on_with_its_virtqueue_and_a_new_generation() {
    let vm = at_ready();
    let generation = mailbox_u128(&vm, mailbox::GENERATION_BEFORE);
    let saved = vm.device_state();
    assert_eq!(saved.virtio.len(), 1);
    assert_eq!(saved.virtio[0].queues[0].next_used, 1);
    let dir = temp_dir("devices-restore");
    let restored = snapshot_and_restore(&vm, &dir.join("snap"));
    let state = restored.device_state();
    assert_eq!(state.virtio, saved.virtio);
    assert_ne!(state.generation.id, saved.generation.id);
    finish(&restored);
    assert_ne!(
        mailbox_u128(&restored, mailbox::GENERATION_AFTER),
        generation
    );
    assert_eq!(restored.device_state().virtio[0].queues[0].next_used, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn device_interrupts_reach_a_guest_that_takes_them_and_each_fork_gets_its_own() {
    // The `interrupts` guest (ring 0) routes the lines through the IOAPIC as a kernel does:
    // the rng's used-buffer interrupt and the keyboard's arrive; a fork's new generation id
    // raises the fork's line, not the parent's.
    use guests::drivers::{irq_vector, GENERATION_GSI, IRQ_COUNTS, KEYBOARD_GSI, VIRTIO_SLOT0_GSI};
    let count = |vm: &Vm, gsi: u32| mailbox_u64(vm, IRQ_COUNTS + u64::from(irq_vector(gsi)) * 8);
    let (parent, _) = guest_vm(Workload::Interrupts, config(16), &[]);
    parent.run_to_ready(Duration::from_secs(20)).unwrap();
    // The i8042 keyboard answered its reset (ACK, self test passed), a byte per interrupt.
    assert_eq!(
        mailbox_u64(&parent, mailbox::KEYBOARD_ANSWER) & 0xffff,
        0xaafa
    );
    assert_eq!(count(&parent, KEYBOARD_GSI), 2);
    assert_eq!(mailbox_u64(&parent, mailbox::USED_LEN_BEFORE), 64);
    // (64 random bytes hold a zero one time in five: `looks_random` is for 4 KiB.)
    let random = &bytes_at(&parent, DMA_BUFFER)[..64];
    assert!(
        random.iter().filter(|&&b| b == 0).count() < 8 && random.windows(2).any(|w| w[0] != w[1])
    );
    assert_eq!(count(&parent, VIRTIO_SLOT0_GSI), 1, "the rng's interrupt");
    assert_eq!(count(&parent, GENERATION_GSI), 0);
    assert_eq!(
        mailbox_u64(&parent, mailbox::PROGRESS),
        0,
        "no other vector"
    );
    let children: Vec<Vm> = (0..2)
        .map(|_| parent.fork(&ForkOptions::default()).unwrap())
        .collect();
    for child in &children {
        child.start().unwrap();
    }
    for (i, child) in children.iter().enumerate() {
        let exit = child
            .wait_timeout(Duration::from_secs(60))
            .expect("the child exits");
        assert_eq!(exit, ExitReason::GuestExit(0), "child {i}");
        assert_eq!(
            count(child, GENERATION_GSI),
            1,
            "child {i}: one generation interrupt"
        );
        assert_eq!(
            count(child, VIRTIO_SLOT0_GSI),
            1,
            "child {i}: the parent's, inherited"
        );
    }
    // The parent halts on: its generation did not change, and nothing of its children's
    // reached it.
    parent.start().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&parent, GENERATION_GSI), 0);
    assert_eq!(parent.status(), vmfork::VmStatus::Running);
    parent.stop();
}

#[test]
fn a_restored_guest_takes_its_new_generations_interrupt() {
    use guests::drivers::{irq_vector, GENERATION_GSI, IRQ_COUNTS};
    let count = |vm: &Vm| mailbox_u64(vm, IRQ_COUNTS + u64::from(irq_vector(GENERATION_GSI)) * 8);
    let dir = temp_dir("restore-generation-irq");
    let (parent, _) = guest_vm(Workload::Interrupts, config(16), &[]);
    parent.run_to_ready(Duration::from_secs(20)).unwrap();
    let restored = snapshot_and_restore(&parent, &dir.join("s"));
    restored.start().unwrap();
    let exit = restored.wait_timeout(Duration::from_secs(20));
    assert_eq!(
        exit,
        Some(ExitReason::GuestExit(0)),
        "no generation interrupt"
    );
    assert_eq!(count(&restored), 1);
    std::fs::remove_dir_all(dir).unwrap();
}
