//! The scenarios a test picks with `scenario=NAME`. Each prints `testguest: ...` lines and
//! returns Ok (the caller prints PASS and exits 0) or the reason it failed.

mod blk;
mod fault;
mod hello;
mod idle;
mod net;
mod pci_list;
mod poweroff;
mod reset;
mod rng;
pub mod smp;
mod ticker;

use core::fmt;

use crate::acpi::AcpiError;
use crate::console::{Ascii, Message};
use crate::msix::MsixError;
use crate::pci::PciError;
use crate::start_info::StartInfo;
use crate::virtio::VirtioError;
use crate::virtio::blk::BlkError;
use crate::virtio::net::NetError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Hello,
    Exit,
    Smp,
    Pci,
    Rng,
    Ticker,
    Poweroff,
    Reset,
    Fault,
    Blk,
    BlkDiscard,
    BlkRo,
    BlkMq,
    NetResponder,
    NetSend,
    NetRecv,
    Idle,
}

impl Scenario {
    const ALL: [Scenario; 17] = [
        Self::Hello,
        Self::Exit,
        Self::Smp,
        Self::Pci,
        Self::Rng,
        Self::Ticker,
        Self::Poweroff,
        Self::Reset,
        Self::Fault,
        Self::Blk,
        Self::BlkDiscard,
        Self::BlkRo,
        Self::BlkMq,
        Self::NetResponder,
        Self::NetSend,
        Self::NetRecv,
        Self::Idle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::Exit => "exit",
            Self::Smp => "smp",
            Self::Pci => "pci",
            Self::Rng => "rng",
            Self::Ticker => "ticker",
            Self::Poweroff => "poweroff",
            Self::Reset => "reset",
            Self::Fault => "fault",
            Self::Blk => "blk",
            Self::BlkDiscard => "blk-discard",
            Self::BlkRo => "blk-ro",
            Self::BlkMq => "blk-mq",
            Self::NetResponder => "net-responder",
            Self::NetSend => "net-send",
            Self::NetRecv => "net-recv",
            Self::Idle => "idle",
        }
    }

    pub fn from_name(name: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name().as_bytes() == name)
    }

    pub fn from_index(index: u8) -> Option<Self> {
        Self::ALL.get(usize::from(index)).copied()
    }

    pub fn index(self) -> u8 {
        Self::ALL.iter().position(|&s| s == self).unwrap_or(0) as u8
    }

    pub fn run(self, info: &StartInfo) -> Result<(), ScenarioError> {
        match self {
            // `exit` never gets here: main leaves before touching the serial port.
            Self::Exit => Ok(()),
            Self::Hello => hello::run(info),
            Self::Smp => smp::run(info),
            Self::Pci => pci_list::run(),
            Self::Rng => rng::run(info),
            Self::Ticker => ticker::run(),
            Self::Poweroff => poweroff::run(info),
            Self::Reset => reset::run(),
            Self::Fault => fault::run(),
            Self::Blk => blk::run(info),
            Self::BlkDiscard => blk::run_discard(info),
            Self::BlkRo => blk::run_ro(info),
            Self::BlkMq => blk::run_mq(info),
            Self::NetResponder => net::run_responder(info),
            Self::NetSend => net::run_send(info),
            Self::NetRecv => net::run_recv(info),
            Self::Idle => idle::run(),
        }
    }
}

/// Displays every scenario name, space-separated (for the unknown-scenario FAIL line).
pub struct KnownNames;

impl fmt::Display for KnownNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in Scenario::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(s.name())?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum ScenarioError {
    Acpi(AcpiError),
    Pci(PciError),
    Msix(MsixError),
    Virtio(VirtioError),
    Blk(BlkError),
    Net(NetError),
    /// A check of the scenario itself failed.
    Check(Message),
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Acpi(e) => write!(f, "{e}"),
            Self::Pci(e) => write!(f, "{e}"),
            Self::Msix(e) => write!(f, "{e}"),
            Self::Virtio(e) => write!(f, "{e}"),
            Self::Blk(e) => write!(f, "{e}"),
            Self::Net(e) => write!(f, "{e}"),
            Self::Check(m) => write!(f, "{m}"),
        }
    }
}

impl From<AcpiError> for ScenarioError {
    fn from(e: AcpiError) -> Self {
        Self::Acpi(e)
    }
}
impl From<PciError> for ScenarioError {
    fn from(e: PciError) -> Self {
        Self::Pci(e)
    }
}
impl From<MsixError> for ScenarioError {
    fn from(e: MsixError) -> Self {
        Self::Msix(e)
    }
}
impl From<BlkError> for ScenarioError {
    fn from(e: BlkError) -> Self {
        Self::Blk(e)
    }
}
impl From<VirtioError> for ScenarioError {
    fn from(e: VirtioError) -> Self {
        Self::Virtio(e)
    }
}

/// `check_failed!("fmt", args...)` builds a `ScenarioError::Check`.
macro_rules! check_failed {
    ($($arg:tt)*) => {
        $crate::scenario::ScenarioError::Check($crate::console::Message::new(format_args!($($arg)*)))
    };
}
pub(crate) use check_failed;

/// The decimal value of `key=value` on the command line, or `default` without one.
pub(crate) fn param(cmdline: &[u8], key: &str, default: u64) -> Result<u64, ScenarioError> {
    let Some(value) = crate::start_info::cmdline_param(cmdline, key) else {
        return Ok(default);
    };
    let parsed = core::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    parsed.ok_or_else(|| check_failed!("{key}={} is not a decimal number", Ascii(value)))
}
