//! Starting what a [`Plan`](super::plan::Plan) asks for: image files, backend processes, the
//! VMM's command line; and stopping them.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::plan::{CopySource, DiskBackend, Image, NetBackend};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot find {0}: put it next to this program, in --bin-dir or on PATH (cargo build --release builds it)"
    )]
    NoBinary(&'static str),
    #[error("disk image {0} does not exist; create it or use hostDisk type DiskOrCreate")]
    MissingImage(PathBuf),
    #[error("disk image {0} is not readable: {1}")]
    Unreadable(PathBuf, #[source] std::io::Error),
    #[error("cannot create disk image {0}: {1}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    CloudInit(#[from] crate::node::cloudinit::Error),
    #[error("cannot start {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{name} exited with {status} before listening on {socket}; its stderr says why")]
    Exited {
        name: String,
        status: std::process::ExitStatus,
        socket: PathBuf,
    },
    #[error("{name} did not listen on {socket} within {timeout:?}")]
    NotListening {
        name: String,
        socket: PathBuf,
        timeout: Duration,
    },
}

/// The backends a node runs for its VMs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub blk: PathBuf,
    pub net: PathBuf,
}

impl Binaries {
    /// Finds the backends with [`find_program`].
    pub fn find(dir: Option<&Path>) -> Result<Binaries, Error> {
        Ok(Binaries {
            blk: find_program(dir, "ferrovirt-vhost-blk")?,
            net: find_program(dir, "ferrovirt-vhost-net")?,
        })
    }
}

/// The program `name` in `dir`, else next to the running program, else on PATH.
pub fn find_program(dir: Option<&Path>, name: &'static str) -> Result<PathBuf, Error> {
    let own = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let mut dirs: Vec<PathBuf> = dir.into_iter().map(Path::to_path_buf).collect();
    dirs.extend(own);
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(Error::NoBinary(name))
}

/// Makes sure `image` can be served: creates it sparse when asked to, else checks it is there.
/// True when it was created. Paths in a foreign root are resolved inside it (see [`open_in`]).
pub fn prepare_image(image: &Image) -> Result<bool, Error> {
    use nix::fcntl::OFlag;
    if let Some(nocloud) = &image.nocloud {
        nocloud.write(&image.path)?;
        return Ok(true);
    }
    let root = image.root.as_deref();
    let path = &image.path;
    match open_in(root, path, OFlag::O_RDONLY | OFlag::O_NONBLOCK) {
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let create = |e| Error::Create(path.clone(), e);
            if root.is_none()
                && let Some(dir) = path.parent()
            {
                std::fs::create_dir_all(dir).map_err(create)?;
            }
            let (dir, name) = parent_in(root, path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::MissingImage(path.clone()),
                _ => create(e),
            })?;
            if let Some(source) = &image.copy_from {
                sparse_copy(source, &dir, name, path)?;
                return Ok(true);
            }
            let Some(size) = image.create_size else {
                return Err(Error::MissingImage(path.clone()));
            };
            create_new_at(&dir, name)
                .and_then(|file| file.set_len(size))
                .map_err(create)?;
            Ok(true)
        }
        Err(e) => Err(Error::Unreadable(path.clone(), e)),
    }
}

/// Copies `source` to `name` in `dir` leaving holes where it reads as zeroes (a container
/// disk's image is mostly empty); through a temporary file, so `name` exists only once whole.
fn sparse_copy(source: &CopySource, dir: &File, name: &OsStr, to: &Path) -> Result<(), Error> {
    use std::io::{Read, Seek, SeekFrom, Write};
    const CHUNK: usize = 1 << 20;
    let from = &source.path;
    let mut source = match open_in_root(source) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::MissingImage(from.to_owned()));
        }
        Err(e) => return Err(Error::Unreadable(from.to_owned(), e)),
    };
    let tmp_name = Path::new(name).with_extension("partial").into_os_string();
    let create = |e| Error::Create(to.to_owned(), e);
    // Left by a copy that was interrupted.
    let _ = nix::unistd::unlinkat(
        dir,
        tmp_name.as_os_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    let mut out = create_new_at(dir, &tmp_name).map_err(create)?;
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        let n = source
            .read(&mut buf)
            .map_err(|e| Error::Unreadable(from.to_owned(), e))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            out.seek(SeekFrom::Current(n as i64)).map_err(create)?;
        } else {
            out.write_all(&buf[..n]).map_err(create)?;
        }
        len += n as u64;
    }
    out.set_len(len).map_err(create)?;
    out.sync_all().map_err(create)?;
    nix::fcntl::renameat(dir, tmp_name.as_os_str(), dir, name).map_err(|e| create(e.into()))
}

