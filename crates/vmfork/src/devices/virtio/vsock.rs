//! virtio-vsock (virtio 1.2, 5.10) bridged to Unix sockets on the host, as Firecracker does:
//! a guest connecting to the host (CID 2) port P reaches the socket `<uds_path>_P`; a host
//! program connecting to the VM's own socket and writing `CONNECT P\n` reaches the guest's
//! port P (and reads `OK <host port>\n` once the guest accepts). A root VM listens at
//! `uds_path`; a fork or a restore at `<uds_path>.<VM id>` (`<uds_path>.<pid>.<VM id>` when a VM
//! of another vmfork process listens there: VM ids are per process).
//!
//! Connections are host state, so they are not forked: a fork, a restore or a reset starts
//! with none, and the guest is told through a transport-reset event (virtio 1.2, 5.10.6.6)
//! so it drops the connections it had. The parent keeps its own.
//!
//! Packets are served on the device's worker (sockets are waited on there; a queue notify from
//! the guest only wakes it); a stream's bytes are written to the host as they come and read
//! from it only as far as the guest's credit goes.

use super::worker::{Wakeup, WorkerHandle};
use super::{DeviceSpecific, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

/// virtio device id.
pub const TYPE_VSOCK: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const HEADER: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const EVENT_TRANSPORT_RESET: u32 = 0;
/// What the device buffers per connection for the host side (its advertised buf_alloc).
const BUF_ALLOC: u32 = 256 << 10;
/// Largest payload the device puts in one packet.
const MAX_PAYLOAD: usize = 64 << 10;
/// Host ports the device gives host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Open connections (and pending `CONNECT` handshakes) a VM may have.
const MAX_CONNECTIONS: usize = 1024;

/// How a VM's vsock is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The host socket path: guests reach `<uds_path>_<port>`; the root VM listens here.
    pub uds_path: PathBuf,
}

/// What a fork or snapshot carries of the vsock: its configuration (connections are host
/// state and are reset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub config: VsockConfig,
}

/// A packet header (virtio_vsock_hdr), little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn parse(b: &[u8; HEADER]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn bytes(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// One stream between a guest port and a host socket.
struct Connection {
    stream: UnixStream,
    guest_port: u32,
    host_port: u32,
    /// The guest answered (or made) the request.
    established: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes of the guest's written to the host.
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    to_host: Vec<u8>,
}

impl Connection {
    fn new(stream: UnixStream, guest_port: u32, host_port: u32) -> Self {
        Self {
            stream,
            guest_port,
            host_port,
            established: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            to_host: Vec::new(),
        }
    }

    /// Bytes the guest can take now.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn write_to_host(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The vsock device.
pub struct Vsock {
    config: VsockConfig,
    /// Where this VM listens (root: `uds_path`; others: set when its worker starts).
    listen_path: Option<PathBuf>,
    listener: Option<UnixListener>,
    /// Whether this device is the root VM's (built from the config, not from saved state).
    root: bool,
    wakeup: Wakeup,
    connections: HashMap<(u32, u32), Connection>,
    /// Host sockets that connected to the listener and have not said `CONNECT P` yet.
    handshakes: Vec<(UnixStream, Vec<u8>)>,
    /// Packets without payload waiting for an rx buffer.
    control: VecDeque<Header>,
    reset_event: bool,
    next_host_port: u32,
}

fn io_error(what: &str, e: std::io::Error) -> crate::Error {
    crate::devices::DeviceError::host("vsock", what, e)
}

/// Binds a listening socket at `path`, replacing a socket file nobody listens on any more (left
/// by a process that died); a live listener there is `AddrInUse`.
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() && UnixStream::connect(path).is_err() {
        let is_socket = std::fs::symlink_metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            .unwrap_or(false);
        if is_socket {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path)
}

impl Vsock {
    /// The root VM's vsock, listening at `config.uds_path` once its worker starts.
    pub fn new(config: &VsockConfig) -> crate::Result<Self> {
        if config.guest_cid < 3 || config.guest_cid > u64::from(u32::MAX) {
            return Err(crate::devices::DeviceError::config(format!(
                "vsock guest CID {} must be 3 to {}",
                config.guest_cid,
                u32::MAX
            )));
        }
        Self::build(config.clone(), true)
    }

    /// A fork's or restore's vsock: no connections, the guest told of the reset.
    /// A fork's or a restored VM's vsock: it listens at `<uds_path>.<VM id>`, or at `uds_path`
    /// itself when `exact` (a rewired restore: see [`crate::devices::Rewiring`]).
    pub fn from_state(state: &VsockState, exact: bool) -> crate::Result<Self> {
        let mut vsock = Self::build(state.config.clone(), exact)?;
        vsock.reset_event = true;
        Ok(vsock)
    }

