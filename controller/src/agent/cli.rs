//! `ferrovirt-agent`'s flags and `main`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use super::device_plugin::{self, cli::DevicePluginFlags};
use super::{AgentConfig, run as run_agent};
use crate::launcher::VMIS_HOST_DIR;
use crate::node::process::{self, Binaries};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the SIGTERM/SIGINT handler")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Binaries(#[from] process::Error),
    #[error("cannot read kubeconfig {0}: {1}")]
    Kubeconfig(PathBuf, String),
    #[error("no cluster configuration (pass --kubeconfig or run in a pod): {0}")]
    Infer(String),
    #[error("cannot make an API client: {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    DevicePlugin(#[from] device_plugin::Error),
}

/// ferrovirt-agent: the node side of ferrovirt (a DaemonSet). It advertises
/// devices.ferrovirt.io/kvm and SR-IOV VF pools to kubelet through the device-plugin API
/// (v1beta1), registering again whenever kubelet restarts. For each launcher pod on its node it
/// starts the VMI's ferrovirt-vhost-blk and ferrovirt-vhost-net backends in the pod's cgroups,
/// boots the VM in the pod's VMM and reports the VMI Running; it removes them when the pod
/// ends. Restarting it adopts running VMs.
///
/// Exit status: 0 after SIGTERM/SIGINT (its sockets removed; VMs keep running), 1 on an error
/// (message on stderr), 2 on bad flags.
#[derive(Debug, Parser)]
#[command(name = "ferrovirt-agent", version)]
pub struct AgentCli {
    /// This node's name, as the kubelet registered it.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig file (default: in-cluster configuration, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Where ferrovirt-vhost-blk and ferrovirt-vhost-net are (default: next to this program,
    /// then PATH).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// ferrovirt-cni's stateDir, whose records name each launcher pod's TAPs.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cni/ferrovirt")]
    pub cni_state_dir: PathBuf,
    #[command(flatten)]
    pub device_plugin: DevicePluginFlags,
}

/// Runs the agent until SIGTERM/SIGINT; maps the outcome to the exit status.
pub fn main(cli: AgentCli) -> ExitCode {
    // FERROVIRT_LOG (error, warn, info, debug, trace) sets the level; info by default.
    let level = std::env::var("FERROVIRT_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::level_filters::LevelFilter>().ok())
        .unwrap_or(tracing::level_filters::LevelFilter::INFO);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
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

async fn client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client, CliError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |e: String| CliError::Kubeconfig(path.clone(), e);
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| fail(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| CliError::Infer(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(CliError::Client)
}

fn run(cli: AgentCli) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(async {
        let stopped = crate::run::stop_on_signals().map_err(CliError::Signal)?;
        let bin = Binaries::find(cli.bin_dir.as_deref())?;
        let client = client(cli.kubeconfig.as_ref()).await?;
        let plugins = tokio::spawn(device_plugin::run(
            cli.device_plugin.into(),
            stopped.clone(),
        ));
        let cfg = AgentConfig {
            node: cli.node_name,
            bin,
            cni_state_dir: cli.cni_state_dir,
            vmis_dir: PathBuf::from(VMIS_HOST_DIR),
        };
        tracing::info!(node = %cfg.node, "ferrovirt-agent starting");
        let mut stop = stopped;
        run_agent(client, cfg, async move {
            while !*stop.borrow_and_update() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        match plugins.await {
            Ok(result) => result.map_err(CliError::from),
            Err(e) => {
                tracing::warn!("the device plugins' task ended abnormally: {e}");
                Ok(())
            }
        }
    })
}
