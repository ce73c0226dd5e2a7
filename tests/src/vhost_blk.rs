//! Our vhost-user-blk backend (`ferrovirt-vhost-blk`) as a guarded process for end-to-end
//! tests: started on an image and a socket, stopped (or crashed) by its guard.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{GuardedProcess, ProcessError};

/// A running `ferrovirt-vhost-blk`; dropping it stops it (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct VhostBlkBackend {
    process: GuardedProcess,
    socket: PathBuf,
}

impl VhostBlkBackend {
    /// Serves `image` on `socket` with extra flags (`--num-queues 2`, `--read-only`, ...)
    /// and waits until it listens. Output goes to `<socket>.out` / `<socket>.err`.
    pub fn start(image: &Path, socket: &Path, flags: &[&str]) -> Result<Self, ProcessError> {
        let mut cmd = Command::new(crate::vhost_blk_binary());
        cmd.arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(flags);
        let mut process = GuardedProcess::spawn(
            cmd,
            &socket.with_extension("out"),
            &socket.with_extension("err"),
        )?;
        process.wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(VhostBlkBackend {
            process,
            socket: socket.to_owned(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// SIGKILL, as a crash: no clean disconnect.
    pub fn crash(mut self) -> Result<(), ProcessError> {
        self.process.kill()?;
        Ok(())
    }
}
