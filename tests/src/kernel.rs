//! A real Linux kernel for boot tests: Debian's cloud kernel, fetched with apt and unpacked
//! to an ELF vmlinux in a cache outside the tree.
//!
//! `linux-image-cloud-amd64` is a metapackage; its dependency names the versioned package
//! (`linux-image-<abi>-cloud-amd64`). The cache entry is keyed by that package and its
//! Debian version, so a kernel update makes a new entry and old ones stay valid. A file lock
//! makes concurrent test binaries wait for one download instead of racing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, OnceLock};

use crate::bzimage::{self, BzImageError};
use crate::process::next_unique;

/// Environment variable naming the cache directory.
pub const CACHE_ENV: &str = "FERROVIRT_CACHE";
/// The cache directory when `$FERROVIRT_CACHE` is unset.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/ferrovirt";
/// The Debian metapackage that always depends on the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

#[derive(Debug, Clone, thiserror::Error)]
pub enum KernelError {
    #[error("cannot use cache directory {path}; set {CACHE_ENV} to a writable directory")]
    CacheDir {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("cannot run {program}: this needs Debian's apt and dpkg")]
    Tool {
        program: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error(
        "cannot resolve {KERNEL_METAPACKAGE} to a versioned kernel package, even after \
         `apt-get update`, and no kernel is cached in {cache}; are Debian's package mirrors \
         reachable (offline?) — apt said:\n{detail}"
    )]
    Offline { cache: PathBuf, detail: String },
    #[error(
        "`apt-get download {package}` failed; are Debian's package mirrors reachable? apt said:\n{detail}"
    )]
    Download { package: String, detail: String },
    #[error("`dpkg-deb -x {deb}` failed:\n{detail}")]
    Unpack { deb: PathBuf, detail: String },
    #[error("package {0} contains no boot/vmlinuz-*")]
    NoVmlinuz(String),
    #[error("{path} cannot be turned into a vmlinux")]
    Extract {
        path: PathBuf,
        #[source]
        source: BzImageError,
    },
    #[error("cannot write the kernel cache entry {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
}

/// One cached kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianKernel {
    /// The versioned package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Its Debian version, e.g. `6.1.192-2`.
    pub version: String,
    /// The uncompressed ELF kernel (with the Xen PVH note).
    pub vmlinux: PathBuf,
    /// The original bzImage, for bzImage boot tests.
    pub bzimage: PathBuf,
    /// The kernel's build config.
    pub config: PathBuf,
}

/// The ELF vmlinux of Debian's cloud kernel, downloaded and unpacked once per cache.
pub fn debian_kernel() -> Result<PathBuf, KernelError> {
    debian_kernel_info().map(|k| k.vmlinux)
}

/// Like [`debian_kernel`], with the package, version and the other cached files.
pub fn debian_kernel_info() -> Result<DebianKernel, KernelError> {
    static KERNEL: OnceLock<Result<DebianKernel, KernelError>> = OnceLock::new();
    KERNEL.get_or_init(|| fetch_kernel(&cache_dir())).clone()
}

/// `$FERROVIRT_CACHE`, else `/var/cache/ferrovirt`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
}

fn fetch_kernel(cache: &Path) -> Result<DebianKernel, KernelError> {
    let kernels = cache.join("kernels");
    let cache_err = |source: std::io::Error| KernelError::CacheDir {
        path: kernels.clone(),
        source: Arc::new(source),
    };
    std::fs::create_dir_all(&kernels).map_err(cache_err)?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(kernels.join(".lock"))
        .map_err(cache_err)?;
    lock.lock().map_err(cache_err)?;

    let (package, version) = match resolve_kernel_package() {
        Ok(found) => found,
        Err(detail) => {
            return newest_cached(&kernels).ok_or(KernelError::Offline {
                cache: kernels.clone(),
                detail,
            });
        }
    };
    let entry = kernels.join(entry_name(&package, &version));
    let kernel = DebianKernel {
        vmlinux: entry.join("vmlinux"),
        bzimage: entry.join("vmlinuz"),
        config: entry.join("config"),
        package,
        version,
    };
    if kernel.vmlinux.is_file() {
        return Ok(kernel);
    }
    let staging = kernels.join(format!(".staging-{}-{}", std::process::id(), next_unique()));
    let result = download_and_unpack(&kernel, &staging).and_then(|()| {
        std::fs::rename(&staging, &entry).map_err(|source| KernelError::Write {
            path: entry.clone(),
            source: Arc::new(source),
        })
    });
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| kernel)
}

