//! Suite `vmm-startup`: how fast and how cheaply a VMM gets to its API and to the guest's
//! first instruction, ferrovirt against QEMU's microvm machine.
//!
//! The test guest's `scenario=exit` writes one byte to port 0xE9 as its first instruction and
//! then 0 to port 0xF4 (debug-exit), so one boot run gives the wall time to guest entry, and
//! the whole run's CPU time and peak RSS bound what a VMM spends before the guest runs.
//! A second run per round boots `scenario=ticker` (a guest that keeps running) to read, at
//! the moment the first byte arrives, the CPU time the VMM has used, all its threads
//! included (a cpuacct cgroup per run), and a moment later its resident memory outside guest
//! RAM (`/proc/PID/smaps`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrovirt_tests::{GuardedProcess, ProcessExit, ScratchDir};

use super::{RunConfig, Suite};
use crate::cpu::CpuCgroup;
use crate::report::SuiteReport;
use crate::stats::{Better, Goal, Samples, Side, round_order, summarize_all};

pub const SUITE: Suite = Suite {
    name: "vmm-startup",
    about: "process start to API socket and to the guest's first instruction; CPU and RSS of a boot",
    run,
};

/// Both VMMs get the same guest memory size.
const MEMORY_MIB: u32 = 256;
/// One boot or API start far beyond this is a hang, not a slow sample.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the API socket is tried while a VMM starts.
const CONNECT_POLL: Duration = Duration::from_micros(200);
/// QEMU's isa-debug-exit turns guest value v into exit status (v << 1) | 1.
const QEMU_EXIT_OK: i32 = 1;
const FERROVIRT_EXIT_OK: i32 = 0;

/// The binaries and the peer's exact shape, found once per run.
#[derive(Debug, Clone)]
struct Setup {
    vmm: PathBuf,
    guest: PathBuf,
    qemu: PathBuf,
    /// `host`, or `host,-arch-capabilities` where nested KVM refuses that MSR.
    qemu_cpu: String,
    peer_name: String,
}

/// What one boot-to-exit run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BootSample {
    first_instruction_ms: f64,
    wall_ms: f64,
    cpu_ms: f64,
    peak_rss_mib: f64,
}

/// Which API start is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiStart {
    /// ferrovirt with `--api-socket` only.
    Ferrovirt,
    /// QEMU's whole microvm command, paused (`-S`), with a QMP socket.
    QemuPausedMicrovm,
    /// QEMU with no machine at all (`-M none -S`), with a QMP socket.
    QemuNoMachine,
}

fn run(config: &RunConfig) -> anyhow::Result<SuiteReport> {
    let setup = Setup::discover()?;
    // One untimed run each: fills the page cache and fails early with a clear message.
    boot(&setup, Side::Ferrovirt).context("ferrovirt warm-up boot")?;
    boot(&setup, Side::Peer).context("QEMU warm-up boot")?;

    let mut api = Samples::new("api_ready_vs_bare_qemu", "ms", Better::Lower);
    let mut api_paused = Samples::new("api_ready_vs_paused_microvm", "ms", Better::Lower);
    let mut first = Samples::new("first_guest_instruction", "ms", Better::Lower);
    let mut wall = Samples::new("boot_to_exit_wall", "ms", Better::Lower);
    let mut cpu = Samples::new("boot_to_exit_cpu", "ms", Better::Lower);
    let mut rss = Samples::new("peak_rss", "MiB", Better::Lower);
    let mut entry_cpu = Samples::new("cpu_to_first_instruction", "ms", Better::Lower);
    let mut overhead = Samples::new("rss_overhead", "MiB", Better::Lower);
    let mut private = Samples::new("private_dirty_overhead", "MiB", Better::Lower);
    for round in 0..config.rounds {
        for side in round_order(round) {
            match side {
                Side::Ferrovirt => {
                    let ms = api_ready(&setup, ApiStart::Ferrovirt)?;
                    api.push(side, ms);
                    api_paused.push(side, ms);
                }
                Side::Peer => {
                    api.push(side, api_ready(&setup, ApiStart::QemuNoMachine)?);
                    api_paused.push(side, api_ready(&setup, ApiStart::QemuPausedMicrovm)?);
                }
            }
            let sample = boot(&setup, side)?;
            first.push(side, sample.first_instruction_ms);
            wall.push(side, sample.wall_ms);
            cpu.push(side, sample.cpu_ms);
            rss.push(side, sample.peak_rss_mib);
            let running = running_guest(&setup, side)?;
            entry_cpu.push(side, running.cpu_to_entry_ms);
            overhead.push(side, running.rss_overhead_mib);
            private.push(side, running.private_dirty_mib);
        }
        eprintln!("vmm-startup: round {}/{} done", round + 1, config.rounds);
    }
    let rows = summarize_all(
        &[
            api, api_paused, first, entry_cpu, wall, cpu, rss, overhead, private,
        ],
        &setup.peer_name,
    )?;
    Ok(SuiteReport {
        suite: SUITE.name.to_string(),
        peer_name: setup.peer_name.clone(),
        rounds: config.rounds,
        rows,
        goals: vec![
            Goal::at_most(
                "cpu_to_first_instruction",
                5.0,
                "≤ 5 CPU ms to guest entry (all threads, read when the first byte arrives)",
            ),
            Goal::at_most(
                "rss_overhead",
                3.0,
                "≤ 3 MiB VMM overhead (RSS minus the guest RAM mapping's resident pages)",
            ),
        ],
        notes: notes(&setup),
    })
}

