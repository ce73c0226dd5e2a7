//! `ferrovirt-agent`: the per-node agent (a DaemonSet): runs the VMIs the cluster schedules on
//! its node, with their vhost-user backends, in their launcher pods.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferrovirt_controller::agent::{self, AgentConfig};
use ferrovirt_controller::launcher::VMIS_HOST_DIR;
use ferrovirt_controller::node::process::Binaries;

/// ferrovirt-agent: the node side of ferrovirt. For each launcher pod on this node it starts
/// the VMI's ferrovirt-vhost-blk and ferrovirt-vhost-net backends in the pod's cgroups, boots
/// the VM in the pod's VMM and reports the VMI Running; it removes them when the pod ends.
/// Restarting it adopts running VMs.
#[derive(Debug, Parser)]
#[command(name = "ferrovirt-agent", version)]
struct Args {
    /// This node's name, as the kubelet registered it.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Kubeconfig file (default: in-cluster configuration, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Where ferrovirt-vhost-blk and ferrovirt-vhost-net are (default: next to this program,
    /// then PATH).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// ferrovirt-cni's stateDir, whose records name each launcher pod's TAPs.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cni/ferrovirt")]
    cni_state_dir: PathBuf,
}

fn main() -> ExitCode {
    let level = std::env::var("FERROVIRT_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::level_filters::LevelFilter>().ok())
        .unwrap_or(tracing::level_filters::LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrovirt-agent: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovirt-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let bin = Binaries::find(args.bin_dir.as_deref()).map_err(|e| e.to_string())?;
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no cluster configuration (pass --kubeconfig): {e}"))?,
    };
    let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
    let cfg = AgentConfig {
        node: args.node_name,
        bin,
        cni_state_dir: args.cni_state_dir,
        vmis_dir: PathBuf::from(VMIS_HOST_DIR),
    };
    tracing::info!(node = %cfg.node, "ferrovirt-agent starting");
    agent::run(client, cfg, async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
    .await;
    Ok(())
}
