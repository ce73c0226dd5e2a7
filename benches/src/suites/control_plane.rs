//! Suite `control-plane`: 100 VMIs created 100 ms apart on the test Kubernetes, against plain
//! pods created the same way (creation → Ready: the floor kubelet and containerd set here):
//! creation → Scheduled with the controller alone (a stand-in launcher), and creation → Running
//! with the whole node side (the real launcher image, ferrovirt-agent, a ferrovirt-vhost-blk
//! disk per VM). Also the controller's CPU seconds, peak RSS and API requests per VMI, the
//! agent's CPU seconds and the host memory each running VM costs beyond its guest RAM.
//!
//! Run inside the harness: `tests/k8s/cluster.sh run -- cargo run --release -p ferrovirt-benches -- control-plane`.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ferrovirt_tests::ScratchDir;
use ferrovirt_tests::agent::AgentPod;
use ferrovirt_tests::ferrovirt_k8s::{
    self, ControllerProcess, FERROVIRT_LAUNCHER_IMAGE, LAUNCHER_IMAGE, VmNetwork,
};
use ferrovirt_tests::k8s::{Cluster, Namespace};
use serde_json::Value;

use super::{RunConfig, Suite};
use crate::report::SuiteReport;
use crate::stats::{Better, Goal, Samples, Side, percentile, round_order, summarize_all};

pub const SUITE: Suite = Suite {
    name: "control-plane",
    about: "100 VMIs 100 ms apart: creation → Scheduled vs plain pods' creation → Ready (needs tests/k8s)",
    run,
};

const OBJECTS: usize = 100;
const SPACING: Duration = Duration::from_millis(100);
const DEADLINE: Duration = Duration::from_secs(600);

/// A VMI whose launcher pod requests 10m CPU (100 must fit on a 2-core node) and 50 MiB.
fn vmi_yaml(name: &str) -> String {
    format!(
        "apiVersion: ferrovirt.io/v1alpha1\nkind: VirtualMachineInstance\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 0\n  domain: {{memory: {{guest: 16Mi}}, resources: {{requests: {{cpu: 10m}}}}}}\n"
    )
}

/// A plain pod as close to a launcher pod as the peer allows: same image, restart policy,
/// terminal and requests (10m CPU each, so that 100 fit on a 2-core node).
fn pod_yaml(name: &str) -> String {
    pod_yaml_in(name, "")
}

/// The same pod in the launchers' RuntimeClass, so that it gets the VM network's
/// ferrovirt-cni attachment (a TAP on the eBPF switch) as well as the cluster network.
fn pod_on_vm_network_yaml(name: &str) -> String {
    pod_yaml_in(name, &format!("  runtimeClassName: {VM_RUNTIME_CLASS}\n"))
}

fn pod_yaml_in(name: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n{extra_spec}  restartPolicy: Never\n  terminationGracePeriodSeconds: 15\n  automountServiceAccountToken: false\n  enableServiceLinks: false\n  containers:\n  - name: compute\n    image: {LAUNCHER_IMAGE}\n    imagePullPolicy: Never\n    stdin: true\n    tty: true\n    env: [{{name: FERROVIRT_VMI_NAME, value: {name}}}]\n    resources: {{requests: {{memory: 50Mi, cpu: 10m}}}}\n"
    )
}

/// The RuntimeClass whose handler's CNI configuration holds the VM network (tests/k8s).
const VM_RUNTIME_CLASS: &str = "ferrovirt";

/// A `kubectl get --watch` that is started again when it ends early (the API server may close
/// a watch; the new one lists every object again, and objects already reported are skipped).
struct Watch {
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut child) = self.child.lock()
            && let Some(mut c) = child.take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_watch(cluster: &Cluster, ns: &str, kind: &str, log: &Path) -> anyhow::Result<Child> {
    Command::new(cluster.binary("kubectl"))
        .env("KUBECONFIG", cluster.kubeconfig())
        .args([
            "-n",
            ns,
            "get",
            kind,
            "--watch",
            "-o",
            "json",
            "--output-watch-events",
        ])
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?,
        )
        .spawn()
        .context("kubectl get --watch")
}

