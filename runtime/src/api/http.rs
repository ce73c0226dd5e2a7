//! Just enough HTTP/1.1 for the VMM API: one request per connection, bodies sized by
//! `Content-Length`, a hard limit on every length and a deadline on every read.
//!
//! The API socket is local, but its clients are still untrusted input: a bad request gets
//! an error status and a closed connection, never a panic, an unbounded allocation or a
//! thread stuck on a silent peer.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// The request line and headers together; a VMM API request needs a few hundred bytes.
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The largest request body (a VmConfig is a few hundred bytes).
pub(crate) const MAX_BODY_BYTES: u64 = 1 << 20;

const READ_CHUNK: usize = 4096;

/// A request as the router needs it.
#[derive(Debug)]
pub(crate) struct Request {
    pub method: String,
    /// The path without any query string.
    pub path: String,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("the client closed the connection before sending a request")]
    Closed,
    #[error("the API server is stopping")]
    Stopping,
    #[error("the request did not arrive within {0:?}; send it in one go")]
    Timeout(Duration),
    #[error("the request line and headers exceed {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    #[error("HTTP version {0:?} is not supported; use HTTP/1.1")]
    Version(String),
    #[error("chunked request bodies are not supported; send the body with a Content-Length header")]
    LengthRequired,
    #[error("the request body of {0} bytes is larger than the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(u64),
    #[error("Expect: {0:?} is not supported; only 100-continue is")]
    Expectation(String),
    #[error("cannot read the request from the API socket")]
    Io(#[source] io::Error),
}

impl RequestError {
    /// The status to answer with, or `None` when there is nobody to answer.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            RequestError::Closed | RequestError::Stopping | RequestError::Io(_) => None,
            RequestError::Timeout(_) => Some(408),
            RequestError::HeadTooLarge => Some(431),
            RequestError::Malformed(_) => Some(400),
            RequestError::Version(_) => Some(505),
            RequestError::LengthRequired => Some(411),
            RequestError::BodyTooLarge(_) => Some(413),
            RequestError::Expectation(_) => Some(417),
        }
    }
}

/// What woke up a wait on a file descriptor.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    Ready,
    Stopping,
    TimedOut,
}

/// Waits until `fd` is readable, `wake` is readable (the server is stopping) or `deadline`
/// passes. `wake` wins when both are ready, so a stopping server takes no new work.
pub(crate) fn wait_readable(
    fd: BorrowedFd<'_>,
    wake: BorrowedFd<'_>,
    deadline: Option<Instant>,
) -> io::Result<Readiness> {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Readiness::TimedOut);
                }
                // Round up so a sub-millisecond remainder does not spin; longer waits are
                // cut into u16-millisecond slices and the loop re-checks the deadline.
                let ms = left.as_millis().saturating_add(1);
                PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
            }
        };
        let mut fds = [
            PollFd::new(wake, PollFlags::POLLIN),
            PollFd::new(fd, PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let woke = |pfd: &PollFd<'_>| pfd.revents().is_some_and(|r| !r.is_empty());
        if woke(&fds[0]) {
            return Ok(Readiness::Stopping);
        }
        if woke(&fds[1]) {
            // Readable, hung up or in error: the read that follows reports which.
            return Ok(Readiness::Ready);
        }
    }
}

struct Connection<'a> {
    stream: &'a mut UnixStream,
    wake: BorrowedFd<'a>,
    deadline: Instant,
    timeout: Duration,
}

impl Connection<'_> {
    /// One `read` that gives up at the deadline or when the server stops.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, RequestError> {
        loop {
            match wait_readable(self.stream.as_fd(), self.wake, Some(self.deadline)) {
                Ok(Readiness::Ready) => {}
                Ok(Readiness::Stopping) => return Err(RequestError::Stopping),
                Ok(Readiness::TimedOut) => return Err(RequestError::Timeout(self.timeout)),
                Err(e) => return Err(RequestError::Io(e)),
            }
            match self.stream.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RequestError::Io(e)),
            }
        }
    }
}

