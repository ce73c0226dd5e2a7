//! Cross-checks the harness's vhost-user frontend against a reference backend, DPDK's vhost-user
//! PMD in dpdk-testpmd (io forwarding between the vhost port and a TAP): the same driver code
//! that tests ferrovirt-vhost-net moves frames both ways through a backend we did not write.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ferrovirt_tests::vhost_user_frontend::{Buffer, GuestMemory, SplitQueue, VhostUserConnection};
use ferrovirt_tests::{CleanupGuard, GuardedProcess, NetNs, ScratchDir, unique_name};

/// dpdk-testpmd inside `ns`, serving vhost-user on `socket` and creating the TAP `tap`; its
/// runtime directory (/var/run/dpdk/<file prefix>) is removed by the returned guard.
fn start_testpmd(dir: &ScratchDir, ns: &NetNs, tap: &str) -> (CleanupGuard, GuardedProcess) {
    let runtime = CleanupGuard::new(format!("/var/run/dpdk/{}", ns.name()), |path| {
        let _ = std::fs::remove_dir_all(path);
    });
    let socket = dir.join("dpdk.sock");
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns.name(),
        "dpdk-testpmd",
        "--no-huge",
        "-m",
        "1024",
    ])
    .args(["--no-pci", "--file-prefix", ns.name()])
    .arg("--vdev")
    .arg(format!("net_vhost0,iface={}", socket.display()))
    .arg("--vdev")
    .arg(format!("net_tap0,iface={tap}"))
    .args([
        "--",
        "--forward-mode=io",
        "--auto-start",
        "--total-num-mbufs=16384",
    ])
    // Without a terminal testpmd exits at once unless it prints statistics periodically.
    .args(["--stats-period", "60"]);
    // The socket lives in testpmd's network namespace's socket table, so the harness's
    // /proc/net/unix check cannot see it: the test connects with retries instead.
    let process = GuardedProcess::spawn(cmd, &dir.join("dpdk.out"), &dir.join("dpdk.err"))
        .expect("start dpdk-testpmd (apt-get install dpdk-dev)");
    (runtime, process)
}

/// Connects once testpmd listens (connection attempts before that fail without a trace).
fn connect_when_listening(
    testpmd: &GuardedProcess,
    socket: &std::path::Path,
    features: u64,
) -> VhostUserConnection {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if socket.exists()
            && let Ok(conn) = VhostUserConnection::connect(socket, 2, features)
        {
            return conn;
        }
        assert!(
            Instant::now() < deadline,
            "testpmd never listened on {socket:?}: {}",
            testpmd.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_frontend_harness_moves_frames_through_dpdk_vhost_user() {
    let dir = ScratchDir::new("net-dpdk").unwrap();
    let ns = NetNs::create("vd").unwrap();
    let tap = unique_name("dtap");
    // Bindings drop in reverse: testpmd stops, then its directory goes, then the netns.
    let (_runtime, testpmd) = start_testpmd(&dir, &ns, &tap);
    let features = 1u64 << F_VERSION_1 | 1 << F_MRG_RXBUF;
    let mut conn = connect_when_listening(&testpmd, &dir.join("dpdk.sock"), features);
    let deadline = Instant::now() + Duration::from_secs(10);
    let wire = loop {
        let exists = {
            let name = std::ffi::CString::new(tap.clone()).unwrap();
            // SAFETY: NUL-terminated name.
            in_netns(
                &ns.path(),
                move || unsafe { libc::if_nametoindex(name.as_ptr()) } != 0,
            )
        };
        if exists {
            break PacketSocket::open(&ns.path(), &tap);
        }
        assert!(Instant::now() < deadline, "testpmd never created {tap}");
        std::thread::sleep(Duration::from_millis(50));
    };

    let mut mem = GuestMemory::new(32 << 20).unwrap();
    let mut rx = SplitQueue::new(&mut mem, 0, QUEUE_SIZE).unwrap();
    let mut tx = SplitQueue::new(&mut mem, 1, QUEUE_SIZE).unwrap();
    assert_eq!(conn.features() & features, features);
    conn.set_mem_table(&mem).unwrap();
    let mut rx_bufs = std::collections::HashMap::new();
    for _ in 0..32 {
        let b = mem.alloc(2048, 8).unwrap();
        rx_bufs.insert(rx.add_chain(&mem, &[Buffer::writable(b, 2048)]).unwrap(), b);
    }
    rx.publish(&mem).unwrap();
    conn.start_queue(&mem, &rx, 0).unwrap();
    conn.start_queue(&mem, &tx, 0).unwrap();

    // Guest TX → vhost port → io forward → TAP.
    let frames: Vec<Vec<u8>> = (0..8).map(|i| frame(i, 64 + 100 * i as usize)).collect();
    for f in &frames {
        let b = mem.alloc((VNET_HDR + f.len()) as u64, 8).unwrap();
        let mut bytes = vec![0u8; VNET_HDR];
        bytes.extend(f);
        mem.write(b, &bytes).unwrap();
        tx.add_chain(&mem, &[Buffer::readable(b, bytes.len() as u32)])
            .unwrap();
    }
    tx.publish(&mem).unwrap();
    tx.kick().unwrap();
    assert_eq!(wire.receive(frames.len(), TIMEOUT), frames);
    // DPDK returns TX chains lazily (on later bursts), so only the wire is checked here.

    // TAP → io forward → vhost port → guest RX.
    let back = frame(99, 333);
    wire.send(&back);
    let deadline = Instant::now() + TIMEOUT;
    let mut found = false;
    while !found && Instant::now() < deadline {
        let used = rx
            .wait_used(&mem, 1, Duration::from_millis(200))
            .unwrap_or_default();
        for u in used {
            let data = mem.read(rx_bufs[&u.head], u.len as usize).unwrap();
            found |= data.len() > VNET_HDR && data[VNET_HDR..] == back[..];
        }
    }
    assert!(found, "the frame sent on the TAP reached an RX chain");
}
