//! Suite `net`: ferrovirt-vhost-net against DPDK's `dpdk-testpmd` (vhost PMD forwarding to a
//! TAP PMD in io mode), both driven by the same host-side vhost-user frontend
//! (`ferrovirt_tests::vhost_user_frontend`: memfd memory, split queues, kick and call
//! eventfds), plus the host kernel's own TAP path (plain read/write on the TAP's fd) as the
//! floor.
//!
//! Every side gets a fresh network namespace with one TAP in it. Frames per second are counted
//! where the frames end up, the same way for every side:
//! - TX (virtqueue → TAP): the TAP's rx_packets (`/proc/net/dev` of the namespace), i.e. the
//!   frames the backend handed to the kernel;
//! - RX (TAP → virtqueue): an AF_PACKET socket in the namespace blasts frames into the TAP
//!   with `sendmmsg`; the driver counts the frames of our ethertype it finds in used RX chains.
//!
//! Each timed window starts after a warm-up; CPU per packet is the backend process's CPU
//! (cpuacct cgroup; testpmd is moved into one once started) in the window divided by the frames
//! counted in it. The driver and the injector are the same for every side and not in that
//! figure (the driver thread's own CPU per frame is a row of its own).
//!
//! VM to VM: two test guests under ferrovirt-vmm, `net-send` to `net-recv`, each on its own
//! backend, the two TAPs joined by a Linux bridge in the namespace; the peer serves the same
//! VMMs from two testpmd instances.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrovirt_tests::names::ip;
use ferrovirt_tests::netns_topology::ProcNetDev;
use ferrovirt_tests::testpmd::quiet_netns;
use ferrovirt_tests::vhost_user_frontend::{
    Buffer, GuestAddress, GuestMemory, SplitQueue, VhostUserConnection,
};
use ferrovirt_tests::{GuardedProcess, NetNs, PacketSocket, ScratchDir, Testpmd};

use super::{RunConfig, Suite};
use crate::cpu::CpuCgroup;
use crate::report::SuiteReport;
use crate::stats::{Better, Goal, Samples, Side, round_order};

pub const SUITE: Suite = Suite {
    name: "net",
    about: "vhost-user-net backends under one host-side frontend: TX/RX frames/s, Mbit/s, CPU per packet",
    run,
};

/// The timed window per case, side and round.
const RUN_TIME: Duration = Duration::from_millis(1500);
/// Traffic runs this long before the window opens (rings full, caches warm).
const WARMUP: Duration = Duration::from_millis(300);
/// How long starting a backend or connecting to it may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries per virtqueue, for both backends (the Linux virtio-net default).
const QUEUE_SIZE: u16 = 256;
/// IEEE 802 local experimental: nothing in the namespace answers or forwards it.
const ETHERTYPE: u16 = 0x88b5;
/// virtio 1.2 §5.1.6: struct virtio_net_hdr with VIRTIO_F_VERSION_1 is 12 bytes.
const VNET_HDR: usize = 12;
/// Bytes per RX chain (one buffer: header and frame, without MRG_RXBUF).
const RX_BUFFER: u32 = 2048;
/// Frames per `sendmmsg` of the RX injector.
const INJECT_BURST: usize = 32;

/// virtio feature bits the driver asks for: VERSION_1 and EVENT_IDX, no offloads, no
/// mergeable buffers, one queue pair.
const F_EVENT_IDX: u32 = 29;
const F_VERSION_1: u32 = 32;
const FEATURES: u64 = 1 << F_VERSION_1 | 1 << F_EVENT_IDX;

/// VM to VM: frames the sending guest sends per run, and how long the receiving guest waits
/// for all of them before it reports what it got.
const VM_FRAMES: u64 = 100_000;
const VM_RECV_SECONDS: u64 = 5;
/// (case name, frame bytes as net-send's `size`: Ethernet header to end of payload).
const VM_CASES: &[(&str, u64)] = &[("vm2vm_64b", 64), ("vm2vm_1500b", 1500)];
const RECEIVER_MAC: &str = "52:54:00:00:00:02";
const SENDER_MAC: &str = "52:54:00:00:00:03";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Guest TX: the driver fills the TX queue, frames come out of the TAP.
    Tx,
    /// Guest RX: frames injected into the TAP land in the driver's RX chains.
    Rx,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    direction: Direction,
    /// Ethernet frame bytes as the TAP sees them (no FCS, no virtio-net header).
    frame_len: usize,
}

const CASES: &[Case] = &[
    Case {
        name: "tx_64b",
        direction: Direction::Tx,
        frame_len: 64,
    },
    Case {
        name: "tx_1500b",
        direction: Direction::Tx,
        frame_len: 1500,
    },
    Case {
        name: "rx_64b",
        direction: Direction::Rx,
        frame_len: 64,
    },
    Case {
        name: "rx_1500b",
        direction: Direction::Rx,
        frame_len: 1500,
    },
];

