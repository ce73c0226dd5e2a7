//! One resource's plugin for as long as the agent runs: a session binds its socket, serves
//! `DevicePlugin` there, registers with kubelet and then looks at the host every second (the
//! device list, its own socket, `kubelet.sock`). A restarted kubelet empties the directory
//! and makes a new `kubelet.sock`, so either change ends the session and a new one serves and
//! registers again. Nothing is remembered between sessions: the host is the state.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server};

use super::api::{self, RegisterRequest, device_plugin_server::DevicePluginServer};
use super::resource::Resource;
use super::service::{DevicePluginService, OPTIONS};

/// How often the host is looked at (device health, sockets).
pub const POLL: Duration = Duration::from_secs(1);
/// kubelet dials the plugin back (up to 10 s) before it answers Register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a stopping server may take to close kubelet's connection.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot remove the stale socket {0}")]
    RemoveStale(PathBuf, #[source] std::io::Error),
    #[error(
        "cannot listen on {0}: is --device-plugin-dir kubelet's device-plugin directory, and writable?"
    )]
    Bind(PathBuf, #[source] std::io::Error),
    #[error("cannot reach kubelet at {0}: is kubelet running, with this device-plugin directory?")]
    Connect(PathBuf, #[source] tonic::transport::Error),
    #[error("kubelet refused to register {resource}: {message}")]
    Rejected { resource: String, message: String },
}

/// Which file a path names now. The change time is part of it because a socket removed and
/// made again at once often gets the same inode number back.
type FileIdentity = (u64, u64, i64, i64);

fn identity(path: &Path) -> Option<FileIdentity> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Serves `resource` from `dir` until `stop` turns true; sessions restart with kubelet.
pub async fn run_plugin(
    resource: Arc<Resource>,
    dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<(), PluginError> {
    loop {
        let mut session = Session::start(resource.clone(), &dir)?;
        let outcome = session.run(&mut stop).await;
        session.stop().await;
        match outcome {
            Outcome::Stop => return Ok(()),
            Outcome::Restart => continue,
        }
    }
}

enum Outcome {
    Stop,
    Restart,
}

/// One socket and its server, from bind to stop.
struct Session {
    resource: Arc<Resource>,
    socket: PathBuf,
    socket_id: Option<FileIdentity>,
    kubelet_socket: PathBuf,
    devices: watch::Sender<Vec<api::Device>>,
    last_scan_error: Option<String>,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Session {
    /// Binds the resource's socket (replacing a stale one) and starts serving on it.
    fn start(resource: Arc<Resource>, dir: &Path) -> Result<Session, PluginError> {
        let socket = dir.join(resource.socket_name());
        match std::fs::remove_file(&socket) {
            Ok(()) => tracing::info!(socket = %socket.display(), "removed a stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PluginError::RemoveStale(socket, e)),
        }
        let listener =
            UnixListener::bind(&socket).map_err(|e| PluginError::Bind(socket.clone(), e))?;
        let (devices, devices_rx) = watch::channel(Vec::new());
        let mut session = Session {
            socket_id: identity(&socket),
            kubelet_socket: dir.join(api::KUBELET_SOCKET),
            socket,
            devices,
            last_scan_error: None,
            stop_server: None,
            server: None,
            resource: resource.clone(),
        };
        session.scan_devices();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let service = DevicePluginServer::new(DevicePluginService::new(resource, devices_rx));
        let serve = Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stop_rx.await;
            });
        session.server = Some(tokio::spawn(serve));
        session.stop_server = Some(stop_tx);
        tracing::info!(resource = %session.resource.name(), socket = %session.socket.display(), "serving");
        Ok(session)
    }

    /// Registers with kubelet (retrying until it answers), then watches until kubelet
    /// restarts or `stop` turns true.
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> Outcome {
        let mut last_failure = String::new();
        let kubelet = loop {
            if stopping(stop) {
                return Outcome::Stop;
            }
            if self.socket_was_removed() {
                return Outcome::Restart;
            }
            let kubelet = identity(&self.kubelet_socket);
            match self.register().await {
                Ok(()) => break kubelet,
                Err(e) => {
                    // Once per distinct failure: kubelet may be down for a while.
                    let message = e.to_string();
                    if message != last_failure {
                        tracing::warn!(error = %message, "registration failed; retrying every second");
                        last_failure = message;
                    }
                }
            }
            if sleep_or_stop(stop).await {
                return Outcome::Stop;
            }
            self.scan_devices();
        };
        tracing::info!(resource = %self.resource.name(), "registered with kubelet");
        loop {
            if sleep_or_stop(stop).await {
                return Outcome::Stop;
            }
            self.scan_devices();
            if self.socket_was_removed() {
                return Outcome::Restart;
            }
            if identity(&self.kubelet_socket) != kubelet {
                tracing::info!(resource = %self.resource.name(), "kubelet.sock was recreated (kubelet restarted); registering again");
                return Outcome::Restart;
            }
        }
    }

    fn socket_was_removed(&self) -> bool {
        let removed = identity(&self.socket) != self.socket_id;
        if removed {
            tracing::info!(socket = %self.socket.display(), "our socket was removed (kubelet restarted?); serving again");
        }
        removed
    }

    /// Publishes the device list when it changed; ListAndWatch streams send it on.
    fn scan_devices(&mut self) {
        let devices = match self.resource.devices() {
            Ok(devices) => {
                self.last_scan_error = None;
                devices
            }
            Err(e) => {
                let message = e.to_string();
                if self.last_scan_error.as_ref() != Some(&message) {
                    tracing::error!(resource = %self.resource.name(), error = %message, "cannot list devices; advertising none");
                    self.last_scan_error = Some(message);
                }
                Vec::new()
            }
        };
        self.devices.send_if_modified(|current| {
            let changed = *current != devices;
            if changed {
                let healthy = devices.iter().filter(|d| d.health == api::HEALTHY).count();
                tracing::info!(resource = %self.resource.name(), devices = devices.len(), healthy, "device list changed");
                *current = devices;
            }
            changed
        });
    }

    async fn register(&self) -> Result<(), PluginError> {
        let channel = unix_channel(&self.kubelet_socket, REGISTER_TIMEOUT)
            .await
            .map_err(|e| PluginError::Connect(self.kubelet_socket.clone(), e))?;
        let request = RegisterRequest {
            version: api::VERSION.to_owned(),
            endpoint: self.resource.socket_name(),
            resource_name: self.resource.name(),
            options: Some(OPTIONS),
        };
        api::registration_client::RegistrationClient::new(channel)
            .register(request)
            .await
            .map_err(|status| PluginError::Rejected {
                resource: self.resource.name(),
                message: status.message().to_owned(),
            })?;
        Ok(())
    }

    /// Ends ListAndWatch streams, stops the server and removes the socket if it is still ours.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        // Without a sender the streams end, so kubelet's connection can close.
        let (closed, _) = watch::channel(Vec::new());
        drop(std::mem::replace(&mut self.devices, closed));
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(STOP_TIMEOUT, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "device plugin server"),
                Ok(Err(e)) => tracing::warn!(error = %e, "device plugin server task"),
                Err(_) => server.abort(),
            }
        }
        self.remove_socket();
    }

    fn remove_socket(&mut self) {
        if self.socket_id.is_some()
            && identity(&self.socket) == self.socket_id
            && let Err(e) = std::fs::remove_file(&self.socket)
        {
            tracing::warn!(socket = %self.socket.display(), error = %e, "cannot remove our socket");
        }
        self.socket_id = None;
    }
}

