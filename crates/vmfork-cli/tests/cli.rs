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
fn bad_input_gets_one_clear_line_and_a_nonzero_exit() {
    let dir = std::env::temp_dir().join(format!("vmfork-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_elf = dir.join("not-an-elf");
    std::fs::write(&not_elf, b"just text").unwrap();
    let not_elf = not_elf.to_str().unwrap();
    for (args, needle) in [
        (vec!["run", "--guest", "nope"], "unknown guest 'nope'"),
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
        (vec!["run", "--kernel", not_elf], "not an ELF file"),
        (
            vec!["run", "--kernel", "/does/not/exist"],
            "cannot read kernel",
        ),
        (vec!["run"], "say what to boot"),
        (vec!["run", "--guest", "hello", "--timeout=-1"], "positive"),
        (vec!["guests", "export", "nope", "/tmp/x"], "unknown guest"),
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
    let sock = std::env::temp_dir().join(format!("vmfork-cli-{}.sock", std::process::id()));
    let sock_arg = sock.to_str().unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_vmfork"))
        .args(["serve", "--api-sock", sock_arg])
        .spawn()
        .expect("start vmfork serve");
    wait_for_socket(&sock);
    let ctl = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api-sock", sock_arg]);
        vmfork(&all)
    };
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
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn run_with_api_sock_forks_resets_and_destroys() {
    let sock = std::env::temp_dir().join(format!("vmfork-run-{}.sock", std::process::id()));
    let sock_arg = sock.to_str().unwrap().to_string();
    let run = Command::new(env!("CARGO_BIN_EXE_vmfork"))
        .args([
            "run",
            "--guest",
            "counter",
            "--param",
            "0=2000000",
            "--mem",
            "32M",
        ])
        .args(["--timeout", "60", "--api-sock", &sock_arg])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start vmfork run");
    wait_for_socket(&sock);
    let ctl = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api-sock", &sock_arg]);
        vmfork(&all)
    };
    let o = ctl(&["ls"]);
    let root: String = stdout(&o)
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .into();
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
    let out = run.wait_with_output().unwrap();
    assert!(!sock.exists());
    assert!(String::from_utf8_lossy(&out.stdout).contains("counter"));
}

fn wait_for_socket(sock: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "never listened");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Reads the u64 at guest address `addr` with `vmfork mem read`.
fn read_u64(sock: &str, vm: &str, addr: &str) -> u64 {
    let o = vmfork(&["mem", "read", vm, addr, "8", "--api-sock", sock]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let bytes: Vec<u8> = stdout(&o)
        .split_whitespace()
        .filter(|w| w.len() == 2)
        .filter_map(|w| u8::from_str_radix(w, 16).ok())
        .collect();
    u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap())
}

#[test]
fn snapshot_info_verify_and_restore_a_running_counter() {
    let base = std::env::temp_dir().join(format!("vmfork-snap-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let sock = base.join("run.sock");
    let sock_arg = sock.to_str().unwrap().to_string();
    let run = Command::new(env!("CARGO_BIN_EXE_vmfork"))
        .args(["run", "--guest", "counter", "--param", "0=2000000"])
        .args(["--mem", "32M", "--timeout", "60", "--api-sock", &sock_arg])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start vmfork run");
    wait_for_socket(&sock);
    let ctl = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api-sock", &sock_arg]);
        vmfork(&all)
    };
    let root: String = stdout(&ctl(&["ls"]))
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .into();
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
    run.wait_with_output().unwrap();

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
    let sock2 = base.join("restore.sock");
    let sock2_arg = sock2.to_str().unwrap().to_string();
    let restore = Command::new(env!("CARGO_BIN_EXE_vmfork"))
        .args(["restore", snap_arg, "--paused", "--api-sock", &sock2_arg])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start vmfork restore");
    wait_for_socket(&sock2);
    let vm: String = stdout(&vmfork(&["ls", "--api-sock", &sock2_arg]))
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .into();
    let at = read_u64(&sock2_arg, &vm, "0x200020");
    assert!(at >= 1, "the snapshot was taken after the counter started");
    let stop = format!("{:016x}", (at + 3).swap_bytes());
    let o = vmfork(&[
        "mem",
        "write",
        &vm,
        "0x200018",
        &stop,
        "--api-sock",
        &sock2_arg,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = vmfork(&["resume", &vm, "--api-sock", &sock2_arg]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = restore.wait_with_output().unwrap();
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
