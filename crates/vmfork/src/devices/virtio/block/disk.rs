//! A disk that forks: a read-only base image with copy-on-write layers over it. A VM writes
//! into its own top layer; a fork or snapshot freezes that layer (an O(1) move) and both sides
//! go on from the same frozen stack with new, empty tops; a reset drops the fork's top. The
//! base image file is never written.
//!
//! Layers hold 4 KiB chunks in a memfd (a chunk written partly is first copied up whole);
//! a layer loaded from a snapshot holds them in its disk file. Frozen layers are shared (Arc)
//! by every VM of a family that sees them.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes per copy-on-write chunk.
pub const CHUNK: u64 = 4096;

/// The image a disk starts from, opened read-only.
#[derive(Debug)]
pub struct BaseImage {
    file: File,
    path: PathBuf,
    /// Bytes the guest sees: the file's size, rounded down to whole 512-byte sectors.
    size: u64,
}

impl BaseImage {
    /// Opens `path` for reading: a regular file (or block device) of at least one sector.
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking, so a FIFO is refused below instead of hanging the open.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("disk image {}: {e}", path.display())))?;
        let meta = file.metadata()?;
        use std::os::unix::fs::FileTypeExt;
        let size = if meta.file_type().is_block_device() {
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "disk image {} is not a regular file or block device",
                    path.display()
                ),
            ));
        };
        let size = size / 512 * 512;
        if size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "disk image {} holds no whole 512-byte sector",
                    path.display()
                ),
            ));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's modification time in nanoseconds since the epoch (0 if unknown).
    pub fn mtime_ns(&self) -> u64 {
        self.file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Chunks written over what is below, each at an offset in the layer's file.
#[derive(Debug)]
pub struct Layer {
    file: File,
    chunks: HashMap<u64, u64>,
    /// Where the next new chunk goes in `file`.
    end: u64,
}

impl Layer {
    /// A layer whose chunks are in `file` at the offsets `chunks` maps them to (a snapshot's
    /// disk file).
    pub fn from_file(file: File, chunks: HashMap<u64, u64>) -> Self {
        let end = chunks.values().max().map_or(0, |&o| o + CHUNK);
        Self { file, chunks, end }
    }

    /// One layer holding what `layers` (oldest first) hold, the newest copy of each chunk.
    pub fn merge(layers: &[Arc<Layer>]) -> io::Result<Self> {
        let file = crate::memory::create_memfd("vmfork-disk", 0)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut newest: HashMap<u64, (&Layer, u64)> = HashMap::new();
        for layer in layers {
            for (&chunk, &at) in &layer.chunks {
                newest.insert(chunk, (layer.as_ref(), at));
            }
        }
        let mut order: Vec<_> = newest.into_iter().collect();
        order.sort_unstable_by_key(|&(c, _)| c);
        let mut chunks = HashMap::with_capacity(order.len());
        let mut buf = vec![0u8; CHUNK as usize];
        for (i, (chunk, (layer, at))) in order.into_iter().enumerate() {
            let to = i as u64 * CHUNK;
            layer.read_chunk(at, &mut buf)?;
            file.write_all_at(&buf, to)?;
            chunks.insert(chunk, to);
        }
        Ok(Self::from_file(file, chunks))
    }

    /// The chunks this layer holds, with their offsets in its file.
    pub fn chunks(&self) -> &HashMap<u64, u64> {
        &self.chunks
    }

    pub fn read_chunk(&self, offset_in_file: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset_in_file)
    }
}

/// A disk at one instant: its base and the frozen layers over it, oldest first.
#[derive(Clone, Debug)]
pub struct DiskInstant {
    pub base: Arc<BaseImage>,
    pub layers: Arc<[Arc<Layer>]>,
}

impl PartialEq for DiskInstant {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.base, &other.base) && Arc::ptr_eq(&self.layers, &other.layers)
    }
}

impl Eq for DiskInstant {}

impl DiskInstant {
    pub fn new(base: Arc<BaseImage>) -> Self {
        Self {
            base,
            layers: Arc::from(Vec::new()),
        }
    }

    /// Where chunk `chunk` is read from: the newest layer holding it, else the base.
    fn source(&self, chunk: u64) -> Option<(&Layer, u64)> {
        self.layers
            .iter()
            .rev()
            .find_map(|l| l.chunks.get(&chunk).map(|&at| (l.as_ref(), at)))
    }

