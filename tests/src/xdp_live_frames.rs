//! A traffic generator made of BPF_PROG_TEST_RUN in live-frames mode (Linux >= 5.18): a
//! two-instruction XDP program that returns XDP_TX runs on one frame `repeat` times, and
//! the kernel sends every copy out of the ingress device through its XDP transmit path
//! (`ndo_xdp_xmit`), in batches, from a page pool. On a veth this puts millions of frames
//! per second on the wire at a fraction of an AF_PACKET sender's cost per frame.
//!
//! Gotchas (measured on veth): the receiving peer only takes XDP frames when it runs NAPI,
//! i.e. with GRO on or an XDP program of its own; otherwise every frame is dropped at
//! transmit. The ingress ifindex is looked up in the calling thread's network namespace,
//! so [`transmit_until`] runs the program from a thread that joined the sender's namespace.
//!
//! [`IngressSink`] is the other end: a TCX program that frees frames on a receiving VM's
//! interface once they are counted, so what is timed is the path between the two.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::names::NetNs;

/// `bpf(2)` commands and flags from include/uapi/linux/bpf.h.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_TCX_INGRESS: u32 = 46;
const TC_ACT_SHOT: i32 = 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
/// The kernel's TEST_XDP_MAX_BATCH (net/bpf/test_run.c).
pub const MAX_BATCH: u32 = 256;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum XdpLiveFramesError {
    #[error("cannot load the XDP_TX program; are we root with BPF enabled?")]
    Load(#[source] std::io::Error),
    #[error(
        "BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on ifindex {ifindex} failed; it needs \
         Linux >= 5.18, a frame of at least 14 bytes and an ifindex in the caller's namespace"
    )]
    TestRun {
        ifindex: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("BPF_PROG_TEST_RUN of a returning program failed; are we root with BPF enabled?")]
    Run(#[source] std::io::Error),
    #[error("cannot attach the TCX ingress sink to ifindex {ifindex}; TCX needs Linux >= 6.6")]
    Attach {
        ifindex: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("no interface {interface:?} in namespace {netns}")]
    NoInterface { interface: String, netns: String },
    #[error("cannot join namespace {netns}")]
    Netns {
        netns: String,
        #[source]
        source: std::io::Error,
    },
}

/// The head of union bpf_attr for BPF_PROG_LOAD; the kernel zero-fills the rest.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The head of union bpf_attr for BPF_PROG_TEST_RUN, up to `batch_size`.
#[repr(C)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

impl TestRunAttr {
    /// A run of program `fd` on `frame`, `repeat` times, without context or flags.
    fn new(fd: &OwnedFd, frame: &[u8], repeat: u32) -> TestRunAttr {
        TestRunAttr {
            prog_fd: fd.as_raw_fd() as u32,
            retval: 0,
            data_size_in: frame.len() as u32,
            data_size_out: 0,
            data_in: frame.as_ptr() as u64,
            data_out: 0,
            repeat,
            duration: 0,
            ctx_size_in: 0,
            ctx_size_out: 0,
            ctx_in: 0,
            ctx_out: 0,
            flags: 0,
            cpu: 0,
            batch_size: 0,
            _pad: 0,
        }
    }
}

/// struct xdp_md: the context handed in; data and data_end are offsets into the frame.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// bpf(2) on a `#[repr(C)]` prefix of union bpf_attr.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live #[repr(C)] value of the size passed, laid out as the start
    // of union bpf_attr for `cmd`; the pointers inside it reference buffers the caller
    // keeps alive for the call; the kernel writes only inside the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `r0 = verdict; exit`, as struct bpf_insn words (code, regs, off, imm little-endian).
fn return_instructions(verdict: i32) -> [u64; 2] {
    let mov64_imm_r0 = 0xb7_u64 | (u64::from(verdict as u32) << 32);
    let exit = 0x95_u64;
    [mov64_imm_r0, exit]
}

