//! What a node starts for a VMI: one `ferrovirt-vhost-blk` per disk, one `ferrovirt-vhost-net`
//! per vhost-user interface, and the VMM's [`VmConfig`]. Pure: the caller says where volumes,
//! TAPs and sockets are ([`Resolver`]), so `fvctl run` (this host) and the node agent (a
//! launcher pod) share it.

use std::path::{Path, PathBuf};

use ferrovirt_runtime::config::{
    ConsoleConfig, CpusConfig, DiskConfig, MacAddr, MemoryConfig, NetConfig, PayloadConfig,
    RngConfig, VmConfig,
};

use crate::crd::spec::{Interface, Network, Volume};
use crate::crd::vmi::VirtualMachineInstanceSpec;
use crate::launcher;
use crate::node::cloudinit::NoCloud;
use crate::quantity;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "spec.domain.firmware.kernelBoot.container.kernelPath is not set: ferrovirt boots a kernel directly; give the kernel's path (for the test guest in the launcher image: /usr/share/ferrovirt/testguest)"
    )]
    NoKernel,
    #[error(
        "set the guest's memory: spec.domain.memory.guest or spec.domain.resources.requests.memory (for example 512Mi)"
    )]
    NoMemory,
    #[error("guest memory: {0}")]
    Memory(#[from] quantity::Error),
    #[error("guest memory {0} bytes is not a whole number of MiB; give a multiple of 1Mi")]
    MemoryNotMib(u64),
    #[error("{0} vCPUs is more than ferrovirt-vmm runs (at most 255)")]
    TooManyVcpus(u32),
    #[error("disk {0:?} has no volume of the same name in spec.volumes")]
    NoVolume(String),
    #[error("interface {0:?} has no network of the same name in spec.networks")]
    NoNetwork(String),
    #[error("interface {name:?}: {source}")]
    Mac {
        name: String,
        source: ferrovirt_runtime::config::MacError,
    },
    #[error("volume {volume:?}: {reason}")]
    Volume { volume: String, reason: String },
    #[error("interface {interface:?}: {reason}")]
    Interface { interface: String, reason: String },
}

/// An image file a disk backend serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// The path the backend opens.
    pub path: PathBuf,
    /// The file system `path` is resolved in, as if it were `/` (a launcher container's
    /// `/proc/PID/root`, whose owner may plant links there); None: the node's own.
    pub root: Option<PathBuf>,
    /// Create the file sparse with this size when it does not exist.
    pub create_size: Option<u64>,
    pub read_only: bool,
    /// Write this cloud-init NoCloud disk to `path` before the backend starts.
    pub nocloud: Option<NoCloud>,
    /// Copy this file (sparse) to `path` when `path` does not exist: a container disk's
    /// image, which the VM writes to a copy of its own.
    pub copy_from: Option<CopySource>,
}

/// A file inside another root file system (a container's `/proc/PID/root`). It is opened
/// with the path resolved inside `root`, so a symlink in the image cannot point the node at
/// its own files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySource {
    pub root: PathBuf,
    /// The file's path inside `root`.
    pub path: PathBuf,
}

/// Where an interface's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    /// The TAP's name.
    pub name: String,
    /// The network namespace it lives in (a path such as /proc/PID/ns/net), None for ours.
    pub netns: Option<PathBuf>,
    pub mtu: Option<u16>,
    /// The MAC the network assigned (the eBPF switch lets the guest send from it only).
    pub mac: Option<MacAddr>,
}

/// How the caller's world maps the VMI's volumes and networks to files and TAPs.
pub trait Resolver {
    /// The image backing `volume` (its `name` is the disk's).
    fn image(&mut self, volume: &Volume) -> Result<Image, Error>;
    /// The TAP behind `interface`, which attaches to `network`; `index` counts the VMI's
    /// interfaces from 0.
    fn tap(&mut self, interface: &Interface, network: &Network, index: usize)
    -> Result<Tap, Error>;
}

/// One `ferrovirt-vhost-blk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBackend {
    /// The disk's name in the spec.
    pub name: String,
    pub image: Image,
    /// Where the backend listens (host view).
    pub socket: PathBuf,
    pub serial: Option<String>,
    pub num_queues: u16,
}

/// One `ferrovirt-vhost-net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetBackend {
    /// The interface's name in the spec.
    pub name: String,
    pub tap: Tap,
    /// Where the backend listens (host view).
    pub socket: PathBuf,
    pub mac: MacAddr,
}

