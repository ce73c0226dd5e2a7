//! Starting and stopping one VMI's node side: its launcher pod's VMM is already running (the
//! container's entrypoint waits on its API socket in the VMI's host directory); the agent
//! resolves volumes through the VMM's mount namespace and NICs through the CNI records of its
//! network namespace, starts the backends in the pod's cgroups, then creates and boots the VM.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrovirt_cni_plugin::state::AttachmentRecord;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use ferrovirt_runtime::api::VmState;

use super::vmm_api;
use crate::crd::VirtualMachineInstance;
use crate::crd::spec::{ContainerDisk, HostDiskType, Interface, Network, Volume};
use crate::crd::vmi::InterfaceStatus;
use crate::node::plan::{
    self, CopySource, DISK_IMG, DISKS_DIR, Image, Plan, Resolver, SocketDirs, Tap,
};
use crate::node::process::{self, Binaries};
use kube::ResourceExt;

/// Where the launcher container sees its VMI's host directory (the controller mounts it).
pub const CONTAINER_VMI_DIR: &str = crate::launcher::VMI_DIR;
/// The VMM's API socket in the VMI's directory.
pub const API_SOCKET: &str = "vmm.sock";
/// What the agent records about a started VMI, in the VMI's directory.
const STATE_FILE: &str = "agent.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plan(#[from] plan::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error(transparent)]
    Api(#[from] vmm_api::Error),
    #[error("cannot read the launcher's {0}: {1}")]
    Proc(PathBuf, #[source] std::io::Error),
    #[error("cannot write the agent's state {0}: {1}")]
    State(PathBuf, #[source] std::io::Error),
    #[error(
        "the VM runs but this agent has no record of starting it; delete the VMI's launcher pod to start it again"
    )]
    Unrecorded,
    #[error("cannot read the CNI records in {0}: {1}")]
    Cni(PathBuf, #[source] std::io::Error),
}

/// What the agent started for a VMI, kept in its directory so a restarted agent adopts it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Started {
    pub vmm_pid: i32,
    /// Backend name → pid.
    pub backends: BTreeMap<String, i32>,
    /// Backend name → its command line, to start it again if it dies (the VMM reconnects).
    #[serde(default)]
    pub commands: BTreeMap<String, Vec<String>>,
    pub interfaces: Vec<InterfaceStatus>,
    /// The VM was booted. Until then the record is of a start in progress, which a restarted
    /// agent resumes (an agent can be killed at any moment).
    #[serde(default)]
    pub booted: bool,
}

