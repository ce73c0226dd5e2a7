//! `fvctl run vm.yaml`: a VirtualMachine (or VirtualMachineInstance) manifest run on this host
//! with no cluster, through the same launch plan as the node agent: its disk backends, its NIC
//! backends on TAPs made here, and the VMM with the serial console on this terminal. Everything
//! made is removed when the VM ends, on Ctrl-C, SIGTERM or SIGHUP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use ferrovirt_cni_plugin::netlink::{LinkChange, Netlink};
use ferrovirt_cni_plugin::tap::{TapSpec, create_tap};
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};

use super::plan::{self, Image, Plan, Resolver, SocketDirs, Tap};
use super::process::{self, Binaries, Guarded};
use crate::crd::spec::{HostDiskType, Interface, Network, Volume};
use crate::crd::vmi::VirtualMachineInstanceSpec;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a VM manifest: {1}")]
    Parse(PathBuf, String),
    #[error(
        "{0} holds no VirtualMachine or VirtualMachineInstance (apiVersion ferrovirt.io/v1alpha1 or kubevirt.io/v1)"
    )]
    NoVm(PathBuf),
    #[error("the manifest's metadata.name is missing or not a DNS label (a-z, 0-9, '-')")]
    Name,
    #[error(
        "VM {name} is already running under fvctl run (pid {pid}); stop that one first or rename this one"
    )]
    Running { name: String, pid: i32 },
    #[error("cannot use the state directory {0}: {1}")]
    StateDir(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Plan(#[from] plan::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error("cannot make TAP {0} for interface {1}: {2}")]
    Tap(String, String, String),
    #[error("cannot write the VMM's configuration {0}: {1}")]
    Config(PathBuf, #[source] std::io::Error),
    #[error("cannot watch for signals: {0}")]
    Signals(#[source] std::io::Error),
}

/// `fvctl run`'s flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A VirtualMachine or VirtualMachineInstance manifest (YAML or JSON; the first such
    /// document is run). hostDisk and emptyDisk volumes are served; each interface gets a TAP
    /// named fv<hash>n<index> on this host (bring it into a bridge to reach the guest).
    pub manifest: PathBuf,
    /// Where ferrovirt-vmm, ferrovirt-vhost-blk and ferrovirt-vhost-net are (default: next to
    /// fvctl, then PATH).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Directory for each running VM's sockets, empty disks and configuration.
    #[arg(long, value_name = "DIR", default_value = "/run/ferrovirt/fvctl")]
    pub state_dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Deserialize, Default)]
struct Metadata {
    #[serde(default)]
    name: String,
}

/// The name and VMI spec of the first VM in `text`.
pub fn parse_manifest(
    path: &Path,
    text: &str,
) -> Result<(String, VirtualMachineInstanceSpec), Error> {
    let parse = |e: serde_yaml::Error| Error::Parse(path.to_owned(), e.to_string());
    for doc in serde_yaml::Deserializer::from_str(text) {
        let doc = Document::deserialize(doc).map_err(parse)?;
        let group_ok = matches!(
            doc.api_version.as_str(),
            "ferrovirt.io/v1alpha1" | "kubevirt.io/v1"
        );
        let spec = match doc.kind.as_str() {
            "VirtualMachine" if group_ok => doc
                .spec
                .get("template")
                .and_then(|t| t.get("spec"))
                .cloned()
                .ok_or_else(|| {
                    Error::Parse(path.to_owned(), "spec.template.spec is missing".into())
                })?,
            "VirtualMachineInstance" if group_ok => doc.spec,
            _ => continue,
        };
        let spec: VirtualMachineInstanceSpec = serde_yaml::from_value(spec).map_err(parse)?;
        let name = doc.metadata.name;
        let label = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !label {
            return Err(Error::Name);
        }
        return Ok((name, spec));
    }
    Err(Error::NoVm(path.to_owned()))
}

/// The name of a standalone VM's `index`th TAP: `fv`, 8 hex digits of the VM's name, `n` and the
/// index (at most 15 bytes, as Linux wants).
pub fn tap_name(vm: &str, index: usize) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for b in vm.bytes() {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("fv{hash:08x}n{index}")
}

struct HostResolver<'a> {
    vm: &'a str,
    dir: &'a Path,
}