/// Everything to start for one VMI.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub disks: Vec<DiskBackend>,
    pub nets: Vec<NetBackend>,
    /// The VMM's configuration; its socket paths are as the VMM sees them.
    pub vm: VmConfig,
}

/// Where sockets go: `host` is the directory backends listen in, `vmm` the same directory as
/// the VMM sees it (they differ when the VMM runs in a launcher pod).
#[derive(Debug, Clone)]
pub struct SocketDirs {
    pub host: PathBuf,
    pub vmm: PathBuf,
}

impl SocketDirs {
    /// Both sides see `dir` under the same path.
    pub fn same(dir: &Path) -> SocketDirs {
        SocketDirs {
            host: dir.to_owned(),
            vmm: dir.to_owned(),
        }
    }
}

/// The plan for `spec`. Disks come in boot order (those with `bootOrder` first, lowest first),
/// then interfaces in spec order; `kernel_root` prefixes the kernel and initrd paths.
pub fn plan(
    spec: &VirtualMachineInstanceSpec,
    resolver: &mut dyn Resolver,
    sockets: &SocketDirs,
    kernel_root: &Path,
) -> Result<Plan, Error> {
    let domain = &spec.domain;
    let boot = domain
        .firmware
        .as_ref()
        .and_then(|f| f.kernel_boot.as_ref())
        .ok_or(Error::NoKernel)?;
    let vcpus = domain.cpu.as_ref().map_or(1, |c| c.vcpus());
    let boot_vcpus = u16::try_from(vcpus)
        .ok()
        .filter(|v| *v <= 255)
        .ok_or(Error::TooManyVcpus(vcpus))?;
    let memory = launcher::spec_guest_memory(spec).map_err(|e| match e {
        launcher::Error::Memory(e) => Error::Memory(e),
        _ => Error::NoMemory,
    })?;
    if memory % (1 << 20) != 0 {
        return Err(Error::MemoryNotMib(memory));
    }

    let mut disks: Vec<_> = domain.devices.disks.iter().enumerate().collect();
    disks.sort_by_key(|(i, d)| (d.boot_order.unwrap_or(u32::MAX), *i));
    let mut disk_backends = Vec::new();
    for (_, disk) in disks {
        let volume = spec
            .volumes
            .iter()
            .find(|v| v.name == disk.name)
            .ok_or_else(|| Error::NoVolume(disk.name.clone()))?;
        let mut image = resolver.image(volume)?;
        if disk.disk.as_ref().and_then(|d| d.readonly) == Some(true) {
            image.read_only = true;
        }
        disk_backends.push(DiskBackend {
            name: disk.name.clone(),
            image,
            socket: sockets.host.join(format!("disk-{}.sock", disk.name)),
            serial: disk.serial.clone(),
            num_queues: boot_vcpus.clamp(1, 4),
        });
    }

    let mut net_backends = Vec::new();
    for (index, interface) in domain.devices.interfaces.iter().enumerate() {
        let network = spec
            .networks
            .iter()
            .find(|n| n.name == interface.name)
            .ok_or_else(|| Error::NoNetwork(interface.name.clone()))?;
        let socket = sockets.host.join(format!("net-{}.sock", interface.name));
        let tap = resolver.tap(interface, network, index)?;
        let asked = match &interface.mac_address {
            Some(text) => Some(text.parse().map_err(|source| Error::Mac {
                name: interface.name.clone(),
                source,
            })?),
            None => None,
        };
        let mac = match (asked, tap.mac) {
            (Some(asked), Some(given)) if asked != given => {
                return Err(Error::Interface {
                    interface: interface.name.clone(),
                    reason: format!(
                        "macAddress {asked} differs from {given}, which its network assigned and lets it send from; drop macAddress or pass it to the network (Multus)"
                    ),
                });
            }
            (Some(mac), _) | (None, Some(mac)) => mac,
            (None, None) => MacAddr::local_from_seed(socket.as_os_str().as_encoded_bytes()),
        };
        net_backends.push(NetBackend {
            name: interface.name.clone(),
            tap,
            socket,
            mac,
        });
    }

    let vmm_socket = |host: &Path| sockets.vmm.join(host.file_name().unwrap_or_default());
    let rooted = |p: &str| match p.strip_prefix('/') {
        Some(absolute) if kernel_root != Path::new("/") => kernel_root.join(absolute),
        _ => PathBuf::from(p),
    };
    let vm = VmConfig {
        cpus: CpusConfig { boot_vcpus },
        memory: MemoryConfig {
            size_mib: memory >> 20,
            hugepages: false,
        },
        payload: PayloadConfig {
            kernel: rooted(&boot.container.kernel_path),
            initramfs: boot.container.initrd_path.as_deref().map(rooted),
            cmdline: boot.kernel_args.clone(),
        },
        serial: if domain.devices.autoattach_serial_console == Some(false) {
            ConsoleConfig::Off
        } else {
            ConsoleConfig::Tty
        },
        rng: domain.devices.rng.as_ref().map(|_| RngConfig::default()),
        disks: disk_backends
            .iter()
            .map(|d| DiskConfig {
                socket: vmm_socket(&d.socket),
            })
            .collect(),
        nets: net_backends
            .iter()
            .map(|n| NetConfig {
                socket: vmm_socket(&n.socket),
                mac: Some(n.mac),
                queue_pairs: 1,
                mtu: n.tap.mtu,
            })
            .collect(),
    };
    Ok(Plan {
        disks: disk_backends,
        nets: net_backends,
        vm,
    })
}