impl Started {
    pub fn load(dir: &Path) -> Option<Started> {
        let text = std::fs::read(dir.join(STATE_FILE)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn save(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_vec(self).unwrap_or_default();
        std::fs::write(&tmp, text).map_err(|e| Error::State(tmp.clone(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::State(path, e))
    }

    /// The VMM is still the process this record names.
    pub fn vmm_alive(&self, dir: &Path) -> bool {
        alive_with(self.vmm_pid, "ferrovirt-vmm", dir)
    }
}

/// `pid` lives and runs `program` with an argument under `dir` (guards against pid reuse).
fn alive_with(pid: i32, program: &str, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains(program)
        && (program == "ferrovirt-vmm" || cmdline.contains(&*dir.to_string_lossy()))
}

/// Resolves volumes inside the launcher's mount namespace and NICs from CNI records.
struct PodResolver<'a> {
    root: PathBuf,
    /// The VMI's host directory, for disks the agent makes (cloud-init, container disks).
    dir: &'a Path,
    /// cloud-init's instance-id (`<name>.<namespace>`, as KubeVirt) and hostname.
    instance_id: &'a str,
    hostname: &'a str,
    volumes: &'a VolumeSources,
    nics: &'a [AttachmentRecord],
    next_nic: usize,
}

impl Resolver for PodResolver<'_> {
    fn image(&mut self, volume: &Volume) -> Result<Image, plan::Error> {
        // The volume's directory (or device) as the launcher sees it; the backend opens images
        // there resolved inside the launcher's root, which the VMM can write to.
        let in_pod = Path::new(DISKS_DIR).join(&volume.name);
        let mounted = self.root.join(in_pod.strip_prefix("/").unwrap_or(&in_pod));
        if let Some(host) = &volume.host_disk {
            let file = Path::new(&host.path)
                .file_name()
                .ok_or_else(|| plan::unsupported(volume, "hostDisk.path names no file"))?;
            let create_size = match (host.type_, &host.capacity) {
                (HostDiskType::DiskOrCreate, Some(q)) => Some(plan::capacity(volume, q)?),
                _ => None,
            };
            return Ok(Image {
                path: in_pod.join(file),
                root: Some(self.root.clone()),
                create_size,
                ..Default::default()
            });
        }
        if let Some(empty) = &volume.empty_disk {
            return Ok(Image {
                path: in_pod.join(DISK_IMG),
                root: Some(self.root.clone()),
                create_size: Some(plan::capacity(volume, &empty.capacity)?),
                ..Default::default()
            });
        }
        if let Some(pvc) = &volume.persistent_volume_claim {
            let read_only = pvc.read_only == Some(true);
            // volumeMode: Block: the kubelet made the device node at the disk path.
            if std::fs::metadata(&mounted).is_ok_and(|m| m.file_type().is_block_device()) {
                return Ok(Image {
                    path: in_pod,
                    root: Some(self.root.clone()),
                    read_only,
                    ..Default::default()
                });
            }
            let fits = filesystem_disk_size(&mounted);
            let claimed = self.volumes.claim_sizes.get(&volume.name).copied();
            return Ok(Image {
                path: in_pod.join(DISK_IMG),
                root: Some(self.root.clone()),
                create_size: match (fits, claimed) {
                    (Some(fits), Some(claimed)) => Some(fits.min(claimed)),
                    (fits, claimed) => fits.or(claimed),
                },
                read_only,
                ..Default::default()
            });
        }
        if let Some(disk) = &volume.container_disk {
            let root = self
                .volumes
                .container_roots
                .get(&volume.name)
                .ok_or_else(|| {
                    plan::unsupported(
                        volume,
                        format!(
                            "the container of image {} is not running in the launcher pod",
                            disk.image
                        ),
                    )
                })?;
            return Ok(Image {
                path: in_pod.join(DISK_IMG),
                root: Some(self.root.clone()),
                copy_from: Some(container_disk_file(root, volume, disk)?),
                ..Default::default()
            });
        }
        let cidata = self.dir.join(format!("{}.cidata.img", volume.name));
        if let Some(image) = plan::nocloud_image(volume, cidata, self.instance_id, self.hostname) {
            return image;
        }
        Err(plan::unsupported(volume, "the volume has no source"))
    }

    fn tap(&mut self, interface: &Interface, _: &Network, _: usize) -> Result<Tap, plan::Error> {
        let refuse = |reason: String| plan::Error::Interface {
            interface: interface.name.clone(),
            reason,
        };
        if interface.binding.is_none() {
            return Err(refuse(
                "this node agent attaches vhost-user interfaces (binding: {name: vhostuser}); bridge, masquerade and sriov bindings are not served yet".into(),
            ));
        }
        let record = self.nics.get(self.next_nic).ok_or_else(|| {
            refuse(format!(
                "the launcher pod has {} ferrovirt-cni vhost-user attachment(s) and this is vhost-user interface {}; check the RuntimeClass's CNI configuration",
                self.nics.len(),
                self.next_nic + 1
            ))
        })?;
        self.next_nic += 1;
        let vhost = record
            .vhost_user
            .as_ref()
            .ok_or_else(|| refuse("its CNI record has no TAP".into()))?;
        Ok(Tap {
            name: vhost.tap.clone(),
            // ferrovirt-cni makes the TAP in the host's namespace and attaches it to the
            // eBPF switch there.
            netns: None,
            mtu: vhost.mtu.and_then(|m| u16::try_from(m).ok()),
            mac: vhost.mac.to_string().parse().ok(),
        })
    }
}

/// The disk file of a container disk whose container's root is `root`: `path`, else the
/// single file in `/disk`.
fn container_disk_file(
    root: &Path,
    volume: &Volume,
    disk: &ContainerDisk,
) -> Result<CopySource, plan::Error> {
    let source = |path: PathBuf| CopySource {
        root: root.to_owned(),
        path,
    };
    if let Some(path) = &disk.path {
        return Ok(source(PathBuf::from(path)));
    }
    let dir = root.join("disk");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| {
            plan::unsupported(
                volume,
                format!(
                    "image {} has no /disk directory ({e}); set containerDisk.path",
                    disk.image
                ),
            )
        })?
        .flatten()
        .map(|e| e.path())
        .collect();
    match files.as_slice() {
        [file] => Ok(source(
            Path::new("/disk").join(file.file_name().unwrap_or_default()),
        )),
        _ => Err(plan::unsupported(
            volume,
            format!(
                "image {} holds {} files in /disk; set containerDisk.path to the disk's",
                disk.image,
                files.len()
            ),
        )),
    }
}

/// 90 % of a filesystem volume, whole MiB: the most a claim's disk.img made on first use
/// gets (KubeVirt leaves the same room for file system overhead). The claim's capacity, if
/// smaller, is used instead.
fn filesystem_disk_size(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    let total = stat.blocks() as u64 * stat.fragment_size() as u64;
    let size = (total / 10 * 9) & !((1 << 20) - 1);
    (size > 0).then_some(size)
}

/// Makes each NIC's eBPF endpoint a TCX link before the VM sends: ferrovirt-cni attached a
/// cls_bpf filter, quick to attach but a qdisc hop slower per packet. A NIC whose swap fails
/// keeps its filter, which enforces the same rules.
fn link_endpoints(records: &[AttachmentRecord]) {
    for vhost in records.iter().filter_map(|r| r.vhost_user.as_ref()) {
        match ferrovirt_cni_plugin::vhost_user::link_endpoint(vhost) {
            Ok(true) => tracing::info!(tap = %vhost.tap, "endpoint filter swapped for a TCX link"),
            Ok(false) => {}
            Err(e) => tracing::warn!(tap = %vhost.tap, "endpoint stays a filter: {e}"),
        }
    }
}

/// ferrovirt-cni's vhost-user records for the network namespace `netns_inode`, by ifname.
fn cni_records(state_dir: &Path, netns_inode: u64) -> Result<Vec<AttachmentRecord>, Error> {
    let mut out = Vec::new();
    let networks = match std::fs::read_dir(state_dir) {
        Ok(dirs) => dirs,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::Cni(state_dir.to_owned(), e)),
    };
    for network in networks.flatten() {
        let Ok(files) = std::fs::read_dir(network.path()) else {
            continue;
        };
        for file in files.flatten() {
            let Ok(text) = std::fs::read(file.path()) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<AttachmentRecord>(&text) else {
                continue;
            };
            let recorded = record.netns_inode.or_else(|| {
                let path = record.netns.as_ref()?;
                std::fs::metadata(path).ok().map(|m| m.ino())
            });
            let same_netns = recorded == Some(netns_inode);
            if same_netns && record.vhost_user.is_some() {
                out.push(record);
            }
        }
    }
    out.sort_by(|a, b| a.ifname.cmp(&b.ifname));
    Ok(out)
}

