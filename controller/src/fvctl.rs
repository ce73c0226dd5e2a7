//! `fvctl`: start, stop and restart VMs (run-strategy changes as virtctl makes them), attach to
//! a VMI's serial console through the API server, and request migrations.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::controllers::vm::STATE_CHANGE;
use crate::crd::migration::VirtualMachineInstanceMigrationSpec;
use crate::crd::{
    MigrationPhase, RunStrategy, VirtualMachine, VirtualMachineInstance,
    VirtualMachineInstanceMigration, VmiPhase,
};
use crate::launcher;
use crate::node::standalone::{self, RunArgs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no usable cluster configuration: {0} (pass --kubeconfig or set KUBECONFIG)")]
    Infer(String),
    #[error("cannot reach the API server: {0}")]
    Client(kube::Error),
    #[error("{kind} {namespace}/{name} not found (check the name and -n NAMESPACE)")]
    NotFound {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("{0}")]
    Refused(String),
    #[error("API request failed: {0}")]
    Api(#[from] kube::Error),
    #[error(
        "timed out after {0:?} waiting for {1}; it may still get there: check `kubectl get vm,vmi`"
    )]
    Timeout(Duration, String),
    #[error("{0}")]
    Failed(String),
    #[error("console: {0}")]
    Console(String),
}

impl Error {
    fn exit_code(&self) -> u8 {
        match self {
            Error::Timeout(..) => 3,
            Error::NotFound { .. } => 4,
            _ => 1,
        }
    }
}

