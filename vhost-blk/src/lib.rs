//! vhost-user-blk backend: serves raw images to a VMM over io_uring (see issue: vhost-blk).
//!
//! In-process use (tests, benchmarks):
//! ```no_run
//! use ferrovirt_vhost_blk::{BackendConfig, Server};
//! let mut config = BackendConfig::new("/path/disk.img");
//! config.num_queues = 2;
//! let mut server = Server::bind(config, "/path/blk.sock".as_ref()).unwrap();
//! let metrics = server.metrics(); // counters, see MetricsSnapshot
//! std::thread::spawn(move || server.serve_connection()); // or server.run(false): loop
//! ```
//! Out of process: `ferrovirt-vhost-blk --image PATH --socket PATH [--read-only]
//! [--num-queues N] [--queue-size N] [--serial S] [--direct] [--once]`; the socket accepts a
//! connection once it exists and a connect succeeds.
//!
//! Modules: [`config`] (flags, image checks), [`request`] (pure parsing and validation of
//! guest requests), [`io`] (one io_uring per queue worker), [`inflight`] (the shared region
//! recording requests in flight, so a restarted backend resubmits exactly those; with it,
//! completions are published as they finish), [`order`] (used ring in available order, for
//! frontends without an inflight region: a reconnect from the used index is then exact),
//! [`relay`] (answers GET/SET_INFLIGHT_FD in front of the vhost-user daemon), [`backend`] (the
//! `VhostUserBackend`), [`metrics`], [`server`] (socket and connection loop).

pub mod backend;
pub mod config;
pub mod inflight;
pub mod io;
pub mod metrics;
pub mod order;
pub mod relay;
pub mod request;
pub mod server;

pub use config::{BackendConfig, Flags};
pub use metrics::{Metrics, MetricsSnapshot};
pub use server::{ServeError, Server, TerminationSignals};
