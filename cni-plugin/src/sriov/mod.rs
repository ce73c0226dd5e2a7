//! Mode `sriov`: the VF named by `deviceID`, configured through its PF; moved into the pod as
//! `CNI_IFNAME` when a net driver has it (netdevice mode), left for the VM when it is bound to
//! vfio-pci. DEL puts the VF's settings, name and namespace back.

pub mod checkpoint;
pub mod pf;
pub mod sysfs;

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::addressing::MacAddress;
use crate::config::{NetConf, VlanProto};
use crate::env::CniEnv;
use crate::ipam::CODE_OPERATION_FAILED;
use crate::netlink::{LinkChange, Netlink, NetlinkError};
use crate::result::{CniResult, Interface, IpConfig, Route};
use crate::state::{AttachmentRecord, StateError, StateStore};
use pf::{PfError, VfChange, VfSettings};
use sysfs::{Sysfs, SysfsError, VFIO_DRIVER};

#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    #[error(transparent)]
    Pf(#[from] PfError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("network namespace {0} does not exist (CNI_NETNS); is the container still there?")]
    NetnsMissing(String, #[source] std::io::Error),
    #[error(
        "VF {pci} is bound to driver {driver:?} and has no network interface; bind it to its \
         net driver (netdevice mode) or to vfio-pci (VM passthrough)"
    )]
    UnusableDriver { pci: String, driver: Option<String> },
    #[error("an interface named {ifname:?} already exists in {netns}; choose another CNI_IFNAME")]
    IfNameTaken { ifname: String, netns: String },
    #[error("the VF's netdev {0:?} is not in our namespace; is another attachment using the VF?")]
    NetdevMissing(String),
    #[error("CHECK: {0}")]
    Check(String),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(
        "no deviceID, and CNI_ARGS has no K8S_POD_UID to find the pod's {0} allocation; give deviceID"
    )]
    NoPodUid(String),
    #[error(
        "pod {pod_uid} has no free {resource} device in the kubelet's checkpoint (allocated: {allocated:?}); does the pod request {resource}, one per interface?"
    )]
    NoFreeDevice {
        pod_uid: String,
        resource: String,
        allocated: Vec<String>,
    },
}

impl SriovError {
    pub fn code(&self) -> u32 {
        match self {
            SriovError::Sysfs(
                SysfsError::BadAddress(_) | SysfsError::Missing(..) | SysfsError::NotAVf(_),
            ) => 7,
            SriovError::NetnsMissing(..) => 3,
            SriovError::State(e) => e.code(),
            _ => CODE_OPERATION_FAILED,
        }
    }
}

/// What ADD found and changed, for DEL, CHECK and GC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SriovRecord {
    pub pci: String,
    pub pf: String,
    pub vf_index: u32,
    /// The VF's settings before ADD.
    pub original: VfSettings,
    /// Set before the first change goes to the PF, so a partial change is undone too.
    pub applied: bool,
    pub netdev: Option<NetdevRecord>,
}

/// The VF's kernel netdev in netdevice mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetdevRecord {
    pub host_name: String,
    pub original_mac: Option<MacAddress>,
    pub original_mtu: Option<u32>,
    pub original_up: bool,
    /// Set before the move into the pod's namespace.
    pub moved: bool,
    /// Set before the rename to CNI_IFNAME.
    pub renamed: bool,
}

/// The PF-side settings the config asks for.
pub fn desired_change(conf: &NetConf, mac: Option<MacAddress>) -> VfChange {
    let rate = (conf.min_tx_rate.is_some() || conf.max_tx_rate.is_some())
        .then(|| (conf.min_tx_rate.unwrap_or(0), conf.max_tx_rate.unwrap_or(0)));
    VfChange {
        mac,
        vlan: conf.vlan.map(|vlan| {
            (
                vlan,
                conf.vlan_qos.unwrap_or(0),
                conf.vlan_proto.unwrap_or(VlanProto::Dot1Q),
            )
        }),
        spoofchk: conf.spoofchk.map(|s| s.is_on()),
        trust: conf.trust.map(|s| s.is_on()),
        link_state: conf.link_state,
        rate,
    }
}

