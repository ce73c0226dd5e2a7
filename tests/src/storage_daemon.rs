//! A real vhost-user-blk peer for tests: QEMU's `qemu-storage-daemon` serving a raw image
//! file on a UNIX socket, stopped by its guard.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{GuardedProcess, ProcessError};

/// Where Debian's qemu-system-x86 package installs it (scripts/setup.sh).
pub const STORAGE_DAEMON: &str = "qemu-storage-daemon";

#[derive(Debug, thiserror::Error)]
pub enum StorageDaemonError {
    #[error("cannot run {STORAGE_DAEMON}; install Debian's qemu-system-x86 package")]
    Process(#[from] ProcessError),
    #[error("{STORAGE_DAEMON} started but does not serve its socket")]
    NotListening(#[source] ProcessError),
}

/// A running `qemu-storage-daemon` exporting `image` as vhost-user-blk on `socket`.
/// Dropping it stops the daemon (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct StorageDaemon {
    process: GuardedProcess,
    socket: PathBuf,
    image: PathBuf,
}

impl StorageDaemon {
    /// Starts the daemon with `num_queues` request queues and waits until it listens.
    /// Its output goes next to the socket (`<socket>.out`, `<socket>.err`).
    pub fn start(
        image: &Path,
        socket: &Path,
        num_queues: u16,
    ) -> Result<StorageDaemon, StorageDaemonError> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(STORAGE_DAEMON);
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=disk",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,\
                 addr.path={},writable=on,num-queues={num_queues}",
                socket.display()
            ));
        let out = socket.with_extension("out");
        let err = socket.with_extension("err");
        let mut process = GuardedProcess::spawn(cmd, &out, &err)?;
        process
            .wait_for_socket(socket, Duration::from_secs(10))
            .map_err(StorageDaemonError::NotListening)?;
        Ok(StorageDaemon {
            process,
            socket: socket.to_owned(),
            image: image.to_owned(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Kills the daemon with SIGKILL, as a crash would: no clean disconnect, the socket
    /// file stays behind.
    pub fn crash(mut self) -> Result<(), StorageDaemonError> {
        self.process.kill()?;
        Ok(())
    }
}
