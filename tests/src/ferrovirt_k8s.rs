//! ferrovirt on the test Kubernetes, for the controller's tests and the `control-plane` bench:
//! its CRDs and RBAC installed, the node advertising `/dev/kvm` slots as the agent's device
//! plugin will, a stand-in launcher image, and a controller process under its own
//! ServiceAccount that releases its VMs' finalizers before it stops.
//!
//! Until the node issue's launcher exists, launcher pods run a busybox stand-in whose behaviour
//! follows the VMI's name: `*fail*` exits 3 after 2 s, `*done*` exits 0 after 2 s, anything else
//! runs until SIGTERM and echoes console input as `console: LINE`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::k8s::{Cluster, K8sError, Namespace, OciImage, ServiceAccountKubeconfig};
use crate::{
    GuardedProcess, ScratchDir, repo_root, try_agent_binary, try_container_disk_binary,
    try_controller_binary, try_testguest, try_vhost_blk_binary, try_vhost_net_binary,
    try_vmm_binary,
};

/// The stand-in launcher image.
pub const LAUNCHER_IMAGE: &str = "ferrovirt.io/test-launcher:test";
const LAUNCHER_SCRIPT: &str = r#"case "$FERROVIRT_VMI_NAME" in
  *fail*) sleep 2; exit 3;;
  *done*) sleep 2; exit 0;;
esac
trap 'exit 0' TERM INT
while true; do
  if read -t 1 line; then echo "console: $line"; fi
done"#;
/// The CRDs' names.
pub const CRDS: [&str; 4] = [
    "virtualmachines",
    "virtualmachineinstances",
    "virtualmachineinstancepresets",
    "virtualmachineinstancemigrations",
];

/// Installs ferrovirt's cluster side once per process (`deploy/`: CRDs, namespace, RBAC), makes
/// the node advertise 110 `devices.ferrovirt.io/kvm` and loads the stand-in launcher image.
pub fn install(cluster: &Cluster) -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        install_once(cluster)
            .map_err(|e| format!("cannot install ferrovirt's CRDs, RBAC and launcher image: {e}"))
    })
    .clone()
}

fn install_once(cluster: &Cluster) -> Result<(), K8sError> {
    let deploy = repo_root().join("deploy");
    for file in [
        "crds",
        "namespace.yaml",
        "rbac-controller.yaml",
        "rbac-agent.yaml",
    ] {
        let path = deploy.join(file).display().to_string();
        cluster.kubectl(&["apply", "--server-side", "-f", &path])?;
    }
    for crd in CRDS {
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}.ferrovirt.io"),
        ])?;
    }
    cluster.kubectl(&[
        "patch",
        "node",
        "localhost",
        "--subresource=status",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/status/capacity/devices.ferrovirt.io~1kvm","value":"110"}]"#,
    ])?;
    let busybox = Path::new("/bin/busybox");
    let image = OciImage::new(LAUNCHER_IMAGE)
        .file(busybox, "/bin/busybox")
        .file(busybox, "/bin/sh")
        .file(busybox, "/bin/sleep")
        .dir("/tmp", 0o1777)
        .entrypoint(&["/bin/sh", "-c", LAUNCHER_SCRIPT]);
    cluster.load_image(&image)
}

/// The real launcher image: ferrovirt-vmm (with the C libraries it links) waiting on its API
/// socket in the VMI's directory, and the test guest as /usr/share/ferrovirt/testguest.
pub const FERROVIRT_LAUNCHER_IMAGE: &str = "ferrovirt.io/launcher:test";

