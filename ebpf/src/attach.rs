//! Attaching the programs to interfaces: TC ingress through TCX links (clsact/netlink on
//! kernels without TCX) and XDP (native, else generic), every link pinned under
//! `<pin_dir>/links/` so it outlives the process that attached it.
//!
//! Re-attaching swaps the program inside the pinned link (`BPF_LINK_UPDATE`: the new program
//! is in place before the old one is dropped, no frame sees neither), so it is idempotent and
//! never stacks a second program on the hook.
//!
//! An endpoint can first be a cls_bpf filter on the TAP's clsact ingress instead: a TCX
//! attach costs two RCU grace periods in the kernel (`tcx_entry_sync` and
//! `bpf_mprog_commit`), ~10 ms on a small VM, which a CNI ADD would pay for every VM NIC; a
//! filter costs none. It runs the same program but pays the qdisc hop on every packet (~5 %
//! of 64 B frames/s here), so a long-lived caller later swaps it for a TCX link: TCX runs
//! before clsact, so the link decides from the moment it exists and the filter is removed
//! after it, without a gap. The filter's record is its program, pinned under the link name.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use aya::programs::links::{FdLink, Link, LinkError, PinnedLink};
use aya::programs::tc::{
    self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle,
};
use aya::programs::xdp::XdpMode;
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, Xdp};
use aya_obj::generated::bpf_cmd;

use crate::pin_dir::{Hook, PinDir, PinDirError};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("interface {0:?} does not exist in this network namespace; create it first")]
    InterfaceMissing(String),
    #[error("cannot attach {hook} to {ifname}; are we root (CAP_NET_ADMIN, CAP_BPF)?")]
    Attach {
        hook: Hook,
        ifname: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot re-open the link pinned at {path}")]
    OpenPinned {
        path: String,
        #[source]
        source: LinkError,
    },
    #[error(
        "{hook} on {ifname} is attached through netlink, not a bpf_link; XDP needs Linux >= 5.9"
    )]
    NotALink { hook: Hook, ifname: String },
    #[error("cannot pin the link of {hook} on {ifname}")]
    Pin {
        hook: Hook,
        ifname: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot rename the link pin {from} to {to}")]
    Rename {
        from: String,
        to: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot record the endpoint filter by pinning its program at {path}")]
    Record {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    PinDir(#[from] PinDirError),
}

/// The ifindex of `ifname` in the caller's network namespace.
pub(crate) fn ifindex_of(ifname: &str) -> Result<u32, AttachError> {
    let missing = || AttachError::InterfaceMissing(ifname.to_string());
    let c_name = CString::new(ifname).map_err(|_| missing())?;
    // SAFETY: if_nametoindex reads the NUL-terminated name, which outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if ifindex == 0 {
        Err(missing())
    } else {
        Ok(ifindex)
    }
}

/// A program's place: the hook on one interface, and where its link is pinned.
struct Target<'a> {
    pin_dir: &'a PinDir,
    hook: Hook,
    ifindex: u32,
    ifname: &'a str,
}

impl Target<'_> {
    fn attach_error(&self, source: ProgramError) -> AttachError {
        AttachError::Attach {
            hook: self.hook,
            ifname: self.ifname.to_string(),
            source,
        }
    }

    fn not_a_link(&self) -> AttachError {
        AttachError::NotALink {
            hook: self.hook,
            ifname: self.ifname.to_string(),
        }
    }

    fn pin(&self, link: FdLink) -> Result<(), AttachError> {
        link.pin(self.pin_dir.link(self.hook, self.ifindex, self.ifname))
            .map(drop)
            .map_err(|source| AttachError::Pin {
                hook: self.hook,
                ifname: self.ifname.to_string(),
                source,
            })
    }

    /// Moves link `id` out of `program` (dropping it there would detach it).
    fn take_fd_link<P, I, L>(
        &self,
        program: &mut P,
        id: I,
        take_link: fn(&mut P, I) -> Result<L, ProgramError>,
    ) -> Result<FdLink, AttachError>
    where
        FdLink: TryFrom<L>,
    {
        let link = take_link(program, id).map_err(|e| self.attach_error(e))?;
        FdLink::try_from(link).map_err(|_| self.not_a_link())
    }

    /// Swaps `program` into the link pinned for this target; true when it did. A pinned
    /// link whose interface is gone (its ifindex was reused) is removed instead.
    fn swap_into_pinned_link<P, I, L>(
        &self,
        program: &mut P,
        attach_to_link: fn(&mut P, L) -> Result<I, ProgramError>,
        take_link: fn(&mut P, I) -> Result<L, ProgramError>,
    ) -> Result<bool, AttachError>
    where
        L: TryFrom<FdLink>,
        FdLink: TryFrom<L>,
    {
        let Some(old) = self.pin_dir.link_by_ifindex(self.hook, self.ifindex)? else {
            return Ok(false);
        };
        let pinned = PinnedLink::from_pin(&old.path).map_err(|source| AttachError::OpenPinned {
            path: old.path.display().to_string(),
            source,
        })?;
        let link = L::try_from(FdLink::from(pinned)).map_err(|_| self.not_a_link())?;
        match attach_to_link(program, link) {
            Ok(id) => {
                self.take_fd_link(program, id, take_link)?;
                let path = self.pin_dir.link(self.hook, self.ifindex, self.ifname);
                if old.path != path {
                    rename_pin(&old.path, &path)?;
                }
                Ok(true)
            }
            Err(error) => {
                tracing::info!(%error, path = %old.path.display(), "pinned link is stale; attaching anew");
                PinDir::unpin(&old.path)?;
                Ok(false)
            }
        }
    }
}