/// What moves the frames between the virtqueue (or the bench) and the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataPath {
    Ferrovirt,
    Testpmd,
    /// No vhost-user at all: the bench reads and writes the TAP's fd itself.
    KernelTap,
}

/// What one timed window measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CaseSample {
    pps: f64,
    mbit_s: f64,
    /// Backend CPU per frame (NaN for the kernel path, which has no backend).
    cpu_ns_per_packet: f64,
    /// Backend CPU time / wall time: 1.0 is one core kept busy.
    backend_cores: f64,
    /// CPU per frame of the bench thread that drives the virtqueues (or, for the kernel
    /// path, reads or writes the TAP).
    mover_cpu_ns_per_packet: f64,
}

fn run(config: &RunConfig) -> anyhow::Result<SuiteReport> {
    let setup = Setup::prepare()?;
    let mut rows = Vec::new();
    let mut goals = Vec::new();
    for case in CASES {
        let mut pps = Samples::new(&format!("{}_pps", case.name), "frames/s", Better::Higher);
        let mut mbit = Samples::new(&format!("{}_mbit_s", case.name), "Mbit/s", Better::Higher);
        let mut cpu = Samples::new(
            &format!("{}_cpu_per_packet", case.name),
            "ns",
            Better::Lower,
        );
        let mut cores = Samples::new(
            &format!("{}_backend_cores", case.name),
            "cores",
            Better::Lower,
        );
        let mut driver = Samples::new(
            &format!("{}_driver_cpu_per_packet", case.name),
            "ns",
            Better::Lower,
        );
        let mut floor = Samples::new(
            &format!("{}_pps_vs_kernel_tap", case.name),
            "frames/s",
            Better::Higher,
        );
        let mut floor_cpu = Samples::new(
            &format!("{}_cpu_per_packet_vs_kernel_tap", case.name),
            "ns",
            Better::Lower,
        );
        for round in 0..config.rounds {
            for side in round_order(round) {
                let path = match side {
                    Side::Ferrovirt => DataPath::Ferrovirt,
                    Side::Peer => DataPath::Testpmd,
                };
                let s = setup
                    .measure(case, path)
                    .with_context(|| format!("case {} ({path:?})", case.name))?;
                eprintln!(
                    "net: {} {path:?}: {:.0} frames/s, {:.0} ns CPU/frame, {:.2} cores",
                    case.name, s.pps, s.cpu_ns_per_packet, s.backend_cores
                );
                pps.push(side, s.pps);
                mbit.push(side, s.mbit_s);
                cpu.push(side, s.cpu_ns_per_packet);
                cores.push(side, s.backend_cores);
                driver.push(side, s.mover_cpu_ns_per_packet);
                if side == Side::Ferrovirt {
                    floor.push(side, s.pps);
                    floor_cpu.push(side, s.cpu_ns_per_packet);
                }
            }
            let k = setup
                .measure(case, DataPath::KernelTap)
                .with_context(|| format!("case {} (kernel TAP path)", case.name))?;
            eprintln!("net: {} KernelTap: {:.0} frames/s", case.name, k.pps);
            floor.push(Side::Peer, k.pps);
            floor_cpu.push(Side::Peer, k.mover_cpu_ns_per_packet);
        }
        eprintln!("net: case {} done", case.name);
        for samples in [&pps, &mbit, &cpu, &cores, &driver] {
            rows.push(samples.summarize("dpdk-testpmd").context("no samples")?);
        }
        for samples in [&floor, &floor_cpu] {
            rows.push(
                samples
                    .summarize("kernel TAP read/write")
                    .context("no samples")?,
            );
        }
        goals.push(Goal::ratio_at_least(
            &format!("{}_pps", case.name),
            0.7,
            &format!(
                "≥ 0.7× dpdk-testpmd's frames/s, {} {} B",
                match case.direction {
                    Direction::Tx => "TX",
                    Direction::Rx => "RX",
                },
                case.frame_len
            ),
        ));
    }
    for &(name, size) in VM_CASES {
        let mut pps = Samples::new(&format!("{name}_pps"), "frames/s", Better::Higher);
        let mut delivered = Samples::new(&format!("{name}_delivered"), "%", Better::Higher);
        let mut cpu = Samples::new(&format!("{name}_cpu_per_packet"), "ns", Better::Lower);
        for round in 0..config.rounds {
            for side in round_order(round) {
                let path = match side {
                    Side::Ferrovirt => DataPath::Ferrovirt,
                    Side::Peer => DataPath::Testpmd,
                };
                let s = setup
                    .measure_vm_to_vm(size, path)
                    .with_context(|| format!("case {name} ({path:?})"))?;
                eprintln!(
                    "net: {name} {path:?}: {:.0} frames/s, {:.1}% delivered, {:.0} ns CPU/frame",
                    s.pps, s.delivered_pct, s.cpu_ns_per_packet
                );
                pps.push(side, s.pps);
                delivered.push(side, s.delivered_pct);
                cpu.push(side, s.cpu_ns_per_packet);
            }
        }
        eprintln!("net: case {name} done");
        for samples in [&pps, &delivered, &cpu] {
            rows.push(samples.summarize("dpdk-testpmd").context("no samples")?);
        }
        goals.push(Goal::ratio_at_least(
            &format!("{name}_pps"),
            0.7,
            &format!("≥ 0.7× dpdk-testpmd's frames/s, VM to VM {size} B"),
        ));
    }
    Ok(SuiteReport {
        suite: SUITE.name.to_string(),
        peer_name: "dpdk-testpmd (vhost PMD ⇄ TAP PMD, io forwarding)".into(),
        rounds: config.rounds,
        rows,
        goals,
        notes: notes(),
    })
}

