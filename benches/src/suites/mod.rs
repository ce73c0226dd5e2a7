//! The registry of benchmark suites. A suite is one function from the run settings to a
//! report; adding one (`blk`, `net`, `datapath`) is a module here and one line in [`SUITES`].

pub mod blk;
pub mod cni;
pub mod control_plane;
pub mod datapath;
pub mod net;
pub mod vmm_startup;

use crate::report::SuiteReport;

/// Settings shared by every suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// Measured rounds; each round runs ferrovirt and the peer once, in alternating order.
    pub rounds: usize,
}

/// One entry of the registry.
pub struct Suite {
    /// The name on the command line and of the result files.
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&RunConfig) -> anyhow::Result<SuiteReport>,
}

/// Every suite, in the order `all` runs them.
pub const SUITES: &[Suite] = &[
    vmm_startup::SUITE,
    blk::SUITE,
    net::SUITE,
    datapath::SUITE,
    cni::SUITE,
    control_plane::SUITE,
];

/// The suite called `name`.
pub fn find(name: &str) -> Option<&'static Suite> {
    SUITES.iter().find(|s| s.name == name)
}

/// The suites a command-line word selects: one by name, or every one for `all`.
pub fn select(word: &str) -> Option<Vec<&'static Suite>> {
    if word == "all" {
        Some(SUITES.iter().collect())
    } else {
        find(word).map(|s| vec![s])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_names_are_unique_and_file_safe() {
        let mut names: Vec<&str> = SUITES.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SUITES.len());
        for name in names {
            assert_ne!(name, "all");
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));
        }
    }

    #[test]
    fn all_selects_every_suite_and_unknown_names_nothing() {
        assert_eq!(select("all").unwrap().len(), SUITES.len());
        assert_eq!(select("vmm-startup").unwrap()[0].name, "vmm-startup");
        assert!(select("nope").is_none());
    }
}