/// Attaches a TC program to `ifname`'s ingress, or swaps it into the link pinned earlier.
pub(crate) fn attach_tc_program(
    program: &mut SchedClassifier,
    pin_dir: &PinDir,
    hook: Hook,
    ifindex: u32,
    ifname: &str,
) -> Result<(), AttachError> {
    let target = Target {
        pin_dir,
        hook,
        ifindex,
        ifname,
    };
    if target.swap_into_pinned_link(
        program,
        SchedClassifier::attach_to_link,
        SchedClassifier::take_link,
    )? {
        return Ok(());
    }
    let tcx = program.attach_with_options(
        ifname,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    );
    match tcx {
        Ok(id) => target.pin(target.take_fd_link(program, id, SchedClassifier::take_link)?),
        Err(error) if tcx_unsupported(&error) => {
            tracing::warn!(ifname, "no TCX on this kernel; attaching through clsact");
            attach_tc_netlink(program, ifname).map_err(|e| target.attach_error(e))
        }
        Err(error) => Err(target.attach_error(error)),
    }
}

/// Where fv_from_endpoint's filter sits on an endpoint's clsact ingress: first in line, under
/// a handle of its own, so a re-attach finds it to replace.
const ENDPOINT_FILTER_PRIORITY: u16 = 1;
const ENDPOINT_FILTER_HANDLE: TcHandle = TcHandle::new(0, 0xf0);

