//! Loads datapath.o once per pin directory and pins its maps and programs, or re-opens what
//! an earlier process pinned there (the fast path of a short-lived CNI call).

use aya::EbpfLoader;
use aya::pin::PinError;
use aya::programs::{ProgramError, SchedClassifier, Xdp};
use aya_obj::programs::XdpAttachType;

use crate::maps::{Maps, MapsError};
use crate::pin_dir::{PinDir, PinDirError};

/// datapath.o, built from bpf/datapath.c by build.rs.
static DATAPATH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath.o"));

pub(crate) const FROM_ENDPOINT: &str = "fv_from_endpoint";
pub(crate) const FROM_UPLINK: &str = "fv_from_uplink";
pub(crate) const XDP_FROM_UPLINK: &str = "fv_xdp_from_uplink";
const PROGRAM_NAMES: [&str; 3] = [FROM_ENDPOINT, FROM_UPLINK, XDP_FROM_UPLINK];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    PinDir(#[from] PinDirError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(
        "the kernel refused datapath.o's maps; are we root (CAP_BPF, CAP_NET_ADMIN) and does the kernel have BTF (CONFIG_DEBUG_INFO_BTF)?"
    )]
    Object(#[source] aya::EbpfError),
    #[error("datapath.o has no program {0}: the build is broken, rebuild ferrovirt-ebpf")]
    MissingProgram(&'static str),
    #[error("the kernel refused the program {name} (the verifier log is in the cause)")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot pin the program {name}; is the pin directory on bpffs and writable?")]
    Pin {
        name: &'static str,
        #[source]
        source: PinError,
    },
    #[error(
        "cannot open the pinned program {name}; destroy the pin directory if a datapath of another version left it"
    )]
    OpenPinned {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
}

/// The datapath's programs, opened from their pins.
pub(crate) struct Programs {
    pub from_endpoint: SchedClassifier,
    pub from_uplink: SchedClassifier,
    pub xdp_from_uplink: Xdp,
}

/// Opens the maps and programs pinned under `pin_dir`, loading and pinning them first if
/// no earlier process did. Serialised by the pin directory's lock, so two processes starting
/// at once load the object once.
/// A pin directory this call created is removed again when the load fails (the kernel
/// refused a program after the maps were pinned), so a failed attempt leaves nothing.
pub(crate) fn open_or_load(pin_dir: &PinDir) -> Result<(Maps, Programs), LoadError> {
    let fresh = !pin_dir.root().exists();
    pin_dir.create()?;
    let lock = pin_dir.lock()?;
    if !programs_pinned(pin_dir)
        && let Err(error) = load_and_pin(pin_dir)
    {
        if fresh {
            drop(lock);
            if let Err(remove) = pin_dir.remove_all() {
                tracing::warn!(%remove, "cannot remove the pin directory of a failed load");
            }
        }
        return Err(error);
    }
    let maps = Maps::open_pinned(pin_dir.root())?;
    let programs = open_pinned_programs(pin_dir)?;
    Ok((maps, programs))
}

fn programs_pinned(pin_dir: &PinDir) -> bool {
    PROGRAM_NAMES
        .iter()
        .all(|name| pin_dir.program(name).exists())
}

/// Loads datapath.o: its maps are created and pinned by name in the pin directory (or the
/// pinned ones reused), its programs verified and pinned under `progs/`.
fn load_and_pin(pin_dir: &PinDir) -> Result<(), LoadError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir.root())
        .load(DATAPATH_OBJECT)
        .map_err(LoadError::Object)?;
    for name in PROGRAM_NAMES {
        let program = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?;
        let program_error = |source| LoadError::Program { name, source };
        match program {
            aya::programs::Program::SchedClassifier(p) => p.load().map_err(program_error)?,
            aya::programs::Program::Xdp(p) => p.load().map_err(program_error)?,
            _ => return Err(LoadError::MissingProgram(name)),
        }
        let path = pin_dir.program(name);
        // A process that died between pinning two programs left the first one behind.
        PinDir::unpin(&path)?;
        program
            .pin(&path)
            .map_err(|source| LoadError::Pin { name, source })?;
    }
    tracing::info!(pin_dir = %pin_dir.root().display(), "loaded and pinned the eBPF datapath");
    Ok(())
}

fn open_pinned_programs(pin_dir: &PinDir) -> Result<Programs, LoadError> {
    let open_error = |name| move |source| LoadError::OpenPinned { name, source };
    Ok(Programs {
        from_endpoint: SchedClassifier::from_pin(pin_dir.program(FROM_ENDPOINT))
            .map_err(open_error(FROM_ENDPOINT))?,
        from_uplink: SchedClassifier::from_pin(pin_dir.program(FROM_UPLINK))
            .map_err(open_error(FROM_UPLINK))?,
        xdp_from_uplink: Xdp::from_pin(pin_dir.program(XDP_FROM_UPLINK), XdpAttachType::Interface)
            .map_err(open_error(XDP_FROM_UPLINK))?,
    })
}
