//! ferrovirt-cni: the CNI plugin binary. Runtimes drive it through CNI_* variables and stdin;
//! flags exist only for `--help` and `--version`.

use std::io::{Read, Write};
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ferrovirt-cni",
    version,
    about = "CNI 1.1 plugin for VM NICs (vhost-user TAPs and SR-IOV VFs)",
    long_about = "CNI 1.1 plugin for VM NICs (vhost-user TAPs and SR-IOV VFs). A container \
                  runtime or Multus runs it with CNI_COMMAND (ADD, DEL, CHECK, GC, STATUS, \
                  VERSION), CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH in \
                  the environment and the network configuration on stdin; it prints a result \
                  or an error object on stdout. Logs go to stderr; FERROVIRT_CNI_LOG sets \
                  their level (error, warn, info, debug; default warn). The configuration keys \
                  are described in cni-plugin/README.md."
)]
struct Flags {}

fn main() -> ExitCode {
    Flags::parse();
    // A runtime that ignores SIGCHLD passes that on through exec, and then the kernel reaps
    // our children (the IPAM plugin, the TAP deleter) before we can read how they ended.
    // SAFETY: signal(2) with SIG_DFL installs no handler; no other thread runs yet.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    let level = std::env::var("FERROVIRT_CNI_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(false)
        .init();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        tracing::warn!("cannot read stdin: {e}");
    }
    let outcome = ferrovirt_cni_plugin::run(|name| std::env::var(name).ok(), &stdin);
    let mut stdout = std::io::stdout().lock();
    // If stdout is gone the runtime cannot read us anyway; the exit status still tells.
    let _ = stdout
        .write_all(outcome.stdout.as_bytes())
        .and_then(|()| stdout.flush());
    if outcome.exit_code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