fn notes() -> Vec<String> {
    vec![
        format!(
            "ferrovirt: `ferrovirt-vhost-net --socket SOCK --tap TAP --netns NS --queue-pairs 1` \
             on a TAP made with `ip tuntap add dev TAP mode tap` in a fresh namespace."
        ),
        "peer: `dpdk-testpmd -l 0,1 --no-huge -m 1024 --no-pci --vdev net_vhost0,iface=SOCK \
         --vdev net_tap0,iface=TAP -- --forward-mode=io --auto-start --total-num-mbufs=16384` \
         in a fresh namespace (the `Testpmd` guard); its forwarding lcore busy-polls one core, \
         which the CPU columns include."
            .into(),
        format!(
            "driver: the harness's vhost-user frontend (VERSION_1 and EVENT_IDX, one queue pair, \
             {QUEUE_SIZE} entries per queue) in one thread, kicking after every batch it \
             refills and waiting for used entries on the call eventfd. TX chains are one \
             descriptor (12-byte header + frame); RX chains one {RX_BUFFER}-byte buffer."
        ),
        "tx_*: frames counted as the TAP's rx_packets in the namespace's /proc/net/dev (what \
         the backend wrote into the kernel); rx_*: an AF_PACKET socket (PACKET_QDISC_BYPASS) in \
         the namespace sends bursts of 32 frames with sendmmsg as fast as it can, and the \
         driver counts the frames of its ethertype in used RX chains."
            .into(),
        format!(
            "Frame sizes are Ethernet frames without FCS; Mbit/s = frames/s × frame bytes × 8. \
             Each sample is a {} ms window after {} ms of warm-up, on a fresh backend and \
             namespace.",
            RUN_TIME.as_millis(),
            WARMUP.as_millis()
        ),
        "cpu_per_packet / backend_cores: the backend's CPU (cpuacct cgroup; testpmd is moved \
         into its cgroup once it runs) in the window, per counted frame and per wall second."
            .into(),
        "*_pps_vs_kernel_tap: the floor, with no vhost-user: the bench holds the TAP's fd and \
         writes one frame per write(2) (tx, counted at the TAP) or reads one per read(2) while \
         the same injector sends (rx, counted by the reader); *_cpu_per_packet_vs_kernel_tap \
         sets the backend's CPU per frame against that one bench thread's."
            .into(),
        "*_driver_cpu_per_packet: the driver thread's own CPU per frame (its schedstat), to \
         show whether the driver rather than the backend was the limit."
            .into(),
        format!(
            "vm2vm_*: two ferrovirt-vmm test guests (`--memory 64 --net socket=SOCK,mac=MAC`), \
             `net-send count={VM_FRAMES} size=S batch=64` to `net-recv count={VM_FRAMES} \
             seconds={VM_RECV_SECONDS}` (UDP, every payload checked), each on its own backend \
             whose TAPs are ports of one Linux bridge in a fresh namespace; the peer is the \
             same VMMs on two testpmd instances (whose forwarding lcores share core 1). \
             frames/s = good frames / the receiver's TSC ticks from first to last frame, \
             converted with the host's TSC rate (calibrated by the bench: the guest's own `us=` \
             assumes 5000 MHz when CPUID gives no TSC frequency); \
             delivered = good / sent; CPU per packet = both backends' CPU while the sender runs \
             (boot to exit) / good frames."
        ),
        "The driver, the injector and the kernel share the machine's cores with the backend; \
         on 2 cores testpmd's spinning lcore takes one of them."
            .into(),
    ]
}

struct Setup {
    backend: PathBuf,
    vmm: PathBuf,
    guest: PathBuf,
    dir: ScratchDir,
    /// The host's TSC ticks per second, which the guests' TSC ticks at too.
    tsc_hz: f64,
}

/// A backend serving one vhost-user socket on the TAP of `netns`. Fields drop in order: the
/// process is reaped before its cgroup is removed, and both before the namespace goes.
enum RunningBackend {
    Ferrovirt {
        process: GuardedProcess,
        cgroup: CpuCgroup,
        socket: PathBuf,
    },
    Testpmd {
        testpmd: Testpmd,
        cgroup: CpuCgroup,
    },
}

