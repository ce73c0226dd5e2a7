//! A real vhost-user-net peer for tests and benchmarks: DPDK's `dpdk-testpmd` with a vhost
//! PMD port (the backend, listening on a UNIX socket) forwarding to and from a TAP port it
//! creates inside a network namespace, stopped by its guard. [`PacketSocket`] sees and sends
//! the frames on that TAP from the namespace's side.
//!
//! ```text
//! guest rings <-> VMM (vhost-user frontend) <-> testpmd net_vhost0 <-io-> net_tap0 <-> TAP
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use crate::packet_socket::PacketSocket;

use crate::names::{NetNs, ip, unique_name};
use crate::process::{GuardedProcess, ProcessError, tail};

/// Debian's `dpdk` package installs it (scripts/setup.sh).
pub const TESTPMD: &str = "dpdk-testpmd";
/// How long DPDK gets to create its socket and bring the TAP up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Where DPDK keeps a runtime directory per `--file-prefix`; removed on drop.
const DPDK_RUN_DIR: &str = "/var/run/dpdk";

#[derive(Debug, thiserror::Error)]
pub enum TestpmdError {
    #[error("cannot run {TESTPMD} under `ip netns exec`; install Debian's dpdk package")]
    Process(#[from] ProcessError),
    #[error("{TESTPMD} did not {what} within {timeout:?}; its output ends with:\n{output}")]
    NotReady {
        what: &'static str,
        timeout: Duration,
        output: String,
    },
    #[error("cannot open a packet socket on {tap} in netns {netns}")]
    PacketSocket {
        tap: String,
        netns: String,
        #[source]
        source: io::Error,
    },
}

/// A running `dpdk-testpmd` in `io` forwarding mode between a vhost-user-net server socket
/// and a TAP in a network namespace. Dropping it stops testpmd (SIGTERM, then SIGKILL) and
/// removes its DPDK runtime directory; the TAP goes with the process.
#[derive(Debug)]
pub struct Testpmd {
    process: GuardedProcess,
    socket: PathBuf,
    tap: String,
    netns: String,
    file_prefix: String,
}

impl Testpmd {
    /// Starts testpmd in `netns` with `queue_pairs` queue pairs on both ports, serving
    /// vhost-user on `socket` (a stale file there is removed first), and waits until the
    /// socket listens and the TAP is up. Its output goes to `<socket>.out` / `.err`.
    pub fn start(netns: &NetNs, socket: &Path, queue_pairs: u16) -> Result<Testpmd, TestpmdError> {
        Testpmd::start_with(netns, socket, queue_pairs, &[])
    }

