//! virtio
