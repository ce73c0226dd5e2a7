//! The commands: ADD, DEL, CHECK, GC, STATUS and VERSION, each answering with a result or
//! the spec's error object.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::addressing::{AddressingError, MacAddress};
use crate::config::{CniVersion, ConfigError, Mode, NetConf, parse_netconf};
use crate::env::{CniEnv, Command, EnvError};
use crate::ipam::{CODE_OPERATION_FAILED, Ipam, IpamError};
use crate::result::{CniResult, ErrorObject, IpConfig, ResultError, version_info};
use crate::sriov::{self, SriovError};
use crate::state::{AttachmentRecord, StateError, StateStore};
use crate::vhost_user::{self, VhostUserError};

/// The spec's code for "the plugin is not available" (STATUS).
const CODE_NOT_AVAILABLE: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    #[error(transparent)]
    Sriov(#[from] SriovError),
    #[error("prevResult is invalid")]
    PrevResult(#[source] ResultError),
    #[error("CHECK needs prevResult (the result of ADD) in the network configuration")]
    NoPrevResult,
    #[error("CNI_ARGS MAC is invalid")]
    ArgsMac(#[source] AddressingError),
    #[error(
        "no attachment of network {network:?} for container {container_id:?} ifname {ifname:?}; \
         was ADD run (and not DEL)?"
    )]
    UnknownAttachment {
        network: String,
        container_id: String,
        ifname: String,
    },
    #[error("{command} needs cniVersion 1.1.0; this configuration says {version}")]
    CommandNeedsNewerVersion { command: Command, version: String },
    #[error("network namespace {0} (CNI_NETNS) does not exist; is the container gone?")]
    NetnsMissing(PathBuf),
    #[error("the plugin cannot work on this node: {0}")]
    NotAvailable(String),
    #[error(
        "GC could not remove {0} stale attachment(s); see details, it will retry on the next GC"
    )]
    GcIncomplete(usize, #[source] Box<PluginError>),
}

impl PluginError {
    /// The spec's error code.
    pub fn code(&self) -> u32 {
        match self {
            PluginError::Env(e) => e.code(),
            PluginError::Config(e) => e.code(),
            PluginError::Ipam(e) => e.code(),
            PluginError::State(e) => e.code(),
            PluginError::VhostUser(e) => e.code(),
            PluginError::Sriov(e) => e.code(),
            PluginError::PrevResult(_) | PluginError::NoPrevResult => 7,
            PluginError::ArgsMac(_) => 4,
            PluginError::CommandNeedsNewerVersion { .. } => 1,
            PluginError::NetnsMissing(_) => 3,
            PluginError::NotAvailable(_) => CODE_NOT_AVAILABLE,
            PluginError::UnknownAttachment { .. } | PluginError::GcIncomplete(..) => {
                CODE_OPERATION_FAILED
            }
        }
    }

    /// The error object; `details` is the chain of causes below the message.
    pub fn to_error_object(&self, version: &str) -> ErrorObject {
        let mut details = Vec::new();
        let mut source = std::error::Error::source(self);
        // Transparent variants repeat their inner error's message as ours: skip that one.
        if source.is_some_and(|s| s.to_string() == self.to_string()) {
            source = source.and_then(std::error::Error::source);
        }
        while let Some(cause) = source {
            details.push(cause.to_string());
            source = cause.source();
        }
        ErrorObject {
            cni_version: version.to_owned(),
            code: self.code(),
            msg: self.to_string(),
            details: details.join(": "),
        }
    }
}

/// What the process prints on stdout and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// Runs one CNI call: `lookup` reads the environment, `stdin` is the network configuration.
pub fn run(lookup: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .and_then(CniVersion::parse)
        })
        .unwrap_or(CniVersion::V1_1_0);
    let result = CniEnv::from_lookup(lookup)
        .map_err(PluginError::from)
        .and_then(|env| dispatch(&env, stdin));
    match result {
        Ok(Some(value)) => Outcome {
            stdout: value.to_string(),
            exit_code: 0,
        },
        Ok(None) => Outcome {
            stdout: String::new(),
            exit_code: 0,
        },
        Err(e) => {
            tracing::error!(code = e.code(), "{e}");
            let object = e.to_error_object(version.as_str());
            Outcome {
                stdout: serde_json::to_string(&object).unwrap_or_default(),
                exit_code: 1,
            }
        }
    }
}

