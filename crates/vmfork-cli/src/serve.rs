//! `vmfork serve`: a daemon hosting many VM families behind the control API, and the boot
//! function behind its `POST /vms`.

use crate::control::SocketArg;
use crate::guest_args::GuestArgs;
use crate::units::parse_size;
use crate::{interrupt, CliResult};
use clap::Args;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use vmfork::api::{ApiServer, Limits, Registry};
use vmfork::devices::SerialSink;
use vmfork::Vm;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub sock: SocketArg,
    /// Most VMs hosted at once (every fork and restore counts); more are refused with 429.
    #[arg(long, default_value_t = Limits::default().max_vms)]
    pub max_vms: usize,
    /// Most guest RAM hosted at once, the sum of the VMs' RAM sizes (K/M/G/T); more is
    /// refused with 507.
    #[arg(long, default_value = "64T", value_parser = parse_size)]
    pub max_guest_ram: u64,
    /// Most snapshots written at once; more are refused with 429.
    #[arg(long, default_value_t = Limits::default().max_snapshots_in_flight)]
    pub max_snapshots: usize,
}

/// The body of `POST /vms`: the same choices as `vmfork run`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BootRequest {
    guest: Option<String>,
    kernel: Option<PathBuf>,
    flat: Option<PathBuf>,
    load_addr: Option<u64>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    /// RAM with K/M/G suffix, e.g. "256M".
    mem: Option<String>,
    vcpus: Option<u32>,
    /// Mailbox parameters of the built-in guests: {"0": 16, "1": 7}.
    #[serde(default)]
    params: BTreeMap<String, u64>,
    /// Leave the VM stopped after loading it.
    #[serde(default)]
    paused: bool,
}

/// Boots a VM for `POST /vms`; its console goes to an in-memory buffer (`GET /vms/ID/console`).
pub fn boot_from_json(body: &serde_json::Value) -> Result<Vm, String> {
    let r: BootRequest =
        serde_json::from_value(body.clone()).map_err(|e| format!("invalid boot request: {e}"))?;
    let params = r
        .params
        .iter()
        .map(|(k, v)| crate::guest_args::param(k, *v))
        .collect::<CliResult<Vec<_>>>()?;
    let guest = GuestArgs {
        guest: r.guest,
        kernel: r.kernel,
        flat: r.flat,
        load_addr: r.load_addr.unwrap_or(0x10_0000),
        initrd: r.initrd,
        cmdline: r.cmdline,
        mem: parse_size(r.mem.as_deref().unwrap_or("256M"))?,
        vcpus: r.vcpus.unwrap_or(1),
        params,
    };
    let (sink, _) = SerialSink::buffer();
    let vm = Vm::boot(guest.config()?, sink, &guest.boot_spec()?).map_err(|e| e.to_string())?;
    guest.apply_params(&vm)?;
    if !r.paused {
        vm.start().map_err(|e| e.to_string())?;
    }
    Ok(vm)
}

pub fn serve(args: ServeArgs) -> CliResult<u8> {
    interrupt::install()?;
    let limits = Limits {
        max_vms: args.max_vms,
        max_guest_ram: args.max_guest_ram,
        max_snapshots_in_flight: args.max_snapshots,
    };
    let registry = Registry::with_limits(Some(Box::new(boot_from_json)), limits);
    let server = ApiServer::start(&args.sock.path, registry.clone()).map_err(|e| e.to_string())?;
    eprintln!(
        "vmfork: serving the control API on {}",
        server.path().display()
    );
    while !interrupt::interrupted() {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
    registry.destroy_all();
    Ok(0)
}
