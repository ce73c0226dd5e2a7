//! A network for the test guest's virtio-net scenarios: a private network namespace with a
//! configured TAP in it ([`NetTopology`]), and QEMU's virtio-net-pci on that TAP as the
//! reference device ([`QemuNetGuest`]). Everything is removed by guards on `Drop`.
//!
//! The TAP is created in our namespace, moved into the private one and given its address
//! and MAC *before* the VMM starts, so the guest's first frame already finds a configured
//! link. The VMM then runs inside the namespace (`ip netns exec`) and attaches to the TAP
//! by name. Other VMMs can reuse [`NetTopology`] the same way.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::artifacts::{ArtifactError, try_testguest};
use crate::names::{CleanupGuard, NameError, NetNs, Tap, ip};
use crate::process::{GuardedProcess, ProcessError, ScratchDir, read_lossy, tail};

pub const QEMU: &str = "qemu-system-x86_64";
/// The namespace's end of the link.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const HOST_MAC: &str = "02:00:00:00:00:01";
/// The guest's address (the scenarios' `ip=`) and the MAC its device gets.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
const PREFIX_LEN: u8 = 24;
/// Socket receive buffer for bulk receivers (SO_RCVBUFFORCE; we are root).
const BULK_RCVBUF: libc::c_int = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QemuNetError {
    #[error("cannot set up the namespace or TAP")]
    Names(#[from] NameError),
    #[error("cannot start {QEMU}; install Debian's qemu-system-x86 package")]
    Process(#[from] ProcessError),
    #[error("the test guest is not available")]
    Guest(#[from] ArtifactError),
    #[error("cannot enter network namespace {ns}; are we root?")]
    EnterNs {
        ns: String,
        #[source]
        source: io::Error,
    },
    #[error("socket operation in network namespace {ns} failed")]
    Socket {
        ns: String,
        #[source]
        source: io::Error,
    },
    #[error("the guest did not print {needle:?} within {timeout:?}; serial so far:\n{serial}")]
    NoLine {
        needle: String,
        timeout: Duration,
        serial: String,
    },
    #[error(
        "the VMM exited before the guest printed {needle:?}; serial:\n{serial}\nstderr:\n{stderr}"
    )]
    ExitedEarly {
        needle: String,
        serial: String,
        stderr: String,
    },
}

/// A network namespace holding an up TAP with `HOST_IP/24` and `HOST_MAC`, and `lo` up.
#[derive(Debug)]
pub struct NetTopology {
    /// Deletes the TAP inside the namespace (it is no longer in ours once moved).
    _tap_in_ns: CleanupGuard,
    /// Deletes the TAP if it is still in our namespace (setup failed before the move).
    _tap: Tap,
    ns: NetNs,
}

impl NetTopology {
    /// A single-queue TAP.
    pub fn create() -> Result<NetTopology, QemuNetError> {
        Self::create_with_tap(false)
    }

    /// `multi_queue`: a TAP with the multi_queue flag, for devices with several queue pairs.
    pub fn create_with_tap(multi_queue: bool) -> Result<NetTopology, QemuNetError> {
        let ns = NetNs::create("gnet")?;
        let tap = Tap::create("gtap", multi_queue)?;
        let (ns_name, tap_name) = (ns.name().to_string(), tap.name().to_string());
        ip(&["link", "set", &tap_name, "netns", &ns_name])?;
        let tap_in_ns = CleanupGuard::new(tap_name.clone(), move |tap| {
            let _ = ip(&["-n", &ns_name, "link", "del", tap]);
        });
        let ns_name = ns.name();
        let addr = format!("{HOST_IP}/{PREFIX_LEN}");
        ip(&["-n", ns_name, "link", "set", &tap_name, "address", HOST_MAC])?;
        ip(&["-n", ns_name, "addr", "add", &addr, "dev", &tap_name])?;
        ip(&["-n", ns_name, "link", "set", &tap_name, "up"])?;
        ip(&["-n", ns_name, "link", "set", "lo", "up"])?;
        Ok(NetTopology {
            _tap_in_ns: tap_in_ns,
            _tap: tap,
            ns,
        })
    }

    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// Sets the TAP's MTU (frames to the guest can then exceed 1514 bytes).
    pub fn set_mtu(&self, mtu: u32) -> Result<(), QemuNetError> {
        let mtu = mtu.to_string();
        ip(&["-n", self.ns(), "link", "set", self.tap(), "mtu", &mtu])?;
        Ok(())
    }

    pub fn tap(&self) -> &str {
        self._tap.name()
    }

    /// `program args...` run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(), program]);
        cmd
    }

    /// Runs `program args` in the namespace to completion.
    pub fn run(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// A UDP socket bound to `port` on `HOST_IP` inside the namespace (0: any port), with a
    /// receive buffer large enough for bulk transfers. The socket stays in the namespace
    /// whatever thread uses it.
    pub fn udp_socket(&self, port: u16) -> Result<UdpSocket, QemuNetError> {
        let path = self.ns.path();
        let ns = self.ns().to_string();
        let socket_ns = ns.clone();
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<UdpSocket, QemuNetError> {
                    enter_netns(&path).map_err(|source| QemuNetError::EnterNs { ns, source })?;
                    let socket = UdpSocket::bind(SocketAddrV4::new(HOST_IP, port))
                        .and_then(|s| set_rcvbuf_force(&s, BULK_RCVBUF).map(|()| s))
                        .map_err(|source| QemuNetError::Socket {
                            ns: socket_ns,
                            source,
                        })?;
                    Ok(socket)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Moves the calling thread (only it) into the network namespace at `path`.
fn enter_netns(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    // SAFETY: setns on a valid namespace fd affects only the calling thread, a scoped thread
    // that exits right after creating its socket.
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_rcvbuf_force(socket: &UdpSocket, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid socket fd and a pointer to a c_int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the guest's virtio-net-pci is plugged into.
#[derive(Debug, Clone, Copy)]
pub enum QemuNetdev<'a> {
    /// The topology's TAP; QEMU runs inside its namespace.
    Tap(&'a NetTopology),
    /// A UNIX datagram socket at `local` whose frames go to the socket at `remote`: two
    /// guests wired back to back, with no kernel network in between.
    UnixDgram { local: &'a Path, remote: &'a Path },
}

impl<'a> From<&'a NetTopology> for QemuNetdev<'a> {
    fn from(topology: &'a NetTopology) -> Self {
        QemuNetdev::Tap(topology)
    }
}

/// Device options for QEMU's virtio-net-pci.
#[derive(Debug, Clone, Copy)]
pub struct QemuNetOptions {
    /// The device's MAC (`GUEST_MAC` by default).
    pub mac: &'static str,
    /// `mrg_rxbuf=off` when false: the guest must work with single-buffer frames.
    pub mrg_rxbuf: bool,
    /// More than 1: `mq=on` with this many queue pairs (the TAP must be multi_queue).
    pub queue_pairs: u16,
}

impl Default for QemuNetOptions {
    fn default() -> Self {
        QemuNetOptions {
            mac: GUEST_MAC,
            mrg_rxbuf: true,
            queue_pairs: 1,
        }
    }
}

/// How the guest ended: its debug-exit value (QEMU exits with `(v << 1) | 1`).
#[derive(Debug, Clone)]
pub struct GuestExit {
    /// `Some(v)` for debug-exit(v); `None` for any other end of QEMU.
    pub debug_exit: Option<i32>,
    pub serial: String,
    pub stderr: String,
}

impl GuestExit {
    pub fn passed(&self, scenario: &str) -> bool {
        self.debug_exit == Some(0)
            && self
                .serial
                .lines()
                .any(|l| l.trim_end() == format!("testguest: PASS {scenario}"))
    }
}

/// The test guest under QEMU (q35, KVM) with one virtio-net-pci.
/// Field order is drop order: QEMU stops before the directory with its output goes.
#[derive(Debug)]
pub struct QemuNetGuest {
    qemu: GuardedProcess,
    serial: PathBuf,
    _dir: ScratchDir,
}

impl QemuNetGuest {
    /// Boots the test guest with `cmdline` (`scenario=... ...`).
    pub fn start<'a>(
        netdev: impl Into<QemuNetdev<'a>>,
        cmdline: &str,
        options: QemuNetOptions,
    ) -> Result<QemuNetGuest, QemuNetError> {
        let netdev = netdev.into();
        let guest = try_testguest()?;
        let dir = ScratchDir::new("qemu-net")?;
        let serial = dir.join("serial.txt");
        let mut device = format!(
            "virtio-net-pci,netdev=n0,mac={},disable-legacy=on,romfile=",
            options.mac
        );
        if !options.mrg_rxbuf {
            device.push_str(",mrg_rxbuf=off");
        }
        let (mut cmd, mut backend) = match netdev {
            QemuNetdev::Tap(topology) => (
                topology.command(QEMU),
                format!(
                    "tap,id=n0,ifname={},script=no,downscript=no",
                    topology.tap()
                ),
            ),
            QemuNetdev::UnixDgram { local, remote } => (
                Command::new(QEMU),
                format!(
                    "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    local.display(),
                    remote.display()
                ),
            ),
        };
        if options.queue_pairs > 1 {
            let pairs = options.queue_pairs;
            backend.push_str(&format!(",queues={pairs}"));
            // One MSI-X vector per queue, the control queue and config changes.
            device.push_str(&format!(",mq=on,vectors={}", 2 * u32::from(pairs) + 2));
        }
        cmd.args([
            "-M",
            "q35",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            "64",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-netdev",
            &backend,
            "-device",
            &device,
            "-append",
            cmdline,
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&guest);
        let qemu = GuardedProcess::spawn(cmd, &dir.join("qemu.out"), &dir.join("qemu.err"))?;
        Ok(QemuNetGuest {
            qemu,
            serial,
            _dir: dir,
        })
    }

    /// What the guest printed so far (SeaBIOS output included).
    pub fn serial(&self) -> String {
        read_lossy(&self.serial)
    }

    /// Waits until a serial line contains `needle`; returns that line.
    pub fn wait_for_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, QemuNetError> {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            if let Some(line) = serial.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if self.qemu.try_exit()?.is_some() {
                return Err(QemuNetError::ExitedEarly {
                    needle: needle.to_string(),
                    serial: self.serial(),
                    stderr: tail(&self.qemu.stderr(), 20),
                });
            }
            if Instant::now() > deadline {
                return Err(QemuNetError::NoLine {
                    needle: needle.to_string(),
                    timeout,
                    serial: tail(&serial, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for QEMU to end (killing it after `timeout`) and reports how the guest ended.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<GuestExit, QemuNetError> {
        let exit = match self.qemu.wait_timeout(timeout) {
            Ok(exit) => exit,
            Err(ProcessError::Timeout { .. }) => self.qemu.kill()?,
            Err(e) => return Err(e.into()),
        };
        let debug_exit = exit
            .status
            .code()
            .filter(|c| c & 1 == 1)
            .map(|c| (c - 1) / 2);
        Ok(GuestExit {
            debug_exit,
            serial: self.serial(),
            stderr: self.qemu.stderr(),
        })
    }
}

/// The `net-send` / `net-recv` pattern payload of frame `seq`: `seq` little-endian, then
/// byte `i` = `seq * 7 + i * 13 + (i >> 8)` (mod 256) (runtime/testguest/README.md).
pub fn pattern_payload(seq: u64, len: usize) -> Vec<u8> {
    let mut payload: Vec<u8> = (0..len).map(|i| pattern_byte(seq, i)).collect();
    let n = len.min(8);
    payload[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
    payload
}

fn pattern_byte(seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(7) as usize)
        .wrapping_add(i.wrapping_mul(13))
        .wrapping_add(i >> 8) as u8
}

/// The sequence number of a pattern payload if every byte is right.
pub fn check_pattern_payload(payload: &[u8]) -> Option<u64> {
    let seq = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    (payload == pattern_payload(seq, payload.len()).as_slice()).then_some(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_payload_round_trips_and_catches_one_flipped_bit() {
        let mut p = pattern_payload(41, 958);
        assert_eq!(check_pattern_payload(&p), Some(41));
        p[700] ^= 1;
        assert_eq!(check_pattern_payload(&p), None);
        assert_eq!(check_pattern_payload(&[1, 2, 3]), None);
    }
}