/// Reads one request from `stream`, giving up after `timeout` in total or when `wake`
/// becomes readable.
pub(crate) fn read_request(
    stream: &mut UnixStream,
    wake: BorrowedFd<'_>,
    timeout: Duration,
) -> Result<Request, RequestError> {
    let mut conn = Connection {
        stream,
        wake,
        deadline: Instant::now() + timeout,
        timeout,
    };

    let mut buf = Vec::with_capacity(READ_CHUNK);
    let mut chunk = [0u8; READ_CHUNK];
    let head_len = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(RequestError::HeadTooLarge);
        }
        let n = conn.read_some(&mut chunk)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                RequestError::Closed
            } else {
                RequestError::Malformed("the connection closed in the middle of the headers")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(RequestError::HeadTooLarge);
    }
    let head = Head::parse(&buf[..head_len])?;

    if head.chunked {
        return Err(RequestError::LengthRequired);
    }
    let body_len = head.content_length.unwrap_or(0);
    if body_len > MAX_BODY_BYTES {
        return Err(RequestError::BodyTooLarge(body_len));
    }
    // Bounded by MAX_BODY_BYTES just above.
    let body_len = body_len as usize;
    if let Some(expect) = head.expect {
        if !expect.eq_ignore_ascii_case("100-continue") {
            return Err(RequestError::Expectation(expect));
        }
        if body_len > 0 {
            conn.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(RequestError::Io)?;
        }
    }

    let mut body = buf.split_off(head_len + 4);
    // Anything past the body would be a pipelined request; this server answers one
    // request per connection, so it is dropped.
    body.truncate(body_len);
    while body.len() < body_len {
        let want = (body_len - body.len()).min(READ_CHUNK);
        let n = conn.read_some(&mut chunk[..want])?;
        if n == 0 {
            return Err(RequestError::Malformed(
                "the connection closed before the whole body (per Content-Length) arrived",
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }

    Ok(Request {
        method: head.method,
        path: head.path,
        body,
    })
}

struct Head {
    method: String,
    path: String,
    content_length: Option<u64>,
    chunked: bool,
    expect: Option<String>,
}

impl Head {
    fn parse(raw: &[u8]) -> Result<Head, RequestError> {
        let text = std::str::from_utf8(raw)
            .map_err(|_| RequestError::Malformed("the request line and headers are not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
            (Some(m), Some(t), Some(v)) if parts.next().is_none() && !m.is_empty() => (m, t, v),
            _ => {
                return Err(RequestError::Malformed(
                    "the request line must be `METHOD /path HTTP/1.1`",
                ));
            }
        };
        match version {
            "HTTP/1.1" | "HTTP/1.0" => {}
            v if v.starts_with("HTTP/") => return Err(RequestError::Version(v.to_owned())),
            _ => {
                return Err(RequestError::Malformed(
                    "the request line must end with the HTTP version",
                ));
            }
        }
        if !target.starts_with('/') {
            return Err(RequestError::Malformed(
                "the request path must start with /",
            ));
        }
        let path = target.split_once('?').map_or(target, |(p, _)| p);

        let mut head = Head {
            method: method.to_owned(),
            path: path.to_owned(),
            content_length: None,
            chunked: false,
            expect: None,
        };
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or(RequestError::Malformed("a header line has no `:`"))?;
            if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
                return Err(RequestError::Malformed(
                    "a header name is empty or has spaces",
                ));
            }
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let length = parse_content_length(value)?;
                if head.content_length.is_some_and(|l| l != length) {
                    return Err(RequestError::Malformed(
                        "conflicting Content-Length headers",
                    ));
                }
                head.content_length = Some(length);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = true;
            } else if name.eq_ignore_ascii_case("expect") {
                head.expect = Some(value.to_owned());
            }
        }
        Ok(head)
    }
}

fn parse_content_length(value: &str) -> Result<u64, RequestError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestError::Malformed(
            "Content-Length is not a decimal number",
        ));
    }
    // All digits, so the only failure is overflow: far above the limit either way.
    Ok(value.parse().unwrap_or(u64::MAX))
}

/// A response; every response closes the connection.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    /// A JSON document, or nothing (204).
    pub body: Option<Vec<u8>>,
    /// The methods a path takes, for 405.
    pub allow: Option<String>,
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ if status < 500 => "Client Error",
        _ => "Server Error",
    }
}

/// Writes `response` and closes the write side, so the client sees the end of it.
pub(crate) fn write_response(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: ferrovirt-vmm/{}\r\nConnection: close\r\n",
        response.status,
        reason_phrase(response.status),
        env!("CARGO_PKG_VERSION"),
    );
    if let Some(allow) = &response.allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    // RFC 9110 §8.6: no Content-Length on a 204.
    if let Some(body) = &response.body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = &response.body {
        stream.write_all(body)?;
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Head, RequestError> {
        Head::parse(raw.as_bytes())
    }

    #[test]
    fn query_string_is_not_part_of_the_path() {
        let h = head("GET /api/v1/vm.info?x=1 HTTP/1.1\r\nHost: x").unwrap();
        assert_eq!(h.path, "/api/v1/vm.info");
        assert_eq!(h.method, "GET");
    }

    #[test]
    fn header_names_are_case_insensitive() {
        let h = head("PUT / HTTP/1.1\r\ncontent-LENGTH:  12 \r\nEXPECT: 100-continue").unwrap();
        assert_eq!(h.content_length, Some(12));
        assert_eq!(h.expect.as_deref(), Some("100-continue"));
    }

    #[test]
    fn conflicting_or_bogus_lengths_are_refused() {
        for raw in [
            "PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
            "PUT / HTTP/1.1\r\nContent-Length: -1",
            "PUT / HTTP/1.1\r\nContent-Length: 0x10",
            "PUT / HTTP/1.1\r\nContent-Length:",
        ] {
            assert!(
                matches!(head(raw), Err(RequestError::Malformed(_))),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn huge_lengths_saturate_instead_of_failing() {
        let h = head("PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999").unwrap();
        assert_eq!(h.content_length, Some(u64::MAX));
    }

    #[test]
    fn bad_request_lines_are_refused() {
        for raw in [
            "",
            "GET",
            "GET /",
            "GET / HTTP/1.1 extra",
            "GET  / HTTP/1.1",
            "GET vm.info HTTP/1.1",
        ] {
            assert!(
                matches!(head(raw), Err(RequestError::Malformed(_))),
                "{raw:?}"
            );
        }
        assert!(matches!(
            head("GET / HTTP/2.0"),
            Err(RequestError::Version(_))
        ));
    }
}
