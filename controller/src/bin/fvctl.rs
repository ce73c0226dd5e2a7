//! `fvctl`: ferrovirt's user CLI (virtctl's verbs for ferrovirt VMs).

use std::process::ExitCode;

use clap::Parser;
use ferrovirt_controller::fvctl::{self, Cli};

fn main() -> ExitCode {
    fvctl::main(Cli::parse())
}