    /// Like [`Testpmd::start`], with more testpmd application flags after the defaults
    /// (a later `--forward-mode=macswap` or `--txd=1024` overrides them), for benchmarks.
    pub fn start_with(
        netns: &NetNs,
        socket: &Path,
        queue_pairs: u16,
        extra: &[&str],
    ) -> Result<Testpmd, TestpmdError> {
        let _ = std::fs::remove_file(socket);
        quiet_netns(netns);
        let tap = unique_name("pmd");
        let file_prefix = format!("ferrovirt-{tap}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns.name(), TESTPMD])
            // Main lcore 0, one forwarding lcore 1 (it busy-polls: keep tests short).
            .args(["-l", "0,1", "--no-huge", "-m", "1024", "--no-pci"])
            .arg(format!("--file-prefix={file_prefix}"))
            .arg("--vdev")
            .arg(format!(
                "net_vhost0,iface={},queues={queue_pairs}",
                socket.display()
            ))
            .arg("--vdev")
            .arg(format!("net_tap0,iface={tap}"))
            .arg("--")
            .args([
                "--forward-mode=io",
                "--auto-start",
                "--total-num-mbufs=16384",
            ])
            .arg(format!("--rxq={queue_pairs}"))
            .arg(format!("--txq={queue_pairs}"))
            // Without a terminal testpmd exits at "Press enter to exit" (stdin is
            // /dev/null); a stats period keeps it in its loop until SIGTERM.
            .arg("--stats-period=86400")
            .args(extra);
        let process = GuardedProcess::spawn(
            cmd,
            &socket.with_extension("out"),
            &socket.with_extension("err"),
        )?;
        let mut testpmd = Testpmd {
            process,
            socket: socket.to_owned(),
            tap,
            netns: netns.name().to_owned(),
            file_prefix,
        };
        testpmd.wait_until("listen on its vhost-user socket", |t| {
            socket_listening_in(t.process.pid(), &t.socket)
        })?;
        testpmd.wait_until("bring its TAP up", |t| t.tap_is_up())?;
        Ok(testpmd)
    }

    fn wait_until(
        &mut self,
        what: &'static str,
        mut ready: impl FnMut(&Testpmd) -> bool,
    ) -> Result<(), TestpmdError> {
        let deadline = Instant::now() + START_TIMEOUT;
        while !ready(self) {
            if self.process.try_exit()?.is_some() || Instant::now() > deadline {
                return Err(TestpmdError::NotReady {
                    what,
                    timeout: START_TIMEOUT,
                    output: self.output_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn tap_is_up(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.netns, "-o", "link", "show", "dev", &self.tap])
            .output();
        out.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(",UP"))
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The TAP's name inside the namespace.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// The last lines of testpmd's stdout and stderr, for assertion messages.
    pub fn output_tail(&self) -> String {
        format!(
            "{}\n{}",
            tail(&self.process.stdout(), 20),
            tail(&self.process.stderr(), 20)
        )
    }

    /// A packet socket on the TAP, from inside the namespace.
    pub fn packet_socket(&self) -> Result<PacketSocket, TestpmdError> {
        PacketSocket::open(&self.netns, &self.tap).map_err(|source| TestpmdError::PacketSocket {
            tap: self.tap.clone(),
            netns: self.netns.clone(),
            source,
        })
    }

    /// Kills testpmd with SIGKILL, as a crash would: the socket file stays behind.
    pub fn crash(mut self) -> Result<(), TestpmdError> {
        self.process.kill()?;
        Ok(())
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.process.terminate();
        let _ = std::fs::remove_dir_all(Path::new(DPDK_RUN_DIR).join(&self.file_prefix));
    }
}

/// Whether process `pid` sees a listening UNIX socket bound to `path`: its own network
/// namespace's /proc/PID/net/unix (a namespace's sockets are not in ours), where listen(2)
/// sets __SO_ACCEPTCON (flags 00010000).
fn socket_listening_in(pid: i32, path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return false;
    };
    let path = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8 && fields[3] == "00010000" && fields[7] == path
    })
}

/// Disables IPv6 in a namespace (for links there now and made later), so the kernel's own
/// router and neighbour solicitations do not add frames a test has to sift through.
pub fn quiet_netns(netns: &NetNs) {
    for key in ["all", "default"] {
        let setting = format!("net.ipv6.conf.{key}.disable_ipv6=1");
        let _ = ip(&["netns", "exec", netns.name(), "sysctl", "-qw", &setting]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ScratchDir;

    #[test]
    fn testpmd_serves_its_socket_and_leaves_nothing_behind() {
        let netns = NetNs::create("pmdt").unwrap();
        let dir = ScratchDir::new("testpmd").unwrap();
        let socket = dir.join("vhost.sock");
        // A stale file from an earlier run does not stop it.
        std::fs::write(&socket, b"stale").unwrap();
        let pmd = Testpmd::start(&netns, &socket, 1).unwrap_or_else(|e| panic!("{e}"));
        assert!(socket_listening_in(pmd.pid(), &socket));
        let tap = pmd.tap().to_owned();
        assert!(
            !Path::new("/sys/class/net").join(&tap).exists(),
            "the TAP is in the test namespace, not ours"
        );
        let packets = pmd.packet_socket().unwrap();
        drop(packets);
        let (pid, run_dir) = (pmd.pid(), Path::new(DPDK_RUN_DIR).join(&pmd.file_prefix));
        drop(pmd);
        // SAFETY: signal 0 only checks whether the pid exists.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "testpmd still runs");
        assert!(!run_dir.exists(), "{run_dir:?} left behind");
    }
}
