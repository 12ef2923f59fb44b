//! Turning CLI arguments into something to boot: a built-in guest, an ELF or a flat binary.

use crate::units::{parse_number, parse_size};
use crate::CliResult;
use clap::Args;
use guests::Workload;
use std::path::PathBuf;
use vmfork::boot::CpuFeature;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::{DiskConfig, NetConfig, VsockConfig};
use vmfork::VmConfig;

/// What to boot and how big the VM is.
#[derive(Args, Clone, Debug)]
pub struct GuestArgs {
    /// A built-in guest (see `vmfork guests`).
    #[arg(long, conflicts_with_all = ["kernel", "flat"])]
    pub guest: Option<String>,
    /// A kernel: an ELF (PVH note or 64-bit entry) or a Linux bzImage (its 64-bit entry).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// A flat binary, loaded at --load-addr and entered there in 64-bit mode.
    #[arg(long, conflicts_with = "kernel")]
    pub flat: Option<PathBuf>,
    #[arg(long, default_value = "0x100000", value_parser = parse_number)]
    pub load_addr: u64,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest RAM (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// A built-in guest's mailbox parameter, as INDEX=VALUE (0: pages/delay, 1: seed, 2: stop).
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(u64, u64)>,
    /// A virtio-blk disk, as PATH or PATH,ro (repeatable; slots 1 on). The image file is never
    /// written: the guest's writes stay in the VM's copy-on-write layer (snapshots keep them).
    #[arg(long = "disk", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-vsock, as CID,PATH: guests reach host sockets PATH_<port>; the VM listens at
    /// PATH (forks at PATH.<id>, or PATH.<pid>.<id> if another process holds that) for
    /// `CONNECT <port>` from host programs.
    #[arg(long, value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-net on a tap, as TAP[,MAC][,keep-mac]: forks get tap TAP-<id> (TAP-<pid>-<id>
    /// if another process holds that) and a new MAC (unless keep-mac).
    #[arg(long, value_parser = parse_net)]
    pub net: Option<NetConfig>,
    /// Complete the instructions KVM's emulator refuses (cmpxchg16b, int3) on hosts that
    /// emulate guest ring 0 (nested paravirtual KVM); not needed on bare metal.
    #[arg(long)]
    pub emulation_assist: bool,
    /// CPU features the guest does not see (CPUID bits cleared), comma-separated: xsave,
    /// avx512, rdrand, rdseed, tsx.
    #[arg(long, value_delimiter = ',', value_parser = parse_cpu_feature)]
    pub hide_cpu: Vec<CpuFeature>,
}

pub fn parse_cpu_feature(name: &str) -> Result<CpuFeature, String> {
    CpuFeature::from_name(name).ok_or_else(|| {
        let names: Vec<_> = CpuFeature::ALL.iter().map(|f| f.name()).collect();
        format!("unknown CPU feature '{name}' (known: {})", names.join(", "))
    })
}

pub fn parse_net(text: &str) -> Result<NetConfig, String> {
    let mut parts = text.split(',');
    let tap = parts.next().unwrap_or_default();
    if tap.is_empty() {
        return Err("an empty tap name (TAP[,MAC][,keep-mac])".into());
    }
    let mut config = NetConfig {
        tap: tap.into(),
        mac: None,
        keep_mac: false,
    };
    for part in parts {
        if part == "keep-mac" {
            config.keep_mac = true;
        } else {
            config.mac = Some(vmfork::devices::virtio::net::parse_mac(part)?);
        }
    }
    Ok(config)
}

pub fn parse_vsock(text: &str) -> Result<VsockConfig, String> {
    let (cid, path) = text
        .split_once(',')
        .ok_or_else(|| format!("'{text}' is not CID,PATH"))?;
    let guest_cid = parse_number(cid)?;
    if path.is_empty() {
        return Err("an empty vsock socket path".into());
    }
    Ok(VsockConfig {
        guest_cid,
        uds_path: PathBuf::from(path),
    })
}

pub fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match text.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some((_, other)) => {
            return Err(format!(
                "'{other}' after the disk path must be 'ro' or 'rw' (PATH[,ro])"
            ))
        }
        None => (text, false),
    };
    if path.is_empty() {
        return Err("an empty disk path".into());
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
    })
}

