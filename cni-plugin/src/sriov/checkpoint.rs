//! The kubelet's device-manager checkpoint (`kubelet_internal_checkpoint` in its
//! device-plugin directory): which devices of which resource each pod was allocated. When
//! containerd calls us directly (no Multus to inject `deviceID`), an SR-IOV attachment takes
//! its VF from here, as Multus itself does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the kubelet keeps it by default.
pub const DEFAULT_PATH: &str = "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "cannot read the kubelet's device checkpoint {0}: {1}; set \"deviceCheckpoint\" to its path"
    )]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the kubelet's device checkpoint {0} is not in the format this plugin knows: {1}")]
    Parse(PathBuf, #[source] serde_json::Error),
}

#[derive(Deserialize)]
struct Checkpoint {
    #[serde(rename = "Data")]
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "PodDeviceEntries", default)]
    entries: Option<Vec<Entry>>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "PodUID")]
    pod_uid: String,
    #[serde(rename = "ResourceName")]
    resource: String,
    /// NUMA node → device IDs.
    #[serde(rename = "DeviceIDs", default)]
    devices: std::collections::BTreeMap<String, Vec<String>>,
}

/// The IDs (for SR-IOV pools: PCI addresses) of the `resource` devices allocated to the pod
/// `pod_uid`, sorted; empty when it has none.
pub fn device_ids(
    path: &Path,
    pod_uid: &str,
    resource: &str,
) -> Result<Vec<String>, CheckpointError> {
    let text = std::fs::read(path).map_err(|e| CheckpointError::Read(path.to_owned(), e))?;
    let checkpoint: Checkpoint =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::Parse(path.to_owned(), e))?;
    let ids: BTreeSet<String> = checkpoint
        .data
        .entries
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.pod_uid == pod_uid && e.resource == resource)
        .flat_map(|e| e.devices.into_values().flatten())
        .collect();
    Ok(ids.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kubelet's own layout (taken from a v1.34 kubelet of the test cluster).
    const CHECKPOINT: &str = r#"{"Data":{"PodDeviceEntries":[
        {"PodUID":"p1","ContainerName":"compute","ResourceName":"devices.ferrovirt.io/kvm","DeviceIDs":{"-1":["kvm-0"]},"AllocResp":"Gg=="},
        {"PodUID":"p1","ContainerName":"compute","ResourceName":"devices.ferrovirt.io/sriov-a","DeviceIDs":{"0":["0000:00:02.2"],"1":["0000:00:02.1"]},"AllocResp":"Gg=="},
        {"PodUID":"p2","ContainerName":"compute","ResourceName":"devices.ferrovirt.io/sriov-a","DeviceIDs":{"-1":["0000:00:02.3"]},"AllocResp":"Gg=="}],
        "RegisteredDevices":{"devices.ferrovirt.io/kvm":["kvm-0"]}},"Checksum":1}"#;

    #[test]
    fn a_pods_devices_of_one_resource_across_numa_nodes() {
        let dir = std::env::temp_dir().join(format!("fv-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubelet_internal_checkpoint");
        std::fs::write(&path, CHECKPOINT).unwrap();
        let ids = device_ids(&path, "p1", "devices.ferrovirt.io/sriov-a").unwrap();
        assert_eq!(ids, ["0000:00:02.1", "0000:00:02.2"]);
        assert!(
            device_ids(&path, "p3", "devices.ferrovirt.io/sriov-a")
                .unwrap()
                .is_empty()
        );
        std::fs::write(&path, "{").unwrap();
        let err = device_ids(&path, "p1", "x").unwrap_err();
        assert!(err.to_string().contains("not in the format"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = device_ids(&path, "p1", "x").unwrap_err();
        assert!(err.to_string().contains("deviceCheckpoint"), "{err}");
    }
}
