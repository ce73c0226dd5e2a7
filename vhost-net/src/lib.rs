//! vhost-user-net backend: moves frames between a guest's virtqueues and a TAP device over io_uring (see issue: vhost-net).
