//! `vmfork snapshot` (take one through the control API; `info`, `verify`, `merge` locally) and
//! `vmfork restore` (run restored VMs in this process, like `vmfork run`).

use crate::client::{request, request_waiting};
use crate::control::SocketArg;
use crate::{interrupt, CliResult};
use clap::{Args, Subcommand};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmfork::api::{ApiServer, Registry};
use vmfork::devices::SerialSink;
use vmfork::Snapshot;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    action: Option<SnapshotAction>,
    /// The VM to snapshot (an id from `vmfork ls`).
    vm: Option<u64>,
    /// The snapshot directory to create (must not exist, or be empty), or `-`: one stream
    /// with the memory embedded, to standard output.
    dir: Option<PathBuf>,
    /// Write only the pages dirtied since the VM's previous snapshot, chained to it.
    #[arg(long)]
    diff: bool,
    #[command(flatten)]
    sock: SocketArg,
}

#[derive(Subcommand)]
enum SnapshotAction {
    /// Header, VM shape, memory, chain and records of a snapshot (`--json` for all of it).
    Info {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check a snapshot completely: stream checksums, components, memory checksums, chain.
    Verify { path: PathBuf },
    /// Fold a diff chain into one full snapshot in a new directory.
    Merge { path: PathBuf, out: PathBuf },
}

fn open(path: &Path) -> CliResult<Snapshot> {
    if path == Path::new("-") {
        return Snapshot::from_stream(path, std::io::stdin().lock()).map_err(|e| e.to_string());
    }
    Snapshot::open(path).map_err(|e| e.to_string())
}

pub fn snapshot(args: SnapshotArgs) -> CliResult<u8> {
    match args.action {
        Some(SnapshotAction::Info { path, json }) => info(&path, json),
        Some(SnapshotAction::Verify { path }) => {
            let snap = open(&path)?;
            snap.verify().map_err(|e| e.to_string())?;
            println!(
                "{}: snapshot {} is intact ({} snapshot(s) in its chain checked)",
                path.display(),
                snap.id(),
                snap.chain().len() + 1
            );
            Ok(0)
        }
        Some(SnapshotAction::Merge { path, out }) => {
            let report = open(&path)?.merge_into(&out).map_err(|e| e.to_string())?;
            println!(
                "merged {} into {} (snapshot {}, {} data pages)",
                path.display(),
                report.path.display(),
                report.id,
                report.data_pages
            );
            Ok(0)
        }
        None => {
            let (Some(vm), Some(dir)) = (args.vm, args.dir) else {
                return Err(
                    "usage: vmfork snapshot VM DIR [--diff] (or: info|verify|merge)".into(),
                );
            };
            if dir == Path::new("-") {
                return snapshot_to_stdout(&args.sock, vm, args.diff);
            }
            let dir = absolute(&dir)?;
            let body = json!({ "path": dir, "diff": args.diff });
            let reply = post_snapshot(&args.sock, vm, &body)?;
            println!(
                "snapshot {} of VM {vm} in {} ({}{} pages written, paused {:.2} ms, took {:.1} ms)",
                reply["id"].as_str().unwrap_or("?"),
                dir.display(),
                if args.diff { "diff, " } else { "" },
                reply["data_pages"],
                reply["pause_us"].as_f64().unwrap_or(0.0) / 1000.0,
                reply["total_us"].as_f64().unwrap_or(0.0) / 1000.0,
            );
            Ok(0)
        }
    }
}

/// Asks the server for a snapshot and waits as long as writing it takes, with a progress bar
/// when standard error is a terminal.
fn post_snapshot(
    sock: &SocketArg,
    vm: u64,
    body: &serde_json::Value,
) -> CliResult<serde_json::Value> {
    let _bar = std::io::stderr()
        .is_terminal()
        .then(|| ProgressBar::start(sock.path.clone(), vm));
    let path = format!("/vms/{vm}/snapshot");
    request_waiting(&sock.path, "POST", &path, Some(body), None)
}

/// A progress bar on standard error while the server writes a snapshot, fed by polling
/// `GET /vms/ID/snapshot`; cleared when dropped.
struct ProgressBar {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressBar {
    fn start(socket: PathBuf, vm: u64) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let Ok(reply) = request(&socket, "GET", &format!("/vms/{vm}/snapshot"), None)
                    else {
                        break;
                    };
                    let progress = &reply["progress"];
                    let written = progress["pages_done"].as_u64().unwrap_or(0);
                    let total = progress["pages_total"].as_u64().unwrap_or(0);
                    if total > 0 {
                        eprint!("\r{}", progress_line(written, total));
                    }
                }
                eprint!("\r\x1b[K");
            })
        };
        Self {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for ProgressBar {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `writing snapshot [##########----------]  50%  512/1024 MiB` (256 pages of 4 KiB a MiB)
fn progress_line(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(0).min(WIDTH) as usize;
    let percent = (done * 100).checked_div(total).unwrap_or(0);
    format!(
        "writing snapshot [{}{}] {percent:>3}%  {}/{} MiB",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled),
        done / 256,
        total / 256,
    )
}

/// `vmfork snapshot VM -`: the server writes the stream into a FIFO this process copies to
/// standard output (the control API answers in JSON; the FIFO carries the bytes).
fn snapshot_to_stdout(sock: &SocketArg, vm: u64, diff: bool) -> CliResult<u8> {
    if diff {
        return Err("a snapshot to standard output is always full: drop --diff".into());
    }
    let dir = std::env::temp_dir().join(format!("vmfork-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let fifo = dir.join("snapshot.fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map_err(|e| format!("cannot run mkfifo: {e}"))?;
    if !made.success() {
        return Err(format!("mkfifo {} failed", fifo.display()));
    }
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut input = std::fs::File::open(&fifo)?;
            std::io::copy(&mut input, &mut std::io::stdout().lock())
        })
    };
    let body = json!({ "path": fifo, "stream": true });
    let reply = post_snapshot(sock, vm, &body);
    let _ = std::fs::remove_dir_all(&dir);
    let reply = reply?;
    let copied = reader
        .join()
        .map_err(|_| "the stream copier panicked".to_string())?
        .map_err(|e| format!("copying the stream: {e}"))?;
    eprintln!(
        "vmfork: snapshot {} of VM {vm}: {copied} bytes to stdout (paused {:.2} ms)",
        reply["id"].as_str().unwrap_or("?"),
        reply["pause_us"].as_f64().unwrap_or(0.0) / 1000.0
    );
    Ok(0)
}

