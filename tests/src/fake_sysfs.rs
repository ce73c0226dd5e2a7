//! A fake sysfs tree of SR-IOV PFs and VFs for code that takes a sysfs root (`--sysfs-root`):
//! `bus/pci/devices/<PF>/net/<netdev>`, the PF's `virtfnN` links, each VF's `physfn`, `driver`
//! and `iommu_group` links, shaped as the kernel makes them. Removed on `Drop`.

use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::process::{ProcessError, ScratchDir};

#[derive(Debug)]
pub struct FakeSysfs {
    dir: ScratchDir,
}

impl FakeSysfs {
    /// An empty tree in a fresh scratch directory.
    pub fn new(label: &str) -> Result<FakeSysfs, ProcessError> {
        Ok(FakeSysfs {
            dir: ScratchDir::new(&format!("sysfs-{label}"))?,
        })
    }

    /// The root to pass as the sysfs root.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    fn device(&self, pci: &str) -> PathBuf {
        self.dir.join("bus/pci/devices").join(pci)
    }

    /// A PCI function with a netdev (a PF bound to its net driver, or any NIC).
    pub fn add_pf(&self, pci: &str, netdev: &str) -> io::Result<()> {
        std::fs::create_dir_all(self.device(pci).join("net").join(netdev))
    }

    /// VF `index` of `pf` at `pci`, bound to `driver` when given, in IOMMU group
    /// `iommu_group` when given.
    pub fn add_vf(
        &self,
        pf: &str,
        index: u32,
        pci: &str,
        driver: Option<&str>,
        iommu_group: Option<u32>,
    ) -> io::Result<()> {
        let vf = self.device(pci);
        std::fs::create_dir_all(&vf)?;
        symlink(
            format!("../{pci}"),
            self.device(pf).join(format!("virtfn{index}")),
        )?;
        symlink(format!("../{pf}"), vf.join("physfn"))?;
        if let Some(driver) = driver {
            std::fs::create_dir_all(self.dir.join("bus/pci/drivers").join(driver))?;
            symlink(format!("../../drivers/{driver}"), vf.join("driver"))?;
        }
        if let Some(group) = iommu_group {
            std::fs::create_dir_all(self.dir.join("kernel/iommu_groups").join(group.to_string()))?;
            symlink(
                format!("../../../../kernel/iommu_groups/{group}"),
                vf.join("iommu_group"),
            )?;
        }
        Ok(())
    }

    /// A PF `pf` named `netdev` with `count` VFs bound to `driver`, at `<bus>:01.0`,
    /// `<bus>:01.1`, ... (`bus` is the PF's `DDDD:BB`); returns their addresses.
    pub fn add_pf_with_vfs(
        &self,
        pf: &str,
        netdev: &str,
        count: u32,
        driver: &str,
    ) -> io::Result<Vec<String>> {
        self.add_pf(pf, netdev)?;
        let bus = pf.get(..7).unwrap_or(pf);
        (0..count)
            .map(|i| {
                let pci = format!("{bus}:{:02x}.{}", 1 + i / 8, i % 8);
                self.add_vf(pf, i, &pci, Some(driver), None).map(|()| pci)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfs_link_to_their_pf_driver_and_group() {
        let sysfs = FakeSysfs::new("shape").unwrap();
        let vfs = sysfs
            .add_pf_with_vfs("0000:5e:00.0", "fakepf0", 9, "iavf")
            .unwrap();
        assert_eq!(vfs[0], "0000:5e:01.0");
        assert_eq!(vfs[8], "0000:5e:02.0");
        sysfs
            .add_vf(
                "0000:5e:00.0",
                9,
                "0000:5e:03.0",
                Some("vfio-pci"),
                Some(12),
            )
            .unwrap();
        let devices = sysfs.root().join("bus/pci/devices");
        let pf = devices.join("0000:5e:00.0");
        assert!(pf.join("net/fakepf0").is_dir());
        assert_eq!(
            std::fs::canonicalize(pf.join("virtfn9")).unwrap(),
            std::fs::canonicalize(devices.join("0000:5e:03.0")).unwrap()
        );
        let vf = devices.join("0000:5e:03.0");
        assert_eq!(
            std::fs::canonicalize(vf.join("physfn")).unwrap(),
            std::fs::canonicalize(&pf).unwrap()
        );
        assert!(vf.join("driver").is_dir() && vf.join("iommu_group").is_dir());
        let root = sysfs.root().to_owned();
        drop(sysfs);
        assert!(!root.exists());
    }
}
