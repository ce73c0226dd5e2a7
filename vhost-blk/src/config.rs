//! Command-line flags and the disk image they name, checked before anything is served.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::request::{SECTOR_SIZE, VIRTIO_BLK_ID_BYTES};

/// Flags of `ferrovirt-vhost-blk`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "ferrovirt-vhost-blk",
    about = "vhost-user-blk backend: serves a raw image file or block device to a VMM over a \
             vhost-user UNIX socket, with I/O on io_uring",
    version
)]
pub struct Flags {
    /// Raw image file or block device to serve; its size must be a multiple of 512 bytes.
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// vhost-user UNIX socket to listen on; a stale socket file is replaced, a live one is an error.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Serve the image read-only (VIRTIO_BLK_F_RO): writes, discards and write-zeroes fail.
    #[arg(long)]
    pub read_only: bool,
    /// Number of virtqueues (VIRTIO_BLK_F_MQ); each has its own worker thread and io_uring.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Largest virtqueue the frontend may set up (a power of two).
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,
    /// Disk serial returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,
    /// Open the image with O_DIRECT, bypassing the host page cache (buffers must be aligned by
    /// the guest, as Linux guests do).
    #[arg(long)]
    pub direct: bool,
    /// Serve one connection and exit, instead of waiting for the VMM to reconnect.
    #[arg(long)]
    pub once: bool,
    /// Resolve --image inside DIR as if DIR were `/` (openat2 RESOLVE_IN_ROOT): `..` and
    /// symlinks in the image path cannot leave DIR. For images in another process's file system
    /// (`/proc/PID/root`) whose owner may have planted links.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("image {0:?} does not exist; pass an existing raw image file or block device")]
    ImageMissing(PathBuf),
    #[error("image {0:?} is read-only for this process; pass --read-only to serve it read-only")]
    ImageReadOnly(PathBuf, #[source] std::io::Error),
    #[error("image {0:?} has no write permission bits; pass --read-only to serve it read-only")]
    ImageModeReadOnly(PathBuf),
    #[error("cannot open image {0:?}")]
    OpenImage(PathBuf, #[source] std::io::Error),
    #[error("cannot open --root {0:?}; pass an existing directory")]
    OpenRoot(PathBuf, #[source] std::io::Error),
    #[error("cannot find the size of image {0:?}")]
    ImageSize(PathBuf, #[source] std::io::Error),
    #[error("image {path:?} is {size} bytes, not a multiple of 512; resize it (truncate -s)")]
    ImageSizeNotSectorMultiple { path: PathBuf, size: u64 },
    #[error("image {0:?} is empty")]
    ImageEmpty(PathBuf),
    #[error("image {0:?} is neither a regular file nor a block device")]
    ImageNotFileOrDevice(PathBuf),
    #[error("--serial {0:?} is longer than 20 bytes")]
    SerialTooLong(String),
    #[error("--queue-size {0} is not a power of two between 2 and 32768")]
    BadQueueSize(u16),
}

/// Everything the backend needs, checked.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub image: PathBuf,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Vec<u8>,
    pub direct: bool,
    /// The directory `image` is resolved in, as if it were `/`.
    pub root: Option<PathBuf>,
}

impl BackendConfig {
    /// Checks the flags that need no file access.
    pub fn from_flags(flags: &Flags) -> Result<Self, ConfigError> {
        let serial = flags.serial.clone().unwrap_or_default();
        if serial.len() > VIRTIO_BLK_ID_BYTES {
            return Err(ConfigError::SerialTooLong(serial));
        }
        if !flags.queue_size.is_power_of_two() || flags.queue_size < 2 {
            return Err(ConfigError::BadQueueSize(flags.queue_size));
        }
        Ok(Self {
            image: flags.image.clone(),
            read_only: flags.read_only,
            num_queues: flags.num_queues,
            queue_size: flags.queue_size,
            serial: serial.into_bytes(),
            direct: flags.direct,
            root: flags.root.clone(),
        })
    }

    /// A config with defaults for `image`: one queue of 1024, writable, buffered.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        Self {
            image: image.into(),
            read_only: false,
            num_queues: 1,
            queue_size: 1024,
            serial: Vec::new(),
            direct: false,
            root: None,
        }
    }
}

/// The opened image.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    pub size: u64,
    pub read_only: bool,
    pub block_device: bool,
}

