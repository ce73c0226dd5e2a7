//! The PF-side VF settings (`ip link set PF vf N ...`): read and written through netlink on a
//! real SR-IOV NIC, or recorded in a file of the fake sysfs tree in tests (no SR-IOV hardware
//! is needed to test everything around them).

use std::path::PathBuf;

use netlink_packet_route::link::{
    LinkVfInfo, VfInfo, VfInfoLinkState, VfInfoMac, VfInfoRate, VfInfoSpoofCheck, VfInfoTrust,
    VfLinkState, VfVlan, VfVlanInfo, VlanProtocol,
};
use serde::{Deserialize, Serialize};

use super::sysfs::Sysfs;
use crate::addressing::MacAddress;
use crate::config::{VfLinkStateConf, VlanProto};
use crate::netlink::{Netlink, NetlinkError};

/// The fake PF's file inside a fake sysfs root.
pub const RECORDING_FILE: &str = "ferrovirt-test-pf.json";

#[derive(Debug, thiserror::Error)]
pub enum PfError {
    #[error("PF {0:?} does not exist in our network namespace")]
    NoPf(String),
    #[error("PF {pf:?} reports no VF {vf}; is sriov_numvfs large enough?")]
    NoVf { pf: String, vf: u32 },
    #[error("setting {what} of VF {vf} on PF {pf:?}")]
    Set {
        pf: String,
        vf: u32,
        what: &'static str,
        #[source]
        source: NetlinkError,
    },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("the test PF file {0}")]
    Recording(PathBuf, #[source] std::io::Error),
    #[error("the test PF refuses {what} of VF {vf} (failure injected by the test)")]
    Injected { vf: u32, what: String },
}

/// A VF's settings as its PF holds them. `None`: the driver does not report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VfSettings {
    pub mac: MacAddress,
    pub vlan: u16,
    pub qos: u8,
    pub proto: VlanProto,
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    pub link_state: Option<VfLinkStateConf>,
    pub min_tx_rate: u32,
    pub max_tx_rate: u32,
}

impl Default for VfSettings {
    /// What a freshly created VF usually has.
    fn default() -> Self {
        VfSettings {
            mac: MacAddress([0; 6]),
            vlan: 0,
            qos: 0,
            proto: VlanProto::Dot1Q,
            spoofchk: Some(true),
            trust: Some(false),
            link_state: Some(VfLinkStateConf::Auto),
            min_tx_rate: 0,
            max_tx_rate: 0,
        }
    }
}

/// Changes to a VF; each `Some` is one netlink request, in this order (drivers refuse some
/// combinations in one message, and a refusal then names the setting).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VfChange {
    pub mac: Option<MacAddress>,
    /// (VLAN, QoS, protocol)
    pub vlan: Option<(u16, u8, VlanProto)>,
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    pub link_state: Option<VfLinkStateConf>,
    /// (min, max) in Mbit/s
    pub rate: Option<(u32, u32)>,
}

impl VfChange {
    /// Everything needed to go back to `settings`.
    pub fn restoring(settings: &VfSettings) -> VfChange {
        VfChange {
            mac: Some(settings.mac),
            vlan: Some((settings.vlan, settings.qos, settings.proto)),
            spoofchk: settings.spoofchk,
            trust: settings.trust,
            link_state: settings.link_state,
            rate: Some((settings.min_tx_rate, settings.max_tx_rate)),
        }
    }

