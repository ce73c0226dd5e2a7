//! The controller, its CRDs and fvctl on the real Kubernetes of tests/k8s: `kubectl apply` of
//! VirtualMachines gives VMIs and launcher pods as KubeVirt's users expect; bad manifests are
//! refused by the API server with a message; the controller runs under its own ServiceAccount
//! and RBAC, survives being killed, and elects one leader of two.
//!
//! Launcher pods run the stand-in launcher of `ferrovirt_tests::ferrovirt_k8s`.
//!
//! Run inside the cluster: `tests/k8s/cluster.sh run -- cargo test -p ferrovirt-tests --features k8s --test k8s_controller`

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use ferrovirt_tests::ferrovirt_k8s::{self, ControllerProcess, LAUNCHER_IMAGE};
use ferrovirt_tests::k8s::{Cluster, Namespace, wait_for};
use ferrovirt_tests::{repo_root, try_fvctl_binary};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    let cluster = CLUSTER.get_or_init(Cluster::from_env);
    ferrovirt_k8s::install(cluster).unwrap_or_else(|e| panic!("{e}"));
    cluster
}

fn namespace(prefix: &str) -> Namespace {
    cluster()
        .namespace(prefix)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A controller watching `ns` only (tests run in parallel, each with its own).
fn controller(ns: &Namespace, extra: &[&str]) -> ControllerProcess {
    ControllerProcess::start(ns, extra).unwrap_or_else(|e| panic!("{e}"))
}

fn get(ns: &Namespace, args: &[&str]) -> Option<Value> {
    ns.get_json(args).ok()
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    ferrovirt_k8s::str_at(v, pointer)
}

/// Waits until `kind/name`'s JSON satisfies `check`; returns it.
fn wait_json(
    ns: &Namespace,
    kind: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    ferrovirt_k8s::wait_json(ns, kind, name, what, WAIT, check).unwrap_or_else(|e| panic!("{e}"))
}

fn wait_gone(ns: &Namespace, kind: &str, name: &str) {
    ferrovirt_k8s::wait_gone(ns, kind, name, WAIT).unwrap_or_else(|e| panic!("{e}"));
}

fn vm_yaml(name: &str, strategy: &str, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: ferrovirt.io/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  runStrategy: {strategy}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      terminationGracePeriodSeconds: 0
      domain:
        cpu: {{cores: 1}}
        memory: {{guest: 64Mi}}
        devices:
          disks: [{{name: scratch, disk: {{bus: virtio}}}}]
      volumes: [{{name: scratch, emptyDisk: {{capacity: 16Mi}}}}]
{extra_spec}"#
    )
}