/// The `volume`'s error for a source this resolver cannot serve.
pub fn unsupported(volume: &Volume, reason: impl Into<String>) -> Error {
    Error::Volume {
        volume: volume.name.clone(),
        reason: reason.into(),
    }
}

/// The image of a `cloudInitNoCloud` volume, written to `path` (a file of the node's own)
/// when the backend starts; `None` for other volumes. `instance_id` and `hostname` go into its
/// meta-data.
pub fn nocloud_image(
    volume: &Volume,
    path: PathBuf,
    instance_id: &str,
    hostname: &str,
) -> Option<Result<Image, Error>> {
    let source = volume.cloud_init_no_cloud.as_ref()?;
    Some(
        NoCloud::new(source, instance_id, hostname)
            .map(|nocloud| Image {
                path,
                read_only: true,
                nocloud: Some(nocloud),
                ..Default::default()
            })
            .map_err(|e| unsupported(volume, e.to_string())),
    )
}

/// Bytes in a capacity quantity of `volume`.
pub fn capacity(
    volume: &Volume,
    q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity,
) -> Result<u64, Error> {
    let bytes = quantity::to_bytes(&q.0).map_err(|e| unsupported(volume, e.to_string()))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(unsupported(
            volume,
            format!(
                "capacity {} is not a positive multiple of 512 bytes (for example 1Gi)",
                q.0
            ),
        ));
    }
    Ok(bytes)
}

/// The launcher's default disk file name inside a directory volume (KubeVirt's convention).
pub const DISK_IMG: &str = "disk.img";

/// Re-exported for resolvers: where launcher pods mount disk volumes.
pub const DISKS_DIR: &str = launcher::DISKS_DIR;

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl Resolver for Fake {
        fn image(&mut self, volume: &Volume) -> Result<Image, Error> {
            if volume.host_disk.is_some() {
                Ok(Image {
                    path: PathBuf::from(format!("/img/{}", volume.name)),
                    ..Default::default()
                })
            } else {
                Err(unsupported(volume, "not here"))
            }
        }
        fn tap(&mut self, i: &Interface, _: &Network, index: usize) -> Result<Tap, Error> {
            Ok(Tap {
                name: format!("tap{index}-{}", i.name),
                netns: None,
                mtu: Some(1400),
                mac: None,
            })
        }
    }

    fn spec(yaml: &str) -> VirtualMachineInstanceSpec {
        serde_yaml::from_str(yaml).expect("test spec parses")
    }

    const BASE: &str = r#"
domain:
  cpu: {cores: 2}
  memory: {guest: 64Mi}
  firmware:
    kernelBoot:
      kernelArgs: scenario=blk
      container: {kernelPath: /usr/share/ferrovirt/testguest}
  devices:
    rng: {}
    disks:
      - {name: data, serial: d1}
      - {name: root, bootOrder: 1, disk: {readonly: true}}
    interfaces:
      - {name: vmnet, macAddress: "52:54:00:aa:bb:cc", binding: {name: vhostuser}}
volumes:
  - {name: data, hostDisk: {path: /x/data.img, type: Disk}}
  - {name: root, hostDisk: {path: /x/root.img, type: Disk}}
networks:
  - {name: vmnet, pod: {}}
