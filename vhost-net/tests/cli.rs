//! The binary's flags and TAP checks: bad ones end with a clear message and a non-zero exit;
//! good ones serve (including an inherited --tap-fd).

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use ferrovirt_tests::{NetNs, ScratchDir, VhostNetBackend};

fn run(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run ferrovirt-vhost-net")
}

fn assert_fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
}

#[test]
fn a_missing_tap_in_a_netns_is_a_clear_error_and_is_not_created() {
    let s = ScratchDir::new("net-cli-missing").unwrap();
    let ns = NetNs::create("vc").unwrap();
    let socket = s.join("s");
    let out = run(&[
        "--socket",
        socket.to_str().unwrap(),
        "--tap",
        "nosuchtap0",
        "--netns",
        ns.name(),
    ]);
    assert_fails_with(&out, "does not exist in network namespace");
    let exists = in_netns(&ns.path(), || {
        // SAFETY: NUL-terminated name.
        unsafe { libc::if_nametoindex(c"nosuchtap0".as_ptr()) != 0 }
    });
    assert!(!exists, "the backend must not create the TAP");
}

#[test]
fn a_device_that_is_not_a_tap_is_a_clear_error() {
    let s = ScratchDir::new("net-cli-lo").unwrap();
    let out = run(&["--socket", s.join("s").to_str().unwrap(), "--tap", "lo"]);
    assert_fails_with(&out, "is not a TAP device");
}

#[test]
fn a_missing_netns_is_a_clear_error() {
    let s = ScratchDir::new("net-cli-ns").unwrap();
    let out = run(&[
        "--socket",
        s.join("s").to_str().unwrap(),
        "--tap",
        "t0",
        "--netns",
        "fv-no-such-netns",
    ]);
    assert_fails_with(
        &out,
        "network namespace \"fv-no-such-netns\" does not exist",
    );
}

#[test]
fn a_tap_another_backend_holds_is_busy() {
    let s = ScratchDir::new("net-cli-busy").unwrap();
    let tap = NsTap::create(false);
    let _first = start_backend(&s, &tap, &[]);
    let mut args = vec![
        "--socket".to_string(),
        s.join("second.sock").to_str().unwrap().to_string(),
    ];
    args.extend(tap.flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_fails_with(&run(&args), "is busy");
}

#[test]
fn a_socket_in_use_is_a_clear_error() {
    let s = ScratchDir::new("net-cli-sock").unwrap();
    let tap = NsTap::create(false);
    let _live = UnixListener::bind(s.join("s")).unwrap();
    let mut args = vec![
        "--socket".to_string(),
        s.join("s").to_str().unwrap().to_string(),
    ];
    args.extend(tap.flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_fails_with(&run(&args), "in use by a running process");
}

#[test]
fn help_documents_the_metrics_socket() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--metrics-socket"), "{help}");
    assert!(help.contains("one JSON object"), "{help}");
    assert!(help.contains("tx_dropped"), "{help}");
}

/// Opens `name` in `tap`'s namespace with TUNSETIFF `flags`, inheritable by children.
fn open_tap_fd(tap: &NsTap, flags: libc::c_int) -> OwnedFd {
    let name = tap.name.clone();
    in_netns(&tap.ns.path(), move || {
        // SAFETY: open and ioctl with a valid ifreq-shaped buffer; the fd is checked and owned.
        unsafe {
            let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR);
            assert!(fd >= 0);
            let fd = OwnedFd::from_raw_fd(fd);
            let mut req = [0u8; 40];
            req[..name.len()].copy_from_slice(name.as_bytes());
            req[16..18].copy_from_slice(&(flags as i16).to_ne_bytes());
            let r = libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr());
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
            fd
        }
    })
}

#[test]
fn an_inherited_tap_fd_without_vnet_headers_is_refused() {
    let s = ScratchDir::new("net-cli-fdhdr").unwrap();
    let tap = NsTap::create(false);
    let fd = open_tap_fd(&tap, libc::IFF_TAP | libc::IFF_NO_PI);
    let n = fd.as_raw_fd().to_string();
    let out = Command::new(BINARY)
        .args(["--socket", s.join("s").to_str().unwrap(), "--tap-fd", &n])
        .output()
        .unwrap();
    assert_fails_with(&out, "without IFF_VNET_HDR");
}

#[test]
fn an_inherited_tap_fd_carries_traffic() {
    let s = ScratchDir::new("net-cli-fd").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let fd = open_tap_fd(&tap, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
    // Rust opens files close-on-exec; this one is for the child.
    // SAFETY: F_SETFD on an fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    let n = fd.as_raw_fd().to_string();
    let backend =
        VhostNetBackend::start_binary(BINARY.as_ref(), &s.join("net.sock"), &["--tap-fd", &n])
            .unwrap_or_else(|e| panic!("{e}"));
    drop(fd);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(false));
    let frames = vec![frame(1, 100), frame(2, 1500)];
    guest.send(0, &frames);
    assert_eq!(wire.receive(2, Duration::from_secs(10)), frames);
}

#[test]
fn sigterm_ends_the_backend_and_removes_its_sockets() {
    let s = ScratchDir::new("net-cli-term").unwrap();
    let tap = NsTap::create(false);
    let flags = tap.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let socket = s.join("net.sock");
    let backend = VhostNetBackend::start_binary(BINARY.as_ref(), &socket, &flags)
        .unwrap_or_else(|e| panic!("{e}"));
    let metrics = socket.with_extension("metrics");
    assert!(socket.exists() && metrics.exists());
    let exit = backend.stop().unwrap();
    assert_eq!(exit.status.code(), Some(128 + libc::SIGTERM));
    assert!(!socket.exists(), "the vhost-user socket is left behind");
    assert!(!metrics.exists(), "the metrics socket is left behind");
}
