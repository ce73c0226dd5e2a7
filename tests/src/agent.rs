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

/// ferrovirt-agent as `deploy/agent.yaml` runs it: a DaemonSet pod on the test node, from the
/// agent image ([`crate::ferrovirt_k8s::FERROVIRT_AGENT_IMAGE`]), with two test settings: the
/// harness kubelet's device-plugin directory, and the API server on loopback (the harness
/// has no kube-proxy for the in-cluster service address). Deleted on `Drop` (its VMs keep
/// running; the agent's log printed when the test is failing).
pub struct AgentPod {
    cluster: Cluster,
}

/// The agent's program in its image; its processes are found by it.
const AGENT_IN_IMAGE: &str = "/usr/bin/ferrovirt-agent";
const AGENT_NAMESPACE: &str = "ferrovirt";

impl AgentPod {
    /// Applies the DaemonSet and waits until the agent serves the kvm device plugin.
    pub fn start(cluster: &Cluster) -> Result<AgentPod, String> {
        AgentPod::start_with_cni_state(cluster, None)
    }

    /// The same with ferrovirt-cni's state in `cni_state_dir` of the host (mounted at the same
    /// path) instead of the default.
    pub fn start_with_cni_state(
        cluster: &Cluster,
        cni_state_dir: Option<&std::path::Path>,
    ) -> Result<AgentPod, String> {
        crate::ferrovirt_k8s::load_agent_image(cluster)?;
        let path = crate::repo_root().join("deploy/agent.yaml");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path:?}: {e}"))?;
        let mut ds: serde_json::Value =
            serde_yaml::from_str(&text).map_err(|e| format!("{path:?}: {e}"))?;
        let spec = &mut ds["spec"]["template"]["spec"];
        let container = &mut spec["containers"][0];
        container["image"] = crate::ferrovirt_k8s::FERROVIRT_AGENT_IMAGE.into();
        container["imagePullPolicy"] = "Never".into();
        let port = apiserver_port(cluster)?;
        if let Some(env) = container["env"].as_array_mut() {
            env.push(serde_json::json!({"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}));
            env.push(serde_json::json!({"name": "KUBERNETES_SERVICE_PORT", "value": port}));
            env.push(serde_json::json!({"name": "FERROVIRT_LOG", "value": "info"}));
        }
        if let Some(dir) = cni_state_dir {
            let dir = dir.display().to_string();
            container["args"] = serde_json::json!(["--cni-state-dir", dir]);
            for mount in container["volumeMounts"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if mount["name"] == "cni-state" {
                    mount["mountPath"] = dir.clone().into();
                }
            }
            for volume in spec["volumes"].as_array_mut().into_iter().flatten() {
                if volume["name"] == "cni-state" {
                    volume["hostPath"]["path"] = dir.clone().into();
                }
            }
        }
        for volume in spec["volumes"].as_array_mut().into_iter().flatten() {
            if volume["name"] == "device-plugins" {
                volume["hostPath"]["path"] =
                    cluster.device_plugin_dir().display().to_string().into();
            }
        }
        cluster
            .kubectl_stdin(&["apply", "-f", "-"], &ds.to_string())
            .map_err(|e| e.to_string())?;
        let pod = AgentPod {
            cluster: cluster.clone(),
        };
        let socket = cluster.device_plugin_dir().join("ferrovirt-kvm.sock");
        crate::k8s::wait_for(
            "the agent pod to serve its device plugin",
            Duration::from_secs(120),
            || {
                // Connect: /proc/net/unix shows the path the agent bound in its container.
                if pod.pid().is_some() && std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    Ok(())
                } else {
                    Err(pod.logs())
                }
            },
        )
        .map_err(|e| e.to_string())?;
        Ok(pod)
    }

    /// The host pid of the running agent, if one runs.
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).next() == Some(AGENT_IN_IMAGE.as_bytes()))
            })
    }

    /// SIGKILLs the agent (no chance to tidy up); the kubelet starts its container again.
    /// The pid killed.
    pub fn kill(&self) -> Result<i32, String> {
        let pid = self.pid().ok_or("no agent runs")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| e.to_string())?;
        Ok(pid)
    }

    /// Waits until an agent other than `old` runs (the restarted container).
    pub fn wait_restarted(&self, old: i32) -> Result<i32, String> {
        crate::k8s::wait_for(
            "the agent's container to start again",
            Duration::from_secs(120),
            || match self.pid() {
                Some(pid) if pid != old => Ok(pid),
                _ => Err(self.logs()),
            },
        )
        .map_err(|e| e.to_string())
    }

    /// The agent's log (the current container's, and the one before a restart).
    pub fn logs(&self) -> String {
        let logs = |previous: &str| {
            self.cluster
                .kubectl(&[
                    "logs",
                    "-n",
                    AGENT_NAMESPACE,
                    "daemonset/ferrovirt-agent",
                    previous,
                    "--tail=300",
                ])
                .unwrap_or_default()
        };
        format!(
            "{}\n--- current container ---\n{}",
            logs("--previous=true"),
            logs("--previous=false")
        )
    }
}

/// The API server's port, from the admin kubeconfig's `server: https://127.0.0.1:PORT`.
fn apiserver_port(cluster: &Cluster) -> Result<String, String> {
    let text = std::fs::read_to_string(cluster.kubeconfig()).map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: https://127.0.0.1:"))
        .map(|p| p.trim().to_owned())
        .ok_or_else(|| "the kubeconfig names no server on 127.0.0.1".to_owned())
}

impl Drop for AgentPod {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("ferrovirt-agent pod log:\n{}", self.logs());
        }
        let _ = self.cluster.kubectl(&[
            "delete",
            "daemonset",
            "-n",
            AGENT_NAMESPACE,
            "ferrovirt-agent",
            "--cascade=foreground",
            "--wait=true",
            "--timeout=60s",
        ]);
        let _ = crate::k8s::wait_for("the agent to stop", Duration::from_secs(60), || {
            self.pid().map_or(Ok(()), |pid| Err(format!("pid {pid}")))
        });
    }
}
