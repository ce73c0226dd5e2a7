//! The node agent's device plugins on the real kubelet of tests/k8s: `ferrovirt-agent`
//! registers `devices.ferrovirt.io/kvm` and an SR-IOV pool read from a fake sysfs tree, the
//! node advertises them, pods that request them get /dev/kvm or their VFs' PCI addresses (and
//! pods that do not, do not), a request larger than the pool is unschedulable, the agent
//! registers again when kubelet restarts, and a stopped agent leaves no socket behind.
//!
//! The tests share one kubelet, and a kubelet restart affects every plugin, so they run one at
//! a time.
//!
//! Run inside the cluster: `tests/k8s/cluster.sh run -- cargo test -p ferrovirt-tests --features k8s --test k8s_device_plugin`

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ferrovirt_tests::agent::AgentProcess;
use ferrovirt_tests::fake_sysfs::FakeSysfs;
use ferrovirt_tests::k8s::{Cluster, Namespace, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);
const KVM: &str = "devices.ferrovirt.io/kvm";
/// Prints what /dev/kvm is in the container and exits 0 only for a character device.
const KVM_PROBE: &str = "if [ -c /dev/kvm ]; then echo 'kvm: char device'; exit 0; \
     elif [ -e /dev/kvm ]; then echo 'kvm: not a char device'; exit 2; \
     else echo 'kvm: absent'; exit 3; fi";

/// One test at a time: they share the kubelet and its resources.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn namespace(cluster: &Cluster, prefix: &str) -> Namespace {
    cluster.namespace(prefix).unwrap_or_else(|e| panic!("{e}"))
}

fn agent(cluster: &Cluster, args: &[&str]) -> AgentProcess {
    AgentProcess::start(cluster, args).unwrap_or_else(|e| panic!("{e}"))
}

/// The node's allocatable count of `resource`, as the API server has it.
fn allocatable(cluster: &Cluster, resource: &str) -> Option<String> {
    let node = cluster.get_json(&["node", "localhost"]).ok()?;
    node["status"]["allocatable"][resource]
        .as_str()
        .map(str::to_owned)
}