/// Loads a program of `prog_type` that only returns `verdict`.
fn load_returning(prog_type: u32, verdict: i32, name: &str) -> std::io::Result<OwnedFd> {
    let insns = return_instructions(verdict);
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: BPF_PROG_LOAD returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The loaded XDP program that turns every run into a transmitted frame.
#[derive(Debug)]
pub struct XdpTxProgram {
    fd: OwnedFd,
}

impl XdpTxProgram {
    pub fn load() -> Result<XdpTxProgram, XdpLiveFramesError> {
        let fd = load_returning(BPF_PROG_TYPE_XDP, XDP_TX, "fv_xdp_gen")
            .map_err(XdpLiveFramesError::Load)?;
        Ok(XdpTxProgram { fd })
    }

    /// Sends `repeat` copies of `frame` out of `ifindex` (in the calling thread's namespace),
    /// `batch` (1..=[`MAX_BATCH`]) per flush; returns the kernel's ns spent per frame.
    pub fn transmit(
        &self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
        batch: u32,
    ) -> Result<u32, XdpLiveFramesError> {
        let ctx = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ifindex,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        let mut attr = TestRunAttr {
            ctx_size_in: size_of::<XdpMd>() as u32,
            ctx_in: &ctx as *const XdpMd as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: batch.clamp(1, MAX_BATCH),
            ..TestRunAttr::new(&self.fd, frame, repeat)
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)
            .map_err(|source| XdpLiveFramesError::TestRun { ifindex, source })?;
        Ok(attr.duration)
    }
}

/// A program that only returns its verdict: run with BPF_PROG_TEST_RUN, it times the
/// harness itself (the loop, the context, the clock), the floor under any program's cost.
#[derive(Debug)]
pub struct ReturningProgram {
    fd: OwnedFd,
}

impl ReturningProgram {
    /// A TC (sched_cls) program returning TC_ACT_OK.
    pub fn tc() -> Result<ReturningProgram, XdpLiveFramesError> {
        let fd = load_returning(BPF_PROG_TYPE_SCHED_CLS, 0, "fv_tc_floor")
            .map_err(XdpLiveFramesError::Load)?;
        Ok(ReturningProgram { fd })
    }

    /// An XDP program returning XDP_PASS.
    pub fn xdp() -> Result<ReturningProgram, XdpLiveFramesError> {
        let fd = load_returning(BPF_PROG_TYPE_XDP, XDP_PASS, "fv_xdp_floor")
            .map_err(XdpLiveFramesError::Load)?;
        Ok(ReturningProgram { fd })
    }

    /// Runs the program `repeat` times on `frame`; the kernel's average ns per run.
    pub fn run(&self, frame: &[u8], repeat: u32) -> Result<u32, XdpLiveFramesError> {
        let mut attr = TestRunAttr::new(&self.fd, frame, repeat);
        bpf(BPF_PROG_TEST_RUN, &mut attr).map_err(XdpLiveFramesError::Run)?;
        Ok(attr.duration)
    }
}

/// Copies of `frame` per BPF_PROG_TEST_RUN call of [`transmit_until`]: ~0.1 s of sending at
/// the ~600k frames/s a veth pair through a switch takes here, so `stop` is seen soon after
/// it is set.
pub const FRAMES_PER_CALL: u32 = 1 << 16;

/// From a thread inside `netns`, sends `frame` out of `interface` with XDP live frames,
/// `batch` per flush, until `stop` is set; returns how many frames were handed to the kernel.
pub fn transmit_until(
    netns: &NetNs,
    interface: &str,
    frame: &[u8],
    batch: u32,
    stop: &AtomicBool,
) -> Result<u64, XdpLiveFramesError> {
    let program = XdpTxProgram::load()?;
    on_interface_in_netns(netns, interface, |ifindex| {
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            program.transmit(frame, ifindex, FRAMES_PER_CALL, batch)?;
            sent += u64::from(FRAMES_PER_CALL);
        }
        Ok(sent)
    })
}

/// Runs `f` with `interface`'s ifindex on a thread inside `netns`: bpf(2) resolves the
/// ifindexes it is given (test_run's ingress_ifindex, a link's target) in the calling
/// thread's namespace.
fn on_interface_in_netns<T: Send>(
    netns: &NetNs,
    interface: &str,
    f: impl FnOnce(u32) -> Result<T, XdpLiveFramesError> + Send,
) -> Result<T, XdpLiveFramesError> {
    let no_interface = || XdpLiveFramesError::NoInterface {
        interface: interface.to_string(),
        netns: netns.name().to_string(),
    };
    let c_name = std::ffi::CString::new(interface).map_err(|_| no_interface())?;
    netns
        .run_in(|| {
            // SAFETY: a valid NUL-terminated name; if_nametoindex only reads it, and resolves
            // it in this thread's (the namespace's) network namespace.
            let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
            if ifindex == 0 {
                return Err(no_interface());
            }
            f(ifindex)
        })
        .map_err(|source| XdpLiveFramesError::Netns {
            netns: netns.name().to_string(),
            source,
        })?
}

/// The head of union bpf_attr for BPF_LINK_CREATE.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// A TCX ingress program that drops every frame on a VM's interface: the frames are counted
/// in the interface's rx_packets and freed before the VM's IP stack, so a benchmark of the
/// switch does not time the receiver's UDP input. Detached when dropped (the link is ours).
#[derive(Debug)]
pub struct IngressSink {
    _link: OwnedFd,
}