impl Resolver for HostResolver<'_> {
    fn image(&mut self, volume: &Volume) -> Result<Image, plan::Error> {
        if let Some(host) = &volume.host_disk {
            let create_size = match (host.type_, &host.capacity) {
                (HostDiskType::Disk, _) => None,
                (HostDiskType::DiskOrCreate, Some(q)) => Some(plan::capacity(volume, q)?),
                (HostDiskType::DiskOrCreate, None) => {
                    return Err(plan::unsupported(
                        volume,
                        "hostDisk type DiskOrCreate needs a capacity",
                    ));
                }
            };
            return Ok(Image {
                path: PathBuf::from(&host.path),
                create_size,
                ..Default::default()
            });
        }
        if let Some(empty) = &volume.empty_disk {
            return Ok(Image {
                path: self.dir.join(format!("{}.img", volume.name)),
                create_size: Some(plan::capacity(volume, &empty.capacity)?),
                ..Default::default()
            });
        }
        let cidata = self.dir.join(format!("{}.cidata.img", volume.name));
        if let Some(image) = plan::nocloud_image(volume, cidata, self.vm, self.vm) {
            return image;
        }
        Err(plan::unsupported(
            volume,
            "fvctl run serves hostDisk, emptyDisk and cloudInitNoCloud volumes; containerDisk and persistentVolumeClaim need a cluster",
        ))
    }

    fn tap(
        &mut self,
        interface: &Interface,
        network: &Network,
        index: usize,
    ) -> Result<Tap, plan::Error> {
        let refuse = |reason: &str| plan::Error::Interface {
            interface: interface.name.clone(),
            reason: reason.to_owned(),
        };
        if network.pod.is_none() {
            return Err(refuse(
                "fvctl run has no Multus networks; use a pod network (it becomes a TAP on this host)",
            ));
        }
        if interface.masquerade.is_some() || interface.sriov.is_some() {
            return Err(refuse(
                "fvctl run supports the bridge and vhostuser bindings (a TAP on this host); masquerade and sriov need a cluster",
            ));
        }
        Ok(Tap {
            name: tap_name(self.vm, index),
            netns: None,
            mtu: None,
            mac: None,
        })
    }
}

/// A TAP this run made, deleted when dropped.
struct OwnedTap(String);

impl OwnedTap {
    fn create(name: &str, interface: &str) -> Result<OwnedTap, Error> {
        let fail = |e: String| Error::Tap(name.to_owned(), interface.to_owned(), e);
        let mut netlink = Netlink::open().map_err(|e| fail(e.to_string()))?;
        if netlink
            .link(name, false)
            .map_err(|e| fail(e.to_string()))?
            .is_some()
        {
            return Err(fail(
                "a link of that name exists (another fvctl run of the same VM name, or a leftover: `ip link del` it)".into(),
            ));
        }
        create_tap(
            name,
            TapSpec {
                queues: 1,
                owner: None,
                group: None,
            },
        )
        .map_err(|e| fail(e.to_string()))?;
        let tap = OwnedTap(name.to_owned());
        let link = netlink
            .link(name, false)
            .map_err(|e| fail(e.to_string()))?
            .ok_or_else(|| fail("it vanished after creation".into()))?;
        netlink
            .set_link(
                link.index,
                &LinkChange {
                    up: Some(true),
                    ..LinkChange::default()
                },
            )
            .map_err(|e| fail(e.to_string()))?;
        Ok(tap)
    }
}

impl Drop for OwnedTap {
    fn drop(&mut self) {
        // Waiting for the whole unregistration (~20 ms): a run leaves no process behind.
        let deleted = Netlink::open().and_then(|mut n| match n.link(&self.0, false)? {
            Some(link) => n.delete_link(link.index),
            None => Ok(()),
        });
        if let Err(e) = deleted {
            tracing::warn!(tap = %self.0, "cannot delete TAP: {e}");
        }
    }
}

/// The VM's state directory, removed when dropped; holds `pid` so a second run of the same
/// name is refused while this one lives.
struct StateDir(PathBuf);

impl StateDir {
    fn claim(root: &Path, name: &str) -> Result<StateDir, Error> {
        let dir = root.join(name);
        let err = |e| Error::StateDir(dir.clone(), e);
        std::fs::create_dir_all(root).map_err(err)?;
        if let Ok(pid) = std::fs::read_to_string(dir.join("pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
            && Path::new(&format!("/proc/{pid}")).exists()
        {
            return Err(Error::Running {
                name: name.to_owned(),
                pid,
            });
        }
        // A leftover of a run that was killed: nothing in it is alive any more.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(err)?;
        let claimed = StateDir(dir.clone());
        std::fs::write(dir.join("pid"), std::process::id().to_string()).map_err(err)?;
        Ok(claimed)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), "cannot remove: {e}");
        }
    }
}

/// How long backends get to start listening.
const BACKEND_START: Duration = Duration::from_secs(10);
/// How long the VMM gets to stop after SIGTERM before it is killed.
const VMM_STOP: Duration = Duration::from_secs(30);

