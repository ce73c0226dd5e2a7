//! The serial console over a UNIX socket (what `fvctl console` will attach to), and a
//! clean stop on SIGTERM that leaves no socket behind.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ferrovirt_tests::{VmmProcess, testguest};

const TIMEOUT: Duration = Duration::from_secs(30);

fn connect(path: &std::path::Path) -> UnixStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("console socket {} never accepted: {e}", path.display()),
        }
    }
}

#[test]
fn socket_console_streams_guest_output_and_sigterm_removes_the_sockets() {
    let builder = VmmProcess::builder("console").unwrap();
    let console = builder.file("console.sock");
    let serial = format!("socket={}", console.display());
    let guest = testguest();
    let mut vmm = builder
        .args(["--kernel", guest.to_str().unwrap(), "--memory", "64"])
        .args(["--cmdline", "scenario=ticker", "--serial", &serial])
        .with_api_socket()
        .spawn()
        .unwrap();
    let mut stream = connect(&console);
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("testguest: tick 3\n") {
        let n = stream.read(&mut buf).expect("console output stopped");
        assert!(n > 0, "console closed early; got {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        vmm.serial_output().is_empty(),
        "a socket console must not print to stdout"
    );

    let api = vmm.api_socket().unwrap().to_owned();
    let exit = vmm.process_mut().terminate().unwrap();
    assert_eq!(exit.status.code(), Some(128 + libc::SIGTERM));
    assert!(!console.exists(), "console socket left behind");
    assert!(!api.exists(), "API socket left behind");
}
