//! The KVM virtual machine: VM file descriptor, irqchip, vCPU threads.

pub mod interrupt;
