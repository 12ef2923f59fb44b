//! Several API clients acting on one VM at once, over the real socket: pause/resume, forks,
//! snapshots and restores of a writing guest, two clients resetting one fork while another
//! forks it. Every child and restore is checked against the instant it claims; no request may
//! hang and no pause may be undone by another client.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX, MEMTOUCH_BASE};
use guests::{dirty_instant_problem, Workload};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmfork::api::{ApiServer, Registry};

/// Working-set pages of the `dirty` guest: few enough to read in one memory request.
const PAGES: u64 = 64;

fn ok(sock: &Path, method: &str, path: &str, body: &str) -> Value {
    let (status, reply) = api_call(sock, method, path, body);
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {reply}"
    );
    reply
}

fn hex_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap())
}

fn memory(sock: &Path, vm: u64, addr: u64, len: u64) -> Vec<u8> {
    let reply = ok(
        sock,
        "GET",
        &format!("/vms/{vm}/memory?addr={addr}&len={len}"),
        "",
    );
    let hex = reply["data"].as_str().unwrap();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Why the stopped VM `vm` is not one instant of the `dirty` guest, read through the API.
fn instant_problem(sock: &Path, vm: u64) -> Option<String> {
    let regs = ok(sock, "GET", &format!("/vms/{vm}/regs"), "");
    let reg = |name: &str| regs[name].as_u64().unwrap();
    let mailbox = memory(sock, vm, MAILBOX, 4096);
    let progress = hex_u64(&mailbox[mailbox::PROGRESS as usize..][..8]);
    let pages = memory(sock, vm, MEMTOUCH_BASE, PAGES * 4096);
    dirty_instant_problem(reg("rip"), reg("rbx"), reg("r14"), progress, PAGES, |i| {
        let page = &pages[(i * 4096) as usize..][..4096];
        (hex_u64(&page[..8]), hex_u64(&page[4088..]))
    })
}

fn first_child(reply: &Value, key: &str) -> u64 {
    reply[key][0]["id"].as_u64().unwrap()
}

#[test]
fn api_clients_on_one_vm_never_tear_hang_or_undo_each_other() {
    let sock = std::env::temp_dir().join(format!("vmfork-test-{}-hammer.sock", std::process::id()));
    let dir: PathBuf =
        std::env::temp_dir().join(format!("vmfork-test-{}-hammer", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let registry = Registry::new(None);
    let (vm, _) = guest_vm(Workload::Dirty, config(32), &[(mailbox::PARAM0, PAGES)]);
    let root = registry.add(vm).id();
    let _server = ApiServer::start(&sock, registry).unwrap();
    ok(&sock, "POST", &format!("/vms/{root}/resume"), "");
    let fork = first_child(
        &ok(&sock, "POST", &format!("/vms/{root}/fork"), "{}"),
        "children",
    );

    let torn = Arc::new(AtomicUsize::new(0));
    let undone = Arc::new(AtomicUsize::new(0));
    type Work = Box<dyn FnMut(&Path) + Send>;
    let mut clients: Vec<Work> = Vec::new();
    let u = Arc::clone(&undone);
    clients.push(Box::new(move |s| {
        ok(s, "POST", &format!("/vms/{root}/pause"), "");
        std::thread::sleep(Duration::from_millis(2));
        if ok(s, "GET", &format!("/vms/{root}"), "")["status"] != "paused" {
            u.fetch_add(1, Ordering::Relaxed);
        }
        ok(s, "POST", &format!("/vms/{root}/resume"), "");
    }));
    for target in [root, root, fork] {
        let t = Arc::clone(&torn);
        clients.push(Box::new(move |s| {
            let reply = ok(
                s,
                "POST",
                &format!("/vms/{target}/fork"),
                r#"{"paused": true}"#,
            );
            let child = first_child(&reply, "children");
            if let Some(p) = instant_problem(s, child) {
                eprintln!("torn fork of {target}: {p}");
                t.fetch_add(1, Ordering::Relaxed);
            }
            ok(s, "DELETE", &format!("/vms/{child}"), "");
        }));
    }
    let (t, d) = (Arc::clone(&torn), dir.clone());
    let mut n = 0;
    clients.push(Box::new(move |s| {
        n += 1;
        let path = d.join(format!("s{n}"));
        let path = path.display();
        ok(
            s,
            "POST",
            &format!("/vms/{root}/snapshot"),
            &format!(r#"{{"path": "{path}"}}"#),
        );
        let reply = ok(
            s,
            "POST",
            "/snapshots/restore",
            &format!(r#"{{"path": "{path}", "paused": true}}"#),
        );
        let restored = first_child(&reply, "vms");
        if let Some(p) = instant_problem(s, restored) {
            eprintln!("torn snapshot: {p}");
            t.fetch_add(1, Ordering::Relaxed);
        }
        ok(s, "DELETE", &format!("/vms/{restored}"), "");
    }));
    for _ in 0..2 {
        clients.push(Box::new(move |s| {
            ok(s, "POST", &format!("/vms/{fork}/reset"), "{}");
        }));
    }
    let work = clients
        .into_iter()
        .map(|mut client| {
            let sock = sock.clone();
            Box::new(move || client(&sock)) as Box<dyn FnMut() + Send>
        })
        .collect();
    let counts = hammer(work, Duration::from_secs(8), Duration::from_secs(30));
    assert!(
        counts.iter().all(|&c| c > 0),
        "every client got work done: {counts:?}"
    );
    assert_eq!(
        torn.load(Ordering::Relaxed),
        0,
        "torn children ({counts:?})"
    );
    assert_eq!(
        undone.load(Ordering::Relaxed),
        0,
        "pauses undone by another client"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