/// The interfaces the guest has, as the VMI status reports them.
fn interface_status(plan: &Plan, records: &[AttachmentRecord]) -> Vec<InterfaceStatus> {
    plan.nets
        .iter()
        .enumerate()
        .map(|(i, net)| {
            let ips: Vec<String> = records
                .get(i)
                .and_then(|r| r.result.as_ref())
                .map(|r| r.ips.iter().map(|ip| ip.address.addr.to_string()).collect())
                .unwrap_or_default();
            InterfaceStatus {
                name: Some(net.name.clone()),
                ip_address: ips.first().cloned(),
                ip_addresses: ips,
                mac: Some(net.mac.to_string()),
                interface_name: records.get(i).map(|r| r.ifname.clone()),
            }
        })
        .collect()
}

/// Puts `pid` into the cgroups of `pod_of` (the VMM: its cgroups' parents are the pod's),
/// so the pod's limits and accounting cover it.
fn join_pod_cgroups(pid: u32, pod_of: i32) -> Result<(), Error> {
    let path = PathBuf::from(format!("/proc/{pod_of}/cgroup"));
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Proc(path.clone(), e))?;
    for line in text.lines() {
        // hierarchy-id:controllers:path (cgroup v1), 0::path (v2).
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(cgroup)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Some(pod) = Path::new(cgroup).parent() else {
            continue;
        };
        let mount = if controllers.is_empty() {
            PathBuf::from("/sys/fs/cgroup/unified")
        } else if let Some(name) = controllers.strip_prefix("name=") {
            PathBuf::from("/sys/fs/cgroup").join(name)
        } else {
            PathBuf::from("/sys/fs/cgroup").join(controllers)
        };
        let procs = mount
            .join(pod.strip_prefix("/").unwrap_or(pod))
            .join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, pid.to_string()) {
            tracing::debug!(path = %procs.display(), "cannot join cgroup: {e}");
        }
    }
    Ok(())
}

