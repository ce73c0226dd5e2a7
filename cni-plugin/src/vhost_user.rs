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

/// What [`prepare`] made: the TAP (its MAC) and, with `networkId`, the datapath ready for the
/// endpoint.
pub struct Prepared {
    tap_mac: Option<MacAddress>,
    datapath: Option<Datapath>,
}

/// The part of ADD that needs no addresses, so it runs while the IPAM plugin does: creates the
/// TAP (recorded first), brings it up with its MTU and, when `networkId` is set, opens the eBPF
/// datapath and makes sure the network exists.
pub fn prepare(
    conf: &NetConf,
    mac: MacAddress,
    env: &CniEnv,
    record: &mut AttachmentRecord,
    store: &StateStore,
) -> Result<Prepared, VhostUserError> {
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
    let endpoint = conf.network_id.map(|network| EndpointRecord {
        network,
        pin_dir: conf
            .bpf_pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
    });
    record.vhost_user = Some(VhostUserRecord {
        tap: name.clone(),
        mac,
        queues,
        mtu: conf.mtu,
        socket_path: socket_dir.join(format!("{name}.sock")),
        endpoint: endpoint.clone(),
    });
    store.save(record)?;
    tap::create_tap(
        &name,
        TapSpec {
            queues,
            owner: conf.tap_owner,
            group: conf.tap_group,
        },
    )?;
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
    let datapath = endpoint
        .as_ref()
        .map(|e| open_network(&name, e))
        .transpose()?;
    Ok(Prepared {
        tap_mac: link.mac,
        datapath,
    })
}

/// The rest of ADD once the addresses are known: the endpoint joins its network (the VM may
/// send only from its MAC and `addresses`). Returns the result's interfaces: the host-side
/// TAP, then the VM's interface (with `socketPath`), which the IPs point at.
pub fn finish(
    prepared: Prepared,
    addresses: &[IpAddr],
    env: &CniEnv,
    record: &AttachmentRecord,
) -> Result<Vec<Interface>, VhostUserError> {
    let vhost = record
        .vhost_user
        .as_ref()
        .ok_or_else(|| VhostUserError::Check("the record lost its vhost-user part".into()))?;
    if let (Some(datapath), Some(endpoint)) = (&prepared.datapath, &vhost.endpoint) {
        // A filter, not a TCX link: see `link_endpoint`.
        datapath
            .attach_endpoint_filter(
                &vhost.tap,
                &EndpointConfig {
                    network: endpoint.network,
                    mac: vhost.mac.octets(),
                    addresses: addresses.to_vec(),
                    policy: None,
                },
            )
            .map_err(attach_error(&vhost.tap, endpoint))?;
        tracing::info!(tap = %vhost.tap, network = endpoint.network, "endpoint attached to the eBPF datapath");
    }
    Ok(interfaces(vhost, prepared.tap_mac, env))
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

fn attach_error(tap: &str, endpoint: &EndpointRecord) -> impl Fn(DatapathError) -> VhostUserError {
    move |source| VhostUserError::Attach {
        tap: tap.to_owned(),
        network: endpoint.network,
        pin_dir: endpoint.pin_dir.clone(),
        source: Box::new(source),
    }
}

/// Opens (or loads) the datapath and creates the endpoint's network if this node has none:
/// the first attachment to a network nobody set up here makes it, without a VLAN.
fn open_network(tap: &str, endpoint: &EndpointRecord) -> Result<Datapath, VhostUserError> {
    let datapath = Datapath::open_or_load(&DatapathConfig {
        pin_dir: endpoint.pin_dir.clone(),
    })
    .map_err(attach_error(tap, endpoint))?;
    if datapath
        .ensure_network(endpoint.network)
        .map_err(attach_error(tap, endpoint))?
    {
        tracing::info!(network = endpoint.network, "created the VM network");
    }
    Ok(datapath)
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

/// Removes what [`prepare`] and [`finish`] made; anything already gone is fine. The TAP goes first:
/// unregistering it takes its program off the hook without the RCU grace period a detach
/// of a TCX link would wait for, and the endpoint's pins and map entries follow.
pub fn teardown(record: &VhostUserRecord) -> Result<(), VhostUserError> {
    let mut netlink = Netlink::open()?;
    if let Some(link) = netlink.link(&record.tap, false)? {
        // Only delete a TUN/TAP: a different kind of link under our name is not ours.
        if tap::tun_flags(&record.tap).is_some() {
            netlink.delete_link_unlisted(link.index)?;
            tracing::info!(tap = %record.tap, "TAP deleted");
        } else {
            tracing::warn!(link = %record.tap, "not a TAP; left alone");
        }
    }
    if let Some(endpoint) = &record.endpoint {
        detach_endpoint(&record.tap, endpoint)?;
    }
    Ok(())
}

/// Makes the endpoint's cls_bpf filter, which ADD attaches because it costs no RCU grace
/// period, a TCX link, which saves the qdisc hop on every packet (~5 % of small-frame
/// throughput). For the node agent, before the VM's NIC backend starts; true when it swapped.
pub fn link_endpoint(record: &VhostUserRecord) -> Result<bool, VhostUserError> {
    let Some(endpoint) = &record.endpoint else {
        return Ok(false);
    };
    Datapath::open_or_load(&DatapathConfig {
        pin_dir: endpoint.pin_dir.clone(),
    })
    .and_then(|datapath| datapath.link_endpoint_filter(&record.tap))
    .map_err(attach_error(&record.tap, endpoint))
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
