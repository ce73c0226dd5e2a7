//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager: server-side apply
//! on the Lease, so two replicas can never both hold it).
//!
//! A replica waits as a follower until it holds the lease, then runs the controllers. Losing the
//! lease ends the process with an error (the Deployment restarts it as a follower), so a replica
//! never reconciles without the lease; a graceful stop releases it at once, so the other replica
//! takes over without waiting for it to expire.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot set up leader election on Lease {namespace}/{name}: {source} (the controller's ServiceAccount needs get/create/update/patch on leases in that namespace)"
    )]
    Setup {
        namespace: String,
        name: String,
        source: LeaseManagerError,
    },
    #[error(
        "lost the leader lease to another replica; exiting so that this replica restarts as a follower"
    )]
    Lost,
    #[error("the leader election task ended unexpectedly: {0}")]
    Task(String),
}

/// Settings of the election (flags of `ferrovirt-controller run`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    /// Seconds a holder's claim lasts without renewal; a crashed leader is replaced after this.
    pub duration_s: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_s: u64,
}

/// A held lease. [`Leadership::lost`] resolves when it is lost; [`Leadership::release`] gives it up.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

/// Waits until this replica holds the lease, or `stop` turns true (then `Ok(None)`).
pub async fn acquire(
    client: Client,
    settings: &Settings,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Leadership>, Error> {
    let setup = |source| Error::Setup {
        namespace: settings.namespace.clone(),
        name: settings.lease_name.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client, settings.lease_name.clone())
        .with_namespace(settings.namespace.clone())
        .with_identity(settings.identity.clone())
        .with_field_manager(format!("ferrovirt-controller-lease-{}", settings.identity))
        .with_duration(settings.duration_s)
        .with_grace(settings.grace_s)
        .build()
        .await
        .map_err(setup)?;
    let (mut state, task) = manager.watch().await;
    tracing::info!(lease = %settings.lease_name, identity = %settings.identity, "waiting for the leader lease");
    let held = tokio::select! {
        held = state.wait_for(|leader| *leader) => Some(held.is_ok()),
        _ = stop.wait_for(|stopped| *stopped) => None,
    };
    let Some(held) = held else {
        drop(state);
        let _ = task.await;
        return Ok(None);
    };
    if !held {
        return Err(Error::Task(join_error(task).await));
    }
    tracing::info!(identity = %settings.identity, "holding the leader lease");
    Ok(Some(Leadership { state, task }))
}

async fn join_error(
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
) -> String {
    match task.await {
        Ok(Ok(_)) => "the lease watcher stopped".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    }
}

impl Leadership {
    /// Resolves with [`Error::Lost`] when another replica takes the lease.
    pub async fn lost(&mut self) -> Error {
        match self.state.wait_for(|leader| !*leader).await {
            Ok(_) => Error::Lost,
            Err(_) => Error::Task("the lease watcher stopped".to_owned()),
        }
    }

    /// Releases the lease (closing the channel makes the watcher release it) and waits for that.
    pub async fn release(self) {
        drop(self.state);
        match self.task.await {
            Ok(Ok(_)) => tracing::info!("released the leader lease"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not release the leader lease; it expires on its own")
            }
            Err(e) => tracing::warn!(error = %e, "the lease task failed"),
        }
    }
}