impl Drop for Session {
    /// A session dropped without `stop` (its future was cancelled) still leaves nothing.
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        self.remove_socket();
    }
}

/// A gRPC channel to the server on the UNIX socket `path`, its calls limited to `timeout`.
pub async fn unix_channel(
    path: &Path,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    });
    // The URI is only the :authority of the requests; the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(POLL)
        .timeout(timeout)
        .connect_with_connector(connector)
        .await
}

/// Waits one [`POLL`]; true when `stop` turned true (or its sender went away) meanwhile.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(POLL) => stopping(stop),
        changed = stop.changed() => changed.is_err() || stopping(stop),
    }
}

/// The flag now. A function of its own, so the read guard never lives across an await (it
/// is not Send, and the plugins' future must be).
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::device_plugin::api::device_plugin_client::DevicePluginClient;
    use crate::agent::device_plugin::api::registration_server::{Registration, RegistrationServer};
    use crate::agent::device_plugin::api::{
        AllocateRequest, ContainerAllocateRequest, Empty, ListAndWatchResponse,
    };
    use crate::agent::device_plugin::{DevicePluginConfig, run};
    use ferrovirt_tests::ScratchDir;
    use ferrovirt_tests::fake_sysfs::FakeSysfs;
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(10);

    /// kubelet's Registration service, reduced to recording what it is asked.
    struct RecordingKubelet(mpsc::UnboundedSender<RegisterRequest>);

    #[tonic::async_trait]
    impl Registration for RecordingKubelet {
        async fn register(
            &self,
            request: tonic::Request<RegisterRequest>,
        ) -> Result<tonic::Response<Empty>, tonic::Status> {
            let _ = self.0.send(request.into_inner());
            Ok(tonic::Response::new(Empty {}))
        }
    }

    /// The agent's side of the protocol over real sockets: it registers, streams its VFs and
    /// their changes, allocates, registers again when its socket is removed (as a restarting
    /// kubelet does) and removes its socket when stopped. The real kubelet is in
    /// tests/tests/k8s_device_plugin.rs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_registers_streams_allocates_reregisters_and_cleans_up() {
        let sysfs = FakeSysfs::new("plugin").unwrap();
        sysfs
            .add_pf_with_vfs("0000:07:00.0", "pf7", 2, "iavf")
            .unwrap();
        let dir = ScratchDir::new("dp-plugin").unwrap();
        let (registered, mut registrations) = mpsc::unbounded_channel();
        let kubelet = UnixListener::bind(dir.join(api::KUBELET_SOCKET)).unwrap();
        tokio::spawn(
            Server::builder()
                .add_service(RegistrationServer::new(RecordingKubelet(registered)))
                .serve_with_incoming(UnixListenerStream::new(kubelet)),
        );
        let config = DevicePluginConfig {
            dir: dir.path().to_owned(),
            kvm_devices: 0,
            sriov_pools: vec!["p7=pf7".parse().unwrap()],
            sysfs_root: sysfs.root().to_owned(),
        };
        let (stop, stopped) = watch::channel(false);
        let agent = tokio::spawn(run(config, stopped));

        let request = timeout(WAIT, registrations.recv()).await.unwrap().unwrap();
        assert_eq!(
            request,
            RegisterRequest {
                version: "v1beta1".into(),
                endpoint: "ferrovirt-sriov-p7.sock".into(),
                resource_name: "devices.ferrovirt.io/sriov-p7".into(),
                options: Some(OPTIONS),
            }
        );
        let socket = dir.join(&request.endpoint);
        let mut plugin = DevicePluginClient::new(unix_channel(&socket, WAIT).await.unwrap());
        let mut list = plugin.list_and_watch(Empty {}).await.unwrap().into_inner();
        let ids = |response: ListAndWatchResponse| -> Vec<String> {
            response.devices.into_iter().map(|d| d.id).collect()
        };
        let first = timeout(WAIT, list.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(ids(first), ["0000:07:01.0", "0000:07:01.1"]);
        sysfs
            .add_vf("0000:07:00.0", 2, "0000:07:01.2", Some("iavf"), None)
            .unwrap();
        let second = timeout(WAIT, list.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(ids(second).len(), 3);

        let granted = plugin
            .allocate(AllocateRequest {
                container_requests: vec![ContainerAllocateRequest {
                    devices_ids: vec!["0000:07:01.2".into()],
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            granted.container_responses[0].envs["PCIDEVICE_FERROVIRT_IO_SRIOV_P7"],
            "0000:07:01.2"
        );
        let refused = plugin
            .allocate(AllocateRequest {
                container_requests: vec![ContainerAllocateRequest {
                    devices_ids: vec!["0000:07:09.0".into()],
                }],
            })
            .await
            .expect_err("not a VF of the pool");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

        std::fs::remove_file(&socket).unwrap();
        let again = timeout(WAIT, registrations.recv()).await.unwrap().unwrap();
        assert_eq!(again, request);
        assert!(socket.exists(), "registered again without a socket");

        stop.send(true).unwrap();
        timeout(WAIT, agent).await.unwrap().unwrap().unwrap();
        assert!(!socket.exists(), "socket left behind");
    }
}
