//! Whether an endpoint is a veth whose peer sits in another network namespace (a pod's or a
//! launcher's `eth0`). Frames for such an endpoint go straight to the peer's ingress with
//! `bpf_redirect_peer`, skipping the host end's transmit and the backlog queue, as Cilium
//! does for pods; a TAP (a VM NIC served by ferrovirt-vhost-net) gets a plain redirect.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// ETHTOOL_GDRVINFO from include/uapi/linux/ethtool.h.
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// struct ethtool_drvinfo, which the kernel fills whole.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// The name of the driver behind `ifname` ("veth", "tun", ...).
fn driver(ifname: &str) -> io::Result<String> {
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    // SAFETY: zeroed ifreq is a valid value (a name and a union of integers and pointers).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: socket(2) takes no pointers; the descriptor it returns is ours alone.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL reads `ifr` (a NUL-terminated name and the data pointer) and
    // writes at most size_of::<EthtoolDrvinfo>() bytes through that pointer, into `info`,
    // which outlives the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// A number from `/sys/class/net/<ifname>/<attribute>`.
fn sysfs_number(ifname: &str, attribute: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/{attribute}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// True if `ifname` is a veth whose peer is in another network namespace. A veth's `iflink`
/// is its peer's ifindex; when an interface of this namespace has that ifindex and points
/// back, the peer is here (bpf_redirect_peer would drop). A coincidence (another namespace's
/// peer whose ifindex matches a veth here that points back) only costs the fast path.
pub(crate) fn peer_in_other_netns(ifname: &str) -> bool {
    let (Some(ifindex), Some(iflink)) = (
        sysfs_number(ifname, "ifindex"),
        sysfs_number(ifname, "iflink"),
    ) else {
        return false;
    };
    if iflink == ifindex || driver(ifname).ok().as_deref() != Some("veth") {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return false;
    };
    !entries.flatten().any(|entry| {
        let name = entry.file_name().to_string_lossy().into_owned();
        sysfs_number(&name, "ifindex") == Some(iflink)
            && sysfs_number(&name, "iflink") == Some(ifindex)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_no_veth() {
        assert!(!peer_in_other_netns("lo"));
        assert!(!peer_in_other_netns("no-such-interface"));
    }
}
