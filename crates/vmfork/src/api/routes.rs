//! The API's routes: what each method and path does.

use super::http::{Request, Response};
use super::{error_response, registers, Registry};
use crate::devices::SerialSink;
use crate::fork::{ForkOptions, ResetScope};
use crate::snapshot::{Snapshot, SnapshotOptions};
use crate::vm::{Vm, VmStatus};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Most children one fork request may create.
pub const MAX_FORKS_PER_REQUEST: usize = 256;
/// Most bytes one memory request may read or write.
pub const MAX_MEMORY_IO: usize = 1 << 20;

type Reply = Result<Response, Response>;

fn bad(message: impl Into<String>) -> Response {
    Response::error(400, message)
}

fn lib<T>(r: crate::Result<T>) -> Result<T, Response> {
    r.map_err(|e| error_response(&e))
}

/// Parses a JSON body (empty means `{}`) into `T`, refusing unknown fields.
fn body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, Response> {
    let text: &[u8] = if req.body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(text).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

fn query<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A number from the query string: decimal or 0x-hex.
fn query_number(req: &Request, name: &str) -> Result<Option<u64>, Response> {
    query(req, name)
        .map(|text| {
            parse_number(text)
                .ok_or_else(|| bad(format!("query parameter {name}={text} is not a number")))
        })
        .transpose()
}

/// A number written in decimal or 0x-hex.
pub fn parse_number(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

pub fn handle(registry: &Registry, req: &Request) -> Response {
    route(registry, req).unwrap_or_else(|e| e)
}

fn route(registry: &Registry, req: &Request) -> Reply {
    let parts: Vec<&str> = req.path.split('/').filter(|p| !p.is_empty()).collect();
    let method = req.method.as_str();
    match parts.as_slice() {
        ["vms"] => match method {
            "GET" => Ok(Response::json(200, list(registry))),
            "POST" => boot(registry, req),
            _ => Err(not_allowed(method, "GET, POST")),
        },
        ["snapshots", "restore"] => match method {
            "POST" => restore(registry, req),
            _ => Err(not_allowed(method, "POST")),
        },
        ["snapshots", "info"] => match method {
            "POST" => snapshot_info(registry, req),
            _ => Err(not_allowed(method, "POST")),
        },
        ["snapshots", "verify"] => match method {
            "POST" => snapshot_verify(registry, req),
            _ => Err(not_allowed(method, "POST")),
        },
        ["snapshots", "merge"] => match method {
            "POST" => snapshot_merge(registry, req),
            _ => Err(not_allowed(method, "POST")),
        },
        ["vms", id, rest @ ..] => {
            let id: u64 = id
                .parse()
                .map_err(|_| Response::error(404, format!("no VM '{id}': ids are numbers")))?;
            let vm = registry
                .get(id)
                .ok_or_else(|| Response::error(404, format!("no VM {id}")))?;
            vm_route(registry, &vm, method, rest, req)
        }
        _ => Err(Response::error(404, format!("no route {}", req.path))),
    }
}

fn not_allowed(method: &str, allowed: &str) -> Response {
    Response::error(
        405,
        format!("{method} is not allowed here (allowed: {allowed})"),
    )
}

fn vm_route(
    registry: &Registry,
    vm: &Arc<Vm>,
    method: &str,
    rest: &[&str],
    req: &Request,
) -> Reply {
    match (rest, method) {
        ([], "GET") => Ok(Response::json(200, describe(vm))),
        ([], "DELETE") => {
            registry.destroy(vm.id());
            Ok(Response::no_content())
        }
        ([], _) => Err(not_allowed(method, "GET, DELETE")),
        (["fork"], "POST") => fork(registry, vm, req),
        (["snapshot"], "POST") => {
            let _ticket = lib(registry.snapshot_ticket())?;
            snapshot(registry, vm, req)
        }
        (["snapshot"], "GET") => Ok(Response::json(
            200,
            match vm.snapshot_progress() {
                Some(progress) => json!({ "writing": true, "progress": progress }),
                None => json!({ "writing": false }),
            },
        )),
        (["reset"], "POST") => reset(vm, req),
        (["pause"], "POST") => {
            lib(vm.pause())?;
            Ok(Response::json(200, describe(vm)))
        }
        (["resume"], "POST") => {
            resume(vm)?;
            Ok(Response::json(200, describe(vm)))
        }
        (["devices"], "POST") => {
            let sink = match vm.serial() {
                Some(buffer) => SerialSink::Buffer(buffer.clone()),
                None => SerialSink::Discard,
            };
            lib(vm.attach_devices(sink))?;
            Ok(Response::json(200, describe(vm)))
        }
        (["regs"], "GET") => {
            let vcpu = query_number(req, "vcpu")?.unwrap_or(0) as usize;
            Ok(Response::json(
                200,
                registers::to_json(&lib(vm.registers(vcpu))?),
            ))
        }
        (["regs"], "PATCH") => {
            let vcpu = query_number(req, "vcpu")?.unwrap_or(0) as usize;
            let changes: Value = body(req)?;
            let _op = vm.exclusive();
            let mut regs = lib(vm.registers(vcpu))?;
            registers::patch(&mut regs, &changes).map_err(bad)?;
            vm.set_registers(vcpu, &regs).map_err(|e| match e {
                // KVM refuses values no CPU could hold (reserved CR4 bits, say): the request's.
                crate::Error::Kvm { source, .. } if source.errno() == libc::EINVAL => {
                    bad(format!("KVM refused these register values: {source}"))
                }
                other => error_response(&other),
            })?;
            Ok(Response::json(200, registers::to_json(&regs)))
        }
        (["memory"], "GET") => read_memory(vm, req),
        (["memory"], "PUT") => write_memory(vm, req),
        (["console"], "GET") => {
            let text = vm.serial().map(|b| b.text()).unwrap_or_default();
            Ok(Response::json(200, json!({ "output": text })))
        }
        ([op], _) if ["fork", "reset", "pause", "resume", "devices"].contains(op) => {
            Err(not_allowed(method, "POST"))
        }
        (["snapshot"], _) => Err(not_allowed(method, "GET, POST")),
        (["regs"], _) => Err(not_allowed(method, "GET, PATCH")),
        (["memory"], _) => Err(not_allowed(method, "GET, PUT")),
        (["console"], _) => Err(not_allowed(method, "GET")),
        _ => Err(Response::error(404, format!("no route {}", req.path))),
    }
}

/// Resumes a paused VM, or starts one that never ran (a new fork).
fn resume(vm: &Vm) -> Result<(), Response> {
    match vm.status() {
        VmStatus::Created => lib(vm.start()),
        _ => lib(vm.resume()),
    }
}

pub fn describe(vm: &Vm) -> Value {
    let private = if vm.status() == VmStatus::Running {
        None
    } else {
        vm.private_memory_bytes().ok()
    };
    json!({
        "id": vm.id(),
        "parent": vm.parent_id(),
        "status": vm.status().name(),
        "is_fork": vm.is_fork(),
        "restored_from": vm.restored_from(),
        "tsc_jump_at_load_ns": vm.tsc_jump_at_load_ns(),
        "vcpus": vm.vcpu_count(),
        "mem_bytes": vm.config().mem_bytes,
        "private_memory_bytes": private,
        "exit": vm.exit_reason().map(|r| r.to_string()),
        "devices": vm.describe_devices(),
    })
}

fn list(registry: &Registry) -> Value {
    Value::Array(registry.all().iter().map(|vm| describe(vm)).collect())
}

fn boot(registry: &Registry, req: &Request) -> Reply {
    let Some(boot) = &registry.boot else {
        return Err(Response::error(
            405,
            "this process hosts one VM family; start `vmfork serve` to create VMs over the API",
        ));
    };
    let spec: Value = body(req)?;
    lib(registry.room_for(1, 0))?;
    let vm = lib(boot(&spec))?;
    let vm = lib(registry.admit(vm))?;
    Ok(Response::json(201, describe(&vm)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkRequest {
    #[serde(default = "one")]
    count: usize,
    #[serde(default)]
    pause_parent: bool,
    #[serde(default)]
    no_devices: bool,
    #[serde(default)]
    block_interrupts: bool,
    /// Leave the children stopped (to inspect or write them first).
    #[serde(default)]
    paused: bool,
}

fn one() -> usize {
    1
}

fn fork(registry: &Registry, vm: &Vm, req: &Request) -> Reply {
    let r: ForkRequest = body(req)?;
    if r.count == 0 || r.count > MAX_FORKS_PER_REQUEST {
        return Err(bad(format!(
            "count {} must be 1 to {MAX_FORKS_PER_REQUEST}",
            r.count
        )));
    }
    let opts = ForkOptions {
        pause_parent: r.pause_parent,
        no_devices: r.no_devices,
        block_interrupts: r.block_interrupts,
        ..ForkOptions::default()
    };
    lib(registry.room_for(r.count, vm.config().mem_bytes))?;
    let sinks = (0..r.count).map(|_| SerialSink::buffer().0).collect();
    let children = lib(vm.fork_many(&opts, sinks))?;
    let mut described = Vec::new();
    for child in children {
        let child = lib(registry.admit(child))?;
        if !r.paused {
            lib(child.start())?;
        }
        described.push(describe(&child));
    }
    Ok(Response::json(201, json!({ "children": described })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    /// A directory that does not exist yet (or is empty), as the server sees paths; with
    /// `stream`, an existing file or FIFO to write one stream with the memory embedded into.
    path: String,
    #[serde(default)]
    diff: bool,
    #[serde(default)]
    stream: bool,
}

fn snapshot(registry: &Registry, vm: &Vm, req: &Request) -> Reply {
    let r: SnapshotRequest = body(req)?;
    let path = &lib(registry.path(&r.path))?;
    let report = if r.stream {
        if r.diff {
            return Err(bad("a stream snapshot is always full (no diff)"));
        }
        let out = crate::files::create_stream_target(path)
            .map_err(|e| bad(format!("cannot open {} for the stream: {e}", r.path)))?;
        lib(vm.snapshot_to_stream(out))?
    } else {
        lib(vm.snapshot(path, &SnapshotOptions { diff: r.diff }))?
    };
    Ok(Response::json(201, json!(report)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    path: String,
    #[serde(default = "one")]
    count: usize,
    #[serde(default)]
    paused: bool,
    /// Check the memory checksums (the whole diff chain's) before restoring.
    #[serde(default)]
    verify: bool,
    /// Turn the emulation assist on in the restored VMs (a snapshot does not record it).
    #[serde(default)]
    emulation_assist: bool,
    /// The tap the restored VM's network device uses, instead of `<tap>-<id>` (count 1).
    tap: Option<String>,
    /// Where the restored VM's vsock listens (and its guest's host sockets' base), instead of
    /// `<path>.<id>` (count 1; inside the data directory, like every path).
    vsock_path: Option<String>,
}

fn restore(registry: &Registry, req: &Request) -> Reply {
    let r: RestoreRequest = body(req)?;
    if r.count == 0 || r.count > MAX_FORKS_PER_REQUEST {
        return Err(bad(format!(
            "count {} must be 1 to {MAX_FORKS_PER_REQUEST}",
            r.count
        )));
    }
    let rewiring = crate::devices::Rewiring {
        tap: r.tap.clone(),
        vsock_path: r
            .vsock_path
            .as_deref()
            .map(|p| lib(registry.path(p)))
            .transpose()?,
    };
    if r.count > 1 && !rewiring.is_empty() {
        return Err(bad(format!(
            "tap and vsock_path name one VM's endpoints: count must be 1, not {}",
            r.count
        )));
    }
    let snapshot = lib(registry.snapshots.open(&lib(registry.path(&r.path))?))?;
    within_data_dir(registry, &snapshot)?;
    if r.verify {
        lib(snapshot.verify())?;
    }
    lib(registry.room_for(r.count, snapshot.config().mem_bytes))?;
    let mut described = Vec::new();
    for _ in 0..r.count {
        let opts = ForkOptions {
            emulation_assist: r.emulation_assist,
            rewiring: rewiring.clone(),
            ..Default::default()
        };
        let vm = lib(registry.admit(lib(snapshot.restore_with(SerialSink::buffer().0, &opts))?))?;
        if !r.paused {
            lib(vm.start())?;
        }
        described.push(describe(&vm));
    }
    Ok(Response::json(
        201,
        json!({ "id": snapshot.id(), "vms": described }),
    ))
}

/// Opens the snapshot a request names, inside the server's data directory (its diff bases too).
fn open_snapshot(registry: &Registry, path: &str) -> Result<Snapshot, Response> {
    let snapshot = lib(Snapshot::open(&lib(registry.path(path))?))?;
    within_data_dir(registry, &snapshot)?;
    Ok(snapshot)
}

/// A diff names its bases by path: a planted snapshot must not lead the server out of its
/// data directory through them.
fn within_data_dir(registry: &Registry, snapshot: &Snapshot) -> Result<(), Response> {
    if registry.data_dir().is_some() {
        for base in snapshot.chain() {
            lib(registry.path(&base.to_string_lossy()))?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotInfoRequest {
    path: String,
}

fn snapshot_info(registry: &Registry, req: &Request) -> Reply {
    let r: SnapshotInfoRequest = body(req)?;
    let snapshot = open_snapshot(registry, &r.path)?;
    Ok(Response::json(200, snapshot.summary()))
}

/// Reads and checks all of a snapshot and its chain (memory included); a problem is a 400.
fn snapshot_verify(registry: &Registry, req: &Request) -> Reply {
    let r: SnapshotInfoRequest = body(req)?;
    let snapshot = open_snapshot(registry, &r.path)?;
    lib(snapshot.verify())?;
    Ok(Response::json(
        200,
        json!({ "id": snapshot.id(), "intact": true, "snapshots_checked": snapshot.chain().len() + 1 }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeRequest {
    path: String,
    out: String,
}

/// Folds a diff chain into a new full snapshot at `out`.
fn snapshot_merge(registry: &Registry, req: &Request) -> Reply {
    let r: MergeRequest = body(req)?;
    let snapshot = open_snapshot(registry, &r.path)?;
    let report = lib(snapshot.merge_into(&lib(registry.path(&r.out))?))?;
    Ok(Response::json(201, json!(report)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetRequest {
    /// "all" (default), "memory" or "state".
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    paused: bool,
}

fn reset(vm: &Vm, req: &Request) -> Reply {
    let r: ResetRequest = body(req)?;
    let scope = match r.scope.as_deref() {
        None | Some("all") => ResetScope::All,
        Some("memory") => ResetScope::MemoryOnly,
        Some("state") => ResetScope::StateOnly,
        Some(other) => {
            return Err(bad(format!(
                "scope '{other}' must be \"all\", \"memory\" or \"state\""
            )))
        }
    };
    if !vm.is_fork() {
        return Err(Response::error(
            409,
            format!(
                "VM {} is not a fork, so it has nothing to reset to",
                vm.id()
            ),
        ));
    }
    // Pause, reset and resume as one operation on the VM.
    let _op = vm.exclusive();
    if vm.status() == VmStatus::Running {
        lib(vm.pause())?;
    }
    let stats = lib(vm.reset_with(scope))?;
    if !r.paused {
        resume(vm)?;
    }
    let mut out = describe(vm);
    out["pages_restored"] = json!(stats.pages_restored);
    Ok(Response::json(200, out))
}

/// Where a memory request points: guest physical, or virtual through a vCPU's page tables.
fn memory_target(req: &Request) -> Result<(u64, Option<usize>), Response> {
    let addr = query_number(req, "addr")?.ok_or_else(|| bad("missing query parameter addr"))?;
    let vcpu = match query(req, "virtual") {
        None | Some("false") | Some("0") => None,
        Some("true") | Some("1") | Some("") => {
            Some(query_number(req, "vcpu")?.unwrap_or(0) as usize)
        }
        Some(other) => return Err(bad(format!("virtual={other} must be true or false"))),
    };
    Ok((addr, vcpu))
}

fn read_memory(vm: &Vm, req: &Request) -> Reply {
    let (addr, vcpu) = memory_target(req)?;
    let len = query_number(req, "len")?.unwrap_or(64) as usize;
    if len > MAX_MEMORY_IO {
        return Err(bad(format!(
            "len {len} is over the {MAX_MEMORY_IO}-byte limit"
        )));
    }
    let mut buf = vec![0u8; len];
    match vcpu {
        None => lib(vm.ram().read(addr, &mut buf))?,
        Some(v) => lib(vm.read_virtual(v, addr, &mut buf))?,
    }
    lib(vm.check_memory_intact())?;
    Ok(Response::json(
        200,
        json!({ "addr": addr, "len": len, "data": to_hex(&buf) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteMemory {
    /// Hex bytes.
    data: String,
}

fn write_memory(vm: &Vm, req: &Request) -> Reply {
    let (addr, vcpu) = memory_target(req)?;
    let w: WriteMemory = body(req)?;
    let data = from_hex(&w.data).ok_or_else(|| bad("data must be an even number of hex digits"))?;
    if data.len() > MAX_MEMORY_IO {
        return Err(bad(format!(
            "{} bytes is over the {MAX_MEMORY_IO}-byte limit",
            data.len()
        )));
    }
    let _op = vm.exclusive();
    if vm.status() == VmStatus::Running {
        return Err(Response::error(
            409,
            "the VM is running; pause it before writing its memory",
        ));
    }
    match vcpu {
        None => lib(vm.ram().write(addr, &data))?,
        Some(v) => lib(vm.write_virtual(v, addr, &data))?,
    }
    Ok(Response::json(
        200,
        json!({ "addr": addr, "len": data.len() }),
    ))
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
