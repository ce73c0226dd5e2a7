//! The node agent `ferrovirt-agent` as tests run it: node `localhost` of the test cluster, its
//! device plugins serving the kubelet from `$FERROVIRT_K8S_DEVICE_PLUGIN_DIR`, the release
//! backends; stopped by pid on `Drop` (SIGTERM: its VMs keep running; its log printed when the
//! test is failing).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::k8s::{Cluster, ServiceAccountKubeconfig};
use crate::process::unix_socket_listening;
use crate::{
    GuardedProcess, ScratchDir, try_agent_binary, try_vhost_blk_binary, try_vhost_net_binary,
};

pub struct AgentProcess {
    pub process: GuardedProcess,
    plugin_dir: PathBuf,
    _dir: ScratchDir,
    _kubeconfig: Option<ServiceAccountKubeconfig>,
}

impl AgentProcess {
    /// `ferrovirt-agent --node-name localhost --device-plugin-dir <the cluster's> ARGS` with
    /// the admin kubeconfig.
    pub fn start(cluster: &Cluster, args: &[&str]) -> Result<AgentProcess, String> {
        AgentProcess::start_as(cluster, None, args)
    }

    /// The same under the agent's own ServiceAccount `ferrovirt/ferrovirt-agent` (deploy/'s
    /// RBAC must be installed).
    pub fn start_as_service_account(
        cluster: &Cluster,
        args: &[&str],
    ) -> Result<AgentProcess, String> {
        let kubeconfig = cluster
            .service_account_kubeconfig("ferrovirt", "ferrovirt-agent")
            .map_err(|e| e.to_string())?;
        AgentProcess::start_as(cluster, Some(kubeconfig), args)
    }

    fn start_as(
        cluster: &Cluster,
        kubeconfig: Option<ServiceAccountKubeconfig>,
        args: &[&str],
    ) -> Result<AgentProcess, String> {
        let binary = try_agent_binary().map_err(|e| e.to_string())?;
        try_vhost_net_binary().map_err(|e| e.to_string())?;
        let backends = try_vhost_blk_binary().map_err(|e| e.to_string())?;
        let dir = ScratchDir::new("agent").map_err(|e| e.to_string())?;
        let mut cmd = Command::new(binary);
        cmd.env(
            "KUBECONFIG",
            kubeconfig
                .as_ref()
                .map_or(cluster.kubeconfig(), |k| k.path()),
        )
        .args(["--node-name", "localhost", "--bin-dir"])
        .arg(backends.parent().unwrap_or(&backends))
        .arg("--device-plugin-dir")
        .arg(cluster.device_plugin_dir())
        .args(args);
        let mut process = GuardedProcess::spawn(cmd, &dir.join("stdout"), &dir.join("stderr"))
            .map_err(|e| e.to_string())?;
        // It removes its sockets on SIGTERM; give it the time to.
        process.set_grace(Duration::from_secs(5));
        Ok(AgentProcess {
            process,
            plugin_dir: cluster.device_plugin_dir().to_owned(),
            _dir: dir,
            _kubeconfig: kubeconfig,
        })
    }

    /// The socket of resource `devices.ferrovirt.io/<suffix>`.
    pub fn socket(&self, suffix: &str) -> PathBuf {
        self.plugin_dir.join(format!("ferrovirt-{suffix}.sock"))
    }

    /// Whether the agent listens on the socket of `devices.ferrovirt.io/<suffix>`.
    pub fn serves(&self, suffix: &str) -> bool {
        unix_socket_listening(&self.socket(suffix))
    }

    /// Whether the agent has not exited (yet).
    pub fn process_is_running(&mut self) -> bool {
        matches!(self.process.try_exit(), Ok(None))
    }

    /// Its log so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("ferrovirt-agent stderr:\n{}", self.stderr());
        }
    }
}
