//! CNI 1.1 plugin for VM NICs: TAP for vhost-user-net and SR-IOV VFs (see issue: cni-plugin).
