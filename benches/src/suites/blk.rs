//! Suite `blk`: ferrovirt-vhost-blk against qemu-storage-daemon, both driven by the same
//! host-side vhost-user-blk frontend (libblkio's virtio-blk-vhost-user driver through the
//! `blkio` crate: memfd memory, its own virtqueues and eventfds), on the same image with
//! O_DIRECT; and the host's own io_uring on that file (fio) as the limit.
//!
//! Each case starts a fresh backend in a cpuacct cgroup of its own; CPU per I/O is the
//! backend's CPU during the timed run divided by the I/Os it completed (the frontend is the
//! same for both and not counted).

use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use ferrovirt_tests::{GuardedProcess, ScratchDir};

use super::{RunConfig, Suite};
use crate::cpu::CpuCgroup;
use crate::report::SuiteReport;
use crate::stats::{Better, Goal, Samples, Side, round_order};

pub const SUITE: Suite = Suite {
    name: "blk",
    about: "vhost-user-blk backends under one host-side frontend: IOPS, MB/s, latency, CPU per I/O",
    run,
};

const IMAGE_MIB: u64 = 512;
/// How long each case runs, per side and round.
const RUN_TIME: Duration = Duration::from_millis(1500);
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    RandRead,
    RandWrite,
    SeqRead,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    op: Op,
    block: usize,
    /// Requests in flight per queue.
    depth: usize,
    queues: usize,
    /// Compared with fio on the host (the limit) too.
    against_host: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "randread_4k_qd1",
        op: Op::RandRead,
        block: 4096,
        depth: 1,
        queues: 1,
        against_host: false,
    },
    Case {
        name: "randwrite_4k_qd1",
        op: Op::RandWrite,
        block: 4096,
        depth: 1,
        queues: 1,
        against_host: false,
    },
    Case {
        name: "randread_4k_qd32",
        op: Op::RandRead,
        block: 4096,
        depth: 32,
        queues: 1,
        against_host: true,
    },
    Case {
        name: "randwrite_4k_qd32",
        op: Op::RandWrite,
        block: 4096,
        depth: 32,
        queues: 1,
        against_host: true,
    },
    Case {
        name: "randread_4k_qd32_2q",
        op: Op::RandRead,
        block: 4096,
        depth: 32,
        queues: 2,
        against_host: false,
    },
    Case {
        name: "randwrite_4k_qd32_2q",
        op: Op::RandWrite,
        block: 4096,
        depth: 32,
        queues: 2,
        against_host: false,
    },
    Case {
        name: "seqread_128k_qd8",
        op: Op::SeqRead,
        block: 128 * 1024,
        depth: 8,
        queues: 1,
        against_host: false,
    },
];

/// What one timed run of a case measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CaseSample {
    iops: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_io: f64,
}

/// A backend process in its cgroup; fields drop in order, so the process is reaped before
/// its cgroup is removed.
struct RunningBackend {
    process: GuardedProcess,
    cgroup: CpuCgroup,
    socket: PathBuf,
}

