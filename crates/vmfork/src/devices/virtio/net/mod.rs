//! virtio-net (virtio 1.2, 5.1) on a host tap device: one rx and one tx queue, no offloads
//! (frames carry a zeroed 12-byte virtio_net_hdr). Like the vsock it is served by a worker (the
//! tap is waited on there; the guest's notify only wakes it).
//!
//! The tap and the MAC are the VM's network identity, so forks and restores get their own:
//! a new tap named `<tap>-<VM id>` (cut to the 15 bytes an interface name holds; with the process
//! id inserted when another vmfork process's VM holds that name) and, unless
//! `keep_mac`, a new random locally administered MAC in the device's config space. Frames in
//! flight are not forked. The interface goes away with the VM.

pub mod tap;

use super::worker::{Wakeup, WorkerHandle};
use super::{DeviceSpecific, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use std::io::{ErrorKind, Read, Write};
use tap::Tap;
use virtio_queue::{Queue, QueueT};

/// virtio device id.
pub const TYPE_NET: u32 = 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const RX: usize = 0;
const TX: usize = 1;
/// virtio_net_hdr_v1 (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers).
const NET_HDR: usize = 12;
/// The largest frame taken from either side (no offloads: an MTU-sized frame and then some).
const MAX_FRAME: usize = 65_550;

/// How a VM's network device is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The root VM's tap interface (created if it does not exist); forks and restores get
    /// `<tap>-<VM id>` (`<tap>-<pid>-<VM id>` when a VM of another vmfork process holds that).
    pub tap: String,
    /// The root VM's MAC; a random locally administered one if not given.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    /// Forks and restores keep the MAC they were made from instead of getting a new one.
    #[serde(default)]
    pub keep_mac: bool,
}

/// What a fork or snapshot carries of the network device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub config: NetConfig,
    pub mac: [u8; 6],
}

/// A random locally administered unicast MAC.
pub fn random_mac() -> crate::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    getrandom::fill(&mut mac)
        .map_err(|e| crate::Error::Io(std::io::Error::other(format!("getrandom: {e}"))))?;
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

/// `<base>-<id>`, the base cut so the whole fits an interface name.
fn fork_tap_name(base: &str, vm_id: u64) -> String {
    tap_name_with(base, &format!("-{vm_id}"))
}

/// `<base>-<pid>-<id>`: a fork's tap when a VM of another vmfork process (whose ids count from
/// 1 too) holds `<base>-<id>`.
fn fork_tap_name_of_process(base: &str, vm_id: u64, pid: u32) -> String {
    tap_name_with(base, &format!("-{pid}-{vm_id}"))
}

fn tap_name_with(base: &str, suffix: &str) -> String {
    let keep = tap::MAX_NAME.saturating_sub(suffix.len()).min(base.len());
    format!("{}{suffix}", &base[..keep])
}

/// Opens a fork's tap, under the process-qualified name if another process holds the plain one
/// (TUNSETIFF: EBUSY).
fn open_fork_tap(base: &str, vm_id: u64) -> std::io::Result<Tap> {
    match Tap::open(&fork_tap_name(base, vm_id)) {
        Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
            Tap::open(&fork_tap_name_of_process(base, vm_id, std::process::id()))
        }
        other => other,
    }
}

fn io_error(what: &str, e: std::io::Error) -> crate::Error {
    crate::devices::DeviceError::host("virtio-net", what, e)
}

/// The network device.
pub struct Net {
    config: NetConfig,
    mac: [u8; 6],
    tap: Option<Tap>,
    /// Open `config.tap` itself at start rather than a per-clone name.
    exact_tap: bool,
    wakeup: Wakeup,
    /// A frame read from the tap that no rx buffer has taken yet.
    pending: Option<Vec<u8>>,
    buffer: Vec<u8>,
}

impl Net {
    /// The root VM's device: its tap opened now (a clear error if it cannot be).
    pub fn new(config: &NetConfig) -> crate::Result<Self> {
        let mac = match config.mac {
            Some(mac) if mac[0] & 1 == 0 => mac,
            Some(mac) => {
                return Err(crate::devices::DeviceError::config(format!(
                    "MAC {} is a multicast address",
                    format_mac(&mac)
                )))
            }
            None => random_mac()?,
        };
        let mut net = Self::build(config.clone(), mac)?;
        let tap = Tap::open(&config.tap).map_err(|e| io_error("cannot open the tap", e))?;
        net.wakeup.watch(tap.fd());
        net.tap = Some(tap);
        Ok(net)
    }

    /// A fork's or restore's device: a new MAC (unless kept); its tap opens with its worker.
    /// A fork's or a restored VM's device: a new MAC unless `keep_mac`; at its start, the tap
    /// `<tap>-<VM id>`, or `tap` itself when `exact` (a rewired restore: see
    /// [`crate::devices::Rewiring`]).
    pub fn from_state(state: &NetState, exact: bool) -> crate::Result<Self> {
        let mac = if state.config.keep_mac {
            state.mac
        } else {
            random_mac()?
        };
        let mut net = Self::build(state.config.clone(), mac)?;
        net.exact_tap = exact;
        Ok(net)
    }

    fn build(config: NetConfig, mac: [u8; 6]) -> crate::Result<Self> {
        Ok(Self {
            config,
            mac,
            tap: None,
            exact_tap: false,
            wakeup: Wakeup::new().map_err(|e| io_error("its worker's wake-up", e))?,
            pending: None,
            buffer: vec![0u8; MAX_FRAME],
        })
    }

