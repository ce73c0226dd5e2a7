//! ferrovirt-vmm: a KVM virtual machine monitor, one process per VM.

pub mod api;
pub mod boot;
pub mod config;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod vm;
pub mod vmm;