/// The VF to attach: `deviceID`, else the first device of `resourceName` allocated to the
/// pod (the kubelet's checkpoint) that no other attachment of this network uses.
fn device_for(conf: &NetConf, env: &CniEnv, store: &StateStore) -> Result<String, SriovError> {
    if let Some(id) = &conf.device_id {
        return Ok(id.clone());
    }
    let resource = conf.resource_name.clone().unwrap_or_default();
    let pod_uid = env
        .args
        .pod_uid
        .clone()
        .ok_or_else(|| SriovError::NoPodUid(resource.clone()))?;
    let path = conf
        .device_checkpoint
        .clone()
        .unwrap_or_else(|| checkpoint::DEFAULT_PATH.into());
    let allocated = checkpoint::device_ids(&path, &pod_uid, &resource)?;
    let used: Vec<String> = store
        .list()?
        .into_iter()
        .filter(|r| {
            r.ifname != env.ifname()
                || r.container_id != env.container_id.clone().unwrap_or_default()
        })
        .filter_map(|r| r.sriov.map(|s| s.pci))
        .collect();
    allocated
        .iter()
        .find(|id| !used.contains(id))
        .cloned()
        .ok_or(SriovError::NoFreeDevice {
            pod_uid,
            resource,
            allocated,
        })
}

fn open_netns(path: &Path) -> Result<File, SriovError> {
    File::open(path).map_err(|e| SriovError::NetnsMissing(path.display().to_string(), e))
}

/// Configures the VF and, in netdevice mode, moves it into the pod with `ips` and `routes`.
/// Every step is written to `record` before it is taken, so a failure (or a crash) can be
/// undone by [`teardown`].
#[allow(clippy::too_many_arguments)]
pub fn add(
    conf: &NetConf,
    env: &CniEnv,
    mac: Option<MacAddress>,
    ips: &[IpConfig],
    routes: &[Route],
    record: &mut AttachmentRecord,
    store: &StateStore,
) -> Result<Vec<Interface>, SriovError> {
    let sysfs = Sysfs::from_env();
    let pci = &device_for(conf, env, store)?;
    let vf = sysfs.vf(pci)?;
    let netdevice = match (&vf.driver, &vf.netdev) {
        (Some(driver), _) if driver == VFIO_DRIVER => None,
        (_, Some(netdev)) => Some(netdev.clone()),
        (driver, None) => {
            return Err(SriovError::UnusableDriver {
                pci: pci.to_owned(),
                driver: driver.clone(),
            });
        }
    };
    let netns_path = env.netns.clone().unwrap_or_default();
    let netns = open_netns(&netns_path)?;
    let mut pod = Netlink::open_in(&netns)?;
    if netdevice.is_some() && pod.link(env.ifname(), false)?.is_some() {
        return Err(SriovError::IfNameTaken {
            ifname: env.ifname().to_owned(),
            netns: netns_path.display().to_string(),
        });
    }

    let mut pf = pf::pf_control(&sysfs);
    let original = pf.vf_settings(&vf.pf_netdev, vf.index)?;
    let change = desired_change(conf, mac);
    record.sriov = Some(SriovRecord {
        pci: pci.to_owned(),
        pf: vf.pf_netdev.clone(),
        vf_index: vf.index,
        original: original.clone(),
        applied: !change.is_empty(),
        netdev: None,
    });
    store.save(record)?;
    if !change.is_empty() {
        pf.apply(&vf.pf_netdev, vf.index, &change)?;
        tracing::info!(pci, pf = %vf.pf_netdev, vf = vf.index, ?change, "VF configured");
    }

    let sandbox = Some(netns_path.display().to_string());
    let Some(host_name) = netdevice else {
        let vf_mac = mac.or((original.mac != MacAddress([0; 6])).then_some(original.mac));
        return Ok(vec![Interface {
            name: env.ifname().to_owned(),
            mac: vf_mac,
            mtu: None,
            sandbox,
            socket_path: None,
            pci_id: Some(pci.to_owned()),
        }]);
    };

    let mut host = Netlink::open()?;
    let link = host
        .link(&host_name, false)?
        .ok_or_else(|| SriovError::NetdevMissing(host_name.clone()))?;
    let netdev_record = NetdevRecord {
        host_name: host_name.clone(),
        original_mac: link.mac,
        original_mtu: link.mtu,
        original_up: link.up,
        moved: false,
        renamed: false,
    };
    update_netdev(record, store, netdev_record.clone())?;
    host.set_link(
        link.index,
        &LinkChange {
            up: Some(false),
            mac,
            mtu: conf.mtu,
            ..LinkChange::default()
        },
    )?;
    update_netdev(
        record,
        store,
        NetdevRecord {
            moved: true,
            ..netdev_record.clone()
        },
    )?;
    host.set_link(
        link.index,
        &LinkChange {
            netns: Some(&netns),
            ..LinkChange::default()
        },
    )?;
    let moved = pod
        .link(&host_name, false)?
        .ok_or_else(|| SriovError::NetdevMissing(host_name.clone()))?;
    update_netdev(
        record,
        store,
        NetdevRecord {
            moved: true,
            renamed: true,
            ..netdev_record
        },
    )?;
    pod.set_link(
        moved.index,
        &LinkChange {
            name: Some(env.ifname()),
            ..LinkChange::default()
        },
    )?;
    pod.set_link(
        moved.index,
        &LinkChange {
            up: Some(true),
            ..LinkChange::default()
        },
    )?;
    for ip in ips {
        pod.add_address(moved.index, ip.address)?;
    }
    for route in routes {
        pod.add_route(moved.index, route.dst, route.gw)?;
    }
    let now = pod.link_by_index(moved.index)?;
    tracing::info!(pci, from = %host_name, to = env.ifname(), "VF netdev moved into the pod");
    Ok(vec![Interface {
        name: env.ifname().to_owned(),
        mac: now.as_ref().and_then(|l| l.mac),
        mtu: now.as_ref().and_then(|l| l.mtu),
        sandbox,
        socket_path: None,
        pci_id: Some(pci.to_owned()),
    }])
}

