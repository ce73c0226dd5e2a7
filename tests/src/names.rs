//! Unique names for kernel objects (network namespaces, links, TAP devices) and guards that
//! remove those objects on `Drop`, so tests run in parallel and leave nothing behind.
//!
//! Linux limits interface names to 15 bytes (IFNAMSIZ - 1); every name made here fits.

use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::process::next_unique;

/// The longest interface name Linux accepts.
pub const MAX_IFNAME: usize = 15;
/// Names made from one pid and counter value: 36^3 per process before they wrap.
const COUNTER_SPAN: u64 = 36 * 36 * 36;

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("cannot run `ip`: install iproute2")]
    NoIp(#[source] std::io::Error),
    #[error("`ip {args}` failed (are we root, is the tun module loaded?): {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot create {path} on bpffs; are we root?")]
    BpfFs {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount bpffs at {BPF_FS} (`mount -t bpf bpf {BPF_FS}` as root): {0}")]
    MountBpfFs(String),
}

/// A name of at most 15 bytes: up to 5 bytes of `prefix`, then a base-36 code of this
/// process's pid and a per-process counter, then two characters from the clock (so a name
/// left behind by a killed earlier run with the same pid is not reused).
pub fn unique_name(prefix: &str) -> String {
    let id = u64::from(std::process::id()) * COUNTER_SPAN + next_unique() % COUNTER_SPAN;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let mut suffix = base36(id);
    let salt = base36(u64::from(nanos) % (36 * 36));
    suffix.push_str(&format!("{salt:0>2}"));
    let room = MAX_IFNAME.saturating_sub(suffix.len());
    let prefix: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(room.min(5))
        .collect();
    format!("{prefix}{suffix}")
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

type Cleanup = Box<dyn FnOnce(&str) + Send + Sync>;

/// A named object and the function that removes it; the function runs once, on `Drop`.
pub struct CleanupGuard {
    name: String,
    cleanup: Option<Cleanup>,
}

impl CleanupGuard {
    pub fn new(
        name: impl Into<String>,
        cleanup: impl FnOnce(&str) + Send + Sync + 'static,
    ) -> Self {
        CleanupGuard {
            name: name.into(),
            cleanup: Some(Box::new(cleanup)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keeps the object: returns its name and skips the cleanup.
    pub fn disarm(mut self) -> String {
        self.cleanup = None;
        std::mem::take(&mut self.name)
    }
}

impl std::fmt::Debug for CleanupGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CleanupGuard")
            .field("name", &self.name)
            .field("armed", &self.cleanup.is_some())
            .finish()
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            cleanup(&self.name);
        }
    }
}

/// Runs `ip ARGS`, returning its failure as an error.
pub fn ip(args: &[&str]) -> Result<(), NameError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(NameError::NoIp)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NameError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A network namespace (`ip netns add`), deleted on `Drop`.
#[derive(Debug)]
pub struct NetNs {
    guard: CleanupGuard,
}

impl NetNs {
    pub fn create(prefix: &str) -> Result<NetNs, NameError> {
        let name = unique_name(prefix);
        ip(&["netns", "add", &name])?;
        Ok(NetNs {
            guard: CleanupGuard::new(name, |name| {
                let _ = ip(&["netns", "del", name]);
            }),
        })
    }

    pub fn name(&self) -> &str {
        self.guard.name()
    }

    /// The bind-mounted namespace file, for `setns` or `--netns`-style flags.
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(self.name())
    }

    /// `program` to be run inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name(), program]);
        cmd
    }

    /// Runs `program args` inside the namespace to completion, stdin from /dev/null.
    pub fn run(&self, program: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// Runs `f` on a fresh thread that joined this namespace (setns moves only the calling
    /// thread). Sockets and files opened by `f` stay in the namespace whoever uses them later.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
        run_in_netns(&self.path(), f)
    }
}

/// Runs `f` on a fresh thread that joined the network namespace bound at `path`.
pub fn run_in_netns<T: Send>(
    path: &std::path::Path,
    f: impl FnOnce() -> T + Send,
) -> std::io::Result<T> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a namespace fd we hold open; it moves only this thread,
                // which ends when `f` returns.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Where bpffs is mounted; pinned maps and programs live below it.
pub const BPF_FS: &str = "/sys/fs/bpf";

/// A fresh directory on bpffs (`/sys/fs/bpf/<prefix>-<unique>`) for one test's pinned maps
/// and programs, removed with everything pinned in it on `Drop` (unpinning frees what no
/// attachment or open fd holds any more). Mounts bpffs first if nothing is mounted there.
#[derive(Debug)]
pub struct BpfPinDir {
    path: std::path::PathBuf,
}

