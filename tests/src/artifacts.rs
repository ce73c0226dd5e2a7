//! The binaries every test and benchmark runs: the test guest ELF and the release VMM.
//!
//! Each is built at most once per process; a file lock under `target/` keeps parallel test
//! binaries from running the same `cargo build` at the same time (cargo would serialize
//! them anyway, but it would also interleave their progress output).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The environment variable that names a prebuilt VMM binary and skips building it.
pub const VMM_ENV: &str = "FERROVIRT_VMM";
/// Overrides the vhost-user-blk backend binary.
pub const VHOST_BLK_ENV: &str = "FERROVIRT_VHOST_BLK";
/// Overrides the vhost-user-net backend binary.
pub const VHOST_NET_ENV: &str = "FERROVIRT_VHOST_NET";
/// Overrides the CNI plugin binary.
pub const CNI_ENV: &str = "FERROVIRT_CNI";
/// The environment variable that names a prebuilt test guest ELF and skips building it.
pub const TESTGUEST_ENV: &str = "FERROVIRT_TESTGUEST";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ArtifactError {
    #[error(
        "the test guest crate {0} does not exist yet; it is written under runtime/testguest/ \
         (see runtime/testguest/README.md once it lands)"
    )]
    NoTestGuestCrate(PathBuf),
    #[error("cannot run `{command}`: {reason}")]
    Spawn { command: String, reason: String },
    #[error("`{command}` failed ({status}); its output is above")]
    BuildFailed { command: String, status: String },
    #[error("`{command}` succeeded but {path} is missing: did the crate's binary name change?")]
    MissingOutput { command: String, path: PathBuf },
    #[error("{var}={path} does not name an existing file; unset it to build instead")]
    BadOverride { var: &'static str, path: PathBuf },
    #[error("cannot lock {path} to build artifacts: {reason}")]
    Lock { path: PathBuf, reason: String },
}

/// The repository root: this crate lives in `<root>/tests`.
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// The workspace target directory, honouring `CARGO_TARGET_DIR` like cargo does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

/// The test guest's own target directory (it is built outside the workspace).
pub fn testguest_target_dir() -> PathBuf {
    repo_root().join("target").join("testguest")
}

/// Builds the test guest once per process (or takes `$FERROVIRT_TESTGUEST`) and returns its
/// ELF; panics with the reason.
pub fn testguest() -> PathBuf {
    try_testguest().unwrap_or_else(|e| panic!("test guest unavailable: {e}"))
}

/// Builds the test guest once per process (or takes `$FERROVIRT_TESTGUEST`) and returns its ELF.
pub fn try_testguest() -> Result<PathBuf, ArtifactError> {
    static GUEST: OnceLock<Result<PathBuf, ArtifactError>> = OnceLock::new();
    GUEST.get_or_init(build_testguest).clone()
}

/// Returns the VMM binary: `$FERROVIRT_VMM` if set, else a release build made once per process.
/// Panics with the reason.
pub fn vmm_binary() -> PathBuf {
    try_vmm_binary().unwrap_or_else(|e| panic!("ferrovirt-vmm unavailable: {e}"))
}

/// Returns the VMM binary: `$FERROVIRT_VMM` if set, else a release build made once per process.
pub fn try_vmm_binary() -> Result<PathBuf, ArtifactError> {
    static VMM: OnceLock<Result<PathBuf, ArtifactError>> = OnceLock::new();
    VMM.get_or_init(build_vmm).clone()
}

/// Returns the vhost-user-blk backend: `$FERROVIRT_VHOST_BLK` if set, else a release build made
/// once per process.
pub fn try_vhost_blk_binary() -> Result<PathBuf, ArtifactError> {
    static BLK: OnceLock<Result<PathBuf, ArtifactError>> = OnceLock::new();
    BLK.get_or_init(build_vhost_blk).clone()
}

/// Like [`try_vhost_blk_binary`]; panics with the reason.
pub fn vhost_blk_binary() -> PathBuf {
    try_vhost_blk_binary().unwrap_or_else(|e| panic!("ferrovirt-vhost-blk unavailable: {e}"))
}

/// Returns the vhost-user-net backend: `$FERROVIRT_VHOST_NET` if set, else a release build made
/// once per process.
pub fn try_vhost_net_binary() -> Result<PathBuf, ArtifactError> {
    static NET: OnceLock<Result<PathBuf, ArtifactError>> = OnceLock::new();
    NET.get_or_init(build_vhost_net).clone()
}

