//! Command-line flags, checked before any TAP or socket is touched.

use std::path::PathBuf;

/// Flags of `ferrovirt-vhost-net`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "ferrovirt-vhost-net",
    about = "vhost-user-net backend: moves frames between a VMM's virtio-net data queues and a \
             TAP device, with I/O on io_uring (one worker thread and ring per queue pair)",
    long_about = "vhost-user-net backend: moves frames between a VMM's virtio-net data queues \
                  (rx0, tx0, rx1, tx1, ...) and a TAP device, with I/O on io_uring (one worker \
                  thread and ring per queue pair). The VMM owns the config space (MAC, status, \
                  MTU) and the control queue.\n\n\
                  Metrics: with --metrics-socket PATH, every connection to PATH receives one \
                  JSON object and is closed, e.g. `socat - UNIX-CONNECT:PATH`: \
                  {\"rx_packets\", \"rx_bytes\", \"tx_packets\", \"tx_bytes\", \
                  \"rx_dropped\": {REASON: N}, \"tx_dropped\": {REASON: N}, \"tx_submits\", \
                  \"connections\"}, with REASON one of header_too_short, frame_too_long, \
                  outside_memory, wrong_direction, chain_too_small, bad_chain, tap_error.",
    version
)]
pub struct Flags {
    /// vhost-user UNIX socket to listen on; a stale socket file is replaced, a live one is an error.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Existing TAP device to open by name (create it with `ip tuntap add dev NAME mode tap`,
    /// adding `multi_queue` for --queue-pairs above 1).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "tap_fd",
        required_unless_present = "tap_fd"
    )]
    pub tap: Option<String>,
    /// Network namespace the --tap device lives in: a name under /run/netns or a path (such as
    /// /proc/PID/ns/net). The backend itself stays in its own namespace.
    #[arg(long, value_name = "NAME_OR_PATH")]
    pub netns: Option<String>,
    /// Inherited TAP file descriptor (opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR); repeat it once
    /// per queue pair for a multi-queue TAP.
    #[arg(long, value_name = "FD")]
    pub tap_fd: Vec<i32>,
    /// Queue pairs (virtio-net MQ); each has its own TAP queue, worker thread and io_uring.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub queue_pairs: u16,
    /// Largest virtqueue the VMM may set up (a power of two).
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,
    /// MTU the VMM advertises to the guest; longer non-GSO frames from the guest are dropped.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..))]
    pub mtu: u16,
    /// Serve counters as one JSON object per connection on this UNIX socket (see above).
    #[arg(long, value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,
    /// Serve one VMM connection and exit, instead of waiting for the VMM to reconnect.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--queue-size {0} is not a power of two between 2 and 32768")]
    BadQueueSize(u16),
    #[error(
        "{fds} --tap-fd given for --queue-pairs {pairs}; pass one inherited TAP queue per pair"
    )]
    TapFdCount { fds: usize, pairs: u16 },
    #[error("pass --tap NAME or --tap-fd FD")]
    NoTap,
    #[error(
        "--netns only applies to --tap NAME; an inherited --tap-fd is already bound to its namespace"
    )]
    NetNsWithoutTap,
}

/// Where the TAP queues come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Open the TAP named `name`, inside `netns` when given.
    Named { name: String, netns: Option<String> },
    /// Inherited TAP queue descriptors, one per queue pair.
    Fds(Vec<i32>),
}

/// Everything the backend needs, checked.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub tap: TapSource,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mtu: u16,
    pub metrics_socket: Option<PathBuf>,
}

impl BackendConfig {
    pub fn from_flags(flags: &Flags) -> Result<Self, ConfigError> {
        if !flags.queue_size.is_power_of_two() || flags.queue_size < 2 {
            return Err(ConfigError::BadQueueSize(flags.queue_size));
        }
        if flags.netns.is_some() && flags.tap.is_none() {
            return Err(ConfigError::NetNsWithoutTap);
        }
        let tap = match (&flags.tap, flags.tap_fd.is_empty()) {
            (Some(name), _) => TapSource::Named {
                name: name.clone(),
                netns: flags.netns.clone(),
            },
            (None, false) => {
                if flags.tap_fd.len() != usize::from(flags.queue_pairs) {
                    return Err(ConfigError::TapFdCount {
                        fds: flags.tap_fd.len(),
                        pairs: flags.queue_pairs,
                    });
                }
                TapSource::Fds(flags.tap_fd.clone())
            }
            (None, true) => return Err(ConfigError::NoTap),
        };
        Ok(Self {
            tap,
            queue_pairs: flags.queue_pairs,
            queue_size: flags.queue_size,
            mtu: flags.mtu,
            metrics_socket: flags.metrics_socket.clone(),
        })
    }

    /// One pair of 1024-entry queues on the TAP `name` in our namespace, MTU 1500.
    pub fn new(tap: impl Into<String>) -> Self {
        Self {
            tap: TapSource::Named {
                name: tap.into(),
                netns: None,
            },
            queue_pairs: 1,
            queue_size: 1024,
            mtu: 1500,
            metrics_socket: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<BackendConfig, String> {
        let flags = Flags::try_parse_from(
            std::iter::once("ferrovirt-vhost-net").chain(args.iter().copied()),
        )
        .map_err(|e| e.to_string())?;
        BackendConfig::from_flags(&flags).map_err(|e| e.to_string())
    }

    #[test]
    fn tap_by_name_in_a_netns_is_accepted() {
        let c = parse(&["--socket", "/s", "--tap", "t0", "--netns", "ns1"]).unwrap();
        assert_eq!(
            c.tap,
            TapSource::Named {
                name: "t0".into(),
                netns: Some("ns1".into())
            }
        );
    }

    #[test]
    fn tap_fds_must_match_queue_pairs() {
        let err = parse(&["--socket", "/s", "--tap-fd", "3", "--queue-pairs", "2"]).unwrap_err();
        assert!(err.contains("one inherited TAP queue per pair"), "{err}");
        let c = parse(&[
            "--socket",
            "/s",
            "--tap-fd",
            "3",
            "--tap-fd",
            "4",
            "--queue-pairs",
            "2",
        ])
        .unwrap();
        assert_eq!(c.tap, TapSource::Fds(vec![3, 4]));
    }

    #[test]
    fn a_tap_is_required_and_name_and_fd_conflict() {
        assert!(parse(&["--socket", "/s"]).is_err());
        assert!(parse(&["--socket", "/s", "--tap", "t", "--tap-fd", "3"]).is_err());
        assert!(parse(&["--socket", "/s", "--tap-fd", "3", "--netns", "x"]).is_err());
    }

    #[test]
    fn queue_size_must_be_a_power_of_two() {
        let err = parse(&["--socket", "/s", "--tap", "t", "--queue-size", "100"]).unwrap_err();
        assert!(err.contains("power of two"), "{err}");
    }
}
