//! Suite `cni`: ADD+DEL latency of `ferrovirt-cni` (vhost-user mode) against Debian's `bridge`
//! plugin, both with Debian's host-local IPAM, both run as a runtime runs them (a process per
//! call, environment + stdin) on the same machine in the same run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use ferrovirt_tests::names::ip;
use ferrovirt_tests::{BpfPinDir, CleanupGuard, NetNs, ScratchDir, unique_name};
use serde_json::{Value, json};

use super::{RunConfig, Suite};
use crate::report::SuiteReport;
use crate::stats::{Better, Goal, Samples, Side, percentile, round_order, summarize_all};

pub const SUITE: Suite = Suite {
    name: "cni",
    about: "ADD+DEL latency of ferrovirt-cni (vhost-user, host-local) vs Debian's bridge plugin",
    run,
};

/// ADD+DEL pairs per side per round; p50 and p99 are taken over these.
const ITERATIONS: usize = 40;
const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

struct Setup {
    ferrovirt: PathBuf,
    bridge: PathBuf,
    cni_path: String,
    scratch: ScratchDir,
    bridge_name: String,
    _bridge_guard: CleanupGuard,
    /// ferrovirt-cni's eBPF datapath (programs, maps, network 1), made by its first ADD;
    /// removing the pins frees it.
    pins: BpfPinDir,
}

impl Setup {
    fn discover() -> anyhow::Result<Setup> {
        let ferrovirt =
            ferrovirt_tests::try_cni_binary().context("build ferrovirt-cni (release)")?;
        let bridge = Path::new(DEBIAN_CNI_DIR).join("bridge");
        if !bridge.is_file() || !Path::new(DEBIAN_CNI_DIR).join("host-local").is_file() {
            bail!(
                "{DEBIAN_CNI_DIR}/bridge or host-local is missing: install containernetworking-plugins (scripts/setup.sh)"
            );
        }
        let bridge_name = unique_name("fvbr");
        // The bridge plugin creates the bridge on the first ADD and never removes it.
        let guard = CleanupGuard::new(bridge_name.clone(), |name| {
            let _ = ip(&["link", "del", name]);
        });
        Ok(Setup {
            ferrovirt,
            bridge,
            cni_path: DEBIAN_CNI_DIR.to_string(),
            scratch: ScratchDir::new("cni-bench")?,
            bridge_name,
            _bridge_guard: guard,
            pins: BpfPinDir::create("fv-cni-bench")?,
        })
    }

    fn host_local(&self, subnet: &str) -> Value {
        json!({"type": "host-local", "dataDir": self.scratch.join("leases"),
               "ranges": [[{"subnet": subnet}]]})
    }

    /// Both configs speak 1.0.0, the newest version Debian's plugins know, so neither side
    /// pays for a version negotiation with host-local.
    fn conf(&self, side: Side) -> Value {
        match side {
            Side::Ferrovirt => json!({
                "cniVersion": "1.0.0", "name": "bench-fv", "type": "ferrovirt-cni",
                "mode": "vhost-user", "stateDir": self.scratch.join("state"),
                "socketDir": self.scratch.join("sockets"),
                "networkId": 1, "bpfPinDir": self.pins.path(),
                "ipam": self.host_local("10.201.0.0/16"),
            }),
            Side::Peer => json!({
                "cniVersion": "1.0.0", "name": "bench-br", "type": "bridge",
                "bridge": self.bridge_name, "isGateway": true,
                "ipam": self.host_local("10.202.0.0/16"),
            }),
        }
    }

    fn binary(&self, side: Side) -> &Path {
        match side {
            Side::Ferrovirt => &self.ferrovirt,
            Side::Peer => &self.bridge,
        }
    }

    /// One call; returns its wall time in ms.
    fn call(
        &self,
        side: Side,
        command: &str,
        container_id: &str,
        netns: &Path,
        conf: &[u8],
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut child = Command::new(self.binary(side))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth1")
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {}", self.binary(side).display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(conf)?;
        }
        let out = child.wait_with_output()?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            bail!(
                "{} {command} failed: {}{}",
                self.binary(side).display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(ms)
    }