impl BpfPinDir {
    pub fn create(prefix: &str) -> Result<BpfPinDir, NameError> {
        mount_bpffs()?;
        let path = std::path::Path::new(BPF_FS).join(format!("{prefix}-{}", unique_name("")));
        std::fs::create_dir(&path).map_err(|source| NameError::BpfFs {
            path: path.clone(),
            source,
        })?;
        Ok(BpfPinDir { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for BpfPinDir {
    fn drop(&mut self) {
        // bpffs has no rmdir of a non-empty directory: unlink the pins (and any
        // subdirectories) depth-first, which remove_dir_all does.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Mounts bpffs at [`BPF_FS`] unless it is already there.
pub fn mount_bpffs() -> Result<(), NameError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    // Two tests mounting at once would stack a second bpffs over the first one's pins.
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::ffi::CString::new(BPF_FS).unwrap_or_default();
    // SAFETY: an all-zero statfs is a valid value of this C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(dir.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPF_FS])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NameError::BpfFs {
            path: BPF_FS.into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NameError::MountBpfFs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// A TAP device in the current network namespace (`ip tuntap add`), deleted on `Drop`.
#[derive(Debug)]
pub struct Tap {
    guard: CleanupGuard,
}

impl Tap {
    /// `multi_queue` adds the `multi_queue` flag for multi-queue virtio-net backends.
    pub fn create(prefix: &str, multi_queue: bool) -> Result<Tap, NameError> {
        let name = unique_name(prefix);
        let mut args = vec!["tuntap", "add", "dev", &name, "mode", "tap"];
        if multi_queue {
            args.push("multi_queue");
        }
        ip(&args)?;
        Ok(Tap {
            guard: CleanupGuard::new(name, |name| {
                let _ = ip(&["link", "del", name]);
            }),
        })
    }

    pub fn name(&self) -> &str {
        self.guard.name()
    }
}

/// A link in the current network namespace made with `ip link add`, deleted on `Drop` (a veth
/// takes its peer with it; a link moved to another namespace is left to that namespace).
#[derive(Debug)]
pub struct Link {
    guard: CleanupGuard,
}

impl Link {
    /// A bridge called exactly `name`, for tests that need a name to be taken (bridges are
    /// built into every kernel we run on; `dummy` is not).
    pub fn bridge(name: &str) -> Result<Link, NameError> {
        ip(&["link", "add", name, "type", "bridge"])?;
        Ok(Link::guard(name))
    }

    /// A veth pair with unique names; the guard holds the first end, the peer's name is
    /// returned beside it.
    pub fn veth(prefix: &str) -> Result<(Link, String), NameError> {
        let name = unique_name(prefix);
        let peer = unique_name(prefix);
        ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer])?;
        Ok((Link::guard(&name), peer))
    }

    fn guard(name: &str) -> Link {
        Link {
            guard: CleanupGuard::new(name, |name| {
                let _ = ip(&["link", "del", name]);
            }),
        }
    }

    pub fn name(&self) -> &str {
        self.guard.name()
    }
}

/// Whether a link called `name` exists in the current network namespace.
pub fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn names_fit_in_ifnamsiz_and_do_not_repeat() {
        let mut seen = HashSet::new();
        for prefix in ["", "t", "tap", "verylongprefix", "ns-ä!"] {
            for _ in 0..200 {
                let name = unique_name(prefix);
                assert!(name.len() <= MAX_IFNAME, "{name}");
                assert!(name.bytes().all(|b| b.is_ascii_alphanumeric()), "{name}");
                assert!(seen.insert(name.clone()), "repeated {name}");
            }
        }
        assert!(unique_name("tap").starts_with("tap"));
    }

    #[test]
    fn cleanup_runs_once_on_drop_unless_disarmed() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let guard = CleanupGuard::new("x", move |name| {
            assert_eq!(name, "x");
            c.fetch_add(1, Ordering::SeqCst);
        });
        drop(guard);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let c = count.clone();
        let kept = CleanupGuard::new("y", move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(kept.disarm(), "y");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn netns_exists_while_the_guard_lives() {
        let ns = NetNs::create("t").unwrap_or_else(|e| panic!("{e}"));
        let path = ns.path();
        assert!(path.exists(), "{path:?}");
        drop(ns);
        assert!(!path.exists(), "{path:?} left behind");
    }

    #[test]
    fn bpf_pin_dir_is_on_bpffs_and_removed_on_drop() {
        let dir = BpfPinDir::create("ferrovirt-test").unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().to_owned();
        assert!(path.starts_with(BPF_FS) && path.is_dir(), "{path:?}");
        std::fs::create_dir(path.join("sub")).unwrap();
        drop(dir);
        assert!(!path.exists(), "{path:?} left behind");
    }

    #[test]
    fn veth_and_bridge_exist_while_their_guards_live() {
        let (veth, peer) = Link::veth("ve").unwrap_or_else(|e| panic!("{e}"));
        assert!(link_exists(veth.name()) && link_exists(&peer));
        let name = veth.name().to_owned();
        drop(veth);
        assert!(
            !link_exists(&name) && !link_exists(&peer),
            "{name} left behind"
        );
        let taken = unique_name("dm");
        let bridge = Link::bridge(&taken).unwrap_or_else(|e| panic!("{e}"));
        assert!(Link::bridge(&taken).is_err());
        drop(bridge);
        assert!(!link_exists(&taken));
    }

    #[test]
    fn tap_exists_while_the_guard_lives() {
        let tap = Tap::create("tap", false).unwrap_or_else(|e| panic!("{e}"));
        let sys = std::path::Path::new("/sys/class/net").join(tap.name());
        assert!(sys.exists());
        drop(tap);
        assert!(!sys.exists(), "{sys:?} left behind");
    }
}
