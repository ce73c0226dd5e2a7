//! Finding a VF in sysfs: its PF (`physfn`), its index (the PF's `virtfnN` link to it), its
//! driver and its netdev. The root is `/sys`, or a fake tree named by
//! [`SYSFS_ROOT_ENV`] in tests.

use std::path::{Path, PathBuf};

/// Names a fake sysfs root (with `bus/pci/devices/...`); for tests only. It also selects the
/// recording PF control (see [`super::pf`]).
pub const SYSFS_ROOT_ENV: &str = "FERROVIRT_CNI_SYSFS_ROOT";

/// The driver a VF is bound to for passthrough to a VM.
pub const VFIO_DRIVER: &str = "vfio-pci";

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("deviceID {0:?} is not a PCI address; write DOMAIN:BUS:DEVICE.FUNCTION (0000:3b:02.1)")]
    BadAddress(String),
    #[error(
        "PCI device {0} does not exist ({1} is missing); is deviceID right and the VF created (sriov_numvfs)?"
    )]
    Missing(String, PathBuf),
    #[error("PCI device {0} is not an SR-IOV VF: it has no physfn link")]
    NotAVf(String),
    #[error("VF {vf} is not listed among the virtfn* links of its PF {pf}")]
    NoIndex { vf: String, pf: String },
    #[error("the PF {0} of the VF has no network interface; bind the PF to its net driver")]
    PfWithoutNetdev(String),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
}

/// Where a VF sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfLocation {
    pub pci: String,
    pub pf_pci: String,
    pub pf_netdev: String,
    pub index: u32,
    pub driver: Option<String>,
    /// The VF's netdev in our namespace, when a net driver has it.
    pub netdev: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
    fake: bool,
}

impl Sysfs {
    /// `/sys`, or the fake root of [`SYSFS_ROOT_ENV`].
    pub fn from_env() -> Sysfs {
        match std::env::var_os(SYSFS_ROOT_ENV).filter(|v| !v.is_empty()) {
            Some(root) => Sysfs {
                root: PathBuf::from(root),
                fake: true,
            },
            None => Sysfs {
                root: PathBuf::from("/sys"),
                fake: false,
            },
        }
    }

    /// Whether this is a test's fake tree.
    pub fn is_fake(&self) -> bool {
        self.fake
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn devices(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    /// Finds the VF with PCI address `pci`.
    pub fn vf(&self, pci: &str) -> Result<VfLocation, SysfsError> {
        check_pci_address(pci)?;
        let dir = self.devices().join(pci);
        if !dir.exists() {
            return Err(SysfsError::Missing(pci.to_owned(), dir));
        }
        let pf_pci = link_target_name(&dir.join("physfn"))
            .ok_or_else(|| SysfsError::NotAVf(pci.to_owned()))?;
        let pf_dir = self.devices().join(&pf_pci);
        let index = read_dir_names(&pf_dir)?
            .into_iter()
            .filter_map(|name| {
                let n: u32 = name.strip_prefix("virtfn")?.parse().ok()?;
                (link_target_name(&pf_dir.join(&name)).as_deref() == Some(pci)).then_some(n)
            })
            .next()
            .ok_or_else(|| SysfsError::NoIndex {
                vf: pci.to_owned(),
                pf: pf_pci.clone(),
            })?;
        let pf_netdev =
            first_netdev(&pf_dir)?.ok_or_else(|| SysfsError::PfWithoutNetdev(pf_pci.clone()))?;
        Ok(VfLocation {
            pci: pci.to_owned(),
            pf_pci,
            pf_netdev,
            index,
            driver: link_target_name(&dir.join("driver")),
            netdev: first_netdev(&dir)?,
        })
    }

    /// The VF's driver now (CHECK uses it).
    pub fn driver(&self, pci: &str) -> Option<String> {
        check_pci_address(pci).ok()?;
        link_target_name(&self.devices().join(pci).join("driver"))
    }

    /// The VF's netdev in our namespace now (the real tree only; a fake one does not follow
    /// moves).
    pub fn netdev(&self, pci: &str) -> Option<String> {
        check_pci_address(pci).ok()?;
        first_netdev(&self.devices().join(pci)).ok().flatten()
    }
}

/// `DDDD:BB:DD.F` in hex: checked before it becomes part of a path.
pub fn check_pci_address(pci: &str) -> Result<(), SysfsError> {
    let bad = || SysfsError::BadAddress(pci.to_owned());
    let (domain, rest) = pci.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (device, function) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if hex(domain, 4) && hex(bus, 2) && hex(device, 2) && hex(function, 1) {
        Ok(())
    } else {
        Err(bad())
    }
}

fn link_target_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, SysfsError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SysfsError::Read(dir.to_owned(), e))?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn first_netdev(device: &Path) -> Result<Option<String>, SysfsError> {
    let net = device.join("net");
    if !net.is_dir() {
        return Ok(None);
    }
    Ok(read_dir_names(&net)?.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_checked_before_use_in_paths() {
        check_pci_address("0000:3b:02.1").unwrap();
        for bad in [
            "",
            "0000:3b:02",
            "../../etc",
            "0000:3b:02.1/..",
            "000g:3b:02.1",
        ] {
            assert!(check_pci_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_vf_is_found_with_its_pf_index_driver_and_netdev() {
        let root = std::env::temp_dir().join(format!("fv-sysfs-{}", std::process::id()));
        let devices = root.join("bus/pci/devices");
        let pf = devices.join("0000:01:00.0");
        let vf = devices.join("0000:01:00.3");
        std::fs::create_dir_all(pf.join("net/enp1s0")).unwrap();
        std::fs::create_dir_all(vf.join("net/enp1s0v2")).unwrap();
        std::fs::create_dir_all(root.join("bus/pci/drivers/iavf")).unwrap();
        std::os::unix::fs::symlink("../0000:01:00.3", pf.join("virtfn2")).unwrap();
        std::os::unix::fs::symlink("../0000:01:00.0", vf.join("physfn")).unwrap();
        std::os::unix::fs::symlink("../../drivers/iavf", vf.join("driver")).unwrap();
        let sysfs = Sysfs {
            root: root.clone(),
            fake: true,
        };
        let loc = sysfs.vf("0000:01:00.3").unwrap();
        assert_eq!(loc.pf_pci, "0000:01:00.0");
        assert_eq!(loc.pf_netdev, "enp1s0");
        assert_eq!(loc.index, 2);
        assert_eq!(loc.driver.as_deref(), Some("iavf"));
        assert_eq!(loc.netdev.as_deref(), Some("enp1s0v2"));
        assert!(matches!(
            sysfs.vf("0000:01:00.0"),
            Err(SysfsError::NotAVf(_))
        ));
        assert!(matches!(
            sysfs.vf("0000:01:00.7"),
            Err(SysfsError::Missing(..))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
