//! The binary's flags: bad ones end with a clear message and a non-zero exit; a good one serves.

use ferrovirt_tests::ScratchDir;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_ferrovirt-vhost-blk");

fn run(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run ferrovirt-vhost-blk")
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
}

#[test]
fn missing_image_is_a_clear_error() {
    let s = ScratchDir::new("missing").unwrap();
    let out = run(&[
        "--image",
        arg(&s.join("nope.img")),
        "--socket",
        arg(&s.join("s")),
    ]);
    assert_fails_with(&out, "does not exist");
    assert!(!s.join("s").exists(), "no socket left behind");
}

#[test]
fn image_not_a_multiple_of_512_is_a_clear_error() {
    let s = ScratchDir::new("odd").unwrap();
    std::fs::write(s.join("odd.img"), vec![0u8; 1000]).unwrap();
    let out = run(&[
        "--image",
        arg(&s.join("odd.img")),
        "--socket",
        arg(&s.join("s")),
    ]);
    assert_fails_with(&out, "not a multiple of 512");
}

#[test]
fn socket_path_in_use_is_a_clear_error() {
    let s = ScratchDir::new("taken").unwrap();
    std::fs::write(s.join("d.img"), vec![0u8; 4096]).unwrap();
    let _live = UnixListener::bind(s.join("s")).unwrap();
    let out = run(&[
        "--image",
        arg(&s.join("d.img")),
        "--socket",
        arg(&s.join("s")),
    ]);
    assert_fails_with(&out, "in use");
    std::fs::write(s.join("file"), b"x").unwrap();
    let out = run(&[
        "--image",
        arg(&s.join("d.img")),
        "--socket",
        arg(&s.join("file")),
    ]);
    assert_fails_with(&out, "not a socket");
}

#[test]
fn read_only_image_opened_writable_is_a_clear_error() {
    let s = ScratchDir::new("ro").unwrap();
    let image = s.join("ro.img");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o444)).unwrap();
    let out = run(&["--image", arg(&image), "--socket", arg(&s.join("s"))]);
    assert_fails_with(&out, "--read-only");
}

#[test]
fn bad_values_are_rejected() {
    let s = ScratchDir::new("values").unwrap();
    std::fs::write(s.join("d.img"), vec![0u8; 4096]).unwrap();
    let img = s.join("d.img");
    let sock = s.join("s");
    let out = run(&[
        "--image",
        arg(&img),
        "--socket",
        arg(&sock),
        "--num-queues",
        "0",
    ]);
    assert_fails_with(&out, "num-queues");
    let long = "x".repeat(21);
    let out = run(&[
        "--image",
        arg(&img),
        "--socket",
        arg(&sock),
        "--serial",
        &long,
    ]);
    assert_fails_with(&out, "longer than 20 bytes");
    let out = run(&[
        "--image",
        arg(&img),
        "--socket",
        arg(&sock),
        "--queue-size",
        "100",
    ]);
    assert_fails_with(&out, "power of two");
}

#[test]
fn a_good_invocation_listens_replaces_a_stale_socket_and_removes_it_on_sigterm() {
    let s = ScratchDir::new("good").unwrap();
    std::fs::write(s.join("d.img"), vec![0u8; 4096]).unwrap();
    let sock = s.join("s");
    drop(UnixListener::bind(&sock).unwrap()); // stale: nobody listens
    let mut child = Command::new(BINARY)
        .args(["--image", arg(&s.join("d.img")), "--socket", arg(&sock)])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let connected = loop {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(connected, "backend never listened on {sock:?}");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "SIGTERM ends it cleanly"
    );
    assert!(!sock.exists(), "a stopped backend leaves no socket behind");
}

#[test]
fn help_documents_every_flag() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--image",
        "--socket",
        "--read-only",
        "--num-queues",
        "--queue-size",
        "--serial",
        "--direct",
        "--once",
        "--root",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
