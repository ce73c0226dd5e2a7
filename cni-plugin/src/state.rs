//! Attachment records under the state directory: what ADD made (and what it changed, so DEL
//! can put it back), one JSON file per attachment, `<stateDir>/<network>/<containerID>@<ifname>.json`.
//! GC lists them; a lock file serializes the plugin processes working on one network.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::result::CniResult;
use crate::sriov::SriovRecord;
use crate::vhost_user::VhostUserRecord;

/// How long a plugin call waits for another one on the same network before answering
/// "try again later" (code 11).
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {0}; is stateDir writable by the plugin (root)?")]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("cannot open the lock file {0}")]
    OpenLock(PathBuf, #[source] std::io::Error),
    #[error("another ferrovirt-cni call has held {0} for {LOCK_TIMEOUT:?}; try again later")]
    Busy(PathBuf),
    #[error("cannot read the attachment record {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the attachment record {0} is corrupt; remove it after cleaning up by hand")]
    Corrupt(PathBuf, #[source] serde_json::Error),
    #[error("cannot write the attachment record {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error(
        "network name {0:?} cannot name a state directory; use letters, digits, '_', '.' and '-'"
    )]
    BadNetworkName(String),
}

impl StateError {
    pub fn code(&self) -> u32 {
        match self {
            StateError::Busy(_) => 11,
            StateError::BadNetworkName(_) => 7,
            _ => 5,
        }
    }
}

/// What one attachment consists of.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRecord {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
    /// The inode of `netns` when the attachment was made: how a node agent in a pod, which
    /// may not see the runtime's netns path, matches the record to a process's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u64>,
    pub mode: Mode,
    /// Set before the IPAM plugin is asked, so a crash after it still releases the lease.
    pub ipam_leased: bool,
    pub result: Option<CniResult>,
    pub vhost_user: Option<VhostUserRecord>,
    pub sriov: Option<SriovRecord>,
}

impl AttachmentRecord {
    pub fn new(container_id: &str, ifname: &str, netns: Option<PathBuf>, mode: Mode) -> Self {
        use std::os::unix::fs::MetadataExt;
        AttachmentRecord {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
            netns_inode: netns
                .as_ref()
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| m.ino()),
            netns,
            mode,
            ipam_leased: false,
            result: None,
            vhost_user: None,
            sriov: None,
        }
    }
}

/// The records of one network, locked for the life of this value.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    _lock: File,
}

impl StateStore {
    /// Opens `<state_dir>/<network>/` and takes its lock (waiting up to [`LOCK_TIMEOUT`]).
    pub fn open(state_dir: &Path, network: &str) -> Result<StateStore, StateError> {
        if crate::env::check_container_id(network).is_err() {
            return Err(StateError::BadNetworkName(network.to_owned()));
        }
        let dir = state_dir.join(network);
        std::fs::create_dir_all(&dir).map_err(|e| StateError::CreateDir(dir.clone(), e))?;
        let lock_path = dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StateError::OpenLock(lock_path.clone(), e))?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::WouldBlock {
                return Err(StateError::OpenLock(lock_path, e));
            }
            if Instant::now() >= deadline {
                return Err(StateError::Busy(lock_path));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(StateStore { dir, _lock: lock })
    }

    fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        // '@' cannot occur in a container ID, so the split is unambiguous.
        self.dir.join(format!("{container_id}@{ifname}.json"))
    }

    pub fn load(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<AttachmentRecord>, StateError> {
        read_record(&self.path(container_id, ifname))
    }

    /// Writes the record atomically (temporary file, then rename).
    pub fn save(&self, record: &AttachmentRecord) -> Result<(), StateError> {
        let path = self.path(&record.container_id, &record.ifname);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| StateError::Write(path.clone(), std::io::Error::other(e)))?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| StateError::Write(path, e))
    }

    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<(), StateError> {
        let path = self.path(container_id, ifname);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(StateError::Write(path, e)),
            _ => Ok(()),
        }
    }

    /// Every record of this network.
    pub fn list(&self) -> Result<Vec<AttachmentRecord>, StateError> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| StateError::Read(self.dir.clone(), e))?;
        let mut records = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| StateError::Read(self.dir.clone(), e))?
                .path();
            if path.extension().is_some_and(|ext| ext == "json")
                && let Some(record) = read_record(&path)?
            {
                records.push(record);
            }
        }
        Ok(records)
    }
}

fn read_record(path: &Path) -> Result<Option<AttachmentRecord>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt(path.to_owned(), e)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::Read(path.to_owned(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_saved_listed_and_removed_and_the_lock_excludes_a_second_store() {
        let root = std::env::temp_dir().join(format!("fv-state-{}", std::process::id()));
        let store = StateStore::open(&root, "net-a").unwrap();
        let record = AttachmentRecord::new("c1", "net1", None, Mode::VhostUser);
        store.save(&record).unwrap();
        assert_eq!(store.load("c1", "net1").unwrap().unwrap().ifname, "net1");
        assert_eq!(store.list().unwrap().len(), 1);
        // flock is per open file description: a second open in this process must wait.
        let started = Instant::now();
        let handle = std::thread::spawn({
            let root = root.clone();
            move || StateStore::open(&root, "net-a").map(|_| started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        store.remove("c1", "net1").unwrap();
        store.remove("c1", "net1").unwrap();
        assert!(store.load("c1", "net1").unwrap().is_none());
        drop(store);
        let waited = handle.join().unwrap().unwrap();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(matches!(
            StateStore::open(&root, "../x"),
            Err(StateError::BadNetworkName(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
