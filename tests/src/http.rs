//! A small blocking HTTP/1.1 client over a UNIX stream socket, for the VMM's REST API.
//!
//! One request per connection (`Connection: close`); the response is complete when its
//! `Content-Length` bytes, its last chunk, or EOF has arrived.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Responses larger than this are a bug in the server, not something to buffer.
const MAX_RESPONSE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to API socket {path}: is the VMM running with --api-socket?")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket I/O failed")]
    Io(#[source] io::Error),
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("connection closed before the response was complete ({0} bytes received)")]
    Truncated(usize),
    #[error("response is larger than {MAX_RESPONSE} bytes")]
    TooLarge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, values trimmed, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request and reads the whole response. A JSON `body` gets
/// `Content-Type: application/json`; every request carries a `Content-Length`.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| HttpError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(HttpError::Io)?;
    stream
        .write_all(&encode_request(method, path, body))
        .map_err(HttpError::Io)?;
    read_response(&mut stream)
}

/// The bytes of one request.
pub fn encode_request(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let body = body.unwrap_or("");
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if !body.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    out.push_str(body);
    out.into_bytes()
}

/// Reads from `stream` until [`parse_response`] has a whole response.
pub fn read_response(stream: &mut impl Read) -> Result<HttpResponse, HttpError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HttpError::Io(e)),
        };
        let eof = n == 0;
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(HttpError::TooLarge);
        }
        if let Some(response) = parse_response(&buf, eof)? {
            return Ok(response);
        }
        if eof {
            return Err(HttpError::Truncated(buf.len()));
        }
    }
}

/// Parses a response from the bytes received so far. `Ok(None)` means more bytes are needed;
/// `eof` says the peer closed, which ends a body without length or chunking.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<HttpResponse>, HttpError> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| HttpError::Malformed("header is not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = parse_status_line(status_line)?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::Malformed(format!("header line {line:?} has no colon")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let rest = &buf[head_end + 4..];
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let body: Vec<u8> = if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        match decode_chunked(rest)? {
            Some(body) => body,
            None => return Ok(None),
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| HttpError::Malformed(format!("bad Content-Length {len:?}")))?;
        if rest.len() < len {
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

fn parse_status_line(line: &str) -> Result<u16, HttpError> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("bad status line {line:?}")));
    }
    parts
        .next()
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|code| (100..600).contains(code))
        .ok_or_else(|| HttpError::Malformed(format!("bad status line {line:?}")))
}

/// `Ok(None)` while the terminating zero-size chunk has not arrived.
fn decode_chunked(mut rest: &[u8]) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&rest[..line_end])
            .map_err(|_| HttpError::Malformed("chunk size is not UTF-8".into()))?;
        // Chunk extensions follow a ';'.
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed(format!("bad chunk size {size_text:?}")))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers are not used by the VMM API; the body is complete.
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        if &rest[size..size + 2] != b"\r\n" {
            return Err(HttpError::Malformed("chunk not followed by CRLF".into()));
        }
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn content_length_body_is_complete_only_when_all_bytes_arrived() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello";
        assert_eq!(
            parse_response(&full[..full.len() - 1], false).unwrap(),
            None
        );
        let r = parse_response(full, false).unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "hello");
        assert_eq!(r.header("Server"), Some("x"));
    }

    #[test]
    fn chunked_body_is_reassembled() {
        let full = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n6;x=y\r\npedia \r\n0\r\n\r\n";
        assert_eq!(parse_response(&full[..40], false).unwrap(), None);
        let r = parse_response(full, false).unwrap().unwrap();
        assert_eq!(r.body, "Wikipedia ");
    }

    #[test]
    fn body_without_length_ends_at_eof() {
        let full = b"HTTP/1.0 500 Internal Server Error\r\n\r\n{\"error\":1}";
        assert_eq!(parse_response(full, false).unwrap(), None);
        let r = parse_response(full, true).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_str()), (500, "{\"error\":1}"));
    }

    #[test]
    fn no_content_needs_no_body() {
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (204, ""));
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(parse_response(bad, true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_carries_length_and_json_type() {
        let text = String::from_utf8(encode_request("PUT", "/api/v1/vm.boot", Some("{}"))).unwrap();
        assert!(text.starts_with("PUT /api/v1/vm.boot HTTP/1.1\r\n"));
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.ends_with("Content-Length: 2\r\n\r\n{}"));
        let text = String::from_utf8(encode_request("GET", "/x", None)).unwrap();
        assert!(text.ends_with("Content-Length: 0\r\n\r\n"));
    }

    #[test]
    fn round_trip_over_a_unix_socket() {
        let dir = crate::ScratchDir::new("http_round_trip").unwrap();
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&req, b"\r\n\r\n{\"a\":1}").is_none() {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0);
                req.extend_from_slice(&buf[..n]);
            }
            // Split the response over two writes to exercise reassembly.
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap();
            conn.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            conn.write_all(b"ngth: 2\r\n\r\nok").unwrap();
            String::from_utf8(req).unwrap()
        });
        let r = request(
            &path,
            "PUT",
            "/api/v1/vm.create",
            Some("{\"a\":1}"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let req = server.join().unwrap();
        assert!(req.starts_with("PUT /api/v1/vm.create HTTP/1.1\r\n"));
    }
}
