//! The API server over real UNIX sockets, against a small thread that answers like a VMM.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::config::{ConsoleConfig, MemoryConfig, PayloadConfig, RngConfig};

/// A directory for one test's socket, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!("fv-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VMM control loop in miniature: one VM, the state machine the real one keeps.
/// Requests it is told to ignore (`Silent`) are kept unanswered until it stops.
fn spawn_fake_vmm() -> (Box<dyn Fn(ApiMessage) -> bool + Send>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<ApiMessage>();
    let thread = std::thread::spawn(move || {
        let mut vm: Option<(VmConfig, VmState)> = None;
        for ApiMessage { request, reply } in rx {
            let answer = match (request, &mut vm) {
                (ApiRequest::VmCreate(_), Some(_)) => {
                    Err(ApiError::conflict("a VM already exists"))
                }
                (ApiRequest::VmCreate(config), vm @ None) => {
                    *vm = Some((*config, VmState::Created));
                    Ok(None)
                }
                (ApiRequest::VmmPing, _) => json_response(&VmmPingResponse::current()),
                (ApiRequest::VmmShutdown, _) => Ok(None),
                (_, None) => Err(ApiError::not_found("no VM has been created")),
                (ApiRequest::VmInfo, Some((config, state))) => json_response(&VmInfo {
                    state: *state,
                    config: config.clone(),
                }),
                (ApiRequest::VmCounters, Some(_)) => {
                    let mut counters = VmCounters::new();
                    counters
                        .entry("vcpu0".into())
                        .or_default()
                        .insert("io_exits".into(), 12);
                    json_response(&counters)
                }
                (request, Some((_, state))) => match (request, *state) {
                    (ApiRequest::VmBoot, VmState::Created)
                    | (ApiRequest::VmResume, VmState::Paused) => {
                        *state = VmState::Running;
                        Ok(None)
                    }
                    (ApiRequest::VmPause, VmState::Running) => {
                        *state = VmState::Paused;
                        Ok(None)
                    }
                    (ApiRequest::VmShutdown, _) => {
                        *state = VmState::Shutdown;
                        Ok(None)
                    }
                    (request, state) => Err(ApiError::conflict(format!(
                        "cannot {request:?} a VM that is {state:?}"
                    ))),
                },
            };
            let _ = reply.send(answer);
        }
    });
    (Box::new(move |m| tx.send(m).is_ok()), thread)
}

fn start(dir: &TestDir) -> ApiServer {
    let (submit, _vmm) = spawn_fake_vmm();
    ApiServer::start(&dir.socket(), submit).unwrap()
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.body))
    }

    fn error(&self) -> String {
        let body = self.json();
        assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
        body["error"]
            .as_str()
            .expect("error is a string")
            .to_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends raw bytes, reads until the server closes, splits status, headers and body.
fn send_raw(socket: &Path, raw: &[u8]) -> Reply {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The server may answer and close before taking all of an oversized body.
    let _ = stream.write_all(raw);
    read_reply(&mut stream)
}

fn read_reply(stream: &mut UnixStream) -> Reply {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            // A server that closes with our unread bytes queued resets the connection after
            // its response.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the reply: {e}"),
        }
    }
    let text = String::from_utf8(data).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn call(socket: &Path, method: &str, endpoint: &str, body: Option<&str>) -> Reply {
    let body = body.unwrap_or("");
    let raw = format!(
        "{method} {API_PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    send_raw(socket, raw.as_bytes())
}

const CONFIG: &str = r#"{"cpus":{"boot_vcpus":2},"memory":{"size_mib":256},
    "payload":{"kernel":"/boot/vmlinux","cmdline":"console=ttyS0"},"serial":{"mode":"off"}}"#;

