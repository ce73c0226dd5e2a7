//! Child processes that cannot outlive the test that started them, and scratch directories.
//!
//! A [`GuardedProcess`] runs in its own process group with its output in files. Dropping it
//! sends SIGTERM to the group, then SIGKILL after a grace period, reaps the child and kills
//! anything left in the group. The child also gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies
//! if the *thread* that spawned it dies without unwinding (abort, SIGKILL of the test binary):
//! keep a guard on the thread that created it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a dropped process gets between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot create scratch directory {path}")]
    ScratchDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create output file {path}")]
    OutputFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {program}: is it installed and executable?")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("pidfd_open for pid {pid} failed (needs Linux 5.3 or newer)")]
    PidFd {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("waiting for pid {pid} failed")]
    Wait {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("{program} (pid {pid}) still runs after {timeout:?}")]
    Timeout {
        program: String,
        pid: i32,
        timeout: Duration,
    },
    #[error(
        "{program} (pid {pid}) did not accept connections on {socket} within {timeout:?}; stderr: {stderr}"
    )]
    NoSocket {
        program: String,
        pid: i32,
        socket: PathBuf,
        timeout: Duration,
        stderr: String,
    },
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A per-process, per-call counter: with the pid it makes names unique across parallel tests.
pub(crate) fn next_unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

/// Keeps `[A-Za-z0-9_-]` of a test name and at most `max` bytes of it.
pub(crate) fn sanitize_label(label: &str, max: usize) -> String {
    let mut out: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // The label is ASCII now, so any byte index is a char boundary.
    if out.len() > max {
        out = out[out.len() - max..].to_string();
    }
    out
}

/// A fresh directory under the system temp dir, removed with its contents on `Drop`.
///
/// Its name is `ferrovirt-<label>-<pid>-<counter>`, kept short enough that a UNIX socket
/// path inside it stays under the 108-byte `sun_path` limit.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(label: &str) -> Result<ScratchDir, ProcessError> {
        ScratchDir::new_in(&std::env::temp_dir(), label)
    }

    /// The same under `base` (which must exist) instead of the temp dir.
    pub fn new_in(base: &Path, label: &str) -> Result<ScratchDir, ProcessError> {
        let name = format!(
            "ferrovirt-{}-{}-{}",
            sanitize_label(label, 40),
            std::process::id(),
            next_unique()
        );
        let path = base.join(name);
        std::fs::create_dir(&path).map_err(|source| ProcessError::ScratchDir {
            path: path.clone(),
            source,
        })?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path for a file inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// How a child ended, with what it cost (`wait4` rusage; includes its reaped descendants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    pub status: ExitStatus,
    pub user_time: Duration,
    pub system_time: Duration,
    /// Peak resident set size in KiB (`ru_maxrss`).
    pub max_rss_kib: u64,
}

impl ProcessExit {
    /// User plus system CPU time.
    pub fn cpu_time(&self) -> Duration {
        self.user_time + self.system_time
    }
}

/// A running child in its own process group; see the module docs for what `Drop` does.
#[derive(Debug)]
pub struct GuardedProcess {
    program: String,
    pid: i32,
    pidfd: OwnedFd,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    exit: Option<ProcessExit>,
    grace: Duration,
}