/// Attaches fv_from_endpoint to `ifname`'s ingress as a cls_bpf filter, or swaps it into the
/// filter there, and pins the program under the endpoint-filter name as the record of it.
pub(crate) fn attach_endpoint_filter(
    program: &mut SchedClassifier,
    pin_dir: &PinDir,
    ifindex: u32,
    ifname: &str,
) -> Result<(), AttachError> {
    let target = Target {
        pin_dir,
        hook: Hook::EndpointFilter,
        ifindex,
        ifname,
    };
    if let Err(error) = tc::qdisc_add_clsact(ifname) {
        tracing::debug!(ifname, %error, "clsact qdisc not added (usually: it exists)");
    }
    let options = NlOptions {
        priority: ENDPOINT_FILTER_PRIORITY,
        handle: ENDPOINT_FILTER_HANDLE,
        classid: None,
    };
    let id = match program.attach_with_options(
        ifname,
        TcAttachType::Ingress,
        TcAttachOptions::Netlink(options),
    ) {
        Ok(id) => id,
        Err(error) if netlink_errno(&error) == Some(libc::EEXIST) => {
            let ours = SchedClassifierLink::attached(
                ifname,
                TcAttachType::Ingress,
                ENDPOINT_FILTER_PRIORITY,
                ENDPOINT_FILTER_HANDLE,
                None,
            )
            .map_err(|_| AttachError::InterfaceMissing(ifname.to_string()))?;
            program
                .attach_to_link(ours)
                .map_err(|e| target.attach_error(e))?
        }
        Err(error) => return Err(target.attach_error(error)),
    };
    // The filter lives in the qdisc, not in this process: dropping the link would delete it.
    std::mem::forget(program.take_link(id).map_err(|e| target.attach_error(e))?);
    let program_fd = program.fd().map_err(|e| target.attach_error(e))?;
    for old in pin_dir.links(Hook::EndpointFilter)? {
        if old.ifindex == ifindex {
            PinDir::unpin(&old.path)?;
        }
    }
    let path = pin_dir.link(Hook::EndpointFilter, ifindex, ifname);
    pin_object(program_fd.as_fd().as_raw_fd(), &path).map_err(|source| AttachError::Record {
        path: path.display().to_string(),
        source,
    })
}

/// Removes the endpoint filter recorded for `ifindex` (if its interface is still there) and
/// the record.
pub(crate) fn detach_endpoint_filter(pin_dir: &PinDir, ifindex: u32) -> Result<(), AttachError> {
    let Some(record) = pin_dir.link_by_ifindex(Hook::EndpointFilter, ifindex)? else {
        return Ok(());
    };
    if ifindex_of(&record.ifname).ok() == Some(ifindex) {
        let ours = SchedClassifierLink::attached(
            &record.ifname,
            TcAttachType::Ingress,
            ENDPOINT_FILTER_PRIORITY,
            ENDPOINT_FILTER_HANDLE,
            None,
        );
        if let Err(error) = ours
            .map_err(|e| e.to_string())
            .and_then(|link| link.detach().map_err(|e| e.to_string()))
        {
            tracing::debug!(ifname = record.ifname, %error, "no endpoint filter to remove");
        }
    }
    Ok(PinDir::unpin(&record.path)?)
}

/// Attaches the XDP program to `ifname` in driver mode, falling back to generic (SKB) mode
/// where the driver has no XDP, or swaps it into the link pinned earlier.
pub(crate) fn attach_xdp_program(
    program: &mut Xdp,
    pin_dir: &PinDir,
    ifindex: u32,
    ifname: &str,
) -> Result<(), AttachError> {
    let target = Target {
        pin_dir,
        hook: Hook::UplinkXdp,
        ifindex,
        ifname,
    };
    if target.swap_into_pinned_link(program, Xdp::attach_to_link, Xdp::take_link)? {
        return Ok(());
    }
    let id = match program.attach_to_if_index(ifindex, XdpMode::Driver) {
        Ok(id) => id,
        Err(error) => {
            tracing::info!(ifname, %error, "no native XDP; attaching in generic (SKB) mode");
            program
                .attach_to_if_index(ifindex, XdpMode::Skb)
                .map_err(|e| target.attach_error(e))?
        }
    };
    target.pin(target.take_fd_link(program, id, Xdp::take_link)?)
}

/// Detaches what we attached for `hook` on `ifindex` and removes the link's pin. Without a
/// pin, a program attached through netlink (kernels without TCX) is removed by name if the
/// interface still exists.
pub(crate) fn detach_program(
    pin_dir: &PinDir,
    hook: Hook,
    ifindex: u32,
    netlink_name: Option<(&str, &str)>,
) -> Result<(), AttachError> {
    match pin_dir.link_by_ifindex(hook, ifindex)? {
        Some(pin) => {
            detach_pinned_link(&pin.path);
            Ok(PinDir::unpin(&pin.path)?)
        }
        None => {
            if let Some((ifname, program_name)) = netlink_name {
                detach_tc_netlink(ifname, program_name);
            }
            Ok(())
        }
    }
}

