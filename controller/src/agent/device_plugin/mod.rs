//! kubelet's device-plugin API (v1beta1, gRPC on UNIX sockets) for the node agent: it
//! advertises `devices.ferrovirt.io/kvm` (N slots granting `/dev/kvm`) and one
//! `devices.ferrovirt.io/sriov-<pool>` per SR-IOV pool (the VFs of a PF), each from its own
//! socket in kubelet's device-plugin directory, and registers again whenever kubelet restarts.
//!
//! ```no_run
//! # async fn agent(config: ferrovirt_controller::agent::device_plugin::DevicePluginConfig) {
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let plugins = tokio::spawn(ferrovirt_controller::agent::device_plugin::run(config, stopped));
//! // ... on SIGTERM:
//! let _ = stop.send(true);
//! # }
//! ```

pub mod api;
pub mod cli;
pub mod kvm;
pub mod plugin;
pub mod resource;
pub mod service;
pub mod sriov;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

pub use plugin::PluginError;
pub use resource::Resource;
pub use sriov::SriovPoolSpec;

use kvm::KvmSlots;
use sriov::SriovPool;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the device-plugin directory {0} does not exist: is --device-plugin-dir right, and kubelet's /var/lib/kubelet/device-plugins mounted into the agent?"
    )]
    NoDirectory(PathBuf),
    #[error("nothing to advertise: --kvm-devices is 0 and no --sriov-pool is given")]
    NothingToServe,
    #[error("two SR-IOV pools are named {0:?}: give each --sriov-pool its own NAME")]
    DuplicatePool(String),
    #[error("the device plugin of {resource} stopped")]
    Plugin {
        resource: String,
        #[source]
        source: PluginError,
    },
}

/// What the agent advertises, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePluginConfig {
    /// kubelet's device-plugin directory (`kubelet.sock` is there).
    pub dir: PathBuf,
    /// How many `devices.ferrovirt.io/kvm`; 0 advertises none.
    pub kvm_devices: u32,
    pub sriov_pools: Vec<SriovPoolSpec>,
    /// `/sys`, or a fake tree in tests.
    pub sysfs_root: PathBuf,
}

impl DevicePluginConfig {
    /// The resources to serve, or why the configuration is unusable.
    pub fn resources(&self) -> Result<Vec<Resource>, Error> {
        let mut resources = Vec::new();
        if self.kvm_devices > 0 {
            resources.push(Resource::Kvm(KvmSlots::new(self.kvm_devices)));
        }
        for (i, spec) in self.sriov_pools.iter().enumerate() {
            if self.sriov_pools[..i].iter().any(|p| p.name == spec.name) {
                return Err(Error::DuplicatePool(spec.name.clone()));
            }
            resources.push(Resource::Sriov(SriovPool {
                spec: spec.clone(),
                sysfs_root: self.sysfs_root.clone(),
            }));
        }
        if resources.is_empty() {
            return Err(Error::NothingToServe);
        }
        Ok(resources)
    }
}

/// Runs every resource's plugin until `shutdown` turns true (or its sender is dropped), then
/// removes their sockets. A plugin that cannot serve at all (its socket cannot be bound) stops
/// the others and is the error returned.
pub async fn run(
    config: DevicePluginConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let resources = config.resources()?;
    if !config.dir.is_dir() {
        return Err(Error::NoDirectory(config.dir));
    }
    let (stop, stopped) = watch::channel(false);
    let plugins = resources.into_iter().map(|resource| {
        let resource = Arc::new(resource);
        let dir = config.dir.clone();
        let stopped = stopped.clone();
        let stop = stop.clone();
        async move {
            let result = plugin::run_plugin(resource.clone(), dir, stopped).await;
            if result.is_err() {
                let _ = stop.send(true);
            }
            result.map_err(|source| Error::Plugin {
                resource: resource.name(),
                source,
            })
        }
    });
    let all = futures::future::join_all(plugins);
    tokio::pin!(all);
    // A dropped sender stops the plugins too. (The guard wait_for returns is not Send: it is
    // dropped in here, so that this future can be spawned.)
    let stop_requested = async move {
        let _ = shutdown.wait_for(|stop| *stop).await.is_ok();
    };
    let results = tokio::select! {
        results = &mut all => results,
        () = stop_requested => {
            let _ = stop.send(true);
            all.await
        }
    };
    results.into_iter().collect()
}
