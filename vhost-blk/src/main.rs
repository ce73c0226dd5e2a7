//! ferrovirt-vhost-blk: vhost-user-blk backend serving a raw image over a UNIX socket.

use std::process::ExitCode;

use clap::Parser;
use ferrovirt_vhost_blk::{BackendConfig, Flags, Server, TerminationSignals};

fn main() -> ExitCode {
    // FERROVIRT_LOG (error, warn, info, debug, trace) sets the level; info by default.
    let level = std::env::var("FERROVIRT_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::level_filters::LevelFilter>().ok())
        .unwrap_or(tracing::level_filters::LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .init();
    let flags = Flags::parse();
    let result = TerminationSignals::block().and_then(|signals| {
        let config = BackendConfig::from_flags(&flags)?;
        let server = Server::bind(config, &flags.socket)?;
        signals.remove_on_signal(vec![server.socket().to_owned()])?;
        server.run(flags.once)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = format!("ferrovirt-vhost-blk: {e}");
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
