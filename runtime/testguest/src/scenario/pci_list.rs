//! `pci`: lists the functions on bus 0.

use super::{ScenarioError, check_failed};
use crate::pci;
use crate::say;

pub fn run() -> Result<(), ScenarioError> {
    let devices = pci::enumerate_bus0();
    let mut count = 0;
    for d in devices.iter() {
        say!(
            "pci {} {:04x}:{:04x} class={:06x}",
            d.address,
            d.vendor,
            d.device,
            d.class
        );
        count += 1;
    }
    say!("pci devices={count}");
    if count == 0 {
        return Err(check_failed!(
            "no PCI functions on bus 0 (configuration mechanism #1 at 0xcf8); the machine has no PCI bus"
        ));
    }
    Ok(())
}