    /// What it takes to go from `current` back to `original`: only the settings that differ
    /// (a PF that refused a setting during ADD need not be asked for it again).
    pub fn restoring_from(current: &VfSettings, original: &VfSettings) -> VfChange {
        let full = VfChange::restoring(original);
        let differs = |want: Option<bool>, have: Option<bool>| want.filter(|w| have != Some(*w));
        VfChange {
            mac: full.mac.filter(|m| *m != current.mac),
            vlan: full
                .vlan
                .filter(|v| *v != (current.vlan, current.qos, current.proto)),
            spoofchk: differs(full.spoofchk, current.spoofchk),
            trust: differs(full.trust, current.trust),
            link_state: full.link_state.filter(|l| current.link_state != Some(*l)),
            rate: full
                .rate
                .filter(|r| *r != (current.min_tx_rate, current.max_tx_rate)),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == VfChange::default()
    }

    /// Whether `settings` already have everything this change sets.
    pub fn is_satisfied_by(&self, settings: &VfSettings) -> bool {
        self.mac.is_none_or(|m| m == settings.mac)
            && self
                .vlan
                .is_none_or(|v| v == (settings.vlan, settings.qos, settings.proto))
            && self
                .spoofchk
                .is_none_or(|s| settings.spoofchk.is_none_or(|have| have == s))
            && self
                .trust
                .is_none_or(|t| settings.trust.is_none_or(|have| have == t))
            && self
                .link_state
                .is_none_or(|l| settings.link_state.is_none_or(|have| have == l))
            && self
                .rate
                .is_none_or(|r| r == (settings.min_tx_rate, settings.max_tx_rate))
    }
}

/// Reads and changes VF settings through the PF.
pub trait PfControl {
    fn vf_settings(&mut self, pf: &str, vf: u32) -> Result<VfSettings, PfError>;
    fn apply(&mut self, pf: &str, vf: u32, change: &VfChange) -> Result<(), PfError>;
}

/// The PF control for this sysfs: netlink for the real one, the recording file for a fake one.
pub fn pf_control(sysfs: &Sysfs) -> Box<dyn PfControl> {
    if sysfs.is_fake() {
        Box::new(RecordingPf {
            path: sysfs.root().join(RECORDING_FILE),
        })
    } else {
        Box::new(NetlinkPf)
    }
}

/// The real PF: RTM_GETLINK with the VF extension mask, RTM_SETLINK with IFLA_VFINFO_LIST.
pub struct NetlinkPf;

impl PfControl for NetlinkPf {
    fn vf_settings(&mut self, pf: &str, vf: u32) -> Result<VfSettings, PfError> {
        let mut netlink = Netlink::open()?;
        let link = netlink
            .link(pf, true)?
            .ok_or_else(|| PfError::NoPf(pf.to_owned()))?;
        let infos = link
            .vfs
            .iter()
            .find(|info| vf_id_of(info) == Some(vf))
            .ok_or_else(|| PfError::NoVf {
                pf: pf.to_owned(),
                vf,
            })?;
        Ok(settings_from(infos))
    }

    fn apply(&mut self, pf: &str, vf: u32, change: &VfChange) -> Result<(), PfError> {
        let mut netlink = Netlink::open()?;
        let index = netlink
            .link(pf, false)?
            .ok_or_else(|| PfError::NoPf(pf.to_owned()))?
            .index;
        for (what, info) in vf_infos(vf, change) {
            netlink
                .set_vf(index, LinkVfInfo(vec![info]))
                .map_err(|source| PfError::Set {
                    pf: pf.to_owned(),
                    vf,
                    what,
                    source,
                })?;
        }
        Ok(())
    }
}

fn vf_id_of(info: &LinkVfInfo) -> Option<u32> {
    info.0.iter().find_map(|attr| match attr {
        VfInfo::Mac(m) => Some(m.vf_id),
        _ => None,
    })
}

fn settings_from(info: &LinkVfInfo) -> VfSettings {
    let mut settings = VfSettings {
        spoofchk: None,
        trust: None,
        link_state: None,
        ..VfSettings::default()
    };
    for attr in &info.0 {
        match attr {
            VfInfo::Mac(m) => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&m.mac[..6]);
                settings.mac = MacAddress(mac);
            }
            VfInfo::Vlan(v) => {
                settings.vlan = v.vlan_id as u16;
                settings.qos = v.qos as u8;
            }
            VfInfo::VlanList(list) => {
                if let Some(VfVlan::Info(v)) = list.first() {
                    settings.vlan = v.vlan_id as u16;
                    settings.qos = v.qos as u8;
                    settings.proto = if v.protocol == VlanProtocol::Ieee8021Ad {
                        VlanProto::Dot1Ad
                    } else {
                        VlanProto::Dot1Q
                    };
                }
            }
            VfInfo::SpoofCheck(s) => settings.spoofchk = Some(s.enabled),
            VfInfo::Trust(t) => settings.trust = Some(t.enabled),
            VfInfo::LinkState(l) => {
                settings.link_state = match l.state {
                    VfLinkState::Auto => Some(VfLinkStateConf::Auto),
                    VfLinkState::Enable => Some(VfLinkStateConf::Enable),
                    VfLinkState::Disable => Some(VfLinkStateConf::Disable),
                    _ => None,
                }
            }
            VfInfo::Rate(r) => {
                settings.min_tx_rate = r.min_tx_rate;
                settings.max_tx_rate = r.max_tx_rate;
            }
            _ => {}
        }
    }
    settings
}