fn wait_allocatable(cluster: &Cluster, resource: &str, want: &str) {
    wait_for(
        &format!("node allocatable {resource} = {want}"),
        WAIT,
        || match allocatable(cluster, resource) {
            Some(have) if have == want => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A busybox pod running `script` once, with `limits` (`resource: count`) on its container.
fn create_pod(ns: &Namespace, name: &str, script: &str, limits: &[(&str, u32)]) {
    let image = ns
        .cluster()
        .busybox_image()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut resources = String::new();
    if !limits.is_empty() {
        resources.push_str("    resources:\n      limits:\n");
        for (resource, count) in limits {
            resources.push_str(&format!("        {resource}: \"{count}\"\n"));
        }
    }
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n    imagePullPolicy: Never\n    command: [\"/bin/sh\", \"-c\", {script}]\n{resources}",
        script = Value::from(script)
    );
    ns.apply(&yaml).unwrap_or_else(|e| panic!("{e}"));
}

/// Waits for the pod's container to end; its exit code and log.
fn finished(ns: &Namespace, name: &str) -> (i64, String) {
    let code = wait_for(&format!("pod {name} to finish"), WAIT, || {
        let pod = ns.get_json(&["pod", name]).map_err(|e| e.to_string())?;
        pod.pointer("/status/containerStatuses/0/state/terminated/exitCode")
            .and_then(Value::as_i64)
            .ok_or_else(|| format!("{}", pod["status"]))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let log = ns
        .kubectl(&["logs", name])
        .unwrap_or_else(|e| panic!("{e}"));
    (code, log.trim().to_owned())
}

/// Which file `path` is: inode and change time (an inode number alone can be reused at once).
fn identity(path: &Path) -> Option<(u64, i64, i64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

#[test]
fn kvm_slots_are_advertised_and_only_pods_that_request_one_see_dev_kvm() {
    let _serial = serial();
    let cluster = Cluster::from_env();
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm on the host"
    );
    let agent = agent(&cluster, &["--kvm-devices", "7"]);
    wait_allocatable(&cluster, KVM, "7");
    assert!(agent.serves("kvm"), "{}", agent.stderr());

    let ns = namespace(&cluster, "dpkvm");
    create_pod(&ns, "with-kvm", KVM_PROBE, &[(KVM, 1)]);
    create_pod(&ns, "without-kvm", KVM_PROBE, &[]);
    assert_eq!(
        finished(&ns, "with-kvm"),
        (0, "kvm: char device".to_owned()),
        "agent log:\n{}",
        agent.stderr()
    );
    assert_eq!(finished(&ns, "without-kvm"), (3, "kvm: absent".to_owned()));
    assert!(
        agent.stderr().contains("allocated"),
        "kubelet did not call Allocate: {}",
        agent.stderr()
    );
}

#[test]
fn sriov_pool_from_sysfs_gives_pods_vf_addresses_and_is_not_overcommitted() {
    let _serial = serial();
    let cluster = Cluster::from_env();
    let sysfs = FakeSysfs::new("dp").unwrap_or_else(|e| panic!("{e}"));
    let vfs = sysfs
        .add_pf_with_vfs("0000:5e:00.0", "fakepf0", 3, "iavf")
        .unwrap_or_else(|e| panic!("{e}"));
    // A pool name of this run only, so no earlier registration of it counts.
    let pool = format!("t{}", std::process::id());
    let resource = format!("devices.ferrovirt.io/sriov-{pool}");
    let env = format!("PCIDEVICE_FERROVIRT_IO_SRIOV_T{}", std::process::id());
    let root = sysfs.root().display().to_string();
    let pool_flag = format!("{pool}=fakepf0");
    let agent = agent(
        &cluster,
        &[
            "--kvm-devices",
            "0",
            "--sriov-pool",
            &pool_flag,
            "--sysfs-root",
            &root,
        ],
    );
    wait_allocatable(&cluster, &resource, "3");
    assert!(!agent.serves("kvm"), "--kvm-devices 0 still serves kvm");

    let ns = namespace(&cluster, "dpvf");
    create_pod(
        &ns,
        "two-vfs",
        &format!("echo \"${env}\""),
        &[(&resource, 2)],
    );
    let (code, log) = finished(&ns, "two-vfs");
    assert_eq!(code, 0, "{log}");
    let mut granted: Vec<&str> = log.split(',').collect();
    granted.sort();
    // GetPreferredAllocation asks for the lowest addresses, and kubelet follows it.
    assert_eq!(granted, vfs[..2], "agent log:\n{}", agent.stderr());

    create_pod(&ns, "too-many", "true", &[(&resource, 4)]);
    let want = format!("Insufficient {resource}");
    let condition = wait_for("pod too-many to be unschedulable", WAIT, || {
        let pod = ns
            .get_json(&["pod", "too-many"])
            .map_err(|e| e.to_string())?;
        let conditions = pod["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        conditions
            .into_iter()
            .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
            .filter(|c| c["message"].as_str().is_some_and(|m| m.contains(&want)))
            .ok_or_else(|| format!("{}", pod["status"]))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(condition["reason"], "Unschedulable", "{condition}");
    let pod = ns
        .get_json(&["pod", "too-many"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pod["status"]["phase"], "Pending", "{pod}");
}

#[test]
fn agent_registers_again_after_kubelet_restarts() {
    let _serial = serial();
    let cluster = Cluster::from_env();
    let mut agent = agent(&cluster, &["--kvm-devices", "5"]);
    wait_allocatable(&cluster, KVM, "5");
    let socket = agent.socket("kvm");
    let first = identity(&socket).expect("the kvm socket exists");
    let kubelet_log = cluster.state_dir().join("logs/kubelet.log");

    cluster.restart_kubelet().unwrap_or_else(|e| panic!("{e}"));
    // kubelet emptied the directory as it started; the agent serves a new socket...
    wait_for("the agent's new kvm socket", WAIT, || {
        match identity(&socket) {
            Some(now) if now != first => Ok(()),
            other => Err(format!("now {other:?}, first {first:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.stderr()));
    // ...and the new kubelet got its registration.
    wait_for(
        "the new kubelet to log the agent's registration",
        WAIT,
        || {
            let log = std::fs::read_to_string(&kubelet_log).unwrap_or_default();
            log.lines()
                .any(|l| {
                    l.contains("Got registration request from device plugin") && l.contains(KVM)
                })
                .then_some(())
                .ok_or_else(|| "not yet".to_owned())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.stderr()));
    wait_allocatable(&cluster, KVM, "5");
    assert!(
        agent.process_is_running(),
        "the agent exited: {}",
        agent.stderr()
    );

    // The restarted kubelet can allocate through the new registration.
    let ns = namespace(&cluster, "dprst");
    create_pod(&ns, "after-restart", KVM_PROBE, &[(KVM, 1)]);
    assert_eq!(
        finished(&ns, "after-restart"),
        (0, "kvm: char device".to_owned()),
        "agent log:\n{}",
        agent.stderr()
    );
}

#[test]
fn stopped_agent_removes_its_sockets_and_the_node_drops_its_devices() {
    let _serial = serial();
    let cluster = Cluster::from_env();
    let sysfs = FakeSysfs::new("dpstop").unwrap_or_else(|e| panic!("{e}"));
    sysfs
        .add_pf_with_vfs("0000:6a:00.0", "fakepf1", 2, "iavf")
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = format!("s{}", std::process::id());
    let pool_flag = format!("{pool}=0000:6a:00.0");
    let root = sysfs.root().display().to_string();
    let mut agent = agent(
        &cluster,
        &[
            "--kvm-devices",
            "3",
            "--sriov-pool",
            &pool_flag,
            "--sysfs-root",
            &root,
        ],
    );
    wait_allocatable(&cluster, KVM, "3");
    wait_allocatable(&cluster, &format!("devices.ferrovirt.io/sriov-{pool}"), "2");
    let sockets = [agent.socket("kvm"), agent.socket(&format!("sriov-{pool}"))];
    for socket in &sockets {
        assert!(socket.exists(), "{} missing", socket.display());
    }

    let exit = agent.process.terminate().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(exit.status.code(), Some(0), "{}", agent.stderr());
    for socket in &sockets {
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
    // kubelet notices the plugin is gone and stops offering its devices.
    wait_allocatable(&cluster, KVM, "0");
}
