//! `ferrovirt-agent`'s device-plugin flags.

use std::path::PathBuf;

use clap::Args;

use super::{DevicePluginConfig, SriovPoolSpec};

/// The device-plugin part of `ferrovirt-agent`'s flags.
#[derive(Debug, Clone, Args)]
pub struct DevicePluginFlags {
    /// kubelet's device-plugin directory: kubelet.sock is there, and the agent puts one socket
    /// per resource next to it (ferrovirt-kvm.sock, ferrovirt-sriov-NAME.sock).
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins")]
    pub device_plugin_dir: PathBuf,
    /// How many pods may hold /dev/kvm at once: the node advertises this many
    /// devices.ferrovirt.io/kvm (0: none).
    #[arg(long, default_value_t = 110)]
    pub kvm_devices: u32,
    /// An SR-IOV pool: the VFs of PF (its netdev name or PCI address) advertised as
    /// devices.ferrovirt.io/sriov-NAME; a container gets their PCI addresses in
    /// PCIDEVICE_FERROVIRT_IO_SRIOV_NAME (uppercase, '-' as '_'). Repeat for more pools.
    #[arg(long = "sriov-pool", value_name = "NAME=PF")]
    pub sriov_pools: Vec<SriovPoolSpec>,
    /// Where sysfs is (VFs are found under bus/pci/devices); tests point it at a fake tree.
    #[arg(long, default_value = "/sys")]
    pub sysfs_root: PathBuf,
}

impl From<DevicePluginFlags> for DevicePluginConfig {
    fn from(flags: DevicePluginFlags) -> DevicePluginConfig {
        DevicePluginConfig {
            dir: flags.device_plugin_dir,
            kvm_devices: flags.kvm_devices,
            sriov_pools: flags.sriov_pools,
            sysfs_root: flags.sysfs_root,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct AgentCli {
        #[command(flatten)]
        device_plugin: DevicePluginFlags,
    }

    #[test]
    fn flags_have_the_documented_defaults_and_repeat_pools() {
        AgentCli::command().debug_assert();
        let cli = AgentCli::try_parse_from(["ferrovirt-agent"]).unwrap();
        let config = DevicePluginConfig::from(cli.device_plugin);
        assert_eq!(config.dir, PathBuf::from("/var/lib/kubelet/device-plugins"));
        assert_eq!(config.kvm_devices, 110);
        assert_eq!(config.sysfs_root, PathBuf::from("/sys"));
        assert!(config.sriov_pools.is_empty());
        let cli = AgentCli::try_parse_from([
            "ferrovirt-agent",
            "--sriov-pool",
            "a=ens1f0",
            "--sriov-pool=b=0000:3b:00.0",
            "--kvm-devices",
            "0",
        ])
        .unwrap();
        let names: Vec<_> = cli
            .device_plugin
            .sriov_pools
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        let err = AgentCli::try_parse_from(["ferrovirt-agent", "--sriov-pool", "Bad=x"])
            .expect_err("uppercase pool name");
        assert!(err.to_string().contains("lowercase"), "{err}");
    }
}
