//! The control API over a real Unix socket, driving real VMs: every verb, and bad requests
//! answered with the right status without harming the hosted VMs.

mod common;

use common::*;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use serde_json::Value;
use std::path::{Path, PathBuf};
use vmfork::api::{ApiServer, Registry};

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmfork-test-{}-{name}.sock", std::process::id()))
}

fn raw(sock: &Path, bytes: &[u8]) -> (u16, Value) {
    api_raw(sock, bytes)
}

fn call(sock: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    api_call(sock, method, path, body)
}

fn server(name: &str, workload: Workload, params: &[(u64, u64)]) -> (ApiServer, u64, PathBuf) {
    let path = socket_path(name);
    let registry = Registry::new(None);
    let (vm, _) = guest_vm(workload, config(16), params);
    let id = registry.add(vm).id();
    let server = ApiServer::start(&path, registry).unwrap();
    (server, id, path)
}

#[test]
fn fork_inspect_write_reset_and_destroy_over_the_socket() {
    let (_server, root, sock) = server("verbs", Workload::Memtouch, &[(mailbox::PARAM0, 4)]);

    let (status, body) = call(
        &sock,
        "POST",
        &format!("/vms/{root}/fork"),
        r#"{"count": 2, "paused": true}"#,
    );
    assert_eq!(status, 201, "{body}");
    let kids: Vec<u64> = body["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!(kids.len(), 2);
    let child = kids[0];

    let (status, list) = call(&sock, "GET", "/vms", "");
    assert_eq!(status, 200);
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == child)
        .unwrap()
        .clone();
    assert_eq!(entry["parent"], root);
    assert_eq!(entry["status"], "created");

    // Write into the paused child, read it back physically and virtually, then reset.
    let addr = MAILBOX + 0x100;
    let (status, _) = call(
        &sock,
        "PUT",
        &format!("/vms/{child}/memory?addr={addr:#x}"),
        r#"{"data":"0badf00d"}"#,
    );
    assert_eq!(status, 200);
    let (_, read) = call(
        &sock,
        "GET",
        &format!("/vms/{child}/memory?addr={addr}&len=4"),
        "",
    );
    assert_eq!(read["data"], "0badf00d");
    let (status, read) = call(
        &sock,
        "GET",
        &format!("/vms/{child}/memory?addr={addr}&len=4&virtual=true"),
        "",
    );
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["data"], "0badf00d");
    // The sibling and the parent do not see it.
    let (_, other) = call(
        &sock,
        "GET",
        &format!("/vms/{}/memory?addr={addr}&len=4", kids[1]),
        "",
    );
    assert_eq!(other["data"], "00000000");

    let (status, regs) = call(&sock, "GET", &format!("/vms/{child}/regs"), "");
    assert_eq!(status, 200);
    let rip = regs["rip"].as_u64().unwrap();
    let rbx = regs["rbx"].as_u64().unwrap();
    let (status, regs) = call(
        &sock,
        "PATCH",
        &format!("/vms/{child}/regs"),
        r#"{"rbx": 77}"#,
    );
    assert_eq!(status, 200, "{regs}");
    assert_eq!(regs["rbx"], 77);
    assert_eq!(regs["rip"], rip);

    let (status, reset) = call(
        &sock,
        "POST",
        &format!("/vms/{child}/reset"),
        r#"{"paused": true}"#,
    );
    assert_eq!(status, 200, "{reset}");
    assert!(reset["pages_restored"].as_u64().unwrap() >= 1);
    let (_, read) = call(
        &sock,
        "GET",
        &format!("/vms/{child}/memory?addr={addr}&len=4"),
        "",
    );
    assert_eq!(read["data"], "00000000");
    let (_, regs) = call(&sock, "GET", &format!("/vms/{child}/regs"), "");
    assert_eq!(regs["rbx"], rbx);

    // Start it: memtouch runs to its exit.
    let (status, _) = call(&sock, "POST", &format!("/vms/{child}/resume"), "");
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + QUICK;
    loop {
        let (_, vm) = call(&sock, "GET", &format!("/vms/{child}"), "");
        if vm["status"] == "exited" {
            assert_eq!(vm["exit"], "guest exited with code 0", "{vm}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "fork did not finish");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // No snapshot is being written: the progress endpoint says so.
    let (status, progress) = call(&sock, "GET", &format!("/vms/{child}/snapshot"), "");
    assert_eq!(
        (status, progress["writing"].clone()),
        (200, Value::Bool(false))
    );

    let (status, _) = call(&sock, "DELETE", &format!("/vms/{root}"), "");
    assert_eq!(status, 204);
    let (status, _) = call(&sock, "POST", &format!("/vms/{root}/fork"), "");
    assert_eq!(status, 404, "fork of a destroyed VM");
    // Children outlive their parent.
    let (status, vm) = call(&sock, "GET", &format!("/vms/{}", kids[1]), "");
    assert_eq!(status, 200);
    assert_eq!(vm["status"], "created");
}

#[test]
fn bad_requests_get_clear_errors_and_harm_nothing() {
    let (_server, root, sock) = server("bad", Workload::Memtouch, &[(mailbox::PARAM0, 4)]);
    let cases: Vec<(&str, String, &str, u16)> = vec![
        ("POST", format!("/vms/{root}/fork"), "{not json", 400),
        (
            "POST",
            format!("/vms/{root}/fork"),
            r#"{"count": 1, "colour": "red"}"#,
            400,
        ),
        ("POST", format!("/vms/{root}/fork"), r#"{"count": 0}"#, 400),
        (
            "POST",
            format!("/vms/{root}/fork"),
            r#"{"count": 100000}"#,
            400,
        ),
        ("POST", format!("/vms/{root}/reset"), "", 409),
        (
            "POST",
            format!("/vms/{root}/reset"),
            r#"{"scope": "everything"}"#,
            400,
        ),
        ("POST", "/vms/12345/fork".into(), "", 404),
        ("GET", "/vms/abc".into(), "", 404),
        ("GET", "/nothing".into(), "", 404),
        ("PUT", format!("/vms/{root}/fork"), "", 405),
        ("POST", "/vms".into(), "{}", 405),
        (
            "GET",
            format!("/vms/{root}/memory?addr=0xffffffffff&len=16"),
            "",
            400,
        ),
        (
            "GET",
            format!("/vms/{root}/memory?addr=0&len=99999999"),
            "",
            400,
        ),
        ("GET", format!("/vms/{root}/memory?len=4"), "", 400),
        ("GET", format!("/vms/{root}/memory?addr=zz"), "", 400),
        (
            "PUT",
            format!("/vms/{root}/memory?addr=0"),
            r#"{"data": "abc"}"#,
            400,
        ),
        ("PATCH", format!("/vms/{root}/regs"), r#"{"xmm0": 1}"#, 400),
        ("PATCH", format!("/vms/{root}/regs"), r#"{"rax": -1}"#, 400),
        ("GET", format!("/vms/{root}/regs?vcpu=7"), "", 400),
        ("POST", format!("/vms/{root}/devices"), "", 400),
    ];
    for (method, path, body, want) in cases {
        let (status, reply) = call(&sock, method, &path, body);
        assert_eq!(status, want, "{method} {path} {body}: {reply}");
        if status != 204 {
            assert!(
                reply["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{reply}"
            );
        }
    }
    // Malformed framing.
    assert_eq!(raw(&sock, b"\x00\x01garbage\r\n\r\n").0, 400);
    let huge = format!(
        "POST /vms/{root}/fork HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        1u64 << 40
    );
    assert_eq!(raw(&sock, huge.as_bytes()).0, 413);
    assert_eq!(
        raw(&sock, b"POST /vms HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}").0,
        400
    );

    // The VM is unharmed: it still forks and its fork runs to a clean exit.
    let (status, body) = call(
        &sock,
        "POST",
        &format!("/vms/{root}/fork"),
        r#"{"paused": true, "no_devices": true}"#,
    );
    assert_eq!(status, 201, "{body}");
    let child = body["children"][0]["id"].as_u64().unwrap();
    let (status, _) = call(&sock, "POST", &format!("/vms/{child}/devices"), "");
    assert_eq!(status, 200);
    let (status, again) = call(&sock, "POST", &format!("/vms/{child}/devices"), "");
    assert_eq!(status, 400, "attach twice: {again}");
}

#[test]
fn a_live_socket_is_not_taken_over() {
    let (_server, _, sock) = server("taken", Workload::Hello, &[]);
    let err = ApiServer::start(&sock, Registry::new(None)).err().unwrap();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn snapshot_verify_merge_and_restore_over_the_socket() {
    let (_server, root, sock) = server("snap", Workload::Memtouch, &[(mailbox::PARAM0, 4)]);
    let dir = std::env::temp_dir().join(format!("vmfork-test-{}-apisnap", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let at = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let snapshot = |body: Value| {
        call(
            &sock,
            "POST",
            &format!("/vms/{root}/snapshot"),
            &body.to_string(),
        )
    };

    let (status, full) = snapshot(serde_json::json!({ "path": at("full") }));
    assert_eq!(status, 201, "{full}");
    // The guest runs (writes its pages), then a diff on top of the full one.
    let (status, _) = call(&sock, "POST", &format!("/vms/{root}/resume"), "");
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + QUICK;
    while call(&sock, "GET", &format!("/vms/{root}"), "").1["status"] != "exited" {
        assert!(
            std::time::Instant::now() < deadline,
            "memtouch did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (status, diff) = snapshot(serde_json::json!({ "path": at("diff"), "diff": true }));
    assert_eq!(
        (status, diff["diff"].clone()),
        (201, Value::Bool(true)),
        "{diff}"
    );

    let verify = |path: String| {
        call(
            &sock,
            "POST",
            "/snapshots/verify",
            &serde_json::json!({ "path": path }).to_string(),
        )
    };
    let (status, ok) = verify(at("diff"));
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["snapshots_checked"], 2);

    let merge = serde_json::json!({ "path": at("diff"), "out": at("merged") }).to_string();
    let (status, merged) = call(&sock, "POST", "/snapshots/merge", &merge);
    assert_eq!(
        (status, merged["diff"].clone()),
        (201, Value::Bool(false)),
        "{merged}"
    );
    let (status, _) = call(&sock, "POST", "/snapshots/merge", &merge);
    assert_eq!(status, 400, "an existing snapshot is never overwritten");

    // Restored twice, paused: forks of the snapshot that reset.
    let restore = serde_json::json!({ "path": at("merged"), "count": 2, "paused": true });
    let (status, restored) = call(&sock, "POST", "/snapshots/restore", &restore.to_string());
    assert_eq!(status, 201, "{restored}");
    let vms = restored["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0]["restored_from"], merged["id"]);
    assert_eq!(vms[0]["is_fork"], true);
    // How far the restored TSC is from the saved one: a number (the snapshot's age at most).
    assert!(vms[0]["tsc_jump_at_load_ns"].is_i64(), "{}", vms[0]);
    // Rewiring names one VM's endpoints, of devices it has.
    for (request, needle) in [
        (
            serde_json::json!({ "path": at("merged"), "count": 2, "tap": "vmf-x" }),
            "count must be 1",
        ),
        (
            serde_json::json!({ "path": at("merged"), "vsock_path": "v.sock" }),
            "no vsock",
        ),
    ] {
        let (status, reply) = call(&sock, "POST", "/snapshots/restore", &request.to_string());
        assert_eq!(status, 400, "{reply}");
        assert!(reply.to_string().contains(needle), "{reply}");
    }
    let (status, _) = call(&sock, "POST", &format!("/vms/{}/reset", vms[0]["id"]), "");
    assert_eq!(status, 200);

    // A corrupt base: verifying the diff names the base's memory file.
    let memory = dir.join("full").join(vmfork::snapshot::MEMORY_FILE);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xaa; 4096], 0x200000).unwrap();
    let (status, bad) = verify(at("diff"));
    assert_eq!(status, 400, "{bad}");
    let message = bad["error"].as_str().unwrap();
    assert!(
        message.contains("full") && message.contains("corrupt"),
        "{message}"
    );
    let (status, _) = verify(at("nonesuch"));
    assert_eq!(status, 400);
    std::fs::remove_dir_all(&dir).unwrap();
}