/// Detaches the link pinned at `path` now. Removing the pin alone would detach it only
/// once its last reference is gone, and the kernel drops that reference from a workqueue:
/// a caller that checks (or deletes the interface) right after would still see it.
fn detach_pinned_link(path: &Path) {
    let result = open_pinned_object(path).and_then(|link| {
        let attr = LinkDetachAttr {
            link_fd: link.as_raw_fd() as u32,
        };
        bpf_syscall(bpf_cmd::BPF_LINK_DETACH, &attr)
    });
    if let Err(error) = result {
        // ENOLINK: its interface is gone and the kernel detached it already.
        tracing::debug!(path = %path.display(), %error, "link not detached");
    }
}

/// The `link_detach` member of union bpf_attr.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// The BPF_OBJ_GET member of union bpf_attr (pathname, bpf_fd, file_flags).
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The BPF_OBJ_PIN member of union bpf_attr (pathname, bpf_fd, file_flags).
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Pins the BPF object `fd` at `path`.
fn pin_object(fd: RawFd, path: &Path) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = ObjPinAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    bpf_syscall(bpf_cmd::BPF_OBJ_PIN, &attr).map(drop)
}

/// A descriptor of the BPF object pinned at `path` (aya keeps the one of a PinnedLink
/// private).
fn open_pinned_object(path: &Path) -> std::io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf_syscall(bpf_cmd::BPF_OBJ_GET, &attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// bpf(2) with `attr` as a prefix of union bpf_attr; the kernel zero-fills the rest.
fn bpf_syscall<T>(cmd: bpf_cmd, attr: &T) -> std::io::Result<RawFd> {
    // SAFETY: `attr` is a live #[repr(C)] value of the size passed, laid out as the start of
    // union bpf_attr for `cmd`; the commands used here only read it (and the path string
    // it may point to, which the caller keeps alive).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *const T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as RawFd)
    }
}

fn rename_pin(from: &Path, to: &Path) -> Result<(), AttachError> {
    std::fs::rename(from, to).map_err(|source| AttachError::Rename {
        from: from.display().to_string(),
        to: to.display().to_string(),
        source,
    })
}

/// The errno of a failed netlink attach.
fn netlink_errno(error: &ProgramError) -> Option<i32> {
    match error {
        ProgramError::TcError(tc::TcError::NetlinkError(e)) => e.raw_os_error(),
        _ => None,
    }
}

/// TCX is Linux >= 6.6; older kernels refuse its attach type with EINVAL.
fn tcx_unsupported(error: &ProgramError) -> bool {
    match error {
        ProgramError::SyscallError(e) => matches!(
            e.io_error.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP)
        ),
        _ => false,
    }
}

/// The clsact fallback: replaces any filter of this program on the ingress hook. Unlike TCX
/// this leaves a moment without the filter; it only runs on kernels older than 6.6.
fn attach_tc_netlink(program: &mut SchedClassifier, ifname: &str) -> Result<(), ProgramError> {
    if let Err(error) = tc::qdisc_add_clsact(ifname) {
        tracing::debug!(ifname, %error, "clsact qdisc not added (usually: it exists)");
    }
    if let Some(name) = program.info()?.name_as_str() {
        detach_tc_netlink(ifname, name);
    }
    let id = program.attach_with_options(
        ifname,
        TcAttachType::Ingress,
        TcAttachOptions::Netlink(tc::NlOptions::default()),
    )?;
    // The filter lives in the qdisc, not in this process: dropping the link would delete it.
    std::mem::forget(program.take_link(id)?);
    Ok(())
}

fn detach_tc_netlink(ifname: &str, program_name: &str) {
    // The filter carries the kernel's name of the program, cut to BPF_OBJ_NAME_LEN - 1.
    let program_name = &program_name[..program_name.len().min(15)];
    if let Err(error) = tc::qdisc_detach_program(ifname, TcAttachType::Ingress, program_name) {
        tracing::debug!(ifname, program_name, %error, "no netlink filter to detach");
    }
}
