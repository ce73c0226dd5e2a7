//! The node side on the real Kubernetes of tests/k8s: ferrovirt-agent (device plugin and VMI
//! handling), the real launcher image (ferrovirt-vmm waiting on its API socket) and the
//! controller. VMIs boot the test guest inside their launcher pods on real KVM with
//! ferrovirt-vhost-blk disks in the pod's cgroups; the agent reports them Running, survives
//! being killed, and leaves nothing behind when a VMI goes.
//!
//! The agent is node-wide, so these tests take turns (one agent at a time).
//!
//! Run inside the cluster: `tests/k8s/cluster.sh run -- cargo test -p ferrovirt-tests --features k8s --test k8s_node`

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ferrovirt_tests::agent::AgentPod;
use ferrovirt_tests::ferrovirt_k8s::{
    self, ControllerProcess, FERROVIRT_LAUNCHER_IMAGE, VmNetwork, str_at,
};
use ferrovirt_tests::k8s::{Cluster, Namespace, OciImage, wait_for};
use ferrovirt_tests::{ScratchDir, blk_pattern};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);
const VMIS_DIR: &str = "/var/run/ferrovirt/vmis";

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    let cluster = CLUSTER.get_or_init(Cluster::from_env);
    ferrovirt_k8s::install(cluster).unwrap_or_else(|e| panic!("{e}"));
    ferrovirt_k8s::load_launcher_image(cluster).unwrap_or_else(|e| panic!("{e}"));
    cluster
}

/// One test at a time owns the node's agent.
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

struct Node {
    ns: Namespace,
    agent: AgentPod,
    _controller: ControllerProcess,
    _turn: MutexGuard<'static, ()>,
}

impl Node {
    fn start(prefix: &str) -> Node {
        let turn = turn();
        let cluster = cluster();
        let ns = cluster.namespace(prefix).unwrap_or_else(|e| panic!("{e}"));
        let controller = ControllerProcess::start_with_launcher(
            &ns,
            FERROVIRT_LAUNCHER_IMAGE,
            &["--no-leader-elect"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let agent = AgentPod::start(cluster).unwrap_or_else(|e| panic!("{e}"));
        Node {
            ns,
            agent,
            _controller: controller,
            _turn: turn,
        }
    }

    fn vmi(&self, name: &str) -> Option<Value> {
        self.ns.get_json(&["vmi", name]).ok()
    }

    fn wait_vmi(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        ferrovirt_k8s::wait_json(&self.ns, "vmi", name, what, WAIT, check)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.agent.logs()))
    }

    /// Waits until the launcher pod `pod`'s log (the guest's console) shows `text`.
    fn wait_log(&self, pod: &str, text: &str) {
        wait_for(&format!("{text:?} on {pod}'s console"), WAIT, || {
            let log = self.ns.kubectl(&["logs", pod]).unwrap_or_default();
            if log.contains(text) { Ok(()) } else { Err(log) }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }

    fn wait_phase(&self, name: &str, phase: &str) -> Value {
        self.wait_vmi(name, &format!("VMI {name} {phase}"), |v| {
            str_at(v, "/status/phase") == phase
        })
    }
}

/// A VMI of the test guest with `kernel_args`, `devices` (a YAML flow map) and the rest of
/// its spec (`extra`, indented two spaces).
fn test_guest_vmi(name: &str, kernel_args: &str, devices: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: ferrovirt.io/v1alpha1
kind: VirtualMachineInstance
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 5
  domain:
    memory: {{guest: 16Mi}}
    firmware:
      kernelBoot:
        kernelArgs: {kernel_args}
        container: {{kernelPath: /usr/share/ferrovirt/testguest}}
    devices: {devices}
{extra}"#
    )
}

/// A VirtualMachine with `strategy` whose template is the spec of `vmi` (a VMI manifest of
/// [`test_guest_vmi`]).
fn test_guest_vm(name: &str, strategy: &str, vmi: &str) -> String {
    let spec = vmi.split_once("\nspec:\n").map_or("", |(_, spec)| spec);
    let template: String = spec.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: ferrovirt.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\nspec:\n  runStrategy: {strategy}\n  template:\n    spec:\n{template}"
    )
}

/// A VMI of the test guest with one disk backed by `volume` (a YAML flow map of the volume
/// source).
fn vmi_yaml(name: &str, kernel_args: &str, volume: &str) -> String {
    test_guest_vmi(
        name,
        kernel_args,
        &format!("{{disks: [{{name: data, serial: {name}}}]}}"),
        &format!("  volumes: [{{name: data, {volume}}}]\n"),
    )
}

