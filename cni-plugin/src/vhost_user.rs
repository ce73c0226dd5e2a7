//! Mode `vhost-user`: the VM's TAP in the host namespace, for the `ferrovirt-vhost-net` that
//! will listen on the result's `socketPath`.

use std::net::IpAddr;
use std::path::PathBuf;

use ferrovirt_ebpf::{DEFAULT_PIN_DIR, Datapath, DatapathConfig, DatapathError, EndpointConfig};

use serde::{Deserialize, Serialize};

use crate::addressing::{MacAddress, fnv1a64};
use crate::config::{DEFAULT_SOCKET_DIR, NetConf};
use crate::env::CniEnv;
use crate::netlink::{LinkChange, Netlink, NetlinkError};
use crate::result::{CniResult, Interface};
use crate::state::{AttachmentRecord, StateError, StateStore};
use crate::tap::{self, TapError, TapSpec};

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(
        "a link named {0:?} already exists; it is the TAP name derived from this container ID \
         and ifname, so another attachment or a leftover holds it: remove it or DEL that attachment"
    )]
    NameTaken(String),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot create the socket directory {0}")]
    SocketDir(PathBuf, #[source] std::io::Error),
    #[error("cannot attach TAP {tap} to network {network} of the eBPF datapath in {pin_dir}")]
    Attach {
        tap: String,
        network: u32,
        pin_dir: PathBuf,
        // Boxed: the datapath's errors are large and this one is rare.
        #[source]
        source: Box<DatapathError>,
    },
    #[error("cannot detach TAP {tap} from the eBPF datapath in {pin_dir}")]
    Detach {
        tap: String,
        pin_dir: PathBuf,
        // Boxed: the datapath's errors are large and this one is rare.
        #[source]
        source: Box<DatapathError>,
    },
    #[error("CHECK: {0}")]
    Check(String),
}

impl VhostUserError {
    pub fn code(&self) -> u32 {
        match self {
            VhostUserError::State(e) => e.code(),
            VhostUserError::SocketDir(..) => 5,
            _ => crate::ipam::CODE_OPERATION_FAILED,
        }
    }
}

/// What ADD made, for DEL, CHECK and GC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VhostUserRecord {
    pub tap: String,
    pub mac: MacAddress,
    pub queues: u16,
    pub mtu: Option<u32>,
    pub socket_path: PathBuf,
    /// Set before the endpoint is attached, so a half-done attach is detached too.
    #[serde(default)]
    pub endpoint: Option<EndpointRecord>,
}

/// The TAP's endpoint on the eBPF datapath.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRecord {
    pub network: u32,
    pub pin_dir: PathBuf,
}

/// The TAP's name: `fv` and 12 hex digits of a hash of container ID and ifname, so the same
/// attachment always gets the same name and two attachments (practically) never share one.
pub fn tap_name(container_id: &str, ifname: &str) -> String {
    let hash = fnv1a64(format!("{container_id}/{ifname}").as_bytes());
    format!("fv{:012x}", hash & 0xffff_ffff_ffff)
}

/// The VM's MAC: asked for by the runtime, `args`, `CNI_ARGS` or the config, else derived
/// from the attachment so it survives a re-ADD.
pub fn vm_mac(
    conf: &NetConf,
    env: &CniEnv,
) -> Result<MacAddress, crate::addressing::AddressingError> {
    if let Some(mac) = conf.runtime_config.mac.or(conf.args.cni.mac) {
        return Ok(mac);
    }
    if let Some(text) = &env.args.mac {
        return text.parse();
    }
    Ok(conf.mac.unwrap_or_else(|| {
        MacAddress::deterministic(format!("{}/{}", env.container_id(), env.ifname()).as_bytes())
    }))
}