    /// `count` ADD+DEL pairs in `netns`; returns (ADD ms, DEL ms) of each.
    fn add_del(&self, side: Side, netns: &Path, count: usize) -> anyhow::Result<Vec<(f64, f64)>> {
        let conf = self.conf(side).to_string().into_bytes();
        (0..count)
            .map(|_| {
                let id = format!("bench-{}", unique_name(""));
                let add = self.call(side, "ADD", &id, netns, &conf)?;
                let del = self.call(side, "DEL", &id, netns, &conf)?;
                Ok((add, del))
            })
            .collect()
    }
}

fn run(config: &RunConfig) -> anyhow::Result<SuiteReport> {
    let setup = Setup::discover()?;
    let netns = NetNs::create("cnib")?;
    // One untimed pair each: page cache, the bridge's creation, early failure.
    for side in [Side::Ferrovirt, Side::Peer] {
        setup
            .add_del(side, &netns.path(), 1)
            .with_context(|| format!("{side:?} warm-up"))?;
    }
    let mut p50 = Samples::new("add_del_p50", "ms", Better::Lower);
    let mut p99 = Samples::new("add_del_p99", "ms", Better::Lower);
    let mut add = Samples::new("add_p50", "ms", Better::Lower);
    let mut del = Samples::new("del_p50", "ms", Better::Lower);
    for round in 0..config.rounds {
        for side in round_order(round) {
            let pairs = setup.add_del(side, &netns.path(), ITERATIONS)?;
            let total: Vec<f64> = pairs.iter().map(|(a, d)| a + d).collect();
            let adds: Vec<f64> = pairs.iter().map(|(a, _)| *a).collect();
            let dels: Vec<f64> = pairs.iter().map(|(_, d)| *d).collect();
            p50.push(side, percentile(&total, 0.5));
            p99.push(side, percentile(&total, 0.99));
            add.push(side, percentile(&adds, 0.5));
            del.push(side, percentile(&dels, 0.5));
        }
        eprintln!("cni: round {}/{} done", round + 1, config.rounds);
    }
    let peer_name = "Debian containernetworking-plugins bridge + host-local".to_string();
    let rows = summarize_all(&[p50, p99, add, del], &peer_name)?;
    Ok(SuiteReport {
        suite: SUITE.name.to_string(),
        peer_name,
        rounds: config.rounds,
        rows,
        goals: vec![Goal::ratio_at_most(
            "add_del_p50",
            0.5,
            "ADD+DEL p50 ≤ 0.5× the bridge plugin's",
        )],
        notes: vec![
            format!(
                "each round runs {ITERATIONS} ADD+DEL pairs per side (new container ID each, one \
                 netns, CNI_IFNAME eth1); p50/p99 are nearest-rank percentiles of the pair's wall \
                 time (both process runs, host-local's included), one sample per round"
            ),
            "ferrovirt-cni: release build, mode vhost-user (persistent vnet-header TAP attached \
             as an endpoint of eBPF network 1, MAC/IP anti-spoofing), cniVersion 1.0.0, \
             host-local 10.201.0.0/16"
                .to_string(),
            "bridge: Debian's bridge plugin (veth into the netns, bridge with gateway address), \
             cniVersion 1.0.0, host-local 10.202.0.0/16"
                .to_string(),
            "where the time goes: a host-local process is ~3 ms of each call here; ferrovirt-cni \
             makes the TAP and opens the datapath while host-local runs (ADD) and releases the \
             lease while it removes the endpoint and the TAP (DEL); unregistering a link takes \
             ~17-23 ms of kernel time (RCU barriers; `ip link del` of a bare TAP alone): \
             ferrovirt-cni's DEL returns once the TAP is unlisted (~1 ms) and leaves that wait \
             to a forked child, the bridge plugin waits for its veth's; a TCX attach would cost \
             two RCU grace periods (~10 ms), so the endpoint is a cls_bpf filter"
                .to_string(),
        ],
    })
}