pub fn parse_param(text: &str) -> Result<(u64, u64), String> {
    let (index, value) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not INDEX=VALUE"))?;
    param(index, parse_number(value)?)
}

/// A mailbox parameter by index ("0", "1", "2") as (mailbox offset, value).
pub fn param(index: &str, value: u64) -> Result<(u64, u64), String> {
    let offset = match index {
        "0" => guests::layout::mailbox::PARAM0,
        "1" => guests::layout::mailbox::PARAM1,
        "2" => guests::layout::mailbox::PARAM2,
        _ => return Err(format!("parameter index '{index}' must be 0, 1 or 2")),
    };
    Ok((offset, value))
}

/// Looks up a built-in guest by name, with the list in the error.
pub fn workload(name: &str) -> CliResult<Workload> {
    Workload::from_name(name).ok_or_else(|| {
        let names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
        format!(
            "unknown guest '{name}' (built-in guests: {})",
            names.join(", ")
        )
    })
}

/// Reads a boot file: a regular file (never a FIFO or a device) no larger than the VM's RAM.
fn read(path: &std::path::Path, what: &str, max: u64) -> CliResult<Vec<u8>> {
    vmfork::files::read_regular(path, what, max).map_err(|e| e.to_string())
}

impl GuestArgs {
    pub fn config(&self) -> CliResult<VmConfig> {
        let vcpus = u8::try_from(self.vcpus)
            .ok()
            .filter(|n| (1..=vmfork::vm::MAX_VCPUS).contains(n))
            .ok_or_else(|| {
                format!(
                    "--vcpus {} is out of range (1 to {})",
                    self.vcpus,
                    vmfork::vm::MAX_VCPUS
                )
            })?;
        Ok(VmConfig {
            vcpus,
            mem_bytes: self.mem,
            disks: self.disks.clone(),
            vsock: self.vsock.clone(),
            net: self.net.clone(),
            emulation_assist: self.emulation_assist,
            hide_cpu_features: self.hide_cpu.clone(),
            ..VmConfig::default()
        })
    }

    pub fn boot_spec(&self) -> CliResult<BootSpec> {
        let chosen = [
            self.guest.is_some(),
            self.kernel.is_some(),
            self.flat.is_some(),
        ];
        if chosen.iter().filter(|&&c| c).count() > 1 {
            return Err("give one of guest, kernel and flat, not several".into());
        }
        let kernel = match (&self.guest, &self.kernel, &self.flat) {
            (Some(name), _, _) => Kernel::Elf(workload(name)?.elf()),
            (None, Some(path), _) => {
                let bytes = read(path, "kernel", self.mem)?;
                match Kernel::from_file(bytes) {
                    Kernel::Elf(bytes) if !bytes.starts_with(b"\x7fELF") => {
                        return Err(format!(
                            "{} is neither an ELF file nor a bzImage (use --flat for a flat \
                             binary)",
                            path.display()
                        ));
                    }
                    kernel => kernel,
                }
            }
            (None, None, Some(path)) => Kernel::Flat {
                image: read(path, "flat binary", self.mem)?,
                load_addr: self.load_addr,
            },
            (None, None, None) => {
                return Err("say what to boot: --guest NAME, --kernel PATH or --flat PATH".into())
            }
        };
        let mut spec = BootSpec::new(kernel);
        spec.cmdline = self.cmdline.clone();
        spec.initrd = match &self.initrd {
            Some(p) => Some(read(p, "initrd", self.mem)?),
            None => None,
        };
        Ok(spec)
    }

    /// Writes the mailbox parameters (built-in guests only).
    pub fn apply_params(&self, vm: &vmfork::Vm) -> CliResult<()> {
        for &(offset, value) in &self.params {
            vm.ram()
                .write_u64(guests::layout::MAILBOX + offset, value)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
