//! Link ferrovirt-vmm as a position-dependent executable: a PIE's relocations dirty about
//! a megabyte of its pages at every start, and that resident memory is paid per VM.
fn main() {
    println!("cargo:rustc-link-arg-bin=ferrovirt-vmm=-no-pie");
}