/// The server resolves paths itself: send it an absolute one.
fn absolute(dir: &Path) -> CliResult<PathBuf> {
    std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn info(path: &Path, as_json: bool) -> CliResult<u8> {
    let summary = open(path)?.summary();
    if as_json {
        println!("{summary:#}");
        return Ok(0);
    }
    let vm = &summary["vm"];
    let memory = &summary["memory"];
    println!("snapshot   {}", summary["id"].as_str().unwrap_or("?"));
    println!(
        "format     version {}, written by {}",
        summary["format_version"],
        summary["producer"].as_str().unwrap_or("?")
    );
    println!(
        "vm         {} vCPU(s), {} MiB RAM, irqchip {}",
        vm["vcpus"], vm["mem_mib"], vm["irqchip"]
    );
    println!(
        "memory     {} ({} data pages, CRC32 {}{})",
        if summary["memory_embedded"] == true {
            "embedded in the stream".to_string()
        } else {
            memory["file"].as_str().unwrap_or("?").to_string()
        },
        memory["data_pages"],
        memory["crc32"].as_str().unwrap_or("?"),
        if summary["diff"] == true {
            format!(", diff of {} pages", memory["diff_pages"])
        } else {
            String::new()
        }
    );
    if let Some(chain) = summary["chain"].as_array().filter(|c| !c.is_empty()) {
        for (i, base) in chain.iter().enumerate() {
            println!(
                "{}{}",
                if i == 0 { "base       " } else { "           " },
                base.as_str().unwrap_or("?")
            );
        }
    }
    for disk in summary["disks"].as_array().into_iter().flatten() {
        println!(
            "disk {}     {}{} ({} sectors; {} chunks written, {} in {})",
            disk["slot"],
            disk["image"].as_str().unwrap_or("?"),
            if disk["read_only"] == true {
                ", read-only"
            } else {
                ""
            },
            disk["sectors"],
            disk["chunks_written"],
            disk["chunks_here"],
            disk["file"].as_str().unwrap_or("this stream"),
        );
    }
    println!("records");
    for r in summary["records"].as_array().into_iter().flatten() {
        println!(
            "  {:<14} instance {:<3} {:>9} bytes at {}",
            r["name"].as_str().unwrap_or("?"),
            r["instance"],
            r["length"],
            r["offset"]
        );
    }
    Ok(0)
}

#[derive(Args)]
pub struct RestoreArgs {
    /// A snapshot directory, a stream file with embedded memory, or `-` for standard input.
    pub path: PathBuf,
    /// How many VMs to restore (they share the snapshot's memory until they write).
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    pub count: usize,
    /// Leave the VMs paused (resume them through the control API).
    #[arg(long, requires = "api_sock")]
    pub paused: bool,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Check the memory files' checksums (and the diff chain's) before running anything.
    #[arg(long)]
    pub verify: bool,
    /// Complete the instructions KVM's emulator refuses in the restored VMs (hosts that
    /// emulate guest ring 0; a snapshot does not record it)
    #[arg(long)]
    pub emulation_assist: bool,
    /// The tap the restored VM's network device uses, instead of TAP-<id> (created if it does
    /// not exist; needs -n 1).
    #[arg(long)]
    pub tap: Option<String>,
    /// Where the restored VM's vsock listens, and the base of the host sockets its guest
    /// reaches (PATH_<port>), instead of the snapshot's PATH.<id> (needs -n 1).
    #[arg(long)]
    pub vsock_path: Option<PathBuf>,
}

