//! Probe: DELETE of running `idle` forks over the control API, timed per request.
use guests::Workload;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;
use vmfork::api::{ApiServer, Registry};
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{ForkOptions, Vm, VmConfig};
fn call(sock: &std::path::Path, req: &str) -> std::time::Duration {
    let t = Instant::now();
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    t.elapsed()
}
fn main() {
    let vm = Vm::boot(
        VmConfig {
            mem_bytes: 1 << 30,
            ..Default::default()
        },
        SerialSink::Discard,
        &BootSpec::new(Kernel::Elf(Workload::Idle.elf())),
    )
    .unwrap();
    vm.start().unwrap();
    let registry = Registry::new(None);
    let parent = registry.add(vm);
    let sock = std::path::PathBuf::from("/tmp/probe-api.sock");
    let _server = ApiServer::start(&sock, std::sync::Arc::clone(&registry)).unwrap();
    let mut ids = Vec::new();
    for _ in 0..40 {
        let c = parent.fork(&ForkOptions::default()).unwrap();
        c.start().unwrap();
        ids.push(registry.add(c).id());
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    for id in ids.iter().take(5) {
        println!(
            "GET {:?}",
            call(
                &sock,
                &format!("GET /vms/{id} HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            )
        );
    }
    for id in ids {
        let t = Instant::now();
        let d = call(
            &sock,
            &format!("DELETE /vms/{id} HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
        );
        println!("DELETE {d:?} (total {:?})", t.elapsed());
    }
    parent.stop();
}
