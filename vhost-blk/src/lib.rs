//! vhost-user-blk backend: serves raw images to a VMM over io_uring (see issue: vhost-blk).