/// What to do with one VMI on this node.
pub struct Launch<'a> {
    pub bin: &'a Binaries,
    pub dir: &'a Path,
    pub cni_state_dir: &'a Path,
    pub volumes: &'a VolumeSources,
}

/// What the agent learnt about the VMI's volumes from the API server and the pod.
#[derive(Debug, Default)]
pub struct VolumeSources {
    /// Volume name → the capacity of its PersistentVolumeClaim, in bytes.
    pub claim_sizes: BTreeMap<String, u64>,
    /// Volume name → the root file system of its containerDisk's container
    /// (`/proc/PID/root`).
    pub container_roots: BTreeMap<String, PathBuf>,
}

/// The pid of a process of the container `container_id` (its cgroup path names the ID, as
/// with containerd and runc under both cgroup drivers).
pub fn container_pid(container_id: &str) -> Option<i32> {
    if container_id.len() < 12 {
        return None;
    }
    host_pids().find(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|c| c.contains(container_id))
    })
}

/// Children the agent started; reaped so they leave no zombies.
pub type Children = std::sync::Mutex<Vec<std::process::Child>>;

impl Launch<'_> {
    /// Starts the VMI's backends and boots its VM in the launcher's VMM; what was started.
    pub async fn start(
        &self,
        vmi: &VirtualMachineInstance,
        children: &Children,
    ) -> Result<Started, Error> {
        let hostname = vmi.name_any();
        let instance_id = format!("{hostname}.{}", vmi.namespace().unwrap_or_default());
        let api = self.dir.join(API_SOCKET);
        let vmm_pid = vmm_api::peer_pid(&api).await?;
        let state = vmm_api::vm_state(&api).await?;
        if matches!(state, Some(VmState::Running | VmState::Paused)) {
            // An agent was killed between the boot and its record of it: adopt.
            let mut started = Started::load(self.dir)
                .filter(|s| s.vmm_pid == vmm_pid)
                .ok_or(Error::Unrecorded)?;
            started.booted = true;
            started.save(self.dir)?;
            return Ok(started);
        }
        // Backends of a start that an earlier agent did not finish: their sockets are about to
        // be replaced, so they could only linger.
        stop_backends(self.dir).await;
        let netns = PathBuf::from(format!("/proc/{vmm_pid}/ns/net"));
        let netns_inode = std::fs::metadata(&netns)
            .map_err(|e| Error::Proc(netns.clone(), e))?
            .ino();
        let records = cni_records(self.cni_state_dir, netns_inode)?;
        let plan = plan::plan(
            &vmi.spec,
            &mut PodResolver {
                root: PathBuf::from(format!("/proc/{vmm_pid}/root")),
                dir: self.dir,
                instance_id: &instance_id,
                hostname: &hostname,
                volumes: self.volumes,
                nics: &records,
                next_nic: 0,
            },
            &SocketDirs {
                host: self.dir.to_owned(),
                vmm: PathBuf::from(CONTAINER_VMI_DIR),
            },
            Path::new("/"),
        )?;
        let mut started = Started {
            vmm_pid,
            backends: BTreeMap::new(),
            commands: BTreeMap::new(),
            interfaces: interface_status(&plan, &records),
            booted: false,
        };
        tokio::task::block_in_place(|| {
            link_endpoints(&records);
            self.spawn_backends(&plan, vmm_pid, &mut started, children)
        })?;
        if state.is_none() {
            let config = serde_json::to_vec(&plan.vm).unwrap_or_default();
            vmm_api::request(&api, "PUT", "vm.create", Some(&config)).await?;
        }
        vmm_api::request(&api, "PUT", "vm.boot", None).await?;
        started.booted = true;
        started.save(self.dir)?;
        Ok(started)
    }

    fn spawn_backends(
        &self,
        plan: &Plan,
        vmm_pid: i32,
        started: &mut Started,
        children: &Children,
    ) -> Result<(), Error> {
        let mut commands = Vec::new();
        for disk in &plan.disks {
            process::prepare_image(&disk.image)?;
            commands.push((
                format!("disk-{}", disk.name),
                process::blk_command(self.bin, disk),
                &disk.socket,
            ));
        }
        for net in &plan.nets {
            commands.push((
                format!("net-{}", net.name),
                process::net_command(self.bin, net),
                &net.socket,
            ));
        }
        // Recorded before each backend starts and after, so a teardown or a restarted agent
        // finds every backend (those it misses are found by their command lines).
        started.save(self.dir)?;
        for (name, cmd, socket) in commands {
            let argv: Vec<String> = std::iter::once(cmd.get_program())
                .chain(cmd.get_args())
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let pid = spawn_backend(self.dir, &name, cmd, socket, vmm_pid, children)?;
            started.commands.insert(name.clone(), argv);
            started.backends.insert(name, pid);
            started.save(self.dir)?;
        }
        Ok(())
    }
}