fn notes(setup: &Setup) -> Vec<String> {
    vec![
        format!(
            "ferrovirt boot: `ferrovirt-vmm --kernel <testguest> --cmdline scenario=exit --memory {MEMORY_MIB} --serial off --debugcon <fifo>`"
        ),
        format!(
            "QEMU boot: `qemu-system-x86_64 {}`",
            qemu_boot_args(setup, Path::new("<fifo>"), "exit")
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        "api_ready_*: wall time from spawn until the control socket answers: for ferrovirt \
         (`--api-socket` only, no VM) the first HTTP status line of `GET /api/v1/vmm.ping` \
         (any status counts); for QEMU the QMP greeting. Peer `bare_qemu` is `-M none -S -qmp` \
         (no machine, the closest to ferrovirt's empty API server); peer `paused_microvm` is the \
         QEMU boot command plus `-S -qmp`, i.e. the machine built but not started."
            .to_string(),
        "first_guest_instruction: wall time from spawn until the guest's first byte to port 0xE9 \
         arrives on a FIFO (QEMU `-debugcon file:<fifo>`)."
            .to_string(),
        "boot_to_exit_*: the same run until the VMM exits through debug-exit; CPU is user+sys \
         from wait4's rusage, all threads included."
            .to_string(),
        format!(
            "peak_rss: ru_maxrss of that run, with {MEMORY_MIB} MiB guest memory on both sides; \
             reported whole as the upper bound of the VMM's own overhead."
        ),
        "cpu_to_first_instruction: a `scenario=ticker` run in a cpuacct cgroup of its own \
         (joined before exec); `cpuacct.usage` when the first 0xE9 byte arrives, so every \
         thread counts, also those that have already ended. Both sides include the few hundred \
         microseconds of guest ring-3 work between the byte and the read."
            .to_string(),
        format!(
            "rss_overhead, private_dirty_overhead: the same run {SETTLE_MS} ms after guest entry, \
             from /proc/PID/smaps: Rss (resp. Private_Dirty) of every mapping except guest RAM \
             (mappings of at least {MEMORY_MIB} MiB). Rss counts shared library pages too; \
             Private_Dirty is what each further VM really costs."
        ),
        format!("QEMU runs with `-cpu {}`.", setup.qemu_cpu),
    ]
}

impl Setup {
    fn discover() -> anyhow::Result<Setup> {
        let guest = ferrovirt_tests::try_testguest()
            .context("vmm-startup boots the test guest (scenario=exit)")?;
        let vmm = ferrovirt_tests::try_vmm_binary().context("vmm-startup runs ferrovirt-vmm")?;
        // Freshly linked binaries sit in the page cache as dirty pages, which smaps counts
        // as the process's Private_Dirty until they are written back.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let qemu = crate::find_in_path("qemu-system-x86_64").context(
            "qemu-system-x86_64 is not on PATH: install Debian's qemu-system-x86 (scripts/setup.sh does)",
        )?;
        let mut setup = Setup {
            vmm,
            guest,
            qemu,
            qemu_cpu: "host".into(),
            peer_name: String::new(),
        };
        setup.peer_name = format!("QEMU {} microvm", qemu_version(&setup.qemu)?);
        setup.qemu_cpu = pick_qemu_cpu(&setup)?;
        Ok(setup)
    }
}

