//! Shared by the datapath's tests: a datapath in its own pin directory, removed on Drop.

#![allow(dead_code)] // each test binary uses a different part

use std::ops::Deref;
use std::path::PathBuf;

use ferrovirt_ebpf::{Datapath, DatapathConfig};
use ferrovirt_tests::unique_name;

/// A datapath loaded into `/sys/fs/bpf/ferrovirt-test-<unique>`; destroyed (links detached,
/// pins removed) on Drop, so tests run in parallel and leave nothing behind.
pub struct TestDatapath {
    datapath: Option<Datapath>,
    config: DatapathConfig,
}

/// A pin directory of its own for one test.
pub fn unique_config() -> DatapathConfig {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/ferrovirt-test-{}", unique_name("")));
    DatapathConfig { pin_dir }
}

impl TestDatapath {
    pub fn load() -> TestDatapath {
        let config = unique_config();
        let datapath = Datapath::open_or_load(&config).expect("load the datapath (root, bpffs?)");
        TestDatapath {
            datapath: Some(datapath),
            config,
        }
    }

    pub fn config(&self) -> &DatapathConfig {
        &self.config
    }
}

impl Deref for TestDatapath {
    type Target = Datapath;

    fn deref(&self) -> &Datapath {
        self.datapath.as_ref().expect("present until drop")
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        if let Some(datapath) = self.datapath.take()
            && let Err(error) = datapath.destroy()
        {
            eprintln!("cannot destroy {}: {error}", self.config.pin_dir.display());
        }
    }
}
