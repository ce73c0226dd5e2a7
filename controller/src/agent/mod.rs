//! The node agent `ferrovirt-agent`: runs on every node (DaemonSet) and serves kubelet's
//! device-plugin API for the resources VMs need.

pub mod device_plugin;
