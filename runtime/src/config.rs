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
    #[error("net {0} has no socket: give the vhost-user-net backend's socket path")]
    NoNetSocket(usize),
    #[error("net {index} asks for {pairs} queue pairs; give 1..={max}", max = MAX_NET_QUEUE_PAIRS)]
    NetQueuePairs { index: usize, pairs: u16 },
    #[error("net {index} has MTU {mtu}; give at least {MIN_MTU} (the IPv4 minimum)")]
    NetMtu { index: usize, mtu: u16 },
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
    /// Network interfaces served by vhost-user-net backends, in PCI slot order (after
    /// the disks).
    #[serde(default)]
    pub nets: Vec<NetConfig>,
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

/// Queue pairs of one virtio-net device: 2 per pair plus the control queue fit the
/// transport's 256 queues.
pub const MAX_NET_QUEUE_PAIRS: u16 = 127;
/// The smallest MTU a guest can run IPv4 over (RFC 791).
pub const MIN_MTU: u16 = 68;

/// A virtio-net interface whose data path is a vhost-user-net backend (DPDK's vhost PMD,
/// a switch) listening on `socket`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub socket: PathBuf,
    /// The guest's MAC address; without one the VMM derives a locally administered one
    /// from the socket path (stable across restarts of the same VM).
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Receive/transmit queue pairs (the backend must serve twice as many queues).
    #[serde(default = "one_queue_pair")]
    pub queue_pairs: u16,
    /// The MTU the guest is told (VIRTIO_NET_F_MTU); absent: the guest's own default.
    #[serde(default)]
    pub mtu: Option<u16>,
}

fn one_queue_pair() -> u16 {
    1
}

impl NetConfig {
    /// The configured MAC, or the one derived from the socket path.
    pub fn mac_or_generated(&self) -> MacAddr {
        self.mac
            .unwrap_or_else(|| MacAddr::local_from_seed(self.socket.as_os_str().as_encoded_bytes()))
    }
}

/// An Ethernet unicast address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("{0:?} is not a MAC address: write six hex bytes, like 52:54:00:12:34:56")]
    Syntax(String),
    #[error(
        "{0} is a multicast address (lowest bit of the first byte set); a NIC needs a unicast one"
    )]
    Multicast(String),
    #[error("00:00:00:00:00:00 is not a usable MAC address")]
    Zero,
}

