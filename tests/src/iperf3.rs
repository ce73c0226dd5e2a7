//! Bounded `iperf3` runs between two network namespaces: a one-off server under a guard and
//! a client whose JSON report gives the received throughput.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::names::NetNs;
use crate::process::{GuardedProcess, ProcessError, ScratchDir, tail};

/// Debian's `iperf3` package installs it (scripts/setup.sh).
pub const IPERF3: &str = "iperf3";
/// How long the server gets to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// iperf3's default port; every server has a namespace of its own.
const PORT: u16 = 5201;
/// Time a client gets beyond its `-t` to connect and report.
const CLIENT_SLACK: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum Iperf3Error {
    #[error("cannot run {IPERF3} under `ip netns exec`; install Debian's iperf3 package")]
    Process(#[from] ProcessError),
    #[error("the {IPERF3} server did not listen within {LISTEN_TIMEOUT:?}; its output:\n{output}")]
    NotListening { output: String },
    #[error("the {IPERF3} client failed ({status}); its output ends with:\n{output}")]
    ClientFailed { status: String, output: String },
    #[error("the {IPERF3} client's JSON has no end.sum_received.bits_per_second:\n{output}")]
    NoThroughput { output: String },
}

/// A one-off `iperf3 -s -1` bound to one address of a namespace, stopped on `Drop`.
/// Field order is drop order: the server stops before its output directory goes.
#[derive(Debug)]
pub struct Iperf3Server {
    process: GuardedProcess,
    address: Ipv4Addr,
    _dir: ScratchDir,
}

impl Iperf3Server {
    /// Starts the server in `netns` on `address` and waits until it listens.
    pub fn start(netns: &NetNs, address: Ipv4Addr) -> Result<Iperf3Server, Iperf3Error> {
        let dir = ScratchDir::new("iperf3")?;
        let mut cmd = netns.command(IPERF3);
        cmd.args(["-s", "-1", "-B", &address.to_string()]);
        let mut process = GuardedProcess::spawn(cmd, &dir.join("out"), &dir.join("err"))?;
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !tcp_listening_in(process.pid(), PORT) {
            if process.try_exit()?.is_some() || Instant::now() > deadline {
                return Err(Iperf3Error::NotListening {
                    output: format!("{}\n{}", process.stdout(), process.stderr()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Iperf3Server {
            process,
            address,
            _dir: dir,
        })
    }

    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }
}

/// Whether process `pid` sees a TCP socket listening on `port`, in its own namespace's
/// /proc/PID/net/tcp (iperf3 buffers its "Server listening" line when not on a terminal).
fn tcp_listening_in(pid: i32, port: u16) -> bool {
    const TCP_LISTEN: &str = "0A";
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    let local = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == TCP_LISTEN
    })
}

/// What a client run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iperf3Report {
    /// What the server received, in bits per second over the run.
    pub received_bits_per_second: f64,
    /// TCP retransmissions the sender counted (0 for UDP).
    pub retransmits: u64,
}

/// Runs `iperf3 -c SERVER -t SECONDS -J` (plus `extra`) in `netns` to completion.
pub fn run_client(
    netns: &NetNs,
    server: &Iperf3Server,
    seconds: u32,
    extra: &[&str],
) -> Result<Iperf3Report, Iperf3Error> {
    let dir = ScratchDir::new("iperf3-client")?;
    let mut cmd = netns.command(IPERF3);
    cmd.args(["-c", &server.address().to_string(), "-J", "-t"])
        .arg(seconds.to_string())
        .args(extra);
    let mut process = GuardedProcess::spawn(cmd, &dir.join("out"), &dir.join("err"))?;
    let exit = match process.wait_timeout(Duration::from_secs(u64::from(seconds)) + CLIENT_SLACK) {
        Ok(exit) => exit,
        Err(ProcessError::Timeout { .. }) => process.kill()?,
        Err(e) => return Err(e.into()),
    };
    let output = process.stdout();
    if !exit.status.success() {
        return Err(Iperf3Error::ClientFailed {
            status: format!("{:?}", exit.status),
            output: tail(&format!("{output}\n{}", process.stderr()), 30),
        });
    }
    parse_report(&output).ok_or_else(|| Iperf3Error::NoThroughput {
        output: tail(&output, 30),
    })
}

/// Reads the totals out of `iperf3 -J` output.
pub fn parse_report(json: &str) -> Option<Iperf3Report> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let end = v.get("end")?;
    let received = end.get("sum_received")?.get("bits_per_second")?.as_f64()?;
    let retransmits = end
        .get("sum_sent")
        .and_then(|s| s.get("retransmits"))
        .and_then(|r| r.as_u64())
        .unwrap_or(0);
    Some(Iperf3Report {
        received_bits_per_second: received,
        retransmits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_totals_come_from_the_end_section() {
        let json = r#"{"start": {}, "intervals": [],
            "end": {"sum_sent": {"bits_per_second": 2.5e9, "retransmits": 3},
                    "sum_received": {"bits_per_second": 2.4e9}}}"#;
        assert_eq!(
            parse_report(json),
            Some(Iperf3Report {
                received_bits_per_second: 2.4e9,
                retransmits: 3
            })
        );
        assert_eq!(parse_report(r#"{"error": "unable to connect"}"#), None);
        assert_eq!(parse_report("not json"), None);
    }
}
