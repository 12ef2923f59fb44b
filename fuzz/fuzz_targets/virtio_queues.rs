//! A hostile guest driving a virtio device (the first byte picks the entropy device, a disk, a
//! vsock or a network device without its tap): any sequence of register writes, guest memory writes (descriptor tables, rings,
//! request headers, packets) and queue notifies. The device must never panic, and must
//! never touch host memory outside guest RAM: the RAM sits between inaccessible guard pages, so
//! a stray access is a crash the fuzzer reports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_device::bus::MmioAddress;
use vm_device::DeviceMmio;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmfork::devices::virtio::block::{Block, DiskConfig};
use vmfork::devices::virtio::mmio::MmioTransport;
use vmfork::devices::virtio::net::{Net, NetConfig, NetState};
use vmfork::devices::virtio::rng::Rng;
use vmfork::devices::virtio::vsock::{Vsock, VsockConfig};
use vmfork::devices::virtio::VirtioDevice;
use vmfork::devices::Signals;

const RAM: usize = 64 << 10;
const GUARD: usize = 64 << 10;

/// Guest RAM of [`RAM`] bytes at guest address 0 with a guard region on each side.
struct GuardedRam {
    base: *mut libc::c_void,
    memory: GuestMemoryMmap<AtomicBitmap>,
}

impl GuardedRam {
    fn new() -> Self {
        let total = GUARD + RAM + GUARD;
        // SAFETY: a fresh anonymous reservation; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        // SAFETY: the middle of the reservation made above.
        let ram = unsafe { base.cast::<u8>().add(GUARD) };
        // SAFETY: `ram..ram+RAM` lies inside the reservation.
        let rc = unsafe { libc::mprotect(ram.cast(), RAM, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(rc, 0);
        // SAFETY: the range is mapped read-write and outlives `memory` (unmapped in Drop,
        // after `memory` is dropped... see Drop).
        let region = unsafe {
            MmapRegion::build_raw(
                ram,
                RAM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
            )
        }
        .unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        let memory = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        Self { base, memory }
    }
}

impl Drop for GuardedRam {
    fn drop(&mut self) {
        // SAFETY: unmaps the reservation made in `new`; `memory`'s raw region does not unmap.
        unsafe { libc::munmap(self.base, GUARD + RAM + GUARD) };
    }
}

/// A 64 KiB disk image, written once per process at one path for every run (a run ends in
/// `exit`, which would leave a per-process file behind).
fn disk_image() -> &'static std::path::Path {
    static IMAGE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = std::env::temp_dir().join("vmfork-fuzz-disk.img");
        std::fs::write(&path, vec![0x5a; 64 << 10]).unwrap();
        path
    })
}

fn make_device(kind: u8) -> Box<dyn VirtioDevice> {
    match kind % 4 {
        1 => {
            let config = DiskConfig {
                path: disk_image().to_path_buf(),
                read_only: false,
            };
            Box::new(Block::open(&config).unwrap())
        }
        // No listener (no worker is started); guest connections find no host socket.
        2 => Box::new(
            Vsock::new(&VsockConfig {
                guest_cid: 3,
                uds_path: std::env::temp_dir().join("vmfork-fuzz-no-such.sock"),
            })
            .unwrap(),
        ),
        // Frames the guest sends go nowhere; the parsing is what is fuzzed.
        3 => Box::new(
            Net::from_state(
                &NetState {
                    config: NetConfig {
                        tap: "vmf-fuzz".into(),
                        mac: None,
                        keep_mac: true,
                    },
                    mac: [2, 0, 0, 0, 0, 1],
                },
                false,
            )
            .unwrap(),
        ),
        _ => Box::new(Rng),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else {
        return;
    };
    let ram = GuardedRam::new();
    let device_under_test = make_device(first);
    let device = MmioTransport::new(0, device_under_test, None, Signals::default()).unwrap();
    let mut ops = data.chunks_exact(8);
    for op in &mut ops {
        let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        match op[0] % 4 {
            // A register write (offsets up to 0x1ff: registers and config space).
            0 => device.mmio_write(MmioAddress(0), offset & 0x1ff, &value.to_le_bytes()),
            // A register read of any width.
            1 => {
                let mut buf = [0u8; 8];
                let len = 1 + usize::from(op[3] % 8);
                device.mmio_read(MmioAddress(0), offset & 0x1ff, &mut buf[..len]);
            }
            // A guest memory write (what a driver puts in its rings), anywhere in RAM.
            2 => {
                let at = (offset << 4) + u64::from(op[3] & 0xf);
                let _ = ram.memory.write_obj(value, GuestAddress(at));
            }
            // A queue notify served (the transport raises it; the VMM serves it), and what a
            // device worker serves.
            _ => {
                device.serve(usize::from(op[3] % 3), &ram.memory);
                device.serve_host(&ram.memory);
            }
        }
    }
    // The state saved after any of this loads back into a fresh device.
    let saved = device.save();
    let fresh = MmioTransport::new(0, make_device(first), None, Signals::default()).unwrap();
    fresh.load(&saved).unwrap();
});