impl MacAddr {
    /// A locally administered unicast address made from `seed` (FNV-1a), so the same seed
    /// always gives the same address.
    pub fn local_from_seed(seed: &[u8]) -> MacAddr {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in seed {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&hash.to_be_bytes()[2..]);
        // IEEE 802: bit 0 of the first byte is multicast, bit 1 locally administered.
        mac[0] = (mac[0] & !0x01) | 0x02;
        MacAddr(mac)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<MacAddr, MacError> {
        let syntax = || MacError::Syntax(s.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(syntax)?;
            // from_str_radix would take a sign ("+2").
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        if mac == [0; 6] {
            return Err(MacError::Zero);
        }
        if mac[0] & 1 != 0 {
            return Err(MacError::Multicast(s.to_owned()));
        }
        Ok(MacAddr(mac))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl TryFrom<String> for MacAddr {
    type Error = MacError;

    fn try_from(s: String) -> Result<MacAddr, MacError> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(mac: MacAddr) -> String {
        mac.to_string()
    }
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
        for (index, net) in self.nets.iter().enumerate() {
            if net.socket.as_os_str().is_empty() {
                return Err(ConfigError::NoNetSocket(index));
            }
            let pairs = net.queue_pairs;
            if pairs == 0 || pairs > MAX_NET_QUEUE_PAIRS {
                return Err(ConfigError::NetQueuePairs { index, pairs });
            }
            if let Some(mtu) = net.mtu
                && mtu < MIN_MTU
            {
                return Err(ConfigError::NetMtu { index, mtu });
            }
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
        assert!(cfg.nets.is_empty());
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

    #[test]
    fn nets_take_socket_mac_queue_pairs_and_mtu() {
        let cfg: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"/dev/null"},"nets":[
                {"socket":"/run/n0.sock","mac":"52:54:00:12:34:56","queue_pairs":2,"mtu":9000},
                {"socket":"/run/n1.sock"}]}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.nets[0].mac,
            Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
        );
        assert_eq!((cfg.nets[0].queue_pairs, cfg.nets[0].mtu), (2, Some(9000)));
        assert_eq!(
            (cfg.nets[1].mac, cfg.nets[1].queue_pairs, cfg.nets[1].mtu),
            (None, 1, None)
        );
        let back = serde_json::to_value(&cfg.nets[0]).unwrap();
        assert_eq!(back["mac"], "52:54:00:12:34:56");

        let err = serde_json::from_str::<VmConfig>(
            r#"{"payload":{"kernel":"/k"},"nets":[{"socket":"/s","queues":2}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `queues`"), "{err}");
    }

    #[test]
    fn bad_macs_are_refused_with_the_reason() {
        for (bad, why) in [
            ("01:00:5e:00:00:01", "multicast"),
            ("ff:ff:ff:ff:ff:ff", "multicast"),
            ("00:00:00:00:00:00", "not a usable MAC"),
            ("52:54:00:12:34", "six hex bytes"),
            ("52:54:00:12:34:56:78", "six hex bytes"),
            ("52-54-00-12-34-56", "six hex bytes"),
            ("52:54:00:12:34:5g", "six hex bytes"),
            ("+2:54:00:12:34:56", "six hex bytes"),
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
            let json = format!(
                r#"{{"payload":{{"kernel":"/k"}},"nets":[{{"socket":"/s","mac":"{bad}"}}]}}"#
            );
            let err = serde_json::from_str::<VmConfig>(&json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(
            "02:AB:cd:00:00:01".parse::<MacAddr>().unwrap().to_string(),
            "02:ab:cd:00:00:01"
        );
    }

    #[test]
    fn a_generated_mac_is_local_unicast_and_stable_per_socket() {
        let net = |socket: &str| NetConfig {
            socket: socket.into(),
            mac: None,
            queue_pairs: 1,
            mtu: None,
        };
        let a = net("/run/vm-a/net0.sock").mac_or_generated();
        assert_eq!(a, net("/run/vm-a/net0.sock").mac_or_generated());
        assert_ne!(a, net("/run/vm-b/net0.sock").mac_or_generated());
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast: {a}");
        a.to_string().parse::<MacAddr>().unwrap();
    }

    #[test]
    fn net_queue_pairs_mtu_and_socket_are_checked() {
        let base: VmConfig = serde_json::from_str(r#"{"payload":{"kernel":"/dev/null"}}"#).unwrap();
        let with = |net: NetConfig| VmConfig {
            nets: vec![net],
            ..base.clone()
        };
        let net = NetConfig {
            socket: "/s".into(),
            mac: None,
            queue_pairs: 1,
            mtu: None,
        };
        for pairs in [0, MAX_NET_QUEUE_PAIRS + 1] {
            let cfg = with(NetConfig {
                queue_pairs: pairs,
                ..net.clone()
            });
            assert!(matches!(
                cfg.validate(),
                Err(ConfigError::NetQueuePairs { index: 0, pairs: p }) if p == pairs
            ));
        }
        let cfg = with(NetConfig {
            mtu: Some(67),
            ..net.clone()
        });
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::NetMtu { mtu: 67, .. })
        ));
        let cfg = with(NetConfig {
            socket: PathBuf::new(),
            ..net.clone()
        });
        assert!(matches!(cfg.validate(), Err(ConfigError::NoNetSocket(0))));
        with(NetConfig {
            queue_pairs: MAX_NET_QUEUE_PAIRS,
            mtu: Some(68),
            ..net
        })
        .validate()
        .unwrap();
    }
}