    fn build(config: VsockConfig, root: bool) -> crate::Result<Self> {
        Ok(Self {
            config,
            listen_path: None,
            listener: None,
            root,
            wakeup: Wakeup::new().map_err(|e| io_error("its worker's wake-up", e))?,
            connections: HashMap::new(),
            handshakes: Vec::new(),
            control: VecDeque::new(),
            reset_event: false,
            next_host_port: FIRST_HOST_PORT,
        })
    }

    /// The socket this VM listens on for host-initiated connections.
    pub fn listen_path(&self) -> Option<&Path> {
        self.listen_path.as_deref()
    }

    fn listen(&mut self, path: PathBuf) -> crate::Result<()> {
        let listener = bind(&path)
            .map_err(|e| io_error(&format!("cannot listen at {}", path.display()), e))?;
        self.listen_on(listener, path)
    }

    /// A fork's or restored VM's socket: `<uds_path>.<VM id>`, or, when a VM of another vmfork
    /// process (whose ids count from 1 too) listens there, `<uds_path>.<pid>.<VM id>`.
    fn listen_as_fork(&mut self, vm_id: u64) -> crate::Result<()> {
        let base = self.config.uds_path.display().to_string();
        let path = PathBuf::from(format!("{base}.{vm_id}"));
        match bind(&path) {
            Ok(listener) => self.listen_on(listener, path),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => self.listen(PathBuf::from(
                format!("{base}.{}.{vm_id}", std::process::id()),
            )),
            Err(e) => Err(io_error(&format!("cannot listen at {}", path.display()), e)),
        }
    }

    fn listen_on(&mut self, listener: UnixListener, path: PathBuf) -> crate::Result<()> {
        listener
            .set_nonblocking(true)
            .map_err(|e| io_error("listener", e))?;
        self.wakeup.watch(listener.as_raw_fd());
        self.listener = Some(listener);
        self.listen_path = Some(path);
        Ok(())
    }

    fn header(&self, c: &Connection, op: u16, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.config.guest_cid,
            src_port: c.host_port,
            dst_port: c.guest_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        }
    }

    fn reset_packet(&self, to: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.config.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }

    /// Drops every connection (a fork, restore or reset): the host sockets are closed.
    fn drop_connections(&mut self) {
        self.connections.clear();
        self.handshakes.clear();
        self.control.clear();
    }

    /// Host programs connecting to the listener, and their `CONNECT P` lines.
    fn accept_host_connections(&mut self) {
        if let Some(listener) = &self.listener {
            while let Ok((stream, _)) = listener.accept() {
                if self.handshakes.len() + self.connections.len() >= MAX_CONNECTIONS
                    || stream.set_nonblocking(true).is_err()
                {
                    continue;
                }
                self.wakeup.watch(stream.as_raw_fd());
                self.handshakes.push((stream, Vec::new()));
            }
        }
        let mut pending = std::mem::take(&mut self.handshakes);
        pending.retain_mut(|(stream, line)| {
            let mut byte = [0u8; 1];
            loop {
                match stream.read(&mut byte) {
                    Ok(1) if byte[0] == b'\n' => break,
                    Ok(1) if line.len() < 32 => line.push(byte[0]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    // EOF, an error or a line too long: dropped.
                    _ => return false,
                }
            }
            let port = std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.strip_prefix("CONNECT "))
                .and_then(|p| p.trim().parse::<u32>().ok());
            let (Some(port), Ok(stream)) = (port, stream.try_clone()) else {
                return false;
            };
            let host_port = self.next_host_port;
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            let c = Connection::new(stream, port, host_port);
            let mut request = self.header(&c, OP_REQUEST, 0);
            request.fwd_cnt = 0;
            self.control.push_back(request);
            self.connections.insert((port, host_port), c);
            false
        });
        self.handshakes.extend(pending);
    }

