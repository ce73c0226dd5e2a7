//! ferrovirt's cluster side: the CRDs, the controller that turns VirtualMachines into
//! VirtualMachineInstances and launcher pods, and the library behind `fvctl`.

pub mod agent;
pub mod cli;
pub mod controllers;
pub mod crd;
pub mod fvctl;
pub mod launcher;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod run;
pub mod server;