/// Watches `kind` in `ns` and sends (name, when) the first time `done` holds for an object.
fn watch(
    cluster: &Cluster,
    ns: &str,
    kind: &str,
    done: fn(&Value) -> bool,
    log: &Path,
) -> anyhow::Result<(Watch, mpsc::Receiver<(String, Instant)>)> {
    let first = spawn_watch(cluster, ns, kind, log)?;
    let (tx, rx) = mpsc::channel();
    let handle = Watch {
        stop: Arc::new(AtomicBool::new(false)),
        child: Arc::new(Mutex::new(Some(first))),
    };
    let (stop, shared) = (handle.stop.clone(), handle.child.clone());
    let (cluster, ns, kind, log) = (
        cluster.clone(),
        ns.to_owned(),
        kind.to_owned(),
        log.to_owned(),
    );
    std::thread::spawn(move || {
        let mut seen = std::collections::HashSet::new();
        loop {
            let stdout = shared
                .lock()
                .ok()
                .and_then(|mut c| c.as_mut().and_then(|c| c.stdout.take()));
            let Some(stdout) = stdout else { return };
            for event in
                serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<Value>()
            {
                let Ok(event) = event else { break };
                let object = &event["object"];
                let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
                if done(object)
                    && seen.insert(name.clone())
                    && tx.send((name, Instant::now())).is_err()
                {
                    return;
                }
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let note = "\nthe watch ended early; starting it again\n";
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .and_then(|mut f| f.write_all(note.as_bytes()));
            let Ok(next) = spawn_watch(&cluster, &ns, &kind, &log) else {
                return;
            };
            if let Ok(mut c) = shared.lock()
                && let Some(mut old) = c.replace(next)
            {
                let _ = old.wait();
            }
        }
    });
    Ok((handle, rx))
}

/// A VMI of the test guest idling on the VMM's guest-idle port, with one empty disk served by
/// ferrovirt-vhost-blk and one vhost-user NIC on the VM network (ferrovirt-cni's TAP on the
/// eBPF switch, served by ferrovirt-vhost-net), for the real launcher.
fn running_vmi_yaml(name: &str) -> String {
    format!(
        "apiVersion: ferrovirt.io/v1alpha1\nkind: VirtualMachineInstance\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 0\n  domain:\n    memory: {{guest: 16Mi}}\n    resources: {{requests: {{cpu: 10m}}}}\n    firmware: {{kernelBoot: {{kernelArgs: scenario=idle, container: {{kernelPath: /usr/share/ferrovirt/testguest}}}}}}\n    devices: {{disks: [{{name: data}}], interfaces: [{{name: vmnet, binding: {{name: vhostuser}}}}]}}\n  networks: [{{name: vmnet, pod: {{}}}}]\n  volumes: [{{name: data, emptyDisk: {{capacity: 4Mi}}}}]\n"
    )
}

fn vmi_running(v: &Value) -> bool {
    v["status"]["phase"].as_str() == Some("Running")
}

fn vmi_scheduled(v: &Value) -> bool {
    matches!(v["status"]["phase"].as_str(), Some("Scheduled" | "Running"))
}

fn pod_ready(v: &Value) -> bool {
    v["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Creates `OBJECTS` objects `SPACING` apart (each a `kubectl create` of its own, not waited
/// for) and returns creation → done latencies in seconds.
fn create_and_time(
    cluster: &Cluster,
    ns: &Namespace,
    kind: &str,
    yaml: fn(&str) -> String,
    done: fn(&Value) -> bool,
) -> anyhow::Result<Vec<f64>> {
    let scratch = ScratchDir::new("cp-bench")?;
    let watch_log = scratch.join("watch.stderr");
    let (watcher, events) = watch(cluster, ns.name(), kind, done, &watch_log)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut created: HashMap<String, Instant> = HashMap::new();
    let mut creators = Vec::new();
    let start = Instant::now();
    for i in 0..OBJECTS {
        let name = format!("o{i:03}");
        let file = scratch.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml(&name))?;
        let due = start + SPACING * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        created.insert(name, Instant::now());
        creators.push(
            Command::new(cluster.binary("kubectl"))
                .env("KUBECONFIG", cluster.kubeconfig())
                .args(["-n", ns.name(), "create", "-f"])
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?,
        );
    }
    for c in creators {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let mut latencies = Vec::new();
    while latencies.len() < OBJECTS {
        let left = DEADLINE.checked_sub(start.elapsed()).ok_or_else(|| {
            anyhow!(
                "{} of {OBJECTS} {kind} done after {DEADLINE:?}",
                latencies.len()
            )
        })?;
        let (name, at) = match events.recv_timeout(left) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "{} of {OBJECTS} {kind} done after {DEADLINE:?}",
                    latencies.len()
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!(
                "the watch of {kind} ended after {} of {OBJECTS}: {}",
                latencies.len(),
                std::fs::read_to_string(&watch_log).unwrap_or_default()
            ),
        };
        if let Some(t0) = created.get(&name) {
            latencies.push(at.duration_since(*t0).as_secs_f64());
        }
    }
    drop(watcher);
    Ok(latencies)
}

/// CPU seconds (user + system) of `pid` so far.
fn cpu_seconds(pid: i32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the comm field: state is index 0, utime 11, stime 12.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11) + ticks(12)) / hz)
}