impl Drop for RunningBackend {
    fn drop(&mut self) {
        let _ = self.process.terminate();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Sectors the guest-driven case writes and reads back (64 MiB).
const GUEST_SECTORS: u64 = 131_072;

/// What one guest-driven run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct GuestSample {
    wall_ms: f64,
    backend_cpu_ms: f64,
}

struct Setup {
    backend: PathBuf,
    vmm: PathBuf,
    guest: PathBuf,
    storage_daemon: PathBuf,
    fio: PathBuf,
    dir: ScratchDir,
    image: PathBuf,
}

fn run(config: &RunConfig) -> anyhow::Result<SuiteReport> {
    let setup = Setup::prepare()?;
    let mut rows = Vec::new();
    for case in CASES {
        let unit_rate = if case.op == Op::SeqRead {
            "MB/s"
        } else {
            "IOPS"
        };
        let mut rate = Samples::new(
            &format!(
                "{}_{}",
                case.name,
                unit_rate.to_lowercase().replace('/', "")
            ),
            unit_rate,
            Better::Higher,
        );
        let mut p50 = Samples::new(&format!("{}_p50", case.name), "us", Better::Lower);
        let mut p99 = Samples::new(&format!("{}_p99", case.name), "us", Better::Lower);
        let mut cpu = Samples::new(&format!("{}_cpu_per_io", case.name), "us", Better::Lower);
        let mut host = Samples::new(
            &format!("{}_iops_vs_host_io_uring", case.name),
            "IOPS",
            Better::Higher,
        );
        for round in 0..config.rounds {
            for side in round_order(round) {
                let s = setup
                    .measure(case, side)
                    .with_context(|| format!("case {} ({side:?})", case.name))?;
                rate.push(
                    side,
                    if case.op == Op::SeqRead {
                        s.mb_per_s
                    } else {
                        s.iops
                    },
                );
                p50.push(side, s.p50_us);
                p99.push(side, s.p99_us);
                cpu.push(side, s.cpu_us_per_io);
                if case.against_host && side == Side::Ferrovirt {
                    host.push(side, s.iops);
                }
            }
            if case.against_host {
                host.push(Side::Peer, setup.fio_iops(case)?);
            }
        }
        eprintln!("blk: case {} done", case.name);
        for samples in [&rate, &p50, &p99, &cpu] {
            rows.push(
                samples
                    .summarize("qemu-storage-daemon")
                    .context("no samples")?,
            );
        }
        if case.against_host {
            rows.push(
                host.summarize("host io_uring (fio)")
                    .context("no samples")?,
            );
        }
    }
    let mut guest_wall = Samples::new("guest_blk_64mib_write_verify_wall", "ms", Better::Lower);
    let mut guest_cpu = Samples::new("guest_blk_64mib_backend_cpu", "ms", Better::Lower);
    for round in 0..config.rounds {
        for side in round_order(round) {
            let g = setup
                .guest_run(side)
                .with_context(|| format!("guest-driven case ({side:?})"))?;
            guest_wall.push(side, g.wall_ms);
            guest_cpu.push(side, g.backend_cpu_ms);
        }
    }
    eprintln!("blk: guest-driven case done");
    for samples in [&guest_wall, &guest_cpu] {
        rows.push(
            samples
                .summarize("qemu-storage-daemon")
                .context("no samples")?,
        );
    }
    Ok(SuiteReport {
        suite: SUITE.name.to_string(),
        peer_name: "qemu-storage-daemon".into(),
        rounds: config.rounds,
        rows,
        goals: vec![
            Goal::ratio_at_least(
                "randread_4k_qd32_iops",
                1.5,
                "≥ 1.5× qemu-storage-daemon's IOPS, 4k randread QD32",
            ),
            Goal::ratio_at_least(
                "randwrite_4k_qd32_iops",
                1.5,
                "≥ 1.5× qemu-storage-daemon's IOPS, 4k randwrite QD32",
            ),
            Goal::ratio_at_least(
                "randread_4k_qd32_iops_vs_host_io_uring",
                0.9,
                "≥ 0.9× the host's io_uring IOPS, 4k randread QD32",
            ),
        ],
        notes: setup.notes(),
    })
}

impl Setup {
    fn prepare() -> anyhow::Result<Setup> {
        let backend =
            ferrovirt_tests::try_vhost_blk_binary().context("blk runs ferrovirt-vhost-blk")?;
        let vmm = ferrovirt_tests::try_vmm_binary()
            .context("the guest-driven case runs ferrovirt-vmm")?;
        let guest = ferrovirt_tests::try_testguest()
            .context("the guest-driven case boots the test guest")?;
        let storage_daemon = crate::find_in_path("qemu-storage-daemon").context(
            "the peer is qemu-storage-daemon: apt-get install qemu-system-x86 (scripts/setup.sh)",
        )?;
        let fio = crate::find_in_path("fio")
            .context("the host limit is measured with fio: apt-get install fio")?;
        let dir = ScratchDir::new("bench-blk")?;
        let image = dir.join("disk.img");
        write_image(&image, IMAGE_MIB << 20)?;
        Ok(Setup {
            backend,
            vmm,
            guest,
            storage_daemon,
            fio,
            dir,
            image,
        })
    }

    fn notes(&self) -> Vec<String> {
        vec![
            format!("ferrovirt: `ferrovirt-vhost-blk --image IMG --socket SOCK --direct --num-queues Q` on a {IMAGE_MIB} MiB image."),
            "peer: `qemu-storage-daemon --blockdev driver=file,filename=IMG,aio=io_uring,cache.direct=on,node-name=d --export type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=SOCK,writable=on,num-queues=Q`.".into(),
            format!("driver: the `blkio` crate (libblkio virtio-blk-vhost-user), one thread per queue, the given depth per queue, {} ms per run; latency is submission to completion as the driver sees it.", RUN_TIME.as_millis()),
            "cpu_per_io: the backend's CPU (cpuacct cgroup) during the timed run / completed I/Os.".into(),
            format!(
                "guest_blk_*: ferrovirt-vmm boots the test guest (`scenario=blk blk_sectors={GUEST_SECTORS} \
                 blk_req=64 blk_depth=8`: writes 64 MiB in 32 KiB requests, 8 in flight, flushes, reads \
                 back and verifies) with one `--disk` on the backend under test; wall is the host's time \
                 from VMM start to exit (boot included, ~10 ms), CPU is the backend's."
            ),
            format!("host limit: `fio --direct=1 --ioengine=io_uring --bs=4k --iodepth=32 --rw=randread|randwrite` on the same image for {} ms.", RUN_TIME.as_millis()),
        ]
    }

