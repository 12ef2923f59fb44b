//! virtio-blk seen from inside a guest: the `disk` test driver (CPL3, polling) reads and writes
//! sectors. The image file is never written; each fork sees the disk as of its fork instant and
//! only its own writes after it; a reset drops them; read-only disks refuse writes; bad disk
//! images are clear errors.

mod common;

use common::*;
use guests::drivers::{disk_buffers::*, DISK_FAILED_STEP, DISK_SECTOR_AFTER};
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmfork::devices::DiskConfig;
use vmfork::{ExitReason, ForkOptions, Vm, VmConfig};

const IMAGE_BYTES: usize = 1 << 20;
const BEFORE: u64 = 0x1111_2222_3333_4444;

/// A 1 MiB image whose every byte depends on its offset.
fn image(name: &str) -> (PathBuf, Vec<u8>) {
    let dir = temp_dir(name);
    let path = dir.join("disk.img");
    let bytes: Vec<u8> = (0..IMAGE_BYTES).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

fn disk_config(path: &Path, read_only: bool) -> VmConfig {
    VmConfig {
        disks: vec![DiskConfig {
            path: path.to_path_buf(),
            read_only,
        }],
        ..config(16)
    }
}

fn read(vm: &Vm, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    vm.ram().read(addr, &mut buf).unwrap();
    buf
}

fn sector(image: &[u8], n: u64) -> Vec<u8> {
    image[n as usize * 512..][..4096].to_vec()
}

fn stamp(value: u64) -> Vec<u8> {
    value.to_le_bytes().repeat(512)
}

fn run_after_ready(vm: &Vm, after: u64) -> ExitReason {
    vm.ram()
        .write_u64(MAILBOX + mailbox::PARAM2, after)
        .unwrap();
    run_to_exit(vm)
}

#[test]
fn a_guest_reads_and_writes_its_disk_and_the_image_is_never_written() {
    let (path, bytes) = image("disk-rw");
    let (vm, _) = guest_vm(
        Workload::Disk,
        disk_config(&path, false),
        &[(mailbox::PARAM0, 0x1_0000), (mailbox::PARAM1, BEFORE)],
    );
    vm.run_to_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(run_after_ready(&vm, 77), ExitReason::GuestExit(0));
    let capacity = vm.ram().read_u64(MAILBOX + mailbox::DISK_CAPACITY).unwrap();
    assert_eq!(capacity, (IMAGE_BYTES / 512) as u64);
    assert_eq!(read(&vm, FIRST_READ, 0x1_0000), bytes[..0x1_0000]);
    assert_eq!(read(&vm, READ_BACK_BEFORE, 4096), stamp(BEFORE));
    assert_eq!(read(&vm, REREAD_BEFORE, 4096), stamp(BEFORE));
    assert_eq!(
        read(&vm, FOUND_AFTER, 4096),
        sector(&bytes, DISK_SECTOR_AFTER)
    );
    assert_eq!(read(&vm, READ_BACK_AFTER, 4096), stamp(77));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the image file was written"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn forks_see_only_their_own_disk_writes_and_a_reset_drops_them() {
    let (path, bytes) = image("disk-forks");
    let (parent, _) = guest_vm(
        Workload::Disk,
        disk_config(&path, false),
        &[(mailbox::PARAM1, BEFORE)],
    );
    parent.run_to_ready(Duration::from_secs(30)).unwrap();
    let children: Vec<Vm> = (0..3)
        .map(|_| parent.fork(&ForkOptions::default()).unwrap())
        .collect();
    for (i, child) in children.iter().enumerate() {
        let own = 1000 + i as u64;
        assert_eq!(run_after_ready(child, own), ExitReason::GuestExit(0));
        // The parent's write before the fork is on the child's disk; no sibling's write is.
        assert_eq!(read(child, REREAD_BEFORE, 4096), stamp(BEFORE));
        assert_eq!(
            read(child, FOUND_AFTER, 4096),
            sector(&bytes, DISK_SECTOR_AFTER),
            "child {i} saw a sibling's write"
        );
        assert_eq!(read(child, READ_BACK_AFTER, 4096), stamp(own));
    }
    // A reset drops the fork's disk writes with its memory: sector 16 is the image's again.
    let child = &children[0];
    child.reset().unwrap();
    assert_eq!(run_after_ready(child, 5000), ExitReason::GuestExit(0));
    assert_eq!(
        read(child, FOUND_AFTER, 4096),
        sector(&bytes, DISK_SECTOR_AFTER)
    );
    assert_eq!(read(child, READ_BACK_AFTER, 4096), stamp(5000));
    // The parent goes on unaffected by its children, and a fork of a fork sees its parent's
    // writes up to its fork instant.
    assert_eq!(run_after_ready(&parent, 9), ExitReason::GuestExit(0));
    assert_eq!(
        read(&parent, FOUND_AFTER, 4096),
        sector(&bytes, DISK_SECTOR_AFTER)
    );
    let grandchild = children[1].fork(&ForkOptions::default()).unwrap();
    assert_eq!(grandchild.status(), vmfork::VmStatus::Created);
    assert_eq!(grandchild.device_state().disks().len(), 1);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the image file was written"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let (path, bytes) = image("disk-ro");
    let (vm, _) = guest_vm(Workload::Disk, disk_config(&path, true), &[]);
    // The first read works; the write (step 2) ends with VIRTIO_BLK_S_IOERR.
    assert_eq!(
        run_to_exit(&vm),
        ExitReason::GuestExit(DISK_FAILED_STEP + 2)
    );
    assert_eq!(
        vm.ram().read_u64(MAILBOX + mailbox::DISK_STATUS).unwrap(),
        1
    );
    assert_eq!(read(&vm, FIRST_READ, 4096), bytes[..4096]);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn disk_images_that_cannot_be_used_are_clear_errors() {
    let dir = temp_dir("disk-bad");
    let fifo = dir.join("fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let tiny = dir.join("tiny.img");
    std::fs::write(&tiny, [0u8; 100]).unwrap();
    for (path, why) in [
        (dir.join("missing.img"), "No such file"),
        (fifo, "not a regular file"),
        (tiny, "no whole 512-byte sector"),
        (PathBuf::from("/dev/zero"), "not a regular file"),
    ] {
        let err = Vm::new(
            disk_config(&path, false),
            vmfork::devices::SerialSink::Discard,
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(err.contains(why), "{}: {err}", path.display());
    }
    let (path, _) = image("disk-many");
    let many = VmConfig {
        disks: vec![
            DiskConfig {
                path: path.clone(),
                read_only: true
            };
            8
        ],
        ..config(16)
    };
    let err = Vm::new(many, vmfork::devices::SerialSink::Discard)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("at most 7"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn snapshots_carry_the_disk_as_of_their_memory_instant() {
    let (path, bytes) = image("disk-snap");
    let dir = temp_dir("disk-snap-dirs");
    let (vm, _) = guest_vm(
        Workload::Disk,
        disk_config(&path, false),
        &[(mailbox::PARAM1, BEFORE)],
    );
    vm.run_to_ready(Duration::from_secs(30)).unwrap();
    vm.snapshot(&dir.join("first"), &vmfork::SnapshotOptions::default())
        .unwrap();
    // Only the written chunks are in the snapshot's disk file (sparse, as large as the disk).
    let disk_file = dir.join("first/disk-1.bin");
    let meta = std::fs::metadata(&disk_file).unwrap();
    assert_eq!(meta.len(), IMAGE_BYTES as u64);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 <= 64 << 10,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    // The VM goes on writing after the snapshot: none of it is in the snapshot.
    assert_eq!(run_after_ready(&vm, 9), ExitReason::GuestExit(0));
    let snap = vmfork::Snapshot::open(&dir.join("first")).unwrap();
    for own in [21, 22] {
        let restored = snap.restore(vmfork::devices::SerialSink::Discard).unwrap();
        assert_eq!(run_after_ready(&restored, own), ExitReason::GuestExit(0));
        assert_eq!(read(&restored, REREAD_BEFORE, 4096), stamp(BEFORE));
        assert_eq!(
            read(&restored, FOUND_AFTER, 4096),
            sector(&bytes, DISK_SECTOR_AFTER),
            "a write made after the snapshot, or by another restore, is on the disk"
        );
        assert_eq!(read(&restored, READ_BACK_AFTER, 4096), stamp(own));
        // A snapshot of the restored VM holds its writes and the first snapshot's.
        let second = dir.join(format!("second-{own}"));
        restored
            .snapshot(&second, &vmfork::SnapshotOptions::default())
            .unwrap();
        let again = vmfork::Snapshot::open(&second)
            .unwrap()
            .restore(vmfork::devices::SerialSink::Discard)
            .unwrap();
        assert_eq!(again.device_state().disks().len(), 1);
        // Its guest has exited; fork it and check its disk through a fresh reader: the VMM's
        // view of the restored disk.
        let state = again.device_state();
        let vmfork::devices::virtio::DeviceSpecific::Block(block) = &state.virtio[1].device else {
            panic!("slot 1 is not a disk")
        };
        let instant = block.instant.clone().unwrap();
        let disk = vmfork::devices::virtio::block::disk::Disk::new(instant);
        let mut buf = vec![0u8; 4096];
        disk.read(DISK_SECTOR_AFTER * 512, &mut buf).unwrap();
        assert_eq!(buf, stamp(own));
        disk.read(8 * 512, &mut buf).unwrap();
        assert_eq!(buf, stamp(BEFORE));
    }
    // An image changed after the snapshot is refused at restore.
    let mut changed = bytes.clone();
    changed[0] ^= 1;
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&path, &changed).unwrap();
    let err = vmfork::Snapshot::open(&dir.join("first"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("modified"), "{err}");
    std::fs::remove_file(&path).unwrap();
    let err = vmfork::Snapshot::open(&dir.join("first"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("disk 1"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// The slot-1 disk of `vm` as the VMM sees it, read at `sector`.
fn vmm_read(vm: &Vm, sector: u64) -> Vec<u8> {
    let state = vm.device_state();
    let vmfork::devices::virtio::DeviceSpecific::Block(block) = &state.virtio[1].device else {
        panic!("slot 1 is not a disk")
    };
    let disk = vmfork::devices::virtio::block::disk::Disk::new(block.instant.clone().unwrap());
    let mut buf = vec![0u8; 4096];
    disk.read(sector * 512, &mut buf).unwrap();
    buf
}

/// `stream` with its records transformed by `f`.
fn rewrite_stream(stream: &[u8], f: impl FnOnce(&mut Vec<vmfork_format::Record>)) -> Vec<u8> {
    let (header, mut records) = vmfork_format::Reader::new(stream)
        .unwrap()
        .read_all()
        .unwrap();
    f(&mut records);
    let mut w = vmfork_format::Writer::new(Vec::new(), &header).unwrap();
    for r in &records {
        w.record(r.kind, r.instance, r.flags, &r.body).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn streams_carry_the_disk_as_of_their_memory_instant() {
    // What a migration sends: memory and the disk's writes in one stream; the image is found
    // again at its path on the receiving side.
    let (path, bytes) = image("disk-stream");
    let (vm, _) = guest_vm(
        Workload::Disk,
        disk_config(&path, false),
        &[(mailbox::PARAM1, BEFORE)],
    );
    vm.run_to_ready(Duration::from_secs(30)).unwrap();
    let mut stream = Vec::new();
    vm.snapshot_to_stream(&mut stream).unwrap();
    let chunk_records = |s: &[u8]| {
        vmfork_format::Reader::new(s)
            .unwrap()
            .read_all()
            .unwrap()
            .1
            .iter()
            .filter(|r| r.known_type() == Some(vmfork_format::RecordType::DiskChunks))
            .count()
    };
    assert!(chunk_records(&stream) >= 1);
    // The VM goes on writing after the snapshot: none of it is in the stream.
    assert_eq!(run_after_ready(&vm, 9), ExitReason::GuestExit(0));
    let snap = vmfork::Snapshot::from_stream(Path::new("-"), stream.as_slice()).unwrap();
    let restored = snap.restore(vmfork::devices::SerialSink::Discard).unwrap();
    assert_eq!(run_after_ready(&restored, 31), ExitReason::GuestExit(0));
    assert_eq!(read(&restored, REREAD_BEFORE, 4096), stamp(BEFORE));
    assert_eq!(
        read(&restored, FOUND_AFTER, 4096),
        sector(&bytes, DISK_SECTOR_AFTER),
        "a write the source made after the snapshot is on the disk"
    );
    assert_eq!(read(&restored, READ_BACK_AFTER, 4096), stamp(31));
    // Streamed on again (a second hop): both generations' writes arrive.
    let mut again = Vec::new();
    restored.snapshot_to_stream(&mut again).unwrap();
    let hop = vmfork::Snapshot::from_stream(Path::new("-"), again.as_slice())
        .unwrap()
        .restore(vmfork::devices::SerialSink::Discard)
        .unwrap();
    assert_eq!(vmm_read(&hop, DISK_SECTOR_AFTER), stamp(31));
    assert_eq!(vmm_read(&hop, 8), stamp(BEFORE));

    // Hostile or damaged streams: chunks for a slot without a disk, past the disk's end, the
    // same chunk twice, a body that is not whole chunks.
    let chunks = |instance: u32, first: u64, count: u64, extra: usize| {
        let mut body = first.to_le_bytes().to_vec();
        body.extend_from_slice(&count.to_le_bytes());
        body.resize(16 + count as usize * 4096 + extra, 0xab);
        vmfork_format::Record {
            kind: vmfork_format::RecordType::DiskChunks as u32,
            instance,
            flags: 0,
            offset: 0,
            body,
        }
    };
    for (record, expected) in [
        (chunks(3, 0, 1, 0), "no disk"),
        (
            chunks(1, (IMAGE_BYTES / 4096) as u64, 1, 0),
            "past the disk",
        ),
        (chunks(1, 1, 1, 0), "twice"),
        (chunks(1, 100, 1, 7), "malformed"),
        (chunks(1, u64::MAX, 2, 0), "malformed"),
    ] {
        let bad = rewrite_stream(&stream, |records| {
            let end = records.len() - 1;
            records.insert(end, record);
        });
        let err = vmfork::Snapshot::from_stream(Path::new("-"), bad.as_slice())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{expected}: {err}");
    }
    // An image changed since is refused, as for directories.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&path, &bytes).unwrap();
    let err = vmfork::Snapshot::from_stream(Path::new("-"), stream.as_slice())
        .unwrap_err()
        .to_string();
    assert!(err.contains("modified"), "{err}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// The chunk runs a snapshot's disk file in slot 1 holds.
fn disk_file_runs(dir: &Path) -> Vec<(u64, u64)> {
    let snap = vmfork::Snapshot::open(dir).unwrap();
    let vmfork::devices::virtio::DeviceSpecific::Block(block) =
        &snap.loaded().state.devices.virtio[1].device
    else {
        panic!("slot 1 is not a disk")
    };
    block.overlay.as_ref().unwrap().runs.clone()
}

#[test]
fn diff_snapshots_hold_only_the_disk_chunks_written_since_their_base() {
    let (path, bytes) = image("disk-diff");
    let dir = temp_dir("disk-diff-dirs");
    let full = vmfork::SnapshotOptions::default();
    let diff = vmfork::SnapshotOptions { diff: true };
    let (vm, _) = guest_vm(
        Workload::Disk,
        disk_config(&path, false),
        &[(mailbox::PARAM1, BEFORE)],
    );
    vm.run_to_ready(Duration::from_secs(30)).unwrap();
    // The guest wrote chunk 1 (sector 8) before its ready point.
    vm.snapshot(&dir.join("s0"), &full).unwrap();
    assert_eq!(disk_file_runs(&dir.join("s0")), [(1, 1)]);
    let after_chunk = DISK_SECTOR_AFTER * 512 / 4096;
    assert_eq!(run_after_ready(&vm, 9), ExitReason::GuestExit(0));
    vm.snapshot(&dir.join("s1"), &diff).unwrap();
    assert_eq!(
        disk_file_runs(&dir.join("s1")),
        [(after_chunk, 1)],
        "the diff holds only the chunk written since s0"
    );
    let info = vmfork::Snapshot::open(&dir.join("s1")).unwrap().summary();
    let disk = &info["disks"][0];
    assert_eq!(disk["slot"], 1);
    assert_eq!(disk["file"], "disk-1.bin");
    assert_eq!(
        (
            disk["chunks_here"].as_u64(),
            disk["chunks_written"].as_u64()
        ),
        (Some(1), Some(2))
    );
    // Nothing written since: an empty disk diff.
    vm.snapshot(&dir.join("s2"), &diff).unwrap();
    assert_eq!(disk_file_runs(&dir.join("s2")), []);
    let restored = vmfork::Snapshot::open(&dir.join("s2"))
        .unwrap()
        .restore(vmfork::devices::SerialSink::Discard)
        .unwrap();
    assert_eq!(vmm_read(&restored, 8), stamp(BEFORE), "from s0");
    assert_eq!(vmm_read(&restored, DISK_SECTOR_AFTER), stamp(9), "from s1");
    // A diff of the restored VM is based on s2 and holds nothing of the chain below.
    restored.snapshot(&dir.join("s3"), &diff).unwrap();
    assert_eq!(disk_file_runs(&dir.join("s3")), []);
    // Merged, the chain is one full snapshot with both chunks.
    vmfork::Snapshot::open(&dir.join("s3"))
        .unwrap()
        .merge_into(&dir.join("merged"))
        .unwrap();
    assert_eq!(after_chunk, 2);
    assert_eq!(disk_file_runs(&dir.join("merged")), [(1, 2)]);

    // A reset drops writes a snapshot already holds: the next diff writes those chunks back
    // as they are now (the image's contents).
    let (parent, _) = guest_vm(
        Workload::Disk,
        disk_config(&path, false),
        &[(mailbox::PARAM1, BEFORE)],
    );
    parent.run_to_ready(Duration::from_secs(30)).unwrap();
    let fork = parent.fork(&ForkOptions::default()).unwrap();
    assert_eq!(run_after_ready(&fork, 77), ExitReason::GuestExit(0));
    fork.snapshot(&dir.join("f0"), &full).unwrap();
    fork.reset().unwrap();
    fork.snapshot(&dir.join("f1"), &diff).unwrap();
    assert_eq!(disk_file_runs(&dir.join("f1")), [(after_chunk, 1)]);
    let back = vmfork::Snapshot::open(&dir.join("f1"))
        .unwrap()
        .restore(vmfork::devices::SerialSink::Discard)
        .unwrap();
    assert_eq!(
        vmm_read(&back, DISK_SECTOR_AFTER),
        sector(&bytes, DISK_SECTOR_AFTER),
        "the reset's revert is in the diff"
    );
    assert_eq!(vmm_read(&back, 8), stamp(BEFORE));
    // A diff whose base is gone or another disk's is refused when opened.
    std::fs::remove_dir_all(dir.join("s0")).unwrap();
    let err = vmfork::Snapshot::open(&dir.join("s2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("s0"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn the_load_driver_wraps_around_the_disk_in_both_directions() {
    let (path, _) = image("disk-load");
    for (kind, bytes) in [(1u64, 0x1_0000u64), (0, 4096), (1, 512)] {
        let (vm, _) = guest_vm(
            Workload::Diskbench,
            disk_config(&path, false),
            &[
                (mailbox::PARAM0, bytes),
                (mailbox::PARAM1, kind),
                (mailbox::PARAM2, 40),
            ],
        );
        assert_eq!(run_to_exit(&vm), ExitReason::GuestExit(0));
        assert_eq!(vm.ram().read_u64(MAILBOX + mailbox::PROGRESS).unwrap(), 40);
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn a_fuzzing_reset_drops_disk_writes_too() {
    let (path, bytes) = image("disk-quick");
    let cfg = VmConfig {
        irqchip: false,
        ..disk_config(&path, false)
    };
    let (parent, _) = guest_vm(Workload::Disk, cfg, &[(mailbox::PARAM1, BEFORE)]);
    parent.run_to_ready(Duration::from_secs(30)).unwrap();
    let opts = ForkOptions {
        block_interrupts: true,
        ..ForkOptions::default()
    };
    let child = parent.fork(&opts).unwrap();
    for round in 0..3u64 {
        assert_eq!(
            run_after_ready(&child, 100 + round),
            ExitReason::GuestExit(0)
        );
        assert_eq!(
            read(&child, FOUND_AFTER, 4096),
            sector(&bytes, DISK_SECTOR_AFTER),
            "round {round} saw the previous round's write"
        );
        assert_eq!(read(&child, READ_BACK_AFTER, 4096), stamp(100 + round));
        let stats = child.reset_quick().unwrap();
        assert!(stats.quick, "round {round}: not the quick reset");
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn no_disk_write_of_a_destroyed_family_reaches_the_next_one() {
    let (path, bytes) = image("disk-families");
    const SECRET: u64 = 0x5ec2_e75e_c2e7_5ec2;
    {
        let (root, _) = guest_vm(
            Workload::Disk,
            disk_config(&path, false),
            &[(mailbox::PARAM1, SECRET)],
        );
        root.run_to_ready(Duration::from_secs(30)).unwrap();
        let forks: Vec<Vm> = (0..4)
            .map(|_| root.fork(&ForkOptions::default()).unwrap())
            .collect();
        for f in &forks {
            assert_eq!(run_after_ready(f, SECRET), ExitReason::GuestExit(0));
        }
    }
    // The next family (on the shells the first gave back) sees the image, not the secrets.
    let (root, _) = guest_vm(
        Workload::Disk,
        disk_config(&path, false),
        &[(mailbox::PARAM1, 1)],
    );
    root.run_to_ready(Duration::from_secs(30)).unwrap();
    let fork = root.fork(&ForkOptions::default()).unwrap();
    assert_eq!(run_after_ready(&fork, 2), ExitReason::GuestExit(0));
    assert_eq!(read(&fork, REREAD_BEFORE, 4096), stamp(1));
    assert_eq!(
        read(&fork, FOUND_AFTER, 4096),
        sector(&bytes, DISK_SECTOR_AFTER)
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn concurrent_forks_of_a_guest_writing_its_disk_take_disk_and_memory_at_one_instant() {
    use vmfork::devices::virtio::block::disk::Disk;
    use vmfork::devices::virtio::DeviceSpecific;
    let (path, _) = image("disk-instant");
    let chunks = (IMAGE_BYTES / 4096) as u64;
    let (parent, _) = guest_vm(
        Workload::Diskbench,
        disk_config(&path, false),
        &[
            (mailbox::PARAM0, 4096),
            (mailbox::PARAM1, 1),
            (mailbox::PARAM2, u64::MAX),
        ],
    );
    parent.start().unwrap();
    let stamp_of = |disk: &Disk, chunk: u64| {
        let mut b = [0u8; 8];
        disk.read(chunk * 4096, &mut b).unwrap();
        u64::from_le_bytes(b)
    };
    let checked = std::sync::atomic::AtomicU64::new(0);
    let deepest = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..20 {
                    let child = parent.fork(&ForkOptions::default()).unwrap();
                    let p = child.ram().read_u64(MAILBOX + mailbox::PROGRESS).unwrap();
                    let state = child.device_state();
                    let DeviceSpecific::Block(block) = &state.virtio[1].device else {
                        panic!("slot 1 is not the disk");
                    };
                    let disk = Disk::new(block.instant.clone().unwrap());
                    deepest.fetch_max(
                        block.instant.as_ref().unwrap().layers.len(),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    if p == 0 {
                        continue;
                    }
                    // The last counted write is on the disk; at most the one after it (done,
                    // not yet counted) is too; nothing later.
                    assert_eq!(stamp_of(&disk, (p - 1) % chunks), p, "at {p}");
                    // (A chunk never written holds the image's bytes: far above any count.)
                    let written_before = |stamp: u64, limit: u64| {
                        stamp > 1 << 40 || stamp.saturating_add(chunks) <= limit
                    };
                    let next = stamp_of(&disk, p % chunks);
                    assert!(
                        next == p + 1 || written_before(next, p + 1),
                        "at {p}: {next}"
                    );
                    let after = stamp_of(&disk, (p + 1) % chunks);
                    assert!(written_before(after, p + 2), "at {p}: {after}");
                    checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert!(checked.into_inner() > 0, "the guest never got going");
    // 24 more forks, each after the guest wrote again, so each froze a layer (the stack went
    // past 16 at the latest); the compactor merged them in the background, so the parent's
    // reads do not walk them all.
    for _ in 0..24 {
        wait_for_progress(&parent, progress(&parent));
        let child = parent.fork(&ForkOptions::default()).unwrap();
        let state = child.device_state();
        let DeviceSpecific::Block(block) = &state.virtio[1].device else {
            panic!("slot 1 is not the disk");
        };
        deepest.fetch_max(
            block.instant.as_ref().unwrap().layers.len(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    parent.stop();
    assert!(
        deepest.into_inner() > 16,
        "the stack never grew past 16 layers"
    );
    let depth = || {
        let state = parent.device_state();
        let DeviceSpecific::Block(block) = &state.virtio[1].device else {
            panic!("slot 1 is not the disk");
        };
        block.instant.as_ref().unwrap().layers.len()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while depth() > 16 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(depth() <= 16, "{} layers", depth());
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
