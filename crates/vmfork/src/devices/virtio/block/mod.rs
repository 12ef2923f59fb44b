//! virtio-blk (virtio 1.2, 5.2) over a disk that forks (`disk.rs`): reads, writes, flush and
//! the device id; read-only disks refuse writes. Requests are served whole on the notifying
//! vCPU's thread, 64 KiB at a time through one buffer, so a request of any size allocates
//! nothing more.

mod compact;
pub mod disk;

use super::{DeviceSpecific, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;
use disk::{BaseImage, Disk, DiskInstant};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};

/// Feature bits (virtio 1.2, 5.2.3).
const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Request types and status values.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const SECTOR: u64 = 512;
/// Largest segment and segment count offered (a 1 MiB request at most in 128 segments is
/// what Linux makes of them).
const SIZE_MAX: u32 = 1 << 20;
const SEG_MAX: u32 = 128;
/// Bytes moved between guest memory and the disk per step.
const STEP: usize = 64 << 10;
/// The device id a GET_ID request returns (20 bytes, NUL-padded).
const ID_PREFIX: &str = "vmfork-disk";

/// How a VM's disk is given: an image file, and whether the guest may write (its writes never
/// reach the file: they live in the VM's copy-on-write layer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// A snapshot's copy of a disk's written chunks: a sparse file in the snapshot directory
/// holding chunk `c` at byte `c * CHUNK`, and the runs of chunks it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayFile {
    pub file: String,
    /// (first chunk, chunk count), ascending.
    pub runs: Vec<(u64, u64)>,
}

/// What a fork or snapshot carries of a disk device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub config: DiskConfig,
    /// Sectors the guest sees.
    pub capacity: u64,
    /// The image file's modification time when the VM opened it (ns since the epoch): a
    /// restore refuses an image changed since.
    pub image_mtime_ns: u64,
    /// Where a snapshot keeps the disk's writes (none in memory: forks share `instant`).
    pub overlay: Option<OverlayFile>,
    /// The disk at the save instant (in memory: forks and resets; a snapshot writes it out).
    #[serde(skip)]
    pub instant: Option<DiskInstant>,
}

/// The block device.
pub struct Block {
    config: DiskConfig,
    image_mtime_ns: u64,
    disk: Disk,
    buffer: Vec<u8>,
}

impl Block {
    /// A disk device on the image `config` names.
    pub fn open(config: &DiskConfig) -> crate::Result<Self> {
        let base = BaseImage::open(&config.path).map_err(crate::devices::DeviceError::image)?;
        let mtime = base.mtime_ns();
        Ok(Self::over(
            config.clone(),
            mtime,
            DiskInstant::new(Arc::new(base)),
        ))
    }

    /// The device over a saved disk instant.
    pub fn from_state(state: &BlockState) -> crate::Result<Self> {
        let instant = state.instant.clone().ok_or_else(|| {
            crate::devices::DeviceError::state(format!(
                "saved state of disk {} holds no disk contents",
                state.config.path.display()
            ))
        })?;
        Ok(Self::over(
            state.config.clone(),
            state.image_mtime_ns,
            instant,
        ))
    }

    fn over(config: DiskConfig, image_mtime_ns: u64, instant: DiskInstant) -> Self {
        Self {
            config,
            image_mtime_ns,
            disk: Disk::new(instant),
            buffer: Vec::new(),
        }
    }

