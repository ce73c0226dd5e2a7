//! The VMM's REST API on a UNIX socket, in the style of Cloud Hypervisor's.
//!
//! One thread accepts connections, reads one HTTP request from each, turns it into an
//! [`ApiRequest`] and hands it to the VMM control loop through the `submit` callback. The
//! API thread never touches the VM: it waits (bounded) for the control loop's
//! [`ApiResponse`] and writes it back. Every endpoint is in [`ROUTES`] and described in
//! `openapi.yaml` next to this file; a test keeps the two in step.

mod http;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::config::VmConfig;

/// Every endpoint lives under this prefix.
pub const API_PREFIX: &str = "/api/v1";

/// How long a client has to send its whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the API thread waits for the control loop to answer before giving up (504).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a wait for the control loop checks whether the server is stopping.
const STOP_POLL: Duration = Duration::from_millis(100);

/// What a client asked the VMM to do.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    VmCreate(Box<VmConfig>),
    VmBoot,
    VmInfo,
    VmPause,
    VmResume,
    VmShutdown,
    VmCounters,
    VmmPing,
    VmmShutdown,
}

/// A refusal from the VMM: the HTTP status (4xx/5xx) and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: the request itself is wrong (bad config, invalid value).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, message)
    }

    /// 404: the thing asked about does not exist (no VM created yet).
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, message)
    }

    /// 409: the request does not fit the VM's current state.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(409, message)
    }

    /// 500: the VMM failed while doing something that should have worked.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, message)
    }

    /// 400 carrying an error and its whole `source()` chain, for errors like `ConfigError`.
    pub fn bad_request_from(error: &dyn std::error::Error) -> ApiError {
        ApiError::bad_request(error_chain(error))
    }

    /// 500 carrying an error and its whole `source()` chain.
    pub fn internal_from(error: &dyn std::error::Error) -> ApiError {
        ApiError::internal(error_chain(error))
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The control loop's answer: `Ok(None)` is 204, `Ok(Some(json))` is 200 with that body.
pub type ApiResponse = Result<Option<serde_json::Value>, ApiError>;

/// Serializes a response body, for the control loop's `Ok(Some(..))` answers.
pub fn json_response<T: Serialize>(body: &T) -> ApiResponse {
    serde_json::to_value(body)
        .map(Some)
        .map_err(|e| ApiError::internal(format!("cannot serialize the response: {e}")))
}

/// A request on its way to the control loop, with the channel for its answer.
#[derive(Debug)]
pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: mpsc::Sender<ApiResponse>,
}

/// The VM's lifecycle state, as `GET /vm.info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

/// The body of `GET /vm.info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfig,
}

/// The body of `GET /vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub version: String,
    pub pid: u32,
}

impl VmmPingResponse {
    /// This VMM's version and process id.
    pub fn current() -> VmmPingResponse {
        VmmPingResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
        }
    }
}

/// The body of `GET /vm.counters`: device name → counter name → value,
/// e.g. `{"vcpu0": {"io_exits": 12}, "serial": {"tx_bytes": 100}}`.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// One endpoint: a path under [`API_PREFIX`], its method, and how its body becomes a request.
pub(crate) struct Route {
    pub path: &'static str,
    pub method: &'static str,
    build: fn(&[u8]) -> Result<ApiRequest, ApiError>,
}

/// Every endpoint the server answers. `openapi.yaml` lists exactly these.
pub(crate) const ROUTES: &[Route] = &[
    Route {
        path: "/vm.create",
        method: "PUT",
        build: parse_vm_create,
    },
    Route {
        path: "/vm.boot",
        method: "PUT",
        build: |_| Ok(ApiRequest::VmBoot),
    },
    Route {
        path: "/vm.info",
        method: "GET",
        build: |_| Ok(ApiRequest::VmInfo),
    },
    Route {
        path: "/vm.pause",
        method: "PUT",
        build: |_| Ok(ApiRequest::VmPause),
    },
    Route {
        path: "/vm.resume",
        method: "PUT",
        build: |_| Ok(ApiRequest::VmResume),
    },
    Route {
        path: "/vm.shutdown",
        method: "PUT",
        build: |_| Ok(ApiRequest::VmShutdown),
    },
    Route {
        path: "/vm.counters",
        method: "GET",
        build: |_| Ok(ApiRequest::VmCounters),
    },
    Route {
        path: "/vmm.ping",
        method: "GET",
        build: |_| Ok(ApiRequest::VmmPing),
    },
    Route {
        path: "/vmm.shutdown",
        method: "PUT",
        build: |_| Ok(ApiRequest::VmmShutdown),
    },
];