/// Builds [`FERROVIRT_LAUNCHER_IMAGE`] from the release VMM and loads it, once per process.
pub fn load_launcher_image(cluster: &Cluster) -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let vmm = try_vmm_binary().map_err(|e| e.to_string())?;
        let guest = try_testguest().map_err(|e| e.to_string())?;
        let container_disk = try_container_disk_binary().map_err(|e| e.to_string())?;
        let mut image = OciImage::new(FERROVIRT_LAUNCHER_IMAGE)
            .file(&vmm, "/usr/bin/ferrovirt-vmm")
            .file(&container_disk, "/usr/bin/ferrovirt-container-disk")
            .file(&guest, "/usr/share/ferrovirt/testguest")
            .dir("/tmp", 0o1777)
            .dir("/var/run/ferrovirt/vmi", 0o755)
            .entrypoint(&[
                "/usr/bin/ferrovirt-vmm",
                "--api-socket",
                "/var/run/ferrovirt/vmi/vmm.sock",
            ]);
        image = with_libraries(image, shared_libraries(&vmm)?)?;
        cluster
            .load_image(&image)
            .map_err(|e| format!("cannot load the launcher image: {e}"))
    })
    .clone()
}

/// A VM network for RuntimeClass `ferrovirt` pods: ferrovirt-cni in vhost-user mode (linked
/// into containerd's plugin directory) as their second conflist, host-local addresses from
/// 10.250.0.10 to `range_end`, TAPs joined to network 7 of an eBPF switch of its own (in a
/// bpffs directory of its own; ferrovirt-cni loads the switch and creates the network on the
/// first attachment). Removed on drop, after the namespace (declare it first).
pub struct VmNetwork {
    state: ScratchDir,
    pins: crate::BpfPinDir,
    conflist: PathBuf,
    plugin: PathBuf,
}

