//! The node agent `ferrovirt-agent` as tests run it: its device plugins serving the test
//! cluster's kubelet from `$FERROVIRT_K8S_DEVICE_PLUGIN_DIR`, stopped by pid on `Drop` (its
//! log printed when the test is failing).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::k8s::Cluster;
use crate::process::unix_socket_listening;
use crate::{GuardedProcess, ScratchDir, try_agent_binary};

pub struct AgentProcess {
    pub process: GuardedProcess,
    plugin_dir: PathBuf,
    _dir: ScratchDir,
}

impl AgentProcess {
    /// `ferrovirt-agent --device-plugin-dir <the cluster's> ARGS`.
    pub fn start(cluster: &Cluster, args: &[&str]) -> Result<AgentProcess, String> {
        let binary = try_agent_binary().map_err(|e| e.to_string())?;
        let dir = ScratchDir::new("agent").map_err(|e| e.to_string())?;
        let mut cmd = Command::new(binary);
        cmd.arg("--device-plugin-dir")
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
