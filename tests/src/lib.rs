//! Shared harness for ferrovirt's end-to-end tests and benchmarks: builds the test guest and
//! the VMM, runs VMM processes under guards that leave nothing behind, talks to their REST API,
//! fetches a real Debian kernel, and names kernel objects uniquely.

pub mod agent;
pub mod artifacts;
pub mod blk_pattern;
pub mod bzimage;
pub mod fake_sysfs;
pub mod ferrovirt_k8s;
pub mod frames;
pub mod http;
pub mod iperf3;
pub mod k8s;
pub mod kernel;
pub mod names;
pub mod netns_topology;
pub mod packet_socket;
pub mod process;
pub mod qemu_net;
pub mod storage_daemon;
pub mod testpmd;
pub mod vhost_blk;
pub mod vhost_net;
pub mod vhost_user_frontend;
pub mod vmm;
pub mod xdp_live_frames;

pub use artifacts::{
    repo_root, testguest, try_agent_binary, try_cni_binary, try_container_disk_binary,
    try_controller_binary, try_fvctl_binary, try_testguest, try_vhost_blk_binary,
    try_vhost_net_binary, try_vmm_binary, vhost_blk_binary, vhost_net_binary, vmm_binary,
};
pub use kernel::{DebianKernel, debian_kernel, debian_kernel_info};
pub use names::{BpfPinDir, CleanupGuard, Link, NetNs, Tap, link_exists, unique_name};
pub use process::{GuardedProcess, ProcessExit, ScratchDir};
pub use storage_daemon::StorageDaemon;
pub use testpmd::{PacketSocket, Testpmd};
pub use vhost_blk::VhostBlkBackend;
pub use vhost_net::VhostNetBackend;
pub use vmm::{VmmBuilder, VmmError, VmmProcess};
