//! What the plugin prints: the CNI 1.1 result (and its 1.0.0 / 0.4.0 forms), the VERSION
//! answer and the spec's error object.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::addressing::{IpPrefix, MacAddress};
use crate::config::{CniVersion, SUPPORTED_VERSIONS};

#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("{what} is not a CNI result: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: ips[{index}].interface = {interface} names no entry of interfaces[]")]
    BadInterfaceIndex {
        what: &'static str,
        index: usize,
        interface: usize,
    },
}

/// One interface of a result. `socketPath` and `pciID` are the CNI 1.1 fields for vhost-user
/// and device passthrough.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpPrefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpPrefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

/// A result in its newest form; [`CniResult::to_json`] writes the form the caller asked for.
/// Parsing accepts all three forms (the 0.4.0 `ips[].version` is ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

impl CniResult {
    /// Parses a result from an IPAM plugin or a `prevResult`; `what` names it in errors.
    pub fn from_value(value: Value, what: &'static str) -> Result<CniResult, ResultError> {
        let result: CniResult = serde_json::from_value(value)
            .map_err(|source| ResultError::Malformed { what, source })?;
        for (index, ip) in result.ips.iter().enumerate() {
            if let Some(interface) = ip.interface
                && !result.interfaces.is_empty()
                && interface >= result.interfaces.len()
            {
                return Err(ResultError::BadInterfaceIndex {
                    what,
                    index,
                    interface,
                });
            }
        }
        Ok(result)
    }

    /// The result as `version` writes it: 1.1.0 in full; 1.0.0 without the 1.1 fields
    /// (interface `mtu`/`socketPath`/`pciID`, route `mtu`/`advmss`/`priority`/`table`/`scope`);
    /// 0.4.0 like 1.0.0 plus `ips[].version`.
    pub fn to_json(&self, version: CniVersion) -> Value {
        let mut value = json!(self);
        value["cniVersion"] = json!(version.as_str());
        if version >= CniVersion::V1_1_0 {
            return value;
        }
        strip_keys(&mut value["interfaces"], &["mtu", "socketPath", "pciID"]);
        strip_keys(
            &mut value["routes"],
            &["mtu", "advmss", "priority", "table", "scope"],
        );
        if version == CniVersion::V0_4_0
            && let Some(ips) = value["ips"].as_array_mut()
        {
            for (ip, config) in ips.iter_mut().zip(&self.ips) {
                let family = if config.address.addr.is_ipv4() {
                    "4"
                } else {
                    "6"
                };
                ip["version"] = json!(family);
            }
        }
        value
    }
}

fn strip_keys(list: &mut Value, keys: &[&str]) {
    if let Some(items) = list.as_array_mut() {
        for item in items.iter_mut().filter_map(Value::as_object_mut) {
            for key in keys {
                item.remove(*key);
            }
        }
    }
}

/// The VERSION answer.
pub fn version_info(requested: Option<&str>) -> Value {
    // Answer in the caller's version when we speak it; otherwise in our newest.
    let version = requested
        .and_then(CniVersion::parse)
        .unwrap_or(CniVersion::V1_1_0);
    json!({"cniVersion": version.as_str(), "supportedVersions": SUPPORTED_VERSIONS})
}

/// The spec's error object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorObject {
    // Older plugins (Debian's 1.1.1 host-local) leave it out.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![Interface {
                name: "fvabc".into(),
                mac: Some("02:00:00:00:00:01".parse().unwrap()),
                mtu: Some(1500),
                sandbox: None,
                socket_path: Some("/run/x.sock".into()),
                pci_id: None,
            }],
            ips: vec![IpConfig {
                address: "10.0.0.2/24".parse().unwrap(),
                gateway: Some("10.0.0.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
                mtu: Some(1400),
                advmss: None,
                priority: None,
                table: None,
                scope: None,
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn the_1_1_form_carries_socket_path_and_round_trips() {
        let v = sample().to_json(CniVersion::V1_1_0);
        assert_eq!(v["interfaces"][0]["socketPath"], "/run/x.sock");
        assert_eq!(v["interfaces"][0]["mtu"], 1500);
        assert!(v.get("dns").is_none());
        let back = CniResult::from_value(v, "test").unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn older_forms_drop_1_1_fields_and_0_4_adds_ip_versions() {
        let v = sample().to_json(CniVersion::V1_0_0);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["interfaces"][0].get("socketPath").is_none());
        assert!(v["routes"][0].get("mtu").is_none());
        assert!(v["ips"][0].get("version").is_none());
        let v = sample().to_json(CniVersion::V0_4_0);
        assert_eq!(v["ips"][0]["version"], "4");
        // A 0.4.0 result parses back (its `version` is ignored).
        let back = CniResult::from_value(v, "test").unwrap();
        assert_eq!(back.ips, sample().ips);
    }

    #[test]
    fn results_with_dangling_interface_indexes_are_rejected() {
        let mut v = sample().to_json(CniVersion::V1_1_0);
        v["ips"][0]["interface"] = json!(3);
        assert!(matches!(
            CniResult::from_value(v, "prevResult"),
            Err(ResultError::BadInterfaceIndex { interface: 3, .. })
        ));
    }

    #[test]
    fn version_lists_every_supported_version() {
        let v = version_info(Some("0.4.0"));
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
        assert_eq!(version_info(Some("9.9.9"))["cniVersion"], "1.1.0");
    }
}
