//! `devices.ferrovirt.io/sriov-<pool>`: the VFs of one PF, read from sysfs (`bus/pci/devices/
//! <PF>/virtfnN` links), each a device whose id is its PCI address. A container gets their
//! addresses in `PCIDEVICE_FERROVIRT_IO_SRIOV_<POOL>` (the SR-IOV network device plugin's
//! convention, read by Multus and handed to our CNI as `deviceID`), and for VFs bound to
//! vfio-pci also their `/dev/vfio/<group>` and `/dev/vfio/vfio`.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::api::{self, ContainerAllocateResponse, DeviceSpec};

/// The driver that hands a VF to userspace (a VMM) through `/dev/vfio`.
pub const VFIO_DRIVER: &str = "vfio-pci";
/// The VFIO container device every vfio user opens besides its group.
pub const DEV_VFIO: &str = "/dev/vfio/vfio";
/// Prefix of the resource name after the domain, and of the socket name.
pub const RESOURCE_PREFIX: &str = "sriov-";
/// An extended resource's name part is a label of at most 63 bytes.
const MAX_POOL_NAME: usize = 63 - RESOURCE_PREFIX.len();

#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    #[error("--sriov-pool {0:?}: write NAME=PF, e.g. fast=ens1f0 or fast=0000:3b:00.0")]
    BadPoolFlag(String),
    #[error(
        "SR-IOV pool name {0:?}: use 1-{MAX_POOL_NAME} lowercase letters, digits and '-', starting and ending with a letter or digit (it becomes devices.ferrovirt.io/sriov-NAME)"
    )]
    BadPoolName(String),
    #[error(
        "PF {pf:?} of SR-IOV pool {pool:?} is not under {devices}: give its netdev name or PCI address, and check --sysfs-root"
    )]
    NoPf {
        pool: String,
        pf: String,
        devices: PathBuf,
    },
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("device {id:?} is not a VF of SR-IOV pool {pool:?} (any more?)")]
    UnknownVf { id: String, pool: String },
    #[error(
        "VF {0} is bound to vfio-pci but has no iommu_group; enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)"
    )]
    NoIommuGroup(String),
}

/// `--sriov-pool NAME=PF`: a pool name and its PF (netdev name or PCI address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovPoolSpec {
    pub name: String,
    pub pf: String,
}

impl FromStr for SriovPoolSpec {
    type Err = SriovError;

    fn from_str(flag: &str) -> Result<SriovPoolSpec, SriovError> {
        let (name, pf) = flag
            .split_once('=')
            .filter(|(_, pf)| !pf.is_empty() && !pf.contains('/') && *pf != "." && *pf != "..")
            .ok_or_else(|| SriovError::BadPoolFlag(flag.to_owned()))?;
        if !is_pool_name(name) {
            return Err(SriovError::BadPoolName(name.to_owned()));
        }
        Ok(SriovPoolSpec {
            name: name.to_owned(),
            pf: pf.to_owned(),
        })
    }
}

/// A lowercase RFC 1123 label short enough to follow `sriov-` in a resource name.
fn is_pool_name(name: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            bytes.len() <= MAX_POOL_NAME
                && alnum(first)
                && alnum(last)
                && bytes.iter().all(|&b| alnum(b) || b == b'-')
        }
        _ => false,
    }
}

/// `DDDD:BB:DD.F` in lowercase or uppercase hex, the form sysfs names PCI functions by.
pub fn is_pci_address(s: &str) -> bool {
    const SHAPE: &[u8; 12] = b"hhhh:hh:hh.h";
    s.len() == SHAPE.len()
        && s.bytes().zip(SHAPE.iter()).all(|(b, &want)| match want {
            b'h' => b.is_ascii_hexdigit(),
            sep => b == sep,
        })
}

/// One VF as sysfs shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vf {
    pub pci: String,
    /// The bound driver (`iavf`, `mlx5_core`, `vfio-pci`, ...), if any.
    pub driver: Option<String>,
    /// The IOMMU group number, when the IOMMU is on.
    pub iommu_group: Option<String>,
}

/// The VFs of one PF under a sysfs root (`/sys`, or a test's fake tree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovPool {
    pub spec: SriovPoolSpec,
    pub sysfs_root: PathBuf,
}

impl SriovPool {
    /// `sriov-<pool>`: the resource name after `devices.ferrovirt.io/`.
    pub fn resource(&self) -> String {
        format!("{RESOURCE_PREFIX}{}", self.spec.name)
    }

    /// `PCIDEVICE_FERROVIRT_IO_SRIOV_<POOL>`, `-` in the pool name written as `_`.
    pub fn env_name(&self) -> String {
        let pool = self.spec.name.to_ascii_uppercase().replace('-', "_");
        format!("PCIDEVICE_FERROVIRT_IO_SRIOV_{pool}")
    }

    fn pci_devices(&self) -> PathBuf {
        self.sysfs_root.join("bus/pci/devices")
    }