impl IngressSink {
    /// Attaches the sink to `interface` in `netns`.
    pub fn attach(netns: &NetNs, interface: &str) -> Result<IngressSink, XdpLiveFramesError> {
        let program = load_returning(BPF_PROG_TYPE_SCHED_CLS, TC_ACT_SHOT, "fv_sink")
            .map_err(XdpLiveFramesError::Load)?;
        on_interface_in_netns(netns, interface, |ifindex| {
            let mut attr = LinkCreateAttr {
                prog_fd: program.as_raw_fd() as u32,
                target_ifindex: ifindex,
                attach_type: BPF_TCX_INGRESS,
                flags: 0,
            };
            let fd = bpf(BPF_LINK_CREATE, &mut attr)
                .map_err(|source| XdpLiveFramesError::Attach { ifindex, source })?;
            // SAFETY: BPF_LINK_CREATE returned a new descriptor that nothing else owns.
            Ok(IngressSink {
                _link: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames;
    use crate::netns_topology::{NS_IFNAME, NetnsTopology, TopologySpec};
    use std::net::Ipv4Addr;

    #[test]
    fn the_xdp_tx_program_loads_and_answers_xdp_tx() {
        let insns = return_instructions(XDP_TX);
        assert_eq!(insns[0] & 0xff, 0xb7, "BPF_ALU64 | BPF_MOV | BPF_K");
        assert_eq!(insns[0] >> 32, 3, "imm = XDP_TX");
        XdpTxProgram::load().unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn live_frames_reach_the_veth_peer_only_when_it_runs_napi() {
        let a = Ipv4Addr::new(10, 78, 0, 1);
        let b = Ipv4Addr::new(10, 78, 0, 2);
        let topo = NetnsTopology::create(&TopologySpec::endpoints(&[a, b]))
            .unwrap_or_else(|e| panic!("{e}"));
        let ep = topo.endpoint(0);
        let host = ep.host_if().to_string();
        let host_rx = || {
            crate::netns_topology::InterfaceCounters::read(None, &host)
                .unwrap()
                .rx_packets
        };
        let frame = frames::udp_frame_of_len(64, ep.mac(), [0x02, 0xee, 0, 0, 0, 1], a, b, 9, 9);
        let send = |count: u32| {
            let program = XdpTxProgram::load().unwrap();
            let c_name = std::ffi::CString::new(NS_IFNAME).unwrap();
            ep.netns()
                .run_in(|| {
                    // SAFETY: a valid NUL-terminated name, only read.
                    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
                    program.transmit(&frame, ifindex, count, 64)
                })
                .unwrap()
                .unwrap_or_else(|e| panic!("{e}"));
        };
        let gro = |on: &str| {
            let out = std::process::Command::new("ethtool")
                .args(["-K", &host, "gro", on])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        };
        gro("off");
        let before = host_rx();
        send(1_000);
        assert_eq!(
            host_rx() - before,
            0,
            "without NAPI on the peer, veth drops XDP frames"
        );
        gro("on");
        let before = host_rx();
        send(10_000);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let delivered = host_rx() - before;
        assert!(
            delivered >= 9_000,
            "the host end received {delivered} of 10000"
        );
    }

    /// `Udp: NoPorts` of the namespace: datagrams that reached UDP input with no socket.
    fn udp_no_ports(netns: &NetNs) -> u64 {
        let out = netns.run("cat", &["/proc/net/snmp"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
        let index = names
            .split_whitespace()
            .position(|n| n == "NoPorts")
            .unwrap();
        values
            .split_whitespace()
            .nth(index)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn ingress_sink_counts_frames_and_frees_them_before_udp_input() {
        let a = Ipv4Addr::new(10, 79, 0, 1);
        let topo =
            NetnsTopology::create(&TopologySpec::endpoints(&[a])).unwrap_or_else(|e| panic!("{e}"));
        let ep = topo.endpoint(0);
        let frame = frames::udp_frame_of_len(
            64,
            [0x02, 0xee, 0, 0, 0, 1],
            ep.mac(),
            Ipv4Addr::new(10, 79, 0, 9),
            a,
            9,
            9,
        );
        let program = XdpTxProgram::load().unwrap_or_else(|e| panic!("{e}"));
        // From the host end (this thread's namespace) into eth0, which has GRO on.
        let send = |count: u32| -> (u64, u64) {
            let (rx0, np0) = (ep.counters().unwrap().rx_packets, udp_no_ports(ep.netns()));
            program
                .transmit(&frame, ep.host_ifindex(), count, 64)
                .unwrap_or_else(|e| panic!("{e}"));
            std::thread::sleep(std::time::Duration::from_millis(100));
            (
                ep.counters().unwrap().rx_packets - rx0,
                udp_no_ports(ep.netns()) - np0,
            )
        };
        let (received, no_ports) = send(1_000);
        assert!(
            received >= 900 && no_ports >= 900,
            "without the sink: {received} rx, {no_ports} NoPorts"
        );
        let sink = IngressSink::attach(ep.netns(), NS_IFNAME).unwrap_or_else(|e| panic!("{e}"));
        let (received, no_ports) = send(1_000);
        assert!(
            received >= 900,
            "with the sink eth0 still counts them: {received}"
        );
        assert_eq!(no_ports, 0, "with the sink nothing reaches UDP input");
        drop(sink);
        let (_, no_ports) = send(1_000);
        assert!(
            no_ports >= 900,
            "detached with the guard: {no_ports} NoPorts"
        );
    }
}