fn vf_infos(vf: u32, change: &VfChange) -> Vec<(&'static str, VfInfo)> {
    let mut infos = Vec::new();
    if let Some(mac) = change.mac {
        infos.push(("the MAC", VfInfo::Mac(VfInfoMac::new(vf, &mac.octets()))));
    }
    if let Some((vlan, qos, proto)) = change.vlan {
        let protocol = match proto {
            VlanProto::Dot1Q => VlanProtocol::Ieee8021Q,
            VlanProto::Dot1Ad => VlanProtocol::Ieee8021Ad,
        };
        let info = VfVlanInfo::new(vf, u32::from(vlan), u32::from(qos), protocol);
        infos.push((
            "VLAN/QoS/protocol",
            VfInfo::VlanList(vec![VfVlan::Info(info)]),
        ));
    }
    if let Some(on) = change.spoofchk {
        infos.push((
            "spoofchk",
            VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, on)),
        ));
    }
    if let Some(on) = change.trust {
        infos.push(("trust", VfInfo::Trust(VfInfoTrust::new(vf, on))));
    }
    if let Some(state) = change.link_state {
        let state = match state {
            VfLinkStateConf::Auto => VfLinkState::Auto,
            VfLinkStateConf::Enable => VfLinkState::Enable,
            VfLinkStateConf::Disable => VfLinkState::Disable,
        };
        infos.push((
            "link state",
            VfInfo::LinkState(VfInfoLinkState::new(vf, state)),
        ));
    }
    if let Some((min, max)) = change.rate {
        infos.push((
            "min/max TX rate",
            VfInfo::Rate(VfInfoRate::new(vf, min, max)),
        ));
    }
    infos
}

/// The file the recording PF keeps: each VF's current settings, every change applied, and
/// an optional setting to refuse (failure injection).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recording {
    /// `"<pf>/<vf>"` → settings; a VF not listed has [`VfSettings::default`].
    #[serde(default)]
    pub vfs: std::collections::BTreeMap<String, VfSettings>,
    #[serde(default)]
    pub calls: Vec<RecordedCall>,
    /// Refuse a change that sets this field (`"mac"`, `"vlan"`, `"spoofchk"`, `"trust"`,
    /// `"linkState"`, `"rate"`).
    #[serde(default)]
    pub fail_on: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedCall {
    pub pf: String,
    pub vf: u32,
    pub change: VfChange,
}

/// The test PF: keeps [`Recording`] in a file of the fake sysfs tree.
pub struct RecordingPf {
    path: PathBuf,
}

