//! The socket server: accepts connections on a Unix socket, one thread per connection (bounded),
//! one request per connection.

use super::http::{read_request, Response};
use super::{routes, Registry};
use crate::error::{Error, Result};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Most connections served at once; more get 503 at once.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A running API server; dropping it stops serving and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves `registry` on a new Unix socket at `path`. A stale socket file (nobody listening)
    /// is replaced; a live one is an error.
    pub fn start(path: &Path, registry: Arc<Registry>) -> Result<ApiServer> {
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
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::Invalid(format!("cannot listen on {}: {e}", path.display())))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("vmfork-api".into())
                .spawn(move || accept_loop(&listener, &registry, &stop))
                .map_err(Error::Io)?
        };
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, registry: &Arc<Registry>, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut stream) = stream else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = Response::error(503, "too many connections").write_to(&mut stream);
            continue;
        }
        let registry = Arc::clone(registry);
        let active_here = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("vmfork-api-conn".into())
            .spawn(move || {
                serve_connection(stream, &registry);
                active_here.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve_connection(mut stream: UnixStream, registry: &Registry) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let response = match read_request(&mut stream) {
        Ok(req) => routes::handle(registry, &req),
        Err(response) => response,
    };
    let _ = response.write_to(&mut stream);
}