    /// The PF's PCI address: the flag's value when it is one, else the device with a netdev
    /// of that name.
    pub fn pf_address(&self) -> Result<String, SriovError> {
        let devices = self.pci_devices();
        let pf = &self.spec.pf;
        let found = if is_pci_address(pf) {
            devices.join(pf).is_dir().then(|| pf.to_ascii_lowercase())
        } else {
            names_in(&devices)?.find(|dev| devices.join(dev).join("net").join(pf).exists())
        };
        found.ok_or_else(|| SriovError::NoPf {
            pool: self.spec.name.clone(),
            pf: pf.clone(),
            devices,
        })
    }

    /// The PF's VFs, lowest PCI address first.
    pub fn vfs(&self) -> Result<Vec<Vf>, SriovError> {
        let devices = self.pci_devices();
        let pf_dir = devices.join(self.pf_address()?);
        let mut vfs: Vec<Vf> = names_in(&pf_dir)?
            .filter(|name| {
                name.strip_prefix("virtfn")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            // A link's target names the VF; anything else there is not ours to follow.
            .filter_map(|link| link_target_name(&pf_dir.join(link)))
            .filter(|pci| is_pci_address(pci))
            .map(|pci| {
                let dir = devices.join(&pci);
                Vf {
                    driver: link_target_name(&dir.join("driver")),
                    iommu_group: link_target_name(&dir.join("iommu_group")),
                    pci,
                }
            })
            .collect();
        vfs.sort_by(|a, b| a.pci.cmp(&b.pci));
        Ok(vfs)
    }

    /// Every VF as a Healthy device: a VF that went away (fewer `sriov_numvfs`) is dropped
    /// from the list, which kubelet treats as removed.
    pub fn devices(&self) -> Result<Vec<api::Device>, SriovError> {
        Ok(self
            .vfs()?
            .into_iter()
            .map(|vf| api::Device {
                id: vf.pci,
                health: api::HEALTHY.to_owned(),
                topology: None,
            })
            .collect())
    }

    /// One container's VFs: their addresses in [`Self::env_name`], and the VFIO devices of
    /// those bound to vfio-pci.
    pub fn allocate(&self, ids: &[String]) -> Result<ContainerAllocateResponse, SriovError> {
        let vfs = self.vfs()?;
        let mut groups: Vec<&str> = Vec::new();
        for id in ids {
            let vf = vfs
                .iter()
                .find(|vf| &vf.pci == id)
                .ok_or_else(|| SriovError::UnknownVf {
                    id: id.clone(),
                    pool: self.spec.name.clone(),
                })?;
            if vf.driver.as_deref() == Some(VFIO_DRIVER) {
                let group = vf
                    .iommu_group
                    .as_deref()
                    .ok_or_else(|| SriovError::NoIommuGroup(vf.pci.clone()))?;
                if !groups.contains(&group) {
                    groups.push(group);
                }
            }
        }
        let mut response = ContainerAllocateResponse::default();
        response.envs.insert(self.env_name(), ids.join(","));
        if !groups.is_empty() {
            let vfio_paths = std::iter::once(DEV_VFIO.to_owned())
                .chain(groups.iter().map(|group| format!("/dev/vfio/{group}")));
            response.devices = vfio_paths
                .map(|path| DeviceSpec {
                    container_path: path.clone(),
                    host_path: path,
                    permissions: "rw".to_owned(),
                })
                .collect();
        }
        Ok(response)
    }
}

/// The names in `dir`, in no particular order.
fn names_in(dir: &Path) -> Result<impl Iterator<Item = String>, SriovError> {
    let read = std::fs::read_dir(dir).map_err(|e| SriovError::Read(dir.to_owned(), e))?;
    Ok(read
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok()))
}

/// The last component of where `link` points (a PCI address, a driver, a group number).
fn link_target_name(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    Some(target.file_name()?.to_str()?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovirt_tests::fake_sysfs::FakeSysfs;

    /// A pool named by `flag` on `sysfs`.
    fn pool(sysfs: &FakeSysfs, flag: &str) -> SriovPool {
        SriovPool {
            spec: flag.parse().unwrap(),
            sysfs_root: sysfs.root().to_owned(),
        }
    }

    /// A fake tree with PF `pf` (netdev `netdev`), VFs `vfs` (address, driver, IOMMU group)
    /// and another NIC, eth0, without VFs.
    fn fake_sysfs(pf: &str, netdev: &str, vfs: &[(&str, Option<&str>, Option<u32>)]) -> FakeSysfs {
        let sysfs = FakeSysfs::new("dp").unwrap();
        sysfs.add_pf(pf, netdev).unwrap();
        sysfs.add_pf("0000:00:03.0", "eth0").unwrap();
        for (index, (vf, driver, group)) in (0..).zip(vfs) {
            sysfs.add_vf(pf, index, vf, *driver, *group).unwrap();
        }
        sysfs
    }

    #[test]
    fn pool_flags_name_a_label_and_a_pf() {
        let spec: SriovPoolSpec = "fast-net=ens1f0".parse().unwrap();
        assert_eq!(spec.name, "fast-net");
        assert_eq!(spec.pf, "ens1f0");
        for bad in [
            "fast",
            "fast=",
            "=ens1f0",
            "Fast=ens1f0",
            "-a=x",
            "a-=x",
            "a_b=x",
            "a=../x",
            "a=..",
        ] {
            assert!(bad.parse::<SriovPoolSpec>().is_err(), "{bad}");
        }
        let longest = "a".repeat(57);
        assert!(format!("{longest}=x").parse::<SriovPoolSpec>().is_ok());
        assert!(format!("{longest}a=x").parse::<SriovPoolSpec>().is_err());
    }

    #[test]
    fn env_and_resource_names_follow_the_pool_name() {
        let pool = SriovPool {
            spec: "fast-net2=0000:3b:00.0".parse().unwrap(),
            sysfs_root: "/sys".into(),
        };
        assert_eq!(pool.resource(), "sriov-fast-net2");
        assert_eq!(pool.env_name(), "PCIDEVICE_FERROVIRT_IO_SRIOV_FAST_NET2");
    }

    #[test]
    fn pci_addresses_have_sysfs_shape() {
        assert!(is_pci_address("0000:3b:02.1"));
        assert!(is_pci_address("0000:AF:1f.7"));
        for bad in [
            "",
            "0000:3b:02",
            "0000:3b:02.10",
            "../../etc/pas",
            "000g:3b:02.1",
            "0000-3b:02.1",
        ] {
            assert!(!is_pci_address(bad), "{bad}");
        }
    }

    #[test]
    fn vfs_of_a_pf_are_found_by_netdev_or_address_lowest_first() {
        let sysfs = fake_sysfs(
            "0000:01:00.0",
            "enp1s0",
            &[
                ("0000:01:00.3", Some("iavf"), Some(41)),
                ("0000:01:00.1", Some("vfio-pci"), Some(40)),
                ("0000:01:00.2", None, None),
            ],
        );
        let by_name = pool(&sysfs, "p=enp1s0");
        assert_eq!(by_name.pf_address().unwrap(), "0000:01:00.0");
        let vfs = by_name.vfs().unwrap();
        assert_eq!(
            vfs,
            [
                Vf {
                    pci: "0000:01:00.1".into(),
                    driver: Some("vfio-pci".into()),
                    iommu_group: Some("40".into()),
                },
                Vf {
                    pci: "0000:01:00.2".into(),
                    driver: None,
                    iommu_group: None,
                },
                Vf {
                    pci: "0000:01:00.3".into(),
                    driver: Some("iavf".into()),
                    iommu_group: Some("41".into()),
                },
            ]
        );
        assert_eq!(pool(&sysfs, "p=0000:01:00.0").vfs().unwrap(), vfs);
        let devices = by_name.devices().unwrap();
        assert!(devices.iter().all(|d| d.health == api::HEALTHY));
        // A device without VFs is a pool of none; a missing PF is an error naming it.
        assert!(pool(&sysfs, "p=eth0").vfs().unwrap().is_empty());
        let err = pool(&sysfs, "p=ens9").vfs().expect_err("no such PF");
        assert!(err.to_string().contains("\"ens9\""), "{err}");
    }

    #[test]
    fn allocation_lists_addresses_and_vfio_devices_of_vfio_vfs() {
        let sysfs = fake_sysfs(
            "0000:02:00.0",
            "enp2s0",
            &[
                ("0000:02:00.1", Some("vfio-pci"), Some(7)),
                ("0000:02:00.2", Some("vfio-pci"), Some(8)),
                ("0000:02:00.3", Some("iavf"), Some(9)),
                ("0000:02:00.4", Some("vfio-pci"), None),
            ],
        );
        let pool = pool(&sysfs, "net-a=enp2s0");
        let netdev_only = pool.allocate(&["0000:02:00.3".into()]).unwrap();
        assert_eq!(
            netdev_only
                .envs
                .get("PCIDEVICE_FERROVIRT_IO_SRIOV_NET_A")
                .map(String::as_str),
            Some("0000:02:00.3")
        );
        assert!(netdev_only.devices.is_empty());
        let vfio = pool
            .allocate(&[
                "0000:02:00.2".into(),
                "0000:02:00.1".into(),
                "0000:02:00.3".into(),
            ])
            .unwrap();
        assert_eq!(
            vfio.envs
                .get("PCIDEVICE_FERROVIRT_IO_SRIOV_NET_A")
                .map(String::as_str),
            Some("0000:02:00.2,0000:02:00.1,0000:02:00.3")
        );
        let paths: Vec<_> = vfio.devices.iter().map(|d| d.host_path.as_str()).collect();
        assert_eq!(paths, ["/dev/vfio/vfio", "/dev/vfio/8", "/dev/vfio/7"]);
        assert!(
            vfio.devices
                .iter()
                .all(|d| d.permissions == "rw" && d.container_path == d.host_path)
        );
        assert!(matches!(
            pool.allocate(&["0000:02:00.4".into()]),
            Err(SriovError::NoIommuGroup(_))
        ));
        assert!(matches!(
            pool.allocate(&["0000:02:00.1".into(), "0000:02:00.9".into()]),
            Err(SriovError::UnknownVf { .. })
        ));
    }
}