    /// One packet from the guest.
    fn take_guest_packet(&mut self, h: Header, payload: &[u8]) {
        if h.kind != TYPE_STREAM || h.src_cid != self.config.guest_cid || h.dst_cid != HOST_CID {
            if h.op != OP_RST {
                let rst = self.reset_packet(&h);
                self.control.push_back(rst);
            }
            return;
        }
        let key = (h.src_port, h.dst_port);
        if h.op == OP_REQUEST {
            self.connect_to_host(h);
            return;
        }
        let Some(c) = self.connections.get_mut(&key) else {
            if h.op != OP_RST {
                let rst = self.reset_packet(&h);
                self.control.push_back(rst);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if !c.established => {
                c.established = true;
                let ok = format!("OK {}\n", c.host_port);
                c.to_host.extend_from_slice(ok.as_bytes());
                let _ = c.write_to_host();
            }
            OP_RW if c.established => {
                if c.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    // The guest overran the credit it was given.
                    self.close(key, true);
                    return;
                }
                c.to_host.extend_from_slice(payload);
                if c.write_to_host().is_err() {
                    self.close(key, true);
                }
            }
            OP_CREDIT_REQUEST => {
                let update = self.header(&self.connections[&key], OP_CREDIT_UPDATE, 0);
                self.control.push_back(update);
            }
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => self.close(key, true),
            OP_RST => self.close(key, false),
            _ => self.close(key, true),
        }
    }

    fn connect_to_host(&mut self, h: Header) {
        let key = (h.src_port, h.dst_port);
        let path = format!("{}_{}", self.config.uds_path.display(), h.dst_port);
        let stream = (self.connections.len() < MAX_CONNECTIONS
            && !self.connections.contains_key(&key))
        .then(|| UnixStream::connect(&path).ok())
        .flatten()
        .filter(|s| s.set_nonblocking(true).is_ok());
        let Some(stream) = stream else {
            let rst = self.reset_packet(&h);
            self.control.push_back(rst);
            return;
        };
        self.wakeup.watch(stream.as_raw_fd());
        let mut c = Connection::new(stream, h.src_port, h.dst_port);
        c.established = true;
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let response = self.header(&c, OP_RESPONSE, 0);
        self.control.push_back(response);
        self.connections.insert(key, c);
    }

    fn close(&mut self, key: (u32, u32), tell_guest: bool) {
        if let Some(c) = self.connections.remove(&key) {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            if tell_guest {
                let rst = self.header(&c, OP_RST, 0);
                self.control.push_back(rst);
            }
        }
    }

