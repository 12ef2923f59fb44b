//! Snapshots on real guests: restore resumes where the snapshot was taken, memory and registers
//! come back bit for bit, restores share memory, diff chains, record order, bad input.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX, MEMTOUCH_BASE};
use guests::{memtouch_pattern, Workload};
use std::path::Path;
use std::time::Duration;
use vmfork::devices::SerialSink;
use vmfork::snapshot::{MEMORY_FILE, STATE_FILE};
use vmfork::{ExitReason, Snapshot, SnapshotOptions, Vm, VmConfig};
use vmfork_format::{Header, Reader, Writer};

const PAGES: u64 = 64;

fn run_memtouch(vm: &Vm, seed: u64) {
    vm.ram().write_u64(MAILBOX + mailbox::PARAM1, seed).unwrap();
    assert_eq!(vm.run_inline().unwrap(), ExitReason::GuestExit(0));
}

fn memtouch_vm() -> Vm {
    let (vm, _) = guest_vm(Workload::Memtouch, config(32), &[(mailbox::PARAM0, PAGES)]);
    vm
}

fn fill_word(seed: u64, page: u64) -> u64 {
    (seed << 32) | page
}

/// Writes a word pattern into the first `pages` pages of the memtouch area (from the VMM).
fn fill_pages(vm: &Vm, pages: u64, seed: u64) {
    let mut page = vec![0u8; 4096];
    for p in 0..pages {
        for w in page.chunks_exact_mut(8) {
            w.copy_from_slice(&fill_word(seed, p).to_le_bytes());
        }
        vm.ram().write(MEMTOUCH_BASE + p * 4096, &page).unwrap();
    }
}

fn full() -> SnapshotOptions {
    SnapshotOptions::default()
}

fn diff() -> SnapshotOptions {
    SnapshotOptions { diff: true }
}

#[test]
fn a_running_counter_resumes_after_restore_with_the_next_number() {
    let dir = temp_dir("counter");
    let (vm, _) = guest_vm(Workload::Counter, config(32), &counter_params(100_000));
    vm.start().unwrap();
    wait_for_progress(&vm, 2);
    let report = vm.snapshot(&dir.join("snap"), &full()).unwrap();
    assert_eq!(vm.status(), vmfork::VmStatus::Running, "the VM runs on");
    vm.stop();
    vm.wait();
    drop(vm);

    let snap = Snapshot::open(&dir.join("snap")).unwrap();
    assert_eq!(snap.id(), report.id);
    let (sink, serial) = SerialSink::buffer();
    let restored = snap.restore(sink).unwrap();
    let at = restored
        .ram()
        .read_u64(MAILBOX + mailbox::PROGRESS)
        .unwrap();
    restored
        .ram()
        .write_u64(MAILBOX + mailbox::PARAM2, at + 3)
        .unwrap();
    assert_eq!(run_to_exit(&restored), ExitReason::GuestExit(0));
    let text = serial.text();
    let numbers: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("counter ")?.parse().ok())
        .collect();
    assert!(numbers[0] == at || numbers[0] == at + 1, "{text}");
    assert_eq!(*numbers.last().unwrap(), at + 3, "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn memory_and_registers_come_back_bit_for_bit_and_zero_pages_stay_holes() {
    let dir = temp_dir("memtouch");
    let vm = memtouch_vm();
    run_memtouch(&vm, 7);
    let hash = ram_hash(&vm);
    let regs = vm.registers(0).unwrap();
    let report = vm.snapshot(&dir.join("s"), &full()).unwrap();
    assert!(report.data_pages >= PAGES);
    // Sparse: far fewer blocks than 32 MiB of RAM.
    let meta = std::fs::metadata(dir.join("s").join(MEMORY_FILE)).unwrap();
    assert_eq!(meta.len(), 32 << 20);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    assert!(
        allocated < 8 << 20,
        "memory file allocates {allocated} bytes"
    );

    let snap = Snapshot::open(&dir.join("s")).unwrap();
    snap.verify().unwrap();
    let restored = snap.restore(SerialSink::Discard).unwrap();
    assert_eq!(ram_hash(&restored), hash);
    assert_eq!(restored.registers(0).unwrap(), regs);
    // Independent of the original: writes to one are not seen by the other.
    restored.ram().write_u64(MEMTOUCH_BASE, 1).unwrap();
    assert_eq!(ram_hash(&vm), hash);
    std::fs::remove_dir_all(dir).unwrap();
}

