//! `ferrovirt-agent`'s device-plugin flags, and the agent's `main` until the rest of the
//! agent joins it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser};

use super::{DevicePluginConfig, SriovPoolSpec};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the SIGTERM/SIGINT handler")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    DevicePlugin(#[from] super::Error),
}

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

/// ferrovirt's node agent: advertises devices.ferrovirt.io/kvm and SR-IOV VF pools to kubelet
/// through the device-plugin API (v1beta1) and grants them to containers; it registers again
/// whenever kubelet restarts.
///
/// Exit status: 0 after SIGTERM/SIGINT (its sockets removed), 1 on an error (message on
/// stderr), 2 on bad flags.
#[derive(Debug, Parser)]
#[command(name = "ferrovirt-agent", version)]
pub struct AgentCli {
    #[command(flatten)]
    pub device_plugin: DevicePluginFlags,
}

/// Runs the device plugins until SIGTERM/SIGINT; maps the outcome to the exit status.
pub fn main(cli: AgentCli) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain of causes, once.
            eprintln!("ferrovirt-agent: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: AgentCli) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(async {
        let stopped = crate::run::stop_on_signals().map_err(CliError::Signal)?;
        super::run(cli.device_plugin.into(), stopped).await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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
