//! The plugin binary's answers to VERSION and to bad input: the spec's error object with the
//! right code and a message that says what to fix.

mod common;

use common::{Attachment, Network, call_plugin, plugin_binary};
use ferrovirt_tests::NetNs;
use serde_json::{Value, json};

fn vhost_conf(net: &Network) -> Value {
    json!({
        "cniVersion": "1.1.0", "name": net.name, "type": "ferrovirt-cni",
        "mode": "vhost-user", "stateDir": net.state_dir(), "socketDir": net.dir.join("s"),
    })
}

#[test]
fn version_lists_every_supported_version() {
    let reply = call_plugin(
        &plugin_binary(),
        "VERSION",
        None,
        &json!({"cniVersion": "1.0.0"}),
        &[],
    );
    let v = reply.ok();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
}

#[test]
fn help_and_version_flags_work_without_cni_variables() {
    let out = std::process::Command::new(plugin_binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("CNI_COMMAND"));
}

fn assert_error(reply: common::Reply, code: u64, fragment: &str) {
    let (got, msg) = reply.error();
    assert_eq!(got, code, "{msg}");
    assert!(msg.contains(fragment), "{msg:?} lacks {fragment:?}");
}

#[test]
fn bad_input_gets_the_right_code_and_message() {
    let ns = NetNs::create("pr").unwrap();
    let net = Network::new("proto-bad");
    let a = Attachment::new(Some(ns.path()), "net1");
    let bin = plugin_binary();
    let conf = vhost_conf(&net);

    // Invalid JSON: code 6.
    let reply = common::call_plugin(&bin, "ADD", Some(&a), &Value::Null, &[]);
    assert_error(reply, 7, "cniVersion");
    let mut raw = std::process::Command::new(&bin)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &a.container_id)
        .env("CNI_IFNAME", "net1")
        .env("CNI_NETNS", ns.path())
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        raw.stdin
            .take()
            .unwrap()
            .write_all(b"{\"cniVersion\": ")
            .unwrap();
    }
    let out = raw.wait_with_output().unwrap();
    assert!(!out.status.success());
    let object: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(object["code"], 6);
    assert!(object["msg"].as_str().unwrap().contains("not JSON"));

    // Missing environment: code 4, naming the variable.
    let no_netns = Attachment {
        netns: None,
        ..a.clone()
    };
    assert_error(
        call_plugin(&bin, "ADD", Some(&no_netns), &conf, &[]),
        4,
        "CNI_NETNS",
    );
    assert_error(
        call_plugin(&bin, "ADD", None, &conf, &[]),
        4,
        "CNI_CONTAINERID",
    );
    assert_error(
        call_plugin(&bin, "ADD", Some(&a), &conf, &[("CNI_PATH", "")]),
        4,
        "CNI_PATH",
    );
    assert_error(
        call_plugin(&bin, "ADD", Some(&a), &conf, &[("CNI_ARGS", "FOO=1")]),
        4,
        "IgnoreUnknown",
    );

    // Unsupported cniVersion: code 1.
    let mut v = conf.clone();
    v["cniVersion"] = json!("0.3.1");
    assert_error(call_plugin(&bin, "ADD", Some(&a), &v, &[]), 1, "0.3.1");

    // Unknown mode, bad MAC: code 7.
    let mut v = conf.clone();
    v["mode"] = json!("macvtap");
    assert_error(
        call_plugin(&bin, "ADD", Some(&a), &v, &[]),
        7,
        "unknown mode \"macvtap\"",
    );
    let mut v = conf.clone();
    v["runtimeConfig"] = json!({"mac": "02:00:00:00:00:zz"});
    assert_error(
        call_plugin(&bin, "ADD", Some(&a), &v, &[]),
        7,
        "not a MAC address",
    );
    assert_error(
        call_plugin(
            &bin,
            "ADD",
            Some(&a),
            &conf,
            &[("CNI_ARGS", "MAC=01:00:5e:00:00:01")],
        ),
        4,
        "CNI_ARGS MAC",
    );

    // A misspelt key, or a key of the other mode: code 2.
    let mut v = conf.clone();
    v["queus"] = json!(2);
    assert_error(call_plugin(&bin, "ADD", Some(&a), &v, &[]), 2, "queus");
    let mut v = conf.clone();
    v["vlan"] = json!(10);
    assert_error(call_plugin(&bin, "ADD", Some(&a), &v, &[]), 2, "vlan");

    // A namespace that does not exist: code 3.
    let gone = Attachment {
        netns: Some("/run/netns/ferrovirt-no-such-ns".into()),
        ..a.clone()
    };
    assert_error(
        call_plugin(&bin, "ADD", Some(&gone), &conf, &[]),
        3,
        "does not exist",
    );

    // CHECK without prevResult: code 7.
    assert_error(
        call_plugin(&bin, "CHECK", Some(&a), &conf, &[]),
        7,
        "prevResult",
    );
    // Nothing was made by any of these.
    assert_eq!(net.records(), 0);
}