/// Like [`try_vhost_net_binary`]; panics with the reason.
pub fn vhost_net_binary() -> PathBuf {
    try_vhost_net_binary().unwrap_or_else(|e| panic!("ferrovirt-vhost-net unavailable: {e}"))
}

/// Returns the CNI plugin: `$FERROVIRT_CNI` if set, else a release build made once per
/// process.
pub fn try_cni_binary() -> Result<PathBuf, ArtifactError> {
    static CNI: OnceLock<Result<PathBuf, ArtifactError>> = OnceLock::new();
    CNI.get_or_init(|| {
        build_release_binary(CNI_ENV, "ferrovirt-cni-plugin", "ferrovirt-cni", "cni")
    })
    .clone()
}

/// Returns the cluster controller: `$FERROVIRT_CONTROLLER` if set, else a release build made
/// once per process.
pub fn try_controller_binary() -> Result<PathBuf, ArtifactError> {
    static BIN: OnceLock<Result<PathBuf, ArtifactError>> = OnceLock::new();
    BIN.get_or_init(|| {
        build_release_binary(
            "FERROVIRT_CONTROLLER",
            "ferrovirt-controller",
            "ferrovirt-controller",
            "controller",
        )
    })
    .clone()
}

/// Returns the node agent: `$FERROVIRT_AGENT` if set, else a release build made once per
/// process.
pub fn try_agent_binary() -> Result<PathBuf, ArtifactError> {
    static BIN: OnceLock<Result<PathBuf, ArtifactError>> = OnceLock::new();
    BIN.get_or_init(|| {
        build_release_binary(
            "FERROVIRT_AGENT",
            "ferrovirt-controller",
            "ferrovirt-agent",
            "controller",
        )
    })
    .clone()
}

/// Returns `ferrovirt-container-disk`, linked static (it runs inside container-disk images
/// that hold no C library): `$FERROVIRT_CONTAINER_DISK` if set, else a release build for the
/// explicit host target made once per process (so its RUSTFLAGS do not touch other builds).
pub fn try_container_disk_binary() -> Result<PathBuf, ArtifactError> {
    static BIN: OnceLock<Result<PathBuf, ArtifactError>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = override_path("FERROVIRT_CONTAINER_DISK")? {
            return Ok(path);
        }
        const TARGET: &str = "x86_64-unknown-linux-gnu";
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--release",
            "-p",
            "ferrovirt-container-disk",
            "--target",
            TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(repo_root());
        let command = format!(
            "RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p ferrovirt-container-disk --target {TARGET}"
        );
        run_locked(&mut cmd, &command, "controller")?;
        let path = target_dir()
            .join(TARGET)
            .join("release")
            .join("ferrovirt-container-disk");
        if path.is_file() {
            Ok(path)
        } else {
            Err(ArtifactError::MissingOutput { command, path })
        }
    })
    .clone()
}

/// Returns fvctl: `$FERROVIRT_FVCTL` if set, else a release build made once per process.
pub fn try_fvctl_binary() -> Result<PathBuf, ArtifactError> {
    static BIN: OnceLock<Result<PathBuf, ArtifactError>> = OnceLock::new();
    BIN.get_or_init(|| {
        build_release_binary(
            "FERROVIRT_FVCTL",
            "ferrovirt-controller",
            "fvctl",
            "controller",
        )
    })
    .clone()
}

fn build_testguest() -> Result<PathBuf, ArtifactError> {
    if let Some(path) = override_path(TESTGUEST_ENV)? {
        return Ok(path);
    }
    let root = repo_root();
    let crate_dir = root.join("runtime").join("testguest");
    let manifest = crate_dir.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(ArtifactError::NoTestGuestCrate(manifest));
    }
    let target = testguest_target_dir();
    let mut cmd = cargo();
    cmd.arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        // The guest's own .cargo/config.toml (target, linker flags) is found from the cwd.
        .current_dir(&crate_dir)
        // The workspace's target dir must not redirect the guest's.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    let command = format!(
        "cargo build --release --manifest-path {} --target-dir {}",
        manifest.display(),
        target.display()
    );
    run_locked(&mut cmd, &command, "testguest")?;
    find_testguest_elf(&target).ok_or_else(|| ArtifactError::MissingOutput {
        command,
        path: target.join("release").join("ferrovirt-testguest"),
    })
}