    /// Serves one request; returns the status and the bytes written into guest buffers.
    fn request(
        &mut self,
        memory: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> Option<u32> {
        let mut reader = chain.clone().reader(memory).ok()?;
        let mut writer = chain.writer(memory).ok()?;
        // The status byte is the last device-writable byte.
        let data_len = writer.available_bytes().checked_sub(1)?;
        let mut status_writer = writer.split_at(data_len).ok()?;
        let mut header = [0u8; 16];
        let (status, written) = if reader.read_exact(&mut header).is_err() {
            (S_IOERR, 0)
        } else {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
            self.serve_request(kind, sector, &mut reader, &mut writer, data_len)
        };
        status_writer.write_all(&[status]).ok()?;
        Some(written as u32 + 1)
    }

    fn serve_request(
        &mut self,
        kind: u32,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
        writer: &mut virtio_queue::Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
        writable: usize,
    ) -> (u8, usize) {
        if self.buffer.is_empty() {
            self.buffer = vec![0u8; STEP];
        }
        let Some(start) = sector.checked_mul(SECTOR) else {
            return (S_IOERR, 0);
        };
        match kind {
            T_IN => {
                if !(writable as u64).is_multiple_of(SECTOR) {
                    return (S_IOERR, 0);
                }
                let mut done = 0usize;
                while done < writable {
                    let n = STEP.min(writable - done);
                    let buf = &mut self.buffer[..n];
                    if self.disk.read(start + done as u64, buf).is_err()
                        || writer.write_all(buf).is_err()
                    {
                        return (S_IOERR, done);
                    }
                    done += n;
                }
                (S_OK, done)
            }
            T_OUT => {
                if self.config.read_only {
                    return (S_IOERR, 0);
                }
                let total = reader.available_bytes();
                if !(total as u64).is_multiple_of(SECTOR)
                    || start
                        .checked_add(total as u64)
                        .is_none_or(|e| e > self.disk.size())
                {
                    return (S_IOERR, 0);
                }
                let mut done = 0usize;
                while done < total {
                    let n = STEP.min(total - done);
                    let buf = &mut self.buffer[..n];
                    if reader.read_exact(buf).is_err()
                        || self.disk.write(start + done as u64, buf).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    done += n;
                }
                (S_OK, 0)
            }
            // Writes land in the VM's layer, in memory: nothing to make durable.
            T_FLUSH => (S_OK, 0),
            T_GET_ID => {
                let mut id = [0u8; 20];
                let text = ID_PREFIX;
                id[..text.len()].copy_from_slice(text.as_bytes());
                let n = writable.min(id.len());
                match writer.write_all(&id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.config.read_only {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[256]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64 sectors), size_max (u32), seg_max (u32).
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&(self.disk.size() / SECTOR).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        super::read_bytes(&config, offset, data);
    }

    fn serve(&mut self, index: usize, queues: &mut [Queue], memory: &GuestMemory) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            // A chain with no room for a status byte is returned with nothing written.
            let written = self.request(memory, chain).unwrap_or(0);
            if queue.add_used(memory, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "block",
            "image": self.config.path,
            "read_only": self.config.read_only,
            "sectors": self.disk.size() / SECTOR,
        })
    }

    fn save(&mut self) -> DeviceSpecific {
        DeviceSpecific::Block(BlockState {
            config: self.config.clone(),
            capacity: self.disk.size() / SECTOR,
            image_mtime_ns: self.image_mtime_ns,
            overlay: None,
            instant: Some(self.disk.freeze()),
        })
    }

    fn load(&mut self, state: &DeviceSpecific) -> crate::Result<()> {
        let DeviceSpecific::Block(state) = state else {
            return Err(crate::devices::DeviceError::state(
                "a block device's saved state is another device's",
            ));
        };
        *self = Self::from_state(state)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::mmio::{MmioTransport, REG_CONFIG_GENERATION};
    use super::super::test_support::*;
    use super::*;
    use vm_device::bus::MmioAddress;
    use vm_device::DeviceMmio;
    use vm_memory::{Bytes, GuestAddress};

    const HEADER: u64 = 0x4000;
    const DATA: u64 = 0x5000;
    const STATUS: u64 = 0x7000;

    fn disk(read_only: bool) -> (PathBuf, (MmioTransport, GuestMemory)) {
        // An image per call: tests run in parallel and each removes its own.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "vmfork-blk-test-{}-{n}-{read_only}",
            std::process::id()
        ));
        std::fs::write(&path, (0..64 * 1024).map(|i| i as u8).collect::<Vec<_>>()).unwrap();
        let block = Block::open(&DiskConfig {
            path: path.clone(),
            read_only,
        })
        .unwrap();
        // Feature word 1 is VERSION_1; word 0 is left empty (the driver takes no extras).
        (path, running(Box::new(block), 1))
    }

    /// A request: header, optional data (`len` bytes, device-writable for reads), status.
    fn request(
        t: &MmioTransport,
        memory: &GuestMemory,
        kind: u32,
        sector: u64,
        len: u32,
    ) -> (u8, Option<u32>) {
        memory.write_obj(kind, GuestAddress(HEADER)).unwrap();
        memory.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
        memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let data_flags = if kind == T_IN || kind == T_GET_ID {
            WRITE
        } else {
            0
        };
        let chain: Vec<Descriptor> = if len == 0 {
            vec![(0, HEADER, 16, NEXT, 2), (2, STATUS, 1, WRITE, 0)]
        } else {
            vec![
                (0, HEADER, 16, NEXT, 1),
                (1, DATA, len, data_flags | NEXT, 2),
                (2, STATUS, 1, WRITE, 0),
            ]
        };
        let used = offer(t, memory, &chain, 0);
        (memory.read_obj(GuestAddress(STATUS)).unwrap(), used)
    }

    #[test]
    fn requests_of_every_kind_and_bad_ones() {
        let (path, (t, memory)) = disk(false);
        let mut capacity = [0u8; 8];
        t.mmio_read(MmioAddress(0), 0x100, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 128);
        assert_eq!(read(&t, REG_CONFIG_GENERATION), 0);
        // Read 1 KiB from sector 2.
        assert_eq!(request(&t, &memory, T_IN, 2, 1024), (S_OK, Some(1025)));
        let mut got = [0u8; 4];
        memory.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0, 1, 2, 3]);
        // Write, then read back.
        memory.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&t, &memory, T_OUT, 5, 512), (S_OK, Some(1)));
        memory.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&t, &memory, T_IN, 5, 512), (S_OK, Some(513)));
        memory.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [7; 4]);
        // Flush, the device id, an unknown request.
        assert_eq!(request(&t, &memory, T_FLUSH, 0, 0), (S_OK, Some(1)));
        assert_eq!(request(&t, &memory, T_GET_ID, 0, 20), (S_OK, Some(21)));
        let mut id = [0u8; 11];
        memory.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"vmfork-disk");
        assert_eq!(request(&t, &memory, 99, 0, 0), (S_UNSUPP, Some(1)));
        // Past the end, a sector number that overflows, a length that is not whole sectors.
        assert_eq!(request(&t, &memory, T_IN, 127, 1024).0, S_IOERR);
        assert_eq!(request(&t, &memory, T_OUT, 127, 1024).0, S_IOERR);
        assert_eq!(request(&t, &memory, T_IN, u64::MAX / 256, 512).0, S_IOERR);
        assert_eq!(request(&t, &memory, T_OUT, 0, 100).0, S_IOERR);
        // A chain with no status byte is returned with nothing written.
        assert_eq!(offer(&t, &memory, &[(0, HEADER, 16, 0, 0)], 0), Some(0));
        // The image file is untouched.
        assert_eq!(std::fs::read(&path).unwrap()[5 * 512], (5 * 512) as u8);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_request_through_an_indirect_table_is_served_and_a_nested_one_is_refused() {
        let (path, (t, memory)) = disk(false);
        write(&t, super::super::mmio::REG_DEVICE_FEATURES_SEL, 0);
        assert_ne!(
            read(&t, super::super::mmio::REG_DEVICE_FEATURES) & (1 << 28),
            0
        );
        const TABLE: u64 = 0x6000;
        const INDIRECT: u16 = 4;
        let put = |at: u64, (addr, len, flags, next): (u64, u32, u16, u16)| {
            memory.write_obj(addr, GuestAddress(at)).unwrap();
            memory.write_obj(len, GuestAddress(at + 8)).unwrap();
            memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
            memory.write_obj(next, GuestAddress(at + 14)).unwrap();
        };
        memory.write_obj(T_IN, GuestAddress(HEADER)).unwrap();
        memory.write_obj(3u64, GuestAddress(HEADER + 8)).unwrap();
        put(TABLE, (HEADER, 16, NEXT, 1));
        put(TABLE + 16, (DATA, 512, WRITE | NEXT, 2));
        put(TABLE + 32, (STATUS, 1, WRITE, 0));
        memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(
            offer(&t, &memory, &[(0, TABLE, 48, INDIRECT, 0)], 0),
            Some(513)
        );
        assert_eq!(memory.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert_eq!(
            memory.read_obj::<u8>(GuestAddress(DATA)).unwrap(),
            (3 * 512) as u8
        );
        // An indirect descriptor inside the table (the chain ends before it), or a table that
        // is not whole descriptors: the request does not succeed, and nothing is written
        // outside the guest's own buffers.
        put(TABLE + 32, (TABLE, 48, INDIRECT, 0));
        for len in [48, 40] {
            memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let got = offer(&t, &memory, &[(0, TABLE, len, INDIRECT, 0)], 0);
            assert_ne!(got, Some(513), "table of {len} bytes");
            assert_eq!(memory.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_read_only_disk_says_so_and_refuses_writes() {
        let (path, (t, memory)) = disk(true);
        write(&t, super::super::mmio::REG_DEVICE_FEATURES_SEL, 0);
        assert_ne!(
            read(&t, super::super::mmio::REG_DEVICE_FEATURES) & (1 << 5),
            0
        );
        assert_eq!(request(&t, &memory, T_OUT, 0, 512).0, S_IOERR);
        assert_eq!(request(&t, &memory, T_IN, 0, 512).0, S_OK);
        std::fs::remove_file(path).unwrap();
    }
}