impl RecordingPf {
    fn load(&self) -> Result<Recording, PfError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| PfError::Recording(self.path.clone(), std::io::Error::other(e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Recording::default()),
            Err(e) => Err(PfError::Recording(self.path.clone(), e)),
        }
    }

    fn store(&self, recording: &Recording) -> Result<(), PfError> {
        let bytes = serde_json::to_vec_pretty(recording)
            .map_err(|e| PfError::Recording(self.path.clone(), std::io::Error::other(e)))?;
        std::fs::write(&self.path, bytes).map_err(|e| PfError::Recording(self.path.clone(), e))
    }
}

impl PfControl for RecordingPf {
    fn vf_settings(&mut self, pf: &str, vf: u32) -> Result<VfSettings, PfError> {
        Ok(self
            .load()?
            .vfs
            .get(&format!("{pf}/{vf}"))
            .cloned()
            .unwrap_or_default())
    }

    fn apply(&mut self, pf: &str, vf: u32, change: &VfChange) -> Result<(), PfError> {
        let mut recording = self.load()?;
        let key = format!("{pf}/{vf}");
        let mut settings = recording.vfs.get(&key).cloned().unwrap_or_default();
        // Apply field by field like the netlink PF, so an injected failure leaves the earlier
        // fields changed, as a real partial failure would.
        let steps: [(&str, bool); 6] = [
            ("mac", change.mac.is_some()),
            ("vlan", change.vlan.is_some()),
            ("spoofchk", change.spoofchk.is_some()),
            ("trust", change.trust.is_some()),
            ("linkState", change.link_state.is_some()),
            ("rate", change.rate.is_some()),
        ];
        let mut result = Ok(());
        for (field, set) in steps {
            if !set {
                continue;
            }
            if recording.fail_on.as_deref() == Some(field) {
                result = Err(PfError::Injected {
                    vf,
                    what: field.to_owned(),
                });
                break;
            }
            match field {
                "mac" => settings.mac = change.mac.unwrap_or(settings.mac),
                "vlan" => {
                    if let Some((vlan, qos, proto)) = change.vlan {
                        (settings.vlan, settings.qos, settings.proto) = (vlan, qos, proto);
                    }
                }
                "spoofchk" => settings.spoofchk = change.spoofchk,
                "trust" => settings.trust = change.trust,
                "linkState" => settings.link_state = change.link_state,
                _ => {
                    if let Some((min, max)) = change.rate {
                        (settings.min_tx_rate, settings.max_tx_rate) = (min, max);
                    }
                }
            }
        }
        recording.vfs.insert(key, settings);
        recording.calls.push(RecordedCall {
            pf: pf.to_owned(),
            vf,
            change: change.clone(),
        });
        self.store(&recording)?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_becomes_one_vf_attribute_for_that_vf() {
        let change = VfChange {
            mac: Some("02:00:00:00:00:09".parse().unwrap()),
            vlan: Some((100, 3, VlanProto::Dot1Ad)),
            spoofchk: Some(false),
            trust: Some(true),
            link_state: Some(VfLinkStateConf::Enable),
            rate: Some((10, 100)),
        };
        let infos = vf_infos(4, &change);
        assert_eq!(infos.len(), 6);
        // What the kernel would report back decodes to the same settings.
        let settings = settings_from(&LinkVfInfo(infos.into_iter().map(|(_, i)| i).collect()));
        assert!(change.is_satisfied_by(&settings), "{settings:?}");
        assert_eq!(settings.proto, VlanProto::Dot1Ad);
        assert_eq!(
            VfChange::restoring(&settings).vlan,
            Some((100, 3, VlanProto::Dot1Ad))
        );
    }

    #[test]
    fn restoring_asks_only_for_the_settings_that_differ() {
        let original = VfSettings::default();
        let current = VfSettings {
            vlan: 7,
            trust: Some(true),
            ..VfSettings::default()
        };
        let change = VfChange::restoring_from(&current, &original);
        assert_eq!(
            change,
            VfChange {
                vlan: Some((0, 0, VlanProto::Dot1Q)),
                trust: Some(false),
                ..VfChange::default()
            }
        );
        assert!(VfChange::restoring_from(&original, &original).is_empty());
    }
}