#[test]
fn lifecycle_requests_reach_the_vmm_and_its_answers_come_back() {
    let dir = TestDir::new("lifecycle");
    let server = start(&dir);
    let sock = server.path().to_owned();

    assert_eq!(call(&sock, "PUT", "/vm.create", Some(CONFIG)).status, 204);
    let info = call(&sock, "GET", "/vm.info", None);
    assert_eq!(info.status, 200);
    assert_eq!(info.header("content-type"), Some("application/json"));
    let info: VmInfo = serde_json::from_value(info.json()).unwrap();
    assert_eq!(info.state, VmState::Created);
    assert_eq!(
        info.config,
        serde_json::from_str::<VmConfig>(CONFIG).unwrap()
    );

    for (endpoint, state) in [
        ("/vm.boot", "Running"),
        ("/vm.pause", "Paused"),
        ("/vm.resume", "Running"),
    ] {
        let reply = call(&sock, "PUT", endpoint, None);
        assert_eq!(reply.status, 204, "{endpoint}: {reply:?}");
        assert_eq!(reply.body, "");
        assert_eq!(reply.header("content-length"), None);
        assert_eq!(call(&sock, "GET", "/vm.info", None).json()["state"], state);
    }

    let counters = call(&sock, "GET", "/vm.counters", None);
    assert_eq!(counters.status, 200);
    assert_eq!(counters.json(), json!({"vcpu0": {"io_exits": 12}}));

    let ping = call(&sock, "GET", "/vmm.ping", None);
    assert_eq!(ping.status, 200);
    assert_eq!(ping.json()["pid"], std::process::id());
    assert_eq!(ping.json()["version"], env!("CARGO_PKG_VERSION"));

    assert_eq!(call(&sock, "PUT", "/vm.shutdown", None).status, 204);
    assert_eq!(call(&sock, "PUT", "/vmm.shutdown", None).status, 204);
}

#[test]
fn vmm_refusals_pass_through_with_their_status_and_message() {
    let dir = TestDir::new("conflict");
    let server = start(&dir);
    let sock = server.path();

    let reply = call(sock, "PUT", "/vm.boot", None);
    assert_eq!(reply.status, 404);
    assert_eq!(reply.error(), "no VM has been created");

    assert_eq!(call(sock, "PUT", "/vm.create", Some(CONFIG)).status, 204);
    let reply = call(sock, "PUT", "/vm.create", Some(CONFIG));
    assert_eq!(reply.status, 409);
    assert_eq!(reply.error(), "a VM already exists");

    let reply = call(sock, "PUT", "/vm.resume", None);
    assert_eq!(reply.status, 409);
    assert!(reply.error().contains("Created"), "{reply:?}");
}

