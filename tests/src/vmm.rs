//! A `ferrovirt-vmm` process per test: its scratch directory, output, API socket and exit.
//!
//! ```no_run
//! use std::time::Duration;
//! use ferrovirt_tests::{testguest, VmmProcess};
//!
//! let vmm = VmmProcess::builder("boots_to_exit")
//!     .unwrap()
//!     .arg("--kernel").arg(testguest())
//!     .args(["--cmdline", "scenario=exit", "--memory", "64"]);
//! let mut vmm = vmm.spawn().unwrap();
//! assert_eq!(vmm.wait_timeout(Duration::from_secs(30)).unwrap().code(), Some(0));
//! ```

use std::ffi::{OsStr, OsString};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::artifacts::{self, ArtifactError};
use crate::http::{self, HttpError, HttpResponse};
use crate::process::{self, GuardedProcess, ProcessError, ProcessExit, ScratchDir};

/// How long one API request may take before it counts as a hang.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("this VMM was started without an API socket; call `with_api_socket()` on the builder")]
    NoApiSocket,
    #[error("API request {method} {path} failed; VMM stderr ends with:\n{stderr_tail}")]
    Api {
        method: String,
        path: String,
        stderr_tail: String,
        #[source]
        source: HttpError,
    },
    #[error(
        "the VMM exited ({status}) before {what}; stdout ends with:\n{stdout_tail}\nstderr ends with:\n{stderr_tail}"
    )]
    ExitedEarly {
        what: String,
        status: ExitStatus,
        stdout_tail: String,
        stderr_tail: String,
    },
    #[error(
        "{what} did not happen within {timeout:?}; stdout ends with:\n{stdout_tail}\nstderr ends with:\n{stderr_tail}"
    )]
    Timeout {
        what: String,
        timeout: Duration,
        stdout_tail: String,
        stderr_tail: String,
    },
}

/// Collects the flags for one VMM; its scratch directory exists from `new` on, so paths in it
/// (serial or debugcon files, sockets, disk images) can go into the flags.
#[derive(Debug)]
pub struct VmmBuilder {
    dir: ScratchDir,
    binary: Option<PathBuf>,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    api_socket: Option<PathBuf>,
}

impl VmmBuilder {
    /// `name` (usually the test's name) makes the scratch directory recognizable.
    pub fn new(name: &str) -> Result<VmmBuilder, VmmError> {
        Ok(VmmBuilder {
            dir: ScratchDir::new(name)?,
            binary: None,
            args: Vec::new(),
            envs: Vec::new(),
            api_socket: None,
        })
    }