/// Opens `source.path` read-only inside `source.root`; only a regular file will do.
fn open_in_root(source: &CopySource) -> std::io::Result<File> {
    use nix::fcntl::OFlag;
    let file = open_in(Some(&source.root), &source.path, OFlag::O_RDONLY)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// Opens `path` with `flags`; inside `root` when there is one, with every component, symlinks
/// and `..` included, resolved there (openat2 RESOLVE_IN_ROOT), so that a link planted in a
/// container cannot point the node at its own files.
fn open_in(root: Option<&Path>, path: &Path, flags: nix::fcntl::OFlag) -> std::io::Result<File> {
    use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat2};
    let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC);
    let fd = match root {
        Some(root) => {
            let root = File::open(root)?;
            let how =
                how.resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            openat2(&root, path, how)?
        }
        None => openat2(AT_FDCWD, path, how)?,
    };
    Ok(File::from(fd))
}

/// The directory of `path` (resolved as [`open_in`] does) and the file's name in it.
fn parent_in<'p>(root: Option<&Path>, path: &'p Path) -> std::io::Result<(File, &'p OsStr)> {
    use nix::fcntl::OFlag;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the image path names no file"))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    let dir = open_in(root, parent, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
    Ok((dir, name))
}

/// Creates `name` in `dir`; fails if anything, a link included, is already there.
fn create_new_at(dir: &File, name: &OsStr) -> std::io::Result<File> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC;
    let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o644))?;
    Ok(File::from(fd))
}

/// The `ferrovirt-vhost-blk` command for `disk`.
pub fn blk_command(bin: &Binaries, disk: &DiskBackend) -> Command {
    let mut cmd = Command::new(&bin.blk);
    cmd.arg("--image")
        .arg(&disk.image.path)
        .arg("--socket")
        .arg(&disk.socket)
        .arg("--num-queues")
        .arg(disk.num_queues.to_string());
    if let Some(root) = &disk.image.root {
        cmd.arg("--root").arg(root);
    }
    if disk.image.read_only {
        cmd.arg("--read-only");
    }
    if let Some(serial) = &disk.serial {
        cmd.arg("--serial").arg(serial);
    }
    cmd
}

/// The `ferrovirt-vhost-net` command for `net`.
pub fn net_command(bin: &Binaries, net: &NetBackend) -> Command {
    let mut cmd = Command::new(&bin.net);
    cmd.arg("--tap")
        .arg(&net.tap.name)
        .arg("--socket")
        .arg(&net.socket);
    if let Some(netns) = &net.tap.netns {
        cmd.arg("--netns").arg(netns);
    }
    if let Some(mtu) = net.tap.mtu {
        cmd.arg("--mtu").arg(mtu.to_string());
    }
    cmd
}

/// A started process that is stopped (SIGTERM, then SIGKILL after a grace period) when dropped.
#[derive(Debug)]
pub struct Guarded {
    pub name: String,
    pub child: Child,
}

