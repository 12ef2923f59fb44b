//! The socket server: accepts connections on a Unix socket, one thread per connection (bounded
//! in total and per client process), one request per connection, each with a whole-request
//! deadline.

use super::http::{read_request, Response};
use super::{routes, Registry};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most connections served at once; more get 503 at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Most connections one client process may hold at once; more get 503 at once.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 16;
/// A client must send its whole request within this time (not per read: a client trickling a
/// byte at a time is cut off all the same).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After the response, unread request bytes are read and dropped for at most this long, so
/// closing does not reset the connection before the client has read the response.
const LINGER: Duration = Duration::from_millis(200);
/// The socket's mode whatever the umask: owner only.
const SOCKET_MODE: u32 = 0o600;
/// The socket's mode when the operator names a group for its clients.
const GROUP_SOCKET_MODE: u32 = 0o660;

/// How long dropping a server waits for requests in flight (a snapshot being written) to
/// finish and answer their clients.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// A running API server; dropping it stops accepting, removes the socket file, and waits (up
/// to [`SHUTDOWN_GRACE`]) for the requests in flight to finish and be answered.
pub struct ApiServer {
    path: PathBuf,
    /// The listening socket, for waking the accepting thread when the path does not lead to
    /// it any more (a jailed server, chrooted away from it).
    listener: Option<UnixListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    slots: Arc<Mutex<Slots>>,
}

impl ApiServer {
    /// Serves `registry` on a new Unix socket at `path`, mode 0600 whatever the umask. A stale
    /// socket file (nobody listening) is replaced; a live one is an error.
    pub fn start(path: &Path, registry: Arc<Registry>) -> Result<ApiServer> {
        Self::bind(path, None)?.serve(registry)
    }

    /// Creates the socket at `path` (mode 0600, or 0660 with `group` as its group) without
    /// serving it yet: a server binds while it may still write the socket's directory, then
    /// drops its privileges, then serves.
    pub fn bind(path: &Path, group: Option<u32>) -> Result<BoundSocket> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::Invalid(format!(
                    "{} is in use by another vmfork process",
                    path.display()
                )));
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::Invalid(format!("cannot replace {}: {e}", path.display())))?;
        }
        Ok(BoundSocket {
            listener: bind_private(path, group)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A socket bound by [`ApiServer::bind`], not served yet.
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl BoundSocket {
    /// Serves `registry` on this socket, one thread per connection.
    pub fn serve(self, registry: Arc<Registry>) -> Result<ApiServer> {
        let listener = self.listener;
        let waker = listener.try_clone().ok();
        let stop = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(Mutex::new(Slots::default()));
        let thread = {
            let stop = Arc::clone(&stop);
            let slots = Arc::clone(&slots);
            std::thread::Builder::new()
                .name("vmfork-api".into())
                .spawn(move || {
                    crate::confine::seccomp::confine_vmm_thread();
                    accept_loop(&listener, &registry, &stop, &slots)
                })
                .map_err(Error::Io)?
        };
        Ok(ApiServer {
            path: self.path,
            listener: waker,
            stop,
            thread: Some(thread),
            slots,
        })
    }
}

/// Binds the socket in a fresh owner-only directory beside `path`, sets its mode (and group),
/// and renames it into place: it is never reachable under a looser mode, whatever the umask.
fn bind_private(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} is not a socket path", path.display())))?;
    let private = parent.join(format!(
        ".{}.bind-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private);
    let fail = |what: &str, e: std::io::Error| {
        Error::Invalid(format!("cannot listen on {}: {what}: {e}", path.display()))
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| fail("private directory", e))?;
    let staged = private.join("sock");
    let bound = UnixListener::bind(&staged)
        .map_err(|e| fail("bind", e))
        .and_then(|l| {
            let mode = match group {
                Some(gid) => {
                    std::os::unix::fs::chown(&staged, None, Some(gid))
                        .map_err(|e| fail("chown", e))?;
                    GROUP_SOCKET_MODE
                }
                None => SOCKET_MODE,
            };
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
                .map_err(|e| fail("chmod", e))?;
            std::fs::rename(&staged, path).map_err(|e| fail("rename", e))?;
            Ok(l)
        });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept: shutting the listening socket down fails it at once.
        if let Some(listener) = &self.listener {
            use std::os::fd::AsRawFd;
            // SAFETY: shutdown on a socket descriptor this value owns; no memory is passed.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        // Requests in flight (a snapshot being written) finish and answer their clients.
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while lock(&self.slots).total > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Connections held, in total and by client process.
#[derive(Default)]
struct Slots {
    total: usize,
    by_client: HashMap<i32, usize>,
}

impl Slots {
    /// Takes a slot for `client`, or says why not.
    fn take(&mut self, client: i32) -> std::result::Result<(), &'static str> {
        if self.total >= MAX_CONNECTIONS {
            return Err("too many connections");
        }
        let mine = self.by_client.entry(client).or_insert(0);
        if *mine >= MAX_CONNECTIONS_PER_CLIENT {
            return Err("too many connections from this client");
        }
        *mine += 1;
        self.total += 1;
        Ok(())
    }

    fn give_back(&mut self, client: i32) {
        self.total -= 1;
        if let Some(n) = self.by_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.by_client.remove(&client);
            }
        }
    }
}

/// The process id of the peer (0 when the kernel does not say).
fn peer_pid(stream: &UnixStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a ucred of `len` bytes into `cred`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        cred.pid
    } else {
        0
    }
}

fn lock(slots: &Mutex<Slots>) -> std::sync::MutexGuard<'_, Slots> {
    slots.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(
    listener: &UnixListener,
    registry: &Arc<Registry>,
    stop: &AtomicBool,
    slots: &Arc<Mutex<Slots>>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut stream) = stream else { continue };
        let client = peer_pid(&stream);
        if let Err(why) = lock(slots).take(client) {
            refuse(&mut stream, why);
            continue;
        }
        let registry = Arc::clone(registry);
        let slots_here = Arc::clone(slots);
        let spawned = std::thread::Builder::new()
            .name("vmfork-api-conn".into())
            .spawn(move || {
                serve_connection(stream, &registry);
                lock(&slots_here).give_back(client);
            });
        if spawned.is_err() {
            lock(slots).give_back(client);
        }
    }
}

/// Answers 503 on the accepting thread without waiting for the client: whatever part of its
/// request has arrived is read first, so the close does not reset the connection.
fn refuse(stream: &mut UnixStream, why: &str) {
    let _ = stream.set_nonblocking(true);
    let mut sink = [0u8; 16 << 10];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = Response::error(503, why).write_to(stream);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// A stream whose reads all end by one deadline.
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

fn serve_connection(mut stream: UnixStream, registry: &Registry) {
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let mut reader = DeadlineReader {
        stream: &stream,
        deadline: Instant::now() + REQUEST_TIMEOUT,
    };
    let response = match read_request(&mut reader) {
        Ok(req) => routes::handle(registry, &req),
        Err(response) => response,
    };
    let _ = response.write_to(&mut stream);
    // Let the client read the response before the close: drop what it still sends.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reader = DeadlineReader {
        stream: &stream,
        deadline: Instant::now() + LINGER,
    };
    let mut sink = [0u8; 16 << 10];
    let mut dropped = 0usize;
    while let Ok(n) = reader.read(&mut sink) {
        dropped += n;
        if n == 0 || dropped > (1 << 20) {
            break;
        }
    }
}