    /// The scratch directory, removed when the VMM guard drops.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the scratch directory.
    pub fn file(&self, name: impl AsRef<Path>) -> PathBuf {
        self.dir.join(name)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> VmmBuilder {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> VmmBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> VmmBuilder {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Adds `--api-socket <dir>/api.sock`.
    pub fn with_api_socket(mut self) -> VmmBuilder {
        let path = self.dir.join("api.sock");
        self.args.push("--api-socket".into());
        self.args.push(path.clone().into());
        self.api_socket = Some(path);
        self
    }

    /// Runs this binary instead of [`artifacts::vmm_binary`].
    pub fn binary(mut self, path: impl Into<PathBuf>) -> VmmBuilder {
        self.binary = Some(path.into());
        self
    }

    pub fn spawn(self) -> Result<VmmProcess, VmmError> {
        let binary = match self.binary {
            Some(binary) => binary,
            None => artifacts::try_vmm_binary()?,
        };
        let mut cmd = Command::new(&binary);
        cmd.args(&self.args);
        for (key, value) in &self.envs {
            cmd.env(key, value);
        }
        let process =
            GuardedProcess::spawn(cmd, &self.dir.join("stdout"), &self.dir.join("stderr"))?;
        Ok(VmmProcess {
            process,
            api_socket: self.api_socket,
            dir: self.dir,
        })
    }
}

/// A running `ferrovirt-vmm`. Dropping it stops the process group (SIGTERM, then SIGKILL),
/// reaps it and removes its scratch directory with the API socket.
#[derive(Debug)]
pub struct VmmProcess {
    // Field order matters: the process must stop before its directory goes.
    process: GuardedProcess,
    api_socket: Option<PathBuf>,
    dir: ScratchDir,
}

impl VmmProcess {
    pub fn builder(name: &str) -> Result<VmmBuilder, VmmError> {
        VmmBuilder::new(name)
    }

    /// Starts the VMM with `args` and nothing else.
    pub fn spawn<I, S>(name: &str, args: I) -> Result<VmmProcess, VmmError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        VmmBuilder::new(name)?.args(args).spawn()
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `--api-socket` path, when the builder added one.
    pub fn api_socket(&self) -> Option<&Path> {
        self.api_socket.as_deref()
    }

    /// The underlying process, for rusage and signals.
    pub fn process_mut(&mut self) -> &mut GuardedProcess {
        &mut self.process
    }

    /// Everything the VMM wrote to stdout: with `--serial tty` (the default), the guest's serial
    /// console.
    pub fn serial_output(&self) -> String {
        self.process.stdout()
    }

    /// Everything the VMM wrote to stderr (its logs).
    pub fn stderr_output(&self) -> String {
        self.process.stderr()
    }

    /// Waits for the VMM to exit; on timeout it keeps running (and `Drop` stops it).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, VmmError> {
        self.wait_exit(timeout).map(|exit| exit.status)
    }

    /// Like [`VmmProcess::wait_timeout`], with the CPU time and peak RSS of the run.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ProcessExit, VmmError> {
        match self.process.wait_timeout(timeout) {
            Ok(exit) => Ok(exit),
            Err(ProcessError::Timeout { .. }) => Err(self.timeout_error("VMM exit", timeout)),
            Err(e) => Err(e.into()),
        }
    }

    /// Polls the serial output until it contains `pattern`; returns the output so far.
    /// Fails early if the VMM exits without printing it.
    pub fn wait_for_output(
        &mut self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<String, VmmError> {
        let what = format!("serial output {pattern:?}");
        self.poll_until(&what, timeout, |vmm| {
            let out = vmm.serial_output();
            out.contains(pattern).then_some(out)
        })
    }

    /// Waits until the API socket accepts connections.
    pub fn wait_for_api(&mut self, timeout: Duration) -> Result<(), VmmError> {
        let socket = self.api_socket.clone().ok_or(VmmError::NoApiSocket)?;
        self.poll_until("API socket accepting", timeout, |_| {
            UnixStream::connect(&socket).ok().map(|_| ())
        })
    }

    /// One request to the REST API; returns the status code and body. A body is sent as JSON.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), VmmError> {
        self.api_response(method, path, body)
            .map(|response| (response.status, response.body))
    }

    /// Like [`VmmProcess::api`], with the response headers.
    pub fn api_response(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<HttpResponse, VmmError> {
        let socket = self.api_socket.as_deref().ok_or(VmmError::NoApiSocket)?;
        http::request(socket, method, path, body, API_TIMEOUT).map_err(|source| VmmError::Api {
            method: method.to_string(),
            path: path.to_string(),
            stderr_tail: process::tail(&self.stderr_output(), 20),
            source,
        })
    }

    fn poll_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return Ok(found);
            }
            if let Some(exit) = self.process.try_exit()? {
                // It may have printed the pattern just before exiting.
                if let Some(found) = check(self) {
                    return Ok(found);
                }
                return Err(VmmError::ExitedEarly {
                    what: what.to_string(),
                    status: exit.status,
                    stdout_tail: process::tail(&self.serial_output(), 20),
                    stderr_tail: process::tail(&self.stderr_output(), 20),
                });
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(what, timeout));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn timeout_error(&self, what: &str, timeout: Duration) -> VmmError {
        VmmError::Timeout {
            what: what.to_string(),
            timeout,
            stdout_tail: process::tail(&self.serial_output(), 20),
            stderr_tail: process::tail(&self.stderr_output(), 20),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in "VMM" (a shell script) exercises the guard without the real binary.
    fn fake_vmm(builder: VmmBuilder, script: &str) -> VmmProcess {
        builder
            .binary("/bin/sh")
            .arg("-c")
            .arg(script)
            .spawn()
            .unwrap()
    }

    #[test]
    fn output_is_awaited_and_exit_status_returned() {
        let b = VmmBuilder::new("fake_output").unwrap();
        let mut vmm = fake_vmm(b, "echo booting; sleep 0.1; echo 'login:'; exit 3");
        let out = vmm
            .wait_for_output("login:", Duration::from_secs(10))
            .unwrap();
        assert!(out.starts_with("booting\n"));
        let status = vmm.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(status.code(), Some(3));
    }

    #[test]
    fn waiting_for_output_fails_fast_when_the_vmm_exits() {
        let b = VmmBuilder::new("fake_exit").unwrap();
        let mut vmm = fake_vmm(b, "echo 'kvm: no' >&2; exit 1");
        let started = Instant::now();
        let err = vmm
            .wait_for_output("never", Duration::from_secs(60))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.to_string().contains("kvm: no"), "{err}");
    }

    #[test]
    fn api_needs_a_socket() {
        let b = VmmBuilder::new("fake_no_api").unwrap();
        let vmm = fake_vmm(b, "sleep 5");
        assert!(matches!(
            vmm.api("GET", "/api/v1/vmm.ping", None),
            Err(VmmError::NoApiSocket)
        ));
    }

    #[test]
    fn drop_stops_the_vmm_and_removes_its_directory() {
        // `sh -c SCRIPT --api-socket PATH` runs SCRIPT with $1 = PATH: it only creates the
        // socket path and hangs.
        let b = VmmBuilder::new("fake_drop")
            .unwrap()
            .binary("/bin/sh")
            .args(["-c", "touch \"$1\"; exec sleep 60"])
            .with_api_socket();
        let socket = b.file("api.sock");
        let mut vmm = b.spawn().unwrap();
        let dir = vmm.dir().to_owned();
        assert_eq!(vmm.api_socket(), Some(socket.as_path()));
        let pid = vmm.pid();
        vmm.poll_until("socket file", Duration::from_secs(10), |v| {
            v.api_socket().filter(|s| s.exists()).map(|_| ())
        })
        .unwrap();
        drop(vmm);
        // SAFETY: signal 0 only checks that the pid exists.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0);
        assert!(!dir.exists());
    }
}
