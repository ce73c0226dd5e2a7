//! `fvctl run vm.yaml`: a VirtualMachine manifest run on this host with no cluster. The test
//! guest writes its pattern through ferrovirt-vhost-blk (checked on the host image afterwards),
//! Ctrl-C stops the VM in order, bad manifests fail before anything starts, and every run
//! leaves no state directory, TAP, socket or process behind.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferrovirt_tests::{
    ScratchDir, blk_pattern, link_exists, testguest, try_fvctl_binary, unique_name,
    vhost_blk_binary, vhost_net_binary, vmm_binary,
};

struct Setup {
    dir: ScratchDir,
    name: String,
}

impl Setup {
    fn new(label: &str) -> Setup {
        let dir = ScratchDir::new(label).expect("scratch dir");
        let bin = dir.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fvctl = try_fvctl_binary().expect("fvctl builds");
        for (name, path) in [
            ("fvctl", fvctl),
            ("ferrovirt-vmm", vmm_binary()),
            ("ferrovirt-vhost-blk", vhost_blk_binary()),
            ("ferrovirt-vhost-net", vhost_net_binary()),
        ] {
            std::os::unix::fs::symlink(path, bin.join(name)).unwrap();
        }
        Setup {
            dir,
            name: unique_name("fvrun"),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Writes a VM manifest with `kernel_args`, one disk backed by `volume` (YAML flow map of
    /// the volume source) and one vhost-user interface on the pod network.
    fn manifest(&self, kernel_args: &str, volume: &str) -> PathBuf {
        let text = format!(
            r#"apiVersion: ferrovirt.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        memory: {{guest: 32Mi}}
        firmware:
          kernelBoot:
            kernelArgs: {kernel_args}
            container: {{kernelPath: {kernel}}}
        devices:
          disks: [{{name: data, serial: fvrun}}]
          interfaces: [{{name: nic, binding: {{name: vhostuser}}}}]
      networks: [{{name: nic, pod: {{}}}}]
      volumes: [{{name: data, {volume}}}]
"#,
            name = self.name,
            kernel = testguest().display(),
        );
        let path = self.dir.join("vm.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn command(&self, manifest: &Path) -> Command {
        let mut cmd = Command::new(self.dir.join("bin/fvctl"));
        cmd.arg("run")
            .arg(manifest)
            .arg("--state-dir")
            .arg(self.state_dir());
        cmd
    }

    fn run(&self, manifest: &Path) -> Output {
        self.command(manifest)
            .stdin(Stdio::null())
            .output()
            .expect("fvctl runs")
    }

    /// Nothing of this run is left: state directory, TAP, processes.
    fn assert_clean(&self) {
        let dir = self.state_dir().join(&self.name);
        assert!(!dir.exists(), "{} is left behind", dir.display());
        let tap = ferrovirt_controller::node::standalone::tap_name(&self.name, 0);
        assert!(!link_exists(&tap), "TAP {tap} is left behind");
        let state = self.state_dir().display().to_string();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !cmdline.contains(&state),
                "a process of the run is left: {cmdline}"
            );
        }
    }
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn the_guest_writes_its_disk_through_the_backend_and_the_run_cleans_up() {
    let s = Setup::new("fvrun-blk");
    let image = s.dir.join("disks/data.img");
    let manifest = s.manifest(
        "scenario=blk blk_seed=11 blk_sectors=4096",
        &format!(
            "hostDisk: {{path: {}, type: DiskOrCreate, capacity: 8Mi}}",
            image.display()
        ),
    );
    let out = s.run(&manifest);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("serial=fvrun"), "{stdout}");
    assert!(stdout.contains("testguest: PASS blk"), "{stdout}");
    // The bytes are on the host image, which outlives the run (DiskOrCreate made it).
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes.len(), 8 << 20);
    assert_eq!(blk_pattern::first_mismatch(&bytes, 11, 0..4096), None);
    s.assert_clean();
}

#[test]
fn ctrl_c_stops_the_vm_and_removes_everything() {
    let s = Setup::new("fvrun-int");
    let manifest = s.manifest("scenario=ticker", "emptyDisk: {capacity: 4Mi}");
    let mut child = s
        .command(&manifest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A process group of its own, like a shell job: Ctrl-C signals the whole group.
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines.next().expect("the guest ticks").unwrap();
        if line.contains("tick 3") {
            break;
        }
        assert!(Instant::now() < deadline, "no tick 3 within 30 s");
    }
    // While it runs, the empty disk and the TAP exist.
    assert!(s.state_dir().join(&s.name).join("data.img").exists());
    let tap = ferrovirt_controller::node::standalone::tap_name(&s.name, 0);
    assert!(link_exists(&tap), "TAP {tap} missing while the VM runs");
    // A second run of the same VM is refused while this one lives.
    let second = s.run(&manifest);
    assert_eq!(second.status.code(), Some(1));
    assert!(
        text(&second.stderr).contains("is already running under fvctl run"),
        "{}",
        text(&second.stderr)
    );
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    // 128 + SIGINT: the VMM stopped the VM on the signal.
    assert_eq!(status.code(), Some(130));
    s.assert_clean();
}

#[test]
fn a_missing_image_fails_before_the_vm_starts_and_leaves_nothing() {
    let s = Setup::new("fvrun-bad");
    let manifest = s.manifest(
        "scenario=blk",
        "hostDisk: {path: /nonexistent/ferrovirt/disk.img, type: Disk}",
    );
    let out = s.run(&manifest);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("disk image /nonexistent/ferrovirt/disk.img does not exist"),
        "{stderr}"
    );
    assert!(!text(&out.stdout).contains("testguest:"), "the guest ran");
    s.assert_clean();

    let manifest = s.manifest("scenario=blk", "persistentVolumeClaim: {claimName: c}");
    let out = s.run(&manifest);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("volume \"data\": fvctl run serves hostDisk, emptyDisk and cloudInitNoCloud"),
        "{}",
        text(&out.stderr)
    );
    s.assert_clean();
}
