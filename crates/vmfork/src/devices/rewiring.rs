//! Rewiring at restore (or fork): the host endpoints a new VM takes instead of the generated
//! per-clone ones (`<tap>-<id>`, `<path>.<id>`), so a platform can name each clone's tap and
//! vsock socket itself (Firecracker's snapshot-load network overrides, for vsock too).

use super::virtio::DeviceSpecific;
use super::DeviceState;
use std::path::PathBuf;

/// Host endpoints for a new VM's devices. The default changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewiring {
    /// The tap its network device uses, exactly (created if it does not exist). Its forks get
    /// `<tap>-<id>` from it.
    pub tap: Option<String>,
    /// Where its vsock listens, exactly, and the base of the host sockets its guest reaches
    /// (`<path>_<port>`). Its forks listen at `<path>.<id>`.
    pub vsock_path: Option<PathBuf>,
}

impl Rewiring {
    pub fn is_empty(&self) -> bool {
        self.tap.is_none() && self.vsock_path.is_none()
    }

    /// Writes the new endpoints into saved device state (what the new VM is built from and
    /// resets to); an endpoint for a device the state does not have is an error.
    pub(crate) fn apply(&self, state: &mut DeviceState) -> crate::Result<()> {
        let (mut tap_done, mut vsock_done) = (self.tap.is_none(), self.vsock_path.is_none());
        for device in state.virtio.iter_mut().map(|v| &mut v.device) {
            match (device, &self.tap, &self.vsock_path) {
                (DeviceSpecific::Net(net), Some(tap), _) if !tap_done => {
                    net.config.tap = tap.clone();
                    tap_done = true;
                }
                (DeviceSpecific::Vsock(vsock), _, Some(path)) if !vsock_done => {
                    vsock.config.uds_path = path.clone();
                    vsock_done = true;
                }
                _ => {}
            }
        }
        match (tap_done, vsock_done) {
            (false, _) => Err(missing("tap", "network device")),
            (_, false) => Err(missing("vsock socket path", "vsock")),
            _ => Ok(()),
        }
    }
}

fn missing(what: &str, device: &str) -> crate::Error {
    super::DeviceError::config(format!(
        "a {what} was given, but the VM has no {device} to rewire"
    ))
}