impl RunningBackend {
    fn socket(&self) -> &Path {
        match self {
            RunningBackend::Ferrovirt { socket, .. } => socket,
            RunningBackend::Testpmd { testpmd, .. } => testpmd.socket(),
        }
    }

    fn cgroup(&self) -> &CpuCgroup {
        match self {
            RunningBackend::Ferrovirt { cgroup, .. } | RunningBackend::Testpmd { cgroup, .. } => {
                cgroup
            }
        }
    }

    /// An error with the backend's output if it is no longer running.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self {
            RunningBackend::Ferrovirt { process, .. } => {
                if let Some(exit) = process.try_exit()? {
                    bail!(
                        "ferrovirt-vhost-net exited ({:?}): {}",
                        exit.status,
                        process.stderr()
                    );
                }
            }
            RunningBackend::Testpmd { testpmd, .. } => {
                // SAFETY: signal 0 only checks that the (unreaped) pid exists.
                if unsafe { libc::kill(testpmd.pid(), 0) } != 0 {
                    bail!("dpdk-testpmd is gone: {}", testpmd.output_tail());
                }
            }
        }
        Ok(())
    }

    fn output(&self) -> String {
        match self {
            RunningBackend::Ferrovirt { process, .. } => process.stderr(),
            RunningBackend::Testpmd { testpmd, .. } => testpmd.output_tail(),
        }
    }
}

impl Drop for RunningBackend {
    fn drop(&mut self) {
        if let RunningBackend::Ferrovirt {
            process, socket, ..
        } = self
        {
            let _ = process.terminate();
            let _ = std::fs::remove_file(socket);
        }
    }
}

impl Setup {
    fn prepare() -> anyhow::Result<Setup> {
        let backend =
            ferrovirt_tests::try_vhost_net_binary().context("net runs ferrovirt-vhost-net")?;
        crate::find_in_path(ferrovirt_tests::testpmd::TESTPMD)
            .context("the peer is dpdk-testpmd: apt-get install dpdk-dev (scripts/setup.sh)")?;
        let vmm =
            ferrovirt_tests::try_vmm_binary().context("the VM-to-VM cases run ferrovirt-vmm")?;
        let guest =
            ferrovirt_tests::try_testguest().context("the VM-to-VM cases boot the test guest")?;
        let dir = ScratchDir::new("bench-net")?;
        Ok(Setup {
            backend,
            vmm,
            guest,
            dir,
            tsc_hz: host_tsc_hz(),
        })
    }

