//! `ferrovirt-controller run`: leader election, the three controllers, the metrics/health
//! endpoint and a graceful stop on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use tokio::sync::watch;

use crate::controllers::{self, Context};
use crate::crd::{VirtualMachine, VirtualMachineInstance, VirtualMachineInstanceMigration};
use crate::launcher::{self, LauncherConfig};
use crate::leader;
use crate::server::{self, Health};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach the API server: {0} (set KUBECONFIG, or run in a pod with a ServiceAccount)"
    )]
    Client(kube::Error),
    #[error(
        "no cluster configuration: {0} (set KUBECONFIG, or run in a pod with a ServiceAccount)"
    )]
    Config(String),
    #[error(transparent)]
    Server(#[from] server::Error),
    #[error(transparent)]
    Leader(#[from] leader::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
}

/// Flags of `ferrovirt-controller run`.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Run without leader election (only when a single replica runs).
    #[arg(long)]
    pub no_leader_elect: bool,
    /// Namespace of the leader Lease (the controller's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ferrovirt")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "ferrovirt-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease. Default: POD_NAME, else hostname-pid.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a leader's claim lasts without renewal; a dead leader is replaced after this.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..))]
    pub lease_duration: u64,
    /// Seconds before the claim expires at which the leader renews it.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_grace: u64,
    /// Image of the launcher pods (the VMM's container).
    #[arg(long, default_value = "ferrovirt-launcher:latest")]
    pub launcher_image: String,
    /// Pull policy of the launcher image: Always, IfNotPresent or Never.
    #[arg(long, default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub launcher_pull_policy: String,
    /// RuntimeClass of launcher pods, whose containerd handler attaches the VM networks.
    #[arg(long)]
    pub vm_runtime_class: Option<String>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long)]
    pub watch_namespace: Option<String>,
    /// Extended resource that grants /dev/kvm (the node agent's device plugin); "" for none.
    #[arg(long, default_value = "devices.ferrovirt.io/kvm")]
    pub kvm_resource: String,
}

/// Runs the controller until a signal; maps the outcome to the exit status.
pub fn main(settings: Settings) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrovirt-controller: {}", Error::Runtime(e));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovirt-controller: {e}");
            match e {
                Error::Leader(leader::Error::Lost) => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn identity(settings: &Settings) -> String {
    settings.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    })
}

/// A flag that turns true at the first SIGTERM or SIGINT (the graceful stop of the controller
/// and the agent). Must be called inside the runtime.
pub fn stop_on_signals() -> Result<watch::Receiver<bool>, std::io::Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
    });
    Ok(stop_rx)
}

async fn run(settings: Settings) -> Result<(), Error> {
    let stop_rx = stop_on_signals().map_err(Error::Signal)?;

    let health = Arc::new(Health::default());
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let counter = health.metrics.api_request_counter();
    let count = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        counter.inc();
        req
    });
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(Error::Client)?
        .with_layer(&count)
        .build();
    client.apiserver_version().await.map_err(Error::Client)?;
    let serve = server::bind(settings.listen, health.clone(), stop_rx.clone()).await?;
    let server_task = tokio::spawn(serve);
    health.set_ready(true);

    let identity = identity(&settings);
    let leadership = if settings.no_leader_elect {
        None
    } else {
        let election = leader::Settings {
            namespace: settings.lease_namespace.clone(),
            lease_name: settings.lease_name.clone(),
            identity: identity.clone(),
            duration_s: settings.lease_duration,
            grace_s: settings.lease_grace.min(settings.lease_duration - 1),
        };
        match leader::acquire(client.clone(), &election, &mut stop_rx.clone()).await? {
            Some(l) => Some(l),
            None => {
                let _ = server_task.await;
                return Ok(());
            }
        }
    };
    health.metrics.set_leader(true);

    let ctx = Arc::new(Context {
        client: client.clone(),
        health: health.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "ferrovirt-controller".into(),
                instance: Some(identity),
            },
        ),
        launcher: LauncherConfig {
            image: settings.launcher_image.clone(),
            pull_policy: settings.launcher_pull_policy.clone(),
            runtime_class: settings.vm_runtime_class.clone(),
            kvm_resource: settings.kvm_resource.clone(),
        },
    });
    let controllers = run_controllers(ctx, settings.watch_namespace.as_deref(), stop_rx.clone());
    let result = match leadership {
        Some(mut leadership) => {
            let outcome = tokio::select! {
                _ = controllers => Ok(()),
                lost = leadership.lost() => Err(Error::Leader(lost)),
            };
            if outcome.is_ok() {
                leadership.release().await;
            }
            outcome
        }
        None => {
            controllers.await;
            Ok(())
        }
    };
    health.metrics.set_leader(false);
    if let Ok(Err(e)) = server_task.await {
        tracing::warn!(error = %e, "metrics server");
    }
    result
}

async fn log_result<T, E: std::fmt::Display>(kind: &'static str, result: Result<T, E>) {
    if let Err(e) = result {
        tracing::debug!(kind, error = %e, "reconcile");
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs the VM, VMI and migration controllers until `stop`.
async fn run_controllers(ctx: Arc<Context>, namespace: Option<&str>, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let (vms, vmis, vmims, pods) = match namespace {
        Some(ns) => (
            Api::<VirtualMachine>::namespaced(client.clone(), ns),
            Api::<VirtualMachineInstance>::namespaced(client.clone(), ns),
            Api::<VirtualMachineInstanceMigration>::namespaced(client.clone(), ns),
            Api::<Pod>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let launchers = watcher::Config::default().labels(launcher::LABEL_VMI_UID);
    let vm = Controller::new(vms, watcher::Config::default())
        .owns(vmis.clone(), watcher::Config::default())
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            controllers::vm::reconcile,
            controllers::error_policy,
            ctx.clone(),
        )
        .for_each(|r| log_result("vm", r));
    let vmi = Controller::new(vmis, watcher::Config::default())
        .owns(pods.clone(), launchers.clone())
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            controllers::vmi::reconcile,
            controllers::error_policy,
            ctx.clone(),
        )
        .for_each(|r| log_result("vmi", r));
    let vmim = Controller::new(vmims, watcher::Config::default())
        .owns(pods, launchers)
        .graceful_shutdown_on(stopped(stop))
        .run(
            controllers::migration::reconcile,
            controllers::error_policy,
            ctx,
        )
        .for_each(|r| log_result("vmim", r));
    tokio::join!(vm, vmi, vmim);
}
