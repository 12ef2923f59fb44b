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
use vmfork::confine::data_dir::{default_data_dir, DataDir};
use vmfork::confine::{jail, privileges};
use vmfork::devices::SerialSink;
use vmfork::vm::KvmSystem;
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
    /// The only directory API requests may name files in (kernels, initrds, snapshots);
    /// paths resolve relative to it, and none may leave it (default: /var/lib/vmfork for root,
    /// else $XDG_STATE_HOME/vmfork). Created 0700 if missing.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run as this user (name or number) once /dev/kvm, the socket and the data directory
    /// are open; the data directory is given to it.
    #[arg(long)]
    pub uid: Option<String>,
    /// Run as this group (name or number; default: the --uid user's primary group).
    #[arg(long, requires = "uid")]
    pub gid: Option<String>,
    /// Let this group (name or number) use the socket too (mode 0660 instead of 0600).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Keep the capabilities the server started with (by default it gives up all of them
    /// once /dev/kvm, the socket and the data directory are open).
    #[arg(long, conflicts_with = "uid")]
    pub keep_capabilities: bool,
    /// Jail the server: new mount, network, IPC, UTS and PID namespaces, chrooted into the data
    /// directory (entered after /dev/kvm and the socket are open, before privileges drop).
    #[arg(long, conflicts_with = "keep_capabilities")]
    pub jail: bool,
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
    /// virtio-blk disks: [{"path": "disk.img", "read_only": false}].
    #[serde(default)]
    disks: Vec<vmfork::devices::DiskConfig>,
    /// A virtio-vsock: {"guest_cid": 3, "uds_path": "v.sock"}.
    vsock: Option<vmfork::devices::VsockConfig>,
    /// A virtio-net: {"tap": "vmf0", "mac": [2,0,0,0,0,1], "keep_mac": false}.
    net: Option<vmfork::devices::NetConfig>,
    /// Complete the instructions KVM's emulator refuses (hosts that emulate ring 0).
    #[serde(default)]
    emulation_assist: bool,
    /// CPU features the guest does not see: ["xsave", "avx512", "rdrand", "rdseed", "tsx"].
    #[serde(default)]
    hide_cpu_features: Vec<vmfork::boot::CpuFeature>,
    /// Leave the VM stopped after loading it.
    #[serde(default)]
    paused: bool,
}

/// Boots a VM for `POST /vms`; its console goes to an in-memory buffer (`GET /vms/ID/console`).
/// With `data_dir`, the files it names resolve inside it.
pub fn boot_from_json(
    body: &serde_json::Value,
    data_dir: Option<&DataDir>,
) -> Result<Vm, vmfork::Error> {
    let mut r: BootRequest = serde_json::from_value(body.clone())
        .map_err(|e| vmfork::Error::Invalid(format!("invalid boot request: {e}")))?;
    if let Some(dir) = data_dir {
        for path in [&mut r.kernel, &mut r.flat, &mut r.initrd]
            .into_iter()
            .flatten()
        {
            *path = dir.resolve(path)?;
        }
        for disk in &mut r.disks {
            disk.path = dir.resolve(&disk.path)?;
        }
        if let Some(vsock) = &mut r.vsock {
            vsock.uds_path = dir.resolve(&vsock.uds_path)?;
        }
    }
    boot_request(r).map_err(vmfork::Error::Invalid)
}

fn boot_request(r: BootRequest) -> CliResult<Vm> {
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
        disks: r.disks,
        vsock: r.vsock,
        net: r.net,
        emulation_assist: r.emulation_assist,
        hide_cpu: r.hide_cpu_features,
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
    let identity = match &args.uid {
        Some(user) => {
            let mut who = privileges::lookup_user(user).map_err(|e| e.to_string())?;
            if let Some(group) = &args.gid {
                who.gid = privileges::lookup_group(group).map_err(|e| e.to_string())?;
            }
            Some(who)
        }
        None => None,
    };
    let socket_group = args
        .socket_group
        .as_deref()
        .map(privileges::lookup_group)
        .transpose()
        .map_err(|e| e.to_string())?;
    // Everything that needs privileges first: /dev/kvm, the data directory, the socket.
    KvmSystem::get().map_err(|e| e.to_string())?;
    let data_dir = DataDir::open(&args.data_dir.unwrap_or_else(default_data_dir))
        .map_err(|e| e.to_string())?;
    if let Some(who) = identity {
        std::os::unix::fs::chown(data_dir.root(), Some(who.uid), Some(who.gid)).map_err(|e| {
            format!(
                "cannot give {} to uid {}: {e}",
                data_dir.root().display(),
                who.uid
            )
        })?;
    }
    let socket = ApiServer::bind(&args.sock.path, socket_group).map_err(|e| e.to_string())?;
    let data_dir = if args.jail {
        match jail::enter(data_dir.root()).map_err(|e| e.to_string())? {
            jail::Side::Jailed => data_dir.jailed(),
            jail::Side::Outside(child) => {
                // The parent only waits: it needs no privileges either.
                drop(socket);
                privileges::drop_privileges(None).map_err(|e| e.to_string())?;
                let status = jail::wait_for(child, interrupt::interrupted);
                // The jailed server cannot reach its socket's path to remove it.
                let _ = std::fs::remove_file(&args.sock.path);
                return Ok(u8::try_from(status).unwrap_or(1));
            }
        }
    } else {
        data_dir
    };
    if !args.keep_capabilities {
        privileges::drop_privileges(identity).map_err(|e| e.to_string())?;
    }
    let boot_dir = data_dir.clone();
    let registry = Registry::confined(
        Some(Box::new(move |body| boot_from_json(body, Some(&boot_dir)))),
        limits,
        Some(data_dir),
    );
    let server = socket.serve(registry.clone()).map_err(|e| e.to_string())?;
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
