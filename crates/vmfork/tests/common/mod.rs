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

/// Calls `f(guest address, bytes)` for all guest RAM, 1 MiB at a time, until it says stop.
pub fn scan_ram(vm: &Vm, mut f: impl FnMut(u64, &[u8]) -> std::ops::ControlFlow<()>) {
    let mut buf = vec![0u8; 1 << 20];
    for region in &vm.ram().layout().regions {
        let mut addr = region.guest_addr;
        while addr < region.end() {
            let n = (region.end() - addr).min(buf.len() as u64) as usize;
            vm.ram().read(addr, &mut buf[..n]).unwrap();
            if f(addr, &buf[..n]).is_break() {
                return;
            }
            addr += n as u64;
        }
    }
}

/// A hash of all guest RAM.
pub fn ram_hash(vm: &Vm) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    scan_ram(vm, |_, bytes| {
        std::hash::Hasher::write(&mut h, bytes);
        std::ops::ControlFlow::Continue(())
    });
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

/// Sends raw bytes to a control API socket; returns (status, JSON body or Null). A reply that
/// takes over 30 s is a hung request and fails the test.
pub fn api_raw(sock: &std::path::Path, bytes: &[u8]) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("no reply ({e})"));
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).unwrap()
    };
    (status, body)
}

/// One API request with a body; returns (status, JSON body or Null).
pub fn api_call(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    api_raw(sock, req.as_bytes())
}

/// Runs each of `work` on its own thread, again and again, for `run_for`; fails if any
/// iteration takes longer than `limit` (a hung operation) or panics. Returns how many
/// iterations each got done.
pub fn hammer(
    work: Vec<Box<dyn FnMut() + Send>>,
    run_for: Duration,
    limit: Duration,
) -> Vec<usize> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Instant;
    let stop = Arc::new(AtomicBool::new(false));
    let (beat_tx, beat_rx) = mpsc::channel::<usize>();
    let mut handles = Vec::new();
    let counts: Vec<Arc<AtomicUsize>> = work.iter().map(|_| Arc::default()).collect();
    for (i, mut work) in work.into_iter().enumerate() {
        let stop = Arc::clone(&stop);
        let tx = beat_tx.clone();
        let count = Arc::clone(&counts[i]);
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                work();
                count.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(i);
            }
        }));
    }
    drop(beat_tx);
    let started = Instant::now();
    let mut last = vec![Instant::now(); handles.len()];
    while started.elapsed() < run_for {
        match beat_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(i) => last[i] = Instant::now(),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a worker died"),
        }
        for (i, t) in last.iter().enumerate() {
            assert!(t.elapsed() < limit, "worker {i} hung for {:?}", t.elapsed());
        }
        if handles.iter().any(|h| h.is_finished()) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("a worker panicked (see its message above)");
    }
    counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

/// A fresh, empty directory for one test (named by process, `name` and thread).
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vmfork-test-{}-{name}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Snapshots `vm` (a full snapshot) into `path` and restores it, console discarded.
pub fn snapshot_and_restore(vm: &Vm, path: &std::path::Path) -> Vm {
    vm.snapshot(path, &vmfork::SnapshotOptions::default())
        .unwrap();
    vmfork::Snapshot::open(path)
        .unwrap()
        .restore(SerialSink::Discard)
        .unwrap()
}
