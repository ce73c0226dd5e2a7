//! Link arguments for the freestanding guest ELF. They live here (not in a
//! `.cargo/config.toml`) so that `cargo build --manifest-path .../Cargo.toml` works from
//! any directory.

use std::path::Path;

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")
        .expect("cargo sets CARGO_MANIFEST_DIR for build scripts");
    let script = Path::new(&manifest_dir).join("linker.ld");
    println!("cargo::rerun-if-changed=linker.ld");
    println!("cargo::rerun-if-changed=build.rs");
    for arg in [
        // No C runtime, no libc: the entry point is `pvh_entry` in src/boot.rs.
        "-nostartfiles",
        "-nostdlib",
        // rustc asks for a PIE on this target; the boot code uses absolute 32-bit
        // addresses, so link a fixed-address, static executable instead.
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
        "-Wl,-z,max-page-size=4096",
    ] {
        println!("cargo::rustc-link-arg-bins={arg}");
    }
    println!("cargo::rustc-link-arg-bins=-Wl,-T,{}", script.display());
}