/// Peak RSS of `pid` in MiB (VmHWM).
fn peak_rss_mib(pid: i32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no VmHWM for pid {pid}"))?;
    Ok(kib / 1024.0)
}

/// The value of the metric `name` (no labels) on the controller's /metrics.
fn scrape(port: u16, name: &str) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .ok_or_else(|| anyhow!("{name} not on /metrics"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct FerrovirtRun {
    latencies: Vec<f64>,
    cpu_s: f64,
    rss_mib: f64,
    requests_per_vmi: f64,
}

fn ferrovirt_round(cluster: &Cluster) -> anyhow::Result<FerrovirtRun> {
    let ns = cluster.namespace("cpb-vmi")?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    // The stand-in launcher needs no /dev/kvm: no device-plugin resource (the node's kvm
    // devices exist only while an agent runs).
    let controller = ControllerProcess::start(
        &ns,
        &["--no-leader-elect", "--listen", &listen, "--kvm-resource="],
    )
    .map_err(|e| anyhow!(e))?;
    let pid = controller.process.pid();
    let ready = Instant::now();
    while scrape(port, "ferrovirt_controller_api_requests_total").is_err() {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!(
                "the controller did not serve /metrics: {}",
                controller.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = cpu_seconds(pid)?;
    let req0 = scrape(port, "ferrovirt_controller_api_requests_total")?;
    let latencies = create_and_time(cluster, &ns, "vmi", vmi_yaml, vmi_scheduled)?;
    let cpu_s = cpu_seconds(pid)? - cpu0;
    let requests = scrape(port, "ferrovirt_controller_api_requests_total")? - req0;
    let rss_mib = peak_rss_mib(pid)?;
    drop(controller);
    drop(ns);
    Ok(FerrovirtRun {
        latencies,
        cpu_s,
        rss_mib,
        requests_per_vmi: requests / OBJECTS as f64,
    })
}

struct NodeRun {
    latencies: Vec<f64>,
    agent_cpu_s: f64,
    overhead_mib: f64,
}

/// Host memory of one running VM beyond its guest RAM, in MiB: the proportional set size of
/// the VMM and its backends without shared memory (the guest RAM is a shared memfd).
fn vm_overhead_mib(uid: &str) -> anyhow::Result<f64> {
    let record: Value = serde_json::from_slice(&std::fs::read(
        std::path::Path::new("/var/run/ferrovirt/vmis")
            .join(uid)
            .join("agent.json"),
    )?)?;
    let mut pids = vec![record["vmm_pid"].as_i64().unwrap_or(0)];
    if let Some(backends) = record["backends"].as_object() {
        pids.extend(backends.values().filter_map(Value::as_i64));
    }
    let mut kib = 0.0;
    for pid in pids {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        for line in rollup.lines() {
            if let Some(v) = line
                .strip_prefix("Pss_Anon:")
                .or_else(|| line.strip_prefix("Pss_File:"))
            {
                kib += v
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    Ok(kib / 1024.0)
}

fn node_round(cluster: &Cluster, net: &VmNetwork) -> anyhow::Result<NodeRun> {
    let ns = cluster.namespace("cpb-node")?;
    let agent = AgentPod::start_with_cni_state(cluster, Some(&net.cni_state_dir()))
        .map_err(|e| anyhow!(e))?;
    let controller = ControllerProcess::start_with_launcher(
        &ns,
        FERROVIRT_LAUNCHER_IMAGE,
        &["--no-leader-elect", "--vm-runtime-class", VM_RUNTIME_CLASS],
    )
    .map_err(|e| anyhow!(e))?;
    std::thread::sleep(Duration::from_secs(2));
    let agent_pid = agent
        .pid()
        .ok_or_else(|| anyhow!("the agent does not run"))?;
    let cpu0 = cpu_seconds(agent_pid)?;
    let latencies = create_and_time(cluster, &ns, "vmi", running_vmi_yaml, vmi_running)
        .map_err(|e| anyhow!("{e}\nagent log:\n{}", agent.logs()))?;
    let agent_cpu_s = cpu_seconds(agent_pid)? - cpu0;
    let list = ns.get_json(&["vmi"])?;
    let uids: Vec<String> = list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v["metadata"]["uid"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let overheads = uids
        .iter()
        .map(|uid| vm_overhead_mib(uid))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    drop(controller);
    drop(ns);
    drop(agent);
    Ok(NodeRun {
        latencies,
        agent_cpu_s,
        overhead_mib: percentile(&overheads, 0.5),
    })
}

fn peer_round(cluster: &Cluster, yaml: fn(&str) -> String) -> anyhow::Result<Vec<f64>> {
    let ns = cluster.namespace("cpb-pod")?;
    let latencies = create_and_time(cluster, &ns, "pods", yaml, pod_ready)?;
    drop(ns);
    Ok(latencies)
}

fn run(config: &RunConfig) -> anyhow::Result<SuiteReport> {
    let cluster = Cluster::try_from_env()
        .map_err(|e| anyhow!("{e}: run `tests/k8s/cluster.sh run -- cargo run --release -p ferrovirt-benches -- control-plane`"))?;
    ferrovirt_k8s::install(&cluster).map_err(anyhow::Error::msg)?;
    ferrovirt_k8s::load_launcher_image(&cluster).map_err(anyhow::Error::msg)?;
    // One VM network for the suite (100 VMIs, then 100 pods, each round): its drop waits
    // for the CNI DELs of pods still going away.
    let net = VmNetwork::create(&cluster, "10.250.0.250").map_err(|e| anyhow!(e))?;
    let mut same_net50 = Samples::new("running-p50-same-networks", "s", Better::Lower);
    let mut same_net95 = Samples::new("running-p95-same-networks", "s", Better::Lower);
    let mut running50 = Samples::new("running-p50", "s", Better::Lower);
    let mut running95 = Samples::new("running-p95", "s", Better::Lower);
    let mut overhead = Samples::new("overhead-mib", "MiB", Better::Lower);
    let mut agent_cpu = Samples::new("agent-cpu-s", "s", Better::Lower);
    let mut p50 = Samples::new("scheduled-p50", "s", Better::Lower);
    let mut p95 = Samples::new("scheduled-p95", "s", Better::Lower);
    let mut cpu = Samples::new("controller-cpu-s", "s", Better::Lower);
    let mut rss = Samples::new("controller-rss-mib", "MiB", Better::Lower);
    let mut requests = Samples::new("api-requests-per-vmi", "requests", Better::Lower);
    for round in 0..config.rounds {
        for side in round_order(round) {
            let latencies = match side {
                Side::Ferrovirt => {
                    let r = ferrovirt_round(&cluster).context("ferrovirt round")?;
                    cpu.push(side, r.cpu_s);
                    rss.push(side, r.rss_mib);
                    requests.push(side, r.requests_per_vmi);
                    // No controller on the peer side: nothing to compare with, the ratio is null.
                    for s in [&mut cpu, &mut rss, &mut requests] {
                        s.push(Side::Peer, 0.0);
                    }
                    let node = node_round(&cluster, &net).context("node round")?;
                    for (p50s, p95s) in [
                        (&mut running50, &mut running95),
                        (&mut same_net50, &mut same_net95),
                    ] {
                        p50s.push(side, percentile(&node.latencies, 0.5));
                        p95s.push(side, percentile(&node.latencies, 0.95));
                    }
                    overhead.push(side, node.overhead_mib);
                    agent_cpu.push(side, node.agent_cpu_s);
                    for s in [&mut overhead, &mut agent_cpu] {
                        s.push(Side::Peer, 0.0);
                    }
                    r.latencies
                }
                Side::Peer => {
                    // The two kinds of pods take turns at going first, so that neither
                    // always runs while the other's 100 pods are still being cleaned up.
                    let plain = || peer_round(&cluster, pod_yaml).context("peer round");
                    let on_network = || {
                        peer_round(&cluster, pod_on_vm_network_yaml)
                            .context("peer round on the VM network")
                    };
                    let (latencies, same) = if round % 2 == 0 {
                        let l = plain()?;
                        (l, on_network()?)
                    } else {
                        let s = on_network()?;
                        (plain()?, s)
                    };
                    // Plain pods are the floor for both the Scheduled and the Running times.
                    running50.push(side, percentile(&latencies, 0.5));
                    running95.push(side, percentile(&latencies, 0.95));
                    same_net50.push(side, percentile(&same, 0.5));
                    same_net95.push(side, percentile(&same, 0.95));
                    latencies
                }
            };
            p50.push(side, percentile(&latencies, 0.5));
            p95.push(side, percentile(&latencies, 0.95));
        }
        eprintln!("control-plane: round {}/{} done", round + 1, config.rounds);
    }
    let peer_name = "plain pods of the same image (creation → Ready)".to_string();
    let rows = summarize_all(
        &[
            running50, running95, same_net50, same_net95, overhead, agent_cpu, p50, p95, cpu, rss,
            requests,
        ],
        &peer_name,
    )?;
    Ok(SuiteReport {
        suite: SUITE.name.to_string(),
        peer_name,
        rounds: config.rounds,
        rows,
        goals: vec![
            Goal::at_most("running-p95", 2.0, "creation → Running P95 ≤ 2 s"),
            Goal::at_most("overhead-mib", 10.0, "≤ 10 MiB host memory per VM beyond guest RAM"),
            Goal::ratio_at_most("scheduled-p50", 1.1, "controller overhead ≤ 10 % of the plain-pod time (P50)"),
            Goal::ratio_at_most("scheduled-p95", 1.1, "controller overhead ≤ 10 % of the plain-pod time (P95)"),
        ],
        notes: vec![
            format!("{OBJECTS} objects per side per round, one `kubectl create` each, started {} ms apart; times from the create's start to the watch event that shows the state (client clock)", SPACING.as_millis()),
            "ferrovirt: VirtualMachineInstance creation → status.phase Scheduled (its launcher pod runs on the node; a busybox stand-in launcher, so this row times the controller alone); the controller runs as its ServiceAccount with leader election off".into(),
            "peer: Pod creation → Ready condition, the same image, restart policy and terminal; the floor that the scheduler, kubelet and containerd set on this one-node harness".into(),
            "controller-cpu-s, controller-rss-mib, api-requests-per-vmi: the controller process over the ferrovirt side of a round (CPU from /proc/PID/stat, VmHWM, its client's request counter on /metrics); the peer has no controller, so its column is 0 and the ratio null".into(),
            "running-p50/p95 (ferrovirt side): VirtualMachineInstance creation → status.phase Running with the real launcher image (ferrovirt-vmm waiting on its API socket) in RuntimeClass ferrovirt (ferrovirt-cni gives each pod a TAP on the eBPF switch), ferrovirt-agent as the DaemonSet pod of deploy/agent.yaml (device plugin; per VM one ferrovirt-vhost-blk and one ferrovirt-vhost-net in the pod's cgroups, VM created and booted through the API) and the test guest idling (scenario=idle) with one disk and one NIC; peer side: the same round's plain pods".into(),
            format!("running-p50/p95-same-networks: the same VMIs against plain pods in RuntimeClass {VM_RUNTIME_CLASS}, which get the VM network's ferrovirt-cni attachment as well as the cluster network (in each round's peer turn, these and the plain pods take turns at going first): the ratio is what the VM adds beyond its pod's networks"),
            "overhead-mib: per running VM, the proportional set size of its VMM, disk backend and NIC backend without shared memory (Pss_Anon + Pss_File from smaps_rollup; guest RAM is a shared memfd), median over the 100; agent-cpu-s: the agent's CPU seconds over the node round".into(),
            "anchor: KubeVirt's sig-performance 100-VMI lane reports creation → Running P95 of about 20–30 s".into(),
        ],
    })
}
