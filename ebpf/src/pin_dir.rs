//! The pin directory on bpffs: where the maps, programs and links live so that a short-lived
//! CNI process and the long-lived agent share them, and the lock that orders their changes.
//!
//! ```text
//! <pin_dir>/fv_ports ...               maps (LIBBPF_PIN_BY_NAME in datapath.c)
//! <pin_dir>/progs/<program>            the loaded programs
//! <pin_dir>/links/<hook>:<ifindex>:<ifname>   TCX/XDP links we attached (for an
//!                                             endpoint-filter: its program)
//! ```
//!
//! bpffs refuses names with a dot ("reserved for future extensions"), which interface
//! names may have (eth0.100); they can never have a colon, so the link names use colons
//! for both the separators and the dots of the interface name.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// statfs(2) f_type of bpffs (BPF_FS_MAGIC in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error(
        "{0} is not on a BPF file system; mount one with `mount -t bpf bpf /sys/fs/bpf` (as root)"
    )]
    NotBpffs(PathBuf),
    #[error("cannot create {path}; are we root and is /sys/fs/bpf a mounted bpffs?")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot list {path}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}; is it still in use?")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path} against other ferrovirt processes")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A program on an interface's hook; the first part of its link's pin name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// fv_from_endpoint on a VM TAP's TC ingress, through a TCX link.
    Endpoint,
    /// fv_from_endpoint on a VM TAP's TC ingress, as a cls_bpf filter; its record is the
    /// program pinned under this hook's name.
    EndpointFilter,
    /// fv_from_uplink on an uplink's TC ingress.
    UplinkTc,
    /// fv_xdp_from_uplink on an uplink's XDP hook.
    UplinkXdp,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hook::Endpoint => "fv_from_endpoint (TC ingress)",
            Hook::EndpointFilter => "fv_from_endpoint (clsact ingress filter)",
            Hook::UplinkTc => "fv_from_uplink (TC ingress)",
            Hook::UplinkXdp => "fv_xdp_from_uplink (XDP)",
        })
    }
}

impl Hook {
    fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Endpoint => "endpoint",
            Hook::EndpointFilter => "endpoint-filter",
            Hook::UplinkTc => "uplink-tc",
            Hook::UplinkXdp => "uplink-xdp",
        }
    }
}

/// A pinned link found in `links/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkPin {
    pub path: PathBuf,
    pub ifindex: u32,
    pub ifname: String,
}

#[derive(Debug, Clone)]
pub(crate) struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: &Path) -> Self {
        PinDir {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.programs_dir().join(name)
    }

    fn programs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Creates the directory tree. Its nearest existing ancestor must be on bpffs, which is
    /// checked first so the error names the missing mount rather than a permission.
    pub fn create(&self) -> Result<(), PinDirError> {
        let existing = self
            .root
            .ancestors()
            .find(|dir| dir.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(existing) {
            return Err(PinDirError::NotBpffs(existing.to_path_buf()));
        }
        for dir in [self.root.clone(), self.programs_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| PinDirError::Create { path: dir, source })?;
        }
        if !is_bpffs(&self.root) {
            return Err(PinDirError::NotBpffs(self.root.clone()));
        }
        Ok(())
    }

    /// Takes the exclusive lock of the pin directory; it is released when the guard drops.
    /// bpffs holds no regular files, so the lock is a flock(2) of the directory itself.
    pub fn lock(&self) -> Result<PinDirLock, PinDirError> {
        let lock_error = |source| PinDirError::Lock {
            path: self.root.clone(),
            source,
        };
        let dir = File::open(&self.root).map_err(lock_error)?;
        loop {
            // SAFETY: flock on a descriptor we own; it touches no memory.
            let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(PinDirLock { _dir: dir });
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(lock_error(error));
            }
        }
    }

    pub fn link(&self, hook: Hook, ifindex: u32, ifname: &str) -> PathBuf {
        let ifname = ifname.replace('.', ":");
        self.links_dir()
            .join(format!("{}:{ifindex}:{ifname}", hook.pin_prefix()))
    }

    /// Every link pinned for `hook`.
    pub fn links(&self, hook: Hook) -> Result<Vec<LinkPin>, PinDirError> {
        let dir = self.links_dir();
        let list_error = |source| PinDirError::List {
            path: dir.clone(),
            source,
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(list_error(error)),
        };
        let mut pins = Vec::new();
        for entry in entries {
            let entry = entry.map_err(list_error)?;
            let name = entry.file_name();
            if let Some(pin) = parse_link_name(hook, &name.to_string_lossy()) {
                pins.push(LinkPin {
                    path: entry.path(),
                    ..pin
                });
            }
        }
        Ok(pins)
    }

    pub fn link_by_ifindex(
        &self,
        hook: Hook,
        ifindex: u32,
    ) -> Result<Option<LinkPin>, PinDirError> {
        Ok(self.links(hook)?.into_iter().find(|p| p.ifindex == ifindex))
    }

    /// Removes a pin; one that is already gone is fine.
    pub fn unpin(path: &Path) -> Result<(), PinDirError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PinDirError::Remove {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Removes the whole tree: every map, program and link pin.
    pub fn remove_all(&self) -> Result<(), PinDirError> {
        match std::fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PinDirError::Remove {
                path: self.root.clone(),
                source,
            }),
        }
    }
}

/// Holds the pin directory's flock until dropped.
pub(crate) struct PinDirLock {
    _dir: File,
}

fn parse_link_name(hook: Hook, name: &str) -> Option<LinkPin> {
    let rest = name.strip_prefix(hook.pin_prefix())?.strip_prefix(':')?;
    let (ifindex, ifname) = rest.split_once(':')?;
    Some(LinkPin {
        path: PathBuf::new(),
        ifindex: ifindex.parse().ok()?,
        ifname: ifname.replace(':', "."),
    })
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs only writes into `stat`, a local of the type it expects, and reads the
    // NUL-terminated path that outlives the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip_ifindex_and_dotted_ifname() {
        let dir = PinDir::new(Path::new("/sys/fs/bpf/x"));
        let path = dir.link(Hook::UplinkTc, 42, "eth0.100");
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(name, "uplink-tc:42:eth0:100");
        let pin = parse_link_name(Hook::UplinkTc, &name).unwrap();
        assert_eq!((pin.ifindex, pin.ifname.as_str()), (42, "eth0.100"));
        assert!(parse_link_name(Hook::UplinkXdp, &name).is_none());
        assert!(parse_link_name(Hook::Endpoint, "endpoint:x:tap0").is_none());
        let filter = "endpoint-filter:7:tap0";
        assert!(parse_link_name(Hook::Endpoint, filter).is_none());
        assert_eq!(
            parse_link_name(Hook::EndpointFilter, filter).map(|p| p.ifindex),
            Some(7)
        );
    }

    #[test]
    fn tmp_is_not_bpffs() {
        let dir = PinDir::new(Path::new("/tmp/ferrovirt-not-bpffs/pins"));
        assert!(matches!(dir.create(), Err(PinDirError::NotBpffs(_))));
    }
}
