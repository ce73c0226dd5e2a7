//! IPAM delegation (spec §"Delegated plugins"): runs the plugin named by `ipam.type` from
//! `CNI_PATH` with our environment and our stdin, and reads its result.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::Mutex;

use serde_json::Value;

use crate::config::{CniVersion, SUPPORTED_VERSIONS, check_version};
use crate::env::Command;
use crate::result::{CniResult, ErrorObject, ResultError};

/// Our code for "an operation on the host failed" (spec: codes from 100 are the plugin's).
pub const CODE_OPERATION_FAILED: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "IPAM plugin {plugin:?} (ipam.type) is not an executable in CNI_PATH {path:?}; install \
         it there or fix ipam.type"
    )]
    NotFound { plugin: String, path: Vec<PathBuf> },
    #[error("ipam.type {0:?} is not a plain plugin name; give the binary's name, not a path")]
    BadName(String),
    #[error("cannot run IPAM plugin {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("IPAM plugin {plugin} failed {command} with code {}: {}", .error.code, .error.msg)]
    Plugin {
        plugin: String,
        command: Command,
        error: ErrorObject,
    },
    #[error(
        "IPAM plugin {plugin} failed {command} ({status}) without an error object; its stderr: {stderr}"
    )]
    Crashed {
        plugin: String,
        command: Command,
        status: String,
        stderr: String,
    },
    #[error("IPAM plugin {plugin} printed something that is not JSON for {command}")]
    BadOutput {
        plugin: String,
        command: Command,
        #[source]
        source: serde_json::Error,
    },
    #[error("IPAM plugin result")]
    BadResult(#[source] ResultError),
    #[error(
        "IPAM plugin {plugin} supports CNI versions {theirs:?}, none of which we speak \
         ({SUPPORTED_VERSIONS:?}); upgrade it"
    )]
    NoCommonVersion { plugin: String, theirs: Vec<String> },
}

impl IpamError {
    pub fn code(&self) -> u32 {
        match self {
            IpamError::NotFound { .. } | IpamError::BadName(_) => 7,
            IpamError::Spawn(..) => 5,
            IpamError::Plugin { error, .. } => error.code,
            IpamError::NoCommonVersion { .. } => 1,
            IpamError::Crashed { .. } | IpamError::BadOutput { .. } | IpamError::BadResult(_) => {
                CODE_OPERATION_FAILED
            }
        }
    }
}

/// The IPAM plugin of one network config.
#[derive(Debug)]
pub struct Ipam {
    plugin: String,
    binary: PathBuf,
    stdin: Value,
    /// The version we speak to the plugin: the config's, or lower after it refused that one.
    /// Behind a mutex so DEL can release the lease from a second thread.
    version: Mutex<CniVersion>,
}

impl Ipam {
    /// Finds `plugin` in `cni_path`; `stdin` is the network config as the runtime passed it.
    pub fn new(plugin: &str, cni_path: &[PathBuf], stdin: Value) -> Result<Ipam, IpamError> {
        if plugin.is_empty() || plugin.contains('/') || plugin == "." || plugin == ".." {
            return Err(IpamError::BadName(plugin.to_owned()));
        }
        let binary = cni_path
            .iter()
            .map(|dir| dir.join(plugin))
            .find(|p| is_executable(p))
            .ok_or_else(|| IpamError::NotFound {
                plugin: plugin.to_owned(),
                path: cni_path.to_vec(),
            })?;
        let version = check_version(&stdin).unwrap_or(CniVersion::V1_1_0);
        Ok(Ipam {
            plugin: plugin.to_owned(),
            binary,
            stdin,
            version: Mutex::new(version),
        })
    }

    /// ADD: allocates addresses for the attachment named by `attachment` (container ID,
    /// ifname), or by our own environment when `None`.
    pub fn add(&self, attachment: Option<(&str, &str)>) -> Result<CniResult, IpamError> {
        let value = self.exec_negotiated(Command::Add, attachment)?;
        CniResult::from_value(value.unwrap_or(Value::Null), "the IPAM plugin's ADD result")
            .map_err(IpamError::BadResult)
    }

    /// DEL: releases the attachment's addresses (IPAM plugins treat a second DEL as done).
    pub fn del(&self, attachment: Option<(&str, &str)>) -> Result<(), IpamError> {
        self.exec_negotiated(Command::Del, attachment).map(|_| ())
    }

    /// CHECK: asks the plugin whether the attachment still holds its addresses.
    pub fn check(&self, attachment: Option<(&str, &str)>) -> Result<(), IpamError> {
        self.exec_negotiated(Command::Check, attachment).map(|_| ())
    }

    /// Runs `command`; when the plugin refuses our CNI version (code 1), asks it for its
    /// versions and retries once in the newest one we share (Debian's plugins stop at 1.0.0).
    fn exec_negotiated(
        &self,
        command: Command,
        attachment: Option<(&str, &str)>,
    ) -> Result<Option<Value>, IpamError> {
        match self.exec(command, attachment) {
            Err(IpamError::Plugin { error, .. }) if error.code == 1 => {
                let version = self.negotiate()?;
                tracing::debug!(plugin = %self.plugin, version = version.as_str(), "IPAM plugin version negotiated");
                *self.version.lock().unwrap_or_else(|p| p.into_inner()) = version;
                self.exec(command, attachment)
            }
            other => other,
        }
    }