/// Starts `cmd` in a process group of its own (so a terminal's Ctrl-C reaches only the VMM,
/// which then ends in order), calls `on_spawn` with its pid, and waits until it accepts
/// connections on `socket`. A process that fails to is killed.
pub fn spawn_listening(
    name: &str,
    mut cmd: Command,
    socket: &Path,
    timeout: Duration,
    on_spawn: impl FnOnce(u32),
) -> Result<Child, Error> {
    cmd.process_group(0).stdin(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| Error::Spawn(name.to_owned(), e))?;
    on_spawn(child.id());
    let deadline = Instant::now() + timeout;
    loop {
        if UnixStream::connect(socket).is_ok() {
            return Ok(child);
        }
        let failed = match child.try_wait() {
            Ok(Some(status)) => Some(Error::Exited {
                name: name.to_owned(),
                status,
                socket: socket.to_owned(),
            }),
            _ if Instant::now() >= deadline => Some(Error::NotListening {
                name: name.to_owned(),
                socket: socket.to_owned(),
                timeout,
            }),
            _ => None,
        };
        if let Some(e) = failed {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Guarded {
    /// [`spawn_listening`], stopped when dropped.
    pub fn spawn_listening(
        name: String,
        cmd: Command,
        socket: &Path,
        timeout: Duration,
    ) -> Result<Guarded, Error> {
        let child = spawn_listening(&name, cmd, socket, timeout, |_| {})?;
        Ok(Guarded { name, child })
    }

    /// Stops the process: SIGTERM, and SIGKILL if it is still there after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::warn!(name = %self.name, "did not stop on SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_disks_are_copied_once_with_their_holes() {
        let dir = ferrovirt_tests::ScratchDir::new("node-copy").unwrap();
        let source = dir.join("src.img");
        let mut bytes = vec![0u8; 5 << 20];
        bytes[..4096].fill(0xab);
        bytes[(3 << 20) + 17] = 1;
        std::fs::write(&source, &bytes).unwrap();
        let in_dir = |path: &str| {
            Some(CopySource {
                root: dir.path().to_owned(),
                path: PathBuf::from(path),
            })
        };
        let image = Image {
            path: dir.join("disk.img"),
            copy_from: in_dir("/src.img"),
            ..Default::default()
        };
        assert!(prepare_image(&image).unwrap());
        assert_eq!(std::fs::read(&image.path).unwrap(), bytes);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&image.path).unwrap().blocks();
        assert!(
            blocks <= 2 * 2048 + 64,
            "holes were filled: {blocks} blocks"
        );
        // The VM's copy is kept: a second start does not copy again.
        std::fs::write(&image.path, b"written by the guest").unwrap();
        assert!(!prepare_image(&image).unwrap());
        assert_eq!(std::fs::read(&image.path).unwrap(), b"written by the guest");
        let missing = Image {
            path: dir.join("other.img"),
            copy_from: in_dir("/nosuch.img"),
            ..Default::default()
        };
        let err = prepare_image(&missing).unwrap_err();
        assert!(
            err.to_string().contains("nosuch.img does not exist"),
            "{err}"
        );
        assert!(!missing.path.exists() && !dir.join("other.partial").exists());
        // A symlink in the image to a file of the node resolves inside the image's root.
        let host = ferrovirt_tests::ScratchDir::new("node-copy-host").unwrap();
        std::fs::write(host.join("secret"), b"node only").unwrap();
        std::os::unix::fs::symlink(host.join("secret"), dir.join("link.img")).unwrap();
        let escape = Image {
            path: dir.join("escaped.img"),
            copy_from: in_dir("/link.img"),
            ..Default::default()
        };
        let err = prepare_image(&escape).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!escape.path.exists());
    }

    #[test]
    fn images_are_created_sparse_only_when_asked() {
        let dir = std::env::temp_dir().join(format!("fv-node-img-{}", std::process::id()));
        let image = Image {
            path: dir.join("sub/d.img"),
            ..Default::default()
        };
        let err = prepare_image(&image).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let image = Image {
            create_size: Some(1 << 30),
            ..image
        };
        assert!(prepare_image(&image).unwrap());
        let meta = std::fs::metadata(&image.path).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() < 16, "not sparse: {} blocks", meta.blocks());
        // An existing image is left alone.
        assert!(!prepare_image(&image).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn images_in_a_launchers_root_never_reach_the_nodes_files_through_planted_links() {
        let root = ferrovirt_tests::ScratchDir::new("node-root").unwrap();
        let host = ferrovirt_tests::ScratchDir::new("node-root-host").unwrap();
        let secret = host.join("secret");
        std::fs::write(&secret, b"node only").unwrap();
        std::fs::write(root.join("src.img"), vec![0x5au8; 8192]).unwrap();
        let disks = root.join("disks");
        std::fs::create_dir(&disks).unwrap();
        // The launcher's owner links the disk path, and the copy's temporary file, to a file
        // of the node.
        std::os::unix::fs::symlink(&secret, disks.join("disk.img")).unwrap();
        std::os::unix::fs::symlink(&secret, disks.join("disk.partial")).unwrap();
        let in_root = |path: &str| Image {
            path: PathBuf::from(path),
            root: Some(root.path().to_owned()),
            ..Default::default()
        };
        // Creating over the link fails instead of truncating the node's file.
        let created = Image {
            create_size: Some(1 << 20),
            ..in_root("/disks/disk.img")
        };
        let err = prepare_image(&created).unwrap_err();
        assert!(matches!(err, Error::Create(..)), "{err}");
        // A copy replaces the link (and the planted temporary) with the image.
        let copied = Image {
            copy_from: Some(CopySource {
                root: root.path().to_owned(),
                path: PathBuf::from("/src.img"),
            }),
            ..in_root("/../../disks/disk.img")
        };
        assert!(prepare_image(&copied).unwrap());
        let meta = std::fs::symlink_metadata(disks.join("disk.img")).unwrap();
        assert!(meta.is_file(), "{meta:?}");
        assert_eq!(
            std::fs::read(disks.join("disk.img")).unwrap(),
            vec![0x5au8; 8192]
        );
        assert!(!disks.join("disk.partial").exists());
        assert_eq!(std::fs::read(&secret).unwrap(), b"node only");
        // A directory outside the root is out of reach, too.
        let outside = in_root(&format!("{}/new.img", host.path().display()));
        let err = prepare_image(&Image {
            create_size: Some(4096),
            ..outside
        })
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!host.join("new.img").exists());
        // The backend is told the root.
        let cmd = blk_command(
            &Binaries {
                blk: "blk".into(),
                net: "net".into(),
            },
            &DiskBackend {
                name: "d".into(),
                image: in_root("/disks/disk.img"),
                socket: "s".into(),
                num_queues: 1,
                serial: None,
            },
        );
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let at = args.iter().position(|a| a == "--root").expect("--root");
        assert_eq!(args[at + 1], root.path().display().to_string());
    }

    #[test]
    fn a_backend_that_dies_is_reported_with_its_status() {
        let socket = std::env::temp_dir().join(format!("fv-node-none-{}.sock", std::process::id()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 7"]);
        let err = Guarded::spawn_listening("sh".into(), cmd, &socket, Duration::from_secs(5))
            .unwrap_err();
        assert!(err.to_string().contains("exit status: 7"), "{err}");
    }
}