fn parse_vm_create(body: &[u8]) -> Result<ApiRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "vm.create needs a VmConfig JSON body (see openapi.yaml)",
        ));
    }
    serde_json::from_slice::<VmConfig>(body)
        .map(|config| ApiRequest::VmCreate(Box::new(config)))
        .map_err(|e| ApiError::bad_request(format!("invalid VmConfig: {e}")))
}

/// Finds the route for a request, or the 404/405 answer.
fn route(method: &str, path: &str) -> Result<&'static Route, http::Response> {
    let endpoint = path.strip_prefix(API_PREFIX).unwrap_or("");
    let mut allowed = ROUTES.iter().filter(|r| r.path == endpoint).peekable();
    if allowed.peek().is_none() {
        return Err(error_response(
            404,
            &format!("no endpoint {path}; the API is described in openapi.yaml"),
        ));
    }
    let mut methods = Vec::new();
    for r in allowed {
        if r.method == method {
            return Ok(r);
        }
        methods.push(r.method);
    }
    let allow = methods.join(", ");
    let mut response = error_response(405, &format!("{path} does not take {method}; use {allow}"));
    response.allow = Some(allow);
    Err(response)
}

fn error_response(status: u16, message: &str) -> http::Response {
    // Serializing a map of one string cannot fail.
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    http::Response {
        status,
        body: Some(body),
        allow: None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("socket {} is in use by another VMM; stop it or pick another API socket path", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket; remove it or pick another API socket path", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot check whether API socket {} is in use", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale API socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on API socket {}; does its directory exist and is it writable?", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the API thread")]
    Thread(#[source] io::Error),
}

/// Timeouts, shortened by tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub request_timeout: Duration,
    pub reply_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: REQUEST_TIMEOUT,
            reply_timeout: REPLY_TIMEOUT,
        }
    }
}

