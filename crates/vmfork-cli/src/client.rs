//! The CLI side of the control API: one HTTP request per connection over the Unix socket.

use crate::CliResult;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Where the CLI looks for a vmfork process when `--api-sock` is not given.
pub const DEFAULT_SOCKET: &str = "/run/vmfork.sock";

/// Sends one request and returns the JSON reply (`Null` for 204); an HTTP error status becomes
/// the server's error message.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> CliResult<Value> {
    // Forking hundreds of children or reading a big range can take a while; hangs cannot.
    request_waiting(socket, method, path, body, Some(Duration::from_secs(120)))
}

/// [`request`] waiting at most `timeout` for the reply (`None`: as long as it takes, for work
/// that grows with RAM size such as writing a snapshot).
pub fn request_waiting(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Option<Duration>,
) -> CliResult<Value> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach a vmfork process at {}: {e} (start one with `vmfork serve` or \
             `vmfork run --api-sock`, or pass --api-sock)",
            socket.display()
        )
    })?;
    let _ = stream.set_read_timeout(timeout);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body.as_bytes()))
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .map_err(|e| format!("reading the reply: {e}"))?;
    let text = String::from_utf8_lossy(&reply);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .ok_or("the server sent a malformed reply")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("the server sent a malformed status line")?;
    let value: Value = if payload.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(payload).map_err(|e| format!("the server sent bad JSON: {e}"))?
    };
    if status >= 400 {
        let message = value["error"].as_str().unwrap_or("no message").to_string();
        return Err(format!("{message} (HTTP {status})"));
    }
    Ok(value)
}
