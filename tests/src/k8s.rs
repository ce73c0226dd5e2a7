//! The real Kubernetes of `tests/k8s/cluster.sh` as tests see it: the cluster found from the
//! environment that `cluster.sh run` exports, `kubectl` run against it, a namespace per test
//! that is deleted (and waited for) on `Drop`, images built here and loaded into the node's
//! containerd, and kubeconfigs that act as a ServiceAccount.
//!
//! Everything goes through the `kubectl` that `tests/k8s/build.sh` built, so what a test does
//! is what a person would type.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::artifacts::repo_root;
use crate::names::unique_name;
use crate::process::{ProcessError, ScratchDir};

/// How a test suite is started so that [`Cluster::from_env`] finds a cluster.
pub const RUN_HINT: &str = "tests/k8s/build.sh && tests/k8s/cluster.sh run -- cargo test -p ferrovirt-tests --features k8s --test <name>";

/// How long a namespace's deletion may take before its guard gives up waiting.
const NAMESPACE_DELETE_TIMEOUT: Duration = Duration::from_secs(120);

/// The busybox image of [`Cluster::busybox_image`]: Debian's static busybox as `/bin/sh`.
pub const BUSYBOX_IMAGE: &str = "ferrovirt.io/busybox:test";
const BUSYBOX_BINARY: &str = "/bin/busybox";

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "cannot run {program}: tests/k8s/build.sh builds kubectl and ociimage, scripts/setup.sh installs ctr"
    )]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("`kubectl {args}` printed something that is not JSON")]
    NotJson {
        args: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("timed out after {timeout:?} waiting for {what}; last seen: {last}")]
    Timeout {
        what: String,
        timeout: Duration,
        last: String,
    },
    #[error("{BUSYBOX_BINARY} is missing: install Debian's busybox-static (scripts/setup.sh does)")]
    NoBusybox,
    #[error("cannot make a scratch directory")]
    Scratch(#[source] ProcessError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The output of a command that ran to completion, whatever its exit status.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// The cluster `tests/k8s/cluster.sh` started for this run.
#[derive(Debug, Clone)]
pub struct Cluster {
    kubeconfig: PathBuf,
    state: PathBuf,
    bin: PathBuf,
    containerd: PathBuf,
    pause_image: String,
    vm_cni_dir: PathBuf,
    device_plugin_dir: PathBuf,
}

impl Cluster {
    /// The cluster described by the environment of `cluster.sh run`. Panics, naming the
    /// command to run, when the tests were started without one.
    pub fn from_env() -> Cluster {
        Cluster::try_from_env().unwrap_or_else(|missing| {
            panic!(
                "{missing} is not set: these tests need the test cluster; run them as `{RUN_HINT}`"
            )
        })
    }

    /// The cluster described by the environment, or the name of the first variable missing.
    pub fn try_from_env() -> Result<Cluster, &'static str> {
        Cluster::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Cluster, &'static str> {
        let var = |name: &'static str| lookup(name).filter(|v| !v.is_empty()).ok_or(name);
        Ok(Cluster {
            kubeconfig: var("KUBECONFIG")?.into(),
            state: var("FERROVIRT_K8S_STATE")?.into(),
            bin: var("FERROVIRT_K8S_BIN")?.into(),
            containerd: var("FERROVIRT_K8S_CONTAINERD")?.into(),
            pause_image: var("FERROVIRT_K8S_PAUSE_IMAGE")?,
            vm_cni_dir: var("FERROVIRT_K8S_VM_CNI_DIR")?.into(),
            device_plugin_dir: var("FERROVIRT_K8S_DEVICE_PLUGIN_DIR")?.into(),
        })
    }

    /// The cluster's containerd socket (for `ctr -a`).
    pub fn containerd_socket(&self) -> &Path {
        &self.containerd
    }

    /// The admin (system:masters) kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The run's state directory; component logs are in its `logs/`.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// A binary of build.sh's cache (`kubectl`, `ociimage`, `crictl`, ...).
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// The node's sandbox image, loaded and usable with `imagePullPolicy: Never`.
    pub fn pause_image(&self) -> &str {
        &self.pause_image
    }

    /// The CNI conf dir of RuntimeClass `ferrovirt`: the cluster network's conflist is first;
    /// a second one dropped here becomes `eth1` of that class's pods.
    pub fn vm_cni_dir(&self) -> &Path {
        &self.vm_cni_dir
    }

    /// containerd's CNI plugin directory: links to Debian's plugins; link more in (such as
    /// ferrovirt-cni) for a conflist of [`Cluster::vm_cni_dir`] to use.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.state.join("cni-bin")
    }

    /// What the kubelet sees as `/var/lib/kubelet/device-plugins` (its `kubelet.sock` is here).
    pub fn device_plugin_dir(&self) -> &Path {
        &self.device_plugin_dir
    }

    /// Stops the node's kubelet and starts it again as `cluster.sh up` did
    /// (`cluster.sh restart-kubelet`); returns once the new kubelet serves device-plugin
    /// registration. Pods keep running.
    pub fn restart_kubelet(&self) -> Result<(), K8sError> {
        let mut cmd = Command::new(repo_root().join("tests/k8s/cluster.sh"));
        cmd.arg("restart-kubelet").arg(&self.state);
        check(run_command(cmd, None)?, "cluster.sh restart-kubelet").map(drop)
    }

    /// `kubectl ARGS` with the admin kubeconfig; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, K8sError> {
        self.kubectl_as(&self.kubeconfig, args, None)
    }

    /// `kubectl ARGS` with `stdin` on its standard input.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String, K8sError> {
        self.kubectl_as(&self.kubeconfig, args, Some(stdin))
    }

    /// `kubectl ARGS` with another kubeconfig (e.g. a [`ServiceAccountKubeconfig`]).
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, K8sError> {
        let out = self.kubectl_output(kubeconfig, args, stdin)?;
        check(out, &format!("kubectl {}", args.join(" "))).map(|out| out.stdout)
    }

    /// `kubectl ARGS` run to completion whatever its status, for tests that expect a failure
    /// or an exit code passed through (`kubectl exec` exits with the remote command's status).
    pub fn kubectl_output(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<CommandOutput, K8sError> {
        let mut cmd = Command::new(self.binary("kubectl"));
        cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
        run_command(cmd, stdin)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String, K8sError> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// `kubectl get ARGS -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value, K8sError> {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&full)?;
        serde_json::from_str(&out).map_err(|source| K8sError::NotJson {
            args: full.join(" "),
            source,
        })
    }

    /// A fresh namespace named `fvt-<prefix><unique>`, deleted on `Drop`.
    pub fn namespace(&self, prefix: &str) -> Result<Namespace, K8sError> {
        let name = format!("fvt-{}", unique_name(prefix).to_ascii_lowercase());
        self.kubectl(&["create", "namespace", &name])?;
        Ok(Namespace {
            cluster: self.clone(),
            name,
        })
    }

    /// Loads `image` into the node's containerd (namespace k8s.io), where pods find it with
    /// `imagePullPolicy: Never`.
    pub fn load_image(&self, image: &OciImage) -> Result<(), K8sError> {
        let dir = ScratchDir::new("k8s-image").map_err(K8sError::Scratch)?;
        let tarball = dir.join("image.tar");
        let mut cmd = Command::new(self.binary("ociimage"));
        cmd.arg("--name")
            .arg(&image.name)
            .arg("--output")
            .arg(&tarball)
            .args(&image.args);
        check(run_command(cmd, None)?, "ociimage")?;
        let mut cmd = Command::new("ctr");
        cmd.arg("-a")
            .arg(&self.containerd)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&tarball);
        check(run_command(cmd, None)?, "ctr images import")?;
        Ok(())
    }

    /// [`BUSYBOX_IMAGE`], loaded once per test process: Debian's static busybox as
    /// `/bin/busybox` and `/bin/sh`, entrypoint `/bin/sh`, so pods can print, sleep and be
    /// exec'd into.
    pub fn busybox_image(&self) -> Result<&'static str, K8sError> {
        static LOADED: OnceLock<Mutex<bool>> = OnceLock::new();
        let mut loaded = LOADED
            .get_or_init(|| Mutex::new(false))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !*loaded {
            if !Path::new(BUSYBOX_BINARY).exists() {
                return Err(K8sError::NoBusybox);
            }
            let image = OciImage::new(BUSYBOX_IMAGE)
                .file(Path::new(BUSYBOX_BINARY), "/bin/busybox")
                .file(Path::new(BUSYBOX_BINARY), "/bin/sh")
                .dir("/tmp", 0o1777)
                .entrypoint(&["/bin/sh"]);
            self.load_image(&image)?;
            *loaded = true;
        }
        Ok(BUSYBOX_IMAGE)
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name` with a token from
    /// `kubectl create token` (valid for an hour), so a component runs under its own RBAC.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<ServiceAccountKubeconfig, K8sError> {
        let token =
            self.kubectl(&["-n", namespace, "create", "token", name, "--duration", "1h"])?;
        let server = self.kubectl(&[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ])?;
        let ca = self.kubectl(&[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority}",
        ])?;
        let dir = ScratchDir::new("k8s-sa").map_err(K8sError::Scratch)?;
        let path = dir.join("kubeconfig");
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\n    namespace: {namespace}\ncurrent-context: test\n",
            token = token.trim()
        );
        std::fs::write(&path, config).map_err(|source| K8sError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(ServiceAccountKubeconfig { path, _dir: dir })
    }
}

/// Polls `probe` every 200 ms until it returns `Some`, for at most `timeout`. `probe` returns
/// `Err(last)` with a description of what it saw while the condition does not hold yet (put
/// into the timeout error).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, K8sError> {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => {
                return Err(K8sError::Timeout {
                    what: what.to_string(),
                    timeout,
                    last,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A namespace of one test, deleted on `Drop` with everything in it; the drop waits until the
/// API server has removed it, so the next test starts from a clean cluster.
#[derive(Debug)]
pub struct Namespace {
    cluster: Cluster,
    name: String,
}

impl Namespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// `kubectl -n NAME ARGS`.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, K8sError> {
        self.cluster.kubectl(&self.args(args))
    }

    /// `kubectl -n NAME ARGS` run to completion whatever its exit status.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<CommandOutput, K8sError> {
        self.cluster
            .kubectl_output(&self.cluster.kubeconfig, &self.args(args), None)
    }

    /// `kubectl -n NAME apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String, K8sError> {
        self.cluster
            .kubectl_stdin(&self.args(&["apply", "-f", "-"]), yaml)
    }

    /// `kubectl -n NAME get ARGS -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value, K8sError> {
        self.cluster.get_json(&self.args(args))
    }

    /// `kubectl -n NAME wait --for=condition=CONDITION RESOURCE` within `timeout`.
    pub fn wait_condition(
        &self,
        resource: &str,
        condition: &str,
        timeout: Duration,
    ) -> Result<(), K8sError> {
        let for_arg = format!("--for=condition={condition}");
        let timeout_arg = format!("--timeout={}s", timeout.as_secs().max(1));
        self.kubectl(&["wait", &for_arg, &timeout_arg, resource])
            .map(drop)
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        full
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let timeout = format!("--timeout={}s", NAMESPACE_DELETE_TIMEOUT.as_secs());
        if let Err(e) =
            self.cluster
                .kubectl(&["delete", "namespace", &self.name, "--wait=true", &timeout])
        {
            eprintln!("k8s: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// A kubeconfig file acting as a ServiceAccount, removed on `Drop`.
#[derive(Debug)]
pub struct ServiceAccountKubeconfig {
    path: PathBuf,
    _dir: ScratchDir,
}

impl ServiceAccountKubeconfig {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A one-layer image for [`Cluster::load_image`], described as `ociimage` flags
/// (`tests/k8s/tools/ociimage`).
#[derive(Debug, Clone)]
pub struct OciImage {
    name: String,
    args: Vec<String>,
}

impl OciImage {
    /// `name` as a pod's `image:` field spells it (normalized like Kubernetes does).
    pub fn new(name: &str) -> OciImage {
        OciImage {
            name: name.to_string(),
            args: Vec::new(),
        }
    }

    /// The image's Entrypoint.
    pub fn entrypoint(mut self, argv: &[&str]) -> OciImage {
        for arg in argv {
            self.args.push(format!("--entrypoint={arg}"));
        }
        self
    }

    /// The image's Cmd.
    pub fn cmd(mut self, argv: &[&str]) -> OciImage {
        for arg in argv {
            self.args.push(format!("--cmd={arg}"));
        }
        self
    }

    /// An environment variable `KEY=VALUE`.
    pub fn env(mut self, key: &str, value: &str) -> OciImage {
        self.args.push(format!("--env={key}={value}"));
        self
    }

    /// A host file (or directory, recursively) at the absolute `image_path`.
    pub fn file(mut self, host: &Path, image_path: &str) -> OciImage {
        self.args
            .push(format!("--file={}:{image_path}", host.display()));
        self
    }

    /// An empty directory with permission bits `mode`.
    pub fn dir(mut self, image_path: &str, mode: u32) -> OciImage {
        self.args.push(format!("--dir={image_path}:{mode:o}"));
        self
    }
}

fn run_command(mut cmd: Command, stdin: Option<&str>) -> Result<CommandOutput, K8sError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let spawn_error = |source| K8sError::Spawn {
        program: program.clone(),
        source,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits without reading all of its input is reported by its status.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_error)?;
    Ok(CommandOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn check(out: CommandOutput, command: &str) -> Result<CommandOutput, K8sError> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(K8sError::Failed {
            command: command.to_string(),
            status: out.status,
            stderr: out.stderr.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_returns_the_value_or_times_out_with_the_last_observation() {
        let mut calls = 0;
        let value = wait_for("third call", Duration::from_secs(5), || {
            calls += 1;
            if calls == 3 {
                Ok(calls)
            } else {
                Err(format!("call {calls}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(value, 3);
        let err = wait_for::<()>("never", Duration::from_millis(300), || {
            Err("still no".into())
        })
        .expect_err("a probe that never succeeds must time out");
        let message = err.to_string();
        assert!(
            message.contains("never") && message.contains("still no"),
            "{message}"
        );
    }

    #[test]
    fn cluster_from_lookup_names_the_first_missing_variable() {
        let all = |name: &str| Some(format!("/x/{name}"));
        let cluster = Cluster::from_lookup(all).unwrap_or_else(|m| panic!("{m} missing"));
        assert_eq!(
            cluster.binary("kubectl"),
            Path::new("/x/FERROVIRT_K8S_BIN/kubectl")
        );
        let without_state = |name: &str| (name != "FERROVIRT_K8S_STATE").then(|| "/x".to_string());
        assert_eq!(
            Cluster::from_lookup(without_state).expect_err("state is missing"),
            "FERROVIRT_K8S_STATE"
        );
        let empty_kubeconfig =
            |name: &str| Some(if name == "KUBECONFIG" { "" } else { "/x" }.into());
        assert_eq!(
            Cluster::from_lookup(empty_kubeconfig).expect_err("empty is missing"),
            "KUBECONFIG"
        );
    }

    #[test]
    fn oci_image_spells_ociimage_flags() {
        let image = OciImage::new("x:1")
            .entrypoint(&["/bin/sh", "-c"])
            .cmd(&["echo hi"])
            .env("A", "b=c")
            .file(Path::new("/bin/busybox"), "/bin/sh")
            .dir("/tmp", 0o1777);
        assert_eq!(
            image.args,
            [
                "--entrypoint=/bin/sh",
                "--entrypoint=-c",
                "--cmd=echo hi",
                "--env=A=b=c",
                "--file=/bin/busybox:/bin/sh",
                "--dir=/tmp:1777",
            ]
        );
    }
}
