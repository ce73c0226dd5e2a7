//! vCPU threads: each runs KVM_RUN and routes port and MMIO exits to the buses.
//!
//! The VMM pauses, resumes and stops vCPUs through `VcpuControl`. A vCPU inside KVM_RUN
//! is kicked out with a signal; since a signal sent just before KVM_RUN starts would be
//! lost, the kicker repeats it until every vCPU has acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::{ExitNotifier, GuestExit};
use crate::devices::bus::Bus;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot start the thread of vCPU {0}")]
    SpawnThread(u8, #[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    target: Target,
    /// Which vCPUs have seen `target`: parked in `Pause`, or gone after `Stop`.
    acknowledged: Vec<bool>,
}

/// Shared run state of all vCPUs of a VM.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Exit counters of one vCPU, for the API's counters.
#[derive(Default)]
pub struct VcpuCounters {
    pub io_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    pub other_exits: AtomicU64,
    /// Accesses to ports or addresses where no device answers.
    pub unhandled_accesses: AtomicU64,
}

impl VcpuCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("io_exits", self.io_exits.load(Ordering::Relaxed)),
            ("mmio_exits", self.mmio_exits.load(Ordering::Relaxed)),
            ("other_exits", self.other_exits.load(Ordering::Relaxed)),
            (
                "unhandled_accesses",
                self.unhandled_accesses.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// The buses and callbacks a vCPU thread needs.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub on_exit: ExitNotifier,
}

/// All vCPU threads of a VM.
pub struct Vcpus {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    pub counters: Vec<Arc<VcpuCounters>>,
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        extern "C" fn on_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
            // Interrupting KVM_RUN (EINTR) is all the kick needs to do.
        }
        result = register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::SignalHandler);
    });
    result
}

impl Vcpus {
    /// Starts one thread per vCPU; they run the guest at once.
    pub fn start(fds: Vec<VcpuFd>, ctx: VcpuContext) -> Result<Vcpus, VcpuError> {
        install_kick_handler()?;
        let control = Arc::new(VcpuControl {
            state: Mutex::new(ControlState {
                target: Target::Run,
                acknowledged: vec![false; fds.len()],
            }),
            changed: Condvar::new(),
        });
        let mut vcpus = Vcpus {
            control: control.clone(),
            threads: Vec::with_capacity(fds.len()),
            counters: Vec::with_capacity(fds.len()),
        };
        for (id, fd) in fds.into_iter().enumerate() {
            let id = id as u8;
            let counters = Arc::new(VcpuCounters::default());
            vcpus.counters.push(counters.clone());
            let (ctx, control) = (ctx.clone(), control.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_vcpu(fd, id, ctx, control, counters))
                .map_err(|e| VcpuError::SpawnThread(id, e))?;
            vcpus.threads.push(thread);
        }
        Ok(vcpus)
    }

    /// Moves every vCPU to `target` and waits until all have acknowledged.
    fn move_to(&self, target: Target) {
        let mut state = self.control.lock();
        if state.target == target {
            return;
        }
        state.target = target;
        state.acknowledged.fill(false);
        self.control.changed.notify_all();
        // A thread that ended without acknowledging (it panicked) runs no guest code either.
        let settled = |acknowledged: &[bool]| {
            acknowledged
                .iter()
                .zip(&self.threads)
                .all(|(&acked, thread)| acked || thread.is_finished())
        };
        while !settled(&state.acknowledged) {
            drop(state);
            for thread in &self.threads {
                // A thread that already left has nothing to interrupt.
                let _ = thread.kill(kick_signal());
            }
            state = self.control.lock();
            if !settled(&state.acknowledged) {
                state = self
                    .control
                    .changed
                    .wait_timeout(state, Duration::from_millis(5))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }

    /// Stops guest execution on every vCPU; returns when none runs guest code.
    pub fn pause(&self) {
        self.move_to(Target::Pause);
    }

    pub fn resume(&self) {
        let mut state = self.control.lock();
        state.target = Target::Run;
        self.control.changed.notify_all();
    }

    /// Ends every vCPU thread and joins them.
    pub fn stop(&mut self) {
        self.move_to(Target::Stop);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

/// Waits while paused; returns false when the vCPU must end.
fn wait_for_run(control: &VcpuControl, id: u8) -> bool {
    let mut state = control.lock();
    loop {
        match state.target {
            Target::Run => return true,
            Target::Stop => {
                state.acknowledged[usize::from(id)] = true;
                control.changed.notify_all();
                return false;
            }
            Target::Pause => {
                state.acknowledged[usize::from(id)] = true;
                control.changed.notify_all();
                while state.target == Target::Pause {
                    state = control
                        .changed
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
                // Paused → Stop counts the acknowledgement again for the new target.
            }
        }
    }
}

fn run_vcpu(
    mut fd: VcpuFd,
    id: u8,
    ctx: VcpuContext,
    control: Arc<VcpuControl>,
    counters: Arc<VcpuCounters>,
) {
    let _span = tracing::info_span!("vcpu", id).entered();
    while wait_for_run(&control, id) {
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                counters.io_exits.fetch_add(1, Ordering::Relaxed);
                if !ctx.pio.read(port as u64, data) {
                    counters.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                counters.io_exits.fetch_add(1, Ordering::Relaxed);
                if !ctx.pio.write(port as u64, data) {
                    counters.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                counters.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !ctx.mmio.read(addr, data) {
                    counters.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                counters.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !ctx.mmio.write(addr, data) {
                    counters.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(VcpuExit::Shutdown) => {
                (ctx.on_exit)(GuestExit::Crashed(format!(
                    "vCPU {id} triple-faulted (KVM_EXIT_SHUTDOWN): the guest hit an unhandled fault or reset itself that way"
                )));
                park_until_stopped(&control, id);
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                (ctx.on_exit)(GuestExit::Crashed(format!(
                    "vCPU {id} could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
                )));
                park_until_stopped(&control, id);
                return;
            }
            Ok(VcpuExit::InternalError) => {
                (ctx.on_exit)(GuestExit::Crashed(format!(
                    "vCPU {id}: KVM internal error (often an instruction KVM cannot emulate)"
                )));
                park_until_stopped(&control, id);
                return;
            }
            Ok(exit) => {
                counters.other_exits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("unhandled vCPU exit {exit:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                (ctx.on_exit)(GuestExit::Crashed(format!(
                    "vCPU {id}: KVM_RUN failed: {e}"
                )));
                park_until_stopped(&control, id);
                return;
            }
        }
    }
}

/// After a fatal exit the vCPU must not run again, but still acknowledges the VMM.
fn park_until_stopped(control: &VcpuControl, id: u8) {
    let mut state = control.lock();
    loop {
        if state.target != Target::Run {
            state.acknowledged[usize::from(id)] = true;
            control.changed.notify_all();
            if state.target == Target::Stop {
                return;
            }
        }
        let seen = state.target;
        while state.target == seen {
            state = control
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}