/// Runs the manifest's VM until it ends; the VMM's exit status (128+N when a signal stopped it).
pub async fn run(args: &RunArgs) -> Result<u8, Error> {
    let text = std::fs::read_to_string(&args.manifest)
        .map_err(|e| Error::Read(args.manifest.clone(), e))?;
    let (name, spec) = parse_manifest(&args.manifest, &text)?;
    let bin = Binaries::find(args.bin_dir.as_deref())?;
    let vmm_program = process::find_program(args.bin_dir.as_deref(), "ferrovirt-vmm")?;
    let state = StateDir::claim(&args.state_dir, &name)?;
    let plan = plan::plan(
        &spec,
        &mut HostResolver {
            vm: &name,
            dir: &state.0,
        },
        &SocketDirs::same(&state.0),
        Path::new("/"),
    )?;
    // Declared in this order so they drop in reverse: VMM first, then backends, TAPs, the
    // directory.
    let (_taps, _backends) = start_backends(&bin, &plan, &spec)?;
    let config = state.0.join("vm.json");
    let json = serde_json::to_vec_pretty(&plan.vm).unwrap_or_default();
    std::fs::write(&config, json).map_err(|e| Error::Config(config.clone(), e))?;
    tracing::info!(vm = %name, disks = plan.disks.len(), nets = plan.nets.len(), "starting the VMM");
    let status = run_vmm(&vmm_program, &config).await?;
    Ok(status)
}

fn start_backends(
    bin: &Binaries,
    plan: &Plan,
    spec: &VirtualMachineInstanceSpec,
) -> Result<(Vec<OwnedTap>, Vec<Guarded>), Error> {
    let mut taps = Vec::new();
    for (net, interface) in plan.nets.iter().zip(&spec.domain.devices.interfaces) {
        taps.push(OwnedTap::create(&net.tap.name, &interface.name)?);
    }
    let quiet = |mut cmd: std::process::Command| {
        if std::env::var_os("FERROVIRT_LOG").is_none() {
            // Their start and stop notes would interleave with the guest's console.
            cmd.env("FERROVIRT_LOG", "warn");
        }
        cmd
    };
    let mut backends = Vec::new();
    for disk in &plan.disks {
        process::prepare_image(&disk.image)?;
        backends.push(Guarded::spawn_listening(
            format!("ferrovirt-vhost-blk for disk {}", disk.name),
            quiet(process::blk_command(bin, disk)),
            &disk.socket,
            BACKEND_START,
        )?);
    }
    for net in &plan.nets {
        backends.push(Guarded::spawn_listening(
            format!("ferrovirt-vhost-net for interface {}", net.name),
            quiet(process::net_command(bin, net)),
            &net.socket,
            BACKEND_START,
        )?);
    }
    Ok((taps, backends))
}

async fn run_vmm(vmm_program: &Path, config: &Path) -> Result<u8, Error> {
    let mut vmm = tokio::process::Command::new(vmm_program)
        .arg("--config")
        .arg(config)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| process::Error::Spawn("ferrovirt-vmm".into(), e))?;
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(Error::Signals)?;
    let stop = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
    };
    let status = tokio::select! {
        status = vmm.wait() => status,
        () = stop => {
            // A terminal's Ctrl-C reached the VMM too; SIGTERM covers a signal sent to us alone.
            if let Some(pid) = vmm.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            match tokio::time::timeout(VMM_STOP, vmm.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    tracing::warn!("the VMM did not stop within {VMM_STOP:?}; killing it");
                    let _ = vmm.kill().await;
                    vmm.wait().await
                }
            }
        }
    }
    .map_err(|e| process::Error::Spawn("ferrovirt-vmm".into(), e))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => 128u8.saturating_add(u8::try_from(sig).unwrap_or(0)),
        (None, None) => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_vm_document_is_taken() {
        let text = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: other}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: demo}
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        memory: {guest: 64Mi}
        devices: {}
"#;
        let (name, spec) = parse_manifest(Path::new("m.yaml"), text).unwrap();
        assert_eq!(name, "demo");
        assert_eq!(spec.domain.memory.unwrap().guest.unwrap().0, "64Mi");
    }

    #[test]
    fn manifests_without_a_vm_or_with_a_bad_name_are_refused() {
        let err = parse_manifest(Path::new("m.yaml"), "kind: Pod\napiVersion: v1\n").unwrap_err();
        assert!(err.to_string().contains("holds no VirtualMachine"), "{err}");
        let text = "apiVersion: ferrovirt.io/v1alpha1\nkind: VirtualMachineInstance\nmetadata: {name: Bad_Name}\nspec: {domain: {}}\n";
        let err = parse_manifest(Path::new("m.yaml"), text).unwrap_err();
        assert!(matches!(err, Error::Name), "{err}");
        let err = parse_manifest(Path::new("m.yaml"), "a: [").unwrap_err();
        assert!(
            err.to_string().starts_with("m.yaml is not a VM manifest"),
            "{err}"
        );
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_differ_per_vm() {
        let a = tap_name("a-very-long-vm-name-that-goes-on-and-on", 31);
        assert!(a.len() <= 15, "{a}");
        assert_ne!(tap_name("a", 0), tap_name("b", 0));
        assert_ne!(tap_name("a", 0), tap_name("a", 1));
    }
}
