//! `cloudInitNoCloud` volumes: cloud-init's NoCloud data source as a disk. The node writes a
//! small FAT image labelled `cidata` holding `meta-data`, `user-data` and, when given,
//! `network-config`; cloud-init in the guest finds it by its label.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::crd::spec::CloudInitNoCloud;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field} is not valid base64: {source}")]
    Base64 {
        field: &'static str,
        source: base64::DecodeError,
    },
    #[error("give userData or userDataBase64, not both")]
    TwoUserData,
    #[error("give networkData or networkDataBase64, not both")]
    TwoNetworkData,
    #[error(
        "the cloud-init data is {0} bytes; at most {MAX_DATA} fit (put large files elsewhere and fetch them from user-data)"
    )]
    TooLarge(usize),
    #[error("cannot write the cloud-init disk {0}: {1}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// The most data (user-data plus network-config) a NoCloud disk holds.
pub const MAX_DATA: usize = 16 << 20;
/// The volume label cloud-init looks for.
const LABEL: &[u8; 11] = b"cidata     ";

/// The files of a NoCloud disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoCloud {
    pub meta_data: Vec<u8>,
    pub user_data: Vec<u8>,
    pub network_config: Option<Vec<u8>>,
}

impl NoCloud {
    /// The files for `source`. `instance_id` changes when the guest should run cloud-init's
    /// first-boot modules again (KubeVirt uses `<name>.<namespace>`); `hostname` becomes
    /// `local-hostname`.
    pub fn new(
        source: &CloudInitNoCloud,
        instance_id: &str,
        hostname: &str,
    ) -> Result<NoCloud, Error> {
        let user_data = one_of(
            source.user_data.as_deref(),
            source.user_data_base64.as_deref(),
            "userDataBase64",
        )
        .ok_or(Error::TwoUserData)??
        .unwrap_or_default();
        let network_config = one_of(
            source.network_data.as_deref(),
            source.network_data_base64.as_deref(),
            "networkDataBase64",
        )
        .ok_or(Error::TwoNetworkData)??;
        let size = user_data.len() + network_config.as_ref().map_or(0, Vec::len);
        if size > MAX_DATA {
            return Err(Error::TooLarge(size));
        }
        Ok(NoCloud {
            meta_data: format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
                .into_bytes(),
            user_data,
            network_config,
        })
    }

    /// Writes the disk image to `path`, replacing what is there.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let fail = |e: std::io::Error| Error::Write(path.to_owned(), e);
        let data = self.meta_data.len()
            + self.user_data.len()
            + self.network_config.as_ref().map_or(0, Vec::len);
        // Room for the FAT, the directory and cluster slack; at least 1 MiB (a FAT12 volume).
        let size = ((data as u64 * 5 / 4 + (1 << 20)) + 0xfffff) & !0xfffff;
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(fail)?;
        file.set_len(size).map_err(fail)?;
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new().volume_label(*LABEL),
        )
        .map_err(fail)?;
        file.seek(SeekFrom::Start(0)).map_err(fail)?;
        {
            let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).map_err(fail)?;
            let files = [
                ("meta-data", Some(&self.meta_data)),
                ("user-data", Some(&self.user_data)),
                ("network-config", self.network_config.as_ref()),
            ];
            for (name, content) in files {
                let Some(content) = content else { continue };
                let mut f = fs.root_dir().create_file(name).map_err(fail)?;
                f.truncate().map_err(fail)?;
                f.write_all(content).map_err(fail)?;
                f.flush().map_err(fail)?;
            }
            fs.unmount().map_err(fail)?;
        }
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)
    }
}

/// The one of `text` and `base64` that is set (decoded); `None` when both are.
fn one_of(
    text: Option<&str>,
    base64: Option<&str>,
    field: &'static str,
) -> Option<Result<Option<Vec<u8>>, Error>> {
    match (text, base64) {
        (Some(_), Some(_)) => None,
        (Some(t), None) => Some(Ok(Some(t.as_bytes().to_vec()))),
        (None, Some(b)) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map(Some)
                .map_err(|source| Error::Base64 { field, source }),
        ),
        (None, None) => Some(Ok(None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(user: Option<&str>, user64: Option<&str>) -> CloudInitNoCloud {
        CloudInitNoCloud {
            user_data: user.map(str::to_owned),
            user_data_base64: user64.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn base64_and_text_user_data_decode_to_the_same_files() {
        let text = NoCloud::new(&source(Some("#cloud-config\n"), None), "vm.ns", "vm").unwrap();
        let b64 = NoCloud::new(&source(None, Some("I2Nsb3VkLWNvbmZpZwo=")), "vm.ns", "vm").unwrap();
        assert_eq!(text, b64);
        assert_eq!(
            String::from_utf8_lossy(&text.meta_data),
            "instance-id: vm.ns\nlocal-hostname: vm\n"
        );
        assert_eq!(text.network_config, None);
    }

    #[test]
    fn bad_input_is_refused_with_a_message() {
        let both = NoCloud::new(&source(Some("a"), Some("YQ==")), "i", "h").unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
        let bad = NoCloud::new(&source(None, Some("%%%")), "i", "h").unwrap_err();
        assert!(bad.to_string().contains("userDataBase64"), "{bad}");
        let huge = "x".repeat(MAX_DATA + 1);
        let big = NoCloud::new(&source(Some(&huge), None), "i", "h").unwrap_err();
        assert!(matches!(big, Error::TooLarge(_)), "{big}");
    }

    /// The image is a clean FAT volume labelled cidata holding the files byte for byte, as
    /// dosfstools and mtools (FAT implementations of their own) read it.
    #[test]
    fn the_disk_is_a_fat_volume_labelled_cidata_with_the_files() {
        let dir = ferrovirt_tests::ScratchDir::new("nocloud").unwrap();
        let image = dir.join("cidata.img");
        let nocloud = NoCloud {
            meta_data: b"instance-id: t.ns\nlocal-hostname: t\n".to_vec(),
            user_data: b"#cloud-config\npassword: x\n".repeat(3000),
            network_config: Some(b"version: 2\n".to_vec()),
        };
        nocloud.write(&image).unwrap();
        // Written again (a restarted start): replaced, not appended to.
        nocloud.write(&image).unwrap();
        let run = |program: &str, args: &[&str]| {
            let out = std::process::Command::new(program)
                .args(args)
                .arg(&image)
                .output()
                .unwrap_or_else(|e| panic!("{program} (scripts/setup.sh installs it): {e}"));
            assert!(out.status.success(), "{program}: {out:?}");
            out.stdout
        };
        run("fsck.fat", &["-n"]);
        let label = run("blkid", &["-o", "value", "-s", "LABEL"]);
        assert_eq!(String::from_utf8_lossy(&label).trim(), "cidata");
        let file = |name: &str| {
            let out = std::process::Command::new("mtype")
                .args(["-i"])
                .arg(&image)
                .arg(format!("::{name}"))
                .output()
                .unwrap();
            assert!(out.status.success(), "mtype {name}: {out:?}");
            out.stdout
        };
        assert_eq!(file("meta-data"), nocloud.meta_data);
        assert_eq!(file("user-data"), nocloud.user_data);
        assert_eq!(Some(file("network-config")), nocloud.network_config);
    }
}
