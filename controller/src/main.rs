//! `ferrovirt-controller`: the cluster controller, and the generator of its CRD manifests.

use std::process::ExitCode;

use clap::Parser;
use ferrovirt_controller::cli::{Cli, run_cli};

fn main() -> ExitCode {
    run_cli(Cli::parse())
}