#[test]
fn bad_vm_config_is_refused_with_the_parsers_message() {
    let dir = TestDir::new("badjson");
    let server = start(&dir);
    let sock = server.path();

    let reply = call(sock, "PUT", "/vm.create", Some(r#"{"payload": "#));
    assert_eq!(reply.status, 400);
    assert!(
        reply.error().starts_with("invalid VmConfig: EOF"),
        "{reply:?}"
    );

    let typo = r#"{"payload":{"kernel":"/k"},"memory":{"size_mib":64,"hugepage":true}}"#;
    let reply = call(sock, "PUT", "/vm.create", Some(typo));
    assert_eq!(reply.status, 400);
    assert!(
        reply.error().contains("unknown field `hugepage`"),
        "{reply:?}"
    );

    let reply = call(sock, "PUT", "/vm.create", None);
    assert_eq!(reply.status, 400);
    assert!(reply.error().contains("needs a VmConfig"), "{reply:?}");

    let multicast =
        r#"{"payload":{"kernel":"/k"},"nets":[{"socket":"/s","mac":"01:00:5e:00:00:01"}]}"#;
    let reply = call(sock, "PUT", "/vm.create", Some(multicast));
    assert_eq!(reply.status, 400);
    assert!(reply.error().contains("multicast"), "{reply:?}");

    // Nothing reached the VMM: a good config still creates the VM.
    assert_eq!(call(sock, "PUT", "/vm.create", Some(CONFIG)).status, 204);
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405() {
    let dir = TestDir::new("routing");
    let server = start(&dir);
    let sock = server.path();

    for (method, path) in [
        ("GET", "/api/v1/vm.nope"),
        ("GET", "/vm.info"),
        ("GET", "/"),
    ] {
        let reply = send_raw(
            sock,
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        assert_eq!(reply.status, 404, "{path}");
        assert!(reply.error().contains(path), "{reply:?}");
    }

    let reply = call(sock, "POST", "/vm.boot", None);
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("PUT"));
    assert!(reply.error().contains("use PUT"), "{reply:?}");
    assert_eq!(
        call(sock, "PUT", "/vm.info", None).header("allow"),
        Some("GET")
    );
}

#[test]
fn oversized_bodies_are_refused_without_being_read() {
    let dir = TestDir::new("toolarge");
    let server = start(&dir);
    let sock = server.path();
    let limit = http::MAX_BODY_BYTES;

    // Announced, never sent: the server must not wait for (or allocate) the body.
    for length in [limit + 1, 100_000_000_000_000, u64::MAX] {
        let raw = format!("PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {length}\r\n\r\n{{");
        let reply = send_raw(sock, raw.as_bytes());
        assert_eq!(reply.status, 413, "{length}");
        assert!(reply.error().contains("larger than the limit"), "{reply:?}");
    }

    // Actually sent: the server answers and closes while the client is still writing.
    let mut raw = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        4 * limit
    )
    .into_bytes();
    raw.resize(raw.len() + 4 * limit as usize, b' ');
    assert_eq!(send_raw(sock, &raw).status, 413);

    // Exactly at the limit is read and parsed (and is not a VmConfig).
    let mut raw =
        format!("PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {limit}\r\n\r\n").into_bytes();
    raw.resize(raw.len() + limit as usize, b'x');
    assert_eq!(send_raw(sock, &raw).status, 400);

    assert_eq!(call(sock, "GET", "/vmm.ping", None).status, 200);
}

#[test]
fn malformed_http_is_refused_and_the_server_keeps_serving() {
    let dir = TestDir::new("malformed");
    let server = start(&dir);
    let sock = server.path();

    let cases: &[(&[u8], u16)] = &[
        (b"garbage\r\n\r\n", 400),
        (b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n", 505),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\nX: \xff\r\n\r\n", 400),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{",
            400,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            411,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: magic\r\nContent-Length: 2\r\n\r\n{}",
            417,
        ),
    ];
    for (raw, status) in cases {
        // A truncated body only shows once the client stops writing.
        let mut stream = UnixStream::connect(sock).unwrap();
        stream.write_all(raw).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let reply = read_reply(&mut stream);
        assert_eq!(
            reply.status,
            *status,
            "{:?}: {reply:?}",
            String::from_utf8_lossy(raw)
        );
        assert!(!reply.error().is_empty());
    }

    let mut huge_head = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX: ".to_vec();
    huge_head.resize(3 * http::MAX_HEAD_BYTES, b'a');
    assert_eq!(send_raw(sock, &huge_head).status, 431);

    assert_eq!(call(sock, "GET", "/vmm.ping", None).status, 200);
}

#[test]
fn expect_continue_gets_100_before_the_body() {
    let dir = TestDir::new("continue");
    let server = start(&dir);

    let mut stream = UnixStream::connect(server.path()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let head = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        CONFIG.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut got = vec![0u8; interim.len()];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(got, interim);
    stream.write_all(CONFIG.as_bytes()).unwrap();
    assert_eq!(read_reply(&mut stream).status, 204);
}

#[test]
fn a_silent_client_gets_408_and_does_not_block_others_for_long() {
    let dir = TestDir::new("silent");
    let (submit, _vmm) = spawn_fake_vmm();
    let limits = Limits {
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = ApiServer::start_with_limits(&dir.socket(), submit, limits).unwrap();

    let mut silent = UnixStream::connect(server.path()).unwrap();
    silent
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n")
        .unwrap();
    let start = Instant::now();
    assert_eq!(call(server.path(), "GET", "/vmm.ping", None).status, 200);
    assert!(start.elapsed() < Duration::from_secs(5));

    let reply = read_reply(&mut silent);
    assert_eq!(reply.status, 408);
}

#[test]
fn gone_vmm_is_503() {
    let dir = TestDir::new("gone");
    let server = ApiServer::start(&dir.socket(), Box::new(|_: ApiMessage| false)).unwrap();
    let reply = call(server.path(), "GET", "/vmm.ping", None);
    assert_eq!(reply.status, 503);
    assert!(reply.error().contains("shutting down"), "{reply:?}");
    drop(server);

    // Taken, then dropped unanswered.
    let server = ApiServer::start(
        &dir.socket(),
        Box::new(|m: ApiMessage| {
            drop(m);
            true
        }),
    )
    .unwrap();
    assert_eq!(call(server.path(), "PUT", "/vm.boot", None).status, 503);
}

/// A submit callback whose control loop keeps every request and never answers.
fn never_answering_vmm() -> Box<dyn Fn(ApiMessage) -> bool + Send> {
    let kept = std::sync::Mutex::new(Vec::new());
    Box::new(move |m| {
        kept.lock().unwrap().push(m);
        true
    })
}

#[test]
fn a_vmm_that_does_not_answer_in_time_is_504() {
    let dir = TestDir::new("slow");
    let limits = Limits {
        reply_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let server =
        ApiServer::start_with_limits(&dir.socket(), never_answering_vmm(), limits).unwrap();
    let reply = call(server.path(), "GET", "/vm.info", None);
    assert_eq!(reply.status, 504);
    assert!(reply.error().contains("did not answer"), "{reply:?}");
}

#[test]
fn drop_does_not_wait_for_clients_or_the_vmm() {
    let dir = TestDir::new("dropfast");
    let server = ApiServer::start(&dir.socket(), never_answering_vmm()).unwrap();
    let sock = dir.socket();

    let waiting = std::thread::spawn(move || call(&sock, "PUT", "/vm.boot", None));
    // Let the request reach the (silent) VMM.
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    drop(server);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(waiting.join().unwrap().status, 503);

    // Same for a client that never sends its request.
    let server = ApiServer::start(&dir.socket(), never_answering_vmm()).unwrap();
    let _silent = UnixStream::connect(server.path()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    drop(server);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn socket_file_is_removed_on_drop() {
    let dir = TestDir::new("cleanup");
    let server = start(&dir);
    assert!(dir.socket().exists());
    drop(server);
    assert!(!dir.socket().exists());
}

#[test]
fn a_socket_in_use_is_refused_and_a_stale_one_replaced() {
    let dir = TestDir::new("inuse");
    let first = start(&dir);
    let Err(err) = ApiServer::start(&dir.socket(), Box::new(|_: ApiMessage| false)) else {
        panic!("a second server started on a live socket");
    };
    assert!(matches!(err, ApiServerError::InUse { .. }));
    assert!(
        err.to_string().contains(&format!(
            "socket {} is in use by another VMM",
            dir.socket().display()
        )),
        "{err}"
    );
    // The refused server left the live one alone.
    assert_eq!(call(first.path(), "GET", "/vmm.ping", None).status, 200);
    drop(first);

    // A socket file nobody listens on, as a killed VMM leaves behind.
    drop(UnixListener::bind(dir.socket()).unwrap());
    assert!(dir.socket().exists());
    let server = start(&dir);
    assert_eq!(call(server.path(), "GET", "/vmm.ping", None).status, 200);
}

#[test]
fn a_path_that_is_not_a_socket_is_left_alone() {
    let dir = TestDir::new("notsock");
    std::fs::write(dir.socket(), "precious").unwrap();
    let Err(err) = ApiServer::start(&dir.socket(), Box::new(|_: ApiMessage| false)) else {
        panic!("started over a regular file");
    };
    assert!(matches!(err, ApiServerError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(dir.socket()).unwrap(), "precious");
}

#[test]
fn drop_leaves_a_socket_that_replaced_ours() {
    let dir = TestDir::new("replaced");
    let server = start(&dir);
    std::fs::remove_file(dir.socket()).unwrap();
    let _other = UnixListener::bind(dir.socket()).unwrap();
    drop(server);
    assert!(dir.socket().exists());
}

// ---- openapi.yaml stays in step with the router and the serde types ----

fn openapi() -> Value {
    serde_yaml::from_str(include_str!("openapi.yaml")).expect("openapi.yaml parses")
}

#[test]
fn openapi_lists_exactly_the_routed_endpoints() {
    let spec = openapi();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.0"));
    assert_eq!(
        spec["servers"][0]["url"],
        format!("http://localhost{API_PREFIX}")
    );
    let mut documented = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((path.clone(), method.to_uppercase()));
        }
    }
    let routed: BTreeSet<_> = ROUTES
        .iter()
        .map(|r| (r.path.to_owned(), r.method.to_owned()))
        .collect();
    assert_eq!(documented, routed);
}

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/").expect("local ref");
            let target = &spec["components"]["schemas"][name];
            assert!(target.is_object(), "dangling $ref {r}");
            target
        }
        None => schema,
    }
}

/// Checks a serialized value against its schema. With `complete`, every object must carry
/// every property the schema lists, so a field missing from either side is caught.
fn check_schema(spec: &Value, schema: &Value, value: &Value, at: &str, complete: bool) {
    let schema = resolve(spec, schema);
    if value.is_null() {
        assert_eq!(schema["nullable"], true, "{at} is null but not nullable");
        return;
    }
    let schema = match schema["allOf"].as_array() {
        Some(all) if all.len() == 1 => resolve(spec, &all[0]),
        _ => schema,
    };
    match value {
        Value::Bool(_) => assert_eq!(schema["type"], "boolean", "{at}"),
        Value::Number(_) => assert_eq!(schema["type"], "integer", "{at}"),
        Value::String(s) => {
            assert_eq!(schema["type"], "string", "{at}");
            if let Some(allowed) = schema["enum"].as_array() {
                assert!(allowed.contains(value), "{at}: {s:?} not in {allowed:?}");
            }
        }
        Value::Object(map) => {
            assert_eq!(schema["type"], "object", "{at}");
            match schema["properties"].as_object() {
                Some(props) => {
                    assert_eq!(schema["additionalProperties"], false, "{at}");
                    for (key, v) in map {
                        let prop = props
                            .get(key)
                            .unwrap_or_else(|| panic!("{at}.{key} is not in openapi.yaml"));
                        check_schema(spec, prop, v, &format!("{at}.{key}"), complete);
                    }
                    if complete {
                        let keys: BTreeSet<_> = map.keys().collect();
                        let props: BTreeSet<_> = props.keys().collect();
                        assert_eq!(keys, props, "{at}: fields differ from openapi.yaml");
                    }
                }
                None => {
                    let item = &schema["additionalProperties"];
                    assert!(item.is_object(), "{at}: map without an item schema");
                    for (key, v) in map {
                        check_schema(spec, item, v, &format!("{at}.{key}"), complete);
                    }
                }
            }
        }
        Value::Array(items) => {
            assert_eq!(schema["type"], "array", "{at}");
            for (i, item) in items.iter().enumerate() {
                check_schema(
                    spec,
                    &schema["items"],
                    item,
                    &format!("{at}[{i}]"),
                    complete,
                );
            }
        }
        Value::Null => panic!("{at}: unexpected {value}"),
    }
}

fn full_config() -> VmConfig {
    VmConfig {
        cpus: crate::config::CpusConfig { boot_vcpus: 4 },
        memory: MemoryConfig {
            size_mib: 1024,
            hugepages: true,
        },
        payload: PayloadConfig {
            kernel: "/boot/vmlinux".into(),
            initramfs: Some("/boot/initrd".into()),
            cmdline: Some("console=ttyS0".into()),
        },
        serial: ConsoleConfig::File("/var/log/serial".into()),
        rng: Some(RngConfig::default()),
        disks: vec![crate::config::DiskConfig {
            socket: "/run/ferrovirt/disk0.sock".into(),
        }],
        nets: vec![crate::config::NetConfig {
            socket: "/run/ferrovirt/net0.sock".into(),
            mac: Some("52:54:00:12:34:56".parse().unwrap()),
            queue_pairs: 2,
            mtu: Some(9000),
        }],
    }
}

#[test]
fn openapi_schemas_match_the_serialized_types() {
    let spec = openapi();
    let schemas = &spec["components"]["schemas"];
    let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });

    let full = serde_json::to_value(full_config()).unwrap();
    check_schema(&spec, &schema("VmConfig"), &full, "VmConfig", true);
    let bare_net = crate::config::NetConfig {
        socket: "/run/n.sock".into(),
        mac: None,
        queue_pairs: 1,
        mtu: None,
    };
    let bare_net = serde_json::to_value(bare_net).unwrap();
    check_schema(&spec, &schema("NetConfig"), &bare_net, "NetConfig", true);
    let minimal = serde_json::to_value(VmConfig::default()).unwrap();
    check_schema(&spec, &schema("VmConfig"), &minimal, "VmConfig", false);

    let modes: Vec<Value> = [
        ConsoleConfig::Tty,
        ConsoleConfig::File("/f".into()),
        ConsoleConfig::Socket("/s".into()),
        ConsoleConfig::Off,
    ]
    .iter()
    .map(|c| {
        let v = serde_json::to_value(c).unwrap();
        check_schema(&spec, &schema("ConsoleConfig"), &v, "serial", false);
        v["mode"].clone()
    })
    .collect();
    assert_eq!(
        &Value::Array(modes),
        &schemas["ConsoleConfig"]["properties"]["mode"]["enum"]
    );

    let states: Vec<Value> = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
    ]
    .iter()
    .map(|s| serde_json::to_value(s).unwrap())
    .collect();
    assert_eq!(&Value::Array(states), &schemas["VmState"]["enum"]);

    let info = VmInfo {
        state: VmState::Paused,
        config: full_config(),
    };
    let info = serde_json::to_value(info).unwrap();
    check_schema(&spec, &schema("VmInfo"), &info, "VmInfo", true);

    let ping = serde_json::to_value(VmmPingResponse::current()).unwrap();
    check_schema(
        &spec,
        &schema("VmmPingResponse"),
        &ping,
        "VmmPingResponse",
        true,
    );

    let counters = json!({"vcpu0": {"io_exits": 12}, "serial": {"tx_bytes": 100}});
    serde_json::from_value::<VmCounters>(counters.clone()).unwrap();
    check_schema(&spec, &schema("VmCounters"), &counters, "VmCounters", true);

    let error: Value = serde_json::from_slice(&error_response(409, "x").body.unwrap()).unwrap();
    check_schema(&spec, &schema("ErrorBody"), &error, "ErrorBody", true);
}