fn fvctl(ns: &Namespace, args: &[&str]) -> (i32, String, String) {
    let binary = try_fvctl_binary().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(binary)
        .env("KUBECONFIG", cluster().kubeconfig())
        .args(["-n", ns.name(), "--timeout", "90s"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("fvctl: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn uid(v: &Value) -> String {
    str_at(v, "/metadata/uid").to_owned()
}

#[test]
fn always_vm_gets_a_vmi_and_a_launcher_pod_and_fvctl_stops_and_starts_it() {
    let ns = namespace("ctl-always");
    let _c = controller(&ns, &["--no-leader-elect"]);
    ns.apply(&vm_yaml("web", "Always", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    let vmi = wait_json(&ns, "vmi", "web", "VMI web Scheduled", |v| {
        str_at(v, "/status/phase") == "Scheduled"
    });
    assert_eq!(str_at(&vmi, "/status/nodeName"), "localhost");
    assert_eq!(str_at(&vmi, "/status/launcherPod"), "virt-launcher-web");
    assert_eq!(
        str_at(&vmi, "/metadata/ownerReferences/0/kind"),
        "VirtualMachine"
    );
    assert_eq!(str_at(&vmi, "/spec/domain/memory/guest"), "64Mi");
    let pod = get(&ns, &["pod", "virt-launcher-web"]).expect("launcher pod");
    assert_eq!(str_at(&pod, "/metadata/ownerReferences/0/uid"), uid(&vmi));
    assert_eq!(str_at(&pod, "/metadata/labels/ferrovirt.io~1vmi"), "web");
    assert_eq!(str_at(&pod, "/metadata/labels/app"), "web");
    assert_eq!(str_at(&pod, "/spec/containers/0/image"), LAUNCHER_IMAGE);
    assert_eq!(
        str_at(
            &pod,
            "/spec/containers/0/resources/requests/devices.ferrovirt.io~1kvm"
        ),
        "1"
    );
    // 64 MiB guest + 32 base + 2 per vCPU + 8 per device.
    assert_eq!(
        str_at(&pod, "/spec/containers/0/resources/requests/memory"),
        "106Mi"
    );
    assert_eq!(str_at(&pod, "/status/phase"), "Running");
    let phases: Vec<&str> = vmi["status"]["phaseTransitionTimestamps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["phase"].as_str().unwrap_or(""))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(phases.last(), Some(&"Scheduled"), "{phases:?}");
    let vm = wait_json(&ns, "vm", "web", "VM web created", |v| {
        v.pointer("/status/created") == Some(&Value::Bool(true))
    });
    assert_eq!(str_at(&vm, "/status/printableStatus"), "Starting");
    let events = ns
        .kubectl(&["get", "events", "-o", "json"])
        .unwrap_or_else(|e| panic!("{e}"));
    for reason in ["SuccessfulCreate", "Scheduled"] {
        assert!(events.contains(reason), "no {reason} event in {events}");
    }
    // Printer columns.
    let table = ns
        .kubectl(&["get", "vmi", "web"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        table.contains("PHASE")
            && table.contains("NODENAME")
            && table.contains("Scheduled")
            && table.contains("localhost"),
        "{table}"
    );
    let table = ns
        .kubectl(&["get", "vm", "web"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        table.contains("STATUS") && table.contains("Starting"),
        "{table}"
    );

    let (code, _, err) = fvctl(&ns, &["stop", "web"]);
    assert_eq!(code, 0, "fvctl stop: {err}");
    assert!(get(&ns, &["vmi", "web"]).is_none());
    wait_gone(&ns, "pod", "virt-launcher-web");
    let vm = wait_json(&ns, "vm", "web", "VM web Stopped", |v| {
        str_at(v, "/status/printableStatus") == "Stopped"
    });
    assert_eq!(str_at(&vm, "/spec/runStrategy"), "Halted");
    let (code, _, err) = fvctl(&ns, &["stop", "web"]);
    assert_eq!(code, 1, "second stop: {err}");
    assert!(err.contains("is not running"), "{err}");

    let (code, out, err) = fvctl(&ns, &["start", "web"]);
    assert_eq!(code, 0, "fvctl start: {err}");
    assert!(out.contains("started"), "{out}");
    let vmi2 = get(&ns, &["vmi", "web"]).expect("new VMI");
    assert_ne!(uid(&vmi2), uid(&vmi));
    assert_eq!(str_at(&vmi2, "/status/phase"), "Scheduled");

    let (code, _, err) = fvctl(&ns, &["restart", "web"]);
    assert_eq!(code, 0, "fvctl restart: {err}");
    let vmi3 = get(&ns, &["vmi", "web"]).expect("restarted VMI");
    assert_ne!(uid(&vmi3), uid(&vmi2));

    let (code, _, err) = fvctl(&ns, &["start", "nosuchvm"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn rerun_on_failure_restarts_a_failed_vmi_and_once_does_not() {
    let ns = namespace("ctl-rerun");
    let _c = controller(&ns, &["--no-leader-elect"]);
    ns.apply(&vm_yaml("rerun-fail", "RerunOnFailure", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    ns.apply(&vm_yaml("once-fail", "Once", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    ns.apply(&vm_yaml("rerun-done", "RerunOnFailure", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    let first = wait_json(&ns, "vmi", "rerun-fail", "first VMI", |v| {
        !uid(v).is_empty()
    });
    // The launcher exits 3: the VMI fails and a new one replaces it.
    wait_for("a second VMI of rerun-fail", WAIT, || {
        match get(&ns, &["vmi", "rerun-fail"]) {
            Some(v) if uid(&v) != uid(&first) => Ok(()),
            other => Err(format!("{:?}", other.map(|v| v["status"].clone()))),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let once = wait_json(&ns, "vmi", "once-fail", "once-fail Failed", |v| {
        str_at(v, "/status/phase") == "Failed"
    });
    assert!(
        str_at(&once, "/status/reason").contains("exited with status 3"),
        "{once}"
    );
    let done = wait_json(&ns, "vmi", "rerun-done", "rerun-done Succeeded", |v| {
        str_at(v, "/status/phase") == "Succeeded"
    });
    std::thread::sleep(Duration::from_secs(3));
    let once_again = get(&ns, &["vmi", "once-fail"]).expect("once VMI kept");
    assert_eq!(uid(&once_again), uid(&once), "Once restarted its VMI");
    let done_again = get(&ns, &["vmi", "rerun-done"]).expect("succeeded VMI kept");
    assert_eq!(
        uid(&done_again),
        uid(&done),
        "RerunOnFailure restarted a VMI that succeeded"
    );
    let vm = wait_json(&ns, "vm", "once-fail", "once-fail Stopped", |v| {
        str_at(v, "/status/printableStatus") == "Stopped"
    });
    assert_eq!(vm.pointer("/status/ready"), Some(&Value::Bool(false)));
    let events = ns
        .kubectl(&["get", "events", "-o", "json"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(events.contains("\"Failed\""), "no Failed event");
}

#[test]
fn presets_apply_once_and_conflicts_are_reported() {
    let ns = namespace("ctl-preset");
    let _c = controller(&ns, &["--no-leader-elect"]);
    ns.apply(
        r#"apiVersion: ferrovirt.io/v1alpha1
kind: VirtualMachineInstancePreset
metadata: {name: small}
spec:
  selector: {matchLabels: {size: small}}
  domain:
    cpu: {cores: 2}
    resources: {requests: {cpu: 300m}}
    devices: {rng: {}}
---
apiVersion: ferrovirt.io/v1alpha1
kind: VirtualMachineInstancePreset
metadata: {name: big}
spec:
  selector: {matchLabels: {size: small}}
  domain:
    cpu: {cores: 8}
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    ns.apply(
        r#"apiVersion: ferrovirt.io/v1alpha1
kind: VirtualMachineInstance
metadata: {name: p1, labels: {size: small}}
spec:
  terminationGracePeriodSeconds: 0
  domain: {memory: {guest: 32Mi}}
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let vmi = wait_json(&ns, "vmi", "p1", "presets applied", |v| {
        v.pointer("/metadata/annotations/ferrovirt.io~1presets-applied")
            .is_some()
    });
    // Presets apply in name order: big (cores 8) first, then small conflicts on cores.
    assert_eq!(
        str_at(&vmi, "/metadata/annotations/ferrovirt.io~1presets-applied"),
        "big"
    );
    assert_eq!(vmi.pointer("/spec/domain/cpu/cores"), Some(&Value::from(8)));
    let events = wait_for("PresetConflict event", WAIT, || {
        let e = ns
            .kubectl(&["get", "events", "-o", "json"])
            .map_err(|e| e.to_string())?;
        if e.contains("PresetConflict") {
            Ok(e)
        } else {
            Err("none yet".into())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        events.contains("preset small not applied: it sets domain.cpu.cores"),
        "{events}"
    );
    let pod = wait_json(&ns, "pod", "virt-launcher-p1", "launcher pod", |_| true);
    assert_eq!(
        str_at(&pod, "/spec/containers/0/resources/requests/cpu"),
        "800m"
    );
}

#[test]
fn bad_manifests_are_refused_with_a_message() {
    let ns = namespace("ctl-bad");
    let _ = cluster();
    let base = |spec: &str| {
        format!(
            "apiVersion: ferrovirt.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: bad}}\nspec:\n{spec}"
        )
    };
    let template = |inner: &str| format!("  template:\n    spec:\n{inner}");
    let mem = "      domain:\n        memory: {guest: 64Mi}\n";
    let cases: Vec<(String, &str)> = vec![
        (
            base(&format!(
                "  running: true\n  runStrategy: Always\n{}",
                template(mem)
            )),
            "set spec.runStrategy or the deprecated spec.running, not both",
        ),
        (
            base(&format!(
                "  runStrategy: Always\n{}",
                template(
                    "      domain:\n        memory: {guest: 64Mi}\n        devices:\n          disks: [{name: root}]\n"
                )
            )),
            "needs a volume of the same name",
        ),
        (
            base(&format!(
                "  runStrategy: Always\n{}",
                template(
                    "      domain:\n        memory: {guest: 64Mi}\n        devices:\n          interfaces: [{name: nic, masquerade: {}}]\n"
                )
            )),
            "needs a network of the same name",
        ),
        (
            base(&format!(
                "  runStrategy: Always\n{}",
                template("      domain: {devices: {}}\n")
            )),
            "set the guest's memory",
        ),
        (
            base(&format!(
                "  runStrategy: Always\n{}",
                template("      domain:\n        memory: {guest: 512Ki}\n")
            )),
            "at least 1Mi",
        ),
        (
            base(&format!(
                "  runStrategy: Always\n{}",
                template(
                    "      domain:\n        memory: {guest: 64Mi}\n      volumes: [{name: a, emptyDisk: {capacity: 1Mi}}, {name: a, emptyDisk: {capacity: 1Mi}}]\n"
                )
            )),
            "Duplicate value",
        ),
        (
            base(&format!(
                "  runStrategy: Always\n{}",
                template(
                    "      domain:\n        memory: {guest: 64Mi}\n        devices:\n          interfaces: [{name: nic, binding: {name: passt}}]\n      networks: [{name: nic, pod: {}}]\n"
                )
            )),
            "ferrovirt supports binding.name: vhostuser",
        ),
        (
            base(&format!(
                "  runStrategy: Always\n{}",
                template(
                    "      domain:\n        memory: {guest: 64Mi}\n        devices:\n          interfaces: [{name: nic, bridge: {}, masquerade: {}}]\n      networks: [{name: nic, pod: {}}]\n"
                )
            )),
            "exactly one binding method",
        ),
        (
            base(&format!("  runStrategy: Sometimes\n{}", template(mem))),
            "Unsupported value: \"Sometimes\"",
        ),
    ];
    for (yaml, want) in cases {
        let result = ns
            .cluster()
            .kubectl_stdin(&["-n", ns.name(), "apply", "-f", "-"], &yaml);
        let err = match result {
            Ok(out) => panic!("accepted:\n{yaml}\n{out}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(want), "for\n{yaml}\nwanted {want:?} in: {err}");
    }
}

#[test]
fn a_kubevirt_manifest_is_accepted_after_changing_only_its_api_version() {
    let ns = namespace("ctl-kubevirt");
    let manifest = std::fs::read_to_string(repo_root().join("examples/kubevirt/fedora-nat.yaml"))
        .expect("example")
        .replace(
            "apiVersion: kubevirt.io/v1",
            "apiVersion: ferrovirt.io/v1alpha1",
        );
    ns.apply(&manifest)
        .unwrap_or_else(|e| panic!("strict apply refused the KubeVirt manifest: {e}"));
    let vm = get(&ns, &["vm", "fedora-nat"]).expect("vm");
    assert_eq!(
        str_at(&vm, "/spec/template/spec/volumes/0/containerDisk/image"),
        "quay.example/containerdisks/fedora:41"
    );
    assert_eq!(
        vm.pointer("/spec/template/spec/domain/cpu/cores"),
        Some(&Value::from(2))
    );
}

#[test]
fn kubectl_explain_prints_the_field_descriptions() {
    // The API server publishes a new CRD's OpenAPI a moment after it is established.
    let explain = |field: &str, want: &str| {
        wait_for(&format!("kubectl explain {field}"), WAIT, || {
            let out = cluster()
                .kubectl(&["explain", field])
                .map_err(|e| e.to_string())?;
            if out.contains(want) {
                Ok(out)
            } else {
                Err(out)
            }
        })
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let out = explain(
        "vm.spec.template.spec.domain.devices.disks",
        "Disks, each backed by the volume of the same name",
    );
    assert!(out.contains("bootOrder"), "{out}");
    explain("vmi.status.nodeName", "The node the VMI runs on");
    explain(
        "vm.spec.runStrategy",
        "When the controller runs a VMI for a VM",
    );
    let all = cluster()
        .kubectl(&["api-resources", "--categories=ferrovirt", "-o", "name"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all.lines().count(), 4, "{all}");
}

#[test]
fn an_unschedulable_vmi_reports_the_schedulers_reason() {
    let ns = namespace("ctl-unsched");
    let _c = controller(&ns, &["--no-leader-elect"]);
    ns.apply(&vm_yaml(
        "nowhere",
        "Always",
        "      nodeSelector: {ferrovirt.io/no-such-label: \"x\"}\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let vm = wait_json(&ns, "vm", "nowhere", "ErrorUnschedulable", |v| {
        str_at(v, "/status/printableStatus") == "ErrorUnschedulable"
    });
    let conditions = vm["status"]["conditions"].to_string();
    assert!(
        conditions.contains("didn't match Pod's node affinity/selector"),
        "{conditions}"
    );
    let vmi = get(&ns, &["vmi", "nowhere"]).expect("vmi");
    assert_eq!(str_at(&vmi, "/status/phase"), "Scheduling");
}

#[test]
fn deleting_a_vm_stops_its_vmi_and_pod_before_it_goes() {
    let ns = namespace("ctl-delete");
    let _c = controller(&ns, &["--no-leader-elect"]);
    ns.apply(&vm_yaml("gone", "Always", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_json(&ns, "vmi", "gone", "Scheduled", |v| {
        str_at(v, "/status/phase") == "Scheduled"
    });
    let vmi = get(&ns, &["vmi", "gone"]).expect("vmi");
    assert!(
        vmi["metadata"]["finalizers"]
            .to_string()
            .contains("ferrovirt.io/controller")
    );
    ns.kubectl(&["delete", "vm", "gone", "--wait=false"])
        .unwrap_or_else(|e| panic!("{e}"));
    wait_gone(&ns, "vm", "gone");
    assert!(get(&ns, &["vmi", "gone"]).is_none(), "VMI outlived its VM");
    assert!(
        get(&ns, &["pod", "virt-launcher-gone"]).is_none(),
        "pod outlived its VM"
    );
}

#[test]
fn a_killed_controller_restarts_without_losing_or_duplicating_anything() {
    let ns = namespace("ctl-restart");
    let mut c = controller(&ns, &["--no-leader-elect"]);
    for i in 0..5 {
        ns.apply(&vm_yaml(&format!("r{i}"), "Always", ""))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    std::thread::sleep(Duration::from_millis(800));
    c.process.kill().unwrap_or_else(|e| panic!("{e}"));
    let c2 = controller(&ns, &["--no-leader-elect"]);
    for i in 0..5 {
        wait_json(&ns, "vmi", &format!("r{i}"), "Scheduled", |v| {
            str_at(v, "/status/phase") == "Scheduled"
        });
    }
    let pods = ns.get_json(&["pods"]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pods["items"].as_array().map(Vec::len), Some(5), "{pods}");
    let vmis = ns.get_json(&["vmis"]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vmis["items"].as_array().map(Vec::len), Some(5));
    drop(c2);
}

#[test]
fn two_replicas_elect_one_leader_and_the_other_takes_over() {
    let ns = namespace("ctl-leader");
    let lease = format!("lease-{}", ns.name());
    let mut a = controller(&ns, &["--identity", "replica-a"]);
    let holder = |c: &Cluster| {
        c.get_json(&["-n", "ferrovirt", "lease", &lease])
            .ok()
            .map(|l| str_at(&l, "/spec/holderIdentity").to_owned())
    };
    wait_for("replica-a to lead", WAIT, || match holder(cluster()) {
        Some(h) if h == "replica-a" => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let _b = controller(&ns, &["--identity", "replica-b"]);
    ns.apply(&vm_yaml("led", "Always", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_json(&ns, "vmi", "led", "Scheduled", |v| {
        str_at(v, "/status/phase") == "Scheduled"
    });
    assert_eq!(holder(cluster()).as_deref(), Some("replica-a"));
    a.process.kill().unwrap_or_else(|e| panic!("{e}"));
    let start = std::time::Instant::now();
    wait_for(
        "replica-b to take over",
        Duration::from_secs(30),
        || match holder(cluster()) {
            Some(h) if h == "replica-b" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "takeover took {:?}",
        start.elapsed()
    );
    ns.apply(&vm_yaml("led2", "Always", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_json(&ns, "vmi", "led2", "Scheduled under replica-b", |v| {
        str_at(v, "/status/phase") == "Scheduled"
    });
    let _ = cluster().kubectl(&["-n", "ferrovirt", "delete", "lease", &lease]);
}

#[test]
fn the_controllers_service_account_can_do_its_job_and_no_more() {
    let _ = cluster();
    let sa = cluster()
        .service_account_kubeconfig("ferrovirt", "ferrovirt-controller")
        .unwrap_or_else(|e| panic!("{e}"));
    let can = |verb: &str, what: &str| {
        let out = Command::new(cluster().binary("kubectl"))
            .env("KUBECONFIG", sa.path())
            .args(["auth", "can-i", verb, what, "--all-namespaces"])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(can("create", "pods"));
    assert!(can("patch", "virtualmachineinstances.ferrovirt.io/status"));
    assert!(!can("get", "secrets"), "the controller can read secrets");
    assert!(!can("delete", "nodes"));
    assert!(!can("create", "virtualmachineinstancepresets.ferrovirt.io"));
    let out = Command::new(cluster().binary("kubectl"))
        .env("KUBECONFIG", sa.path())
        .args(["get", "secrets", "-A"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
}

#[test]
fn a_migration_that_cannot_proceed_fails_with_a_reason() {
    let ns = namespace("ctl-migrate");
    let _c = controller(&ns, &["--no-leader-elect"]);
    ns.apply(&vm_yaml("mover", "Always", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_json(&ns, "vmi", "mover", "Scheduled", |v| {
        str_at(v, "/status/phase") == "Scheduled"
    });
    let (code, _, err) = fvctl(&ns, &["migrate", "mover"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("only a Running VMI can migrate"), "{err}");
    // Act as the node agent: the guest runs.
    ns.kubectl(&[
        "patch",
        "vmi",
        "mover",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let (code, out, err) = fvctl(&ns, &["migrate", "mover"]);
    assert_eq!(code, 1, "{out}{err}");
    // One node: the target pod, kept off the source node, cannot be placed.
    assert!(err.contains("no node can take the VMI"), "{err}");
    let vmims = ns.get_json(&["vmims"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(vmims.to_string().contains("\"Failed\""));
    wait_for("target pods removed", WAIT, || {
        let pods = ns
            .get_json(&["pods", "-l", "ferrovirt.io/role=migration-target"])
            .map_err(|e| e.to_string())?;
        if pods["items"].as_array().is_some_and(Vec::is_empty) {
            Ok(())
        } else {
            Err("target pod left".into())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let vmi = get(&ns, &["vmi", "mover"]).expect("vmi");
    assert_eq!(
        str_at(&vmi, "/status/phase"),
        "Running",
        "the controller moved a Running VMI back"
    );
}

#[test]
fn fvctl_console_reaches_the_launchers_terminal_through_the_api_server() {
    let ns = namespace("ctl-console");
    let _c = controller(&ns, &["--no-leader-elect"]);
    ns.apply(&vm_yaml("talk", "Always", ""))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_json(&ns, "vmi", "talk", "Scheduled", |v| {
        str_at(v, "/status/phase") == "Scheduled"
    });
    let binary = try_fvctl_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(binary)
        .env("KUBECONFIG", cluster().kubeconfig())
        .args(["-n", ns.name(), "console", "talk"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    use std::io::Write;
    let mut stdin = child.stdin.take().expect("stdin");
    std::thread::sleep(Duration::from_secs(2));
    stdin.write_all(b"hello-from-fvctl\n").expect("write");
    let stdout = child.stdout.take().expect("stdout");
    let reader = ferrovirt_tests::process::read_until_text(
        stdout,
        "console: hello-from-fvctl",
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_secs(5));
    let _ = stdin.write_all(&[0x1d]);
    drop(stdin);
    let seen = reader.join().expect("reader");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("console: hello-from-fvctl"),
        "console output: {seen:?}"
    );
}

#[test]
fn a_multus_network_without_its_definition_is_a_condition_not_a_pod() {
    let ns = namespace("ctl-nad");
    let _c = controller(&ns, &["--no-leader-elect"]);
    ns.apply(
        r#"apiVersion: ferrovirt.io/v1alpha1
kind: VirtualMachineInstance
metadata: {name: nad}
spec:
  terminationGracePeriodSeconds: 0
  domain:
    memory: {guest: 32Mi}
    devices:
      interfaces: [{name: fast, binding: {name: vhostuser}}]
  networks: [{name: fast, multus: {networkName: vhost-net}}]
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let vmi = wait_json(&ns, "vmi", "nad", "Synchronized=False", |v| {
        v["status"]["conditions"]
            .to_string()
            .contains("NetworkAttachmentDefinitionNotFound")
    });
    let conditions = vmi["status"]["conditions"].to_string();
    assert!(
        conditions.contains(&format!(
            "NetworkAttachmentDefinition {}/vhost-net, which does not exist",
            ns.name()
        )),
        "{conditions}"
    );
    assert_eq!(str_at(&vmi, "/status/phase"), "Pending");
    assert!(
        get(&ns, &["pod", "virt-launcher-nad"]).is_none(),
        "a pod was made without its network"
    );
}
