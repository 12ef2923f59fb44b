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
