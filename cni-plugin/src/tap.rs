//! Persistent TAP devices for vhost-user-net backends, made the way `ferrovirt-vhost-net`
//! opens them: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` for more than one
//! queue pair (the flag must match, or the backend's TUNSETIFF fails with EINVAL).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun; is the tun module loaded and are we root?")]
    OpenTun(#[source] std::io::Error),
    #[error("TAP name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot create TAP {0:?}")]
    Create(String, #[source] std::io::Error),
    #[error("cannot give TAP {0:?} to uid/gid {1}")]
    Owner(String, u32, #[source] std::io::Error),
    #[error("cannot make TAP {0:?} persistent")]
    Persist(String, #[source] std::io::Error),
}

/// How to make the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapSpec {
    pub queues: u16,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

pub fn tap_flags(queues: u16) -> libc::c_int {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if queues > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    flags
}

/// Creates the persistent TAP `name`. The caller has checked that no link has that name:
/// TUNSETIFF on an existing TAP would attach to it instead of failing.
pub fn create_tap(name: &str, spec: TapSpec) -> Result<(), TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(TapError::BadName(name.to_owned()));
    }
    // std opens with O_CLOEXEC; this descriptor only lives until the TAP is persistent.
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    // SAFETY: `ifreq` is plain old data (a name and a union of integers); all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = tap_flags(spec.queues) as libc::c_short;
    let fd = tun.as_raw_fd();
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
    if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) } < 0 {
        return Err(TapError::Create(
            name.to_owned(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY (both): TUNSETOWNER/TUNSETGROUP take their argument by value.
    if let Some(uid) = spec.owner
        && unsafe { libc::ioctl(fd, libc::TUNSETOWNER, uid as libc::c_ulong) } < 0
    {
        return Err(TapError::Owner(
            name.to_owned(),
            uid,
            std::io::Error::last_os_error(),
        ));
    }
    if let Some(gid) = spec.group
        && unsafe { libc::ioctl(fd, libc::TUNSETGROUP, gid as libc::c_ulong) } < 0
    {
        return Err(TapError::Owner(
            name.to_owned(),
            gid,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: TUNSETPERSIST takes its argument by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(TapError::Persist(
            name.to_owned(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The TUN flags of link `name` (its sysfs `tun_flags`), or `None` if it is no TUN/TAP.
pub fn tun_flags(name: &str) -> Option<libc::c_int> {
    let text =
        std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("tun_flags")).ok()?;
    libc::c_int::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// The owner uid of TAP `name` (-1 in sysfs means none).
pub fn tun_owner(name: &str) -> Option<i64> {
    let text =
        std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("owner")).ok()?;
    text.trim().parse().ok()
}