    /// A TAP made by us inside `netns`, up, with no addresses (the namespace removes it).
    fn create_tap(&self, netns: &NetNs) -> anyhow::Result<String> {
        let tap = ferrovirt_tests::unique_name("btap");
        let ns = netns.name();
        ip(&["-n", ns, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
        ip(&["-n", ns, "link", "set", "dev", &tap, "addrgenmode", "none"])?;
        ip(&["-n", ns, "link", "set", "dev", &tap, "up"])?;
        Ok(tap)
    }

    /// Starts `path`'s backend on a TAP in `netns`; returns it and the TAP's name.
    fn start_backend(
        &self,
        path: DataPath,
        netns: &NetNs,
    ) -> anyhow::Result<(RunningBackend, String)> {
        let socket = self
            .dir
            .join(format!("{}.sock", ferrovirt_tests::unique_name("n")));
        match path {
            DataPath::Ferrovirt => {
                let tap = self.create_tap(netns)?;
                let mut cmd = Command::new(&self.backend);
                cmd.arg("--socket").arg(&socket).args([
                    "--tap",
                    &tap,
                    "--netns",
                    netns.name(),
                    "--queue-pairs",
                    "1",
                ]);
                let cgroup = CpuCgroup::create("net")?;
                cgroup.run_inside(&mut cmd);
                let mut process = GuardedProcess::spawn(
                    cmd,
                    &socket.with_extension("out"),
                    &socket.with_extension("err"),
                )?;
                process.wait_for_socket(&socket, STEP_TIMEOUT)?;
                Ok((
                    RunningBackend::Ferrovirt {
                        process,
                        cgroup,
                        socket,
                    },
                    tap,
                ))
            }
            DataPath::Testpmd => {
                let testpmd = Testpmd::start(netns, &socket, 1)?;
                let cgroup = CpuCgroup::create("net-testpmd")?;
                cgroup.adopt(testpmd.pid())?;
                let tap = testpmd.tap().to_string();
                Ok((RunningBackend::Testpmd { testpmd, cgroup }, tap))
            }
            DataPath::KernelTap => bail!("the kernel TAP path has no backend"),
        }
    }

    /// One timed window of `case` through `path`, on a fresh namespace and backend.
    fn measure(&self, case: &Case, path: DataPath) -> anyhow::Result<CaseSample> {
        let netns = NetNs::create("nbench")?;
        quiet_netns(&netns);
        let (mut backend, tap) = match path {
            DataPath::KernelTap => (None, self.create_tap(&netns)?),
            _ => {
                let (b, tap) = self.start_backend(path, &netns)?;
                (Some(b), tap)
            }
        };
        let counters = ProcNetDev::open(Some(&netns), &tap)?;
        let frame = test_frame(case.frame_len);
        let stop = AtomicBool::new(false);
        let delivered = AtomicU64::new(0);
        let mover_tid = AtomicI32::new(0);
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
        let mut failed_output = String::new();
        let tap_fd = match path {
            DataPath::KernelTap => Some(open_tap_fd(&netns, &tap)?),
            _ => None,
        };
        let window = std::thread::scope(|scope| -> anyhow::Result<Window> {
            let stop = &stop;
            let delivered = &delivered;
            let frame = &frame;
            let mover_tid = &mover_tid;
            let mover = {
                let socket = backend.as_ref().map(|b| b.socket().to_path_buf());
                let tap_fd = tap_fd.as_ref();
                let ready = ready_tx.clone();
                scope.spawn(move || -> anyhow::Result<()> {
                    // SAFETY: gettid has no preconditions.
                    mover_tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                    let result = match (socket, tap_fd) {
                        (Some(socket), _) => drive_virtqueues(
                            &socket,
                            case.direction,
                            frame,
                            stop,
                            delivered,
                            &ready,
                        ),
                        (None, Some(fd)) => {
                            let _ = ready.send(Ok(()));
                            move_through_tap_fd(fd, case.direction, frame, stop, delivered)
                        }
                        (None, None) => Err(anyhow::anyhow!("nothing moves the frames")),
                    };
                    if let Err(e) = &result {
                        // The main thread may still wait for "ready".
                        let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
                    }
                    result
                })
            };
            let injector = (case.direction == Direction::Rx).then(|| {
                let netns = &netns;
                let tap = tap.clone();
                scope.spawn(move || inject(netns, &tap, frame, stop))
            });
            let outcome = (|| -> anyhow::Result<Window> {
                match ready_rx.recv_timeout(STEP_TIMEOUT) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => bail!("the driver did not start within {STEP_TIMEOUT:?}"),
                }
                std::thread::sleep(WARMUP);
                let count = |counters: &mut ProcNetDev| -> anyhow::Result<u64> {
                    Ok(match case.direction {
                        Direction::Tx => counters.read()?.rx_packets,
                        Direction::Rx => delivered.load(Ordering::Relaxed),
                    })
                };
                let cpu = |b: &Option<RunningBackend>| -> anyhow::Result<u64> {
                    b.as_ref().map_or(Ok(0), |b| b.cgroup().usage_ns())
                };
                let mover = mover_tid.load(Ordering::Relaxed);
                let mut counters = counters;
                let start = Instant::now();
                let (c0, cpu0, m0) = (count(&mut counters)?, cpu(&backend)?, thread_cpu_ns(mover)?);
                std::thread::sleep(RUN_TIME);
                let (c1, cpu1, m1) = (count(&mut counters)?, cpu(&backend)?, thread_cpu_ns(mover)?);
                Ok(Window {
                    elapsed: start.elapsed(),
                    frames: c1.saturating_sub(c0),
                    backend_cpu_ns: cpu1.saturating_sub(cpu0),
                    mover_cpu_ns: m1.saturating_sub(m0),
                })
            })();
            stop.store(true, Ordering::Relaxed);
            if outcome.is_err() {
                // A driver stuck in a vhost-user request returns once the backend is gone.
                if let Some(b) = backend.take() {
                    failed_output = b.output();
                }
            }
            let moved = mover
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            if let Some(injector) = injector {
                injector
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
                    .context("the RX injector failed")?;
            }
            let window = outcome?;
            moved?;
            Ok(window)
        });
        let Window {
            elapsed,
            frames,
            backend_cpu_ns: cpu_ns,
            mover_cpu_ns,
        } = match window {
            Ok(w) => w,
            Err(e) => {
                let output = backend
                    .as_ref()
                    .map(|b| b.output())
                    .unwrap_or(failed_output);
                return Err(e.context(format!("backend output:\n{output}")));
            }
        };
        if let Some(b) = backend.as_mut() {
            b.check_alive()?;
        }
        if frames == 0 {
            bail!("no frame arrived in the {RUN_TIME:?} window");
        }
        let secs = elapsed.as_secs_f64();
        let pps = frames as f64 / secs;
        let (cpu_ns_per_packet, backend_cores) = match backend {
            Some(_) => (cpu_ns as f64 / frames as f64, cpu_ns as f64 / 1e9 / secs),
            None => (f64::NAN, f64::NAN),
        };
        drop(backend);
        drop(netns);
        Ok(CaseSample {
            pps,
            mbit_s: pps * case.frame_len as f64 * 8.0 / 1e6,
            cpu_ns_per_packet,
            backend_cores,
            mover_cpu_ns_per_packet: mover_cpu_ns as f64 / frames as f64,
        })
    }
}

/// One timed window: its length, the frames counted in it and the CPU spent.
struct Window {
    elapsed: Duration,
    frames: u64,
    backend_cpu_ns: u64,
    mover_cpu_ns: u64,
}

/// Nanoseconds thread `tid` of this process has run (the first field of its schedstat).
fn thread_cpu_ns(tid: i32) -> anyhow::Result<u64> {
    let path = format!("/proc/self/task/{tid}/schedstat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{path} does not start with a number: {text:?}"))
}