/// Starts one backend with its output in `<dir>/<name>.log`, in the cgroups of the pod of
/// `vmm_pid`; waits until it listens on `socket`. Its pid.
fn spawn_backend(
    dir: &Path,
    name: &str,
    mut cmd: std::process::Command,
    socket: &Path,
    vmm_pid: i32,
    children: &Children,
) -> Result<i32, Error> {
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::State(log_path.clone(), e))?;
    let err = log.try_clone().map_err(|e| Error::State(log_path, e))?;
    cmd.stdout(log).stderr(err);
    let child = process::spawn_listening(name, cmd, socket, BACKEND_START, |pid| {
        if let Err(e) = join_pod_cgroups(pid, vmm_pid) {
            tracing::warn!(backend = %name, "cannot move into the pod's cgroups: {e}");
        }
    })?;
    let pid = child.id() as i32;
    if let Ok(mut list) = children.lock() {
        list.push(child);
    }
    Ok(pid)
}

/// Starts again every backend of a running VMI that has died (the VMM reconnects to the new
/// one and the guest's I/O goes on); how many.
pub fn respawn_dead_backends(dir: &Path, children: &Children) -> Result<usize, Error> {
    let Some(mut started) = Started::load(dir) else {
        return Ok(0);
    };
    if !started.booted || !started.vmm_alive(dir) {
        // A start in progress starts its own backends.
        return Ok(0);
    }
    let mut respawned = 0;
    for (name, argv) in started.commands.clone() {
        let pid = started.backends.get(&name).copied().unwrap_or(0);
        if alive_with(pid, "ferrovirt-vhost", dir) {
            continue;
        }
        let Some((program, args)) = argv.split_first() else {
            continue;
        };
        let Some(socket) = args
            .iter()
            .position(|a| a == "--socket")
            .and_then(|i| args.get(i + 1))
        else {
            continue;
        };
        tracing::warn!(backend = %name, pid, dir = %dir.display(), "backend died; starting it again");
        let mut cmd = std::process::Command::new(program);
        cmd.args(args);
        let pid = spawn_backend(
            dir,
            &name,
            cmd,
            Path::new(socket),
            started.vmm_pid,
            children,
        )?;
        started.backends.insert(name, pid);
        started.save(dir)?;
        respawned += 1;
    }
    Ok(respawned)
}

/// How long a backend gets to start listening.
const BACKEND_START: Duration = Duration::from_secs(10);
/// How long a backend gets to stop after SIGTERM.
const BACKEND_STOP: Duration = Duration::from_secs(5);

/// Stops every backend of the VMI and removes its directory.
pub async fn teardown(dir: &Path) {
    stop_backends(dir).await;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tracing::info!(dir = %dir.display(), "VMI cleaned up"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), "cannot remove: {e}"),
    }
}

/// Stops every backend serving the VMI of `dir`: SIGTERM, then SIGKILL after
/// [`BACKEND_STOP`]. They are found by their command lines, which name their sockets in `dir`,
/// so backends an interrupted start did not record are found too.
async fn stop_backends(dir: &Path) {
    let pids = backends_of(dir);
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + BACKEND_STOP;
    for pid in pids {
        while alive_with(pid, "ferrovirt-vhost", dir) {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(pid, dir = %dir.display(), "backend did not stop on SIGTERM; killing it");
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The pids of the backends whose command lines name `dir`.
fn backends_of(dir: &Path) -> Vec<i32> {
    host_pids()
        .filter(|pid| alive_with(*pid, "ferrovirt-vhost", dir))
        .collect()
}

/// Every process id in /proc (the agent runs in the host's PID namespace).
fn host_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
}
