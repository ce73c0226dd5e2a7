//! The test Kubernetes of `tests/k8s/` is a working cluster: its node is Ready and runs the
//! release we built, pods of images built here run without a registry, `kubectl logs`, `exec`
//! and `attach` reach containers through the API server, RuntimeClass `ferrovirt` pods get the
//! cluster network as eth0 and a second conflist's network as eth1, namespaces of tests go away, and ServiceAccount kubeconfigs get exactly
//! their RBAC. Run inside the cluster:
//! `tests/k8s/build.sh && tests/k8s/cluster.sh run -- cargo test -p ferrovirt-tests --features k8s --test k8s_harness`

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrovirt_tests::k8s::{Cluster, Namespace, wait_for};
use ferrovirt_tests::{CleanupGuard, Link, unique_name};

const POD_READY: Duration = Duration::from_secs(90);

fn namespace(prefix: &str) -> Namespace {
    Cluster::from_env()
        .namespace(prefix)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A pod of one container `c` running `script` with busybox's sh (or the image's entrypoint
/// when `script` is empty).
fn pod_yaml(name: &str, image: &str, runtime_class: Option<&str>, script: &str) -> String {
    let runtime_class = runtime_class
        .map(|class| format!("  runtimeClassName: {class}\n"))
        .unwrap_or_default();
    let command = if script.is_empty() {
        String::new()
    } else {
        format!(
            "    command: [\"/bin/sh\", \"-c\", {}]\n",
            serde_json::Value::from(script)
        )
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{runtime_class}  terminationGracePeriodSeconds: 1\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n    imagePullPolicy: Never\n    stdin: true\n{command}"
    )
}

fn busybox(ns: &Namespace) -> &'static str {
    ns.cluster()
        .busybox_image()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn create_ready_pod(ns: &Namespace, name: &str, yaml: &str) -> Duration {
    let start = Instant::now();
    ns.apply(yaml).unwrap_or_else(|e| panic!("{e}"));
    ns.wait_condition(&format!("pod/{name}"), "Ready", POD_READY)
        .unwrap_or_else(|e| panic!("pod {name} not Ready: {e}"));
    start.elapsed()
}

/// A busybox pod that sleeps, to exec into; returns when it is Ready.
fn create_sleeper(ns: &Namespace, name: &str, runtime_class: Option<&str>) {
    let yaml = pod_yaml(
        name,
        busybox(ns),
        runtime_class,
        "exec /bin/busybox sleep 3600",
    );
    create_ready_pod(ns, name, &yaml);
}

fn str_at<'a>(value: &'a serde_json::Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

#[test]
fn node_is_ready_and_runs_kubernetes_1_34_2() {
    let cluster = Cluster::from_env();
    let node = cluster
        .get_json(&["node", "localhost"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(str_at(&node, "/status/nodeInfo/kubeletVersion"), "v1.34.2");
    assert!(
        str_at(&node, "/status/nodeInfo/containerRuntimeVersion").starts_with("containerd://"),
        "{node}"
    );
    let conditions = node["status"]["conditions"].as_array().cloned();
    let ready = conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c["type"] == "Ready")
        .unwrap_or_else(|| panic!("no Ready condition in {node}"));
    assert_eq!(ready["status"], "True", "{ready}");
    let version: serde_json::Value = serde_json::from_str(
        &cluster
            .kubectl(&["version", "-o", "json"])
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(str_at(&version, "/serverVersion/gitVersion"), "v1.34.2");
    assert_eq!(str_at(&version, "/clientVersion/gitVersion"), "v1.34.2");
    let class = cluster
        .get_json(&["runtimeclass", "ferrovirt"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(class["handler"], "ferrovirt", "{class}");
}

#[test]
fn pause_image_pod_runs_without_a_registry() {
    let ns = namespace("pause");
    let image = ns.cluster().pause_image().to_string();
    create_ready_pod(&ns, "pause", &pod_yaml("pause", &image, None, ""));
    let pod = ns
        .get_json(&["pod", "pause"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(str_at(&pod, "/spec/nodeName"), "localhost");
    let status = &pod["status"]["containerStatuses"][0];
    assert!(status["state"]["running"].is_object(), "{status}");
    assert_eq!(status["restartCount"], 0, "{status}");
}

#[test]
fn pod_output_reaches_kubectl_logs_through_the_api_server() {
    let ns = namespace("logs");
    let line = format!("hello from {}", ns.name());
    let yaml = pod_yaml(
        "printer",
        busybox(&ns),
        None,
        &format!("echo '{line}'; exec /bin/busybox sleep 3600"),
    );
    let ready_after = create_ready_pod(&ns, "printer", &yaml);
    eprintln!("pod creation -> Ready: {ready_after:?}");
    let logs = wait_for("the pod's line in kubectl logs", POD_READY, || {
        match ns.kubectl(&["logs", "printer"]) {
            Ok(logs) if logs.contains(&line) => Ok(logs),
            Ok(logs) => Err(logs),
            Err(e) => Err(e.to_string()),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(logs.trim(), line);
}

#[test]
fn kubectl_exec_runs_in_the_container_and_passes_its_exit_status() {
    let ns = namespace("exec");
    create_sleeper(&ns, "target", None);
    let out = ns
        .kubectl_output(&[
            "exec",
            "target",
            "--",
            "/bin/sh",
            "-c",
            "echo $((6 * 7)); cat /proc/1/cmdline; exit 7",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("42"), "{out:?}");
    // PID 1 of the container is the pod's process, not something on the host.
    assert!(lines.next().is_some_and(|l| l.contains("sleep")), "{out:?}");
}

#[test]
fn kubectl_attach_reaches_the_containers_stdin_and_stdout() {
    let ns = namespace("attach");
    let yaml = pod_yaml(
        "reader",
        busybox(&ns),
        None,
        "read line; echo \"got: $line\"; exec /bin/busybox sleep 3600",
    );
    create_ready_pod(&ns, "reader", &yaml);
    let cluster = ns.cluster();
    // kubectl ends the session when its stdin closes, so stdin stays open until the answer
    // has come back.
    let mut attach = Command::new(cluster.binary("kubectl"))
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(["-n", ns.name(), "attach", "-i", "reader", "-c", "c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run kubectl attach: {e}"));
    let mut stdin = attach.stdin.take().expect("piped stdin");
    let stdout = attach.stdout.take().expect("piped stdout");
    let (answer_tx, answer_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if answer_tx.send(line).is_err() {
                break;
            }
        }
    });
    stdin
        .write_all(b"through the api server\n")
        .unwrap_or_else(|e| panic!("cannot write to kubectl attach: {e}"));
    let answer = answer_rx.recv_timeout(Duration::from_secs(30));
    drop(stdin);
    let _ = attach.kill();
    let _ = attach.wait();
    assert_eq!(
        answer.as_deref(),
        Ok("got: through the api server"),
        "no answer from the container through kubectl attach"
    );
}

#[test]
fn runtime_class_ferrovirt_pods_get_eth0_and_eth1_from_a_second_conflist() {
    let cluster = Cluster::from_env();
    // Declared before the namespace, so on any exit the pods go first (CNI DEL of eth1 still
    // finds its network), then the conflist, then the bridge.
    let bridge = Link::bridge(&unique_name("fvb")).unwrap_or_else(|e| panic!("{e}"));
    let conflist_path = cluster.vm_cni_dir().join("20-second.conflist");
    let _conflist = CleanupGuard::new(conflist_path.display().to_string(), |path| {
        let _ = std::fs::remove_file(path);
    });
    let ns = namespace("rtc");

    create_sleeper(&ns, "first", Some("ferrovirt"));
    let pod = ns
        .get_json(&["pod", "first"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(str_at(&pod, "/spec/runtimeClassName"), "ferrovirt");
    let pod_ip = str_at(&pod, "/status/podIP").to_string();
    let eth0 = ipv4_of(&ns, "first", "eth0");
    assert!(
        eth0.contains(&format!("inet {pod_ip}/")),
        "eth0 of the pod does not hold its pod IP {pod_ip}: {eth0}"
    );
    assert_eq!(links_of(&ns, "first"), ["eth0", "lo"]);

    // What the node's tests do for a VM network: a second conflist beside the cluster's.
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("{}-second", ns.name()),
        "plugins": [{
            "type": "bridge",
            "bridge": bridge.name(),
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.246.0.0/24"}]],
                "dataDir": cluster.state_dir().join("cni-ipam"),
            },
        }],
    });
    // Renamed into place: containerd must never load a half-written file.
    let staged = conflist_path.with_extension("tmp");
    std::fs::write(&staged, conflist.to_string()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&staged, &conflist_path).unwrap_or_else(|e| panic!("{e}"));
    // containerd picks the file up through inotify; a pod created before that has only eth0.
    let mut attempt = 0;
    let name = wait_for("a pod with eth1", Duration::from_secs(30), || {
        attempt += 1;
        let name = format!("second-{attempt}");
        create_sleeper(&ns, &name, Some("ferrovirt"));
        let links = links_of(&ns, &name);
        if links == ["eth0", "eth1", "lo"] {
            Ok(name)
        } else {
            Err(format!("{name} has {links:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let eth1 = ipv4_of(&ns, &name, "eth1");
    assert!(eth1.contains("inet 10.246.0."), "{eth1}");
    // The pod's eth1 is a port of the test's bridge on the host.
    let ports = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", bridge.name()])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        String::from_utf8_lossy(&ports.stdout).contains("veth"),
        "no veth on bridge {}: {ports:?}",
        bridge.name()
    );
}

/// `ip -4 -o addr show DEV` inside the pod.
fn ipv4_of(ns: &Namespace, pod: &str, dev: &str) -> String {
    ns.kubectl(&[
        "exec",
        pod,
        "--",
        "/bin/busybox",
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        dev,
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The pod's network interfaces, sorted.
fn links_of(ns: &Namespace, pod: &str) -> Vec<String> {
    let out = ns
        .kubectl(&["exec", pod, "--", "/bin/busybox", "ls", "/sys/class/net"])
        .unwrap_or_else(|e| panic!("{e}"));
    let mut links: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    links.sort_unstable();
    links
}

#[test]
fn namespace_guard_deletes_the_namespace_and_its_objects() {
    let ns = namespace("guard");
    let name = ns.name().to_string();
    ns.kubectl(&["create", "configmap", "kept", "--from-literal=a=b"])
        .unwrap_or_else(|e| panic!("{e}"));
    let cm = ns
        .get_json(&["configmap", "kept"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cm["data"]["a"], "b");
    let cluster = ns.cluster().clone();
    drop(ns);
    let out = cluster
        .kubectl_output(cluster.kubeconfig(), &["get", "namespace", &name], None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !out.status.success() && out.stderr.contains("NotFound"),
        "namespace {name} still there after its guard was dropped: {out:?}"
    );
}

#[test]
fn service_account_kubeconfig_gets_exactly_its_rbac() {
    let ns = namespace("sa");
    let cluster = ns.cluster();
    ns.kubectl(&["create", "serviceaccount", "tester"])
        .unwrap_or_else(|e| panic!("{e}"));
    let kubeconfig = cluster
        .service_account_kubeconfig(ns.name(), "tester")
        .unwrap_or_else(|e| panic!("{e}"));
    let as_tester = |args: &[&str]| {
        cluster
            .kubectl_output(kubeconfig.path(), args, None)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let whoami = as_tester(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(
        whoami.stdout,
        format!("system:serviceaccount:{}:tester", ns.name()),
        "{whoami:?}"
    );
    let denied = as_tester(&["get", "pods"]);
    assert!(
        !denied.status.success() && denied.stderr.contains("forbidden"),
        "{denied:?}"
    );
    ns.kubectl(&[
        "create",
        "role",
        "pod-reader",
        "--verb=list",
        "--resource=pods",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    ns.kubectl(&[
        "create",
        "rolebinding",
        "tester-reads-pods",
        "--role=pod-reader",
        &format!("--serviceaccount={}:tester", ns.name()),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        "the role binding to take effect",
        Duration::from_secs(30),
        || {
            let out = as_tester(&["get", "pods"]);
            if out.status.success() {
                Ok(())
            } else {
                Err(out.stderr)
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let still_denied = as_tester(&["get", "secrets"]);
    assert!(
        !still_denied.status.success() && still_denied.stderr.contains("forbidden"),
        "{still_denied:?}"
    );
}