fn dispatch(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, PluginError> {
    if env.command == Command::Version {
        let requested = serde_json::from_slice::<Value>(stdin).ok();
        let requested = requested
            .as_ref()
            .and_then(|v| v.get("cniVersion"))
            .and_then(Value::as_str);
        return Ok(Some(version_info(requested)));
    }
    let conf = parse_netconf(stdin)?;
    // parse_netconf has decoded it already; this cannot fail, but keep no unwrap on input.
    let raw: Value = serde_json::from_slice(stdin).map_err(ConfigError::Decode)?;
    let call = Call { env, conf, raw };
    match env.command {
        Command::Add => call.add().map(Some),
        Command::Del => call.del().map(|()| None),
        Command::Check => call.check().map(|()| None),
        Command::Gc => call.gc().map(|()| None),
        Command::Status => call.status().map(|()| None),
        Command::Version => Ok(None),
    }
}

struct Call<'a> {
    env: &'a CniEnv,
    conf: NetConf,
    raw: Value,
}

impl Call<'_> {
    fn ipam(&self) -> Result<Option<Ipam>, PluginError> {
        match &self.conf.ipam {
            Some(ipam) => Ok(Some(Ipam::new(
                &ipam.plugin,
                &self.env.path,
                self.raw.clone(),
            )?)),
            None => Ok(None),
        }
    }

    fn store(&self) -> Result<StateStore, PluginError> {
        Ok(StateStore::open(&self.conf.state_dir(), &self.conf.name)?)
    }

    fn require_netns(&self) -> Result<PathBuf, PluginError> {
        let netns = self.env.netns.clone().unwrap_or_default();
        if netns.exists() {
            Ok(netns)
        } else {
            Err(PluginError::NetnsMissing(netns))
        }
    }

    fn require_version(&self, command: Command) -> Result<(), PluginError> {
        if self.conf.version() < CniVersion::V1_1_0 {
            return Err(PluginError::CommandNeedsNewerVersion {
                command,
                version: self.conf.cni_version.clone(),
            });
        }
        Ok(())
    }

    fn prev_result(&self) -> Result<Option<CniResult>, PluginError> {
        self.conf
            .prev_result
            .clone()
            .map(|v| CniResult::from_value(v, "prevResult").map_err(PluginError::PrevResult))
            .transpose()
    }

    fn add(&self) -> Result<Value, PluginError> {
        let netns = self.require_netns()?;
        let prev = self.prev_result()?;
        let args_mac = self
            .env
            .args
            .mac
            .as_deref()
            .map(str::parse::<MacAddress>)
            .transpose()
            .map_err(PluginError::ArgsMac)?;
        let ipam = self.ipam()?;
        let store = self.store()?;
        let (cid, ifname) = (self.env.container_id(), self.env.ifname());
        if let Some(stale) = store.load(cid, ifname)? {
            // The runtime lost track of an earlier ADD: start from a clean slate.
            tracing::warn!(
                cid,
                ifname,
                "ADD over an existing attachment; removing it first"
            );
            teardown(&stale, self.env.netns.as_deref(), ipam.as_ref())?;
            store.remove(cid, ifname)?;
        }
        let mut record = AttachmentRecord::new(cid, ifname, Some(netns), self.conf.mode);
        match self.add_steps(&mut record, &store, ipam.as_ref(), prev, args_mac) {
            Ok(result) => {
                record.result = Some(result.clone());
                store.save(&record)?;
                Ok(result.to_json(self.conf.version()))
            }
            Err(e) => {
                match teardown(&record, self.env.netns.as_deref(), ipam.as_ref()) {
                    Ok(()) => store.remove(cid, ifname)?,
                    // Keep the record: DEL or GC retries the cleanup.
                    Err(undo) => tracing::error!("undoing the failed ADD failed too: {undo}"),
                }
                Err(e)
            }
        }
    }

    fn add_steps(
        &self,
        record: &mut AttachmentRecord,
        store: &StateStore,
        ipam: Option<&Ipam>,
        prev: Option<CniResult>,
        args_mac: Option<MacAddress>,
    ) -> Result<CniResult, PluginError> {
        if ipam.is_some() {
            record.ipam_leased = true;
            store.save(record)?;
        }
        // vhost-user: the TAP and the datapath need no addresses, so they are made while the
        // IPAM plugin runs (its process is most of ADD's time).
        let vm_mac = match self.conf.mode {
            Mode::VhostUser => {
                Some(vhost_user::vm_mac(&self.conf, self.env).map_err(PluginError::ArgsMac)?)
            }
            Mode::Sriov => None,
        };
        let (leased, prepared) = std::thread::scope(|scope| {
            let lease = ipam.map(|ipam| scope.spawn(move || ipam.add(None)));
            let prepared =
                vm_mac.map(|mac| vhost_user::prepare(&self.conf, mac, self.env, record, store));
            let leased = lease.map(join_ipam);
            (leased.transpose(), prepared.transpose())
        });
        let (leased, prepared) = (leased?, prepared?);
        let mut result = prev.unwrap_or_default();
        let (mut ips, routes, dns) = match leased {
            Some(leased) => (leased.ips, leased.routes, leased.dns),
            None => {
                let ips = self
                    .conf
                    .requested_ips()
                    .into_iter()
                    .map(|address| IpConfig {
                        address,
                        gateway: None,
                        interface: None,
                    })
                    .collect();
                (ips, Vec::new(), Default::default())
            }
        };
        let interfaces = match prepared {
            Some(prepared) => {
                let addresses: Vec<_> = ips.iter().map(|ip| ip.address.addr).collect();
                vhost_user::finish(prepared, &addresses, self.env, record)?
            }
            None => {
                let mac = self
                    .conf
                    .runtime_config
                    .mac
                    .or(self.conf.args.cni.mac)
                    .or(args_mac)
                    .or(self.conf.mac);
                sriov::add(&self.conf, self.env, mac, &ips, &routes, record, store)?
            }
        };
        // The IPs belong to our last interface: the one the VM or pod sees.
        let ours = result.interfaces.len() + interfaces.len() - 1;
        for ip in &mut ips {
            ip.interface = Some(ours);
        }
        result.interfaces.extend(interfaces);
        result.ips.extend(ips);
        result.routes.extend(routes);
        if result.dns == Default::default() {
            result.dns = dns;
        }
        Ok(result)
    }

    fn del(&self) -> Result<(), PluginError> {
        let ipam = self.ipam()?;
        let store = self.store()?;
        let (cid, ifname) = (self.env.container_id(), self.env.ifname());
        match store.load(cid, ifname)? {
            Some(record) => {
                let netns = self.env.netns.clone().or(record.netns.clone());
                teardown(&record, netns.as_deref(), ipam.as_ref())?;
                store.remove(cid, ifname)?;
            }
            // Nothing of ours (a second DEL, or an ADD that never got far): IPAM DEL is
            // idempotent and may still hold a lease from a crashed ADD.
            None => {
                if let Some(ipam) = &ipam {
                    ipam.del(None)?;
                }
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), PluginError> {
        self.require_netns()?;
        let prev = self.prev_result()?.ok_or(PluginError::NoPrevResult)?;
        let store = self.store()?;
        let (cid, ifname) = (self.env.container_id(), self.env.ifname());
        let record = store
            .load(cid, ifname)?
            .ok_or_else(|| PluginError::UnknownAttachment {
                network: self.conf.name.clone(),
                container_id: cid.to_owned(),
                ifname: ifname.to_owned(),
            })?;
        if let Some(vhost) = &record.vhost_user {
            vhost_user::check(&self.conf, self.env, vhost, &prev)?;
        }
        if let Some(sriov) = &record.sriov {
            sriov::check(&self.conf, self.env, sriov, &prev)?;
        }
        if let Some(ipam) = self.ipam()? {
            ipam.check(None)?;
        }
        Ok(())
    }

    fn gc(&self) -> Result<(), PluginError> {
        self.require_version(Command::Gc)?;
        let valid = self.conf.valid_attachments.clone().unwrap_or_default();
        let ipam = self.ipam()?;
        let store = self.store()?;
        let mut failed = Vec::new();
        for record in store.list()? {
            let keep = valid
                .iter()
                .any(|a| a.container_id == record.container_id && a.ifname == record.ifname);
            if keep {
                continue;
            }
            tracing::info!(cid = %record.container_id, ifname = %record.ifname, "GC removes a stale attachment");
            let removed = teardown(&record, record.netns.as_deref(), ipam.as_ref())
                .and_then(|()| Ok(store.remove(&record.container_id, &record.ifname)?));
            if let Err(e) = removed {
                tracing::warn!(cid = %record.container_id, "GC: {e}");
                failed.push(e);
            }
        }
        let count = failed.len();
        match failed.into_iter().next() {
            Some(first) => Err(PluginError::GcIncomplete(count, Box::new(first))),
            None => Ok(()),
        }
    }

    fn status(&self) -> Result<(), PluginError> {
        self.require_version(Command::Status)?;
        let unavailable = |what: String| PluginError::NotAvailable(what);
        self.store().map_err(|e| unavailable(e.to_string()))?;
        self.ipam().map_err(|e| unavailable(e.to_string()))?;
        match self.conf.mode {
            Mode::VhostUser => {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/net/tun")
                    .map_err(|e| {
                        unavailable(format!(
                            "cannot open /dev/net/tun ({e}); load the tun module"
                        ))
                    })?;
            }
            Mode::Sriov => {
                let devices = sriov::sysfs::Sysfs::from_env().devices();
                std::fs::read_dir(&devices).map_err(|e| {
                    unavailable(format!(
                        "cannot list {} ({e}); is sysfs mounted?",
                        devices.display()
                    ))
                })?;
            }
        }
        Ok(())
    }
}

/// Removes everything `record` says exists: the mode's objects and the IPAM lease. Goes on
/// after a failed step and returns the first failure.
///
/// The lease is released on a second thread while the mode's objects go: both mostly wait
/// (for the IPAM plugin's process; for the RCU grace periods of unregistering a link, ~20 ms),
/// so DEL takes the longer of the two instead of their sum. An address reused meanwhile
/// is no conflict: the eBPF datapath keys endpoint addresses by interface, and the old TAP
/// has no backend left to send from it.
fn teardown(
    record: &AttachmentRecord,
    netns: Option<&Path>,
    ipam: Option<&Ipam>,
) -> Result<(), PluginError> {
    let release = |ipam: &Ipam| ipam.del(Some((&record.container_id, &record.ifname)));
    let (mode, lease) = std::thread::scope(|scope| {
        let lease = ipam
            .filter(|_| record.ipam_leased)
            .map(|ipam| scope.spawn(move || release(ipam)));
        let mode = teardown_mode(record, netns);
        let lease = lease.map(join_ipam);
        (mode, lease)
    });
    mode?;
    if let Some(lease) = lease {
        lease?;
    }
    Ok(())
}

/// The outcome of an IPAM call run on a thread of its own (ADD and DEL overlap it with the
/// mode's work); a panic there is an IPAM failure.
fn join_ipam<T>(
    handle: std::thread::ScopedJoinHandle<'_, Result<T, IpamError>>,
) -> Result<T, IpamError> {
    handle.join().unwrap_or_else(|_| {
        Err(IpamError::Spawn(
            PathBuf::from("ipam"),
            std::io::Error::other("the IPAM thread panicked"),
        ))
    })
}

/// The mode's part of [`teardown`].
fn teardown_mode(record: &AttachmentRecord, netns: Option<&Path>) -> Result<(), PluginError> {
    let mut first: Option<PluginError> = None;
    if let Some(vhost) = &record.vhost_user
        && let Err(e) = vhost_user::teardown(vhost)
    {
        first.get_or_insert(e.into());
    }
    if let Some(sriov) = &record.sriov
        && let Err(e) = sriov::teardown(sriov, &record.ifname, netns)
    {
        first.get_or_insert(e.into());
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_object_has_the_message_once_and_the_causes_as_details() {
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        let error = PluginError::State(StateError::CreateDir("/x".into(), io));
        let object = error.to_error_object("1.0.0");
        assert_eq!(object.code, 5);
        assert_eq!(object.cni_version, "1.0.0");
        assert!(
            object
                .msg
                .starts_with("cannot create the state directory /x"),
            "{object:?}"
        );
        assert!(object.details.contains("Permission denied"), "{object:?}");
        assert!(!object.details.contains("cannot create"), "{object:?}");
    }

    #[test]
    fn a_missing_environment_is_code_4_in_the_callers_version() {
        let outcome = run(|_| None, br#"{"cniVersion": "0.4.0"}"#);
        assert_eq!(outcome.exit_code, 1);
        let object: ErrorObject = serde_json::from_str(&outcome.stdout).unwrap();
        assert_eq!((object.code, object.cni_version.as_str()), (4, "0.4.0"));
        assert!(object.msg.contains("CNI_COMMAND"), "{object:?}");
    }
}
