//! Generates the gRPC services of kubelet's device-plugin API v1beta1 (package `v1beta1`:
//! `Registration`, served by kubelet, and `DevicePlugin`, served by the agent) with tonic-build's
//! manual builder. The messages are hand-written prost structs in
//! `src/agent/device_plugin/api.rs`, so no protoc and no .proto file are needed. The output
//! goes to OUT_DIR (never into git).

use tonic_build::manual::{Builder, Method, Service};

const API: &str = "crate::agent::device_plugin::api";
const CODEC: &str = "tonic_prost::ProstCodec";

/// One unary or server-streaming method: `name` in Rust, `route` as the API spells it.
fn method(name: &str, route: &str, input: &str, output: &str, streaming: bool) -> Method {
    let builder = Method::builder()
        .name(name)
        .route_name(route)
        .input_type(format!("{API}::{input}"))
        .output_type(format!("{API}::{output}"))
        .codec_path(CODEC);
    if streaming {
        builder.server_streaming().build()
    } else {
        builder.build()
    }
}

fn main() {
    let registration = Service::builder()
        .name("Registration")
        .package("v1beta1")
        .method(method(
            "register",
            "Register",
            "RegisterRequest",
            "Empty",
            false,
        ))
        .build();
    let device_plugin = Service::builder()
        .name("DevicePlugin")
        .package("v1beta1")
        .method(method(
            "get_device_plugin_options",
            "GetDevicePluginOptions",
            "Empty",
            "DevicePluginOptions",
            false,
        ))
        .method(method(
            "list_and_watch",
            "ListAndWatch",
            "Empty",
            "ListAndWatchResponse",
            true,
        ))
        .method(method(
            "get_preferred_allocation",
            "GetPreferredAllocation",
            "PreferredAllocationRequest",
            "PreferredAllocationResponse",
            false,
        ))
        .method(method(
            "allocate",
            "Allocate",
            "AllocateRequest",
            "AllocateResponse",
            false,
        ))
        .method(method(
            "pre_start_container",
            "PreStartContainer",
            "PreStartContainerRequest",
            "PreStartContainerResponse",
            false,
        ))
        .build();
    // Both sides of both services: the agent serves DevicePlugin and calls Registration; its
    // tests (and kubelet-side checks) use the other halves.
    Builder::new().compile(&[registration, device_plugin]);
    println!("cargo:rerun-if-changed=build.rs");
}