impl Disk {
    pub fn open(config: &BackendConfig) -> Result<Self, ConfigError> {
        let path = &config.image;
        // The path is resolved once, into an O_PATH descriptor; its type is checked on that
        // descriptor and the image is opened through it, so nothing can be swapped in between.
        let located = locate(config)?;
        let meta = located
            .metadata()
            .map_err(|e| ConfigError::OpenImage(path.clone(), e))?;
        let block_device = meta.file_type().is_block_device();
        if !meta.is_file() && !block_device {
            return Err(ConfigError::ImageNotFileOrDevice(path.clone()));
        }
        // Root may open a mode-0444 file for writing; the mode still says the owner wants it
        // read-only, so honour it.
        if !config.read_only && meta.permissions().readonly() {
            return Err(ConfigError::ImageModeReadOnly(path.clone()));
        }
        let mut flags = libc::O_CLOEXEC;
        if config.direct {
            flags |= libc::O_DIRECT;
        }
        // Opening the descriptor's magic link reopens the file it holds, with these flags.
        let mut file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .custom_flags(flags)
            .open(format!("/proc/self/fd/{}", located.as_raw_fd()))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EROFS | libc::EPERM) if !config.read_only => {
                    ConfigError::ImageReadOnly(path.clone(), e)
                }
                _ => ConfigError::OpenImage(path.clone(), e),
            })?;
        // Seeking to the end gives the size of block devices as well as files.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| ConfigError::ImageSize(path.clone(), e))?;
        if size == 0 {
            return Err(ConfigError::ImageEmpty(path.clone()));
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(ConfigError::ImageSizeNotSectorMultiple {
                path: path.clone(),
                size,
            });
        }
        Ok(Self {
            file,
            size,
            read_only: config.read_only,
            block_device,
        })
    }
}

/// An O_PATH descriptor of the image, resolved inside `config.root` when there is one.
fn locate(config: &BackendConfig) -> Result<File, ConfigError> {
    use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat2};
    let how = OpenHow::new().flags(OFlag::O_PATH | OFlag::O_CLOEXEC);
    let found = match &config.root {
        Some(root) => {
            let dir = File::open(root).map_err(|e| ConfigError::OpenRoot(root.clone(), e))?;
            let how =
                how.resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            openat2(&dir, &config.image, how)
        }
        None => openat2(AT_FDCWD, &config.image, how),
    };
    let path = &config.image;
    match found {
        Ok(fd) => Ok(File::from(fd)),
        Err(nix::errno::Errno::ENOENT) => Err(ConfigError::ImageMissing(path.clone())),
        Err(e) => Err(ConfigError::OpenImage(path.clone(), e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovirt_tests::ScratchDir;

    fn config(image: &str, root: Option<&std::path::Path>) -> BackendConfig {
        BackendConfig {
            root: root.map(Into::into),
            ..BackendConfig::new(image)
        }
    }

    #[test]
    fn links_in_the_image_path_stay_inside_the_root() {
        let s = ScratchDir::new("blkroot").unwrap();
        let outside = s.join("outside.img");
        std::fs::write(&outside, vec![7u8; 4096]).unwrap();
        let root = s.join("root");
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::write(root.join("images/real.img"), vec![0u8; 8192]).unwrap();
        // Planted by whoever owns the root: an absolute link and a `..` walk to a host file.
        std::os::unix::fs::symlink(&outside, root.join("planted.img")).unwrap();
        let escape = format!("/../{}", outside.strip_prefix("/").unwrap().display());
        // Without a root the link is followed to the host file (what --root prevents).
        let host = root.join("planted.img");
        let followed = Disk::open(&config(host.to_str().unwrap(), None)).unwrap();
        assert_eq!(followed.size, 4096);
        for path in ["/planted.img", escape.as_str()] {
            match Disk::open(&config(path, Some(&root))) {
                Err(ConfigError::ImageMissing(p)) => assert_eq!(p, PathBuf::from(path)),
                other => panic!("{path}: {other:?}"),
            }
        }
        // Links that stay inside the root resolve there.
        std::os::unix::fs::symlink("/images/real.img", root.join("inside.img")).unwrap();
        for path in ["/inside.img", "images/real.img", "/../images/real.img"] {
            let disk = Disk::open(&config(path, Some(&root))).unwrap();
            assert_eq!(disk.size, 8192, "{path}");
            assert!(!disk.read_only);
        }
    }

    #[test]
    fn a_fifo_or_a_missing_root_is_refused_without_blocking() {
        let s = ScratchDir::new("blkfifo").unwrap();
        let fifo = s.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(
            Disk::open(&config(fifo.to_str().unwrap(), None)),
            Err(ConfigError::ImageNotFileOrDevice(_))
        ));
        let missing = s.join("no-such-root");
        let err = Disk::open(&config("/fifo", Some(&missing))).unwrap_err();
        assert!(matches!(err, ConfigError::OpenRoot(..)), "{err:?}");
        assert!(err.to_string().contains("--root"), "{err}");
    }
}
