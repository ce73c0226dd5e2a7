//! The agent's client of a launcher's VMM API (runtime/src/api/openapi.yaml): one HTTP/1.1
//! request per connection over the UNIX socket, and the VMM's pid from the socket's peer
//! credentials (so the agent finds the launcher's namespaces and cgroups without asking the
//! container runtime).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrovirt_runtime::api::{VmInfo, VmState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the VMM API at {0}: {1}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("VMM API {0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("VMM API {path} answered {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("VMM API {0} sent a malformed response")]
    Malformed(String),
    #[error("VMM API {0} did not answer within {1:?}")]
    Timeout(String, Duration),
}

/// How long one request may take (the VMM answers 504 itself after 30 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(35);

/// The pid of the process listening on `socket`.
pub async fn peer_pid(socket: &Path) -> Result<i32, Error> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| Error::Connect(socket.to_owned(), e))?;
    let cred = stream
        .peer_cred()
        .map_err(|e| Error::Connect(socket.to_owned(), e))?;
    cred.pid()
        .ok_or_else(|| Error::Malformed("peer credentials carry no pid".into()))
}

/// The state of the VMM's VM; `None` before `vm.create`.
pub async fn vm_state(socket: &Path) -> Result<Option<VmState>, Error> {
    match request(socket, "GET", "vm.info", None).await {
        Ok(body) => serde_json::from_slice::<VmInfo>(&body)
            .map(|info| Some(info.state))
            .map_err(|_| Error::Malformed("GET vm.info".into())),
        Err(Error::Status { status: 404, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends one request; the response body on a 2xx status.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Vec<u8>, Error> {
    let what = format!("{method} {path}");
    tokio::time::timeout(REQUEST_TIMEOUT, exchange(socket, method, path, body))
        .await
        .map_err(|_| Error::Timeout(what, REQUEST_TIMEOUT))?
}

async fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Vec<u8>, Error> {
    let what = || format!("{method} {path}");
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| Error::Connect(socket.to_owned(), e))?;
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    if !body.is_empty() {
        request.extend_from_slice(b"Content-Type: application/json\r\n");
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    stream
        .write_all(&request)
        .await
        .map_err(|e| Error::Io(what(), e))?;
    // Every response carries `Connection: close`: read to EOF.
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| Error::Io(what(), e))?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error::Malformed(what()))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Malformed(what()))?;
    let body = response[split + 4..].to_vec();
    if !(200..300).contains(&status) {
        return Err(Error::Status {
            path: what(),
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(body)
}