    /// Starts `side`'s backend with `queues` queues in a cgroup of its own and waits until
    /// it listens.
    fn start_backend(&self, side: Side, queues: usize) -> anyhow::Result<RunningBackend> {
        let socket = self
            .dir
            .join(format!("{}.sock", ferrovirt_tests::unique_name("b")));
        let mut cmd = match side {
            Side::Ferrovirt => {
                let mut cmd = Command::new(&self.backend);
                cmd.arg("--image")
                    .arg(&self.image)
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--direct")
                    .arg("--num-queues")
                    .arg(queues.to_string());
                cmd
            }
            Side::Peer => {
                let mut cmd = Command::new(&self.storage_daemon);
                cmd.arg("--blockdev")
                    .arg(format!(
                        "driver=file,filename={},aio=io_uring,cache.direct=on,node-name=d",
                        self.image.display()
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                        socket.display()
                    ));
                cmd
            }
        };
        let cgroup = CpuCgroup::create("blk")?;
        cgroup.run_inside(&mut cmd);
        let mut process = GuardedProcess::spawn(
            cmd,
            &socket.with_extension("out"),
            &socket.with_extension("err"),
        )?;
        process.wait_for_socket(&socket, STEP_TIMEOUT)?;
        Ok(RunningBackend {
            process,
            cgroup,
            socket,
        })
    }

    /// Starts `side`'s backend for `case`, drives it for RUN_TIME, stops it.
    fn measure(&self, case: &Case, side: Side) -> anyhow::Result<CaseSample> {
        let backend = self.start_backend(side, case.queues)?;
        drive(&backend.socket, case, &backend.cgroup)
    }

    /// The test guest writes, reads back and verifies GUEST_SECTORS through ferrovirt-vmm
    /// and `side`'s backend; the host times the whole VMM run.
    fn guest_run(&self, side: Side) -> anyhow::Result<GuestSample> {
        let backend = self.start_backend(side, 1)?;
        let cpu_before = backend.cgroup.usage_ns()?;
        let mut cmd = Command::new(&self.vmm);
        cmd.arg("--kernel")
            .arg(&self.guest)
            .args(["--memory", "256", "--serial", "off", "--cmdline"])
            .arg(format!(
                "scenario=blk blk_seed=3 blk_sectors={GUEST_SECTORS} blk_req=64 blk_depth=8"
            ))
            .arg("--disk")
            .arg(format!("socket={}", backend.socket.display()));
        let vmm_out = backend.socket.with_extension("vmm");
        let start = Instant::now();
        let mut vmm = GuardedProcess::spawn(cmd, &vmm_out, &vmm_out.with_extension("vmm-err"))?;
        let exit = vmm.wait_timeout(STEP_TIMEOUT)?;
        let wall = start.elapsed();
        if exit.status.code() != Some(0) {
            bail!(
                "the guest's blk run failed ({}): {}",
                exit.status,
                vmm.stderr()
            );
        }
        let cpu_ns = backend.cgroup.usage_ns()? - cpu_before;
        Ok(GuestSample {
            wall_ms: wall.as_secs_f64() * 1e3,
            backend_cpu_ms: cpu_ns as f64 / 1e6,
        })
    }

