//! The VM description: what the user asks for, from flags, a JSON file or the API.
//!
//! These structs cross a process boundary (JSON config file, `PUT /vm.create`), so they
//! refuse unknown fields: a typo must not silently change the VM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Guest memory sizes below this cannot hold the boot structures and a kernel.
pub const MIN_MEMORY_MIB: u64 = 2;
/// Above 1 TiB is a typo on the machines we run on, not a request.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid VM JSON")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "memory size {0} MiB is out of range: give between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB"
    )]
    MemorySize(u64),
    #[error("vCPU count must be at least 1")]
    NoCpus,
    #[error("no kernel given: pass --kernel PATH or set payload.kernel")]
    NoKernel,
    #[error("disk {0} has no socket: give the vhost-user-blk backend's socket path")]
    NoDiskSocket(usize),
    #[error("{what} {path} does not exist or is not readable")]
    MissingFile { what: &'static str, path: PathBuf },
}

/// A whole VM, as `PUT /vm.create` takes it and `--config` reads it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(default)]
    pub serial: ConsoleConfig,
    /// An entropy device (virtio-rng) fed from this host file, usually /dev/urandom.
    #[serde(default)]
    pub rng: Option<RngConfig>,
    /// Disks served by vhost-user-blk backends, in PCI slot order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u16,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig { boot_vcpus: 1 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM in MiB.
    pub size_mib: u64,
    /// Back guest RAM with 2 MiB hugetlbfs pages (the host must have them reserved).
    #[serde(default)]
    pub hugepages: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size_mib: 512,
            hugepages: false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// ELF vmlinux (PVH note or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// Where the guest's serial port (ttyS0) goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "lowercase",
    tag = "mode",
    content = "path"
)]
pub enum ConsoleConfig {
    /// The VMM's standard output (and input, when it is a terminal or pipe).
    #[default]
    Tty,
    /// Appended to a file.
    File(PathBuf),
    /// A UNIX stream socket the VMM listens on; one client at a time reads and writes.
    Socket(PathBuf),
    /// Discarded.
    Off,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    pub src: PathBuf,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: PathBuf::from("/dev/urandom"),
        }
    }
}

/// A virtio-blk disk whose data path is a vhost-user-blk backend (e.g. ferrovirt-vhost-blk
/// or qemu-storage-daemon) listening on `socket`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub socket: PathBuf,
}

impl VmConfig {
    /// Reads a VM description from a JSON file.
    pub fn from_file(path: &std::path::Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks what can be checked without KVM: sizes, counts, files that must exist.
    /// Limits that depend on the host (max vCPUs) are checked when the VM is built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus.boot_vcpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        let mib = self.memory.size_mib;
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
            return Err(ConfigError::MemorySize(mib));
        }
        if self.payload.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        check_readable("kernel", &self.payload.kernel)?;
        if let Some(initramfs) = &self.payload.initramfs {
            check_readable("initramfs", initramfs)?;
        }
        if let Some(rng) = &self.rng {
            check_readable("rng source", &rng.src)?;
        }
        if let Some(index) = self
            .disks
            .iter()
            .position(|d| d.socket.as_os_str().is_empty())
        {
            return Err(ConfigError::NoDiskSocket(index));
        }
        Ok(())
    }
}

fn check_readable(what: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|_| ConfigError::MissingFile {
            what,
            path: path.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<VmConfig>(
            r#"{"payload":{"kernel":"/k"},"memory":{"size_mib":64,"hugepage":true}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `hugepage`"),
            "{err}"
        );
    }

    #[test]
    fn defaults_fill_in_a_minimal_config() {
        let cfg: VmConfig = serde_json::from_str(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(cfg.cpus.boot_vcpus, 1);
        assert_eq!(cfg.memory.size_mib, 512);
        assert_eq!(cfg.serial, ConsoleConfig::Tty);
        assert!(cfg.rng.is_none());
        assert!(cfg.disks.is_empty());
    }

    #[test]
    fn zero_and_absurd_memory_are_refused() {
        for mib in [0, 1, MAX_MEMORY_MIB + 1] {
            let cfg = VmConfig {
                memory: MemoryConfig {
                    size_mib: mib,
                    hugepages: false,
                },
                payload: PayloadConfig {
                    kernel: "/dev/null".into(),
                    ..Default::default()
                },
                ..Default::default()
            };
            assert!(matches!(cfg.validate(), Err(ConfigError::MemorySize(m)) if m == mib));
        }
    }

    #[test]
    fn missing_kernel_is_named() {
        let cfg = VmConfig {
            payload: PayloadConfig {
                kernel: "/nonexistent/vmlinux".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn disks_are_a_list_of_sockets() {
        let cfg: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"/dev/null"},"disks":[{"socket":"/run/a.sock"},{"socket":"/run/b.sock"}]}"#,
        )
        .unwrap();
        let sockets: Vec<_> = cfg.disks.iter().map(|d| d.socket.clone()).collect();
        assert_eq!(
            sockets,
            [PathBuf::from("/run/a.sock"), "/run/b.sock".into()]
        );
        cfg.validate().unwrap();

        let err = serde_json::from_str::<VmConfig>(
            r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/run/a.sock"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `path`"), "{err}");

        let empty = VmConfig {
            disks: vec![DiskConfig {
                socket: PathBuf::new(),
            }],
            ..cfg
        };
        assert!(matches!(
            empty.validate(),
            Err(ConfigError::NoDiskSocket(0))
        ));
    }
}