/// What one VM-to-VM transfer measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct VmSample {
    pps: f64,
    delivered_pct: f64,
    cpu_ns_per_packet: f64,
}

impl Setup {
    /// `net-send` in one test guest to `net-recv` in another, each guest on its own `path`
    /// backend, the two TAPs bridged in a fresh namespace.
    fn measure_vm_to_vm(&self, size: u64, path: DataPath) -> anyhow::Result<VmSample> {
        let netns = NetNs::create("nbvm")?;
        quiet_netns(&netns);
        let ns = netns.name();
        ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", ns, "link", "set", "br0", "up"])?;
        let mut backends = Vec::new();
        for _ in 0..2 {
            let (backend, tap) = self.start_backend(path, &netns)?;
            ip(&["-n", ns, "link", "set", "dev", &tap, "master", "br0"])?;
            backends.push(backend);
        }
        let cpu = |backends: &[RunningBackend]| -> anyhow::Result<u64> {
            backends.iter().map(|b| b.cgroup().usage_ns()).sum()
        };
        let mut receiver = self.spawn_guest(
            backends[0].socket(),
            RECEIVER_MAC,
            &format!(
                "scenario=net-recv ip=10.0.0.2 count={VM_FRAMES} port=5001 seconds={VM_RECV_SECONDS}"
            ),
        )?;
        wait_for_output(&mut receiver, "net-recv listening", STEP_TIMEOUT)?;
        let cpu_before = cpu(&backends)?;
        let mut sender = self.spawn_guest(
            backends[1].socket(),
            SENDER_MAC,
            &format!(
                "scenario=net-send dst_mac={RECEIVER_MAC} dst_ip=10.0.0.2 ip=10.0.0.3 \
                 count={VM_FRAMES} size={size} port=5001"
            ),
        )?;
        let sent = sender.wait_timeout(STEP_TIMEOUT);
        let cpu_ns = cpu(&backends)?.saturating_sub(cpu_before);
        let send_out = sender.stdout();
        if sent.is_err() || !send_out.contains("PASS net-send") {
            bail!(
                "the sending guest did not finish ({sent:?}); serial:\n{send_out}\nVMM: {}\nbackend: {}",
                tail(&sender.stderr()),
                tail(&backends[1].output())
            );
        }
        let received = receiver.wait_timeout(STEP_TIMEOUT + Duration::from_secs(VM_RECV_SECONDS));
        let recv_out = receiver.stdout();
        let good = field_of(&recv_out, "net-recv received=", "good");
        let ticks = field_of(&recv_out, "net-recv tsc_ticks=", "tsc_ticks");
        let (Some(good), Some(ticks)) = (good, ticks) else {
            bail!(
                "the receiving guest did not report ({received:?}); serial:\n{recv_out}\nVMM: {}\nbackend: {}",
                tail(&receiver.stderr()),
                tail(&backends[0].output())
            );
        };
        if good < 2 || ticks == 0 {
            bail!("the receiving guest got {good} good frames in {ticks} TSC ticks:\n{recv_out}");
        }
        drop(sender);
        drop(receiver);
        drop(backends);
        Ok(VmSample {
            // `good` frames arrived over `good - 1` gaps.
            pps: (good - 1) as f64 / (ticks as f64 / self.tsc_hz),
            delivered_pct: good as f64 * 100.0 / VM_FRAMES as f64,
            cpu_ns_per_packet: cpu_ns as f64 / good as f64,
        })
    }

    /// A ferrovirt-vmm running the test guest with `cmdline` and one NIC on `socket`; its
    /// serial console goes to its stdout file.
    fn spawn_guest(
        &self,
        socket: &Path,
        mac: &str,
        cmdline: &str,
    ) -> anyhow::Result<GuardedProcess> {
        let mut cmd = Command::new(&self.vmm);
        cmd.arg("--kernel")
            .arg(&self.guest)
            .args(["--memory", "64", "--cmdline", cmdline, "--net"])
            .arg(format!("socket={},mac={mac}", socket.display()));
        let out = socket.with_extension("vmm-out");
        Ok(GuardedProcess::spawn(
            cmd,
            &out,
            &out.with_extension("vmm-err"),
        )?)
    }
}

/// Host TSC ticks per second, against the monotonic clock over 200 ms. The guest's own
/// conversion (`us=`) relies on CPUID's TSC frequency, which a guest may not be given
/// (the test guest then assumes 5000 MHz), so the bench converts the guest's ticks itself:
/// KVM guests without TSC scaling tick at the host's rate.
fn host_tsc_hz() -> f64 {
    // SAFETY: RDTSC has no preconditions on x86_64 user space (CR4.TSD is clear on Linux).
    let rdtsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(200));
    let (c1, t1) = (rdtsc(), Instant::now());
    c1.wrapping_sub(c0) as f64 / (t1 - t0).as_secs_f64()
}

