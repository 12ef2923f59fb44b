//! Just enough HTTP/1.1 for a local control socket: one request per connection, bounded head
//! and body, JSON in and out. httparse parses the head; everything else is explicit limits.

use std::io::{self, Read, Write};

/// Largest request head (request line + headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body (a memory write of 1 MiB is 2 MiB of hex plus JSON).
pub const MAX_BODY: usize = 4 << 20;
const MAX_HEADERS: usize = 32;

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A response: status code and a JSON body (or none for 204).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Option<serde_json::Value>,
}

impl Response {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            status,
            body: Some(body),
        }
    }

    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, serde_json::json!({ "error": message.into() }))
    }

    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let body = match &self.body {
            Some(v) => {
                let mut b = serde_json::to_vec_pretty(v).unwrap_or_else(|_| b"{}".to_vec());
                b.push(b'\n');
                b
            }
            None => Vec::new(),
        };
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            body.len()
        );
        if self.body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(&body)?;
        out.flush()
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// Reads one request; an `Err` is the response to send instead.
pub fn read_request(stream: &mut impl Read) -> Result<Request, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_len, method, target, content_length) = loop {
        let n = stream.read(&mut chunk).map_err(io_error)?;
        if n == 0 {
            return Err(Response::error(
                400,
                "connection closed before a full request",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let length = content_length(req.headers)?;
                break (
                    len,
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                    length,
                );
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(Response::error(431, "request head larger than 16 KiB"))
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Response::error(431, "more than 32 headers"))
            }
            Err(e) => return Err(Response::error(400, format!("malformed HTTP request: {e}"))),
        }
    };
    if content_length > MAX_BODY {
        return Err(Response::error(
            413,
            format!("body of {content_length} bytes is over the {MAX_BODY}-byte limit"),
        ));
    }
    let mut body = buf.split_off(head_len);
    if body.len() > content_length {
        return Err(Response::error(
            400,
            "more body bytes than Content-Length says",
        ));
    }
    let missing = content_length - body.len();
    body.reserve_exact(missing);
    stream
        .take(missing as u64)
        .read_to_end(&mut body)
        .map_err(io_error)?;
    if body.len() != content_length {
        return Err(Response::error(400, "body shorter than Content-Length"));
    }
    let (path, query) = split_target(&target)?;
    Ok(Request {
        method,
        path,
        query,
        body,
    })
}

fn io_error(e: io::Error) -> Response {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        Response::error(408, "request not received in time")
    } else {
        Response::error(400, format!("reading the request: {e}"))
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, Response> {
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(
                411,
                "chunked bodies are not supported; send Content-Length",
            ));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).unwrap_or("");
            let n: usize = text
                .trim()
                .parse()
                .map_err(|_| Response::error(400, format!("bad Content-Length '{text}'")))?;
            if length.is_some_and(|l| l != n) {
                return Err(Response::error(400, "conflicting Content-Length headers"));
            }
            length = Some(n);
        }
    }
    Ok(length.unwrap_or(0))
}

fn split_target(target: &str) -> Result<(String, Vec<(String, String)>), Response> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut pairs = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        pairs.push((k.to_string(), v.to_string()));
    }
    Ok((path.to_string(), pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, Response> {
        read_request(&mut &raw[..])
    }

    #[test]
    fn parses_a_request_with_body_and_query() {
        let r = parse(b"POST /vms/3/fork?x=1&y HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/vms/3/fork");
        assert_eq!(
            r.query,
            vec![("x".into(), "1".into()), ("y".into(), "".into())]
        );
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn refuses_bad_requests_with_the_right_status() {
        let status = |raw: &[u8]| parse(raw).unwrap_err().status;
        assert_eq!(status(b"GARBAGE\x01\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"),
            400
        );
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert_eq!(status(&huge), 431);
    }
}
