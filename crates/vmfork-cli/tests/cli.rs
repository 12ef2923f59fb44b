//! The `vmfork` binary end to end: exit codes, bad input, exported guests under QEMU.

use std::process::{Command, Output};

fn vmfork(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmfork"))
        .args(args)
        .output()
        .expect("run vmfork")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_hello_prints_and_exits_zero() {
    let o = vmfork(&["run", "--guest", "hello"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Hello from the vmfork guest!\n"
    );
}

#[test]
fn output_to_a_closed_pipe_ends_quietly_with_status_141() {
    // The pipe's reader is gone before vmfork starts, so its first line fails with EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_vmfork"))
        .arg("guests")
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(141), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn guest_exit_codes_and_faults_become_exit_statuses() {
    let o = vmfork(&["run", "--guest", "triple"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("triple-faulted"), "{}", stderr(&o));
    assert!(stderr(&o).contains("rip="), "{}", stderr(&o));
    let o = vmfork(&["run", "--guest", "spin", "--timeout", "0.2"]);
    assert_eq!(o.status.code(), Some(130));
    let o = vmfork(&[
        "run", "--guest", "memtouch", "--param", "0=128", "--mem", "64M",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "memtouch done 128\n");
}

#[test]
fn run_a_disk_driver_on_a_disk_image_and_a_read_only_one() {
    let dir = std::env::temp_dir().join(format!("vmfork-cli-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x33u8; 1 << 20]).unwrap();
    let image = image.to_str().unwrap();
    let o = vmfork(&["run", "--guest", "disk", "--disk", image]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // Read-only: the driver's first write fails (it exits 10 + step 2).
    let ro = format!("{image},ro");
    let o = vmfork(&["run", "--guest", "disk", "--disk", &ro]);
    assert_eq!(o.status.code(), Some(12), "{}", stderr(&o));
    assert_eq!(std::fs::read(image).unwrap(), vec![0x33u8; 1 << 20]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_a_vsock_driver_against_a_host_echo_socket() {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("vmfork-cli-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    let vsock = format!("3,{}", uds.display());
    let o = vmfork(&[
        "run", "--guest", "vsock", "--vsock", &vsock, "--param", "0=5000", "--param", "1=10",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!uds.exists(), "the VM's socket is left behind");
    // A socket path that cannot be bound: one clear error, nothing left behind.
    let bad = format!("3,{}/missing/v.sock", dir.display());
    let o = vmfork(&["run", "--guest", "vsock", "--vsock", &bad]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("cannot listen"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_gets_one_clear_line_and_a_nonzero_exit() {
    let dir = std::env::temp_dir().join(format!("vmfork-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_elf = dir.join("not-an-elf");
    std::fs::write(&not_elf, b"just text").unwrap();
    let not_elf = not_elf.to_str().unwrap();
    for (args, needle) in [
        (vec!["run", "--guest", "nope"], "unknown guest 'nope'"),
        (
            vec!["restore", "-n", "2", "--tap", "vmf-x", "/nonexistent"],
            "need -n 1",
        ),
        (
            vec!["run", "--guest", "hello", "--vcpus", "0"],
            "out of range",
        ),
        (
            vec!["run", "--guest", "hello", "--vcpus", "1000"],
            "out of range",
        ),
        (
            vec!["run", "--guest", "hello", "--mem", "100T"],
            "more than this host has",
        ),
        (vec!["run", "--guest", "hello", "--mem", "1K"], "RAM size"),
        (
            vec!["run", "--guest", "hello", "--mem", "lots"],
            "not a size",
        ),
        (
            vec!["run", "--kernel", not_elf],
            "neither an ELF file nor a bzImage",
        ),
        (
            vec!["run", "--kernel", "/does/not/exist"],
            "cannot read kernel",
        ),
        (vec!["run"], "say what to boot"),
        (vec!["run", "--guest", "hello", "--timeout=-1"], "positive"),
        (vec!["guests", "export", "nope", "/tmp/x"], "unknown guest"),
        (
            vec!["run", "--guest", "disk", "--disk", "/does/not/exist.img"],
            "disk image /does/not/exist.img",
        ),
        (
            vec!["run", "--guest", "disk", "--disk", "x.img,rx"],
            "must be 'ro' or 'rw'",
        ),
        (
            vec!["run", "--guest", "disk", "--disk", "/dev/null"],
            "not a regular file",
        ),
        (
            vec!["run", "--guest", "vsock", "--vsock", "nope"],
            "is not CID,PATH",
        ),
        (
            vec!["run", "--guest", "net", "--net", "vmfx0,zz:00"],
            "is not a MAC",
        ),
        (
            vec!["run", "--guest", "net", "--net", "this-name-is-too-long"],
            "tap name",
        ),
        (
            vec!["run", "--guest", "hello", "--hide-cpu", "xsave,sse9"],
            "unknown CPU feature 'sse9'",
        ),
        (
            vec!["run", "--guest", "vsock", "--vsock", "2,/tmp/x.sock"],
            "CID 2 must be 3",
        ),
    ] {
        let o = vmfork(&args);
        let err = stderr(&o);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// QEMU's isa-debug-exit reports `(code << 1) | 1`.
fn qemu_boot(elf: &std::path::Path) -> Option<Output> {
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install qemu-system-x86 (see .ci/run)"
        );
        eprintln!("skipping: {qemu} is not installed");
        return None;
    }
    let out = Command::new("timeout")
        .args([
            "60",
            qemu,
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-m",
            "64M",
            "-nodefaults",
        ])
        .args([
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=2", "-kernel"])
        .arg(elf)
        .output()
        .expect("run qemu");
    Some(out)
}

#[test]
fn exported_guests_boot_under_qemu_microvm() {
    let dir = std::env::temp_dir().join(format!("vmfork-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, expected_out, expected_status) in [
        ("hello", "Hello from the vmfork guest!\n", Some(1)),
        ("memtouch", "memtouch done 16\n", Some(1)),
        ("harness", "", Some(1)),
        ("triple", "triple: faulting now\n", Some(0)),
    ] {
        let elf = dir.join(format!("{name}.elf"));
        let o = vmfork(&["guests", "export", name, elf.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0));
        let Some(out) = qemu_boot(&elf) else { return };
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected_out, "{name}");
        assert_eq!(
            out.status.code(),
            expected_status,
            "{name}: {}",
            stderr(&out)
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn post(sock: &std::path::Path, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn serve_and_the_control_verbs() {
    let dir = fresh_dir("verbs");
    let daemon = ApiProcess::serve_in(&dir, &[]);
    let sock = daemon.sock.clone();
    // Running as root, it gave up every capability once its socket was open.
    let status = proc_status(daemon.child.id(), |s| {
        s.contains("CapEff:\t0000000000000000")
    });
    assert!(status.contains("CapBnd:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let ctl = |args: &[&str]| daemon.ctl(args);
    // Boot a memtouch through the API (POST /vms), let it finish, fork it, read the fork.
    let body = r#"{"guest":"memtouch","mem":"32M","params":{"0":8}}"#;
    let reply = post(&sock, "/vms", body);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let id = reply
        .split("\"id\": ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !stdout(&ctl(&["console", &id])).contains("memtouch done 8") {
        assert!(
            std::time::Instant::now() < deadline,
            "memtouch never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = ctl(&["ls"]);
    assert!(stdout(&o).contains("exited"), "{}", stdout(&o));
    let bad = post(&sock, "/vms", r#"{"guest":"nonesuch"}"#);
    assert!(
        bad.starts_with("HTTP/1.1 400") && bad.contains("unknown guest"),
        "{bad}"
    );
    let bad = post(&sock, "/vms", r#"{"guest":"hello","mem":"lots"}"#);
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let o = ctl(&["fork", "99999"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no VM 99999"), "{}", stderr(&o));
    let o = ctl(&["regs", "99999"]);
    assert!(stderr(&o).contains("HTTP 404"), "{}", stderr(&o));
    drop(daemon); // kills the server
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_with_api_sock_forks_resets_and_destroys() {
    let sock = std::env::temp_dir().join(format!("vmfork-run-{}.sock", std::process::id()));
    let mut run = ApiProcess::start(&RUN_COUNTER, sock.clone(), std::process::Stdio::piped());
    let ctl = |args: &[&str]| run.ctl(args);
    let root = run.first_vm();
    let o = ctl(&["fork", &root, "-n", "2", "--paused"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let kids: Vec<String> = stdout(&o).lines().map(String::from).collect();
    assert_eq!(kids.len(), 2);
    let o = ctl(&["ls"]);
    let tree = stdout(&o);
    assert!(
        tree.contains(&format!("  {} ", kids[0])),
        "children indented under the root:\n{tree}"
    );
    let o = ctl(&["mem", "write", &kids[0], "0x200100", "c0ffee"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = ctl(&["mem", "read", &kids[0], "0x200100", "3"]);
    assert!(stdout(&o).contains("c0 ff ee"), "{}", stdout(&o));
    let o = ctl(&["reset", &kids[0], "--paused"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = ctl(&["mem", "read", &kids[0], "0x200100", "3"]);
    assert!(stdout(&o).contains("00 00 00"), "{}", stdout(&o));
    let o = ctl(&["reset", &root]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a fork"), "{}", stderr(&o));
    let o = ctl(&["regs", &kids[1]]);
    assert!(stdout(&o).contains("rip"), "{}", stdout(&o));
    let o = ctl(&["resume", &kids[1]]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for id in [&root, &kids[0], &kids[1]] {
        let o = ctl(&["destroy", id]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    // With every VM gone, the process ends and removes its socket.
    let out = run.output();
    assert!(!sock.exists());
    assert!(String::from_utf8_lossy(&out.stdout).contains("counter"));
}

/// `vmfork run` of a slow counter, stopped after a minute at most.
const RUN_COUNTER: [&str; 9] = [
    "run",
    "--guest",
    "counter",
    "--param",
    "0=2000000",
    "--mem",
    "32M",
    "--timeout",
    "60",
];

/// A fresh, empty directory for one test.
/// `/proc/PID/status` once `ready` holds for it (a server drops its privileges just after its
/// socket appears).
fn proc_status(pid: u32, ready: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if ready(&status) || std::time::Instant::now() > deadline {
            return status;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmfork-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `vmfork` process serving the control API on `sock`, and the CLI pointed at it.
struct ApiProcess {
    child: std::process::Child,
    sock: std::path::PathBuf,
}

impl Drop for ApiProcess {
    /// A test that failed midway leaves no server running (and spinning its guests).
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl ApiProcess {
    /// Waits for the process to end, with what it printed (as `Child::wait_with_output`).
    fn output(&mut self) -> Output {
        use std::io::Read;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_end(&mut stdout).unwrap();
        }
        if let Some(mut err) = self.child.stderr.take() {
            err.read_to_end(&mut stderr).unwrap();
        }
        let status = self.child.wait().unwrap();
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// Starts `vmfork ARGS --api-sock SOCK` and waits until it listens.
    fn start(args: &[&str], sock: std::path::PathBuf, stdout: std::process::Stdio) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_vmfork"))
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start vmfork");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !sock.exists() {
            assert!(std::time::Instant::now() < deadline, "never listened");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Self { child, sock }
    }

    /// `vmfork serve ARGS` with its socket in `dir`, and `dir` its data directory unless
    /// ARGS names one.
    fn serve_in(dir: &std::path::Path, args: &[&str]) -> Self {
        let mut all = vec!["serve"];
        if !args.contains(&"--data-dir") {
            all.extend(["--data-dir", dir.to_str().unwrap()]);
        }
        all.extend(args);
        Self::start(&all, dir.join("api.sock"), std::process::Stdio::null())
    }

    /// Boots a paused VM over the API (`body` names the guest) and returns its id (the
    /// server's only VM).
    fn boot_paused(&self, body: &str) -> String {
        let reply = post(&self.sock, "/vms", body);
        assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
        self.first_vm()
    }

    /// `vmfork snapshot VM PATH`, which must succeed.
    fn snapshot(&self, vm: &str, path: &std::path::Path) {
        let o = self.ctl(&["snapshot", vm, path.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }

    /// `vmfork ARGS --api-sock SOCK`.
    fn ctl(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--api-sock", self.sock.to_str().unwrap()]);
        vmfork(&all)
    }

    /// The id of the first VM `vmfork ls` lists.
    fn first_vm(&self) -> String {
        stdout(&self.ctl(&["ls"]))
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .into()
    }

    /// Reads the u64 at guest address `addr` with `vmfork mem read`.
    fn read_u64(&self, vm: &str, addr: &str) -> u64 {
        let o = self.ctl(&["mem", "read", vm, addr, "8"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let bytes: Vec<u8> = stdout(&o)
            .split_whitespace()
            .filter(|w| w.len() == 2)
            .filter_map(|w| u8::from_str_radix(w, 16).ok())
            .collect();
        u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap())
    }
}

#[test]
fn snapshot_info_verify_and_restore_a_running_counter() {
    let base = std::env::temp_dir().join(format!("vmfork-snap-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let mut run = ApiProcess::start(
        &RUN_COUNTER,
        base.join("run.sock"),
        std::process::Stdio::null(),
    );
    let ctl = |args: &[&str]| run.ctl(args);
    let root = run.first_vm();
    let snap = base.join("snap");
    let snap_arg = snap.to_str().unwrap();
    let o = ctl(&["snapshot", &root, snap_arg]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("paused"), "{}", stdout(&o));
    let o = ctl(&["snapshot", &root, snap_arg]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("never overwritten"), "{}", stderr(&o));
    // `-`: one stream with the memory embedded, on stdout.
    let o = ctl(&["snapshot", &root, "-"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(o.stdout.starts_with(b"VMFORKSN"), "{}", stderr(&o));
    let stream = base.join("snap.vmfs");
    std::fs::write(&stream, &o.stdout).unwrap();
    let o = vmfork(&["snapshot", "info", stream.to_str().unwrap()]);
    assert!(
        stdout(&o).contains("embedded in the stream"),
        "{}",
        stdout(&o)
    );
    let o = ctl(&["destroy", &root]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    run.output();

    let o = vmfork(&["snapshot", "info", snap_arg]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for needle in [
        "format     version 1",
        "1 vCPU(s), 32 MiB",
        "VCPU",
        "IRQCHIP",
        "memory.bin",
    ] {
        assert!(stdout(&o).contains(needle), "{needle}: {}", stdout(&o));
    }
    let o = vmfork(&["snapshot", "verify", snap_arg]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("intact"));

    // Restore it, paused behind a socket; let it count three more numbers and exit.
    let mut restore = ApiProcess::start(
        &["restore", snap_arg, "--paused"],
        base.join("restore.sock"),
        std::process::Stdio::piped(),
    );
    let vm = restore.first_vm();
    let at = restore.read_u64(&vm, "0x200020");
    assert!(at >= 1, "the snapshot was taken after the counter started");
    let stop = format!("{:016x}", (at + 3).swap_bytes());
    let o = restore.ctl(&["mem", "write", &vm, "0x200018", &stop]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = restore.ctl(&["resume", &vm]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = restore.output();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("counter {}\n", at + 3)), "{text}");
    // It counted on from the snapshot: nothing before the number it had reached.
    let first: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("counter ")?.parse().ok())
        .unwrap();
    assert!(first == at || first == at + 1, "{text}");

    let o = vmfork(&["restore", base.join("nonesuch").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is this a snapshot directory"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn fuzz_a_restored_snapshot_of_the_harness_finds_its_crash() {
    let base = fresh_dir("fuzz-snap");
    let mut daemon = ApiProcess::serve_in(&base, &[]);
    // A harness loaded but never started: the snapshot is of its entry point.
    let vm = daemon.boot_paused(r#"{"guest":"harness","mem":"64M","paused":true}"#);
    let snap = base.join("harness");
    daemon.snapshot(&vm, &snap);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();

    let o = vmfork(&[
        "fuzz",
        "--snapshot",
        snap.to_str().unwrap(),
        "--code",
        "0x101000..0x101080",
        "--crashes",
        base.join("crashes").to_str().unwrap(),
        "--execs",
        "500000",
        "--seconds",
        "60",
    ]);
    assert_eq!(o.status.code(), Some(1), "a crash exits 1: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("crash: triple-fault/#UD"), "{out}");
    assert!(out.contains("input 46555a5a"), "\"FUZZ\": {out}");
    // The saved crash says how to reproduce it, and that command does.
    let crashes = base.join("crashes");
    let txt = std::fs::read_dir(&crashes)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "txt"))
        .expect("a crash report");
    let text = std::fs::read_to_string(&txt).unwrap();
    let command = text
        .lines()
        .find_map(|l| l.strip_prefix("reproduce: vmfork "))
        .expect("a reproduction command");
    let o = vmfork(&command.split(' ').collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("crash: triple-fault/#UD"),
        "{}",
        stdout(&o)
    );

    // Without a code range, coverage cannot be set up: a clear error.
    let o = vmfork(&["fuzz", "--snapshot", snap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("code range"), "{}", stderr(&o));

    let o = vmfork(&[
        "fuzz",
        "--snapshot",
        base.join("nonesuch").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("snapshot"), "{}", stderr(&o));
    std::fs::remove_dir_all(&base).unwrap();
}

/// `vmfork fuzz --target parser ARGS`.
fn fuzz_parser(args: &[&str]) -> Output {
    let mut all = vec!["fuzz", "--target", "parser"];
    all.extend(args);
    vmfork(&all)
}

#[test]
fn fuzz_the_parser_with_coverage_keeps_a_corpus_and_refuses_bad_flags() {
    let base = fresh_dir("fuzz-parser");
    let corpus = base.join("corpus");
    let o = fuzz_parser(&[
        "--keep-going",
        "--execs",
        "20000",
        "--corpus",
        corpus.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{}", stderr(&o));
    assert!(out.contains("20000 execs"), "{out}");
    let kept = std::fs::read_dir(&corpus).unwrap().count();
    assert!(kept > 3, "{kept} inputs kept: {out}");
    // A bad flag value: a clear error, exit 2.
    let o = fuzz_parser(&["--cores", "0"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("--cores"), "{}", stderr(&o));
    let o = fuzz_parser(&["--replay", "/nonexistent"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent"), "{}", stderr(&o));
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn fuzz_with_libafl_on_one_and_two_cores() {
    let base = fresh_dir("fuzz-libafl");
    let crashes = base.join("crashes");
    let o = fuzz_parser(&["--engine", "libafl", "--execs", "20000", "--keep-going"]);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{}", stderr(&o));
    assert!(stdout(&o).contains("(LibAFL)"), "{}", stdout(&o));
    // LibAFL's launcher: a broker and two client processes, each with its own target fork.
    let o = fuzz_parser(&[
        "--engine",
        "libafl",
        "--cores",
        "2",
        "--seconds",
        "4",
        "--keep-going",
        "--crashes",
        crashes.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{}", stderr(&o));
    assert!(out.contains("clients: 2"), "{out}");
    assert!(out.contains("LibAFL on 2 cores"), "{out}");
    // Without a crashes directory the launcher is refused before anything starts.
    let o = fuzz_parser(&["--engine", "libafl", "--cores", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--crashes"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&base);
}

/// Reads what the server sends until it closes (a reset after the response counts as the end).
fn read_reply(s: &mut std::os::unix::net::UnixStream) -> String {
    use std::io::Read;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_api_socket_and_its_clients_cannot_be_abused() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    let dir = fresh_dir("abuse");
    let sock = dir.join("api.sock");
    // Under umask 000 the socket is still owner-only.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} serve --api-sock {} --data-dir {}",
            env!("CARGO_BIN_EXE_vmfork"),
            sock.display(),
            dir.display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "never listened");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    // A request head over 16 KiB gets its 431, not a reset.
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut head = b"GET /vms HTTP/1.1\r\nX-Pad: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 100 << 10));
    let _ = s.write_all(&head);
    assert!(read_reply(&mut s).starts_with("HTTP/1.1 431"));
    drop(s);
    // (Its slot is given back once the server has finished with it.)
    std::thread::sleep(std::time::Duration::from_millis(300));

    // One client holding many idle connections: past its share it gets 503 at once, and
    // another client (the CLI, another process) is still served.
    let idle: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut extra = UnixStream::connect(&sock).unwrap();
    let _ = extra.write_all(b"GET /vms HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut extra);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.contains("from this client"), "{reply}");
    let t = std::time::Instant::now();
    let o = vmfork(&["ls", "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    drop(idle);
    // (Their slots come back once the server has seen them close.)
    std::thread::sleep(std::time::Duration::from_millis(1000));

    // A client trickling its request a byte at a time is cut off by the whole-request
    // deadline (10 s), not per read.
    let mut slow = UnixStream::connect(&sock).unwrap();
    let t = std::time::Instant::now();
    let trickle = std::thread::spawn(move || {
        for b in b"GET /vms HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        read_reply(&mut slow)
    });
    let reply = trickle.join().unwrap();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    let took = t.elapsed();
    assert!(took < std::time::Duration::from_secs(25), "{took:?}");

    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn boot_files_stream_targets_and_register_values_are_checked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = fresh_dir("files-cli");
    // A FIFO as kernel: refused at once, not a hang.
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let t = std::time::Instant::now();
    let o = vmfork(&["run", "--kernel", fifo.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    // A device as initrd, and an initrd larger than RAM.
    let o = vmfork(&["run", "--guest", "hello", "--initrd", "/dev/zero"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    let big = dir.join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let o = vmfork(&[
        "run",
        "--guest",
        "hello",
        "--mem",
        "32M",
        "--initrd",
        big.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("limit"), "{}", stderr(&o));

    let daemon = ApiProcess::serve_in(&dir, &[]);
    // Contradictory boot specs are refused, not half-used.
    let reply = post(
        &daemon.sock,
        "/vms",
        r#"{"guest":"hello","flat":"image.bin"}"#,
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("not several"), "{reply}");
    // Devices are outside the data directory (403); a FIFO inside it is not a regular file.
    let reply = post(&daemon.sock, "/vms", r#"{"kernel":"/dev/zero"}"#);
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    let fifo = std::ffi::CString::new(dir.join("api-fifo").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let reply = post(&daemon.sock, "/vms", r#"{"kernel":"api-fifo"}"#);
    assert!(
        reply.starts_with("HTTP/1.1 400") && reply.contains("not a regular file"),
        "{reply}"
    );
    // A VM to snapshot: its stream never overwrites an existing file.
    let reply = post(&daemon.sock, "/vms", r#"{"guest":"counter","paused":true}"#);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let vm = daemon.first_vm();
    let victim = dir.join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let body = format!(r#"{{"path":"{}","stream":true}}"#, victim.display());
    let reply = post(&daemon.sock, &format!("/vms/{vm}/snapshot"), &body);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    // Snapshot files are owner-only.
    let snap = dir.join("snap");
    daemon.snapshot(&vm, &snap);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&snap), 0o700);
    assert_eq!(mode(&snap.join("memory.bin")), 0o600);
    assert_eq!(mode(&snap.join("state.vmfs")), 0o600);
    // A register value KVM refuses is the request's fault: 400, not 500.
    let mut s = std::os::unix::net::UnixStream::connect(&daemon.sock).unwrap();
    let body = r#"{"cr4": 18446744073709551615}"#;
    use std::io::Write;
    write!(
        s,
        "PATCH /vms/{vm}/regs HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let reply = read_reply(&mut s);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    drop(daemon); // kills the server
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn server_limits_are_clear_errors() {
    let dir = fresh_dir("limits");
    let daemon = ApiProcess::serve_in(&dir, &["--max-vms", "3", "--max-guest-ram", "200M"]);
    let boot = |mem: &str| {
        post(
            &daemon.sock,
            "/vms",
            &format!(r#"{{"guest":"spin","mem":"{mem}","paused":true}}"#),
        )
    };
    assert!(boot("64M").starts_with("HTTP/1.1 201"));
    assert!(boot("64M").starts_with("HTTP/1.1 201"));
    // 128 MiB in use; 128 more would pass 200 MiB.
    let reply = boot("128M");
    assert!(reply.starts_with("HTTP/1.1 507"), "{reply}");
    assert!(reply.contains("--max-guest-ram"), "{reply}");
    // Two children of a 64 MiB VM: three VMs would be four.
    let vm = daemon.first_vm();
    let reply = post(&daemon.sock, &format!("/vms/{vm}/fork"), r#"{"count":2}"#);
    assert!(reply.starts_with("HTTP/1.1 429"), "{reply}");
    assert!(reply.contains("--max-vms"), "{reply}");
    let reply = post(
        &daemon.sock,
        &format!("/vms/{vm}/fork"),
        r#"{"count":1,"paused":true}"#,
    );
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let reply = boot("16M");
    assert!(reply.starts_with("HTTP/1.1 429"), "{reply}");
    // Nothing was left behind by the refusals.
    assert_eq!(stdout(&daemon.ctl(&["ls"])).lines().count(), 1 + 3);
    drop(daemon); // kills the server
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restore_verify_refuses_a_tampered_memory_file() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = fresh_dir("verify");
    let daemon = ApiProcess::serve_in(&dir, &[]);
    let vm = daemon.boot_paused(r#"{"guest":"hello","mem":"32M","paused":true}"#);
    let snap = dir.join("snap");
    daemon.snapshot(&vm, &snap);
    // Intact: verified and restored, over the API and by the CLI.
    let body = format!(
        r#"{{"path":"{}","verify":true,"paused":true}}"#,
        snap.display()
    );
    assert!(post(&daemon.sock, "/snapshots/restore", &body).starts_with("HTTP/1.1 201"));
    let o = vmfork(&["restore", "--verify", snap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // One byte of guest code changed in place: --verify refuses before anything runs.
    let mut memory = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory.bin"))
        .unwrap();
    memory.seek(SeekFrom::Start(0x10_1000)).unwrap();
    memory.write_all(&[0xcc]).unwrap();
    drop(memory);
    let o = vmfork(&["restore", "--verify", snap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("checksum"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "nothing ran: {}", stdout(&o));
    let reply = post(&daemon.sock, "/snapshots/restore", &body);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    drop(daemon); // kills the server
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_run_whose_console_reader_goes_away_ends() {
    use std::io::BufRead;
    // `vmfork run --guest counter | head -2`: counter prints forever.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmfork"))
        .args(["run", "--guest", "counter", "--param", "0=100000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("counter"));
    assert!(lines.next().unwrap().unwrap().starts_with("counter"));
    drop(lines);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running with nobody reading"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(141));
}

#[test]
fn serve_keeps_to_its_data_directory_and_runs_unprivileged() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = fresh_dir("confined");
    // The unprivileged server must reach its data directory (and leaves its socket behind:
    // it can no longer write the directory the socket is in).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.join("data");
    let daemon = ApiProcess::serve_in(
        &dir,
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--uid",
            "65534",
            "--gid",
            "65534",
        ],
    );
    let status = proc_status(daemon.child.id(), |s| s.contains("Uid:\t65534"));
    for line in ["Uid:\t65534\t65534\t65534", "Gid:\t65534\t65534\t65534"] {
        assert!(status.contains(line), "{status}");
    }
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert!(
            status.contains(&format!("{set}:\t0000000000000000")),
            "{status}"
        );
    }
    assert_eq!(std::fs::metadata(&data).unwrap().uid(), 65534);
    // Files outside the data directory are refused before they are opened.
    let post_vm = |body: &str| post(&daemon.sock, "/vms", body);
    for body in [
        r#"{"kernel":"/etc/shadow"}"#,
        r#"{"kernel":"../../etc/shadow"}"#,
        r#"{"flat":"/etc/hostname"}"#,
        r#"{"guest":"disk","disks":[{"path":"/etc/hostname"}]}"#,
        r#"{"guest":"disk","disks":[{"path":"../x.img","read_only":true}]}"#,
    ] {
        let reply = post_vm(body);
        assert!(
            reply.starts_with("HTTP/1.1 403") && reply.contains("data directory"),
            "{body}: {reply}"
        );
    }
    // A disk inside it: the VM boots with it, and its snapshot keeps the disk's writes.
    std::fs::write(data.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    let reply = post_vm(r#"{"guest":"disk","disks":[{"path":"disk.img"}],"paused":true}"#);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    assert!(
        reply.contains(r#""type": "block""#) && reply.contains("disk.img"),
        "{reply}"
    );
    let disk_vm = daemon.first_vm();
    let reply = post(
        &daemon.sock,
        &format!("/vms/{disk_vm}/snapshot"),
        r#"{"path":"disksnap"}"#,
    );
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    assert!(data.join("disksnap/disk-1.bin").is_file());
    let o = daemon.ctl(&["destroy", &disk_vm]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // It runs, forks, snapshots and restores as nobody, inside the data directory.
    let reply = post_vm(r#"{"guest":"counter","paused":true}"#);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let vm = daemon.first_vm();
    let o = daemon.ctl(&["fork", &vm]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let snapshot = |path: &str| {
        post(
            &daemon.sock,
            &format!("/vms/{vm}/snapshot"),
            &format!(r#"{{"path":"{path}"}}"#),
        )
    };
    let reply = snapshot("snap1");
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    assert_eq!(
        std::fs::metadata(data.join("snap1/memory.bin"))
            .unwrap()
            .uid(),
        65534
    );
    let reply = post(
        &daemon.sock,
        "/snapshots/restore",
        r#"{"path":"snap1","paused":true}"#,
    );
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    // Its memory file truncated under it, the restored VM fails; the server does not.
    let restored = reply
        .split("\"vms\"")
        .nth(1)
        .and_then(|r| r.split("\"id\": ").nth(1))
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no VM id in {reply}"))
        .to_string();
    std::fs::OpenOptions::new()
        .write(true)
        .open(data.join("snap1/memory.bin"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let o = daemon.ctl(&["mem", "read", &restored, "0x1000", "16"]);
    assert!(
        stderr(&o).contains("truncated") && stderr(&o).contains("409"),
        "{}",
        stderr(&o)
    );
    let o = daemon.ctl(&["ls"]);
    assert_eq!(o.status.code(), Some(0), "the server lives: {}", stderr(&o));
    // No snapshot lands outside: not by an absolute path, '..', nor a planted symlink.
    std::os::unix::fs::symlink(&dir, data.join("out")).unwrap();
    for path in [
        "/tmp/vmfork-escape",
        "../escape",
        "out/escape",
        ".",
        "out/..",
    ] {
        let reply = snapshot(path);
        assert!(reply.starts_with("HTTP/1.1 403"), "{path}: {reply}");
    }
    assert!(!dir.join("escape").exists() && !std::path::Path::new("/tmp/vmfork-escape").exists());
    std::fs::write(dir.join("secret"), b"root only").unwrap();
    for route in ["/snapshots/info", "/snapshots/restore", "/snapshots/verify"] {
        let reply = post(&daemon.sock, route, r#"{"path":"out/secret"}"#);
        assert!(reply.starts_with("HTTP/1.1 403"), "{route}: {reply}");
    }
    drop(daemon); // kills the server
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_jailed_server_sees_only_its_data_directory() {
    let dir = fresh_dir("jail");
    let data = dir.join("data");
    let mut daemon = ApiProcess::serve_in(&dir, &["--data-dir", data.to_str().unwrap(), "--jail"]);
    // The server is the child of the process started (which waits outside, unprivileged).
    let outside = daemon.child.id();
    let status = proc_status(outside, |s| s.contains("CapEff:\t0000000000000000"));
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    let children = std::fs::read_to_string(format!("/proc/{outside}/task/{outside}/children"));
    let jailed: u32 = children.unwrap().trim().parse().expect("one jailed child");
    let link = |pid: u32, what: &str| std::fs::read_link(format!("/proc/{pid}/{what}")).unwrap();
    assert_eq!(link(jailed, "root"), data.canonicalize().unwrap());
    for ns in ["ns/net", "ns/mnt", "ns/pid"] {
        assert_ne!(link(jailed, ns), link(std::process::id(), ns), "{ns}");
    }
    let status = proc_status(jailed, |s| s.contains("CapEff:\t0000000000000000"));
    assert!(status.contains("CapBnd:\t0000000000000000"), "{status}");
    // PID 1 of its own PID namespace.
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "{nspid}");
    // It boots, snapshots and restores inside; paths name the directory by its outside path.
    let reply = post(&daemon.sock, "/vms", r#"{"guest":"counter","paused":true}"#);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let vm = daemon.first_vm();
    daemon.snapshot(&vm, &data.join("snap"));
    assert!(data.join("snap/memory.bin").exists());
    let body = format!(
        r#"{{"path":"{}","paused":true}}"#,
        data.join("snap").display()
    );
    let reply = post(&daemon.sock, "/snapshots/restore", &body);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let reply = post(&daemon.sock, "/vms", r#"{"kernel":"/etc/shadow"}"#);
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    // SIGTERM to the process started reaches the jailed server; the socket is removed.
    // SAFETY: kill on a child process of this test.
    unsafe { libc::kill(outside as i32, libc::SIGTERM) };
    assert_eq!(daemon.child.wait().unwrap().code(), Some(0));
    assert!(!daemon.sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_lets_a_snapshot_in_flight_finish_and_answer() {
    let dir = fresh_dir("sigterm");
    let mut daemon = ApiProcess::serve_in(&dir, &[]);
    // memtouch fills 60,000 pages (234 MiB) and exits: a snapshot with that much to write.
    let reply = post(
        &daemon.sock,
        "/vms",
        r#"{"guest":"memtouch","mem":"512M","params":{"0":60000}}"#,
    );
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let vm = daemon.first_vm();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !stdout(&daemon.ctl(&["ls"])).contains("exited") {
        assert!(
            std::time::Instant::now() < deadline,
            "memtouch never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let snap = dir.join("snap");
    let sock = daemon.sock.clone();
    let body = format!(r#"{{"path":"{}"}}"#, snap.display());
    let request = std::thread::spawn(move || post(&sock, &format!("/vms/{vm}/snapshot"), &body));
    std::thread::sleep(std::time::Duration::from_millis(30));
    // SAFETY: kill on a child process of this test.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let reply = request.join().unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 201"),
        "the client was answered: {reply}"
    );
    let status = daemon.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // The snapshot is whole, and nothing half-written is left beside it.
    let o = vmfork(&["snapshot", "verify", snap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