/// `-cpu host` as asked; under nested KVM, QEMU 7.2 aborts setting IA32_ARCH_CAPABILITIES
/// ("failed to set MSR 0x10a"), and then the same CPU without that MSR is used.
fn pick_qemu_cpu(setup: &Setup) -> anyhow::Result<String> {
    let mut first_error = None;
    for cpu in ["host", "host,-arch-capabilities"] {
        let trial = Setup {
            qemu_cpu: cpu.to_string(),
            ..setup.clone()
        };
        match boot(&trial, Side::Peer) {
            Ok(_) => return Ok(cpu.to_string()),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error
        .unwrap_or_else(|| anyhow::anyhow!("no CPU model tried"))
        .context("QEMU cannot boot the test guest with -cpu host nor host,-arch-capabilities"))
}

fn qemu_version(qemu: &Path) -> anyhow::Result<String> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(parse_qemu_version(&text).unwrap_or_else(|| "(unknown version)".into()))
}

/// "QEMU emulator version 7.2.22 (Debian ...)" -> "7.2.22".
fn parse_qemu_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let rest = line.split("version").nth(1)?;
    rest.split_whitespace().next().map(str::to_string)
}

fn ferrovirt_boot_args(setup: &Setup, debugcon: &Path, scenario: &str) -> Vec<std::ffi::OsString> {
    vec![
        "--kernel".into(),
        setup.guest.clone().into(),
        "--cmdline".into(),
        format!("scenario={scenario}").into(),
        "--memory".into(),
        MEMORY_MIB.to_string().into(),
        "--serial".into(),
        "off".into(),
        "--debugcon".into(),
        debugcon.into(),
    ]
}

fn qemu_machine_args(setup: &Setup, scenario: &str) -> Vec<std::ffi::OsString> {
    let memory = MEMORY_MIB.to_string();
    let mut args: Vec<std::ffi::OsString> = [
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        &setup.qemu_cpu,
        "-m",
        &memory,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-display",
        "none",
        "-serial",
        "none",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.push(setup.guest.clone().into());
    args.push("-append".into());
    args.push(format!("scenario={scenario}").into());
    args
}

fn qemu_boot_args(setup: &Setup, debugcon: &Path, scenario: &str) -> Vec<std::ffi::OsString> {
    let mut args = qemu_machine_args(setup, scenario);
    let mut chardev = std::ffi::OsString::from("file:");
    chardev.push(debugcon);
    args.push("-debugcon".into());
    args.push(chardev);
    args
}

/// One boot-to-exit run of `side`.
fn boot(setup: &Setup, side: Side) -> anyhow::Result<BootSample> {
    let dir = ScratchDir::new("bench-boot")?;
    let fifo = dir.join("debugcon");
    make_fifo(&fifo)?;
    // Opened before the VMM starts, non-blocking, so the VMM's open for writing never waits.
    let mut reader = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .with_context(|| format!("cannot open FIFO {}", fifo.display()))?;
    let (mut cmd, expected) = match side {
        Side::Ferrovirt => {
            let mut cmd = Command::new(&setup.vmm);
            cmd.args(ferrovirt_boot_args(setup, &fifo, "exit"));
            (cmd, FERROVIRT_EXIT_OK)
        }
        Side::Peer => {
            let mut cmd = Command::new(&setup.qemu);
            cmd.args(qemu_boot_args(setup, &fifo, "exit"));
            (cmd, QEMU_EXIT_OK)
        }
    };
    cmd.current_dir(dir.path());
    let start = Instant::now();
    let mut process = GuardedProcess::spawn(cmd, &dir.join("stdout"), &dir.join("stderr"))?;
    let first = wait_for_first_byte(&reader, &mut process)?;
    let exit = process
        .wait_timeout(STEP_TIMEOUT)
        .map_err(|e| failure(&process, &format!("the guest did not exit: {e}")))?;
    let wall = start.elapsed();
    check_exit(&process, &exit, expected)?;
    let mut bytes = Vec::new();
    // The writer has exited, so this read ends at EOF (or WouldBlock if never opened).
    let _ = reader.read_to_end(&mut bytes);
    if bytes.is_empty() {
        return Err(failure(&process, "no byte arrived on port 0xE9"));
    }
    Ok(BootSample {
        first_instruction_ms: ms(first.duration_since(start)),
        wall_ms: ms(wall),
        cpu_ms: ms(exit.cpu_time()),
        peak_rss_mib: exit.max_rss_kib as f64 / 1024.0,
    })
}

/// How long after guest entry the memory of a running VMM is read.
const SETTLE_MS: u64 = 200;

/// What a VMM running a guest that never exits cost.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RunningSample {
    cpu_to_entry_ms: f64,
    rss_overhead_mib: f64,
    private_dirty_mib: f64,
}

