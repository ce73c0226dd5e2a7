//! CPU time of a whole process tree, exited threads included: each measured process runs
//! in a cpuacct cgroup of its own, joined before `exec`, and `cpuacct.usage` is read at the
//! moment that matters. (Per-thread schedstat misses threads that have already ended, and
//! /proc/PID/stat counts in 10 ms ticks.)

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

/// The cgroup v1 cpuacct hierarchy (this project's machines run cgroup v1).
const CPUACCT_ROOT: &str = "/sys/fs/cgroup/cpuacct";

/// A cpuacct cgroup that lives as long as this value; remove the processes in it first.
pub struct CpuCgroup {
    dir: PathBuf,
    procs: CString,
}

impl CpuCgroup {
    pub fn create(label: &str) -> anyhow::Result<CpuCgroup> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(CPUACCT_ROOT).join(format!(
            "ferrovirt-bench-{label}-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).with_context(|| {
            format!(
                "cannot create cgroup {}: benchmarks need root and the cgroup v1 cpuacct controller",
                dir.display()
            )
        })?;
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .context("cgroup path has a NUL byte")?;
        Ok(CpuCgroup { dir, procs })
    }

    /// Makes `cmd`'s process join this cgroup between fork and exec, before it can start
    /// any thread.
    pub fn run_inside(&self, cmd: &mut Command) {
        let procs = self.procs.clone();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (open, write, close) on memory allocated before the
        // fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
                Ok(())
            });
        }
    }

    /// Moves the running process `pid` (every thread of it) into this cgroup, for peers
    /// that a harness starts itself; only CPU used from now on counts.
    pub fn adopt(&self, pid: i32) -> anyhow::Result<()> {
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("cannot move process {pid} into {}", procs.display()))
    }

    /// Nanoseconds of CPU used by every task that has been in the cgroup.
    pub fn usage_ns(&self) -> anyhow::Result<u64> {
        let path = self.dir.join("cpuacct.usage");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} is not a number: {text:?}", path.display()))
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // Fails only while a process is still inside; the caller reaps it first.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("warning: cannot remove cgroup {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_includes_threads_that_have_ended() {
        let cgroup = CpuCgroup::create("selftest").unwrap();
        // A shell whose subshell burns CPU and exits before the shell does.
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "(i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done); exit 0",
        ]);
        cgroup.run_inside(&mut cmd);
        let status = cmd.status().unwrap();
        assert!(status.success());
        let used = cgroup.usage_ns().unwrap();
        assert!(
            used > 10_000_000,
            "the finished subshell's CPU must count: {used} ns"
        );
    }

    #[test]
    fn an_adopted_process_is_counted_from_then_on() {
        let cgroup = CpuCgroup::create("adopt").unwrap();
        // Waits for a line on stdin, then burns CPU and exits.
        let mut child = Command::new("sh")
            .args([
                "-c",
                "read x; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        cgroup.adopt(child.id() as i32).unwrap();
        assert!(cgroup.usage_ns().unwrap() < 10_000_000);
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        let used = cgroup.usage_ns().unwrap();
        assert!(
            used > 10_000_000,
            "the adopted shell's CPU must count: {used} ns"
        );
    }
}