    /// The device's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The guest's frames, to the tap.
    fn serve_tx(&mut self, queue: &mut Queue, memory: &GuestMemory) -> bool {
        let mut used = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(memory) {
                let len = reader.available_bytes().min(MAX_FRAME);
                let frame = &mut self.buffer[..len];
                if len > NET_HDR && reader.read_exact(frame).is_ok() {
                    if let Some(tap) = &self.tap {
                        // A full tap queue drops the frame, as a congested link would.
                        let _ = tap.write_frame(&frame[NET_HDR..]);
                    }
                }
            }
            if queue.add_used(memory, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// The tap's frames, to the guest's rx buffers.
    fn serve_rx(&mut self, queue: &mut Queue, memory: &GuestMemory) -> bool {
        let mut used = false;
        for _ in 0..queue.size() {
            let frame = match self.pending.take() {
                Some(frame) => frame,
                None => {
                    let Some(tap) = &self.tap else { break };
                    match tap.read_frame(&mut self.buffer) {
                        Ok(n) => self.buffer[..n].to_vec(),
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break, // WouldBlock, or the tap is gone
                    }
                }
            };
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(memory) {
                Ok(mut w) if w.available_bytes() >= NET_HDR + frame.len() => {
                    let mut header = [0u8; NET_HDR];
                    header[10] = 1; // num_buffers
                    w.write_all(&header).is_ok() && w.write_all(&frame).is_ok()
                }
                // Too small a buffer for the frame: the frame is dropped.
                _ => false,
            };
            let len = if written { NET_HDR + frame.len() } else { 0 };
            if queue.add_used(memory, head, len as u32).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

/// `02:ab:...` for messages.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A MAC written as six hex bytes separated by colons.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "'{text}' is not a MAC (six hex bytes, colon-separated)"
        ));
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| format!("'{text}' is not a MAC (six hex bytes, colon-separated)"))?;
    }
    Ok(mac)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[256, 256]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_bytes(&self.mac, offset, data);
    }

    fn serve_on_notify(&mut self, _index: usize) -> bool {
        self.wakeup.kick();
        false
    }

    fn serve(&mut self, _index: usize, _queues: &mut [Queue], _memory: &GuestMemory) -> bool {
        false // served by the worker (serve_host)
    }

    fn serve_host(&mut self, queues: &mut [Queue], memory: &GuestMemory) -> bool {
        self.wakeup.take_kick();
        let mut used = false;
        if let Some(tx) = queues.get_mut(TX) {
            used |= self.serve_tx(tx, memory);
        }
        if let Some(rx) = queues.get_mut(RX) {
            used |= self.serve_rx(rx, memory);
        }
        used
    }

    fn start_worker(&mut self, worker: WorkerHandle) -> crate::Result<()> {
        if self.tap.is_none() {
            let tap = if self.exact_tap {
                Tap::open(&self.config.tap)
            } else {
                open_fork_tap(&self.config.tap, worker.vm_id)
            }
            .map_err(|e| io_error("cannot open the tap", e))?;
            self.wakeup.watch(tap.fd());
            self.tap = Some(tap);
        }
        self.wakeup.spawn("vmfork-net", worker)
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "net",
            "tap": self.tap.as_ref().map(|t| t.name().to_string()),
            "mac": format_mac(&self.mac),
        })
    }

    fn save(&mut self) -> DeviceSpecific {
        DeviceSpecific::Net(NetState {
            config: self.config.clone(),
            mac: self.mac,
        })
    }

    fn config_changed(&self, loaded: &DeviceSpecific) -> bool {
        matches!(loaded, DeviceSpecific::Net(s) if s.mac != self.mac)
    }

    fn load(&mut self, state: &DeviceSpecific) -> crate::Result<()> {
        let DeviceSpecific::Net(state) = state else {
            return Err(crate::devices::DeviceError::state(
                "a network device's saved state is another device's",
            ));
        };
        if state.config != self.config {
            return Err(crate::devices::DeviceError::state(
                "saved network state is for another network configuration",
            ));
        }
        // The MAC and tap are this VM's identity and stay; a frame waiting is dropped.
        self.pending = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_macs() {
        assert_eq!(fork_tap_name("vmf0", 17), "vmf0-17");
        assert_eq!(fork_tap_name("a-very-long-tap", 123456), "a-very-l-123456");
        assert!(fork_tap_name("a-very-long-tap", 123456).len() <= tap::MAX_NAME);
        assert_eq!(fork_tap_name_of_process("vmf0", 3, 4242), "vmf0-4242-3");
        assert_eq!(
            fork_tap_name_of_process("lnxtap0", 12, 4194304),
            "lnxt-4194304-12"
        );
        let mac = random_mac().unwrap();
        assert_eq!(mac[0] & 3, 2, "locally administered unicast");
        assert_eq!(parse_mac(&format_mac(&mac)).unwrap(), mac);
        assert!(parse_mac("01:02:03").is_err());
        assert!(parse_mac("zz:02:03:04:05:06").is_err());
        for bad in ["", "this-name-is-too-long", "sp ace", "a/b"] {
            assert!(Tap::open(bad).is_err(), "{bad:?}");
        }
    }
}