impl GuardedProcess {
    /// Starts `cmd` with stdin from /dev/null and stdout/stderr written to the given files.
    pub fn spawn(
        mut cmd: Command,
        stdout_path: &Path,
        stderr_path: &Path,
    ) -> Result<GuardedProcess, ProcessError> {
        let program = Path::new(cmd.get_program())
            .file_name()
            .unwrap_or(OsStr::new("?"))
            .to_string_lossy()
            .into_owned();
        let open = |path: &Path| {
            File::create(path).map_err(|source| ProcessError::OutputFile {
                path: path.to_owned(),
                source,
            })
        };
        let parent = std::process::id() as libc::pid_t;
        cmd.stdin(Stdio::null())
            .stdout(open(stdout_path)?)
            .stderr(open(stderr_path)?)
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // calls (prctl, getppid, raise) on no shared state.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::raise(libc::SIGKILL);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = child.id() as i32;
        // `child` holds no pipes (stdio is files), so dropping it leaves the process alone;
        // from here on the pid is ours to wait for.
        drop(child);
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1. The child is
        // unreaped, so its pid cannot have been reused.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let source = io::Error::last_os_error();
            // SAFETY: plain signal to our own unreaped child's group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = reap(pid);
            return Err(ProcessError::PidFd { pid, source });
        }
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(GuardedProcess {
            program,
            pid,
            pidfd,
            stdout_path: stdout_path.to_owned(),
            stderr_path: stderr_path.to_owned(),
            exit: None,
            grace: DEFAULT_GRACE,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn program(&self) -> &str {
        &self.program
    }

    /// Sets how long `Drop` (and [`GuardedProcess::terminate`]) waits after SIGTERM.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// What the child wrote to stdout so far (lossy UTF-8).
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// What the child wrote to stderr so far (lossy UTF-8).
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The exit, if the child has already been reaped.
    pub fn exit(&self) -> Option<ProcessExit> {
        self.exit
    }

    /// Reaps the child if it has exited, without waiting.
    pub fn try_exit(&mut self) -> Result<Option<ProcessExit>, ProcessError> {
        self.wait_inner(Some(Duration::ZERO))
    }

    /// Waits up to `timeout` for the child to exit; a timeout leaves it running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ProcessExit, ProcessError> {
        self.wait_inner(Some(timeout))?
            .ok_or_else(|| ProcessError::Timeout {
                program: self.program.clone(),
                pid: self.pid,
                timeout,
            })
    }

    /// Waits until some process listens on the UNIX socket at `socket` (a stale socket file
    /// from a predecessor does not count), failing at once if this process exits. It looks in
    /// /proc/net/unix instead of connecting: a probe connection would be a client to the
    /// server, which vhost-user backends serve one at a time.
    pub fn wait_for_socket(
        &mut self,
        socket: &Path,
        timeout: Duration,
    ) -> Result<(), ProcessError> {
        let deadline = std::time::Instant::now() + timeout;
        while !unix_socket_listening(socket) {
            if self.try_exit()?.is_some() || std::time::Instant::now() > deadline {
                return Err(ProcessError::NoSocket {
                    program: self.program.clone(),
                    pid: self.pid,
                    socket: socket.to_owned(),
                    timeout,
                    stderr: self.stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// SIGTERM to the group, SIGKILL after the grace period, then reap.
    pub fn terminate(&mut self) -> Result<ProcessExit, ProcessError> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        self.signal_group(libc::SIGTERM);
        if let Some(exit) = self.wait_inner(Some(self.grace))? {
            return Ok(exit);
        }
        self.kill()
    }

    /// SIGKILL to the group, then reap.
    pub fn kill(&mut self) -> Result<ProcessExit, ProcessError> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        self.signal_group(libc::SIGKILL);
        self.wait_inner(None)?.ok_or(ProcessError::Wait {
            pid: self.pid,
            source: io::Error::other("child still running after SIGKILL"),
        })
    }

    fn signal_group(&self, signal: libc::c_int) {
        if self.exit.is_none() {
            // SAFETY: the child is unreaped, so its pid (= its group id) is still ours.
            unsafe { libc::kill(-self.pid, signal) };
        }
    }

    /// `None` timeout waits forever. Returns `None` on timeout.
    fn wait_inner(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<ProcessExit>, ProcessError> {
        if let Some(exit) = self.exit {
            return Ok(Some(exit));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let remaining_ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so a short timeout still waits rather than spinning.
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack, count 1.
            let n = unsafe { libc::poll(&mut pfd, 1, remaining_ms) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ProcessError::Wait {
                    pid: self.pid,
                    source: err,
                });
            }
            if n == 0 {
                return Ok(None);
            }
            // The child is a zombie: its pid still names the group, so whatever it left in
            // the group can be killed without hitting a reused pid.
            // SAFETY: plain signal to the group of our unreaped child.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
            let exit = reap(self.pid).map_err(|source| ProcessError::Wait {
                pid: self.pid,
                source,
            })?;
            self.exit = Some(exit);
            return Ok(Some(exit));
        }
    }
}

impl Drop for GuardedProcess {
    fn drop(&mut self) {
        if self.exit.is_none() && self.terminate().is_err() {
            // Last resort: the group must not outlive us even if waiting failed.
            // SAFETY: plain signal; the pid is still unreaped.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
    }
}

fn reap(pid: i32) -> io::Result<ProcessExit> {
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to locals; `pid` is our own child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        return Ok(ProcessExit {
            status: ExitStatus::from_raw(status),
            user_time: timeval_to_duration(usage.ru_utime),
            system_time: timeval_to_duration(usage.ru_stime),
            max_rss_kib: usage.ru_maxrss.max(0) as u64,
        });
    }
}

fn timeval_to_duration(tv: libc::timeval) -> Duration {
    Duration::from_secs(tv.tv_sec.max(0) as u64) + Duration::from_micros(tv.tv_usec.max(0) as u64)
}

pub(crate) fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `max_lines` lines of a text, for error messages.
pub(crate) fn tail(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

/// Whether a socket bound to `path` is listening: its /proc/net/unix line carries
/// __SO_ACCEPTCON (flags 00010000), set by listen(2).
/// Reads `stream` on a thread until `text` appears in what it read, the stream ends or
/// `timeout` passes; the thread returns what it read, lossily decoded.
pub fn read_until_text<R: io::Read + Send + 'static>(
    mut stream: R,
    text: &str,
    timeout: Duration,
) -> std::thread::JoinHandle<String> {
    let text = text.to_owned();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&seen).contains(&text) {
                break;
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    })
}

pub fn unix_socket_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8 && fields[3] == "00010000" && fields[7] == path
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    fn alive(pid: i32) -> bool {
        // SAFETY: signal 0 only checks that the pid exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    #[test]
    fn a_listening_socket_is_seen_and_a_stale_file_is_not() {
        let dir = ScratchDir::new("listening").unwrap();
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(unix_socket_listening(&path));
        drop(listener);
        assert!(path.exists(), "the stale file stays behind");
        assert!(!unix_socket_listening(&path));
    }

    #[test]
    fn exit_status_and_output_are_captured() {
        let dir = ScratchDir::new("exit_status").unwrap();
        let mut p = GuardedProcess::spawn(
            sh("echo out; echo err >&2; exit 7"),
            &dir.join("o"),
            &dir.join("e"),
        )
        .unwrap();
        let exit = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(exit.status.code(), Some(7));
        assert_eq!(p.stdout(), "out\n");
        assert_eq!(p.stderr(), "err\n");
        assert!(exit.max_rss_kib > 0);
    }

    #[test]
    fn wait_timeout_leaves_a_running_child_running() {
        let dir = ScratchDir::new("timeout").unwrap();
        let mut p = GuardedProcess::spawn(sh("sleep 30"), &dir.join("o"), &dir.join("e")).unwrap();
        let err = p.wait_timeout(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, ProcessError::Timeout { .. }), "{err}");
        assert!(alive(p.pid()));
    }

    #[test]
    fn drop_kills_the_whole_process_group() {
        let dir = ScratchDir::new("drop_group").unwrap();
        let pidfile = dir.join("grandchild");
        // The grandchild ignores SIGTERM, so only the SIGKILL after the grace period ends it.
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; exec sleep 60' & wait",
            pidfile.display()
        );
        let mut p = GuardedProcess::spawn(sh(&script), &dir.join("o"), &dir.join("e")).unwrap();
        p.set_grace(Duration::from_millis(200));
        let parent = p.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        let grandchild: i32 = loop {
            if let Ok(text) = std::fs::read_to_string(&pidfile)
                && let Ok(pid) = text.trim().parse()
            {
                break pid;
            }
            assert!(Instant::now() < deadline, "grandchild never started");
            std::thread::sleep(Duration::from_millis(10));
        };
        drop(p);
        assert!(!alive(parent));
        // The grandchild was reparented; give init a moment to reap it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) && Instant::now() < deadline {
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat"));
            if stat.is_ok_and(|s| s.contains(") Z ")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "grandchild {grandchild} survived: {stat}"
        );
    }

    #[test]
    fn cpu_time_of_a_busy_child_is_measured() {
        let dir = ScratchDir::new("cpu").unwrap();
        let mut p = GuardedProcess::spawn(
            sh("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"),
            &dir.join("o"),
            &dir.join("e"),
        )
        .unwrap();
        let exit = p.wait_timeout(Duration::from_secs(60)).unwrap();
        assert!(exit.status.success());
        assert!(exit.cpu_time() > Duration::from_millis(1), "{exit:?}");
    }

    #[test]
    fn scratch_dir_is_unique_and_removed_on_drop() {
        let a = ScratchDir::new("same name").unwrap();
        let b = ScratchDir::new("same name").unwrap();
        assert_ne!(a.path(), b.path());
        let path = a.path().to_owned();
        std::fs::write(a.join("f"), b"x").unwrap();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn labels_keep_their_distinctive_end() {
        assert_eq!(sanitize_label("tests::boots ok", 64), "tests__boots_ok");
        assert_eq!(
            sanitize_label("module::very_long_test_name", 9),
            "test_name"
        );
    }
}
