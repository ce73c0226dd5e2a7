//! eBPF datapath for VM NICs: C programs built with clang and their aya loader (see issue: ebpf).