/// What to tell a user whose restored guest's TSC is not the saved one (a KVM that cannot set a
/// guest's TSC; README, "Guest time"); nothing when it is within a second.
fn tsc_note(jump_ns: i64) -> Option<String> {
    (jump_ns.unsigned_abs() >= 1_000_000_000).then(|| {
        format!(
            "this host's KVM did not load the saved TSC: the guest's TSC is {:.1} s {} the \
             snapshot's while its kvmclock is the snapshot's; a Linux guest using the TSC as its \
             clocksource sees its time jump (boot such guests with clocksource=kvm-clock)",
            jump_ns.unsigned_abs() as f64 / 1e9,
            if jump_ns > 0 { "ahead of" } else { "behind" }
        )
    })
}

/// Restores and runs until every restored VM (and fork of one) has exited or been destroyed.
/// The first VM's console goes to the terminal; the exit status is its guest's.
pub fn restore(args: RestoreArgs) -> CliResult<u8> {
    if args.count == 0 || args.count > 1024 {
        return Err(format!("-n {} must be 1 to 1024", args.count));
    }
    let rewiring = vmfork::devices::Rewiring {
        tap: args.tap.clone(),
        vsock_path: args.vsock_path.clone(),
    };
    if args.count > 1 && !rewiring.is_empty() {
        return Err(format!(
            "--tap and --vsock-path name one VM's endpoints: they need -n 1 (not {})",
            args.count
        ));
    }
    let started = Instant::now();
    let snap = open(&args.path)?;
    if args.verify {
        snap.verify().map_err(|e| e.to_string())?;
    }
    interrupt::install()?;
    let registry = Registry::new(None);
    let mut vms = Vec::new();
    for i in 0..args.count {
        let sink = if i == 0 {
            SerialSink::Stdout
        } else {
            SerialSink::buffer().0
        };
        let opts = vmfork::ForkOptions {
            emulation_assist: args.emulation_assist,
            rewiring: rewiring.clone(),
            ..Default::default()
        };
        vms.push(registry.add(snap.restore_with(sink, &opts).map_err(|e| e.to_string())?));
    }
    eprintln!(
        "vmfork: restored {} VM(s) from snapshot {} in {:.2} ms",
        args.count,
        snap.id(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    if let Some(note) = vms
        .first()
        .and_then(|vm| tsc_note(vm.tsc_jump_at_load_ns()))
    {
        eprintln!("vmfork: note: {note}");
    }
    let server = match &args.api_sock {
        Some(path) => Some(ApiServer::start(path, registry.clone()).map_err(|e| e.to_string())?),
        None => None,
    };
    if !args.paused {
        for vm in &vms {
            vm.start().map_err(|e| e.to_string())?;
        }
    }
    while registry.any_alive() {
        if interrupt::interrupted() {
            registry.destroy_all();
            break;
        }
        if vmfork::devices::stdout_closed() {
            registry.destroy_all();
            drop(server);
            return Ok(crate::run::CONSOLE_CLOSED_STATUS);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let reason = vms[0].wait_timeout(Duration::from_secs(5));
    drop(server);
    registry.destroy_all();
    match reason {
        Some(r) if r.is_fault() => {
            eprintln!("vmfork: {r}");
            Ok(r.status().clamp(0, 255) as u8)
        }
        Some(r) => Ok(r.status().clamp(0, 255) as u8),
        None => Ok(130),
    }
}

#[cfg(test)]
mod tests {
    use super::tsc_note;

    #[test]
    fn a_tsc_off_by_a_second_or_more_gets_a_note() {
        assert_eq!(tsc_note(0), None);
        assert_eq!(tsc_note(-999_999_999), None);
        let ahead = tsc_note(300_000_000_000).unwrap();
        assert!(ahead.contains("300.0 s ahead of"), "{ahead}");
        assert!(ahead.contains("clocksource=kvm-clock"), "{ahead}");
        assert!(tsc_note(-2_000_000_000).unwrap().contains("2.0 s behind"));
        assert!(tsc_note(i64::MIN).is_some());
    }
}