/// `(package, version)` of the kernel the metapackage depends on, running `apt-get update`
/// once if the package lists do not know it. `Err` carries apt's words.
fn resolve_kernel_package() -> Result<(String, String), String> {
    let lookup = || -> Result<(String, String), String> {
        let depends = run_text(
            Command::new("apt-cache")
                .args(["depends", KERNEL_METAPACKAGE])
                .env("LC_ALL", "C"),
        )?;
        let package = versioned_dependency(&depends)
            .ok_or_else(|| format!("apt-cache depends {KERNEL_METAPACKAGE}:\n{depends}"))?;
        let show = run_text(
            Command::new("apt-cache")
                .args(["show", "--no-all-versions", &package])
                .env("LC_ALL", "C"),
        )?;
        let version = field(&show, "Version")
            .ok_or_else(|| format!("apt-cache show {package} gives no Version:\n{show}"))?;
        Ok((package, version))
    };
    lookup().or_else(|first| {
        let update = Command::new("apt-get")
            .args(["update", "-qq"])
            .stdin(Stdio::null())
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
        match update {
            Ok(out) if out.status.success() => lookup(),
            Ok(out) => Err(format!(
                "{first}\napt-get update failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => Err(format!("{first}\ncannot run apt-get update: {e}")),
        }
    })
}

fn download_and_unpack(kernel: &DebianKernel, staging: &Path) -> Result<(), KernelError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source: std::io::Error| KernelError::Write {
            path,
            source: Arc::new(source),
        }
    };
    std::fs::create_dir_all(staging).map_err(write_err(staging))?;
    let spec = format!("{}={}", kernel.package, kernel.version);
    // As root, apt would drop to the `_apt` user, which cannot write the staging dir.
    let out = run(Command::new("apt-get")
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", &spec])
        .current_dir(staging))?;
    if !out.status.success() {
        return Err(KernelError::Download {
            package: spec,
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let deb = std::fs::read_dir(staging)
        .map_err(write_err(staging))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|ext| ext == "deb"))
        .ok_or_else(|| KernelError::Download {
            package: spec.clone(),
            detail: "apt-get succeeded but left no .deb".into(),
        })?;
    let root = staging.join("root");
    let out = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    if !out.status.success() {
        return Err(KernelError::Unpack {
            deb,
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let boot = root.join("boot");
    let find_boot_file = |prefix: &str| {
        std::fs::read_dir(&boot).ok().and_then(|entries| {
            entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
        })
    };
    let vmlinuz = find_boot_file("vmlinuz-").ok_or_else(|| KernelError::NoVmlinuz(spec.clone()))?;
    let image = std::fs::read(&vmlinuz).map_err(write_err(&vmlinuz))?;
    let elf = bzimage::extract_vmlinux(&image).map_err(|source| KernelError::Extract {
        path: vmlinuz.clone(),
        source,
    })?;
    let put = |name: &str, bytes: &[u8]| {
        let path = staging.join(name);
        std::fs::write(&path, bytes).map_err(write_err(&path))
    };
    put("vmlinux", &elf)?;
    put("vmlinuz", &image)?;
    if let Some(config) = find_boot_file("config-") {
        let text = std::fs::read(&config).map_err(write_err(&config))?;
        put("config", &text)?;
    }
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&deb);
    Ok(())
}

/// The most recently written cache entry, for offline runs.
fn newest_cached(kernels: &Path) -> Option<DebianKernel> {
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(kernels)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("vmlinux").is_file())
        .filter_map(|p| Some((p.join("vmlinux").metadata().ok()?.modified().ok()?, p)))
        .collect();
    entries.sort();
    let (_, entry) = entries.pop()?;
    let name = entry.file_name()?.to_str()?.to_string();
    let (package, version) = name.split_once('_').unwrap_or((&name, ""));
    eprintln!("apt cannot resolve {KERNEL_METAPACKAGE} (offline?); using cached {name}");
    Some(DebianKernel {
        package: package.to_string(),
        version: version.to_string(),
        vmlinux: entry.join("vmlinux"),
        bzimage: entry.join("vmlinuz"),
        config: entry.join("config"),
    })
}

/// `<package>_<version>` with characters that are awkward in paths replaced.
fn entry_name(package: &str, version: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-.+~".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!("{}_{}", clean(package), clean(version))
}

/// The `linux-image-…` package a `apt-cache depends` listing depends on.
fn versioned_dependency(depends: &str) -> Option<String> {
    depends.lines().find_map(|line| {
        let dep = line
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends:")?;
        let dep = dep.trim();
        (dep.starts_with("linux-image-") && !dep.starts_with('<') && dep != KERNEL_METAPACKAGE)
            .then(|| dep.to_string())
    })
}

/// The value of a `Name: value` field of a Debian control record.
fn field(record: &str, name: &str) -> Option<String> {
    record.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim().to_string())
    })
}

fn run(cmd: &mut Command) -> Result<Output, KernelError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|source| KernelError::Tool {
            program,
            source: Arc::new(source),
        })
}

/// Stdout of a successful command, or its words of failure.
fn run_text(cmd: &mut Command) -> Result<String, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_dependency_is_read_from_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            versioned_dependency(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            versioned_dependency("linux-image-cloud-amd64\n"),
            None,
            "no lists yet"
        );
    }

    #[test]
    fn version_field_is_read_from_a_control_record() {
        let rec = "Package: linux-image-6.1.0-56-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\n";
        assert_eq!(field(rec, "Version").as_deref(), Some("6.1.192-2"));
        assert_eq!(field(rec, "Missing"), None);
    }

    #[test]
    fn cache_entries_have_path_safe_names() {
        assert_eq!(
            entry_name("linux-image-6.1.0-56-cloud-amd64", "1:6.1.192-2"),
            "linux-image-6.1.0-56-cloud-amd64_1-6.1.192-2"
        );
    }

    /// Downloads the real kernel (once per cache) and checks the unpacking end to end.
    #[test]
    fn debian_cloud_kernel_unpacks_to_a_pvh_bootable_elf() {
        let kernel = debian_kernel_info().unwrap_or_else(|e| panic!("{e}"));
        let image = std::fs::read(&kernel.bzimage).unwrap();
        let payload = bzimage::locate_payload(&image).unwrap();
        assert!(
            payload.compression.is_some(),
            "payload at {:#x} has no known magic",
            payload.offset
        );
        let elf = std::fs::read(&kernel.vmlinux).unwrap();
        assert!(bzimage::is_x86_64_elf(&elf));
        assert!(
            bzimage::has_pvh_note(&elf),
            "Debian's cloud kernel has CONFIG_PVH=y; the note must survive unpacking"
        );
        assert_eq!(bzimage::extract_vmlinux(&image).unwrap(), elf);
        // A second call is served from the cache.
        assert_eq!(debian_kernel().unwrap(), kernel.vmlinux);
    }
}
