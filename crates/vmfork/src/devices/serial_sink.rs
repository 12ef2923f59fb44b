//! Where the guest's serial console goes: the terminal, a file, an in-memory buffer (tests and
//! the API read it) or nowhere.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// An in-memory serial console, capped so a chatty guest cannot grow the VMM without bound.
#[derive(Clone, Debug, Default)]
pub struct SerialBuffer {
    inner: Arc<Mutex<Vec<u8>>>,
    first_byte_at: Arc<std::sync::OnceLock<std::time::Instant>>,
}

/// Most bytes a [`SerialBuffer`] keeps; older bytes are dropped first.
pub const SERIAL_BUFFER_CAP: usize = 1 << 20;

impl SerialBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything the guest printed (up to the cap), lossily as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding this lock cannot leave the Vec invalid, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the guest printed its first byte (what boot benchmarks measure to).
    pub fn first_byte_at(&self) -> Option<std::time::Instant> {
        self.first_byte_at.get().copied()
    }

    fn push(&self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.first_byte_at.get_or_init(std::time::Instant::now);
        }
        let mut buf = self.lock();
        buf.extend_from_slice(bytes);
        if buf.len() > SERIAL_BUFFER_CAP {
            let excess = buf.len() - SERIAL_BUFFER_CAP;
            buf.drain(..excess);
        }
    }
}

/// The destination of serial output.
#[derive(Debug, Default)]
pub enum SerialSink {
    Stdout,
    File(File),
    Buffer(SerialBuffer),
    #[default]
    Discard,
}

impl SerialSink {
    /// A sink writing to a new in-memory buffer, and that buffer.
    pub fn buffer() -> (Self, SerialBuffer) {
        let b = SerialBuffer::new();
        (SerialSink::Buffer(b.clone()), b)
    }
}

/// Set once a console write to standard output found it closed (`vmfork run | head -2`).
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a console on standard output found it closed: the reader is gone, and a foreground
/// run should end (as a Unix tool does on SIGPIPE) instead of running unseen.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

impl Write for SerialSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            SerialSink::Stdout => io::stdout().write(data).inspect_err(|e| {
                if e.kind() == io::ErrorKind::BrokenPipe {
                    STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }),
            SerialSink::File(f) => f.write(data),
            SerialSink::Buffer(b) => {
                b.push(data);
                Ok(data.len())
            }
            SerialSink::Discard => Ok(data.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialSink::Stdout => io::stdout().flush(),
            SerialSink::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}
