//! The `v1beta1.DevicePlugin` service of one resource, as kubelet calls it.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use super::api::{
    self, AllocateRequest, AllocateResponse, ContainerPreferredAllocationResponse,
    DevicePluginOptions, Empty, ListAndWatchResponse, PreStartContainerRequest,
    PreStartContainerResponse, PreferredAllocationRequest, PreferredAllocationResponse,
};
use super::resource::{Resource, preferred_allocation};

/// What the agent supports of the optional calls: preferred allocation, no PreStartContainer.
pub const OPTIONS: DevicePluginOptions = DevicePluginOptions {
    pre_start_required: false,
    get_preferred_allocation_available: true,
};

/// Serves one resource; its device list comes from the session that watches the host.
#[derive(Debug, Clone)]
pub struct DevicePluginService {
    resource: Arc<Resource>,
    devices: watch::Receiver<Vec<api::Device>>,
}

impl DevicePluginService {
    pub fn new(resource: Arc<Resource>, devices: watch::Receiver<Vec<api::Device>>) -> Self {
        DevicePluginService { resource, devices }
    }
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl api::device_plugin_server::DevicePlugin for DevicePluginService {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(OPTIONS))
    }

    type ListAndWatchStream = DeviceStream;

    /// The current list at once, then again whenever it changes; the stream ends when the
    /// session that feeds it stops.
    async fn list_and_watch(&self, _: Request<Empty>) -> Result<Response<DeviceStream>, Status> {
        let resource = self.resource.name();
        let stream = WatchStream::new(self.devices.clone()).map(move |devices| {
            tracing::debug!(%resource, devices = devices.len(), "ListAndWatch sends the device list");
            Ok(ListAndWatchResponse { devices })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let container_responses = request
            .into_inner()
            .container_requests
            .iter()
            .map(|container| ContainerPreferredAllocationResponse {
                device_ids: preferred_allocation(container),
            })
            .collect();
        Ok(Response::new(PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let resource = self.resource.name();
        let mut container_responses = Vec::new();
        for container in request.into_inner().container_requests {
            match self.resource.allocate(&container.devices_ids) {
                Ok(granted) => {
                    tracing::info!(%resource, devices = ?container.devices_ids, "allocated");
                    container_responses.push(granted);
                }
                Err(e) => {
                    tracing::warn!(%resource, devices = ?container.devices_ids, error = %e, "allocation refused");
                    return Err(Status::failed_precondition(format!("{resource}: {e}")));
                }
            }
        }
        Ok(Response::new(AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Err(Status::unimplemented(
            "ferrovirt-agent does not ask for PreStartContainer (pre_start_required is false)",
        ))
    }
}
