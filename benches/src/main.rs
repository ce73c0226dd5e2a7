//! Runs one benchmark suite (or `all`) and writes its results.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use ferrovirt_benches::machine::Machine;
use ferrovirt_benches::suites::{self, RunConfig};

#[derive(Debug, Parser)]
#[command(about = "ferrovirt's performance suite: ferrovirt against its peer, medians and ratios")]
struct Args {
    /// The suite to run (`all` runs every suite; `list` names them).
    suite: String,
    /// Measured rounds per suite; each runs ferrovirt and the peer once, alternating order.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Where `<suite>.json` and `<suite>.md` go.
    #[arg(long, default_value_os_t = ferrovirt_benches::default_results_dir())]
    out_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.suite == "list" {
        for suite in suites::SUITES {
            println!("{:<16} {}", suite.name, suite.about);
        }
        return Ok(());
    }
    let Some(selected) = suites::select(&args.suite) else {
        let names: Vec<&str> = suites::SUITES.iter().map(|s| s.name).collect();
        bail!(
            "unknown suite {:?}; choose one of: all, {}",
            args.suite,
            names.join(", ")
        );
    };
    let config = RunConfig {
        rounds: args.rounds as usize,
    };
    let machine = Machine::current();
    let mut failed = Vec::new();
    for suite in selected {
        eprintln!("== suite {} ({} rounds)", suite.name, config.rounds);
        match (suite.run)(&config) {
            Ok(report) => {
                let (json, md) = report.write(&args.out_dir, &machine).with_context(|| {
                    format!("cannot write results to {}", args.out_dir.display())
                })?;
                println!("{}", report.to_markdown(&machine));
                eprintln!("wrote {} and {}", json.display(), md.display());
            }
            Err(e) => {
                eprintln!("suite {} failed: {e:#}", suite.name);
                failed.push(suite.name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("suites failed: {}", failed.join(", "));
    }
    Ok(())
}
