//! The network configuration on stdin: the CNI spec's keys, Multus' additions and ours.
//! Every key is described in cni-plugin/README.md.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::addressing::{IpPrefix, MacAddress};

/// CNI spec versions this plugin speaks, oldest first (VERSION lists them in this order).
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// The plugin's `type`, as runtimes find it in `CNI_PATH`.
pub const PLUGIN_TYPE: &str = "ferrovirt-cni";

/// Where attachment state lives unless `stateDir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cni/ferrovirt";
/// Where the vhost-user sockets go unless `socketDir` says otherwise.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/ferrovirt/vhost-user";
/// The most queue pairs a TAP may get (the kernel's limit is 256 queues).
pub const MAX_QUEUES: u16 = 256;
/// The largest `networkId`: the eBPF datapath keeps networks in an array of 1024.
pub const MAX_NETWORK_ID: u32 = 1023;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the network configuration on stdin is not JSON; pass the network config object")]
    Decode(#[source] serde_json::Error),
    #[error(
        "the network configuration has no \"cniVersion\" string; add one of {SUPPORTED_VERSIONS:?}"
    )]
    MissingVersion,
    #[error("cniVersion {0:?} is not supported; use one of {SUPPORTED_VERSIONS:?}")]
    UnsupportedVersion(String),
    #[error("invalid network configuration: {0}")]
    Invalid(#[source] serde_json::Error),
    #[error(
        "unsupported key(s) {0:?} in the network configuration; check the spelling against \
         cni-plugin/README.md (a misspelt key would otherwise be ignored silently)"
    )]
    UnknownFields(Vec<String>),
    #[error(
        "key {key:?} belongs to mode {belongs:?} and has no meaning in mode {mode:?}; remove it"
    )]
    KeyNotForMode {
        key: &'static str,
        belongs: Mode,
        mode: Mode,
    },
    #[error("{key} = {value} is out of range; {expected}")]
    OutOfRange {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "mode \"sriov\" needs \"deviceID\", the VF's PCI address (Multus injects it for an SR-IOV resource), or \"resourceName\", the device-plugin resource whose allocation to the pod names the VF"
    )]
    NoDeviceId,
}

impl ConfigError {
    /// The spec's error code for this failure.
    pub fn code(&self) -> u32 {
        match self {
            ConfigError::Decode(_) => 6,
            ConfigError::UnsupportedVersion(_) => 1,
            ConfigError::UnknownFields(_) | ConfigError::KeyNotForMode { .. } => 2,
            ConfigError::MissingVersion
            | ConfigError::Invalid(_)
            | ConfigError::OutOfRange { .. }
            | ConfigError::NoDeviceId => 7,
        }
    }
}

/// A CNI spec version this plugin speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub fn parse(text: &str) -> Option<CniVersion> {
        match text {
            "0.4.0" => Some(CniVersion::V0_4_0),
            "1.0.0" => Some(CniVersion::V1_0_0),
            "1.1.0" => Some(CniVersion::V1_1_0),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }
}

/// What the plugin makes for the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Mode {
    /// A TAP in the host namespace for a vhost-user-net backend.
    VhostUser,
    /// An SR-IOV VF, passed through (vfio-pci) or moved into the pod (kernel netdev).
    Sriov,
}

impl TryFrom<String> for Mode {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        match text.as_str() {
            "vhost-user" => Ok(Mode::VhostUser),
            "sriov" => Ok(Mode::Sriov),
            _ => Err(format!(
                "unknown mode {text:?}; use \"vhost-user\" or \"sriov\""
            )),
        }
    }
}

impl From<Mode> for String {
    fn from(mode: Mode) -> String {
        mode.to_string()
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::VhostUser => "vhost-user",
            Mode::Sriov => "sriov",
        })
    }
}

/// `"on"` / `"off"`, as sriov-cni spells its switches (kept so existing
/// NetworkAttachmentDefinitions carry over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

/// The VLAN tag protocol the PF inserts for the VF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VlanProto {
    #[serde(rename = "802.1q", alias = "802.1Q")]
    Dot1Q,
    #[serde(rename = "802.1ad", alias = "802.1AD")]
    Dot1Ad,
}

/// The VF's administrative link state as the PF reports it to the VF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VfLinkStateConf {
    Auto,
    Enable,
    Disable,
}