impl VmNetwork {
    pub fn create(cluster: &Cluster, range_end: &str) -> Result<VmNetwork, String> {
        let cni = crate::try_cni_binary().map_err(|e| e.to_string())?;
        let plugin = cluster.cni_bin_dir().join("ferrovirt-cni");
        let _ = std::fs::remove_file(&plugin);
        std::os::unix::fs::symlink(&cni, &plugin).map_err(|e| format!("{plugin:?}: {e}"))?;
        let pins = crate::BpfPinDir::create("fvnode").map_err(|e| e.to_string())?;
        let state = ScratchDir::new("vmnet").map_err(|e| e.to_string())?;
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("vmnet-{}", crate::unique_name("")),
            "plugins": [{
                "type": "ferrovirt-cni",
                "mode": "vhost-user",
                "networkId": 7,
                "bpfPinDir": pins.path(),
                "stateDir": state.join("cni"),
                "socketDir": state.join("sockets"),
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.250.0.0/24", "rangeStart": "10.250.0.10", "rangeEnd": range_end}]],
                    "dataDir": state.join("ipam"),
                },
            }],
        });
        let conflist = cluster.vm_cni_dir().join("20-vmnet.conflist");
        let staged = conflist.with_extension("tmp");
        std::fs::write(&staged, conf.to_string()).map_err(|e| format!("{staged:?}: {e}"))?;
        std::fs::rename(&staged, &conflist).map_err(|e| format!("{conflist:?}: {e}"))?;
        // containerd notices the new conflist through inotify.
        std::thread::sleep(Duration::from_secs(2));
        Ok(VmNetwork {
            state,
            pins,
            conflist,
            plugin,
        })
    }

    /// The names pinned under the switch's `links/` (`<hook>:<ifindex>:<ifname>`).
    pub fn link_pins(&self) -> Vec<String> {
        std::fs::read_dir(self.pins.path().join("links"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// ferrovirt-cni's state directory (the agent reads its records).
    pub fn cni_state_dir(&self) -> PathBuf {
        self.state.join("cni")
    }

    /// How many attachments ferrovirt-cni records (one per pod it ran ADD for and not yet DEL).
    pub fn cni_records(&self) -> usize {
        std::fs::read_dir(self.cni_state_dir())
            .map(|d| {
                d.flatten()
                    .flat_map(|n| std::fs::read_dir(n.path()).into_iter().flatten().flatten())
                    .filter(|f| f.path().extension().is_some_and(|e| e == "json"))
                    .count()
            })
            .unwrap_or(0)
    }
}

/// How long dropping a [`VmNetwork`] waits for containerd's CNI DELs of pods still going away.
const VM_NETWORK_DEL_WAIT: Duration = Duration::from_secs(60);

impl Drop for VmNetwork {
    /// Waits (bounded) until ferrovirt-cni has no attachment left before removing its conflist
    /// and plugin: containerd runs a deleted sandbox's CNI DEL after the pod object is gone, and
    /// a DEL that cannot find the plugin would leave the pod's TAP behind.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + VM_NETWORK_DEL_WAIT;
        while self.cni_records() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let left = self.cni_records();
        if left > 0 {
            eprintln!(
                "k8s: {left} ferrovirt-cni attachments still recorded after {}s; their TAPs may stay",
                VM_NETWORK_DEL_WAIT.as_secs()
            );
        }
        let _ = std::fs::remove_file(&self.conflist);
        let _ = std::fs::remove_file(&self.plugin);
    }
}

/// The agent's image: `ferrovirt-agent`, `ferrovirt-vhost-blk` and `ferrovirt-vhost-net` from
/// the release build in `/usr/bin` with their C libraries, entrypoint the agent (deploy/'s
/// README gives the same build for a registry).
pub const FERROVIRT_AGENT_IMAGE: &str = "ferrovirt.io/agent:test";

/// Builds [`FERROVIRT_AGENT_IMAGE`] and loads it, once per process.
pub fn load_agent_image(cluster: &Cluster) -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let binaries = [
            try_agent_binary().map_err(|e| e.to_string())?,
            try_vhost_blk_binary().map_err(|e| e.to_string())?,
            try_vhost_net_binary().map_err(|e| e.to_string())?,
        ];
        let mut image = OciImage::new(FERROVIRT_AGENT_IMAGE)
            .dir("/tmp", 0o1777)
            .entrypoint(&["/usr/bin/ferrovirt-agent"]);
        let mut libraries = std::collections::BTreeSet::new();
        for binary in &binaries {
            let name = binary.file_name().unwrap_or_default().to_string_lossy();
            image = image.file(binary, &format!("/usr/bin/{name}"));
            libraries.extend(shared_libraries(binary)?);
        }
        image = with_libraries(image, libraries)?;
        cluster
            .load_image(&image)
            .map_err(|e| format!("cannot load the agent image: {e}"))
    })
    .clone()
}

/// `image` with each of `libraries` (the file itself at the path a binary asks for: the
/// loader's path is a symlink on the host).
fn with_libraries(
    mut image: OciImage,
    libraries: impl IntoIterator<Item = PathBuf>,
) -> Result<OciImage, String> {
    for lib in libraries {
        let file = lib
            .canonicalize()
            .map_err(|e| format!("{}: {e}", lib.display()))?;
        image = image.file(&file, &lib.display().to_string());
    }
    Ok(image)
}

/// The shared libraries `binary` loads (ldd's list, with the dynamic loader).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("cannot run ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

/// A `ferrovirt-controller run` watching one namespace, as ServiceAccount
/// `ferrovirt/ferrovirt-controller`, with the stand-in launcher image.
pub struct ControllerProcess {
    pub process: GuardedProcess,
    cluster: Cluster,
    namespace: String,
    _kubeconfig: ServiceAccountKubeconfig,
    dir: ScratchDir,
}

impl ControllerProcess {
    /// Starts it; `extra` flags are appended (`--no-leader-elect`, `--identity`, `--listen`, ...).
    pub fn start(ns: &Namespace, extra: &[&str]) -> Result<ControllerProcess, String> {
        ControllerProcess::start_with_launcher(ns, LAUNCHER_IMAGE, extra)
    }

