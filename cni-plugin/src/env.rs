//! The CNI environment variables (spec §"Parameters"): the command, the attachment's identity
//! and `CNI_ARGS`.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("CNI_COMMAND is not set; set it to one of ADD, DEL, CHECK, GC, STATUS, VERSION")]
    NoCommand,
    #[error("CNI_COMMAND={0:?} is unknown; use one of ADD, DEL, CHECK, GC, STATUS, VERSION")]
    UnknownCommand(String),
    #[error("{var} is required for {command} but not set")]
    Missing { var: &'static str, command: Command },
    #[error(
        "CNI_CONTAINERID={0:?} is invalid: it must be non-empty and use only letters, digits, \
         '_', '.' and '-', starting with a letter or digit"
    )]
    BadContainerId(String),
    #[error(
        "CNI_IFNAME={0:?} is invalid: an interface name has 1 to 15 bytes and no '/', ':' or \
         whitespace, and is not \".\" or \"..\""
    )]
    BadIfName(String),
    #[error("CNI_ARGS entry {0:?} is not KEY=VALUE; separate entries with ';'")]
    BadArgs(String),
    #[error(
        "CNI_ARGS has unknown key(s) {0:?}; add IgnoreUnknown=1 to ignore them (known: \
         IgnoreUnknown, K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID, K8S_POD_INFRA_CONTAINER_ID, MAC)"
    )]
    UnknownArgs(Vec<String>),
}

impl EnvError {
    /// Every environment problem is the spec's code 4 ("invalid necessary environment variables").
    pub fn code(&self) -> u32 {
        4
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(text: &str) -> Result<Command, EnvError> {
        match text {
            "ADD" => Ok(Command::Add),
            "DEL" => Ok(Command::Del),
            "CHECK" => Ok(Command::Check),
            "GC" => Ok(Command::Gc),
            "STATUS" => Ok(Command::Status),
            "VERSION" => Ok(Command::Version),
            other => Err(EnvError::UnknownCommand(other.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `CNI_ARGS`, with the keys Kubernetes runtimes and Multus set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub ignore_unknown: bool,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub pod_infra_container_id: Option<String>,
    pub mac: Option<String>,
}

impl CniArgs {
    /// Parses `KEY=VALUE;KEY=VALUE`. Unknown keys are an error unless `IgnoreUnknown` is
    /// `1`/`true` (the convention libcni's `LoadArgs` follows).
    pub fn parse(text: &str) -> Result<CniArgs, EnvError> {
        let mut args = CniArgs::default();
        let mut unknown = Vec::new();
        for entry in text.split(';').filter(|e| !e.is_empty()) {
            let (key, value) = entry
                .split_once('=')
                .ok_or_else(|| EnvError::BadArgs(entry.to_owned()))?;
            let value = value.to_owned();
            match key {
                "IgnoreUnknown" => {
                    args.ignore_unknown =
                        matches!(value.to_ascii_lowercase().as_str(), "1" | "true")
                }
                "K8S_POD_NAMESPACE" => args.pod_namespace = Some(value),
                "K8S_POD_NAME" => args.pod_name = Some(value),
                "K8S_POD_UID" => args.pod_uid = Some(value),
                "K8S_POD_INFRA_CONTAINER_ID" => args.pod_infra_container_id = Some(value),
                "MAC" => args.mac = Some(value),
                other => unknown.push(other.to_owned()),
            }
        }
        if !unknown.is_empty() && !args.ignore_unknown {
            return Err(EnvError::UnknownArgs(unknown));
        }
        Ok(args)
    }
}

/// Everything the runtime passed in the environment.
#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: CniArgs,
    pub path: Vec<PathBuf>,
}

impl CniEnv {
    /// Reads the variables through `get` (the process environment in the binary, a map in
    /// tests) and checks what `CNI_COMMAND` needs.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, EnvError> {
        let get = |name: &str| get(name).filter(|v| !v.is_empty());
        let command = Command::parse(&get("CNI_COMMAND").ok_or(EnvError::NoCommand)?)?;
        let env = CniEnv {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS").map(PathBuf::from),
            ifname: get("CNI_IFNAME"),
            args: CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?,
            path: get("CNI_PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
        };
        env.check_required()?;
        Ok(env)
    }

    fn check_required(&self) -> Result<(), EnvError> {
        let command = self.command;
        let (needs_id, needs_netns, needs_path) = match command {
            Command::Add | Command::Check => (true, true, true),
            // DEL must work after the netns is gone (spec: CNI_NETNS may be empty).
            Command::Del => (true, false, true),
            Command::Gc | Command::Status => (false, false, true),
            Command::Version => (false, false, false),
        };
        if needs_id {
            let id = self.container_id.as_deref().ok_or(EnvError::Missing {
                var: "CNI_CONTAINERID",
                command,
            })?;
            check_container_id(id)?;
            let ifname = self.ifname.as_deref().ok_or(EnvError::Missing {
                var: "CNI_IFNAME",
                command,
            })?;
            check_ifname(ifname)?;
        }
        if needs_netns && self.netns.is_none() {
            return Err(EnvError::Missing {
                var: "CNI_NETNS",
                command,
            });
        }
        if needs_path && self.path.is_empty() {
            return Err(EnvError::Missing {
                var: "CNI_PATH",
                command,
            });
        }
        Ok(())
    }

    /// `CNI_CONTAINERID` (checked present for the commands that need it).
    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }

    /// `CNI_IFNAME` (checked present for the commands that need it).
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or_default()
    }
}

/// The spec's container ID rule: `[a-zA-Z0-9][a-zA-Z0-9_.\-]*`.
pub fn check_container_id(id: &str) -> Result<(), EnvError> {
    let mut bytes = id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    if first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        Ok(())
    } else {
        Err(EnvError::BadContainerId(id.to_owned()))
    }
}

/// The kernel's interface name rule (dev_valid_name).
pub fn check_ifname(name: &str) -> Result<(), EnvError> {
    let valid = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(EnvError::BadIfName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, EnvError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn add_reads_every_variable() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=vm-a;K8S_POD_UID=u1;FOO=bar",
            ),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.path.len(), 2);
        assert_eq!(e.args.pod_name.as_deref(), Some("vm-a"));
        assert_eq!(e.args.pod_uid.as_deref(), Some("u1"));
    }

    #[test]
    fn missing_or_invalid_variables_are_named() {
        assert_eq!(env(&[]).unwrap_err(), EnvError::NoCommand);
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("CNI_NETNS"), "{e}");
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "-bad"),
            ("CNI_IFNAME", "e"),
        ])
        .unwrap_err();
        assert!(matches!(e, EnvError::BadContainerId(_)));
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "a/b"),
        ])
        .unwrap_err();
        assert!(matches!(e, EnvError::BadIfName(_)));
        assert!(matches!(
            env(&[("CNI_COMMAND", "PUT")]),
            Err(EnvError::UnknownCommand(_))
        ));
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
        // DEL without a netns is fine: the pod's netns may already be gone.
        env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ])
        .unwrap();
    }

    #[test]
    fn unknown_cni_args_fail_unless_ignored() {
        assert_eq!(
            CniArgs::parse("FOO=1").unwrap_err(),
            EnvError::UnknownArgs(vec!["FOO".into()])
        );
        assert!(CniArgs::parse("FOO=1;IgnoreUnknown=true").is_ok());
        assert!(matches!(CniArgs::parse("FOO"), Err(EnvError::BadArgs(_))));
    }
}
