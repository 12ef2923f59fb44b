//! The CLI verbs that drive a running vmfork process through its control API: fork, reset,
//! pause, resume, destroy, ls, regs, mem, console, attach-devices.

use crate::client::{request, DEFAULT_SOCKET};
use crate::units::parse_number;
use crate::CliResult;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The socket of the vmfork process to talk to.
#[derive(Args, Clone, Debug)]
pub struct SocketArg {
    /// The control socket (default: $VMFORK_API_SOCK, else /run/vmfork.sock).
    #[arg(long = "api-sock", env = "VMFORK_API_SOCK", default_value = DEFAULT_SOCKET)]
    pub path: PathBuf,
}

#[derive(Args)]
pub struct ForkArgs {
    /// The VM to fork (an id from `vmfork ls`).
    pub vm: u64,
    /// How many children.
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    pub count: usize,
    /// Leave the parent paused afterwards (Xen's behaviour).
    #[arg(long)]
    pub pause_parent: bool,
    /// vCPUs and memory only; `vmfork attach-devices` adds the devices later.
    #[arg(long)]
    pub no_devices: bool,
    /// No interrupts are injected into the children.
    #[arg(long)]
    pub block_interrupts: bool,
    /// Leave the children stopped (to inspect or write them before they run).
    #[arg(long)]
    pub paused: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

#[derive(Args)]
pub struct ResetArgs {
    pub vm: u64,
    #[arg(long, conflicts_with = "state_only")]
    pub memory_only: bool,
    #[arg(long)]
    pub state_only: bool,
    /// Leave the fork stopped after the reset.
    #[arg(long)]
    pub paused: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

#[derive(Args)]
pub struct VmArg {
    pub vm: u64,
    #[command(flatten)]
    pub sock: SocketArg,
}

#[derive(Args)]
pub struct RegsArgs {
    pub vm: u64,
    #[arg(long, default_value_t = 0)]
    pub vcpu: usize,
    /// Set a register, as NAME=VALUE (rax..r15, rip, rflags, cr0, cr2, cr3, cr4, cr8, efer).
    #[arg(long = "set", value_parser = parse_assignment)]
    pub set: Vec<(String, u64)>,
    #[command(flatten)]
    pub sock: SocketArg,
}

fn parse_assignment(text: &str) -> Result<(String, u64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not NAME=VALUE"))?;
    Ok((name.to_string(), parse_number(value)?))
}

/// Which VM and address a memory command works on.
#[derive(Args)]
pub struct MemTarget {
    pub vm: u64,
    #[arg(value_parser = parse_number)]
    pub addr: u64,
    /// ADDR is virtual, translated by the vCPU's page tables.
    #[arg(long)]
    pub r#virtual: bool,
    #[arg(long, default_value_t = 0)]
    pub vcpu: usize,
    #[command(flatten)]
    pub sock: SocketArg,
}

impl MemTarget {
    fn path(&self) -> String {
        format!(
            "/vms/{}/memory?addr={:#x}&virtual={}&vcpu={}",
            self.vm, self.addr, self.r#virtual, self.vcpu
        )
    }
}

#[derive(Subcommand)]
pub enum MemAction {
    /// Print guest memory as a hex dump.
    Read {
        #[command(flatten)]
        at: MemTarget,
        #[arg(default_value = "64", value_parser = parse_number)]
        len: u64,
    },
    /// Write hex bytes into guest memory (the VM must be paused).
    Write {
        #[command(flatten)]
        at: MemTarget,
        /// Bytes as hex, e.g. 90cc.
        hex: String,
    },
}

pub fn fork(a: ForkArgs) -> CliResult<u8> {
    let body = json!({
        "count": a.count,
        "pause_parent": a.pause_parent,
        "no_devices": a.no_devices,
        "block_interrupts": a.block_interrupts,
        "paused": a.paused,
    });
    let reply = request(
        &a.sock.path,
        "POST",
        &format!("/vms/{}/fork", a.vm),
        Some(&body),
    )?;
    for child in reply["children"].as_array().into_iter().flatten() {
        println!("{}", child["id"]);
    }
    Ok(0)
}

pub fn reset(a: ResetArgs) -> CliResult<u8> {
    let scope = if a.memory_only {
        "memory"
    } else if a.state_only {
        "state"
    } else {
        "all"
    };
    let body = json!({ "scope": scope, "paused": a.paused });
    let reply = request(
        &a.sock.path,
        "POST",
        &format!("/vms/{}/reset", a.vm),
        Some(&body),
    )?;
    println!(
        "VM {} reset ({scope}): {} pages restored, now {}",
        a.vm,
        reply["pages_restored"],
        reply["status"].as_str().unwrap_or("?")
    );
    Ok(0)
}

/// pause, resume, destroy, attach-devices: a POST or DELETE with no body.
pub fn simple(a: VmArg, action: &str) -> CliResult<u8> {
    let (method, path) = match action {
        "destroy" => ("DELETE", format!("/vms/{}", a.vm)),
        "attach-devices" => ("POST", format!("/vms/{}/devices", a.vm)),
        _ => ("POST", format!("/vms/{}/{action}", a.vm)),
    };
    let reply = request(&a.sock.path, method, &path, None)?;
    match reply["status"].as_str() {
        Some(status) => println!("VM {}: {status}", a.vm),
        None => println!("VM {}: destroyed", a.vm),
    }
    Ok(0)
}

pub fn ls(sock: SocketArg) -> CliResult<u8> {
    let reply = request(&sock.path, "GET", "/vms", None)?;
    let vms = reply.as_array().cloned().unwrap_or_default();
    let ids: Vec<u64> = vms.iter().filter_map(|v| v["id"].as_u64()).collect();
    let mut children: BTreeMap<Option<u64>, Vec<&Value>> = BTreeMap::new();
    for vm in &vms {
        // A child whose parent is gone is shown as a root.
        let parent = vm["parent"].as_u64().filter(|p| ids.contains(p));
        children.entry(parent).or_default().push(vm);
    }
    println!(
        "{:<12} {:<9} {:>6} {:>10} {:>14}",
        "ID", "STATE", "VCPUS", "RAM", "PRIVATE"
    );
    print_tree(&children, None, 0);
    Ok(0)
}

fn print_tree(children: &BTreeMap<Option<u64>, Vec<&Value>>, parent: Option<u64>, depth: usize) {
    for vm in children.get(&parent).into_iter().flatten() {
        let id = vm["id"].as_u64().unwrap_or(0);
        let label = format!("{}{id}", "  ".repeat(depth));
        let private = match vm["private_memory_bytes"].as_u64() {
            Some(b) => human(b),
            None => "-".into(),
        };
        println!(
            "{label:<12} {:<9} {:>6} {:>10} {:>14}",
            vm["status"].as_str().unwrap_or("?"),
            vm["vcpus"],
            human(vm["mem_bytes"].as_u64().unwrap_or(0)),
            private
        );
        print_tree(children, Some(id), depth + 1);
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 => format!("{:.1}M", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}K", b as f64 / 1024.0),
        b => format!("{b}B"),
    }
}

pub fn regs(a: RegsArgs) -> CliResult<u8> {
    let path = format!("/vms/{}/regs?vcpu={}", a.vm, a.vcpu);
    let reply = if a.set.is_empty() {
        request(&a.sock.path, "GET", &path, None)?
    } else {
        let changes: serde_json::Map<String, Value> =
            a.set.into_iter().map(|(k, v)| (k, json!(v))).collect();
        request(&a.sock.path, "PATCH", &path, Some(&Value::Object(changes)))?
    };
    let Some(map) = reply.as_object() else {
        return Err("the server sent no registers".into());
    };
    for (name, value) in map {
        match value.as_u64() {
            Some(n) => println!("{name:<10} {n:#018x}"),
            None => println!("{name:<10} {value}"),
        }
    }
    Ok(0)
}

pub fn mem(action: MemAction) -> CliResult<u8> {
    match action {
        MemAction::Read { at, len } => {
            let path = format!("{}&len={len}", at.path());
            let reply = request(&at.sock.path, "GET", &path, None)?;
            let data = vmfork::api::from_hex(reply["data"].as_str().unwrap_or(""))
                .ok_or("the server sent bad hex")?;
            for (i, line) in data.chunks(16).enumerate() {
                let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                let text: String = line
                    .iter()
                    .map(|&b| {
                        if b.is_ascii_graphic() || b == b' ' {
                            b as char
                        } else {
                            '.'
                        }
                    })
                    .collect();
                println!(
                    "{:016x}  {:<48} {text}",
                    at.addr + 16 * i as u64,
                    hex.join(" ")
                );
            }
            Ok(0)
        }
        MemAction::Write { at, hex } => {
            if vmfork::api::from_hex(&hex).is_none() {
                return Err(format!("'{hex}' is not an even number of hex digits"));
            }
            let body = json!({ "data": hex });
            let reply = request(&at.sock.path, "PUT", &at.path(), Some(&body))?;
            println!("wrote {} bytes at {:#x}", reply["len"], at.addr);
            Ok(0)
        }
    }
}

pub fn console(a: VmArg) -> CliResult<u8> {
    let reply = request(&a.sock.path, "GET", &format!("/vms/{}/console", a.vm), None)?;
    print!("{}", reply["output"].as_str().unwrap_or(""));
    Ok(0)
}
