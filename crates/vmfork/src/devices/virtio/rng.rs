//! virtio-rng (virtio 1.2, 5.4): fills each buffer the driver offers with bytes from the host's
//! getrandom(2). One queue; no config space; no state of its own.

use super::{DeviceSpecific, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;
use std::io::Write;
use virtio_queue::{Queue, QueueT};

/// The largest number of bytes one request gets (a driver asks again for more).
const MAX_REQUEST: usize = 64 << 10;

/// The entropy device.
#[derive(Default)]
pub struct Rng;

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[256]
    }

    fn serve(&mut self, index: usize, queues: &mut [Queue], memory: &GuestMemory) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        let mut bytes = vec![0u8; MAX_REQUEST];
        // At most one ring's worth per notify: a driver adding buffers as fast as they are
        // used cannot keep this vCPU's exit going forever.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(memory) {
                Ok(mut writer) => {
                    let n = writer.available_bytes().min(MAX_REQUEST);
                    match getrandom::fill(&mut bytes[..n]) {
                        Ok(()) => writer.write(&bytes[..n]).unwrap_or(0),
                        Err(_) => 0,
                    }
                }
                // Descriptors outside guest RAM or overflowing: returned empty.
                Err(_) => 0,
            };
            if queue.add_used(memory, head, written as u32).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"type": "rng"})
    }

    fn save(&mut self) -> DeviceSpecific {
        DeviceSpecific::Rng
    }

    fn load(&mut self, state: &DeviceSpecific) -> crate::Result<()> {
        match state {
            DeviceSpecific::Rng => Ok(()),
            _ => Err(crate::devices::DeviceError::state(
                "the entropy device's saved state is another device's",
            )),
        }
    }
}