/// `<target>/release/ferrovirt-testguest`, or `<target>/<triple>/release/...` when the guest's
/// cargo config names a build target.
fn find_testguest_elf(target: &Path) -> Option<PathBuf> {
    let plain = target.join("release").join("ferrovirt-testguest");
    if plain.is_file() {
        return Some(plain);
    }
    std::fs::read_dir(target)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("release").join("ferrovirt-testguest"))
        .find(|candidate| candidate.is_file())
}

fn build_vmm() -> Result<PathBuf, ArtifactError> {
    build_release_binary(VMM_ENV, "ferrovirt-runtime", "ferrovirt-vmm", "vmm")
}

fn build_vhost_blk() -> Result<PathBuf, ArtifactError> {
    build_release_binary(
        VHOST_BLK_ENV,
        "ferrovirt-vhost-blk",
        "ferrovirt-vhost-blk",
        "vhost-blk",
    )
}

fn build_vhost_net() -> Result<PathBuf, ArtifactError> {
    build_release_binary(
        VHOST_NET_ENV,
        "ferrovirt-vhost-net",
        "ferrovirt-vhost-net",
        "vhost-net",
    )
}

/// `$env_var` if set, else `cargo build --release -p package --bin bin` (under a lock named
/// `lock`) and its output in the target dir.
fn build_release_binary(
    env_var: &'static str,
    package: &str,
    bin: &str,
    lock: &str,
) -> Result<PathBuf, ArtifactError> {
    if let Some(path) = override_path(env_var)? {
        return Ok(path);
    }
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", package, "--bin", bin])
        .current_dir(repo_root());
    let command = format!("cargo build --release -p {package} --bin {bin}");
    run_locked(&mut cmd, &command, lock)?;
    let path = target_dir().join("release").join(bin);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ArtifactError::MissingOutput { command, path })
    }
}

/// The file an environment variable names, if it is set and not empty.
fn override_path(var: &'static str) -> Result<Option<PathBuf>, ArtifactError> {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(path) => {
            let path = PathBuf::from(path);
            if path.is_file() {
                Ok(Some(path))
            } else {
                Err(ArtifactError::BadOverride { var, path })
            }
        }
    }
}

fn cargo() -> Command {
    // Under `cargo test`, $CARGO names the cargo that runs us; use the same toolchain.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs a build while holding `target/.ferrovirt-build-<what>.lock`. Cargo's output goes to our
/// stderr, which the test harness shows for failing tests.
fn run_locked(cmd: &mut Command, command: &str, what: &str) -> Result<(), ArtifactError> {
    let lock_dir = repo_root().join("target");
    let lock_path = lock_dir.join(format!(".ferrovirt-build-{what}.lock"));
    let lock_err = |reason: String| ArtifactError::Lock {
        path: lock_path.clone(),
        reason,
    };
    std::fs::create_dir_all(&lock_dir).map_err(|e| lock_err(e.to_string()))?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| lock_err(e.to_string()))?;
    lock.lock().map_err(|e| lock_err(e.to_string()))?;
    let output = cmd.output().map_err(|e| ArtifactError::Spawn {
        command: command.to_string(),
        reason: e.to_string(),
    })?;
    drop(lock);
    // Keep cargo's diagnostics visible; the test harness captures eprint! per test.
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        return Err(ArtifactError::BuildFailed {
            command: command.to_string(),
            status: output.status.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }

    #[test]
    fn testguest_elf_is_found_with_or_without_a_target_triple() {
        let dir = crate::ScratchDir::new("artifacts-triple").unwrap();
        assert_eq!(find_testguest_elf(dir.path()), None);
        let nested = dir.path().join("x86_64-unknown-none").join("release");
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::write(nested.join("ferrovirt-testguest"), b"\x7fELF").unwrap();
        assert_eq!(
            find_testguest_elf(dir.path()),
            Some(nested.join("ferrovirt-testguest"))
        );
        let plain = dir.path().join("release");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("ferrovirt-testguest"), b"\x7fELF").unwrap();
        assert_eq!(
            find_testguest_elf(dir.path()),
            Some(plain.join("ferrovirt-testguest"))
        );
    }
}
