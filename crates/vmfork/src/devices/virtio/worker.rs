//! Device workers: a thread per device with a host side (sockets) that waits on it and, when
//! there is something for the guest, serves the device with the VM's memory at hand. The
//! worker never outlives what it touches: it holds the transport and the VM weakly, and it
//! takes the device set's quiesce lock for reading while it serves, so a fork, snapshot or
//! reset (which take it for writing) never sees a device half-way through a packet.

use super::mmio::MmioTransport;
use crate::memory::GuestMemory;
use std::sync::{Arc, RwLock, Weak};

/// What a worker needs of its VM: the guest's memory, while the VM lives.
pub trait GuestMemoryAccess: Send + Sync {
    fn with_memory(&self, f: &mut dyn FnMut(&GuestMemory));
}

/// A worker's ties to its device and VM.
#[derive(Clone)]
pub struct WorkerHandle {
    pub(crate) transport: Weak<MmioTransport>,
    pub(crate) memory: Weak<dyn GuestMemoryAccess>,
    pub(crate) quiesce: Arc<RwLock<()>>,
    /// The VM's id (names what the device makes per VM, e.g. a fork's vsock socket).
    pub vm_id: u64,
}

impl WorkerHandle {
    /// Serves the device's host side once; false when the VM or device is gone (the worker
    /// then ends).
    pub fn serve(&self) -> bool {
        let (Some(transport), Some(vm)) = (self.transport.upgrade(), self.memory.upgrade()) else {
            return false;
        };
        let _quiet = self.quiesce.read().unwrap_or_else(|p| p.into_inner());
        vm.with_memory(&mut |memory| transport.serve_host(memory));
        true
    }
}

/// What a device with a worker waits on: an epoll set holding the kick (the guest notified a
/// queue), the stop (the device is gone) and the device's host descriptors. Dropping it stops
/// the worker.
pub struct Wakeup {
    epoll: Arc<vmm_sys_util::epoll::Epoll>,
    kick: vmm_sys_util::eventfd::EventFd,
    stop: vmm_sys_util::eventfd::EventFd,
}

impl Wakeup {
    pub fn new() -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        use vmm_sys_util::eventfd::EventFd;
        let epoll = Epoll::new()?;
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        for fd in [kick.as_raw_fd(), stop.as_raw_fd()] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )?;
        }
        Ok(Self {
            epoll: Arc::new(epoll),
            kick,
            stop,
        })
    }

    /// Wakes the worker on input at `fd` (edge-triggered: the device reads until it would
    /// block, or until the guest has no room, and a later kick serves the rest).
    pub fn watch(&self, fd: std::os::fd::RawFd) {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let event = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, fd as u64);
        let _ = self.epoll.ctl(ControlOperation::Add, fd, event);
    }

    /// Wakes the worker (a queue notify).
    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// Clears the kick before serving.
    pub fn take_kick(&self) {
        let _ = self.kick.read();
    }

    /// Starts the worker thread named `name`, serving through `handle` at each wake-up.
    pub fn spawn(&self, name: &'static str, handle: WorkerHandle) -> crate::Result<()> {
        spawn(name, Arc::clone(&self.epoll), &self.stop, handle)
    }
}

impl Drop for Wakeup {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}

/// Starts a worker thread named `name` that waits on `epoll` and serves through `handle` at
/// each wake-up, until `stop` is written or the VM or device is gone.
fn spawn(
    name: &'static str,
    epoll: Arc<vmm_sys_util::epoll::Epoll>,
    stop: &vmm_sys_util::eventfd::EventFd,
    handle: WorkerHandle,
) -> crate::Result<()> {
    use std::os::fd::AsRawFd;
    use vmm_sys_util::epoll::EpollEvent;
    let stop = stop.as_raw_fd() as u64;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            crate::confine::seccomp::confine_vmm_thread();
            let mut events = vec![EpollEvent::default(); 32];
            loop {
                match epoll.wait(-1, &mut events) {
                    Ok(n) if events[..n].iter().any(|e| e.data() == stop) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                }
                if !handle.serve() {
                    return;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| crate::devices::DeviceError::host(name, "cannot start its thread", e))
}
