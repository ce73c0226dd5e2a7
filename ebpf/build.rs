//! Compiles the datapath's C programs (bpf/datapath.c) into a BPF object in OUT_DIR, which
//! the crate embeds with `aya::include_bytes_aligned!`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "bpf/datapath.c";
const HEADER: &str = "bpf/datapath.h";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={HEADER}");
    println!("cargo:rerun-if-env-changed=CLANG");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("datapath.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());

    let mut command = Command::new(&clang);
    command.args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"]);
    if let Some(dir) = multiarch_include_dir() {
        // Debian keeps asm/types.h (pulled in by linux/types.h) under the multiarch directory,
        // which clang does not search for the bpf target.
        command.arg("-I").arg(dir);
    }
    command.arg("-c").arg(SOURCE).arg("-o").arg(&object);

    let status = match command.status() {
        Ok(status) => status,
        Err(error) => panic!(
            "cannot run `{clang}` to build the eBPF datapath ({error}): \
             install it with `apt-get install clang libbpf-dev` (or set CLANG=/path/to/clang)"
        ),
    };
    if !status.success() {
        panic!(
            "`{clang}` failed to compile {SOURCE} ({status}); see its messages above. \
             Missing bpf/bpf_helpers.h means libbpf-dev is not installed: \
             `apt-get install clang libbpf-dev`"
        );
    }
}

/// `/usr/include/<arch>-linux-gnu` for the host's architecture, where it exists.
fn multiarch_include_dir() -> Option<PathBuf> {
    let host = env::var("HOST").ok()?;
    let arch = host.split('-').next()?;
    let dir = Path::new("/usr/include").join(format!("{arch}-linux-gnu"));
    dir.is_dir().then_some(dir)
}