/// `required` in openapi.yaml is exactly what serde insists on: drop each field of a full
/// config in turn and see whether VmConfig still parses.
#[test]
fn openapi_required_fields_match_serde_defaults() {
    let spec = openapi();
    let full = serde_json::to_value(full_config()).unwrap();
    let mut objects = vec![("".to_owned(), "VmConfig".to_owned())];
    while let Some((pointer, schema_name)) = objects.pop() {
        let schema = &spec["components"]["schemas"][&schema_name];
        let required: BTreeSet<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (key, prop) in schema["properties"].as_object().unwrap() {
            let mut without = full.clone();
            without
                .pointer_mut(&pointer)
                .and_then(Value::as_object_mut)
                .unwrap()
                .remove(key);
            let parses = serde_json::from_value::<VmConfig>(without).is_ok();
            // ConsoleConfig's path is required only with some modes; its description says so.
            if schema_name == "ConsoleConfig" && key == "path" {
                assert!(!parses);
                continue;
            }
            assert_eq!(
                parses,
                !required.contains(key.as_str()),
                "{schema_name}.{key}: openapi.yaml and config.rs disagree on whether it is required"
            );
            let nested = prop["$ref"]
                .as_str()
                .or_else(|| prop["allOf"][0]["$ref"].as_str());
            if let Some(r) = nested {
                let name = r.trim_start_matches("#/components/schemas/").to_owned();
                objects.push((format!("{pointer}/{key}"), name));
            }
            // A list of objects: check the first item's fields the same way.
            if let Some(r) = prop["items"]["$ref"].as_str() {
                let name = r.trim_start_matches("#/components/schemas/").to_owned();
                objects.push((format!("{pointer}/{key}/0"), name));
            }
        }
    }
}
