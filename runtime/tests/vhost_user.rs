//! What disks and NICs share as vhost-user devices, checked for both kinds.

use std::time::Duration;

use ferrovirt_tests::{ScratchDir, VmmProcess, testguest};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_device_without_a_backend_names_the_socket_and_exits_1() {
    for (flag, kind, device) in [
        ("--disk", "vhost-user-blk", "disk 0"),
        ("--net", "vhost-user-net", "net 0"),
    ] {
        let dir = ScratchDir::new("vu-nobackend").unwrap();
        let socket = dir.join("nobody.sock");
        let args = [
            "--kernel".to_string(),
            testguest().display().to_string(),
            flag.into(),
            format!("socket={}", socket.display()),
        ];
        let mut vmm = VmmProcess::spawn("vu-nobackend", &args).unwrap();
        let status = vmm.wait_timeout(TIMEOUT).unwrap();
        let err = vmm.stderr_output();
        assert_eq!(status.code(), Some(1), "{flag}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let expected = format!(
            "cannot connect to {kind} socket {}; is the backend running?",
            socket.display()
        );
        assert!(err.contains(&expected), "{flag}: {err}");
        assert!(err.contains(device), "{flag}: {err}");
    }
}