    /// Starts it with launcher pods of `image` (the real one is [`FERROVIRT_LAUNCHER_IMAGE`]).
    pub fn start_with_launcher(
        ns: &Namespace,
        image: &str,
        extra: &[&str],
    ) -> Result<ControllerProcess, String> {
        let cluster = ns.cluster().clone();
        let binary: PathBuf = try_controller_binary().map_err(|e| e.to_string())?;
        let kubeconfig = cluster
            .service_account_kubeconfig("ferrovirt", "ferrovirt-controller")
            .map_err(|e| e.to_string())?;
        let dir = ScratchDir::new("controller").map_err(|e| e.to_string())?;
        let lease = format!("lease-{}", ns.name());
        let mut cmd = Command::new(binary);
        cmd.env("KUBECONFIG", kubeconfig.path())
            .args(["run", "--watch-namespace", ns.name()])
            .args(["--launcher-image", image, "--launcher-pull-policy", "Never"])
            .args(["--lease-namespace", "ferrovirt", "--lease-name", &lease])
            .args(["--lease-duration", "4", "--lease-grace", "1"]);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(extra);
        let process = GuardedProcess::spawn(cmd, &dir.join("stdout"), &dir.join("stderr"))
            .map_err(|e| e.to_string())?;
        Ok(ControllerProcess {
            process,
            cluster,
            namespace: ns.name().to_owned(),
            _kubeconfig: kubeconfig,
            dir,
        })
    }

    /// Its log so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }
}

impl Drop for ControllerProcess {
    /// Deletes the namespace's VMs, VMIs and migrations while the controller still runs, so
    /// that their finalizers are released and the namespace can go.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("controller stderr:\n{}", self.stderr());
        }
        if self.process.try_exit().ok().flatten().is_none() {
            let _ = self.cluster.kubectl(&[
                "-n",
                &self.namespace,
                "delete",
                "vm,vmi,vmim",
                "--all",
                "--wait=true",
                "--timeout=90s",
            ]);
        }
        // Launcher pods mount /var/run/ferrovirt/vmis/<VMI UID>, which the kubelet creates; with
        // no node agent to remove them (the stand-in launcher), the empty ones are ours to
        // remove. A directory in use by an agent is never empty, and remove_dir leaves it.
        if let Ok(dirs) = std::fs::read_dir(VMIS_HOST_DIR) {
            for dir in dirs.flatten() {
                let _ = std::fs::remove_dir(dir.path());
            }
        }
    }
}

/// The node's per-VMI directories (the controller's `launcher::VMIS_HOST_DIR`).
const VMIS_HOST_DIR: &str = "/var/run/ferrovirt/vmis";

/// The string at JSON `pointer` in `v`, "" when absent.
pub fn str_at<'a>(v: &'a serde_json::Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
}

/// Waits up to `timeout` until `kind/name`'s JSON satisfies `check`; returns it. The error
/// carries the last status seen.
pub fn wait_json(
    ns: &Namespace,
    kind: &str,
    name: &str,
    what: &str,
    timeout: std::time::Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, String> {
    crate::k8s::wait_for(what, timeout, || match ns.get_json(&[kind, name]).ok() {
        Some(v) if check(&v) => Ok(v),
        Some(v) => Err(format!(
            "{}",
            v.get("status").cloned().unwrap_or(serde_json::Value::Null)
        )),
        None => Err(format!("no {kind} {name}")),
    })
    .map_err(|e| e.to_string())
}

/// Waits up to `timeout` until `kind/name` is gone.
pub fn wait_gone(
    ns: &Namespace,
    kind: &str,
    name: &str,
    timeout: std::time::Duration,
) -> Result<(), String> {
    crate::k8s::wait_for(
        &format!("{kind} {name} to be deleted"),
        timeout,
        || match ns.get_json(&[kind, name]).ok() {
            Some(_) => Err("still there".into()),
            None => Ok(()),
        },
    )
    .map_err(|e| e.to_string())
}
