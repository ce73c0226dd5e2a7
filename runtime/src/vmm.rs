//! The VMM: builds the VM from its config, runs it, and answers the API until the guest
//! or a client ends it. One VM per process.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestAddressSpace;

use nix::sys::signal::{SigSet, Signal};

use crate::api::{
    ApiError, ApiMessage, ApiRequest, ApiResponse, ApiServer, ApiServerError, VmCounters, VmInfo,
    VmState, VmmPingResponse, json_response,
};
use crate::boot::{self, BootError};
use crate::config::{ConfigError, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{AcpiSleepControl, DebugConsole, DebugExit, GuestIdle, I8042};
use crate::devices::pci::PciRoot;
use crate::devices::serial::{SerialDevice, SerialError};
use crate::devices::virtio::block::{BlockError, VhostUserBlk};
use crate::devices::virtio::net::{NetError, NetMetrics, NetParams, VhostUserNet};
use crate::devices::virtio::rng::{Rng, RngError, RngMetrics};
use crate::devices::virtio::vhost_user::VhostUserMetrics;
use crate::devices::virtio::{VirtioError, add_virtio_device};
use crate::layout::{
    ACPI_SLEEP_CONTROL_PORT, COM1_IRQ, COM1_PORT, DEBUG_EXIT_PORT, DEBUGCON_PORT, GUEST_IDLE_PORT,
    I8042_PORT, PCI_CONFIG_ADDRESS_PORT,
};
use crate::memory::{GuestRam, MemoryError};
use crate::vm::cpu::{self, CpuError};
use crate::vm::interrupt::{InterruptError, InterruptRouter};
use crate::vm::vcpu::{VcpuContext, VcpuError, Vcpus};
use crate::vm::{self, ExitNotifier, GuestExit, VmError};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot set up guest memory")]
    Memory(#[from] MemoryError),
    #[error("cannot set up interrupts")]
    Interrupt(#[from] InterruptError),
    #[error("cannot boot the payload")]
    Boot(#[from] BootError),
    #[error("cannot set up a vCPU")]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up the serial console")]
    Serial(#[from] SerialError),
    #[error("cannot place a device")]
    Bus(#[from] BusError),
    #[error("KVM cannot create vCPU {id}")]
    CreateVcpu {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot open debug console output {path}")]
    DebugCon {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the virtio-rng device")]
    Rng(#[from] RngError),
    #[error("cannot set up disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: BlockError,
    },
    #[error("cannot set up net {index}")]
    Net {
        index: usize,
        #[source]
        source: NetError,
    },
    #[error("cannot add a virtio device")]
    Virtio(#[from] VirtioError),
    #[error("cannot serve the API")]
    Api(#[from] ApiServerError),
    #[error("cannot block SIGTERM/SIGINT/SIGHUP for the signal thread")]
    Signals(#[source] nix::Error),
    #[error("cannot start the signal thread")]
    SignalThread(#[source] std::io::Error),
    #[error("nothing to run: give a kernel (--kernel or --config) or an API socket (--api-socket)")]
    NothingToRun,
}

/// Process exit statuses (documented in `ferrovirt-vmm --help`).
pub mod exit_status {
    pub const POWERED_OFF: u8 = 0;
    pub const VMM_ERROR: u8 = 1;
    pub const GUEST_RESET: u8 = 3;
    pub const GUEST_CRASHED: u8 = 4;
    /// Stopped by signal N: 128 + N, as a shell reports a process killed by it.
    pub const SIGNALLED_BASE: u8 = 128;
}

/// What the VMM process does, as main.rs hands it over.
#[derive(Debug, Default)]
pub struct VmmOptions {
    /// Boot this VM at start; without it, wait for the API.
    pub config: Option<VmConfig>,
    pub api_socket: Option<PathBuf>,
    /// Where bytes written to the debug console port go.
    pub debugcon: Option<PathBuf>,
}

/// Everything that reaches the control loop.
pub enum VmmEvent {
    Guest(GuestExit),
    Api(ApiMessage),
    /// SIGTERM, SIGINT or SIGHUP: stop the VM and clean up before exiting.
    Signal(Signal),
}

/// Signals that end the VMM cleanly (sockets removed, VM torn down) instead of killing it.
const STOP_SIGNALS: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// Blocks the stop signals in this thread and every thread it starts later, and turns
/// them into events from a thread of their own (sigwait), so the control loop handles a
/// SIGTERM like any other request.
fn forward_stop_signals(tx: Sender<VmmEvent>) -> Result<(), VmmError> {
    let mut mask = SigSet::empty();
    for signal in STOP_SIGNALS {
        mask.add(signal);
    }
    mask.thread_block().map_err(VmmError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(signal) = mask.wait() {
                if tx.send(VmmEvent::Signal(signal)).is_err() {
                    return;
                }
            }
        })
        .map_err(VmmError::SignalThread)?;
    Ok(())
}

/// Devices built for a VM, before its vCPUs start.
struct BuiltDevices {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    on_exit: ExitNotifier,
    serial: Arc<SerialDevice>,
    debugcon: Arc<DebugConsole>,
    rng_metrics: Option<Arc<RngMetrics>>,
    disk_metrics: Vec<Arc<VhostUserMetrics>>,
    net_metrics: Vec<Arc<NetMetrics>>,
    pci: Arc<PciRoot>,
    router: Arc<InterruptRouter>,
}

/// A built and running VM. Dropping it stops the vCPUs before guest memory goes away.
pub struct Vm {
    vcpus: Vcpus,
    serial: Arc<SerialDevice>,
    debugcon: Arc<DebugConsole>,
    rng_metrics: Option<Arc<RngMetrics>>,
    disk_metrics: Vec<Arc<VhostUserMetrics>>,
    net_metrics: Vec<Arc<NetMetrics>>,
    _pci: Arc<PciRoot>,
    _router: Arc<InterruptRouter>,
    _vm_fd: Arc<VmFd>,
    _ram: GuestRam,
    _kvm: Kvm,
}

impl Vm {
    /// Creates the VM, loads the payload and starts every vCPU.
    pub fn start(
        config: &VmConfig,
        debugcon: Option<File>,
        on_exit: ExitNotifier,
        started: Instant,
    ) -> Result<Vm, VmmError> {
        config.validate()?;
        // create_vm refuses more than MAX_XAPIC_VCPUS, so the count fits in a u8.
        let vcpu_count = config.cpus.boot_vcpus.min(vm::MAX_XAPIC_VCPUS as u16) as u8;
        vm::check_memory_fits_host(config.memory.size_mib)?;
        let (kvm, vm_fd) = vm::create_vm(config.cpus.boot_vcpus)?;
        let ram = GuestRam::new(config.memory.size_mib << 20, config.memory.hugepages)?;
        // KVM_SET_USER_MEMORY_REGION takes ~6 ms here whatever the size (strace, 16 MiB to
        // 4 GiB); nothing else in the set-up needs the slot, so it runs alongside.
        let (devices, fds) = std::thread::scope(|scope| {
            let registration = scope.spawn(|| ram.register_with(&vm_fd));
            let built =
                Vm::build_devices_and_vcpus(config, &kvm, &vm_fd, &ram, debugcon, on_exit, started);
            let registered = registration
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            registered?;
            built
        })?;
        let BuiltDevices {
            pio,
            mmio,
            on_exit,
            serial,
            debugcon,
            rng_metrics,
            disk_metrics,
            net_metrics,
            pci,
            router,
        } = devices;
        tracing::info!(
            vcpus = vcpu_count,
            memory_mib = config.memory.size_mib,
            setup_us = started.elapsed().as_micros() as u64,
            "starting guest"
        );
        let vcpus = Vcpus::start(fds, VcpuContext { pio, mmio, on_exit })?;
        Ok(Vm {
            vcpus,
            serial,
            debugcon,
            rng_metrics,
            disk_metrics,
            net_metrics,
            _pci: pci,
            _router: router,
            _vm_fd: vm_fd,
            _ram: ram,
            _kvm: kvm,
        })
    }

    /// Everything but the memory slot: devices, the payload in guest RAM and configured
    /// vCPUs, ready to start.
    fn build_devices_and_vcpus(
        config: &VmConfig,
        kvm: &Kvm,
        vm_fd: &Arc<VmFd>,
        ram: &GuestRam,
        debugcon: Option<File>,
        on_exit: ExitNotifier,
        started: Instant,
    ) -> Result<(BuiltDevices, Vec<VcpuFd>), VmmError> {
        let vcpu_count = config.cpus.boot_vcpus.min(vm::MAX_XAPIC_VCPUS as u16) as u8;
        let router = InterruptRouter::new(vm_fd.clone())?;

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial = SerialDevice::new(&config.serial, router.legacy_irqfd(COM1_IRQ)?)?;
        pio.insert(COM1_PORT as u64, 8, serial.clone())?;
        pio.insert(I8042_PORT as u64, 5, Arc::new(I8042::new(on_exit.clone())))?;
        let debugcon = Arc::new(DebugConsole::new(debugcon, started));
        pio.insert(DEBUGCON_PORT as u64, 1, debugcon.clone())?;
        pio.insert(
            DEBUG_EXIT_PORT as u64,
            4,
            Arc::new(DebugExit(on_exit.clone())),
        )?;
        pio.insert(
            ACPI_SLEEP_CONTROL_PORT as u64,
            2,
            Arc::new(AcpiSleepControl(on_exit.clone())),
        )?;
        pio.insert(GUEST_IDLE_PORT as u64, 2, Arc::new(GuestIdle))?;

        let pci = PciRoot::new(mmio.clone(), vm_fd.clone());
        pio.insert(PCI_CONFIG_ADDRESS_PORT as u64, 8, pci.config_io())?;
        let mut rng_metrics = None;
        if let Some(rng) = &config.rng {
            let device = Rng::new(&rng.src)?;
            rng_metrics = Some(device.metrics());
            let bdf = add_virtio_device(&pci, Box::new(device), &router, ram.memory.clone())?;
            tracing::debug!(%bdf, "virtio-rng added");
        }
        let mut disk_metrics = Vec::with_capacity(config.disks.len());
        for (index, disk) in config.disks.iter().enumerate() {
            let device = VhostUserBlk::new(&disk.socket)
                .map_err(|source| VmmError::Disk { index, source })?;
            disk_metrics.push(device.metrics());
            let sectors = device.capacity();
            let bdf = add_virtio_device(&pci, Box::new(device), &router, ram.memory.clone())?;
            tracing::debug!(%bdf, socket = %disk.socket.display(), sectors, "vhost-user-blk disk added");
        }
        let mut net_metrics = Vec::with_capacity(config.nets.len());
        for (index, net) in config.nets.iter().enumerate() {
            let mac = net.mac_or_generated();
            let params = NetParams {
                mac: mac.0,
                queue_pairs: net.queue_pairs,
                mtu: net.mtu,
            };
            let device = VhostUserNet::new(&net.socket, params)
                .map_err(|source| VmmError::Net { index, source })?;
            net_metrics.push(device.metrics());
            let bdf = add_virtio_device(&pci, Box::new(device), &router, ram.memory.clone())?;
            tracing::debug!(%bdf, socket = %net.socket.display(), %mac, "vhost-user-net interface added");
        }

        let mem = ram.memory.memory();
        let entry = boot::load_payload(&mem, ram.size, &config.payload, vcpu_count)?;
        tracing::debug!(?entry, "payload loaded");
        let base_cpuid = cpu::supported_cpuid(kvm)?;
        let mut fds = Vec::with_capacity(vcpu_count as usize);
        for id in 0..vcpu_count {
            let fd = vm_fd
                .create_vcpu(id as u64)
                .map_err(|source| VmmError::CreateVcpu { id, source })?;
            cpu::configure_vcpu(&fd, id, vcpu_count, &base_cpuid)?;
            if id == 0 {
                cpu::configure_boot_vcpu(&fd, &mem, entry)?;
            }
            fds.push(fd);
        }
        let devices = BuiltDevices {
            pio,
            mmio,
            on_exit,
            serial,
            debugcon,
            rng_metrics,
            disk_metrics,
            net_metrics,
            pci,
            router,
        };
        Ok((devices, fds))
    }

    pub fn pause(&self) {
        self.vcpus.pause();
    }

    pub fn resume(&self) {
        self.vcpus.resume();
    }

    /// Device and vCPU counters, by component.
    pub fn counters(&self) -> VmCounters {
        use std::sync::atomic::Ordering::Relaxed;
        let group = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let mut all = VmCounters::new();
        for (id, c) in self.vcpus.counters.iter().enumerate() {
            all.insert(format!("vcpu{id}"), group(&c.snapshot()));
        }
        let s = &self.serial.counters;
        all.insert(
            "serial".into(),
            group(&[
                ("tx_bytes", s.tx_bytes.load(Relaxed)),
                ("tx_lost_bytes", s.tx_lost_bytes.load(Relaxed)),
                ("rx_bytes", s.rx_bytes.load(Relaxed)),
            ]),
        );
        all.insert(
            "debugcon".into(),
            group(&[("bytes", self.debugcon.bytes.load(Relaxed))]),
        );
        if let Some(m) = &self.rng_metrics {
            all.insert(
                "rng".into(),
                group(&[
                    ("activations", m.activations.load(Relaxed)),
                    ("requests", m.requests.load(Relaxed)),
                    ("bytes", m.bytes.load(Relaxed)),
                    ("errors", m.errors.load(Relaxed)),
                    ("interrupt_failures", m.interrupt_failures.load(Relaxed)),
                ]),
            );
        }
        for (index, m) in self.disk_metrics.iter().enumerate() {
            all.insert(format!("disk{index}"), group(&m.snapshot()));
        }
        for (index, m) in self.net_metrics.iter().enumerate() {
            all.insert(format!("net{index}"), group(&m.snapshot()));
        }
        all
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.vcpus.stop();
    }
}

/// The process exit status for a guest exit.
pub fn exit_code(exit: &GuestExit) -> u8 {
    match exit {
        GuestExit::PowerOff => exit_status::POWERED_OFF,
        GuestExit::Reset => exit_status::GUEST_RESET,
        GuestExit::DebugExit(code) => *code,
        GuestExit::Crashed(_) => exit_status::GUEST_CRASHED,
    }
}

fn log_exit(exit: &GuestExit) {
    match exit {
        GuestExit::PowerOff => tracing::info!("guest powered off"),
        GuestExit::Reset => tracing::info!(
            "guest reset itself; the VMM exits and leaves restarting to its supervisor"
        ),
        GuestExit::DebugExit(code) => tracing::info!(code, "guest wrote to the debug-exit port"),
        GuestExit::Crashed(why) => tracing::error!("guest crashed: {why}"),
    }
}

/// What the control loop does after handling an event.
enum Next {
    Continue,
    Exit(u8),
}

/// The control loop's state: at most one VM, from its config to its end.
struct Vmm {
    config: Option<VmConfig>,
    vm: Option<Vm>,
    paused: bool,
    debugcon: Option<File>,
    on_exit: ExitNotifier,
    started: Instant,
}

impl Vmm {
    fn state(&self) -> Option<VmState> {
        match (&self.config, &self.vm) {
            (None, _) => None,
            (Some(_), None) => Some(VmState::Created),
            (Some(_), Some(_)) if self.paused => Some(VmState::Paused),
            (Some(_), Some(_)) => Some(VmState::Running),
        }
    }

    fn boot(&mut self) -> Result<(), VmmError> {
        let config = self.config.as_ref().ok_or(VmmError::NothingToRun)?;
        let vm = Vm::start(
            config,
            self.debugcon.take(),
            self.on_exit.clone(),
            self.started,
        )?;
        self.vm = Some(vm);
        Ok(())
    }

    fn no_vm() -> ApiError {
        ApiError::not_found("no VM is created: PUT /api/v1/vm.create first")
    }

    fn wrong_state(&self, action: &str, needs: &str) -> ApiError {
        match self.state() {
            None => Vmm::no_vm(),
            Some(state) => ApiError::conflict(format!(
                "cannot {action} a VM that is {state:?}; it must be {needs}"
            )),
        }
    }

    fn handle_api(&mut self, request: ApiRequest) -> (ApiResponse, Next) {
        let ok = |next| (Ok(None), next);
        match request {
            ApiRequest::VmCreate(config) => {
                if self.config.is_some() {
                    return (
                        Err(ApiError::conflict(
                            "a VM is already created; one VMM process runs one VM",
                        )),
                        Next::Continue,
                    );
                }
                if let Err(e) = config.validate() {
                    return (Err(ApiError::bad_request_from(&e)), Next::Continue);
                }
                self.config = Some(*config);
                ok(Next::Continue)
            }
            ApiRequest::VmBoot => {
                if self.state() != Some(VmState::Created) {
                    return (Err(self.wrong_state("boot", "Created")), Next::Continue);
                }
                match self.boot() {
                    Ok(()) => ok(Next::Continue),
                    Err(
                        e @ (VmmError::Config(_)
                        | VmmError::Boot(_)
                        | VmmError::Vm(_)
                        | VmmError::Disk { .. }
                        | VmmError::Net { .. }),
                    ) => (Err(ApiError::bad_request_from(&e)), Next::Continue),
                    Err(e) => (Err(ApiError::internal_from(&e)), Next::Continue),
                }
            }
            ApiRequest::VmInfo => match (self.state(), &self.config) {
                (Some(state), Some(config)) => (
                    json_response(&VmInfo {
                        state,
                        config: config.clone(),
                    }),
                    Next::Continue,
                ),
                _ => (Err(Vmm::no_vm()), Next::Continue),
            },
            ApiRequest::VmPause => match (&self.vm, self.state()) {
                (Some(vm), Some(VmState::Running)) => {
                    vm.pause();
                    self.paused = true;
                    ok(Next::Continue)
                }
                _ => (Err(self.wrong_state("pause", "Running")), Next::Continue),
            },
            ApiRequest::VmResume => match (&self.vm, self.state()) {
                (Some(vm), Some(VmState::Paused)) => {
                    vm.resume();
                    self.paused = false;
                    ok(Next::Continue)
                }
                _ => (Err(self.wrong_state("resume", "Paused")), Next::Continue),
            },
            ApiRequest::VmShutdown => match self.vm.take() {
                Some(vm) => {
                    drop(vm);
                    tracing::info!("VM shut down through the API");
                    ok(Next::Exit(exit_status::POWERED_OFF))
                }
                None => (
                    Err(self.wrong_state("shut down", "Running or Paused")),
                    Next::Continue,
                ),
            },
            ApiRequest::VmCounters => match &self.vm {
                Some(vm) => (json_response(&vm.counters()), Next::Continue),
                None => (
                    Err(self.wrong_state("read counters of", "Running or Paused")),
                    Next::Continue,
                ),
            },
            ApiRequest::VmmPing => (json_response(&VmmPingResponse::current()), Next::Continue),
            ApiRequest::VmmShutdown => {
                self.vm = None;
                ok(Next::Exit(exit_status::POWERED_OFF))
            }
        }
    }
}

/// Runs the VMM until the guest or a client ends it; returns the process exit status.
pub fn run(options: VmmOptions) -> Result<u8, VmmError> {
    let started = Instant::now();
    if options.config.is_none() && options.api_socket.is_none() {
        return Err(VmmError::NothingToRun);
    }
    let (tx, rx): (Sender<VmmEvent>, Receiver<VmmEvent>) = channel();
    // Before any other thread exists, so that all of them inherit the blocked mask.
    forward_stop_signals(tx.clone())?;
    let exit_tx = tx.clone();
    let on_exit: ExitNotifier = Arc::new(move |exit| {
        // The loop stops listening only when the process is ending anyway.
        let _ = exit_tx.send(VmmEvent::Guest(exit));
    });
    let debugcon = options
        .debugcon
        .as_ref()
        .map(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::DebugCon {
                    path: path.clone(),
                    source,
                })
        })
        .transpose()?;
    let mut vmm = Vmm {
        config: options.config,
        vm: None,
        paused: false,
        debugcon,
        on_exit,
        started,
    };
    if vmm.config.is_some() {
        vmm.boot()?;
    }
    // Started after the VM so that a client never sees a half-built VM; dropped (socket
    // removed) when this function returns.
    let _api = options
        .api_socket
        .as_deref()
        .map(|path| {
            let api_tx = tx.clone();
            ApiServer::start(
                path,
                Box::new(move |msg| api_tx.send(VmmEvent::Api(msg)).is_ok()),
            )
        })
        .transpose()?;
    drop(tx);
    for event in rx {
        let next = match event {
            VmmEvent::Guest(exit) => {
                log_exit(&exit);
                vmm.vm = None;
                Next::Exit(exit_code(&exit))
            }
            VmmEvent::Signal(signal) => {
                tracing::info!(%signal, "stopping the VM");
                vmm.vm = None;
                Next::Exit(exit_status::SIGNALLED_BASE + signal as u8)
            }
            VmmEvent::Api(ApiMessage { request, reply }) => {
                let (response, next) = vmm.handle_api(request);
                // A client that hung up does not need its answer.
                let _ = reply.send(response);
                next
            }
        };
        if let Next::Exit(code) = next {
            return Ok(code);
        }
    }
    Ok(exit_status::VMM_ERROR)
}
