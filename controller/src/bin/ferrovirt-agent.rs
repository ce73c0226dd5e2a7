//! `ferrovirt-agent`: the node agent (for now its kubelet device plugins).

use std::process::ExitCode;

use clap::Parser;
use ferrovirt_controller::agent::device_plugin::cli::{self, AgentCli};

fn main() -> ExitCode {
    cli::main(AgentCli::parse())
}
