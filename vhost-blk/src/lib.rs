//! vhost-user-blk backend: serves raw images to a VMM over io_uring (see issue: vhost-blk).
//!
//! [`Server::bind`] opens the image and listens; [`Server::serve_connection`] serves one VMM
//! connection; [`Server::run`] serves them in a loop so a VMM can reconnect.

pub mod backend;
pub mod config;
pub mod io;
pub mod metrics;
pub mod order;
pub mod request;
pub mod server;

pub use config::{BackendConfig, Flags};
pub use metrics::{Metrics, MetricsSnapshot};
pub use server::{ServeError, Server};
