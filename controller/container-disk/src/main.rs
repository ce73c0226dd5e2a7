//! `ferrovirt-container-disk`: the process of a `containerDisk` volume's container in a
//! launcher pod. A container disk's image holds a disk file and usually nothing else, so the
//! controller runs this static binary in it (copied into a shared emptyDir by an init
//! container from the launcher image, `install`). While it runs (`serve`), the node agent
//! reads the disk through `/proc/<pid>/root`. It exits 0 on SIGTERM, so the pod ends as
//! soon as the VM does.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser, Debug)]
#[command(
    name = "ferrovirt-container-disk",
    version,
    about = "Keeps a containerDisk volume's container running so the node agent can read its disk"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy this program into DIR (an emptyDir the containerDisk containers mount).
    Install {
        /// Where to put ferrovirt-container-disk.
        dir: PathBuf,
    },
    /// Say which disk this container serves and wait for SIGTERM or SIGINT.
    Serve {
        /// The disk image in this container, or a directory holding exactly one file.
        #[arg(long, default_value = "/disk")]
        disk: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot wait for signals: {0}")]
    Signals(#[from] nix::Error),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Install { dir } => install(&dir),
        Command::Serve { disk } => serve(&disk),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovirt-container-disk: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn install(dir: &Path) -> Result<(), Error> {
    let from = PathBuf::from("/proc/self/exe");
    let to = dir.join("ferrovirt-container-disk");
    std::fs::copy(&from, &to)
        .map(|_| ())
        .map_err(|source| Error::Copy { from, to, source })
}

fn serve(disk: &Path) -> Result<(), Error> {
    // A missing disk is reported by the node agent as a VMI condition; this container only
    // has to stay up, so it says what it sees and waits either way.
    match std::fs::metadata(disk) {
        Ok(m) => eprintln!(
            "ferrovirt-container-disk: serving {} ({} bytes)",
            disk.display(),
            m.len()
        ),
        Err(e) => eprintln!("ferrovirt-container-disk: {}: {e}", disk.display()),
    }
    // As PID 1 of its container, signals without a handler are ignored: block them and
    // wait for one instead.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    let signal = signals.wait()?;
    eprintln!("ferrovirt-container-disk: {signal}, exiting");
    Ok(())
}