    fn fio_iops(&self, case: &Case) -> anyhow::Result<f64> {
        let rw = match case.op {
            Op::RandRead => "randread",
            Op::RandWrite => "randwrite",
            Op::SeqRead => "read",
        };
        let output = Command::new(&self.fio)
            .args([
                "--name=limit",
                "--direct=1",
                "--ioengine=io_uring",
                "--time_based",
                "--output-format=json",
            ])
            .arg(format!("--filename={}", self.image.display()))
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={}", case.block))
            .arg(format!("--iodepth={}", case.depth))
            .arg(format!("--runtime={}ms", RUN_TIME.as_millis()))
            .output()
            .context("cannot run fio")?;
        if !output.status.success() {
            bail!("fio failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let json: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("fio's JSON")?;
        let job = &json["jobs"][0];
        let iops = job["read"]["iops"].as_f64().unwrap_or(0.0)
            + job["write"]["iops"].as_f64().unwrap_or(0.0);
        Ok(iops)
    }
}

/// Drives the backend on `socket` with `case` for RUN_TIME from one thread per queue.
fn drive(socket: &Path, case: &Case, cgroup: &CpuCgroup) -> anyhow::Result<CaseSample> {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").context("blkio driver")?;
    blkio.set_str("path", &socket.to_string_lossy())?;
    blkio.connect().context("connect to the backend")?;
    blkio.set_i32("num-queues", case.queues as i32)?;
    let capacity = blkio.get_u64("capacity")?;
    let started = blkio.start().context("start the frontend")?;
    let per_queue = case.depth * case.block;
    let region = blkio.alloc_mem_region(per_queue * case.queues)?;
    blkio.map_mem_region(&region)?;
    // libblkio does not wait for the backend to apply the new region before the first kick
    // (see vhost-blk/tests/blkio_frontend.rs); give the backend's vhost-user thread a moment.
    std::thread::sleep(Duration::from_millis(20));
    let cpu_before = cgroup.usage_ns()?;
    let end = Instant::now() + RUN_TIME;
    let results: Vec<anyhow::Result<(u64, Vec<u32>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let base = region.addr + i * per_queue;
                let seed = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
                scope.spawn(move || run_queue(q, base, case, capacity, end, seed, i))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let cpu_ns = cgroup.usage_ns()? - cpu_before;
    let elapsed = RUN_TIME.as_secs_f64();
    let mut ios = 0u64;
    let mut latencies = Vec::new();
    for r in results {
        let (n, mut l) = r?;
        ios += n;
        latencies.append(&mut l);
    }
    if ios == 0 {
        bail!("no I/O completed");
    }
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Ok(CaseSample {
        iops: ios as f64 / elapsed,
        mb_per_s: ios as f64 * case.block as f64 / elapsed / 1e6,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu_us_per_io: cpu_ns as f64 / 1000.0 / ios as f64,
    })
}

/// Keeps `case.depth` requests in flight on `q` until `end`; returns completed I/Os and
/// their latencies in ns.
fn run_queue(
    mut q: Blkioq,
    base: usize,
    case: &Case,
    capacity: u64,
    end: Instant,
    mut seed: u64,
    index: usize,
) -> anyhow::Result<(u64, Vec<u32>)> {
    let blocks = capacity / case.block as u64;
    // Sequential streams start at a different place per queue.
    let mut next_seq = (index as u64 * blocks / 2) % blocks;
    let mut offset = |seed: &mut u64| -> u64 {
        let block = if case.op == Op::SeqRead {
            next_seq = (next_seq + 1) % blocks;
            next_seq
        } else {
            // xorshift64: cheap, and the same sequence for both sides.
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed % blocks
        };
        block * case.block as u64
    };
    let mut submitted_at = vec![Instant::now(); case.depth];
    let submit = |q: &mut Blkioq, slot: usize, at: u64| {
        let buf = (base + slot * case.block) as *mut u8;
        match case.op {
            Op::RandRead | Op::SeqRead => q.read(at, buf, case.block, slot, ReqFlags::empty()),
            Op::RandWrite => q.write(at, buf, case.block, slot, ReqFlags::empty()),
        }
    };
    for (slot, at_time) in submitted_at.iter_mut().enumerate() {
        *at_time = Instant::now();
        let at = offset(&mut seed);
        submit(&mut q, slot, at);
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..case.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut in_flight = case.depth;
    let mut done = 0u64;
    while in_flight > 0 {
        let n = q.do_io(&mut completions, 1, None, None).context("do_io")?;
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                bail!("request failed: {}", c.ret);
            }
            let slot = c.user_data;
            latencies.push(
                now.duration_since(submitted_at[slot])
                    .as_nanos()
                    .min(u32::MAX as u128) as u32,
            );
            done += 1;
            if now < end {
                submitted_at[slot] = now;
                let at = offset(&mut seed);
                submit(&mut q, slot, at);
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok((done, latencies))
}

/// A raw image of `bytes` filled with data, so that reads hit allocated blocks.
fn write_image(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut at = 0;
    while at < bytes {
        file.write_all_at(&chunk, at)?;
        at += chunk.len() as u64;
    }
    file.sync_all()?;
    Ok(())
}