/// Boots `scenario=ticker` on `side`, reads its CPU time at guest entry and its memory
/// shortly after, then stops it.
fn running_guest(setup: &Setup, side: Side) -> anyhow::Result<RunningSample> {
    let dir = ScratchDir::new("bench-running")?;
    let fifo = dir.join("debugcon");
    make_fifo(&fifo)?;
    let reader = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .with_context(|| format!("cannot open FIFO {}", fifo.display()))?;
    let mut cmd = match side {
        Side::Ferrovirt => {
            let mut cmd = Command::new(&setup.vmm);
            cmd.args(ferrovirt_boot_args(setup, &fifo, "ticker"));
            cmd
        }
        Side::Peer => {
            let mut cmd = Command::new(&setup.qemu);
            cmd.args(qemu_boot_args(setup, &fifo, "ticker"));
            cmd
        }
    };
    cmd.current_dir(dir.path());
    // Declared before the process: dropped (removed) after it has been reaped.
    let cgroup = CpuCgroup::create("startup")?;
    cgroup.run_inside(&mut cmd);
    let mut process = GuardedProcess::spawn(cmd, &dir.join("stdout"), &dir.join("stderr"))?;
    wait_for_first_byte(&reader, &mut process)?;
    let cpu_ns = cgroup.usage_ns()?;
    let pid = process.pid();
    std::thread::sleep(Duration::from_millis(SETTLE_MS));
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| failure(&process, &format!("cannot read its smaps: {e}")))?;
    let memory = vmm_memory(&smaps, u64::from(MEMORY_MIB) * 1024);
    process
        .kill()
        .map_err(|e| failure(&process, &format!("cannot stop it: {e}")))?;
    Ok(RunningSample {
        cpu_to_entry_ms: cpu_ns as f64 / 1e6,
        rss_overhead_mib: memory.rss_kib as f64 / 1024.0,
        private_dirty_mib: memory.private_dirty_kib as f64 / 1024.0,
    })
}

/// Resident memory of a VMM outside its guest RAM, in KiB.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct VmmMemory {
    rss_kib: u64,
    private_dirty_kib: u64,
}

/// Sums `Rss` and `Private_Dirty` over the mappings of an smaps text, leaving out those of
/// at least `guest_kib` (guest RAM: ferrovirt's memfd, QEMU's anonymous RAM block).
fn vmm_memory(smaps: &str, guest_kib: u64) -> VmmMemory {
    let mut total = VmmMemory::default();
    let mut is_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(key), Some(value)) = (fields.next(), fields.next()) else {
            continue;
        };
        let kib = value.parse::<u64>().unwrap_or(0);
        match key {
            "Size:" => is_guest = kib >= guest_kib,
            "Rss:" if !is_guest => total.rss_kib += kib,
            "Private_Dirty:" if !is_guest => total.private_dirty_kib += kib,
            _ => {}
        }
    }
    total
}

/// Polls the FIFO until it is readable, watching the process so a crash ends the wait.
fn wait_for_first_byte(fifo: &File, process: &mut GuardedProcess) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let mut pfd = libc::pollfd {
            fd: fifo.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, 20) };
        let now = Instant::now();
        if n > 0 && pfd.revents & libc::POLLIN != 0 {
            return Ok(now);
        }
        if n > 0 && pfd.revents & libc::POLLHUP != 0 {
            return Err(failure(
                process,
                "the VMM closed the debug console without writing to port 0xE9",
            ));
        }
        if let Some(exit) = process.try_exit()? {
            return Err(failure(
                process,
                &format!(
                    "it exited ({}) before the guest wrote to port 0xE9",
                    exit.status
                ),
            ));
        }
        if now >= deadline {
            return Err(failure(
                process,
                &format!("no byte on port 0xE9 within {STEP_TIMEOUT:?}"),
            ));
        }
    }
}