"#;

    #[test]
    fn a_spec_becomes_backends_and_a_vmm_config() {
        let dirs = SocketDirs {
            host: "/run/h".into(),
            vmm: "/run/v".into(),
        };
        let p = plan(&spec(BASE), &mut Fake, &dirs, Path::new("/proc/7/root")).unwrap();
        // Boot order first, then spec order.
        assert_eq!(
            p.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["root", "data"]
        );
        assert!(p.disks[0].image.read_only);
        assert!(!p.disks[1].image.read_only);
        assert_eq!(p.disks[1].serial.as_deref(), Some("d1"));
        assert_eq!(p.disks[0].socket, Path::new("/run/h/disk-root.sock"));
        assert_eq!(p.disks[0].num_queues, 2);
        assert_eq!(p.vm.disks[0].socket, Path::new("/run/v/disk-root.sock"));
        assert_eq!(p.nets[0].tap.name, "tap0-vmnet");
        assert_eq!(p.vm.nets[0].mac.unwrap().to_string(), "52:54:00:aa:bb:cc");
        assert_eq!(p.vm.nets[0].mtu, Some(1400));
        assert_eq!(p.vm.cpus.boot_vcpus, 2);
        assert_eq!(p.vm.memory.size_mib, 64);
        assert_eq!(
            p.vm.payload.kernel,
            Path::new("/proc/7/root/usr/share/ferrovirt/testguest")
        );
        assert_eq!(p.vm.payload.cmdline.as_deref(), Some("scenario=blk"));
        assert!(p.vm.rng.is_some());
        assert_eq!(p.vm.serial, ConsoleConfig::Tty);
    }

    fn plan_err(yaml: &str) -> String {
        plan(
            &spec(yaml),
            &mut Fake,
            &SocketDirs::same(Path::new("/r")),
            Path::new("/"),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn bad_specs_say_what_to_fix() {
        let err = plan_err(&BASE.replace("kernelBoot:", "x:"));
        assert!(err.contains("kernelPath"), "{err}");
        let err = plan_err(&BASE.replace("guest: 64Mi", "guest: 1000k"));
        assert!(err.contains("multiple of 1Mi"), "{err}");
        let err = plan_err(&BASE.replace("{name: data, serial: d1}", "{name: lost}"));
        assert_eq!(
            err,
            "disk \"lost\" has no volume of the same name in spec.volumes"
        );
        let err = plan_err(&BASE.replace(
            "hostDisk: {path: /x/data.img, type: Disk}",
            "emptyDisk: {capacity: 1Gi}",
        ));
        assert_eq!(err, "volume \"data\": not here");
    }

    struct Assigned;
    impl Resolver for Assigned {
        fn image(&mut self, volume: &Volume) -> Result<Image, Error> {
            Fake.image(volume)
        }
        fn tap(&mut self, i: &Interface, n: &Network, index: usize) -> Result<Tap, Error> {
            let mac = "02:00:00:00:00:01".parse().ok();
            Ok(Tap {
                mac,
                ..Fake.tap(i, n, index)?
            })
        }
    }

    #[test]
    fn the_networks_mac_is_used_and_a_different_one_is_refused() {
        let dirs = SocketDirs::same(Path::new("/r"));
        let own = BASE.replace(", macAddress: \"52:54:00:aa:bb:cc\"", "");
        let p = plan(&spec(&own), &mut Assigned, &dirs, Path::new("/")).unwrap();
        assert_eq!(p.vm.nets[0].mac.unwrap().to_string(), "02:00:00:00:00:01");
        let err = plan(&spec(BASE), &mut Assigned, &dirs, Path::new("/")).unwrap_err();
        assert!(
            err.to_string().contains("differs from 02:00:00:00:00:01"),
            "{err}"
        );
    }

    #[test]
    fn relative_kernel_paths_stay_relative_and_the_console_can_be_off() {
        let s = BASE
            .replace("/usr/share/ferrovirt/testguest", "target/g")
            .replace("rng: {}", "autoattachSerialConsole: false");
        let p = plan(
            &spec(&s),
            &mut Fake,
            &SocketDirs::same(Path::new("/r")),
            Path::new("/proc/1/root"),
        )
        .unwrap();
        assert_eq!(p.vm.payload.kernel, Path::new("target/g"));
        assert_eq!(p.vm.serial, ConsoleConfig::Off);
        assert!(p.vm.rng.is_none());
    }
}
