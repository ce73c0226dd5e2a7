//! Our vhost-user-net backend (`ferrovirt-vhost-net`) as a guarded process for end-to-end tests
//! and benchmarks: started on a TAP and a socket, stopped (or crashed) by its guard.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{GuardedProcess, ProcessError};

/// A running `ferrovirt-vhost-net`; dropping it stops it (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct VhostNetBackend {
    process: GuardedProcess,
    socket: PathBuf,
    metrics_socket: PathBuf,
}

impl VhostNetBackend {
    /// Serves on `socket` with `flags` (`--tap NAME`, `--netns NS`, `--queue-pairs 2`, ...),
    /// with metrics on `<socket>.metrics`, and waits until it listens. Output goes to
    /// `<socket>.out` / `<socket>.err`. Uses [`crate::vhost_net_binary`].
    pub fn start(socket: &Path, flags: &[&str]) -> Result<Self, ProcessError> {
        Self::start_binary(&crate::vhost_net_binary(), socket, flags)
    }

    /// Like [`Self::start`] with a given binary (a crate's own tests pass
    /// `env!("CARGO_BIN_EXE_ferrovirt-vhost-net")` and skip the release build).
    pub fn start_binary(
        binary: &Path,
        socket: &Path,
        flags: &[&str],
    ) -> Result<Self, ProcessError> {
        let metrics_socket = socket.with_extension("metrics");
        let mut cmd = Command::new(binary);
        cmd.arg("--socket")
            .arg(socket)
            .arg("--metrics-socket")
            .arg(&metrics_socket)
            .args(flags);
        let mut process = GuardedProcess::spawn(
            cmd,
            &socket.with_extension("out"),
            &socket.with_extension("err"),
        )?;
        process.wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(VhostNetBackend {
            process,
            socket: socket.to_owned(),
            metrics_socket,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// The backend's counters, the JSON object its metrics socket serves.
    pub fn metrics_json(&self) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(&self.metrics_socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut body = String::new();
        stream.read_to_string(&mut body)?;
        Ok(body)
    }

    /// SIGTERM, as an operator stops it; returns how it ended.
    pub fn stop(mut self) -> Result<crate::ProcessExit, ProcessError> {
        self.process.terminate()
    }

    /// SIGKILL, as a crash: no clean disconnect.
    pub fn crash(mut self) -> Result<(), ProcessError> {
        self.process.kill()?;
        Ok(())
    }
}
