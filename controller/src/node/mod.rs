//! What a node does for a VMI, shared by the node agent and `fvctl run`: the launch plan (a
//! VMI spec → disk and NIC backends and the VMM's configuration) and the processes it starts.

pub mod cloudinit;
pub mod plan;
pub mod process;
pub mod standalone;