fn update_netdev(
    record: &mut AttachmentRecord,
    store: &StateStore,
    netdev: NetdevRecord,
) -> Result<(), SriovError> {
    if let Some(sriov) = record.sriov.as_mut() {
        sriov.netdev = Some(netdev);
    }
    store.save(record)?;
    Ok(())
}

/// Undoes [`add`] as far as it got: the netdev back to the host under its old name, MAC and
/// MTU, then the PF-side settings. What is already gone (the pod's netns, a veth destroyed
/// with it) is fine.
pub fn teardown(
    record: &SriovRecord,
    ifname: &str,
    netns: Option<&Path>,
) -> Result<(), SriovError> {
    if let Some(netdev) = &record.netdev {
        return_netdev(record, netdev, ifname, netns)?;
    }
    if record.applied {
        let sysfs = Sysfs::from_env();
        let mut pf = pf::pf_control(&sysfs);
        let change = match pf.vf_settings(&record.pf, record.vf_index) {
            Ok(current) => VfChange::restoring_from(&current, &record.original),
            // Cannot read them back: set everything.
            Err(e) => {
                tracing::warn!(pci = %record.pci, "cannot read the VF's settings: {e}");
                VfChange::restoring(&record.original)
            }
        };
        if !change.is_empty() {
            pf.apply(&record.pf, record.vf_index, &change)?;
        }
        tracing::info!(pci = %record.pci, ?change, "VF settings restored");
    }
    Ok(())
}