/// Creates the TAP, attaches it to the eBPF datapath when `networkId` is set (the VM may send
/// only from `mac` and `addresses`), and returns the result's interfaces: the host-side TAP,
/// then the VM's interface (with `socketPath`), which the IPs point at.
pub fn add(
    conf: &NetConf,
    env: &CniEnv,
    mac: MacAddress,
    addresses: &[IpAddr],
    record: &mut AttachmentRecord,
    store: &StateStore,
) -> Result<Vec<Interface>, VhostUserError> {
    let name = tap_name(env.container_id(), env.ifname());
    let mut netlink = Netlink::open()?;
    if netlink.link(&name, false)?.is_some() {
        return Err(VhostUserError::NameTaken(name));
    }
    let socket_dir = conf
        .socket_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR));
    std::fs::create_dir_all(&socket_dir)
        .map_err(|e| VhostUserError::SocketDir(socket_dir.clone(), e))?;
    let queues = conf.queues.unwrap_or(1);
    tap::create_tap(
        &name,
        TapSpec {
            queues,
            owner: conf.tap_owner,
            group: conf.tap_group,
        },
    )?;
    record.vhost_user = Some(VhostUserRecord {
        tap: name.clone(),
        mac,
        queues,
        mtu: conf.mtu,
        socket_path: socket_dir.join(format!("{name}.sock")),
        endpoint: None,
    });
    store.save(record)?;
    tracing::info!(tap = %name, queues, "TAP created");
    let link = netlink
        .link(&name, false)?
        .ok_or_else(|| VhostUserError::Check(format!("TAP {name} vanished after creation")))?;
    netlink.set_link(
        link.index,
        &LinkChange {
            mtu: conf.mtu,
            up: Some(true),
            ..LinkChange::default()
        },
    )?;
    if let Some(network) = conf.network_id {
        let endpoint = EndpointRecord {
            network,
            pin_dir: conf
                .bpf_pin_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
        };
        if let Some(vhost) = record.vhost_user.as_mut() {
            vhost.endpoint = Some(endpoint.clone());
        }
        store.save(record)?;
        attach_endpoint(&name, &endpoint, mac, addresses)?;
        tracing::info!(tap = %name, network, "endpoint attached to the eBPF datapath");
    }
    let vhost = record
        .vhost_user
        .as_ref()
        .ok_or_else(|| VhostUserError::Check("the record lost its vhost-user part".into()))?;
    Ok(interfaces(vhost, link.mac, env))
}

fn interfaces(
    record: &VhostUserRecord,
    tap_mac: Option<MacAddress>,
    env: &CniEnv,
) -> Vec<Interface> {
    vec![
        Interface {
            name: record.tap.clone(),
            mac: tap_mac,
            mtu: record.mtu,
            ..Interface::default()
        },
        Interface {
            name: env.ifname().to_owned(),
            mac: Some(record.mac),
            mtu: record.mtu,
            sandbox: env.netns.as_ref().map(|p| p.display().to_string()),
            socket_path: Some(record.socket_path.display().to_string()),
            pci_id: None,
        },
    ]
}

fn attach_endpoint(
    tap: &str,
    endpoint: &EndpointRecord,
    mac: MacAddress,
    addresses: &[IpAddr],
) -> Result<(), VhostUserError> {
    let attach_error = |source| VhostUserError::Attach {
        tap: tap.to_owned(),
        network: endpoint.network,
        pin_dir: endpoint.pin_dir.clone(),
        source: Box::new(source),
    };
    let datapath = Datapath::open_or_load(&DatapathConfig {
        pin_dir: endpoint.pin_dir.clone(),
    })
    .map_err(attach_error)?;
    // The first attachment to a network nobody set up on this node creates it (no VLAN).
    if datapath
        .ensure_network(endpoint.network)
        .map_err(attach_error)?
    {
        tracing::info!(network = endpoint.network, "created the VM network");
    }
    datapath
        .attach_endpoint(
            tap,
            &EndpointConfig {
                network: endpoint.network,
                mac: mac.octets(),
                addresses: addresses.to_vec(),
                policy: None,
            },
        )
        .map_err(attach_error)
}

