//! Runs `ferrovirt-cni` as a runtime does (environment + stdin) and Debian's reference plugins
//! beside it; scratch directories for the plugin's state, sockets and host-local leases.

#![allow(dead_code)] // each test binary uses a different part

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferrovirt_tests::ScratchDir;
use serde_json::{Value, json};

/// Where Debian's containernetworking-plugins live (scripts/setup.sh installs them).
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

pub fn plugin_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovirt-cni"))
}

/// What one plugin call printed and how it exited.
#[derive(Debug)]
pub struct Reply {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    /// The JSON printed by a successful call; panics with the output otherwise.
    pub fn ok(&self) -> Value {
        assert_eq!(self.status, Some(0), "call failed: {self:#?}");
        if self.stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:#?}"))
    }

    /// The error object of a failed call; panics if it succeeded or printed something else.
    pub fn error(&self) -> (u64, String) {
        assert_ne!(self.status, Some(0), "call succeeded: {self:#?}");
        let object: Value =
            serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:#?}"));
        let code = object["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code: {self:#?}"));
        assert!(object["cniVersion"].is_string(), "{self:#?}");
        let msg = object["msg"].as_str().unwrap_or_default().to_owned();
        (code, msg)
    }
}

/// One attachment as the runtime names it.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
}

impl Attachment {
    pub fn new(netns: Option<PathBuf>, ifname: &str) -> Attachment {
        Attachment {
            container_id: format!("c-{}", ferrovirt_tests::unique_name("")),
            ifname: ifname.to_owned(),
            netns,
        }
    }
}

/// Runs `binary` with `CNI_COMMAND=command` for `attachment` and `conf` on stdin.
pub fn call_plugin(
    binary: &Path,
    command: &str,
    attachment: Option<&Attachment>,
    conf: &Value,
    extra_env: &[(&str, &str)],
) -> Reply {
    run_plugin(plugin_command(binary, command, attachment, extra_env), conf)
}

/// The command [`call_plugin`] runs, to adjust before [`run_plugin`].
pub fn plugin_command(
    binary: &Path,
    command: &str,
    attachment: Option<&Attachment>,
    extra_env: &[(&str, &str)],
) -> Command {
    let cni_path =
        std::env::join_paths([plugin_dir(), PathBuf::from(DEBIAN_CNI_DIR)]).unwrap_or_default();
    let mut cmd = Command::new(binary);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", cni_path)
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=vm-a",
        )
        .env("FERROVIRT_CNI_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(a) = attachment {
        cmd.env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_IFNAME", &a.ifname);
        if let Some(netns) = &a.netns {
            cmd.env("CNI_NETNS", netns);
        }
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `cmd` with `conf` on its stdin, as a runtime does.
pub fn run_plugin(mut cmd: Command, conf: &Value) -> Reply {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(conf.to_string().as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    Reply {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The directory of our binary, so it can be found in CNI_PATH too.
fn plugin_dir() -> PathBuf {
    plugin_binary()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A Debian reference plugin, or `None` (with a message) when the package is not installed.
pub fn debian_plugin(name: &str) -> PathBuf {
    let path = Path::new(DEBIAN_CNI_DIR).join(name);
    assert!(
        path.is_file(),
        "{} is missing: install containernetworking-plugins (scripts/setup.sh)",
        path.display()
    );
    path
}

/// A network's scratch space: plugin state, vhost-user sockets and host-local's leases.
pub struct Network {
    pub dir: ScratchDir,
    pub name: String,
}

impl Network {
    pub fn new(label: &str) -> Network {
        Network {
            dir: ScratchDir::new(label).unwrap(),
            name: format!("net-{label}"),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn lease_dir(&self) -> PathBuf {
        self.dir.join("leases")
    }

    /// host-local IPAM on `subnet`, leases in our scratch directory.
    pub fn host_local(&self, subnet: &str) -> Value {
        json!({
            "type": "host-local",
            "dataDir": self.lease_dir(),
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}]
        })
    }

    /// The container IDs holding a host-local lease.
    pub fn leases(&self) -> Vec<String> {
        let dir = self.lease_dir().join(&self.name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .parse::<std::net::IpAddr>()
                    .is_ok()
            })
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|text| text.lines().next().unwrap_or_default().trim().to_owned())
            .collect()
    }

    /// Our attachment records left in the state directory.
    pub fn records(&self) -> usize {
        std::fs::read_dir(self.state_dir().join(&self.name))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0)
    }
}

/// Runs `ip ARGS` and returns stdout; panics on failure.
pub fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
