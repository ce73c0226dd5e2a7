//! Flags and subcommands of `ferrovirt-controller`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::crd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot render CRD {name} as YAML: {source}")]
    Render {
        name: String,
        source: serde_yaml::Error,
    },
    #[error("cannot write {path}: {source} (does the directory exist and is it writable?)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// ferrovirt's cluster controller: keeps a VirtualMachineInstance for every VirtualMachine that
/// should run, a launcher pod for every VirtualMachineInstance, and their status.
///
/// Exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 on an error (message on stderr),
/// 2 on bad flags, 3 when this replica lost the leader lease.
#[derive(Debug, Parser)]
#[command(name = "ferrovirt-controller", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the CRD manifests (one YAML file per kind) to --out, or print them all to stdout.
    Crds {
        /// Directory for `<plural>.ferrovirt.io.yaml` (deploy/crds in the repository).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the controller against the cluster of the in-cluster config or KUBECONFIG.
    Run(Box<crate::run::Settings>),
}

/// The YAML of every CRD, with its file name.
pub fn rendered_crds() -> Result<Vec<(String, String)>, Error> {
    crd::all()
        .iter()
        .map(|c| {
            let name = crd::file_name(c);
            crd::to_yaml(c)
                .map(|yaml| (name.clone(), yaml))
                .map_err(|source| Error::Render { name, source })
        })
        .collect()
}

fn write_crds(out: Option<&Path>) -> Result<(), Error> {
    let rendered = rendered_crds()?;
    match out {
        None => {
            for (_, yaml) in &rendered {
                println!("---\n{yaml}");
            }
        }
        Some(dir) => {
            for (name, yaml) in &rendered {
                let path = dir.join(name);
                std::fs::write(&path, yaml).map_err(|source| Error::Write { path, source })?;
            }
        }
    }
    Ok(())
}

pub fn run_cli(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Crds { out } => write_crds(out.as_deref()).map_err(|e| e.to_string()),
        Command::Run(settings) => return crate::run::main(*settings),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovirt-controller: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// deploy/crds/ holds exactly what the types generate.
    #[test]
    fn committed_crds_match_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        for (name, yaml) in rendered_crds().expect("render") {
            let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
            assert!(
                committed == yaml,
                "deploy/crds/{name} is out of date: run `cargo run -p ferrovirt-controller -- crds --out deploy/crds`"
            );
        }
    }
}