    /// Reads chunk `chunk` as of this instant into `buf` (one chunk; zeros past the disk's
    /// end).
    pub fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.source(chunk) {
            Some((layer, at)) => layer.read_chunk(at, buf),
            None => {
                let start = chunk * CHUNK;
                let valid = self.base.size.saturating_sub(start).min(buf.len() as u64) as usize;
                buf[valid..].fill(0);
                self.base.file.read_exact_at(&mut buf[..valid], start)
            }
        }
    }

    /// Every chunk the layers hold, newest copy of each: (chunk, layer, offset in its file).
    pub fn written_chunks(&self) -> Vec<(u64, &Layer, u64)> {
        let mut seen: HashMap<u64, (&Layer, u64)> = HashMap::new();
        for layer in self.layers.iter() {
            for (&chunk, &at) in &layer.chunks {
                seen.insert(chunk, (layer.as_ref(), at));
            }
        }
        let mut out: Vec<_> = seen.into_iter().map(|(c, (l, at))| (c, l, at)).collect();
        out.sort_unstable_by_key(|&(c, _, _)| c);
        out
    }
}

/// The part of an access `[offset, offset + len)` that falls in one chunk.
struct Piece {
    chunk: u64,
    /// Where in the chunk it starts.
    within: u64,
    /// Where in the caller's buffer it starts, and its length.
    done: usize,
    len: usize,
}

impl Piece {
    fn range(&self) -> std::ops::Range<usize> {
        self.done..self.done + self.len
    }
}

/// Splits an access into its chunks, in order.
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = Piece> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        (done < len).then(|| {
            let at = offset + done as u64;
            let within = at % CHUNK;
            let n = ((CHUNK - within) as usize).min(len - done);
            let piece = Piece {
                chunk: at / CHUNK,
                within,
                done,
                len: n,
            };
            done += n;
            piece
        })
    })
}

/// A VM's disk: an instant below, and the VM's own writes on top.
#[derive(Debug)]
pub struct Disk {
    /// The frozen stack below, shared with the compactor, which may swap in an equal one with
    /// fewer layers (see `compact.rs`).
    below: Arc<Mutex<DiskInstant>>,
    size: u64,
    /// Created at the first write.
    top: Option<Layer>,
}