/// fvctl: control ferrovirt VMs.
///
/// Exit status: 0 done; 1 error (message on stderr); 2 bad usage; 3 timed out waiting;
/// 4 the VM/VMI does not exist.
#[derive(Debug, Parser)]
#[command(name = "fvctl", version)]
pub struct Cli {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the cluster, as kubectl's flags.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace (default: the context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// How long to wait for the effect of a command, e.g. 90s, 5m.
    #[arg(long, global = true, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a VM: runStrategy Halted becomes Always; Manual, RerunOnFailure and Once VMs get a
    /// start request. Waits until its VMI is scheduled on a node.
    Start {
        vm: String,
        /// Return once the request is recorded.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a VM: runStrategy becomes Halted (Manual VMs get a stop request). Waits until the
    /// VMI is gone.
    Stop {
        vm: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Restart a VM: its VMI is deleted and the controller starts a new one. Waits until the new
    /// VMI is scheduled.
    Restart {
        vm: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Attach to a VMI's serial console through the API server (Ctrl+] detaches).
    Console { vmi: String },
    /// Migrate a running VMI to another node: creates a VirtualMachineInstanceMigration and
    /// waits for its outcome.
    Migrate {
        vmi: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Run a VirtualMachine manifest on this host with no cluster: its disk and NIC backends
    /// and the VMM, the serial console on this terminal, until the guest ends or Ctrl-C; then
    /// everything it made is removed. Exits with the VMM's status (see ferrovirt-vmm --help).
    Run(RunArgs),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration; use a number with s, m or h (e.g. 90s, 5m)");
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs))
}

pub fn main(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fvctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Run(args) = &cli.command {
        return match runtime.block_on(standalone::run(args)) {
            Ok(status) => ExitCode::from(status),
            Err(e) => {
                eprintln!("fvctl run: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fvctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn client(args: &ClusterArgs) -> Result<(Client, String), Error> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => Config::infer()
            .await
            .map_err(|e| Error::Infer(e.to_string()))?,
    };
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(Error::Client)?;
    Ok((client, namespace))
}

struct Session {
    client: Client,
    ns: String,
    timeout: Duration,
}

async fn run(cli: Cli) -> Result<(), Error> {
    let (client, ns) = client(&cli.cluster).await?;
    let s = Session {
        client,
        ns,
        timeout: cli.cluster.timeout,
    };
    match cli.command {
        Command::Start { vm, no_wait } => s.start(&vm, no_wait).await,
        Command::Stop { vm, no_wait } => s.stop(&vm, no_wait).await,
        Command::Restart { vm, no_wait } => s.restart(&vm, no_wait).await,
        Command::Console { vmi } => s.console(&vmi).await,
        Command::Migrate { vmi, no_wait } => s.migrate(&vmi, no_wait).await,
        Command::Run(_) => unreachable!("fvctl run needs no cluster and is handled first"),
    }
}

/// How a stop or start is expressed for a VM's run strategy.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Set runStrategy (or the deprecated running field, when that is what the VM uses).
    Strategy(RunStrategy),
    Running(bool),
    /// Leave a one-shot request for the controller.
    Request(&'static str),
}

/// virtctl's table: what `start` does to a VM.
pub fn start_change(vm: &VirtualMachine) -> Result<Change, String> {
    let uses_running = vm.spec.run_strategy.is_none() && vm.spec.running.is_some();
    match vm.spec.effective_run_strategy() {
        RunStrategy::Halted if uses_running => Ok(Change::Running(true)),
        RunStrategy::Halted => Ok(Change::Strategy(RunStrategy::Always)),
        RunStrategy::Always => Err(format!(
            "VM {} is already set to run (runStrategy Always)",
            vm.name_any()
        )),
        RunStrategy::Manual | RunStrategy::RerunOnFailure | RunStrategy::Once => {
            Ok(Change::Request("Start"))
        }
    }
}

/// virtctl's table: what `stop` does to a VM (`has_vmi`: it has a VMI now).
pub fn stop_change(vm: &VirtualMachine, has_vmi: bool) -> Result<Change, String> {
    let uses_running = vm.spec.run_strategy.is_none() && vm.spec.running.is_some();
    match vm.spec.effective_run_strategy() {
        RunStrategy::Halted if !has_vmi => Err(format!("VM {} is not running", vm.name_any())),
        RunStrategy::Halted => Ok(Change::Strategy(RunStrategy::Halted)),
        RunStrategy::Manual => Ok(Change::Request("Stop")),
        _ if uses_running => Ok(Change::Running(false)),
        _ => Ok(Change::Strategy(RunStrategy::Halted)),
    }
}

impl Session {
    fn vms(&self) -> Api<VirtualMachine> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    fn vmis(&self) -> Api<VirtualMachineInstance> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn get_vm(&self, name: &str) -> Result<VirtualMachine, Error> {
        self.vms()
            .get_opt(name)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "VirtualMachine",
                namespace: self.ns.clone(),
                name: name.to_owned(),
            })
    }

    async fn apply_change(&self, vm: &VirtualMachine, change: Change) -> Result<(), Error> {
        let patch = match change {
            Change::Strategy(s) => json!({"spec": {"runStrategy": s.as_str(), "running": null}}),
            Change::Running(r) => json!({"spec": {"running": r}}),
            Change::Request(r) => json!({"metadata": {"annotations": {STATE_CHANGE: r}}}),
        };
        self.vms()
            .patch(
                &vm.name_any(),
                &PatchParams {
                    field_manager: Some("fvctl".into()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await?;
        Ok(())
    }

    /// Polls `check` every 250 ms until it returns Some, printing each new progress line.
    async fn wait<T, F, Fut>(&self, what: &str, mut check: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(Option<T>, String), Error>>,
    {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            let (done, progress) = check().await?;
            if progress != last {
                eprintln!("{:>6.1}s  {progress}", start.elapsed().as_secs_f64());
                last = progress;
            }
            if let Some(v) = done {
                return Ok(v);
            }
            if start.elapsed() > self.timeout {
                return Err(Error::Timeout(self.timeout, what.to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the VM's VMI (other than `old_uid`) is Scheduled or Running.
    async fn wait_started(&self, name: &str, old_uid: Option<String>) -> Result<(), Error> {
        self.wait(&format!("VMI {name} to be scheduled"), || {
            let old_uid = old_uid.clone();
            async move {
                let vmi = self.vmis().get_opt(name).await?;
                let Some(vmi) = vmi.filter(|v| v.uid() != old_uid) else {
                    return Ok((None, "waiting for the VMI".to_owned()));
                };
                let phase = vmi.phase();
                let reason = vmi
                    .status
                    .as_ref()
                    .and_then(|s| s.reason.clone())
                    .unwrap_or_default();
                match phase {
                    VmiPhase::Scheduled | VmiPhase::Running => {
                        Ok((Some(()), format!("VMI {name} is {}", phase.as_str())))
                    }
                    VmiPhase::Failed => Err(Error::Failed(format!("VMI {name} failed: {reason}"))),
                    p => Ok((None, format!("VMI {name} is {}", p.as_str()))),
                }
            }
        })
        .await
    }

    async fn start(&self, name: &str, no_wait: bool) -> Result<(), Error> {
        let vm = self.get_vm(name).await?;
        let vmi = self.vmis().get_opt(name).await?;
        let change = start_change(&vm).map_err(Error::Refused)?;
        // A finished VMI is replaced; wait for the new one.
        let old_uid = vmi.filter(|v| v.phase().is_final()).and_then(|v| v.uid());
        self.apply_change(&vm, change).await?;
        if no_wait {
            return Ok(());
        }
        self.wait_started(name, old_uid).await?;
        println!("VM {name} started");
        Ok(())
    }

    async fn wait_gone(&self, name: &str, uid: Option<String>) -> Result<(), Error> {
        self.wait(&format!("VMI {name} to stop"), || {
            let uid = uid.clone();
            async move {
                match self.vmis().get_opt(name).await? {
                    Some(v) if v.uid() == uid || uid.is_none() => {
                        Ok((None, format!("VMI {name} is stopping")))
                    }
                    _ => Ok((Some(()), format!("VMI {name} is gone"))),
                }
            }
        })
        .await
    }

    async fn stop(&self, name: &str, no_wait: bool) -> Result<(), Error> {
        let vm = self.get_vm(name).await?;
        let vmi = self.vmis().get_opt(name).await?;
        let change = stop_change(&vm, vmi.is_some()).map_err(Error::Refused)?;
        self.apply_change(&vm, change).await?;
        if no_wait {
            return Ok(());
        }
        self.wait_gone(name, None).await?;
        println!("VM {name} stopped");
        Ok(())
    }

    async fn restart(&self, name: &str, no_wait: bool) -> Result<(), Error> {
        let vm = self.get_vm(name).await?;
        if vm.spec.effective_run_strategy() == RunStrategy::Halted {
            return Err(Error::Refused(format!(
                "VM {name} is stopped; start it with `fvctl start {name}`"
            )));
        }
        let vmi = self.vmis().get_opt(name).await?;
        let Some(vmi) = vmi else {
            return Err(Error::Refused(format!(
                "VM {name} has no VMI to restart; start it with `fvctl start {name}`"
            )));
        };
        let uid = vmi.uid();
        if vm.spec.effective_run_strategy() != RunStrategy::Always {
            self.apply_change(&vm, Change::Request("Start")).await?;
        }
        match self.vmis().delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        if no_wait {
            return Ok(());
        }
        self.wait_started(name, uid).await?;
        println!("VM {name} restarted");
        Ok(())
    }

    async fn migrate(&self, name: &str, no_wait: bool) -> Result<(), Error> {
        if self.vmis().get_opt(name).await?.is_none() {
            return Err(Error::NotFound {
                kind: "VirtualMachineInstance",
                namespace: self.ns.clone(),
                name: name.to_owned(),
            });
        }
        let api: Api<VirtualMachineInstanceMigration> =
            Api::namespaced(self.client.clone(), &self.ns);
        let vmim = VirtualMachineInstanceMigration {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}-migration-")),
                ..Default::default()
            },
            spec: VirtualMachineInstanceMigrationSpec {
                vmi_name: name.to_owned(),
            },
            status: None,
        };
        let created = api.create(&PostParams::default(), &vmim).await?;
        let mig = created.name_any();
        println!("created VirtualMachineInstanceMigration {mig}");
        if no_wait {
            return Ok(());
        }
        let (phase, reason) = self
            .wait(&format!("migration {mig}"), || async {
                let m = api.get_opt(&mig).await?;
                let Some(m) = m else {
                    return Err(Error::Failed(format!("migration {mig} was deleted")));
                };
                let phase = m.phase();
                let reason = m.status.as_ref().and_then(|s| s.reason.clone());
                let line = format!("migration {mig} is {}", phase.as_str());
                Ok((phase.is_final().then_some((phase, reason)), line))
            })
            .await?;
        match phase {
            MigrationPhase::Succeeded => Ok(()),
            _ => Err(Error::Failed(format!(
                "migration {mig} failed: {}",
                reason.unwrap_or_default()
            ))),
        }
    }

    async fn console(&self, name: &str) -> Result<(), Error> {
        let vmi = self
            .vmis()
            .get_opt(name)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "VirtualMachineInstance",
                namespace: self.ns.clone(),
                name: name.to_owned(),
            })?;
        let pod_name = vmi
            .status
            .as_ref()
            .and_then(|s| s.launcher_pod.clone())
            .unwrap_or_else(|| launcher::pod_name(name));
        if !matches!(vmi.phase(), VmiPhase::Scheduled | VmiPhase::Running) {
            return Err(Error::Refused(format!(
                "VMI {name} is {}; its console exists once it is Scheduled or Running",
                vmi.phase().as_str()
            )));
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let mut attached = pods
            .attach(
                &pod_name,
                &AttachParams::interactive_tty().container(launcher::COMPUTE),
            )
            .await?;
        let mut remote_in = attached
            .stdin()
            .ok_or_else(|| Error::Console("no stdin stream".into()))?;
        let mut remote_out = attached
            .stdout()
            .ok_or_else(|| Error::Console("no stdout stream".into()))?;
        let _raw = RawTerminal::enter();
        eprintln!("connected to VMI {name}'s serial console; Ctrl+] detaches\r");
        let input = async {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 1024];
            loop {
                let n = stdin
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::Console(e.to_string()))?;
                if n == 0 {
                    // Input ended (a pipe): keep showing output until the remote side ends.
                    std::future::pending::<()>().await;
                }
                if let Some(pos) = buf[..n].iter().position(|&b| b == 0x1d) {
                    remote_in
                        .write_all(&buf[..pos])
                        .await
                        .map_err(|e| Error::Console(e.to_string()))?;
                    return Ok::<(), Error>(());
                }
                remote_in
                    .write_all(&buf[..n])
                    .await
                    .map_err(|e| Error::Console(e.to_string()))?;
            }
        };
        let output = async {
            let mut stdout = tokio::io::stdout();
            let mut buf = [0u8; 4096];
            loop {
                let n = remote_out
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::Console(e.to_string()))?;
                if n == 0 {
                    return Ok::<(), Error>(());
                }
                stdout
                    .write_all(&buf[..n])
                    .await
                    .map_err(|e| Error::Console(e.to_string()))?;
                stdout
                    .flush()
                    .await
                    .map_err(|e| Error::Console(e.to_string()))?;
            }
        };
        tokio::select! {
            r = input => r?,
            r = output => r?,
        }
        attached.abort();
        Ok(())
    }
}

/// Puts the terminal in raw mode while it lives (nothing when stdin is not a terminal).
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return RawTerminal(None);
        }
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(spec: &str) -> VirtualMachine {
        serde_yaml::from_str(&format!(
            "apiVersion: ferrovirt.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: v}}\nspec: {{template: {{spec: {{domain: {{}}}}}}, {spec}}}"
        ))
        .expect("vm")
    }

    #[test]
    fn start_and_stop_follow_virtctls_table() {
        assert_eq!(
            start_change(&vm("runStrategy: Halted")),
            Ok(Change::Strategy(RunStrategy::Always))
        );
        assert_eq!(
            start_change(&vm("running: false")),
            Ok(Change::Running(true))
        );
        assert!(start_change(&vm("runStrategy: Always")).is_err());
        assert_eq!(
            start_change(&vm("runStrategy: Manual")),
            Ok(Change::Request("Start"))
        );
        assert_eq!(
            start_change(&vm("runStrategy: Once")),
            Ok(Change::Request("Start"))
        );
        assert_eq!(
            stop_change(&vm("runStrategy: Always"), true),
            Ok(Change::Strategy(RunStrategy::Halted))
        );
        assert_eq!(
            stop_change(&vm("running: true"), true),
            Ok(Change::Running(false))
        );
        assert_eq!(
            stop_change(&vm("runStrategy: Manual"), true),
            Ok(Change::Request("Stop"))
        );
        assert!(stop_change(&vm("runStrategy: Halted"), false).is_err());
    }

    #[test]
    fn durations_parse_like_kubectls() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("5 minutes").is_err());
    }
}