fn rss_anon_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn fifty_restores_run_independently_and_share_the_memory_file() {
    let dir = temp_dir("fifty");
    let (vm, _) = guest_vm(Workload::Memtouch, config(64), &[]);
    fill_pages(&vm, 2048, 1); // 8 MiB of data in the snapshot, taken at the guest's entry
    vm.snapshot(&dir.join("s"), &full()).unwrap();
    drop(vm);
    let snap = Snapshot::open(&dir.join("s")).unwrap();
    // Each restore dirties 16 pages; reading the rest must not copy it.
    let before = rss_anon_bytes();
    let mut vms = Vec::new();
    for seed in 0..50u64 {
        let r = snap.restore(SerialSink::Discard).unwrap();
        r.ram().write_u64(MAILBOX + mailbox::PARAM0, 16).unwrap();
        run_memtouch(&r, 100 + seed);
        vms.push(r);
    }
    let grown = rss_anon_bytes().saturating_sub(before);
    // 50 private copies of the 8 MiB would be 400 MiB.
    assert!(
        grown < 50 << 20,
        "50 restores grew anonymous RSS by {grown} bytes"
    );
    for (seed, r) in vms.iter().enumerate() {
        assert_eq!(
            r.ram().read_u64(MEMTOUCH_BASE + 4096).unwrap(),
            memtouch_pattern(100 + seed as u64, 1)
        );
        // Pages past the 16 it wrote still hold the snapshot's contents.
        assert_eq!(
            r.ram().read_u64(MEMTOUCH_BASE + 100 * 4096 + 8).unwrap(),
            fill_word(1, 100)
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_diff_chain_of_five_restores_like_a_full_snapshot() {
    let dir = temp_dir("chain");
    let (vm, _) = guest_vm(Workload::Counter, config(32), &counter_params(100_000));
    fill_pages(&vm, 64, 1);
    vm.start().unwrap();
    vm.snapshot(&dir.join("d0"), &full()).unwrap();
    let err = memtouch_vm()
        .snapshot(&dir.join("nobase"), &diff())
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs an earlier snapshot"), "{err}");
    for i in 1..=5u64 {
        // Guest writes (the counter) and VMM writes between snapshots; the last is taken with
        // the VM paused so that a full snapshot can be taken at the same instant.
        wait_for_progress(&vm, progress(&vm) + 1);
        fill_pages(&vm, 4, 10 + i);
        vm.ram().write_u64(0x60_0000 + i * 4096, i).unwrap();
        if i == 5 {
            vm.pause().unwrap();
        }
        let report = vm.snapshot(&dir.join(format!("d{i}")), &diff()).unwrap();
        assert!(report.diff);
        assert!(report.pages < 200, "diff {i} wrote {} pages", report.pages);
    }
    let hash = ram_hash(&vm);
    let regs = vm.registers(0).unwrap();
    vm.snapshot(&dir.join("full"), &full()).unwrap();
    vm.stop();
    vm.wait();

    let top = Snapshot::open(&dir.join("d5")).unwrap();
    assert_eq!(top.chain().len(), 5);
    top.verify().unwrap();
    let from_chain = top.restore(SerialSink::Discard).unwrap();
    let from_full = Snapshot::open(&dir.join("full"))
        .unwrap()
        .restore(SerialSink::Discard)
        .unwrap();
    assert_eq!(ram_hash(&from_chain), hash);
    assert_eq!(ram_hash(&from_full), hash);
    assert_eq!(from_chain.registers(0).unwrap(), regs);
    assert_eq!(from_full.registers(0).unwrap(), regs);

    // Merge folds the chain into one full snapshot.
    top.merge_into(&dir.join("merged")).unwrap();
    let merged = Snapshot::open(&dir.join("merged")).unwrap();
    assert!(merged.chain().is_empty());
    assert_eq!(
        ram_hash(&merged.restore(SerialSink::Discard).unwrap()),
        hash
    );

    // A diff of a restored VM chains to the snapshot it came from.
    let at = from_chain
        .ram()
        .read_u64(MAILBOX + mailbox::PROGRESS)
        .unwrap();
    from_chain.start().unwrap();
    wait_for_progress(&from_chain, at + 1);
    from_chain.pause().unwrap();
    let h = ram_hash(&from_chain);
    from_chain.snapshot(&dir.join("d6"), &diff()).unwrap();
    from_chain.stop();
    from_chain.wait();
    let d6 = Snapshot::open(&dir.join("d6")).unwrap();
    assert_eq!(d6.chain().len(), 6);
    assert_eq!(ram_hash(&d6.restore(SerialSink::Discard).unwrap()), h);

    // A base replaced by another snapshot, or missing, is refused by name.
    std::fs::rename(dir.join("d2"), dir.join("d2.moved")).unwrap();
    let err = Snapshot::open(&dir.join("d5")).unwrap_err().to_string();
    assert!(err.contains("base snapshot") && err.contains("d2"), "{err}");
    std::fs::rename(dir.join("d0"), dir.join("d2")).unwrap();
    let err = Snapshot::open(&dir.join("d5")).unwrap_err().to_string();
    assert!(err.contains("different snapshot"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Rewrites a snapshot's state stream with its records transformed by `f`.
fn rewrite_records(from: &Path, to: &Path, f: impl FnOnce(&mut Vec<vmfork_format::Record>)) {
    std::fs::create_dir_all(to).unwrap();
    let input = std::fs::File::open(from.join(STATE_FILE)).unwrap();
    let (header, mut records) = Reader::new(input).unwrap().read_all().unwrap();
    f(&mut records);
    let out = std::fs::File::create(to.join(STATE_FILE)).unwrap();
    let mut w = Writer::new(out, &Header { ..header }).unwrap();
    for r in &records {
        w.record(r.kind, r.instance, r.flags, &r.body).unwrap();
    }
    w.finish().unwrap();
    if !to.join(MEMORY_FILE).exists() {
        std::fs::copy(from.join(MEMORY_FILE), to.join(MEMORY_FILE)).unwrap();
    }
}

#[test]
fn records_in_any_order_restore_identically() {
    let dir = temp_dir("shuffle");
    let vm = memtouch_vm();
    run_memtouch(&vm, 3);
    let hash = ram_hash(&vm);
    let state = vm.vcpu_state(0).unwrap();
    vm.snapshot(&dir.join("s"), &full()).unwrap();
    let orders: [fn(&mut Vec<vmfork_format::Record>); 3] = [
        |r| r.reverse(),
        |r| r.rotate_left(3),
        |r| {
            let n = r.len();
            r.swap(0, n - 1);
            r.swap(1, n / 2);
        },
    ];
    for (i, order) in orders.into_iter().enumerate() {
        let to = dir.join(format!("order{i}"));
        rewrite_records(&dir.join("s"), &to, order);
        let restored = Snapshot::open(&to)
            .unwrap()
            .restore(SerialSink::Discard)
            .unwrap();
        assert_eq!(ram_hash(&restored), hash);
        let got = restored.vcpu_state(0).unwrap();
        assert_eq!(got.regs, state.regs);
        assert_eq!(got.sregs, state.sregs);
        assert_eq!(got.xsave, state.xsave);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn open_err(path: &Path) -> String {
    Snapshot::open(path).unwrap_err().to_string()
}

#[test]
fn bad_snapshots_are_refused_with_the_problem_named() {
    let dir = temp_dir("bad");
    let vm = memtouch_vm();
    run_memtouch(&vm, 5);
    let good = dir.join("good");
    vm.snapshot(&good, &full()).unwrap();

    // Never overwritten.
    let err = vm.snapshot(&good, &full()).unwrap_err().to_string();
    assert!(err.contains("never overwritten"), "{err}");

    // Truncated and bit-flipped state streams.
    let state = std::fs::read(good.join(STATE_FILE)).unwrap();
    for (name, bytes) in [
        ("truncated", state[..state.len() / 2].to_vec()),
        ("flipped", {
            let mut b = state.clone();
            b[state.len() / 3] ^= 0x10;
            b
        }),
        ("magic", {
            let mut b = state.clone();
            b[0] = b'X';
            b
        }),
    ] {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        std::fs::write(to.join(STATE_FILE), bytes).unwrap();
        std::fs::copy(good.join(MEMORY_FILE), to.join(MEMORY_FILE)).unwrap();
        let err = open_err(&to);
        assert!(
            err.contains("truncated") || err.contains("checksum") || err.contains("magic"),
            "{name}: {err}"
        );
    }

    // A memory file of the wrong size.
    let to = dir.join("short");
    rewrite_records(&good, &to, |_| {});
    std::fs::File::options()
        .write(true)
        .open(to.join(MEMORY_FILE))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    assert!(open_err(&to).contains("bytes, the snapshot's RAM is"));

    // A corrupt memory file: open maps it lazily, verify reads it and says so.
    let to = dir.join("corrupt");
    rewrite_records(&good, &to, |_| {});
    let mem = std::fs::File::options()
        .write(true)
        .open(to.join(MEMORY_FILE))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&mem, &[0xAB], MEMTOUCH_BASE + 5).unwrap();
    let err = Snapshot::open(&to)
        .unwrap()
        .verify()
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match its checksum"), "{err}");

    // Records for a vCPU or device the VM does not have, duplicates, a missing vCPU.
    type Edit = fn(&mut Vec<vmfork_format::Record>);
    let cases: [(&str, Edit, &str); 4] = [
        (
            "vcpu1",
            |r| {
                let mut extra = r.iter().find(|x| x.kind == 3).unwrap().clone();
                extra.instance = 1;
                r.push(extra);
            },
            "VCPU record for vCPU 1",
        ),
        (
            "device9",
            |r| {
                let mut extra = r.iter().find(|x| x.kind == 6).unwrap().clone();
                extra.instance = 9;
                r.push(extra);
            },
            "device 9",
        ),
        (
            "dup",
            |r| {
                let extra = r.iter().find(|x| x.kind == 4).unwrap().clone();
                r.push(extra);
            },
            "duplicate IRQCHIP",
        ),
        (
            "novcpu",
            |r| r.retain(|x| x.kind != 3),
            "no VCPU record for vCPU 0",
        ),
    ];
    for (name, edit, expected) in cases {
        let to = dir.join(name);
        rewrite_records(&good, &to, edit);
        let err = open_err(&to);
        assert!(err.contains(expected), "{name}: {err}");
    }
    assert!(open_err(&dir.join("missing")).contains("is this a snapshot directory"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn embedded_memory_streams_restore_too() {
    let vm = memtouch_vm();
    run_memtouch(&vm, 11);
    let hash = ram_hash(&vm);
    let mut stream = Vec::new();
    vm.snapshot_to_stream(&mut stream).unwrap();
    let snap = Snapshot::from_stream(Path::new("-"), stream.as_slice()).unwrap();
    assert_eq!(ram_hash(&snap.restore(SerialSink::Discard).unwrap()), hash);
    let mut bad = stream.clone();
    let at = bad.len() - 5000;
    bad[at] ^= 1;
    assert!(Snapshot::from_stream(Path::new("-"), bad.as_slice()).is_err());

    // A fork's memory is its image's base file plus an overlay: both kinds of snapshot of a
    // fork that wrote pages must carry those pages.
    let (parent, _) = guest_vm(Workload::Memtouch, config(32), &[(mailbox::PARAM0, PAGES)]);
    let fork = parent.fork(&vmfork::ForkOptions::default()).unwrap();
    run_memtouch(&fork, 21);
    let grandchild = fork.fork(&vmfork::ForkOptions::default()).unwrap();
    let hash = ram_hash(&grandchild);
    let mut stream = Vec::new();
    grandchild.snapshot_to_stream(&mut stream).unwrap();
    let snap = Snapshot::from_stream(Path::new("-"), stream.as_slice()).unwrap();
    assert_eq!(ram_hash(&snap.restore(SerialSink::Discard).unwrap()), hash);
    let dir = temp_dir("fork-snap");
    grandchild.snapshot(&dir.join("s"), &full()).unwrap();
    let snap = Snapshot::open(&dir.join("s")).unwrap();
    assert_eq!(ram_hash(&snap.restore(SerialSink::Discard).unwrap()), hash);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The golden snapshot of format version 1 (tests/golden/v1.vmfs: the `memtouch` guest at its
/// entry point with 16 pages filled from the VMM, embedded memory). Every later build must
/// restore it and run it.
#[test]
fn the_version_1_golden_snapshot_still_restores() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1.vmfs");
    if std::env::var_os("VMFORK_WRITE_GOLDEN").is_some() {
        let (vm, _) = guest_vm(
            Workload::Memtouch,
            VmConfig {
                mem_bytes: 8 << 20,
                ..VmConfig::default()
            },
            &[(mailbox::PARAM0, 8)],
        );
        fill_pages(&vm, 16, 5);
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        vm.snapshot_to_stream(std::fs::File::create(&golden).unwrap())
            .unwrap();
    }
    let snap = Snapshot::open(&golden).unwrap();
    assert_eq!(snap.header().version, 1);
    let vm = snap.restore(SerialSink::Discard).unwrap();
    for page in 0..16 {
        assert_eq!(
            vm.ram().read_u64(MEMTOUCH_BASE + page * 4096 + 8).unwrap(),
            fill_word(5, page)
        );
    }
    // It runs: memtouch writes its first 8 pages and exits 0; the rest stay as filled.
    run_memtouch(&vm, 6);
    assert_eq!(
        vm.ram().read_u64(MEMTOUCH_BASE + 3 * 4096).unwrap(),
        memtouch_pattern(6, 3)
    );
    assert_eq!(
        vm.ram().read_u64(MEMTOUCH_BASE + 12 * 4096 + 8).unwrap(),
        fill_word(5, 12)
    );
}

/// Run by `a_snapshot_killed_at_any_point_is_complete_or_absent` in a child process: snapshots
/// a VM with 64 MiB of data into $VMFORK_KILL_TEST_DIR (and does nothing in a normal run).
#[test]
fn helper_snapshot_to_be_killed() {
    let Some(dir) = std::env::var_os("VMFORK_KILL_TEST_DIR") else {
        return;
    };
    let (vm, _) = guest_vm(Workload::Memtouch, config(128), &[]);
    fill_pages(&vm, 16384, 3);
    println!("snapshotting");
    vm.snapshot(Path::new(&dir), &full()).unwrap();
    println!("done");
}

#[test]
fn a_snapshot_killed_at_any_point_is_complete_or_absent() {
    use std::io::BufRead;
    let base = temp_dir("kill");
    let mut outcomes = Vec::new();
    for (i, delay_ms) in [0u64, 5, 20, 50, 100, 200, 400, 2000]
        .into_iter()
        .enumerate()
    {
        let dir = base.join(format!("s{i}"));
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "helper_snapshot_to_be_killed", "--nocapture"])
            .env("VMFORK_KILL_TEST_DIR", &dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        while let Some(Ok(line)) = lines.next() {
            if line.contains("snapshotting") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Either the snapshot is complete and intact, or it is not there under its name.
        match Snapshot::open(&dir) {
            Ok(snap) => {
                snap.verify().unwrap();
                outcomes.push("complete");
            }
            Err(e) => {
                assert!(!dir.exists(), "a partial snapshot under its name: {e}");
                assert!(
                    e.to_string().contains("is this a snapshot directory"),
                    "{e}"
                );
                outcomes.push("absent");
            }
        }
    }
    // Killed at once it cannot have finished (64 MiB written and synced); given time it did.
    assert_eq!(outcomes.first(), Some(&"absent"), "{outcomes:?}");
    assert_eq!(outcomes.last(), Some(&"complete"), "{outcomes:?}");
    // The next snapshot under a name clears what dead writers left for it.
    let vm = memtouch_vm();
    for (i, _) in outcomes.iter().enumerate().filter(|(_, o)| **o == "absent") {
        vm.snapshot(&base.join(format!("s{i}")), &full()).unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn progress_is_reported_while_writing_and_a_second_snapshot_waits_its_turn() {
    let dir = temp_dir("progress");
    let vm = memtouch_vm();
    run_memtouch(&vm, 5);
    assert_eq!(vm.snapshot_progress(), None);
    let mut seen = Vec::new();
    let report = vm
        .snapshot_with_progress(&dir.join("snap"), &full(), &mut |done, total| {
            let progress = vm.snapshot_progress().expect("progress while writing");
            assert_eq!((progress.pages_done, progress.pages_total), (done, total));
            assert!(progress.path.ends_with("snap"));
            let second = vm.snapshot(&dir.join("second"), &full()).unwrap_err();
            assert!(
                second.to_string().contains("already writing a snapshot"),
                "{second}"
            );
            seen.push(done);
        })
        .unwrap();
    assert_eq!(vm.snapshot_progress(), None, "cleared when done");
    assert!(
        !seen.is_empty() && seen.windows(2).all(|w| w[0] < w[1]),
        "{seen:?}"
    );
    assert_eq!(seen.last().copied(), Some(report.pages));
    assert!(!dir.join("second").exists());
    // The refused one left nothing behind, and the VM takes snapshots again.
    vm.snapshot(&dir.join("third"), &full()).unwrap();
    Snapshot::open(&dir.join("third"))
        .unwrap()
        .verify()
        .unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_restored_vm_resets_to_the_snapshot() {
    let dir = temp_dir("reset");
    // Taken at memtouch's entry point, so every round below runs it from the start.
    let vm = memtouch_vm();
    let hash = ram_hash(&vm);
    let regs = vm.registers(0).unwrap();
    vm.snapshot(&dir.join("s"), &full()).unwrap();
    let snap = Snapshot::open(&dir.join("s")).unwrap();
    let restored = snap.restore(SerialSink::Discard).unwrap();
    assert!(restored.is_fork());
    assert_eq!(restored.parent_id(), None);
    assert_eq!(restored.restored_from(), Some(snap.id().as_str()));
    for round in 0..3 {
        // The guest fills its pages, and the VMM writes a page of its own; reset undoes both.
        run_memtouch(&restored, 100 + round);
        restored
            .ram()
            .write_u64(MEMTOUCH_BASE + (PAGES + 5) * 4096, 9)
            .unwrap();
        assert_ne!(ram_hash(&restored), hash);
        let stats = restored.reset().unwrap();
        assert!(stats.pages_restored as u64 > PAGES, "{stats:?}");
        assert_eq!(ram_hash(&restored), hash, "round {round}");
        assert_eq!(restored.registers(0).unwrap(), regs, "round {round}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_snapshot_cache_reuses_an_open_snapshot_until_its_files_change() {
    let dir = temp_dir("cache");
    let path = dir.join("s");
    let vm = memtouch_vm();
    vm.snapshot(&path, &full()).unwrap();
    let cache = vmfork::snapshot::SnapshotCache::new(2);
    let first = cache.open(&path).unwrap();
    let again = cache.open(&dir.join(".").join("s")).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&first, &again),
        "same path, same files"
    );
    // Restores from the cached snapshot run independently.
    let a = again.restore(SerialSink::Discard).unwrap();
    run_memtouch(&a, 4);
    let b = first.restore(SerialSink::Discard).unwrap();
    assert_eq!(ram_hash(&b), ram_hash(&vm));

    // Replaced under the same path: opened afresh.
    std::fs::remove_dir_all(&path).unwrap();
    run_memtouch(&vm, 9);
    let report = vm.snapshot(&path, &full()).unwrap();
    let replaced = cache.open(&path).unwrap();
    assert_eq!(replaced.id(), report.id);
    assert_ne!(replaced.id(), first.id());
    // Gone: an error, not the stale entry.
    std::fs::remove_dir_all(&path).unwrap();
    assert!(cache.open(&path).is_err());
    // At most `capacity` kept.
    for name in ["x", "y", "z"] {
        vm.snapshot(&dir.join(name), &full()).unwrap();
        cache.open(&dir.join(name)).unwrap();
    }
    assert_eq!(cache.len(), 2);
    // Deleted snapshots are let go at the next lookup (their files' space is freed).
    std::fs::remove_dir_all(dir.join("y")).unwrap();
    std::fs::remove_dir_all(dir.join("z")).unwrap();
    vm.snapshot(&dir.join("w"), &full()).unwrap();
    cache.open(&dir.join("w")).unwrap();
    assert_eq!(cache.len(), 1);

    // A diff whose base is deleted or replaced is opened afresh, and refused.
    let base = dir.join("base");
    vm.snapshot(&base, &full()).unwrap();
    // (memtouch has run to its exit: change a page from the host instead.)
    vm.ram()
        .write_u64(guests::layout::MEMTOUCH_BASE, 0x5eed)
        .unwrap();
    let diff = dir.join("diff");
    vm.snapshot(&diff, &SnapshotOptions { diff: true }).unwrap();
    cache.open(&diff).unwrap();
    std::fs::remove_dir_all(&base).unwrap();
    let err = cache.open(&diff).unwrap_err().to_string();
    assert!(err.contains("base") || err.contains("cannot open"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn restores_from_new_opens_of_one_snapshot_start_clean_in_recycled_shells() {
    let dir = temp_dir("reopen");
    let vm = memtouch_vm();
    let hash = ram_hash(&vm);
    vm.snapshot(&dir.join("s"), &full()).unwrap();
    for round in 0..8 {
        // A new open each time: a shell left by the previous round maps the same file.
        let snap = Snapshot::open(&dir.join("s")).unwrap();
        let restored = snap.restore(SerialSink::Discard).unwrap();
        assert_eq!(ram_hash(&restored), hash, "round {round}");
        run_memtouch(&restored, 50 + round);
        restored
            .ram()
            .write_u64(MEMTOUCH_BASE + (PAGES + round) * 4096, 7)
            .unwrap();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_device_is_a_record_and_older_snapshots_load_the_power_on_state_of_the_rest() {
    let dir = temp_dir("cmos-record");
    let (vm, _) = guest_vm(Workload::Hello, config(32), &[]);
    let path = dir.join("snap");
    vm.snapshot(&path, &vmfork::SnapshotOptions::default())
        .unwrap();
    let summary = Snapshot::open(&path).unwrap().summary();
    let devices: Vec<u64> = summary["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] == "DEVICE")
        .map(|r| r["instance"].as_u64().unwrap())
        .collect();
    assert_eq!(
        devices,
        [0, 1, 2, 3, 16],
        "serial, CMOS, generation id, i8042, virtio slot 0: {summary}"
    );
    let devices = vm.save_state().unwrap().devices;
    assert_eq!(devices.cmos, vmfork::devices::CmosRegisters::default());
    assert_eq!(devices.i8042, vmfork::devices::I8042Registers::default());
    // The version 1 golden snapshot has only the serial's record: it restores with the
    // power-on CMOS, i8042 and virtio-rng, and (as every restore) a new generation id.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1.vmfs");
    let restored = Snapshot::open(&golden)
        .unwrap()
        .restore(SerialSink::Discard)
        .unwrap();
    let state = restored.save_state().unwrap().devices;
    assert_eq!(state.cmos, vmfork::devices::CmosRegisters::default());
    assert_eq!(state.i8042, vmfork::devices::I8042Registers::default());
    assert_eq!(state.virtio.len(), 1);
    assert_eq!(state.virtio[0].status, 0);
    assert_ne!(state.generation.id, [0; 16]);
    let _ = std::fs::remove_dir_all(&dir);
}
