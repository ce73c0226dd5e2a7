//! eBPF datapath for VM NICs: an L2 switch between VM TAPs and uplinks with anti-spoofing,
//! VLANs, egress policy and counters; C programs (bpf/) built with clang, loaded with aya.
//!
//! Everything lives pinned under one bpffs directory ([`DEFAULT_PIN_DIR`]), so the CNI
//! plugin and the node agent share one datapath and either can be killed at any moment.

mod attach;
mod datapath;
mod forwarding;
mod loader;
pub mod maps;
mod peer;
mod pin_dir;
mod policy;
mod testrun;

pub use attach::AttachError;
pub use datapath::{DEFAULT_PIN_DIR, Datapath, DatapathConfig, DatapathError, UplinkMode};
pub use forwarding::{EndpointConfig, ForwardingError, NetworkConfig, NetworkId};
pub use loader::LoadError;
pub use maps::{Counters, MapsError};
pub use pin_dir::{Hook, PinDirError};
pub use policy::{PolicyError, PolicyId, PolicyRule, Protocol};
pub use testrun::{Program, TestRunError, TestRunInput, TestRunOutput};