fn detach_endpoint(tap: &str, endpoint: &EndpointRecord) -> Result<(), VhostUserError> {
    // No pin directory: nothing of ours can be attached (and opening would load a fresh
    // datapath just to find that out).
    if !endpoint.pin_dir.exists() {
        return Ok(());
    }
    let detach_error = |source| VhostUserError::Detach {
        tap: tap.to_owned(),
        pin_dir: endpoint.pin_dir.clone(),
        source: Box::new(source),
    };
    Datapath::open_or_load(&DatapathConfig {
        pin_dir: endpoint.pin_dir.clone(),
    })
    .and_then(|datapath| datapath.detach_endpoint(tap))
    .map_err(detach_error)
}

/// Removes what [`add`] made; anything already gone is fine.
pub fn teardown(record: &VhostUserRecord) -> Result<(), VhostUserError> {
    if let Some(endpoint) = &record.endpoint {
        detach_endpoint(&record.tap, endpoint)?;
    }
    let mut netlink = Netlink::open()?;
    if let Some(link) = netlink.link(&record.tap, false)? {
        // Only delete a TUN/TAP: a different kind of link under our name is not ours.
        if tap::tun_flags(&record.tap).is_some() {
            netlink.delete_link(link.index)?;
            tracing::info!(tap = %record.tap, "TAP deleted");
        } else {
            tracing::warn!(link = %record.tap, "not a TAP; left alone");
        }
    }
    Ok(())
}

/// CHECK: the TAP is there with the flags, MTU and owner ADD gave it, and `prev` still lists
/// the VM interface with its MAC and socket.
pub fn check(
    conf: &NetConf,
    env: &CniEnv,
    record: &VhostUserRecord,
    prev: &CniResult,
) -> Result<(), VhostUserError> {
    let mut netlink = Netlink::open()?;
    let link = netlink
        .link(&record.tap, false)?
        .ok_or_else(|| VhostUserError::Check(format!("TAP {} is gone", record.tap)))?;
    let flags = tap::tun_flags(&record.tap)
        .ok_or_else(|| VhostUserError::Check(format!("{} is not a TAP", record.tap)))?;
    let wanted = tap::tap_flags(record.queues);
    // tun_flags also carries IFF_PERSIST etc.; compare the flags we set.
    if flags & wanted != wanted || (record.queues <= 1 && flags & libc::IFF_MULTI_QUEUE != 0) {
        return Err(VhostUserError::Check(format!(
            "TAP {} has flags {flags:#x}, expected {wanted:#x}",
            record.tap
        )));
    }
    if let Some(mtu) = conf.mtu
        && link.mtu != Some(mtu)
    {
        return Err(VhostUserError::Check(format!(
            "TAP {} has MTU {:?}, expected {mtu}",
            record.tap, link.mtu
        )));
    }
    if let Some(uid) = conf.tap_owner
        && tap::tun_owner(&record.tap) != Some(i64::from(uid))
    {
        return Err(VhostUserError::Check(format!(
            "TAP {} is not owned by uid {uid}",
            record.tap
        )));
    }
    if let Some(endpoint) = &record.endpoint {
        let attached = Datapath::open_or_load(&DatapathConfig {
            pin_dir: endpoint.pin_dir.clone(),
        })
        .and_then(|datapath| datapath.counters(&record.tap));
        if let Err(e) = attached {
            return Err(VhostUserError::Check(format!(
                "TAP {} is not an endpoint of the eBPF datapath in {}: {e}",
                record.tap,
                endpoint.pin_dir.display()
            )));
        }
    }
    let socket = record.socket_path.display().to_string();
    let listed = prev.interfaces.iter().any(|i| {
        i.name == env.ifname()
            && i.mac == Some(record.mac)
            && i.socket_path.as_deref().is_none_or(|s| s == socket)
    });
    if !listed {
        return Err(VhostUserError::Check(format!(
            "prevResult has no interface {} with MAC {}",
            env.ifname(),
            record.mac
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_stable_distinct_and_fit_ifnamsiz() {
        let a = tap_name("c0ffee", "net1");
        assert_eq!(a, tap_name("c0ffee", "net1"));
        assert_ne!(a, tap_name("c0ffee", "net2"));
        assert_ne!(a, tap_name("c0ffef", "net1"));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("fv"));
    }
}
