//! The TAP device: its queues opened by name (optionally inside another network namespace) or
//! inherited as descriptors, with virtio-net headers and the offloads the guest accepts.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::config::TapSource;
use crate::frame::VNET_HDR_LEN;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error(
        "TAP device {name:?} does not exist{netns}; create it with `ip tuntap add dev {name} mode tap`"
    )]
    Missing { name: String, netns: String },
    #[error(
        "{0:?} is not a TAP device, or its multi_queue flag does not match --queue-pairs \
         (a TAP for more than one pair needs `ip tuntap add ... multi_queue`)"
    )]
    NotTap(String),
    #[error("TAP device {0:?} is busy: another process has it open; stop it or use another TAP")]
    Busy(String),
    #[error("cannot open /dev/net/tun; is the tun module loaded and are we root?")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot attach to TAP device {0:?}")]
    Attach(String, #[source] std::io::Error),
    #[error("network namespace {0:?} does not exist; pass a name under /run/netns or a path")]
    NetNsMissing(String),
    #[error("cannot enter network namespace {0:?} (are we root?)")]
    EnterNetNs(String, #[source] std::io::Error),
    #[error("cannot return to our own network namespace")]
    ReturnNetNs(#[source] std::io::Error),
    #[error("cannot start the thread that opens the TAP in another namespace")]
    Thread(#[source] std::io::Error),
    #[error("--tap-fd {0} is not an open TAP descriptor")]
    FdNotTap(i32, #[source] std::io::Error),
    #[error("--tap-fd {0} is a TUN, not a TAP (IFF_TAP) device")]
    FdIsTun(i32),
    #[error(
        "--tap-fd {0} was opened without IFF_VNET_HDR; open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"
    )]
    FdWithoutVnetHdr(i32),
    #[error(
        "--tap-fd {0} was opened without IFF_NO_PI; open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"
    )]
    FdWithPi(i32),
    #[error("--tap-fd {0} is not a valid descriptor of this process")]
    FdInvalid(i32),
    #[error("cannot set the virtio-net header size of the TAP")]
    VnetHdrSize(#[source] std::io::Error),
    #[error("cannot set the TAP offloads to {0:#x}")]
    Offload(u32, #[source] std::io::Error),
}

/// An opened TAP: one descriptor per queue pair.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub queues: Vec<File>,
}

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_int) -> Self {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req
    }

    fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Tap {
    /// Opens `pairs` queues as `source` says, each with 12-byte virtio-net headers and no
    /// offloads (see [`Tap::set_offload`]).
    pub fn open(source: &TapSource, pairs: u16) -> Result<Self, TapError> {
        let tap = match source {
            TapSource::Named { name, netns: None } => open_named(name, pairs)?,
            TapSource::Named {
                name,
                netns: Some(netns),
            } => open_named_in_netns(name, netns, pairs)?,
            TapSource::Fds(fds) => adopt_fds(fds)?,
        };
        for q in &tap.queues {
            let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid.
            let r = unsafe { libc::ioctl(q.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
            if r < 0 {
                return Err(TapError::VnetHdrSize(std::io::Error::last_os_error()));
            }
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// TUNSETOFFLOAD: the `TUN_F_*` offloads the guest can take (frames the kernel may hand
    /// us with partial checksums or as GSO super-frames).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        for q in &self.queues {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            let r =
                unsafe { libc::ioctl(q.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
            if r < 0 {
                return Err(TapError::Offload(flags, std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

fn tap_flags(pairs: u16) -> libc::c_int {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if pairs > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    flags
}

/// Opens the queues of an existing TAP in the calling thread's network namespace.
fn open_named(name: &str, pairs: u16) -> Result<Tap, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(TapError::BadName(name.to_owned()));
    }
    // TUNSETIFF would create a missing TAP; the operator named an existing one.
    let cname = CString::new(name).map_err(|_| TapError::BadName(name.to_owned()))?;
    // SAFETY: `cname` is a NUL-terminated string that outlives the call.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(TapError::Missing {
            name: name.to_owned(),
            netns: String::new(),
        });
    }
    // A backend restarted right after a crash finds the TAP still attached for a moment: the
    // kernel releases the dead instance's io_uring (and the files registered with it)
    // asynchronously. Retry EBUSY briefly before calling the TAP busy.
    let deadline = std::time::Instant::now() + BUSY_GRACE;
    loop {
        match attach_queues(name, pairs) {
            Err(TapError::Busy(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// How long a busy TAP may take to become free.
const BUSY_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

fn attach_queues(name: &str, pairs: u16) -> Result<Tap, TapError> {
    let queues = (0..pairs)
        .map(|_| {
            // Blocking descriptor: io_uring polls it, and a plain read would wait.
            let tun = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut req = IfReq::new(name, tap_flags(pairs));
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is laid out as.
            let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                return Err(match e.raw_os_error() {
                    Some(libc::EINVAL) => TapError::NotTap(name.to_owned()),
                    Some(libc::EBUSY) => TapError::Busy(name.to_owned()),
                    _ => TapError::Attach(name.to_owned(), e),
                });
            }
            Ok(tun)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tap {
        name: name.to_owned(),
        queues,
    })
}

/// Opens the TAP from a short-lived thread that enters `netns`: the descriptors stay bound to
/// that namespace, while our threads never leave ours.
fn open_named_in_netns(name: &str, netns: &str, pairs: u16) -> Result<Tap, TapError> {
    let path = if netns.contains('/') {
        PathBuf::from(netns)
    } else {
        PathBuf::from("/run/netns").join(netns)
    };
    let ns = File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TapError::NetNsMissing(netns.to_owned()),
        _ => TapError::EnterNetNs(netns.to_owned(), e),
    })?;
    let ours = File::open("/proc/thread-self/ns/net").map_err(TapError::ReturnNetNs)?;
    let name = name.to_owned();
    let netns = netns.to_owned();
    let thread = std::thread::Builder::new()
        .name("tap-netns".into())
        .spawn(move || -> Result<Tap, TapError> {
            // SAFETY: setns on descriptors we own; it only changes this thread's namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(TapError::EnterNetNs(netns, std::io::Error::last_os_error()));
            }
            let opened = open_named(&name, pairs).map_err(|e| match e {
                TapError::Missing { name, .. } => TapError::Missing {
                    name,
                    netns: format!(" in network namespace {netns:?}"),
                },
                other => other,
            });
            // SAFETY: as above; returning keeps this thread's exit clean.
            if unsafe { libc::setns(ours.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(TapError::ReturnNetNs(std::io::Error::last_os_error()));
            }
            opened
        })
        .map_err(TapError::Thread)?;
    thread
        .join()
        .unwrap_or_else(|_| Err(TapError::Thread(std::io::Error::other("thread panicked"))))
}

/// Takes ownership of inherited TAP queues after checking each is a TAP with the flags we need.
fn adopt_fds(fds: &[i32]) -> Result<Tap, TapError> {
    let mut queues = Vec::new();
    let mut name = String::new();
    for &fd in fds {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::FdInvalid(fd));
        }
        let mut req = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::FdNotTap(fd, std::io::Error::last_os_error()));
        }
        let flags = libc::c_int::from(req.flags);
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::FdIsTun(fd));
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(TapError::FdWithoutVnetHdr(fd));
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::FdWithPi(fd));
        }
        // io_uring polls the queue; a non-blocking flag left by the parent is not needed.
        // SAFETY: F_GETFL/F_SETFL on a descriptor checked above.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        name = req.name();
        // SAFETY: the descriptor was inherited for us to own (the flag's contract), and is
        // checked to be open.
        queues.push(unsafe { File::from_raw_fd(fd) });
    }
    Ok(Tap { name, queues })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tap_is_not_created() {
        let err = open_named("fvnomissing0", 1).unwrap_err();
        assert!(matches!(err, TapError::Missing { .. }), "{err}");
        let c = CString::new("fvnomissing0").unwrap();
        // SAFETY: NUL-terminated string.
        assert_eq!(unsafe { libc::if_nametoindex(c.as_ptr()) }, 0);
    }

    #[test]
    fn loopback_is_not_a_tap() {
        let err = open_named("lo", 1).unwrap_err();
        assert!(matches!(err, TapError::NotTap(_)), "{err}");
    }

    #[test]
    fn a_missing_netns_is_a_clear_error() {
        let err = open_named_in_netns("t", "fv-no-such-netns", 1).unwrap_err();
        assert!(matches!(err, TapError::NetNsMissing(_)), "{err}");
    }

    #[test]
    fn a_non_tap_descriptor_is_refused() {
        let f = File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        let err = adopt_fds(&[fd]).unwrap_err();
        assert!(matches!(err, TapError::FdNotTap(..)), "{err}");
    }
}