fn return_netdev(
    record: &SriovRecord,
    netdev: &NetdevRecord,
    ifname: &str,
    netns: Option<&Path>,
) -> Result<(), SriovError> {
    let mut host = Netlink::open()?;
    let pod_ns = netns.and_then(|path| File::open(path).ok());
    if netdev.moved
        && let Some(pod_ns) = pod_ns
    {
        let mut pod = Netlink::open_in(&pod_ns)?;
        // Only a link we renamed may be found by CNI_IFNAME; before that it has its own name.
        let mut found = pod.link(&netdev.host_name, false)?;
        if found.is_none() && netdev.renamed {
            found = pod.link(ifname, false)?;
        }
        if let Some(link) = found {
            let ours = File::open("/proc/self/ns/net")
                .map_err(|e| SriovError::NetnsMissing("/proc/self/ns/net".into(), e))?;
            pod.set_link(
                link.index,
                &LinkChange {
                    up: Some(false),
                    ..LinkChange::default()
                },
            )?;
            pod.set_link(
                link.index,
                &LinkChange {
                    name: Some(&netdev.host_name),
                    netns: Some(&ours),
                    ..LinkChange::default()
                },
            )?;
        }
    }
    let mut link = host.link(&netdev.host_name, false)?;
    if link.is_none() {
        // A physical netdev comes back to the host by itself when its namespace is
        // deleted, under its pod name; the real sysfs knows which one it is.
        let sysfs = Sysfs::from_env();
        if !sysfs.is_fake()
            && let Some(current) = sysfs.netdev(&record.pci)
            && let Some(found) = host.link(&current, false)?
        {
            host.set_link(
                found.index,
                &LinkChange {
                    up: Some(false),
                    ..LinkChange::default()
                },
            )?;
            host.set_link(
                found.index,
                &LinkChange {
                    name: Some(&netdev.host_name),
                    ..LinkChange::default()
                },
            )?;
            link = Some(found);
        }
    }
    let Some(link) = link else {
        tracing::warn!(netdev = %netdev.host_name, "the VF netdev is gone (destroyed with its namespace?)");
        return Ok(());
    };
    host.set_link(
        link.index,
        &LinkChange {
            mac: netdev.original_mac,
            mtu: netdev.original_mtu,
            ..LinkChange::default()
        },
    )?;
    host.set_link(
        link.index,
        &LinkChange {
            up: Some(netdev.original_up),
            ..LinkChange::default()
        },
    )?;
    tracing::info!(netdev = %netdev.host_name, "VF netdev returned to the host");
    Ok(())
}

/// CHECK: the PF still holds the settings the config asks for; the netdev is in the pod under
/// CNI_IFNAME with the addresses of `prev`, or the VF is still bound to vfio-pci.
pub fn check(
    conf: &NetConf,
    env: &CniEnv,
    record: &SriovRecord,
    prev: &CniResult,
) -> Result<(), SriovError> {
    let sysfs = Sysfs::from_env();
    let mut pf = pf::pf_control(&sysfs);
    let settings = pf.vf_settings(&record.pf, record.vf_index)?;
    let ours = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname() && i.sandbox.is_some());
    let mac = ours.and_then(|index| prev.interfaces[index].mac);
    let wanted = desired_change(conf, conf.requested_mac());
    if !wanted.is_satisfied_by(&settings) {
        return Err(SriovError::Check(format!(
            "VF {} has {settings:?}, the config asks for {wanted:?}",
            record.pci
        )));
    }
    let Some(_) = &record.netdev else {
        let driver = sysfs.driver(&record.pci);
        if driver.as_deref() != Some(VFIO_DRIVER) {
            return Err(SriovError::Check(format!(
                "VF {} is bound to {driver:?}, not {VFIO_DRIVER}",
                record.pci
            )));
        }
        return Ok(());
    };
    let netns = open_netns(env.netns.as_deref().unwrap_or(Path::new("")))?;
    let mut pod = Netlink::open_in(&netns)?;
    let link = pod.link(env.ifname(), false)?.ok_or_else(|| {
        SriovError::Check(format!("{} is not in the pod's namespace", env.ifname()))
    })?;
    if mac.is_some() && link.mac != mac {
        return Err(SriovError::Check(format!(
            "{} has MAC {:?}, prevResult says {mac:?}",
            env.ifname(),
            link.mac
        )));
    }
    let have = pod.addresses(link.index)?;
    for ip in prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == ours)
    {
        if !have.contains(&ip.address) {
            return Err(SriovError::Check(format!(
                "{} lacks address {}",
                env.ifname(),
                ip.address
            )));
        }
    }
    Ok(())
}
