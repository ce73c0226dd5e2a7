//! ferrovirt-vmm: runs one KVM virtual machine per process.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use ferrovirt_runtime::config::{
    ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig, RngConfig,
    VmConfig,
};
use ferrovirt_runtime::vmm::{self, VmmOptions, exit_status};

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    the guest powered off (ACPI S5) or wrote 0 to the debug-exit port (0xf4)
  1    the VMM failed (the reason is printed on stderr)
  2    bad command line
  3    the guest reset itself (i8042 reset); restarting is the supervisor's job
  4    the guest crashed (triple fault, failed entry, KVM internal error)
  N    the guest wrote N to the debug-exit port (0xf4)
  128+N  stopped by signal N (SIGTERM, SIGINT, SIGHUP): the VM was torn down and the
       sockets removed

Environment:
  FERROVIRT_LOG  log level on stderr: error, warn (default), info, debug, trace";

/// Runs one KVM virtual machine: boots a Linux kernel (ELF vmlinux with or without a PVH
/// note, or bzImage) directly, with a serial console, virtio-pci devices and a REST API.
#[derive(Debug, Parser)]
#[command(name = "ferrovirt-vmm", version, after_help = EXIT_STATUS_HELP)]
struct Args {
    /// Kernel to boot: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs loaded at the top of low memory.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"].
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u16,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    memory: u64,
    /// Back guest RAM with 2 MiB hugetlbfs pages (reserve them first).
    #[arg(long)]
    hugepages: bool,
    /// Serial console: tty (stdout), off, file=PATH or socket=PATH.
    #[arg(long, default_value = "tty", value_name = "MODE", value_parser = parse_console)]
    serial: ConsoleConfig,
    /// Add a virtio-rng device fed from src=PATH [default src: /dev/urandom].
    #[arg(long, value_name = "src=PATH", num_args = 0..=1, default_missing_value = "", value_parser = parse_rng)]
    rng: Option<RngConfig>,
    /// Add a virtio-blk disk served by the vhost-user-blk backend listening on socket=PATH
    /// (ferrovirt-vhost-blk, qemu-storage-daemon). Repeat for more disks.
    #[arg(long, value_name = "socket=PATH", value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// Add a virtio-net interface served by the vhost-user-net backend listening on
    /// socket=PATH (DPDK vhost PMD, a vhost-user switch). mac=MAC [default: derived from the
    /// socket path, locally administered], queues=N receive/transmit queue pairs [default:
    /// 1], mtu=M told to the guest. Repeat for more interfaces.
    #[arg(long, value_name = "socket=PATH[,mac=MAC][,queues=N][,mtu=M]", value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// Read the whole VM description from a JSON file (see the OpenAPI VmConfig schema);
    /// other VM flags are then refused.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initramfs", "cmdline", "rng", "disk", "net"])]
    config: Option<PathBuf>,
    /// Serve the REST API on this UNIX socket. Without a kernel, the VMM waits for
    /// PUT /api/v1/vm.create and vm.boot.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Write bytes the guest sends to the debug console port (0xe9) to this file.
    #[arg(long, value_name = "PATH")]
    debugcon: Option<PathBuf>,
}

fn parse_console(s: &str) -> Result<ConsoleConfig, String> {
    match s.split_once('=') {
        None if s == "tty" => Ok(ConsoleConfig::Tty),
        None if s == "off" => Ok(ConsoleConfig::Off),
        Some(("file", p)) if !p.is_empty() => Ok(ConsoleConfig::File(p.into())),
        Some(("socket", p)) if !p.is_empty() => Ok(ConsoleConfig::Socket(p.into())),
        _ => Err(format!(
            "{s:?} is not a console: use tty, off, file=PATH or socket=PATH"
        )),
    }
}

fn parse_rng(s: &str) -> Result<RngConfig, String> {
    match s.split_once('=') {
        None if s.is_empty() => Ok(RngConfig::default()),
        Some(("src", p)) if !p.is_empty() => Ok(RngConfig { src: p.into() }),
        _ => Err(format!(
            "{s:?} is not an rng option: use --rng or --rng src=PATH"
        )),
    }
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    match s.split_once('=') {
        Some(("socket", p)) if !p.is_empty() => Ok(DiskConfig { socket: p.into() }),
        _ => Err(format!(
            "{s:?} is not a disk: use --disk socket=PATH (the vhost-user-blk backend's socket)"
        )),
    }
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    const USAGE: &str = "use --net socket=PATH[,mac=MAC][,queues=N][,mtu=M]";
    let mut net = NetConfig {
        socket: Default::default(),
        mac: None,
        queue_pairs: 1,
        mtu: None,
    };
    for option in s.split(',') {
        match option.split_once('=') {
            Some(("socket", p)) if !p.is_empty() => net.socket = p.into(),
            Some(("mac", m)) => net.mac = Some(m.parse().map_err(|e| format!("{e}; {USAGE}"))?),
            Some(("queues", n)) => {
                net.queue_pairs = n
                    .parse()
                    .map_err(|_| format!("queues={n:?} is not a number of queue pairs; {USAGE}"))?
            }
            Some(("mtu", m)) => {
                net.mtu = Some(
                    m.parse()
                        .map_err(|_| format!("mtu={m:?} is not an MTU in bytes; {USAGE}"))?,
                )
            }
            _ => return Err(format!("{option:?} is not a net option; {USAGE}")),
        }
    }
    if net.socket.as_os_str().is_empty() {
        return Err(format!(
            "{s:?} has no socket (the vhost-user-net backend's); {USAGE}"
        ));
    }
    Ok(net)
}

impl Args {
    fn vm_config(&self) -> anyhow::Result<Option<VmConfig>> {
        if let Some(path) = &self.config {
            return Ok(Some(VmConfig::from_file(path)?));
        }
        let Some(kernel) = &self.kernel else {
            return Ok(None);
        };
        Ok(Some(VmConfig {
            cpus: CpusConfig {
                boot_vcpus: self.cpus,
            },
            memory: MemoryConfig {
                size_mib: self.memory,
                hugepages: self.hugepages,
            },
            payload: PayloadConfig {
                kernel: kernel.clone(),
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
            },
            serial: self.serial.clone(),
            rng: self.rng.clone(),
            disks: self.disk.clone(),
            nets: self.net.clone(),
        }))
    }
}

fn main() -> ExitCode {
    // A plain level keeps start-up lean (EnvFilter's directive parser costs ~0.3 MiB of
    // resident code per VM); FERROVIRT_LOG=debug etc. still selects the level.
    let level = std::env::var("FERROVIRT_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::level_filters::LevelFilter>().ok())
        .unwrap_or(tracing::level_filters::LevelFilter::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferrovirt-vmm: {e:#}");
            ExitCode::from(exit_status::VMM_ERROR)
        }
    }
}

fn run(args: Args) -> anyhow::Result<u8> {
    let options = VmmOptions {
        config: args.vm_config()?,
        api_socket: args.api_socket,
        debugcon: args.debugcon,
    };
    vmm::run(options).context("the VM could not run")
}