/// The VMI's host directory and what the agent recorded in it.
fn agent_record(uid: &str) -> Option<Value> {
    let text = std::fs::read(Path::new(VMIS_DIR).join(uid).join("agent.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn backend_pids(record: &Value) -> Vec<i32> {
    record["backends"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(Value::as_i64)
                .map(|p| p as i32)
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// Nothing of the VMI `uid` is left on the node: its directory and the processes of `record`.
fn assert_node_clean(uid: &str, record: &Value) {
    wait_for("the VMI's node state to go", WAIT, || {
        let dir = PathBuf::from(VMIS_DIR).join(uid);
        let left: Vec<i32> = backend_pids(record)
            .into_iter()
            .filter(|p| alive(*p))
            .collect();
        if dir.exists() || !left.is_empty() {
            Err(format!(
                "dir exists: {}, backends alive: {left:?}",
                dir.exists()
            ))
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// What `fvctl console VMI` shows until `text` appears (at most 30 s), then detaches.
fn fvctl_console(ns: &Namespace, vmi: &str, text: &str) -> String {
    use std::io::Write;
    let binary = ferrovirt_tests::try_fvctl_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut child = std::process::Command::new(binary)
        .env("KUBECONFIG", cluster().kubeconfig())
        .args(["-n", ns.name(), "console", vmi])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("fvctl: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let reader = ferrovirt_tests::process::read_until_text(stdout, text, Duration::from_secs(30));
    let seen = reader.join().unwrap_or_default();
    // Ctrl+] detaches; the VM goes on.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&[0x1d]);
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

#[test]
fn a_vmi_boots_in_its_launcher_pod_and_its_writes_reach_the_host_image() {
    let node = Node::start("node-blk");
    let images = ScratchDir::new("node-blk").unwrap_or_else(|e| panic!("{e}"));
    let image = images.join("data.img");
    node.ns
        .apply(&vmi_yaml(
            "writer",
            "scenario=blk blk_seed=23 blk_sectors=2048",
            &format!(
                "hostDisk: {{path: {}, type: DiskOrCreate, capacity: 4Mi}}",
                image.display()
            ),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    // The guest passes and powers off: the VMM exits 0, the pod and the VMI succeed.
    let v = node.wait_phase("writer", "Succeeded");
    let phases: Vec<&str> = v["status"]["phaseTransitionTimestamps"]
        .as_array()
        .map(|a| a.iter().map(|p| str_at(p, "/phase")).collect())
        .unwrap_or_default();
    assert!(phases.contains(&"Running"), "phases: {phases:?}");
    assert_eq!(str_at(&v, "/status/nodeName"), "localhost");
    // The agent says the VM is no longer ready.
    node.wait_vmi("writer", "Ready=False VMStopped", |v| {
        v["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                str_at(c, "/type") == "Ready"
                    && str_at(c, "/status") == "False"
                    && str_at(c, "/reason") == "VMStopped"
            })
        })
    });
    let bytes = std::fs::read(&image).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bytes.len(), 4 << 20);
    assert_eq!(blk_pattern::first_mismatch(&bytes, 23, 0..2048), None);
    let log = node
        .ns
        .kubectl(&["logs", "virt-launcher-writer"])
        .unwrap_or_default();
    assert!(log.contains("testguest: PASS blk"), "launcher log:\n{log}");
    assert!(log.contains("serial=writer"), "launcher log:\n{log}");
    let uid = str_at(&v, "/metadata/uid").to_owned();
    wait_for("the VMI's directory to go", WAIT, || {
        if Path::new(VMIS_DIR).join(&uid).exists() {
            Err("still there".to_string())
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_running_vmi_is_reported_and_deleting_it_leaves_nothing() {
    let node = Node::start("node-run");
    node.ns
        .apply(&vmi_yaml(
            "idler",
            "scenario=idle",
            "emptyDisk: {capacity: 8Mi}",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_phase("idler", "Running");
    assert_eq!(str_at(&v, "/status/nodeName"), "localhost");
    let conditions = v["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for wanted in ["Ready", "AgentConnected"] {
        assert!(
            conditions
                .iter()
                .any(|c| str_at(c, "/type") == wanted && str_at(c, "/status") == "True"),
            "no {wanted}=True in {conditions:?}"
        );
    }
    let uid = str_at(&v, "/metadata/uid").to_owned();
    let record = agent_record(&uid).expect("the agent's record of the VMI");
    let pids = backend_pids(&record);
    assert_eq!(pids.len(), 1, "{record}");
    // The disk backend lives in the launcher pod's cgroups, so the pod pays for it.
    let pod = node
        .ns
        .get_json(&["pod", "virt-launcher-idler"])
        .unwrap_or_else(|e| panic!("{e}"));
    let pod_uid = str_at(&pod, "/metadata/uid");
    assert!(!pod_uid.is_empty(), "the launcher pod has no UID: {pod}");
    // The harness's kubelet uses the cgroupfs driver: the pod's cgroup is `.../pod<UID>`.
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", pids[0]))
        .unwrap_or_else(|e| panic!("the disk backend {}: {e}", pids[0]));
    let memory = cgroups
        .lines()
        .find(|l| l.split(':').nth(1) == Some("memory"))
        .unwrap_or_else(|| panic!("no memory cgroup in:\n{cgroups}"));
    assert!(
        memory.contains(&format!("/pod{pod_uid}")),
        "the backend's memory cgroup is not the pod's: {memory}"
    );
    // The guest runs: its console is the launcher's output, and `fvctl console` shows it
    // live through the API server (attach replays nothing, so what it shows is new).
    node.wait_log("virt-launcher-idler", "testguest: idle 1");
    let console = fvctl_console(&node.ns, "idler", "testguest: idle ");
    assert!(
        console.contains("testguest: idle "),
        "fvctl console showed: {console:?}"
    );
    node.ns
        .kubectl(&["delete", "vmi", "idler", "--wait=true", "--timeout=90s"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_node_clean(&uid, &record);
    assert!(node.vmi("idler").is_none());
}

#[test]
fn a_restarted_agent_adopts_running_vms_without_restarting_them() {
    let node = Node::start("node-adopt");
    node.ns
        .apply(&vmi_yaml(
            "kept",
            "scenario=idle",
            "emptyDisk: {capacity: 8Mi}",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_phase("kept", "Running");
    let uid = str_at(&v, "/metadata/uid").to_owned();
    let before = agent_record(&uid).expect("record");
    // SIGKILL: no chance to tidy up. The kubelet starts the agent's container again.
    let old = node.agent.kill().unwrap_or_else(|e| panic!("{e}"));
    node.agent
        .wait_restarted(old)
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(5));
    let after = agent_record(&uid).expect("record after the restart");
    assert_eq!(before, after, "the VM or its backends were restarted");
    let vmm = after["vmm_pid"].as_i64().unwrap_or(-1) as i32;
    assert!(alive(vmm), "the VMM {vmm} died");
    for pid in backend_pids(&after) {
        assert!(alive(pid), "backend {pid} died");
    }
    assert_eq!(
        str_at(&node.vmi("kept").unwrap_or_default(), "/status/phase"),
        "Running"
    );
    node.ns
        .kubectl(&["delete", "vmi", "kept", "--wait=true", "--timeout=90s"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_node_clean(&uid, &after);
}

/// The backend processes on this host whose command lines name the VMI `uid`'s directory.
fn live_backends(uid: &str) -> Vec<i32> {
    let dir = format!("{VMIS_DIR}/{uid}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("ferrovirt-vhost") && c.contains(&dir)
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn an_agent_killed_during_start_up_is_resumed_without_starting_anything_twice_and_cloud_init_is_served()
 {
    let node = Node::start("node-startkill");
    node.ns
        .apply(&test_guest_vmi(
            "early",
            "scenario=idle",
            "{disks: [{name: a}, {name: b}]}",
            "  volumes: [{name: a, emptyDisk: {capacity: 8Mi}}, {name: b, cloudInitNoCloud: {userData: \"#cloud-config\\nhostname: early\\n\"}}]\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let uid = node.wait_vmi("early", "VMI early to have a UID", |v| {
        !str_at(v, "/metadata/uid").is_empty()
    });
    let uid = str_at(&uid, "/metadata/uid").to_owned();
    let dir = Path::new(VMIS_DIR).join(&uid);
    // The agent opens a backend's log just before starting it: freeze the agent there, then
    // kill it, so it dies with its start half done.
    let agent_pid = node.agent.pid().expect("the agent runs");
    let deadline = std::time::Instant::now() + WAIT;
    while !dir.join("disk-a.log").exists() {
        // A tight loop: the whole start takes milliseconds.
        assert!(
            std::time::Instant::now() < deadline,
            "the agent started no backend in {WAIT:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let frozen = agent_record(&uid);
    assert!(
        frozen.as_ref().is_none_or(|r| r["booted"] != true),
        "the agent was stopped after the boot, not during the start: {frozen:?}"
    );
    let old = node.agent.kill().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(old, agent_pid);
    let half_started = live_backends(&uid);
    node.agent
        .wait_restarted(old)
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_phase("early", "Running");
    let record = agent_record(&uid).expect("the new agent's record");
    assert_eq!(record["booted"], true, "{record}");
    let mut recorded = backend_pids(&record);
    recorded.sort_unstable();
    assert_eq!(recorded.len(), 2, "{record}");
    // One backend per disk: the half-started ones are gone, nothing runs twice.
    assert_eq!(live_backends(&uid), recorded, "record: {record}");
    for pid in half_started {
        assert!(
            !alive(pid) || recorded.contains(&pid),
            "backend {pid} of the killed start still runs"
        );
    }
    let vmm = record["vmm_pid"].as_i64().unwrap_or(-1) as i32;
    assert!(alive(vmm), "the VMM {vmm} died");
    // Disk b is the cloud-init NoCloud disk the agent wrote: FAT, with the user data.
    let user_data = std::process::Command::new("mtype")
        .arg("-i")
        .arg(dir.join("b.cidata.img"))
        .arg("::user-data")
        .output()
        .unwrap_or_else(|e| panic!("mtype: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&user_data.stdout),
        "#cloud-config\nhostname: early\n",
        "{user_data:?}"
    );
    // The guest runs: its console is the launcher's output.
    node.wait_log("virt-launcher-early", "testguest: idle 1");
    assert_eq!(str_at(&v, "/status/phase"), "Running");
    node.ns
        .kubectl(&["delete", "vmi", "early", "--wait=true", "--timeout=90s"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_node_clean(&uid, &record);
    assert!(live_backends(&uid).is_empty());
}

#[test]
fn a_crashing_guest_is_run_again_under_rerun_on_failure_and_halting_leaves_nothing() {
    let node = Node::start("node-rerun");
    // An unknown scenario: the guest prints FAIL and ends with debug-exit status 34.
    node.ns
        .apply(&test_guest_vm(
            "crasher",
            "RerunOnFailure",
            &vmi_yaml("crasher", "scenario=crash", "emptyDisk: {capacity: 8Mi}"),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut failed: Vec<String> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    wait_for("the crashed VMI to be replaced", WAIT * 2, || {
        let v = node.vmi("crasher").ok_or("no VMI")?;
        let uid = str_at(&v, "/metadata/uid").to_owned();
        if !uid.is_empty() && !seen.contains(&uid) {
            seen.push(uid.clone());
        }
        if str_at(&v, "/status/phase") == "Failed" && !failed.contains(&uid) {
            assert!(
                str_at(&v, "/status/reason").contains("34"),
                "the VMI's reason does not give the guest's exit status: {v}"
            );
            failed.push(uid);
        }
        // A VMI that failed, and a newer one the VM made after it.
        match (failed.first(), seen.last()) {
            (Some(first), Some(last)) if first != last => Ok(()),
            _ => Err(format!("failed: {failed:?}, seen: {seen:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    node.ns
        .kubectl(&[
            "patch",
            "vm",
            "crasher",
            "--type=merge",
            "-p",
            r#"{"spec":{"runStrategy":"Halted"}}"#,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for("the VMI to go", WAIT, || match node.vmi("crasher") {
        None => Ok(()),
        Some(v) => Err(format!("{}", v["status"])),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for uid in &seen {
        assert_node_clean(uid, &Value::Null);
        assert_eq!(live_backends(uid), Vec::<i32>::new(), "VMI {uid}");
    }
}

#[test]
fn a_missing_or_planted_disk_image_fails_the_vmi_with_a_condition_and_starts_nothing() {
    let node = Node::start("node-bad");
    let images = ScratchDir::new("node-bad").unwrap_or_else(|e| panic!("{e}"));
    let missing = images.join("missing.img");
    node.ns
        .apply(&vmi_yaml(
            "lost",
            "scenario=blk",
            &format!("hostDisk: {{path: {}, type: Disk}}", missing.display()),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_phase("lost", "Failed");
    let conditions = v["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let sync = conditions
        .iter()
        .find(|c| str_at(c, "/type") == "Synchronized")
        .unwrap_or_else(|| panic!("no Synchronized condition: {conditions:?}"));
    assert_eq!(str_at(sync, "/status"), "False");
    assert!(
        str_at(sync, "/message").contains("does not exist"),
        "{sync}"
    );
    let uid = str_at(&v, "/metadata/uid").to_owned();
    assert_node_clean(&uid, &Value::Null);
    // A disk path that is a link to a file of the node, as a VMM could plant in its volume:
    // resolved inside the launcher's root, it names nothing there. The file is where the
    // agent's pod sees the node's files (/var/run/ferrovirt), so a link followed from the
    // agent's side would reach it.
    let run_dir = Path::new("/var/run/ferrovirt");
    std::fs::create_dir_all(run_dir).unwrap_or_else(|e| panic!("{e}"));
    let node_files = ScratchDir::new_in(run_dir, "node-only").unwrap_or_else(|e| panic!("{e}"));
    let secret = node_files.join("node-only.img");
    std::fs::write(&secret, vec![0x77u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
    let planted = images.join("planted");
    std::fs::create_dir(&planted).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink(&secret, planted.join("disk.img")).unwrap_or_else(|e| panic!("{e}"));
    node.ns
        .apply(&vmi_yaml(
            "planted",
            "scenario=blk",
            &format!(
                "hostDisk: {{path: {}, type: Disk}}",
                planted.join("disk.img").display()
            ),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_phase("planted", "Failed");
    let message = v["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| str_at(c, "/type") == "Synchronized")
        .map(|c| str_at(c, "/message").to_owned())
        .unwrap_or_default();
    assert!(message.contains("does not exist"), "{v}");
    assert_eq!(
        std::fs::read(&secret).unwrap_or_default(),
        vec![0x77u8; 1 << 20],
        "the node's file was touched"
    );
    let uid = str_at(&v, "/metadata/uid").to_owned();
    assert_node_clean(&uid, &Value::Null);
}

/// A VMI of the test guest with one vhost-user interface on the VM network.
fn net_vmi_yaml(name: &str, kernel_args: &str) -> String {
    test_guest_vmi(
        name,
        kernel_args,
        "{interfaces: [{name: vmnet, binding: {name: vhostuser}}]}",
        "  networks: [{name: vmnet, pod: {}}]\n",
    )
}

#[test]
fn frames_from_one_vm_reach_another_through_the_ebpf_switch() {
    let cluster = cluster();
    let turn = turn();
    let net = VmNetwork::create(cluster, "10.250.0.50").unwrap_or_else(|e| panic!("{e}"));
    let ns = cluster
        .namespace("node-net")
        .unwrap_or_else(|e| panic!("{e}"));
    let _controller = ControllerProcess::start_with_launcher(
        &ns,
        FERROVIRT_LAUNCHER_IMAGE,
        &["--no-leader-elect", "--vm-runtime-class", "ferrovirt"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let agent = AgentPod::start_with_cni_state(cluster, Some(&net.cni_state_dir()))
        .unwrap_or_else(|e| panic!("{e}"));
    let node = Node {
        ns,
        agent,
        _controller,
        _turn: turn,
    };
    // The receiver first: host-local gives it the first address of the range.
    node.ns
        .apply(&net_vmi_yaml(
            "receiver",
            "scenario=net-recv ip=10.250.0.10 count=200 seconds=60",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let b = node.wait_phase("receiver", "Running");
    // `kubectl get vmi` shows the phase, the IP and the node.
    let table = node
        .ns
        .kubectl(&["get", "vmi", "receiver"])
        .unwrap_or_default();
    for column in ["Running", "10.250.0.10", "localhost"] {
        assert!(table.contains(column), "kubectl get vmi:\n{table}");
    }
    let iface = &b["status"]["interfaces"][0];
    assert_eq!(str_at(iface, "/name"), "vmnet", "{iface}");
    assert_eq!(str_at(iface, "/ipAddress"), "10.250.0.10", "{iface}");
    let mac = str_at(iface, "/mac").to_owned();
    assert_eq!(mac.len(), 17, "{iface}");
    node.ns
        .apply(&net_vmi_yaml(
            "sender",
            &format!(
                "scenario=net-send ip=10.250.0.11 dst_ip=10.250.0.10 dst_mac={mac} count=200 size=256 wait_ms=200"
            ),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let a = node.wait_phase("sender", "Running");
    assert_eq!(
        str_at(&a["status"]["interfaces"][0], "/ipAddress"),
        "10.250.0.11"
    );
    // ferrovirt-cni attached each TAP's program as a cls_bpf filter; the agent made both
    // TCX links before their VMs booted.
    let pins = net.link_pins();
    let linked = pins.iter().filter(|p| p.starts_with("endpoint:")).count();
    let filters = pins
        .iter()
        .filter(|p| p.starts_with("endpoint-filter:"))
        .count();
    assert_eq!((linked, filters), (2, 0), "{pins:?}");
    node.wait_phase("receiver", "Succeeded");
    let log = node
        .ns
        .kubectl(&["logs", "virt-launcher-receiver"])
        .unwrap_or_default();
    assert!(log.contains("good=200 bad=0"), "receiver log:\n{log}");
    assert!(
        log.contains("testguest: PASS net-recv"),
        "receiver log:\n{log}"
    );
    node.wait_phase("sender", "Succeeded");
    let uid = str_at(&b, "/metadata/uid").to_owned();
    node.ns
        .kubectl(&["delete", "vmi", "--all", "--wait=true", "--timeout=90s"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_node_clean(&uid, &Value::Null);
    drop(node);
    // The pods are gone: CNI DEL removed the TAPs and their endpoints.
    assert_eq!(net.cni_records(), 0, "CNI records left");
}

#[test]
fn a_killed_disk_backend_is_started_again_and_the_vm_keeps_running() {
    let node = Node::start("node-respawn");
    node.ns
        .apply(&vmi_yaml(
            "steady",
            "scenario=idle",
            "emptyDisk: {capacity: 8Mi}",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_phase("steady", "Running");
    let uid = str_at(&v, "/metadata/uid").to_owned();
    let before = agent_record(&uid).expect("record");
    let old = backend_pids(&before)[0];
    let vmm = before["vmm_pid"].as_i64().unwrap_or(-1) as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let after = wait_for("the disk backend to be started again", WAIT, || {
        let record = agent_record(&uid).ok_or("no record")?;
        match backend_pids(&record).first() {
            Some(&pid) if pid != old && alive(pid) => Ok(record),
            _ => Err(format!("{record}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(alive(vmm), "the VMM {vmm} died with its backend");
    assert_eq!(after["vmm_pid"], before["vmm_pid"]);
    // The VMM reconnected to the new backend (its counters, through its API socket).
    let api = Path::new(VMIS_DIR).join(&uid).join("vmm.sock");
    wait_for("the VMM to reconnect", WAIT, || {
        let counters = ferrovirt_tests::http::request(
            &api,
            "GET",
            "/api/v1/vm.counters",
            None,
            Duration::from_secs(5),
        )
        .map_err(|e| e.to_string())?;
        let json: Value = serde_json::from_str(&counters.body).map_err(|e| e.to_string())?;
        if json["disk0"]["reconnects"].as_u64() >= Some(1) {
            Ok(())
        } else {
            Err(counters.body)
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        str_at(&node.vmi("steady").unwrap_or_default(), "/status/phase"),
        "Running"
    );
    node.ns
        .kubectl(&["delete", "vmi", "steady", "--wait=true", "--timeout=90s"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_node_clean(&uid, &after);
}

#[test]
fn a_disk_backend_killed_while_the_guest_writes_loses_no_write() {
    let node = Node::start("node-inflight");
    let images = ScratchDir::new("node-inflight").unwrap_or_else(|e| panic!("{e}"));
    let image = images.join("data.img");
    // 1 GiB in 8 KiB requests: long enough (several seconds of writes) that the guest is
    // still writing when the test has seen the VMI Running and the first 16 MiB on disk.
    // With 256 MiB in 32 KiB requests it was done before that once on a quiet machine.
    const SECTORS: u64 = 2 * 1024 * 1024;
    node.ns
        .apply(&vmi_yaml(
            "busy",
            &format!("scenario=blk blk_seed=77 blk_sectors={SECTORS} blk_req=16 blk_depth=8"),
            &format!(
                "hostDisk: {{path: {}, type: DiskOrCreate, capacity: 1Gi}}",
                image.display()
            ),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_phase("busy", "Running");
    let uid = str_at(&v, "/metadata/uid").to_owned();
    let before = agent_record(&uid).expect("record");
    let old = backend_pids(&before)[0];
    // Kill the backend once the guest has written some of the disk, not all of it: the
    // image is sparse, so its allocated blocks say how far the writes got.
    let written = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&image).map_or(0, |m| m.blocks() * 512)
    };
    let deadline = std::time::Instant::now() + WAIT;
    while written() < 16 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest wrote nothing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let at_kill = written();
    assert!(
        at_kill < SECTORS * 512,
        "the guest had written everything before the kill"
    );
    // The guest wrote the rest through the new backend, read all of it back and passed.
    let v = node.wait_phase("busy", "Succeeded");
    assert_eq!(str_at(&v, "/status/phase"), "Succeeded");
    let log = node
        .ns
        .kubectl(&["logs", "virt-launcher-busy"])
        .unwrap_or_default();
    assert!(log.contains("testguest: PASS blk"), "launcher log:\n{log}");
    let bytes = std::fs::read(&image).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        blk_pattern::first_mismatch(&bytes, 77, 0..SECTORS),
        None,
        "killed at {at_kill} bytes written"
    );
    assert_node_clean(&uid, &before);
    assert!(live_backends(&uid).is_empty());
}

/// A `local` PersistentVolume on node localhost (cluster-scoped: deleted on drop) and a
/// claim of `size` pre-bound to it in the test's namespace; `block` backs it with a loop
/// device over `path` (`volumeMode: Block`), else it is the directory `path`.
struct LocalVolume {
    name: String,
    loop_device: Option<String>,
}

impl LocalVolume {
    fn new(ns: &Namespace, claim: &str, path: &Path, size: &str, block: bool) -> LocalVolume {
        let name = format!("{}-{claim}", ns.name());
        let (mode, local, loop_device) = if block {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(path)
                .output()
                .unwrap_or_else(|e| panic!("losetup: {e}"));
            assert!(out.status.success(), "losetup: {out:?}");
            let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            ("Block", device.clone(), Some(device))
        } else {
            ("Filesystem", path.display().to_string(), None)
        };
        let volume = LocalVolume { name, loop_device };
        let (name, ns_name) = (&volume.name, ns.name());
        ns.apply(&format!(
            r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: {name}}}
spec:
  capacity: {{storage: {size}}}
  volumeMode: {mode}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: {ns_name}-local
  local: {{path: {local}}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [localhost]}}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {claim}}}
spec:
  volumeMode: {mode}
  accessModes: [ReadWriteOnce]
  storageClassName: {ns_name}-local
  volumeName: {name}
  resources: {{requests: {{storage: {size}}}}}
"#
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        volume
    }
}

impl Drop for LocalVolume {
    fn drop(&mut self) {
        let _ = cluster().kubectl(&["delete", "pv", &self.name, "--wait=false"]);
        if let Some(device) = &self.loop_device {
            let _ = std::process::Command::new("losetup")
                .args(["-d", device])
                .status();
        }
    }
}

#[test]
fn persistent_volume_claims_on_local_volumes_serve_disks_in_filesystem_and_block_mode() {
    let node = Node::start("node-pvc");
    let images = ScratchDir::new("node-pvc").unwrap_or_else(|e| panic!("{e}"));
    let fs_dir = images.join("fs");
    std::fs::create_dir(&fs_dir).unwrap_or_else(|e| panic!("{e}"));
    let block_file = images.join("block.img");
    std::fs::File::create(&block_file)
        .and_then(|f| f.set_len(32 << 20))
        .unwrap_or_else(|e| panic!("{e}"));
    let _fs = LocalVolume::new(&node.ns, "fs-claim", &fs_dir, "48Mi", false);
    let _block = LocalVolume::new(&node.ns, "block-claim", &block_file, "32Mi", true);
    for (name, claim, seed) in [("onfs", "fs-claim", 41), ("onblock", "block-claim", 42)] {
        node.ns
            .apply(&vmi_yaml(
                name,
                &format!("scenario=blk blk_seed={seed} blk_sectors=4096"),
                &format!("persistentVolumeClaim: {{claimName: {claim}}}"),
            ))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // A claim that does not exist: a condition, and no pod.
    node.ns
        .apply(&vmi_yaml(
            "noclaim",
            "scenario=idle",
            "persistentVolumeClaim: {claimName: nosuch}",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    for name in ["onfs", "onblock"] {
        node.wait_phase(name, "Succeeded");
    }
    // Filesystem mode: the claim's disk.img, made at the claim's size, holds the pattern.
    let bytes = std::fs::read(fs_dir.join("disk.img")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bytes.len(), 48 << 20);
    assert_eq!(blk_pattern::first_mismatch(&bytes, 41, 0..4096), None);
    // Block mode: the loop device's backing file holds it.
    let bytes = std::fs::read(&block_file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(blk_pattern::first_mismatch(&bytes, 42, 0..4096), None);
    let v = node.wait_vmi("noclaim", "a condition about the missing claim", |v| {
        v["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                str_at(c, "/reason") == "PersistentVolumeClaimNotFound"
                    && str_at(c, "/message").contains("nosuch")
            })
        })
    });
    assert_eq!(str_at(&v, "/status/phase"), "Pending", "{v}");
    assert!(
        node.ns.get_json(&["pod", "virt-launcher-noclaim"]).is_err(),
        "a launcher pod was made for a VMI whose claim does not exist"
    );
    for name in ["onfs", "onblock", "noclaim"] {
        node.ns
            .kubectl(&["delete", "vmi", name, "--wait=true", "--timeout=90s"])
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn a_container_disk_is_copied_from_its_image_and_a_missing_disk_or_image_is_a_condition() {
    let node = Node::start("node-cdisk");
    // An image with the disk and nothing else (no shell, no C library), as KubeVirt's
    // containerDisk images are: 2048 sectors of pattern 51, then 1 MiB of zeroes.
    let dir = ScratchDir::new("node-cdisk").unwrap_or_else(|e| panic!("{e}"));
    let disk = dir.join("disk.img");
    let mut bytes: Vec<u8> = (0..2048)
        .flat_map(|s| blk_pattern::sector_bytes(51, s))
        .collect();
    bytes.resize(2 << 20, 0);
    std::fs::write(&disk, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let image = format!("ferrovirt.io/{}-disk:test", node.ns.name());
    cluster()
        .load_image(&OciImage::new(&image).file(&disk, "/disk/cirros.img"))
        .unwrap_or_else(|e| panic!("{e}"));
    node.ns
        .apply(&vmi_yaml(
            "fromimage",
            "scenario=blk blk_mode=verify blk_seed=51 blk_sectors=2048",
            &format!("containerDisk: {{image: {image}, imagePullPolicy: Never}}"),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    // The guest read the image's pattern; its VMM's exit ends the pod although the disk's
    // container (a sidecar) was still running.
    let v = node.wait_phase("fromimage", "Succeeded");
    let log = node
        .ns
        .kubectl(&["logs", "virt-launcher-fromimage", "-c", "compute"])
        .unwrap_or_default();
    assert!(log.contains("testguest: PASS blk"), "launcher log:\n{log}");
    let sidecar = node
        .ns
        .kubectl(&["logs", "virt-launcher-fromimage", "-c", "volume-0"])
        .unwrap_or_default();
    assert!(
        sidecar.contains("serving /disk"),
        "container disk log:\n{sidecar}"
    );
    assert_node_clean(str_at(&v, "/metadata/uid"), &Value::Null);
    // A disk path the image does not have: a condition, nothing left running.
    node.ns
        .apply(&vmi_yaml(
            "nodisk",
            "scenario=idle",
            &format!(
                "containerDisk: {{image: {image}, imagePullPolicy: Never, path: /disk/nosuch.img}}"
            ),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_vmi("nodisk", "a LaunchFailed condition", |v| {
        v["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                str_at(c, "/reason") == "LaunchFailed"
                    && str_at(c, "/message").contains("nosuch.img")
            })
        })
    });
    let uid = str_at(&v, "/metadata/uid").to_owned();
    node.wait_phase("nodisk", "Failed");
    assert_node_clean(&uid, &Value::Null);
    assert!(live_backends(&uid).is_empty());
    // An image the kubelet cannot pull (nothing listens on port 1): a condition with the
    // kubelet's reason while the VMI waits in Scheduling.
    let absent = "localhost:1/ferrovirt/absent-disk:1";
    node.ns
        .apply(&vmi_yaml(
            "nopull",
            "scenario=idle",
            &format!("containerDisk: {{image: \"{absent}\"}}"),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_vmi("nopull", "an image pull condition", |v| {
        v["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                str_at(c, "/type") == "Synchronized"
                    && ["ErrImagePull", "ImagePullBackOff"].contains(&str_at(c, "/reason"))
            })
        })
    });
    let conditions = v["status"]["conditions"].to_string();
    assert!(
        conditions.contains(&format!("cannot get its image {absent}")),
        "{conditions}"
    );
    assert_eq!(str_at(&v, "/status/phase"), "Scheduling");
    node.ns
        .kubectl(&["delete", "vmi", "nopull", "--wait=true", "--timeout=60s"])
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::process::Command::new("ctr")
        .arg("-a")
        .arg(cluster().containerd_socket())
        .args(["-n", "k8s.io", "images", "rm", &image])
        .status();
}

#[test]
fn deleting_the_launcher_pod_by_hand_fails_the_vmi_and_cleans_the_node() {
    let node = Node::start("node-podgone");
    node.ns
        .apply(&vmi_yaml(
            "orphan",
            "scenario=idle",
            "emptyDisk: {capacity: 8Mi}",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_phase("orphan", "Running");
    let uid = str_at(&v, "/metadata/uid").to_owned();
    let record = agent_record(&uid).expect("record");
    node.ns
        .kubectl(&[
            "delete",
            "pod",
            "virt-launcher-orphan",
            "--wait=true",
            "--timeout=90s",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    let v = node.wait_vmi("orphan", "VMI orphan to end", |v| {
        matches!(str_at(v, "/status/phase"), "Failed" | "Succeeded")
    });
    assert!(!str_at(&v, "/status/reason").is_empty(), "{v}");
    assert_node_clean(&uid, &record);
    let vmm = record["vmm_pid"].as_i64().unwrap_or(-1) as i32;
    assert!(!alive(vmm), "the VMM {vmm} outlived its pod");
}