impl Disk {
    pub fn new(below: DiskInstant) -> Self {
        Self {
            size: below.base.size,
            below: Arc::new(Mutex::new(below)),
            top: None,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The stack below, as of now.
    pub fn below(&self) -> DiskInstant {
        self.below.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Freezes what was written so far: the instant a fork or snapshot takes (the top, if
    /// anything was written, becomes a shared layer; writes go on into a new top). A stack
    /// grown deep is handed to the compactor.
    pub fn freeze(&mut self) -> DiskInstant {
        let mut below = self.below.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(top) = self.top.take() {
            let mut layers: Vec<Arc<Layer>> = below.layers.iter().cloned().collect();
            layers.push(Arc::new(top));
            below.layers = Arc::from(layers);
            if below.layers.len() > super::compact::MAX_LAYERS {
                super::compact::submit(Arc::downgrade(&self.below));
            }
        }
        below.clone()
    }

    /// Compacts the stack below now, on this thread (what the compactor does).
    pub fn compact_now(&self) -> io::Result<()> {
        super::compact::compact(&self.below)
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset} are past the disk's end"),
            )),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let below = self.below();
        for piece in pieces(offset, buf.len()) {
            let part = &mut buf[piece.range()];
            let (chunk, within) = (piece.chunk, piece.within);
            match self
                .top
                .as_ref()
                .and_then(|t| t.chunks.get(&chunk).map(|&o| (t, o)))
            {
                Some((top, slot)) => top.file.read_exact_at(part, slot + within)?,
                None => match below.source(chunk) {
                    Some((layer, slot)) => layer.file.read_exact_at(part, slot + within)?,
                    None => below
                        .base
                        .file
                        .read_exact_at(part, chunk * CHUNK + within)?,
                },
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the top layer, copying up partly written chunks.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        for piece in pieces(offset, data.len()) {
            let part = &data[piece.range()];
            let (chunk, within) = (piece.chunk, piece.within);
            let existing = self
                .top
                .as_ref()
                .and_then(|t| t.chunks.get(&chunk).copied());
            match existing {
                Some(slot) => self.top_layer()?.file.write_all_at(part, slot + within)?,
                None => {
                    let mut whole = [0u8; CHUNK as usize];
                    if part.len() as u64 != CHUNK {
                        // (The last chunk of a disk that is not whole chunks is partly past
                        // its end: only the part inside is read.)
                        let inside = (self.size() - chunk * CHUNK).min(CHUNK) as usize;
                        self.read(chunk * CHUNK, &mut whole[..inside])?;
                    }
                    whole[within as usize..within as usize + part.len()].copy_from_slice(part);
                    let top = self.top_layer()?;
                    let slot = top.end;
                    top.file.write_all_at(&whole, slot)?;
                    top.end += CHUNK;
                    top.chunks.insert(chunk, slot);
                }
            }
        }
        Ok(())
    }

    fn top_layer(&mut self) -> io::Result<&mut Layer> {
        if self.top.is_none() {
            let file = crate::memory::create_memfd("vmfork-disk", 0)
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.top = Some(Layer {
                file,
                chunks: HashMap::new(),
                end: 0,
            });
        }
        Ok(self.top.as_mut().expect("created above"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes: &[u8]) -> (PathBuf, Arc<BaseImage>) {
        let path = std::env::temp_dir().join(format!(
            "vmfork-disk-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, bytes).unwrap();
        let base = Arc::new(BaseImage::open(&path).unwrap());
        (path, base)
    }

    #[test]
    fn forks_see_the_frozen_instant_and_their_own_writes() {
        let content: Vec<u8> = (0..3 * CHUNK as usize + 512)
            .map(|i| (i % 251) as u8)
            .collect();
        let (path, base) = image(&content);
        assert_eq!(base.size(), content.len() as u64);
        let mut parent = Disk::new(DiskInstant::new(base));
        let mut buf = vec![0u8; 1000];
        parent.read(4000, &mut buf).unwrap();
        assert_eq!(buf, content[4000..5000]);
        // A write straddling two chunks copies both up; the rest reads as before.
        parent.write(4090, &[0xaa; 20]).unwrap();
        parent.read(4000, &mut buf).unwrap();
        assert_eq!(buf[..90], content[4000..4090]);
        assert_eq!(buf[90..110], [0xaa; 20]);
        assert_eq!(buf[110..], content[4110..5000]);
        // The fork instant: both go on from it separately.
        let instant = parent.freeze();
        let mut child = Disk::new(instant.clone());
        child.write(4095, &[0xbb]).unwrap();
        parent.write(4095, &[0xcc]).unwrap();
        let mut byte = [0u8];
        child.read(4095, &mut byte).unwrap();
        assert_eq!(byte, [0xbb]);
        parent.read(4095, &mut byte).unwrap();
        assert_eq!(byte, [0xcc]);
        // A reset: the fork's writes dropped, the instant's kept.
        let child = Disk::new(instant.clone());
        child.read(4095, &mut byte).unwrap();
        assert_eq!(byte, [0xaa]);
        // Nothing written since: freezing again shares the same stack.
        let mut idle = Disk::new(instant.clone());
        assert_eq!(idle.freeze(), instant);
        // The base file was never written; the end is enforced.
        assert_eq!(std::fs::read(&path).unwrap(), content);
        assert!(parent
            .read(content.len() as u64 - 4, &mut [0u8; 8])
            .is_err());
        assert!(parent.write(u64::MAX - 2, &[0u8; 8]).is_err());
        assert_eq!(instant.written_chunks().len(), 2);
        // The last chunk is partly past the end (3 chunks and a sector): a sector written
        // there copies up only what is inside, and reads back.
        let end = content.len() as u64 - 512;
        parent.write(end, &[0xdd; 512]).unwrap();
        let mut last = vec![0u8; 512];
        parent.read(end, &mut last).unwrap();
        assert_eq!(last, [0xdd; 512]);
        let mut chunk = vec![0xffu8; CHUNK as usize];
        parent.freeze().read_chunk(3, &mut chunk).unwrap();
        assert_eq!(chunk[..512], [0xdd; 512]);
        instant.read_chunk(3, &mut chunk).unwrap();
        assert_eq!(chunk[..512], content[end as usize..]);
        assert!(chunk[512..].iter().all(|&b| b == 0), "zeros past the end");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn images_that_are_not_disks_are_refused() {
        let (path, _) = image(&[0u8; 512]);
        std::fs::write(&path, [0u8; 100]).unwrap();
        let err = BaseImage::open(&path).unwrap_err().to_string();
        assert!(err.contains("no whole 512-byte sector"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = BaseImage::open(&path).unwrap_err().to_string();
        assert!(err.contains("disk image"), "{err}");
        let err = BaseImage::open(Path::new("/tmp")).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