/// Spawn to "the control socket answers", in ms; the process is stopped afterwards.
fn api_ready(setup: &Setup, which: ApiStart) -> anyhow::Result<f64> {
    let dir = ScratchDir::new("bench-api")?;
    let socket = dir.join("api.sock");
    let mut qmp = std::ffi::OsString::from("unix:");
    qmp.push(&socket);
    qmp.push(",server=on,wait=off");
    let mut cmd;
    match which {
        ApiStart::Ferrovirt => {
            cmd = Command::new(&setup.vmm);
            cmd.arg("--api-socket").arg(&socket);
        }
        ApiStart::QemuPausedMicrovm => {
            cmd = Command::new(&setup.qemu);
            cmd.args(qemu_machine_args(setup, "exit"))
                .arg("-S")
                .arg("-qmp")
                .arg(&qmp);
        }
        ApiStart::QemuNoMachine => {
            cmd = Command::new(&setup.qemu);
            cmd.args([
                "-M",
                "none",
                "-enable-kvm",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-S",
                "-qmp",
            ])
            .arg(&qmp);
        }
    }
    cmd.current_dir(dir.path());
    let start = Instant::now();
    let mut process = GuardedProcess::spawn(cmd, &dir.join("stdout"), &dir.join("stderr"))?;
    let deadline = start + STEP_TIMEOUT;
    loop {
        if let Ok(stream) = UnixStream::connect(&socket) {
            let answered = match which {
                ApiStart::Ferrovirt => http_answers(stream),
                _ => qmp_greets(stream),
            };
            if answered {
                let elapsed = start.elapsed();
                // Stop it now rather than at drop: it must not overlap the next sample.
                process.set_grace(Duration::from_secs(2));
                let _ = process.terminate();
                return Ok(ms(elapsed));
            }
        }
        if let Some(exit) = process.try_exit()? {
            return Err(failure(
                &process,
                &format!("it exited ({}) before its API socket answered", exit.status),
            ));
        }
        if Instant::now() >= deadline {
            return Err(failure(
                &process,
                &format!("its API socket did not answer within {STEP_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(CONNECT_POLL);
    }
}

/// Whether the server sends an HTTP status line for a ping.
fn http_answers(mut stream: UnixStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = ferrovirt_tests::http::encode_request("GET", "/api/v1/vmm.ping", None);
    if stream.write_all(&request).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64];
    while buf.len() < 8 {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.starts_with(b"HTTP/1.")
}

/// Whether QEMU's QMP greeting (a JSON object) starts arriving.
fn qmp_greets(mut stream: UnixStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(1) if byte[0] == b'{')
}

fn check_exit(process: &GuardedProcess, exit: &ProcessExit, expected: i32) -> anyhow::Result<()> {
    if exit.status.code() == Some(expected) {
        Ok(())
    } else {
        Err(failure(
            process,
            &format!(
                "it exited with {} where a clean scenario=exit gives code {expected}",
                exit.status
            ),
        ))
    }
}

/// An error naming the program and ending with its stderr.
fn failure(process: &GuardedProcess, what: &str) -> anyhow::Error {
    let stderr = process.stderr();
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    anyhow::anyhow!(
        "{} (pid {}): {what}; its stderr ends with:\n{tail}",
        process.program(),
        process.pid()
    )
}

fn make_fifo(path: &Path) -> anyhow::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .context("FIFO path contains a NUL byte")?;
    // SAFETY: a valid NUL-terminated path and a mode; no memory is shared.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        bail!(
            "cannot create FIFO {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit ELF with a Xen PVH note whose 32-bit entry does what `scenario=exit` does:
    /// `mov al, '!'; out 0xE9, al; xor al, al; out 0xF4, al; hlt`.
    fn exit_guest_elf() -> Vec<u8> {
        const ENTRY: u64 = 0x10_0000;
        let code: &[u8] = &[
            0xb0, 0x21, 0xe6, 0xe9, 0x30, 0xc0, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd,
        ];
        let mut note = Vec::new();
        for v in [4u32, 4, 18] {
            note.extend_from_slice(&v.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(ENTRY as u32).to_le_bytes());
        let note_off = 64 + 2 * 56;
        let code_off = 0x100usize;
        let mut elf = vec![0u8; code_off];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little endian
        elf[6] = 1; // version
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&ENTRY.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        let mut phdr = |i: usize, ty: u32, flags: u32, off: usize, addr: u64, size: usize| {
            let p = 64 + i * 56;
            elf[p..p + 4].copy_from_slice(&ty.to_le_bytes());
            elf[p + 4..p + 8].copy_from_slice(&flags.to_le_bytes());
            elf[p + 8..p + 16].copy_from_slice(&(off as u64).to_le_bytes());
            elf[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes());
            elf[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes());
            elf[p + 32..p + 40].copy_from_slice(&(size as u64).to_le_bytes());
            elf[p + 40..p + 48].copy_from_slice(&(size as u64).to_le_bytes());
            elf[p + 48..p + 56].copy_from_slice(&4u64.to_le_bytes());
        };
        phdr(0, 1, 5, code_off, ENTRY, code.len()); // PT_LOAD, R+X
        phdr(1, 4, 4, note_off, 0, note.len()); // PT_NOTE
        elf[note_off..note_off + note.len()].copy_from_slice(&note);
        elf.extend_from_slice(code);
        elf
    }

    fn qemu_setup(dir: &ScratchDir) -> Setup {
        let guest = dir.join("guest.elf");
        std::fs::write(&guest, exit_guest_elf()).unwrap();
        let qemu = crate::find_in_path("qemu-system-x86_64")
            .expect("qemu-system-x86_64 missing: run scripts/setup.sh");
        let mut setup = Setup {
            vmm: PathBuf::from("/bin/false"),
            guest,
            qemu,
            qemu_cpu: String::new(),
            peer_name: String::new(),
        };
        setup.qemu_cpu = pick_qemu_cpu(&setup).unwrap_or_else(|e| panic!("{e:#}"));
        setup
    }

    #[test]
    fn qemu_boot_of_a_tiny_pvh_guest_is_measured() {
        let dir = ScratchDir::new("bench_qemu_boot").unwrap();
        let setup = qemu_setup(&dir);
        let s = boot(&setup, Side::Peer).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            s.first_instruction_ms > 0.0 && s.first_instruction_ms <= s.wall_ms,
            "{s:?}"
        );
        assert!(s.cpu_ms > 0.0, "{s:?}");
        assert!(s.peak_rss_mib > 1.0, "{s:?}");
    }

    #[test]
    fn qemu_api_sockets_are_measured() {
        let dir = ScratchDir::new("bench_qemu_api").unwrap();
        let setup = qemu_setup(&dir);
        for which in [ApiStart::QemuNoMachine, ApiStart::QemuPausedMicrovm] {
            let ms = api_ready(&setup, which).unwrap_or_else(|e| panic!("{which:?}: {e:#}"));
            assert!(ms > 0.0 && ms < STEP_TIMEOUT.as_secs_f64() * 1000.0);
        }
    }

    #[test]
    fn a_vmm_that_exits_at_once_fails_with_its_stderr() {
        let dir = ScratchDir::new("bench_bad_vmm").unwrap();
        let script = dir.join("vmm.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'cannot open /dev/kvm' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let setup = Setup {
            vmm: script,
            guest: dir.join("guest.elf"),
            qemu: PathBuf::from("/bin/false"),
            qemu_cpu: "host".into(),
            peer_name: "QEMU".into(),
        };
        let err = format!("{:#}", boot(&setup, Side::Ferrovirt).unwrap_err());
        assert!(err.contains("before the guest wrote to port 0xE9"), "{err}");
        assert!(err.contains("cannot open /dev/kvm"), "{err}");
        let err = format!("{:#}", api_ready(&setup, ApiStart::Ferrovirt).unwrap_err());
        assert!(err.contains("before its API socket answered"), "{err}");
    }

    #[test]
    fn guest_ram_mappings_are_left_out_of_the_vmm_memory() {
        let smaps = "\
00400000-00500000 r-xp 00000000 fe:00 1 /usr/bin/vmm
Size:               1024 kB
Rss:                 600 kB
Private_Dirty:        40 kB
7f0000000000-7f0010000000 rw-s 00000000 00:01 2 /memfd:ferrovirt-guest-ram (deleted)
Size:             262144 kB
Rss:                  96 kB
Private_Dirty:        96 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
Size:                132 kB
Rss:                  28 kB
Private_Dirty:        28 kB
";
        assert_eq!(
            vmm_memory(smaps, 256 * 1024),
            VmmMemory {
                rss_kib: 628,
                private_dirty_kib: 68
            }
        );
    }

    #[test]
    fn qemu_version_is_read_from_its_banner() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"
            )
            .as_deref(),
            Some("7.2.22")
        );
        assert_eq!(parse_qemu_version("garbage"), None);
    }
}
