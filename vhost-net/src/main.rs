//! ferrovirt-vhost-net: vhost-user-net backend bridging a VMM's data queues and a TAP device.

use std::process::ExitCode;

use clap::Parser;
use ferrovirt_vhost_net::{BackendConfig, Flags, Server};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let flags = Flags::parse();
    let result = BackendConfig::from_flags(&flags)
        .map_err(Into::into)
        .and_then(|config| Server::bind(config, &flags.socket))
        .and_then(|server| server.run(flags.once));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = format!("ferrovirt-vhost-net: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}
