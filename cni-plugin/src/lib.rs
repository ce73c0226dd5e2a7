//! CNI 1.1 plugin for VM NICs: a TAP for vhost-user-net, or an SR-IOV VF (see cni-plugin/README.md).

pub mod addressing;
pub mod config;
pub mod env;
pub mod ipam;
pub mod netlink;
pub mod plugin;
pub mod result;
pub mod sriov;
pub mod state;
pub mod tap;
pub mod vhost_user;

pub use plugin::{Outcome, PluginError, run};