/// Waits until `process` has written `needle` to its stdout.
fn wait_for_output(
    process: &mut GuardedProcess,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !process.stdout().contains(needle) {
        if process.try_exit()?.is_some() || Instant::now() > deadline {
            bail!(
                "no {needle:?} within {timeout:?}; serial:\n{}\nstderr: {}",
                process.stdout(),
                tail(&process.stderr())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The last lines of a process's output, for error messages.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// The number after `key=` on the first line of `output` that contains `line_start`
/// (`net-recv received=5 good=5 ...`, key `good` → 5).
fn field_of(output: &str, line_start: &str, key: &str) -> Option<u64> {
    let line = output.lines().find(|l| l.contains(line_start))?;
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// A frame of `len` bytes: locally administered unicast MACs, our ethertype, a counting
/// payload.
fn test_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(60)];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// Whether `frame` (Ethernet, from its first byte) carries our ethertype.
fn is_test_frame(frame: &[u8]) -> bool {
    frame.len() >= 14 && u16::from_be_bytes([frame[12], frame[13]]) == ETHERTYPE
}

/// The host side of the virtio-net device: connects to `socket`, starts rx0 and tx0 and moves
/// frames in `direction` until `stop`, adding every frame it sees arrive (RX) or returned (TX)
/// to `delivered`. Sends `Ok` on `ready` once the queues run.
fn drive_virtqueues(
    socket: &Path,
    direction: Direction,
    frame: &[u8],
    stop: &AtomicBool,
    delivered: &AtomicU64,
    ready: &mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut mem = GuestMemory::new(16 << 20)?;
    let mut rx = SplitQueue::new(&mut mem, 0, QUEUE_SIZE)?;
    let mut tx = SplitQueue::new(&mut mem, 1, QUEUE_SIZE)?;
    let mut conn = VhostUserConnection::connect(socket, 2, FEATURES)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    if conn.features() & FEATURES != FEATURES {
        bail!(
            "the backend did not accept features {FEATURES:#x} (got {:#x})",
            conn.features()
        );
    }
    conn.set_mem_table(&mem)?;
    let (queue, buffer_len, writable) = match direction {
        Direction::Tx => (&mut tx, VNET_HDR + frame.len(), false),
        Direction::Rx => (&mut rx, RX_BUFFER as usize, true),
    };
    // One buffer per descriptor, each chain a single descriptor: head id → buffer.
    let mut buffers = Vec::with_capacity(usize::from(QUEUE_SIZE));
    for _ in 0..QUEUE_SIZE {
        let addr = mem.alloc(buffer_len as u64, 64)?;
        if direction == Direction::Tx {
            let mut bytes = vec![0u8; VNET_HDR];
            bytes.extend_from_slice(frame);
            mem.write(addr, &bytes)?;
        }
        buffers.push(addr);
    }
    let chain = |addr: GuestAddress| {
        if writable {
            Buffer::writable(addr, buffer_len as u32)
        } else {
            Buffer::readable(addr, buffer_len as u32)
        }
    };
    let mut by_head: HashMap<u16, GuestAddress> = HashMap::new();
    for &addr in &buffers {
        let head = queue.add_chain(&mem, &[chain(addr)])?;
        by_head.insert(head, addr);
    }
    queue.publish(&mem)?;
    conn.start_queue(&mem, &rx, 0)?;
    conn.start_queue(&mem, &tx, 0)?;
    let queue = match direction {
        Direction::Tx => &mut tx,
        Direction::Rx => &mut rx,
    };
    queue.kick()?;
    let _ = ready.send(Ok(()));
    let mut idle_since = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let used = match queue.wait_used(&mem, 1, Duration::from_millis(100)) {
            Ok(used) => used,
            Err(ferrovirt_tests::vhost_user_frontend::FrontendError::Timeout { .. }) => {
                if idle_since.elapsed() > STEP_TIMEOUT {
                    bail!("the backend returned no chain for {STEP_TIMEOUT:?}");
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        idle_since = Instant::now();
        let mut arrived = 0u64;
        // Every returned head leaves the map before any chain is added again: a new chain may
        // reuse the descriptor id of an entry further down `used`.
        let mut returned = Vec::with_capacity(used.len());
        for u in &used {
            let Some(addr) = by_head.remove(&u.head) else {
                bail!("the backend returned head {} it does not hold", u.head);
            };
            returned.push((addr, u.len));
        }
        for (addr, len) in returned {
            if direction == Direction::Rx {
                let header_and_ethertype = mem.read(addr, VNET_HDR + 14)?;
                if len as usize >= VNET_HDR + 14 && is_test_frame(&header_and_ethertype[VNET_HDR..])
                {
                    arrived += 1;
                }
            } else {
                arrived += 1;
            }
            let head = queue.add_chain(&mem, &[chain(addr)])?;
            by_head.insert(head, addr);
        }
        delivered.fetch_add(arrived, Ordering::Relaxed);
        queue.publish(&mem)?;
        queue.kick()?;
    }
    // Closing the connection stops the rings; no GET_VRING_BASE, whose reply a stuck backend
    // could withhold forever.
    drop(conn);
    Ok(())
}

/// The floor: frames through the TAP's own fd, one read(2) or write(2) per frame, until
/// `stop`. RX frames of our ethertype count in `delivered`; TX frames are counted at the TAP.
fn move_through_tap_fd(
    fd: &OwnedFd,
    direction: Direction,
    frame: &[u8],
    stop: &AtomicBool,
    delivered: &AtomicU64,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match direction {
            Direction::Tx => {
                // SAFETY: `frame` is valid for its length; the fd is a TAP we opened.
                let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        return Err(e).context("write to the TAP");
                    }
                }
            }
            Direction::Rx => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                    continue;
                }
                // SAFETY: the buffer is valid for its length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 && is_test_frame(&buf[..n as usize]) {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(())
}

/// Opens the TAP `tap` of `netns` (IFF_TAP | IFF_NO_PI, no virtio-net header), non-blocking.
fn open_tap_fd(netns: &NetNs, tap: &str) -> anyhow::Result<OwnedFd> {
    let name = tap.as_bytes().to_vec();
    let opened = netns.run_in(move || -> anyhow::Result<OwnedFd> {
        // SAFETY: open(2) of a NUL-terminated path; the result is checked and owned below.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("open /dev/net/tun");
        }
        // SAFETY: `fd` was just returned by open(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // struct ifreq: 16 bytes of name, then the flags (short).
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(&name);
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq-sized buffer, which `req` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
        }
        Ok(fd)
    });
    opened.with_context(|| format!("cannot enter {}", netns.name()))?
}

/// Sends `frame` into `tap` from its namespace's side (so the TAP's reader receives it) in
/// `sendmmsg` bursts until `stop`. Frames the TAP's queue has no room for are dropped by the
/// kernel, as they would be for a slow guest.
fn inject(netns: &NetNs, tap: &str, frame: &[u8], stop: &AtomicBool) -> anyhow::Result<()> {
    let socket = PacketSocket::open_sender(netns.name(), tap)
        .with_context(|| format!("AF_PACKET socket on {tap}"))?;
    socket
        .send_bursts_until(frame, INJECT_BURST, stop)
        .context("sendmmsg into the TAP")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_report_fields_are_read_from_their_line() {
        let serial = "testguest: net-recv listening ip=10.0.0.2 port=5001 count=100\n\
            testguest: net-recv received=95431 good=95430 bad=1 lost=4569\n\
            testguest: net-recv tsc_ticks=1931352174 us=386270\n";
        assert_eq!(field_of(serial, "net-recv received=", "good"), Some(95_430));
        assert_eq!(
            field_of(serial, "net-recv received=", "received"),
            Some(95_431)
        );
        assert_eq!(field_of(serial, "net-recv tsc_ticks=", "us"), Some(386_270));
        assert_eq!(field_of(serial, "net-recv tsc_ticks=", "good"), None);
        assert_eq!(field_of(serial, "net-send sent=", "us"), None);
    }

    #[test]
    fn test_frames_have_the_asked_length_and_our_ethertype() {
        for len in [64, 1500] {
            let f = test_frame(len);
            assert_eq!(f.len(), len);
            assert!(is_test_frame(&f));
        }
        let mut other = test_frame(64);
        other[12] = 0x08;
        assert!(!is_test_frame(&other));
        assert!(!is_test_frame(&other[..10]));
    }

    #[test]
    fn frames_written_into_a_tap_fd_show_in_its_namespace_counters() {
        let netns = NetNs::create("nbt").unwrap();
        let tap = ferrovirt_tests::unique_name("btap");
        ip(&[
            "-n",
            netns.name(),
            "tuntap",
            "add",
            "dev",
            &tap,
            "mode",
            "tap",
        ])
        .unwrap();
        ip(&["-n", netns.name(), "link", "set", "dev", &tap, "up"]).unwrap();
        let mut counters = ProcNetDev::open(Some(&netns), &tap).unwrap();
        let before = counters.read().unwrap().rx_packets;
        let fd = open_tap_fd(&netns, &tap).unwrap();
        let frame = test_frame(64);
        for _ in 0..5 {
            // SAFETY: the frame is valid for its length.
            let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            assert_eq!(n, 64, "{}", std::io::Error::last_os_error());
        }
        assert_eq!(counters.read().unwrap().rx_packets - before, 5);
        assert!(
            ProcNetDev::open(None, &tap).unwrap().read().is_err(),
            "the TAP lives in the bench namespace only"
        );
    }
}