/// The capabilities a runtime passes (CNI spec conventions `mac` and `ips`); other
/// capabilities a runtime may add are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RuntimeConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpPrefix>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `args.cni`: the same conventions as `runtimeConfig`, set by the operator in the config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Args {
    #[serde(default)]
    pub cni: RuntimeConfig,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `ipam`: only `type` is ours to read; the rest belongs to the IPAM plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub plugin: String,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// One `cni.dev/valid-attachments` entry of a GC call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    // --- CNI spec keys ---
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(default)]
    pub ipam: Option<IpamConf>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub args: Args,
    #[serde(default)]
    pub dns: Option<Value>,
    #[serde(default)]
    pub capabilities: Option<Value>,
    #[serde(default, rename = "disableCheck")]
    pub disable_check: bool,
    #[serde(default, rename = "disableGC")]
    pub disable_gc: bool,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// Multus: the PCI address of the device a device plugin allocated (SR-IOV VF).
    #[serde(default, rename = "deviceID")]
    pub device_id: Option<String>,

    // --- ferrovirt keys, both modes ---
    pub mode: Mode,
    #[serde(default)]
    pub mac: Option<MacAddress>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub state_dir: Option<PathBuf>,

    // --- vhost-user ---
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
    #[serde(default)]
    pub queues: Option<u16>,
    #[serde(default)]
    pub tap_owner: Option<u32>,
    #[serde(default)]
    pub tap_group: Option<u32>,
    #[serde(default)]
    pub network_id: Option<u32>,
    #[serde(default)]
    pub bpf_pin_dir: Option<PathBuf>,

    // --- sriov (sriov-cni's spellings) ---
    #[serde(default)]
    pub vlan: Option<u16>,
    #[serde(default, rename = "vlanQoS")]
    pub vlan_qos: Option<u8>,
    #[serde(default)]
    pub vlan_proto: Option<VlanProto>,
    #[serde(default)]
    pub spoofchk: Option<Switch>,
    #[serde(default)]
    pub trust: Option<Switch>,
    #[serde(default, rename = "link_state")]
    pub link_state: Option<VfLinkStateConf>,
    #[serde(default, rename = "min_tx_rate")]
    pub min_tx_rate: Option<u32>,
    #[serde(default, rename = "max_tx_rate")]
    pub max_tx_rate: Option<u32>,
    /// The device-plugin resource of the VFs (`devices.ferrovirt.io/sriov-<pool>`): without
    /// `deviceID`, the VF is the pod's allocation of it in the kubelet's device checkpoint.
    #[serde(default)]
    pub resource_name: Option<String>,
    /// Path of the kubelet's device checkpoint (default
    /// /var/lib/kubelet/device-plugins/kubelet_internal_checkpoint).
    #[serde(default)]
    pub device_checkpoint: Option<PathBuf>,

    /// Anything else: rejected by [`parse_netconf`] so a typo cannot pass unnoticed.
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, Value>,
}

impl NetConf {
    pub fn version(&self) -> CniVersion {
        // parse_netconf checked it; 1.1.0 is only a fallback for hand-built values.
        CniVersion::parse(&self.cni_version).unwrap_or(CniVersion::V1_1_0)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }

    /// The MAC the caller asked for: `runtimeConfig.mac` (Multus, from the pod annotation),
    /// then `args.cni.mac`, then the config's `mac`.
    pub fn requested_mac(&self) -> Option<MacAddress> {
        self.runtime_config.mac.or(self.args.cni.mac).or(self.mac)
    }

    /// Static addresses from `runtimeConfig.ips` or `args.cni.ips`, used when there is no IPAM.
    pub fn requested_ips(&self) -> Vec<IpPrefix> {
        if self.runtime_config.ips.is_empty() {
            self.args.cni.ips.clone()
        } else {
            self.runtime_config.ips.clone()
        }
    }