/// The running API server. Dropping it stops the thread and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    /// (st_dev, st_ino) of the socket we bound, so Drop never removes someone else's.
    socket_id: (u64, u64),
    stop: Arc<AtomicBool>,
    /// Written once on Drop; the API thread polls the other end.
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` and serves the API from a new thread. `submit` hands a request to
    /// the VMM control loop and returns false when the control loop is gone (answered with
    /// 503); it must not block.
    pub fn start(
        path: &Path,
        submit: Box<dyn Fn(ApiMessage) -> bool + Send>,
    ) -> Result<ApiServer, ApiServerError> {
        ApiServer::start_with_limits(path, submit, Limits::default())
    }

    pub(crate) fn start_with_limits(
        path: &Path,
        submit: Box<dyn Fn(ApiMessage) -> bool + Send>,
        limits: Limits,
    ) -> Result<ApiServer, ApiServerError> {
        claim_socket_path(path)?;
        let bind_error = |source| ApiServerError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        let socket_id = std::fs::metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(bind_error)?;
        let started =
            UnixStream::pair()
                .map_err(ApiServerError::Thread)
                .and_then(|(wake, wake_rx)| {
                    let stop = Arc::new(AtomicBool::new(false));
                    let server = ServerThread {
                        listener,
                        wake: wake_rx,
                        stop: stop.clone(),
                        submit,
                        limits,
                    };
                    std::thread::Builder::new()
                        .name("vmm-api".to_owned())
                        .spawn(move || server.run())
                        .map(|thread| (wake, stop, thread))
                        .map_err(ApiServerError::Thread)
                });
        let (wake, stop, thread) = match started {
            Ok(parts) => parts,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        info!(path = %path.display(), "API server listening");
        Ok(ApiServer {
            path: path.to_owned(),
            socket_id,
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// The socket path the server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write_all(&[1]) {
            warn!(error = %e, "cannot wake the API thread; it stops when the process exits");
            return;
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the API thread panicked");
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.socket_id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "cannot remove the API socket");
                }
            }
            // Gone already, or replaced by another process's socket: leave it.
            _ => {}
        }
    }
}

/// Makes `path` free for bind(): refuses a live socket, removes a stale one.
fn claim_socket_path(path: &Path) -> Result<(), ApiServerError> {
    let probe_error = |source| ApiServerError::Probe {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(probe_error(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiServerError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing stale API socket");
            std::fs::remove_file(path).map_err(|source| ApiServerError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(e) => Err(probe_error(e)),
    }
}

struct ServerThread {
    listener: UnixListener,
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    submit: Box<dyn Fn(ApiMessage) -> bool + Send>,
    limits: Limits,
}

impl ServerThread {
    fn run(self) {
        loop {
            match http::wait_readable(self.listener.as_fd(), self.wake.as_fd(), None) {
                Ok(http::Readiness::Ready) => {}
                Ok(_) => break,
                Err(e) => {
                    warn!(error = %e, "API server cannot wait for connections; API stopped");
                    break;
                }
            }
            match self.listener.accept() {
                Ok((mut stream, _)) => self.serve_connection(&mut stream),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors and the like: the listener stays readable, so
                    // pause instead of spinning.
                    warn!(error = %e, "API server cannot accept a connection");
                    std::thread::sleep(STOP_POLL);
                }
            }
        }
        debug!("API thread stopped");
    }

    fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    fn serve_connection(&self, stream: &mut UnixStream) {
        let response = match http::read_request(stream, self.wake_fd(), self.limits.request_timeout)
        {
            Ok(request) => {
                let response = self.dispatch(&request);
                debug!(
                    method = %request.method,
                    path = %request.path,
                    status = response.status,
                    "API request"
                );
                response
            }
            Err(e) => match e.status() {
                Some(status) => {
                    debug!(status, error = %e, "refused API request");
                    error_response(status, &e.to_string())
                }
                None => {
                    debug!(error = %e, "API connection dropped");
                    return;
                }
            },
        };
        // The response fits in the socket buffer; the timeout only guards a stuck client.
        let written = stream
            .set_write_timeout(Some(self.limits.request_timeout))
            .and_then(|()| http::write_response(stream, &response));
        if let Err(e) = written {
            debug!(error = %e, "cannot send the API response; the client went away");
        }
    }

    fn dispatch(&self, request: &http::Request) -> http::Response {
        let route = match route(&request.method, &request.path) {
            Ok(route) => route,
            Err(response) => return response,
        };
        let api_request = match (route.build)(&request.body) {
            Ok(r) => r,
            Err(e) => return error_response(e.status, &e.message),
        };
        let (reply, answer) = mpsc::channel();
        if !(self.submit)(ApiMessage {
            request: api_request,
            reply,
        }) {
            return error_response(503, "the VMM is not taking requests; it is shutting down");
        }
        match self.wait_for_answer(&answer) {
            Ok(Some(body)) => match serde_json::to_vec(&body) {
                Ok(body) => http::Response {
                    status: 200,
                    body: Some(body),
                    allow: None,
                },
                Err(e) => error_response(500, &format!("cannot serialize the response: {e}")),
            },
            Ok(None) => http::Response {
                status: 204,
                body: None,
                allow: None,
            },
            Err(e) => {
                let status = if (400..=599).contains(&e.status) {
                    e.status
                } else {
                    500
                };
                error_response(status, &e.message)
            }
        }
    }

    fn wait_for_answer(&self, answer: &mpsc::Receiver<ApiResponse>) -> ApiResponse {
        let deadline = Instant::now() + self.limits.reply_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::new(
                    504,
                    format!(
                        "the VMM did not answer within {:?}; it may be stuck",
                        self.limits.reply_timeout
                    ),
                ));
            }
            match answer.recv_timeout(left.min(STOP_POLL)) {
                Ok(response) => return response,
                Err(RecvTimeoutError::Timeout) if self.stop.load(Ordering::SeqCst) => {
                    return Err(ApiError::new(503, "the VMM API is shutting down"));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ApiError::new(
                        503,
                        "the VMM dropped the request without answering; it is shutting down",
                    ));
                }
            }
        }
    }
}