    fn version(&self) -> CniVersion {
        *self.version.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn negotiate(&self) -> Result<CniVersion, IpamError> {
        let info = self.exec(Command::Version, None)?.unwrap_or(Value::Null);
        let theirs: Vec<String> = info["supportedVersions"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        theirs
            .iter()
            .filter_map(|v| CniVersion::parse(v))
            .filter(|v| *v <= self.version())
            .max()
            .ok_or_else(|| IpamError::NoCommonVersion {
                plugin: self.plugin.clone(),
                theirs,
            })
    }

    fn exec(
        &self,
        command: Command,
        attachment: Option<(&str, &str)>,
    ) -> Result<Option<Value>, IpamError> {
        let mut stdin = self.stdin.clone();
        stdin["cniVersion"] = Value::from(self.version().as_str());
        let mut process = Process::new(&self.binary);
        process
            .env("CNI_COMMAND", command.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((container_id, ifname)) = attachment {
            process
                .env("CNI_CONTAINERID", container_id)
                .env("CNI_IFNAME", ifname);
        }
        let mut child = process
            .spawn()
            .map_err(|e| IpamError::Spawn(self.binary.clone(), e))?;
        if let Some(mut pipe) = child.stdin.take() {
            // A plugin that exits without reading its stdin closes the pipe: its exit status
            // and output say what happened, so a write error here is not the story.
            let _ = pipe.write_all(stdin.to_string().as_bytes());
        }
        let output = child
            .wait_with_output()
            .map_err(|e| IpamError::Spawn(self.binary.clone(), e))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            if let Ok(error) = serde_json::from_str::<ErrorObject>(&stdout) {
                return Err(IpamError::Plugin {
                    plugin: self.plugin.clone(),
                    command,
                    error,
                });
            }
            return Err(IpamError::Crashed {
                plugin: self.plugin.clone(),
                command,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        if stdout.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&stdout)
            .map(Some)
            .map_err(|source| IpamError::BadOutput {
                plugin: self.plugin.clone(),
                command,
                source,
            })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    /// Serializes the tests that write and run scripts: a script written while another test
    /// forks can be held open for writing by that child until its exec, and running it then
    /// fails with ETXTBSY.
    static EXEC_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A scratch CNI_PATH with one shell-script "IPAM plugin".
    struct FakePlugin {
        dir: PathBuf,
        _exclusive: std::sync::MutexGuard<'static, ()>,
    }

    impl FakePlugin {
        fn new(name: &str, script: &str) -> FakePlugin {
            let exclusive = EXEC_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            let dir = std::env::temp_dir().join(format!("fv-ipam-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            FakePlugin {
                dir,
                _exclusive: exclusive,
            }
        }
    }

    impl Drop for FakePlugin {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn conf() -> Value {
        json!({"cniVersion": "1.1.0", "name": "n", "type": "ferrovirt-cni", "ipam": {"type": "x"}})
    }

    #[test]
    fn a_missing_plugin_is_named_with_the_path_searched() {
        let e = Ipam::new("nope", &[PathBuf::from("/nonexistent")], conf()).unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(matches!(
            Ipam::new("../x", &[], conf()),
            Err(IpamError::BadName(_))
        ));
    }

    #[test]
    fn the_plugins_error_object_and_code_come_through() {
        let p = FakePlugin::new(
            "failing",
            r#"echo '{"cniVersion":"1.1.0","code":11,"msg":"pool busy"}'; exit 1"#,
        );
        let ipam = Ipam::new("failing", std::slice::from_ref(&p.dir), conf()).unwrap();
        let e = ipam.add(None).unwrap_err();
        assert_eq!(e.code(), 11);
        assert!(e.to_string().contains("pool busy"), "{e}");
    }

    #[test]
    fn a_refused_version_is_negotiated_down_and_retried() {
        // Refuses anything but 1.0.0, like Debian's host-local.
        let p = FakePlugin::new(
            "old",
            r#"in=$(cat)
if [ "$CNI_COMMAND" = VERSION ]; then echo '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}'; exit 0; fi
case "$in" in *'"1.0.0"'*) echo '{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.9/24"}]}';;
  *) echo '{"cniVersion":"1.0.0","code":1,"msg":"incompatible"}'; exit 1;; esac"#,
        );
        let ipam = Ipam::new("old", std::slice::from_ref(&p.dir), conf()).unwrap();
        let result = ipam.add(None).unwrap();
        assert_eq!(result.ips[0].address.to_string(), "10.0.0.9/24");
    }

    #[test]
    fn a_crash_without_an_error_object_reports_stderr() {
        let p = FakePlugin::new("crash", "echo boom >&2; exit 3");
        let ipam = Ipam::new("crash", std::slice::from_ref(&p.dir), conf()).unwrap();
        let e = ipam.del(None).unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        assert_eq!(e.code(), CODE_OPERATION_FAILED);
    }
}