    fn check_mode_keys(&self) -> Result<(), ConfigError> {
        let vhost_keys: [(&'static str, bool); 6] = [
            ("socketDir", self.socket_dir.is_some()),
            ("queues", self.queues.is_some()),
            ("tapOwner", self.tap_owner.is_some()),
            ("tapGroup", self.tap_group.is_some()),
            ("networkId", self.network_id.is_some()),
            ("bpfPinDir", self.bpf_pin_dir.is_some()),
        ];
        let sriov_keys: [(&'static str, bool); 10] = [
            ("resourceName", self.resource_name.is_some()),
            ("deviceCheckpoint", self.device_checkpoint.is_some()),
            ("vlan", self.vlan.is_some()),
            ("vlanQoS", self.vlan_qos.is_some()),
            ("vlanProto", self.vlan_proto.is_some()),
            ("spoofchk", self.spoofchk.is_some()),
            ("trust", self.trust.is_some()),
            ("link_state", self.link_state.is_some()),
            ("min_tx_rate", self.min_tx_rate.is_some()),
            ("max_tx_rate", self.max_tx_rate.is_some()),
        ];
        let (foreign, belongs) = match self.mode {
            Mode::VhostUser => (&sriov_keys[..], Mode::Sriov),
            Mode::Sriov => (&vhost_keys[..], Mode::VhostUser),
        };
        if let Some((key, _)) = foreign.iter().find(|(_, set)| *set) {
            return Err(ConfigError::KeyNotForMode {
                key,
                belongs,
                mode: self.mode,
            });
        }
        Ok(())
    }

    fn check_ranges(&self) -> Result<(), ConfigError> {
        let out_of_range = |key, value: &dyn fmt::Display, expected| ConfigError::OutOfRange {
            key,
            value: value.to_string(),
            expected,
        };
        if let Some(mtu) = self.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(out_of_range("mtu", &mtu, "use 68..=65535"));
        }
        if let Some(queues) = self.queues
            && !(1..=MAX_QUEUES).contains(&queues)
        {
            return Err(out_of_range("queues", &queues, "use 1..=256"));
        }
        if let Some(network) = self.network_id
            && !(1..=MAX_NETWORK_ID).contains(&network)
        {
            return Err(out_of_range("networkId", &network, "use 1..=1023"));
        }
        if let Some(vlan) = self.vlan
            && vlan > 4094
        {
            return Err(out_of_range("vlan", &vlan, "use 0..=4094 (0: untagged)"));
        }
        if let Some(qos) = self.vlan_qos
            && qos > 7
        {
            return Err(out_of_range("vlanQoS", &qos, "use 0..=7"));
        }
        if self.vlan.unwrap_or(0) == 0
            && (self.vlan_qos.unwrap_or(0) != 0 || self.vlan_proto == Some(VlanProto::Dot1Ad))
        {
            return Err(out_of_range(
                "vlan",
                &self.vlan.unwrap_or(0),
                "vlanQoS and vlanProto 802.1ad need a VLAN id of 1..=4094",
            ));
        }
        if let (Some(min), Some(max)) = (self.min_tx_rate, self.max_tx_rate)
            && max != 0
            && min > max
        {
            return Err(out_of_range(
                "min_tx_rate",
                &min,
                "it must not exceed max_tx_rate (0 means unlimited)",
            ));
        }
        if self.mode == Mode::Sriov && self.device_id.is_none() && self.resource_name.is_none() {
            return Err(ConfigError::NoDeviceId);
        }
        Ok(())
    }
}

/// Decodes stdin: JSON (code 6), a supported `cniVersion` (code 1), the structure (code 7),
/// no unknown or misplaced keys (code 2), values in range (code 7).
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, ConfigError> {
    let value: Value = serde_json::from_slice(stdin).map_err(ConfigError::Decode)?;
    check_version(&value)?;
    let conf: NetConf = serde_json::from_value(value).map_err(ConfigError::Invalid)?;
    if !conf.unknown.is_empty() {
        return Err(ConfigError::UnknownFields(
            conf.unknown.keys().cloned().collect(),
        ));
    }
    conf.check_mode_keys()?;
    conf.check_ranges()?;
    Ok(conf)
}

/// The `cniVersion` of a JSON object, which must be one we speak.
pub fn check_version(value: &Value) -> Result<CniVersion, ConfigError> {
    let text = value
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or(ConfigError::MissingVersion)?;
    CniVersion::parse(text).ok_or_else(|| ConfigError::UnsupportedVersion(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<NetConf, ConfigError> {
        parse_netconf(value.to_string().as_bytes())
    }

    fn vhost() -> Value {
        json!({"cniVersion": "1.1.0", "name": "net1", "type": "ferrovirt-cni", "mode": "vhost-user"})
    }

    #[test]
    fn a_full_multus_delegate_config_parses() {
        let conf = parse(json!({
            "cniVersion": "1.0.0", "name": "sriov-net", "type": "ferrovirt-cni", "mode": "sriov",
            "deviceID": "0000:3b:02.1", "vlan": 100, "vlanQoS": 3, "vlanProto": "802.1ad",
            "spoofchk": "off", "trust": "on", "link_state": "enable",
            "min_tx_rate": 10, "max_tx_rate": 100,
            "ipam": {"type": "host-local", "subnet": "10.9.0.0/24"},
            "runtimeConfig": {"mac": "02:00:00:00:00:07", "ips": ["10.9.0.7/24"], "portMappings": []},
            "args": {"cni": {"mac": "02:00:00:00:00:08"}},
            "prevResult": {"cniVersion": "1.0.0", "interfaces": []},
            "capabilities": {"mac": true}, "disableCheck": false
        }))
        .unwrap();
        assert_eq!(conf.mode, Mode::Sriov);
        assert_eq!(conf.version(), CniVersion::V1_0_0);
        assert_eq!(
            conf.requested_mac().unwrap().to_string(),
            "02:00:00:00:00:07"
        );
        assert_eq!(conf.requested_ips()[0].to_string(), "10.9.0.7/24");
        assert_eq!(conf.ipam.unwrap().plugin, "host-local");
        assert_eq!(conf.vlan_proto, Some(VlanProto::Dot1Ad));
    }

    #[test]
    fn each_failure_gets_its_spec_code() {
        assert_eq!(parse_netconf(b"{not json").unwrap_err().code(), 6);
        let mut v = vhost();
        v["cniVersion"] = json!("0.3.1");
        let e = parse(v).unwrap_err();
        assert_eq!(e.code(), 1);
        assert!(e.to_string().contains("0.3.1"), "{e}");
        let mut v = vhost();
        v["mode"] = json!("macvtap");
        let e = parse(v).unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("unknown mode \"macvtap\""), "{e}");
        let mut v = vhost();
        v["mac"] = json!("02:00:00:00:00");
        let e = parse(v).unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("not a MAC address"), "{e}");
        let mut v = vhost();
        v["queus"] = json!(4);
        let e = parse(v).unwrap_err();
        assert_eq!(e.code(), 2);
        assert!(e.to_string().contains("queus"), "{e}");
        let mut v = vhost();
        v["vlan"] = json!(5);
        assert_eq!(parse(v).unwrap_err().code(), 2);
        let mut v = vhost();
        v["queues"] = json!(0);
        assert_eq!(parse(v).unwrap_err().code(), 7);
        let mut v = vhost();
        v.as_object_mut().unwrap().remove("cniVersion");
        assert_eq!(parse(v).unwrap_err().code(), 7);
    }

    #[test]
    fn sriov_needs_a_device_id_and_consistent_vlan_settings() {
        let base =
            json!({"cniVersion": "1.1.0", "name": "n", "type": "ferrovirt-cni", "mode": "sriov"});
        assert!(matches!(parse(base.clone()), Err(ConfigError::NoDeviceId)));
        let mut v = base.clone();
        v["deviceID"] = json!("0000:00:01.0");
        v["vlanQoS"] = json!(2);
        assert!(matches!(
            parse(v),
            Err(ConfigError::OutOfRange { key: "vlan", .. })
        ));
        let mut v = base;
        v["deviceID"] = json!("0000:00:01.0");
        v["min_tx_rate"] = json!(200);
        v["max_tx_rate"] = json!(100);
        assert!(matches!(
            parse(v),
            Err(ConfigError::OutOfRange {
                key: "min_tx_rate",
                ..
            })
        ));
    }

    #[test]
    fn network_ids_outside_the_datapaths_range_are_refused() {
        let base = vhost();
        for id in [0, MAX_NETWORK_ID + 1] {
            let mut v = base.clone();
            v["networkId"] = json!(id);
            assert!(
                matches!(
                    parse(v),
                    Err(ConfigError::OutOfRange {
                        key: "networkId",
                        ..
                    })
                ),
                "{id}"
            );
        }
        let mut v = base;
        v["networkId"] = json!(MAX_NETWORK_ID);
        assert!(parse(v).is_ok());
    }
}
