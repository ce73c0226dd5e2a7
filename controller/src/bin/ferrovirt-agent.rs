//! `ferrovirt-agent`: the per-node agent (a DaemonSet): serves the kubelet device plugins and
//! runs the VMIs the cluster schedules on its node, with their vhost-user backends, in their
//! launcher pods.

use std::process::ExitCode;

use clap::Parser;
use ferrovirt_controller::agent::cli::{self, AgentCli};

fn main() -> ExitCode {
    cli::main(AgentCli::parse())
}
