//! vhost-user-net backend: moves frames between a guest's virtqueues and a TAP device over
//! io_uring (see issue: vhost-net).
//!
//! In-process use (tests, benchmarks):
//! ```no_run
//! use ferrovirt_vhost_net::{BackendConfig, Server};
//! let mut config = BackendConfig::new("tap0");
//! config.queue_pairs = 1;
//! let mut server = Server::bind(config, "/path/net.sock".as_ref()).unwrap();
//! let metrics = server.metrics(); // counters, see MetricsSnapshot
//! std::thread::spawn(move || server.serve_connection()); // or server.run(false): loop
//! ```
//! Out of process: `ferrovirt-vhost-net --socket PATH (--tap NAME [--netns NS] | --tap-fd FD...)
//! [--queue-pairs N] [--queue-size N] [--mtu N] [--metrics-socket PATH] [--once]`.
//!
//! Modules: [`config`] (flags), [`tap`] (opening the TAP queues), [`frame`] (pure checks of
//! guest chains), [`uring`] (one io_uring per queue pair), [`backend`] (the
//! `VhostUserBackend`), [`metrics`] (counters and their socket), [`server`] (socket and
//! connection loop).

pub mod backend;
pub mod config;
pub mod frame;
pub mod metrics;
pub mod server;
pub mod tap;
pub mod uring;

pub use config::{BackendConfig, Flags, TapSource};
pub use frame::DropReason;
pub use metrics::{Metrics, MetricsSnapshot};
pub use server::{ServeError, Server, TerminationSignals};