    /// Reads the guest's packets from the tx queue.
    fn serve_tx(&mut self, queue: &mut Queue, memory: &GuestMemory) -> bool {
        let mut used = false;
        let mut payload = Vec::new();
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(memory) {
                let mut header = [0u8; HEADER];
                if reader.read_exact(&mut header).is_ok() {
                    let h = Header::parse(&header);
                    let len = (h.len as usize)
                        .min(reader.available_bytes())
                        .min(MAX_PAYLOAD);
                    payload.resize(len, 0);
                    if reader.read_exact(&mut payload).is_ok() {
                        self.take_guest_packet(h, &payload);
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

    /// Puts one packet in the next rx buffer; false when there is none (or it is too small).
    fn to_guest(queue: &mut Queue, memory: &GuestMemory, header: &Header, payload: &[u8]) -> bool {
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            return false;
        };
        let head = chain.head_index();
        let written = match chain.writer(memory) {
            Ok(mut w) if w.available_bytes() >= HEADER + payload.len() => {
                w.write_all(&header.bytes()).is_ok() && w.write_all(payload).is_ok()
            }
            _ => false,
        };
        let len = if written { HEADER + payload.len() } else { 0 };
        queue.add_used(memory, head, len as u32).is_ok() && written
    }

    /// Fills the rx queue: control packets first, then the host's bytes within the guest's
    /// credit.
    fn serve_rx(&mut self, queue: &mut Queue, memory: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(h) = self.control.front().copied() {
            if !Self::to_guest(queue, memory, &h, &[]) {
                return used;
            }
            self.control.pop_front();
            used = true;
        }
        let mut closed = Vec::new();
        let mut buf = vec![0u8; MAX_PAYLOAD];
        let keys: Vec<_> = self.connections.keys().copied().collect();
        for key in keys {
            let Some(c) = self.connections.get_mut(&key) else {
                continue;
            };
            if !c.established {
                continue;
            }
            loop {
                let room = (c.credit() as usize).min(MAX_PAYLOAD);
                if room == 0 {
                    break;
                }
                // Look for a buffer (and its size) before taking bytes off the socket.
                let Some(chain) = queue.pop_descriptor_chain(memory) else {
                    return used;
                };
                let fits = chain
                    .writer(memory)
                    .map_or(0, |w| w.available_bytes().saturating_sub(HEADER));
                queue.go_to_previous_position();
                if fits == 0 {
                    // A buffer too small for any payload: a broken driver; leave the stream.
                    break;
                }
                let room = room.min(fits);
                match c.stream.read(&mut buf[..room]) {
                    Ok(0) => {
                        closed.push(key);
                        break;
                    }
                    Ok(n) => {
                        let mut h = Header {
                            src_cid: HOST_CID,
                            dst_cid: self.config.guest_cid,
                            src_port: c.host_port,
                            dst_port: c.guest_port,
                            len: n as u32,
                            kind: TYPE_STREAM,
                            op: OP_RW,
                            flags: 0,
                            buf_alloc: BUF_ALLOC,
                            fwd_cnt: c.fwd_cnt,
                        };
                        if !Self::to_guest(queue, memory, &h, &buf[..n]) {
                            // Too small a buffer: the bytes are lost; the stream is reset.
                            h.op = OP_RST;
                            h.len = 0;
                            self.control.push_back(h);
                            closed.push(key);
                            used = true;
                            break;
                        }
                        c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                        c.fwd_cnt_told = c.fwd_cnt;
                        used = true;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed.push(key);
                        break;
                    }
                }
            }
        }
        for key in closed {
            if let Some(c) = self.connections.get(&key) {
                // The host closed its end: no more data either way.
                let mut h = self.header(c, OP_SHUTDOWN, 0);
                h.flags = 3;
                self.control.push_back(h);
            }
            self.close(key, true);
        }
        // Tell the guest of host-side progress it may be waiting on for credit.
        let updates: Vec<Header> = self
            .connections
            .values()
            .filter(|c| c.established && c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 2)
            .map(|c| self.header(c, OP_CREDIT_UPDATE, 0))
            .collect();
        for c in self.connections.values_mut() {
            if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 2 {
                c.fwd_cnt_told = c.fwd_cnt;
            }
        }
        self.control.extend(updates);
        while let Some(h) = self.control.front().copied() {
            if !Self::to_guest(queue, memory, &h, &[]) {
                break;
            }
            self.control.pop_front();
            used = true;
        }
        used
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        if let Some(path) = &self.listen_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[256, 256, 256]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.guest_cid.to_le_bytes();
        super::read_bytes(&config, offset, data);
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
        if self.reset_event {
            if let Some(queue) = queues.get_mut(EVENT) {
                if let Some(chain) = queue.pop_descriptor_chain(memory) {
                    let head = chain.head_index();
                    let ok = chain.writer(memory).is_ok_and(|mut w| {
                        w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok()
                    });
                    let _ = queue.add_used(memory, head, if ok { 4 } else { 0 });
                    self.reset_event = false;
                    used = true;
                }
            }
        }
        self.accept_host_connections();
        if let Some(tx) = queues.get_mut(TX) {
            used |= self.serve_tx(tx, memory);
        }
        if let Some(rx) = queues.get_mut(RX) {
            used |= self.serve_rx(rx, memory);
        }
        used
    }

    fn start_worker(&mut self, worker: WorkerHandle) -> crate::Result<()> {
        if self.listener.is_none() {
            if self.root {
                self.listen(self.config.uds_path.clone())?;
            } else {
                self.listen_as_fork(worker.vm_id)?;
            }
        }
        self.wakeup.spawn("vmfork-vsock", worker)
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "vsock",
            "guest_cid": self.config.guest_cid,
            "socket": self.listen_path,
            "connections": self.connections.len(),
        })
    }

    fn save(&mut self) -> DeviceSpecific {
        DeviceSpecific::Vsock(VsockState {
            config: self.config.clone(),
        })
    }

    fn load(&mut self, state: &DeviceSpecific) -> crate::Result<()> {
        let DeviceSpecific::Vsock(state) = state else {
            return Err(crate::devices::DeviceError::state(
                "a vsock's saved state is another device's",
            ));
        };
        if state.config != self.config {
            return Err(crate::devices::DeviceError::state(
                "saved vsock state is for another vsock configuration",
            ));
        }
        // Back to an instant whose connections are gone: the guest is told.
        self.drop_connections();
        self.reset_event = true;
        self.wakeup.kick();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Queue q: descriptors at q × 0x1000, available ring +0x100, used ring +0x200.
    fn queues(memory: &GuestMemory) -> Vec<Queue> {
        (0..3u64)
            .map(|q| {
                let mut queue = Queue::new(8).unwrap();
                let base = q * 0x1000;
                queue.set_desc_table_address(Some(base as u32), Some(0));
                queue.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
                queue.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
                queue.set_ready(true);
                assert!(queue.is_valid(memory));
                queue
            })
            .collect()
    }

    /// Makes a one-descriptor buffer available on queue `q` (descriptor = ring slot).
    fn post(memory: &GuestMemory, q: u64, addr: u64, len: u32, writable: bool) {
        let base = q * 0x1000;
        let idx: u16 = memory.read_obj(GuestAddress(base + 0x102)).unwrap();
        let d = u64::from(idx % 8);
        let at = base + d * 16;
        memory.write_obj(addr, GuestAddress(at)).unwrap();
        memory.write_obj(len, GuestAddress(at + 8)).unwrap();
        memory
            .write_obj(if writable { 2u16 } else { 0 }, GuestAddress(at + 12))
            .unwrap();
        memory
            .write_obj(d as u16, GuestAddress(base + 0x104 + d * 2))
            .unwrap();
        memory
            .write_obj(idx.wrapping_add(1), GuestAddress(base + 0x102))
            .unwrap();
    }

    /// The packets the device put in rx buffers since `seen` (a count kept by the caller).
    fn received(memory: &GuestMemory, seen: &mut u16) -> Vec<(Header, Vec<u8>)> {
        let used: u16 = memory.read_obj(GuestAddress(0x202)).unwrap();
        let mut out = Vec::new();
        while *seen != used {
            let slot = u64::from(*seen % 8);
            let id: u32 = memory.read_obj(GuestAddress(0x204 + slot * 8)).unwrap();
            let len: u32 = memory.read_obj(GuestAddress(0x208 + slot * 8)).unwrap();
            let addr: u64 = memory.read_obj(GuestAddress(u64::from(id) * 16)).unwrap();
            let mut bytes = vec![0u8; len as usize];
            memory.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let mut h = [0u8; HEADER];
            h.copy_from_slice(&bytes[..HEADER]);
            out.push((Header::parse(&h), bytes[HEADER..].to_vec()));
            *seen = seen.wrapping_add(1);
        }
        out
    }

    #[test]
    fn a_host_program_connects_to_a_guest_port_through_the_listener() {
        let dir = std::env::temp_dir().join(format!("vmfork-vsock-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = VsockConfig {
            guest_cid: 7,
            uds_path: dir.join("v.sock"),
        };
        let mut vsock = Vsock::new(&config).unwrap();
        vsock.listen(config.uds_path.clone()).unwrap();
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let mut queues = queues(&memory);
        for i in 0..4 {
            post(&memory, 0, 0x8000 + i * 0x1000, 0x1000, true);
        }
        let mut host = UnixStream::connect(&config.uds_path).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let mut seen = 0u16;
        assert!(vsock.serve_host(&mut queues, &memory));
        let got = received(&memory, &mut seen);
        assert_eq!(got.len(), 1);
        let request = got[0].0;
        assert_eq!(
            (request.op, request.dst_port, request.dst_cid),
            (OP_REQUEST, 52, 7)
        );
        assert_eq!(request.src_cid, HOST_CID);
        // The guest accepts; the host reads OK and its port.
        let response = Header {
            src_cid: 7,
            dst_cid: HOST_CID,
            src_port: 52,
            dst_port: request.src_port,
            kind: TYPE_STREAM,
            op: OP_RESPONSE,
            buf_alloc: 4096,
            ..Header::default()
        };
        memory
            .write_slice(&response.bytes(), GuestAddress(0x10000))
            .unwrap();
        post(&memory, 1, 0x10000, HEADER as u32, false);
        vsock.serve_host(&mut queues, &memory);
        let mut line = [0u8; 64];
        host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let n = host.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {}\n", request.src_port).as_bytes());
        // Host bytes reach the guest within its credit (4096 bytes).
        host.write_all(&[9u8; 5000]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        vsock.serve_host(&mut queues, &memory);
        let got = received(&memory, &mut seen);
        let bytes: usize = got
            .iter()
            .filter(|(h, _)| h.op == OP_RW)
            .map(|(_, p)| p.len())
            .sum();
        assert_eq!(bytes, 4096, "{got:?}");
        // A fork's state loads with no connections: the host end is closed, the guest told.
        let state = vsock.save();
        vsock.load(&state).unwrap();
        assert!(vsock.connections.is_empty());
        // (Bytes the guest had no credit for were still unread: a reset rather than an EOF.)
        assert!(matches!(host.read(&mut line), Ok(0) | Err(_)));
        post(&memory, 2, 0x11000, 8, true);
        vsock.serve_host(&mut queues, &memory);
        let events: u16 = memory.read_obj(GuestAddress(0x2202)).unwrap();
        assert_eq!(events, 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn headers_round_trip_and_bad_configs_are_refused() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5000,
            len: 8,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: 1,
            buf_alloc: 4096,
            fwd_cnt: 77,
        };
        assert_eq!(Header::parse(&h.bytes()), h);
        for cid in [0, 1, 2, 1 << 40] {
            let config = VsockConfig {
                guest_cid: cid,
                uds_path: "/tmp/x".into(),
            };
            assert!(Vsock::new(&config).is_err(), "{cid}");
        }
    }
}
