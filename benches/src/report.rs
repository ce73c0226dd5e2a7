//! A suite's results as `benches/results/<suite>.json` and `<suite>.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::machine::Machine;
use crate::stats::{Better, Goal, ResultRow, Summary};

/// Everything one suite run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteReport {
    pub suite: String,
    pub peer_name: String,
    pub rounds: usize,
    pub rows: Vec<Summary>,
    pub goals: Vec<Goal>,
    /// What exactly each side ran and what each metric means.
    pub notes: Vec<String>,
}

impl SuiteReport {
    /// The JSON file's content: an array of rows.
    pub fn to_json(&self) -> String {
        let rows: Vec<&ResultRow> = self.rows.iter().map(|s| &s.row).collect();
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into()) + "\n"
    }

    /// The Markdown file's content: table, goals, notes and machine.
    pub fn to_markdown(&self, machine: &Machine) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmark suite `{}`\n", self.suite);
        let _ = writeln!(
            md,
            "ferrovirt against {}; medians of {} alternating rounds, [min–max] beside them; \
             ratio = ferrovirt ÷ peer.\n",
            self.peer_name, self.rounds
        );
        md.push_str(&self.table());
        if !self.goals.is_empty() {
            md.push_str("\n## Goals\n\n");
            for goal in &self.goals {
                let what = goal.basis.label();
                let line = match goal.check(&self.rows) {
                    Some((met, value)) => {
                        let verdict = if met { "met" } else { "NOT met" };
                        format!("- {verdict}: {} ({what} {})", goal.text, num(value))
                    }
                    None => format!("- not measured: {}", goal.text),
                };
                md.push_str(&line);
                md.push('\n');
            }
        }
        if !self.notes.is_empty() {
            md.push_str("\n## What is measured\n\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        let _ = writeln!(
            md,
            "\n## Machine\n\n- nproc: {}\n- kernel: {}\n- CPU: {}\n- date: {}",
            machine.nproc, machine.kernel, machine.cpu_model, machine.date
        );
        md
    }

    /// The Markdown table alone (also printed to the terminal).
    pub fn table(&self) -> String {
        let mut md = String::new();
        md.push_str("| metric | unit | ferrovirt | peer | ratio | better | ferrovirt ahead |\n");
        md.push_str("|---|---|---|---|---|---|---|\n");
        for s in &self.rows {
            let r = &s.row;
            let _ = writeln!(
                md,
                "| {} | {} | {} [{}–{}] | {} [{}–{}] | {} | {} | {} |",
                r.name,
                r.unit,
                num(r.ferrovirt),
                num(s.ferrovirt_spread.min),
                num(s.ferrovirt_spread.max),
                num(r.peer),
                num(s.peer_spread.min),
                num(s.peer_spread.max),
                r.ratio
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "n/a".into()),
                match r.better {
                    Better::Higher => "higher",
                    Better::Lower => "lower",
                },
                if r.ferrovirt_wins() { "yes" } else { "no" },
            );
        }
        md
    }

    /// Writes `<dir>/<suite>.json` and `<dir>/<suite>.md`, creating `dir`.
    pub fn write(&self, dir: &Path, machine: &Machine) -> std::io::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join(format!("{}.json", self.suite));
        let md = dir.join(format!("{}.md", self.suite));
        std::fs::write(&json, self.to_json())?;
        std::fs::write(&md, self.to_markdown(machine))?;
        Ok((json, md))
    }
}

/// Three significant-ish digits: 0.0123, 1.23, 12.3, 1234.
fn num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a < 1.0 {
        format!("{x:.3}")
    } else if a < 10.0 {
        format!("{x:.2}")
    } else if a < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Samples, Side};

    fn report() -> SuiteReport {
        let mut cpu = Samples::new("boot_cpu", "ms", Better::Lower);
        let mut tput = Samples::new("iops", "kIOPS", Better::Higher);
        for (i, v) in [3.0, 4.0, 5.0].into_iter().enumerate() {
            cpu.push(Side::Ferrovirt, v);
            cpu.push(Side::Peer, 40.0 + i as f64);
            tput.push(Side::Ferrovirt, 100.0 + v);
            tput.push(Side::Peer, 200.0);
        }
        SuiteReport {
            suite: "demo".into(),
            peer_name: "QEMU 7.2".into(),
            rounds: 3,
            rows: vec![
                cpu.summarize("QEMU 7.2").unwrap(),
                tput.summarize("QEMU 7.2").unwrap(),
            ],
            goals: vec![
                Goal::at_most("boot_cpu", 5.0, "≤ 5 CPU ms"),
                Goal::at_most("missing", 1.0, "something else"),
            ],
            notes: vec!["peer runs with -M microvm".into()],
        }
    }

    #[test]
    fn json_is_an_array_of_rows() {
        let v: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["name"], "boot_cpu");
        assert_eq!(rows[0]["ferrovirt"], 4.0);
        assert_eq!(rows[0]["peer"], 41.0);
        assert_eq!(rows[1]["better"], "higher");
        assert_eq!(rows[1]["peer_name"], "QEMU 7.2");
    }

    #[test]
    fn markdown_has_table_goals_notes_and_machine() {
        let machine = Machine {
            nproc: 2,
            kernel: "6.1.0".into(),
            cpu_model: "Test CPU".into(),
            date: "2026-01-01 00:00:00 UTC".into(),
        };
        let md = report().to_markdown(&machine);
        assert!(
            md.contains(
                "| boot_cpu | ms | 4.00 [3.00–5.00] | 41.0 [40.0–42.0] | 0.10 | lower | yes |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| iops | kIOPS | 104 [103–105] | 200 [200–200] | 0.52 | higher | no |"),
            "{md}"
        );
        assert!(md.contains("- met: ≤ 5 CPU ms (ferrovirt 4.00)"));
        assert!(md.contains("- not measured: something else"));
        assert!(md.contains("- peer runs with -M microvm"));
        assert!(md.contains("- nproc: 2\n- kernel: 6.1.0"));
    }

    #[test]
    fn files_are_named_after_the_suite() {
        let dir = ferrovirt_tests::ScratchDir::new("report_files").unwrap();
        let machine = Machine::current();
        let (json, md) = report().write(&dir.join("results"), &machine).unwrap();
        assert!(json.ends_with("results/demo.json"));
        assert!(md.ends_with("results/demo.md"));
        assert!(
            std::fs::read_to_string(md)
                .unwrap()
                .starts_with("# Benchmark suite `demo`")
        );
    }

    #[test]
    fn numbers_keep_about_three_digits() {
        assert_eq!(num(0.0), "0");
        assert_eq!(num(0.01234), "0.012");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1234.5), "1234");
    }
}
