//! ferrovirt's performance suite: each suite runs ferrovirt and its peer side by side in
//! alternating rounds and writes medians and ratios to `benches/results/<suite>.{json,md}`.

pub mod cpu;
pub mod machine;
pub mod report;
pub mod stats;
pub mod suites;

use std::path::PathBuf;

/// Where results go by default: `<repo>/benches/results`.
pub fn default_results_dir() -> PathBuf {
    ferrovirt_tests::repo_root().join("benches").join("results")
}

/// The first `program` on `$PATH`, for the peers and tools a suite runs.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}
