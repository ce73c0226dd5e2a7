//! [`Datapath`]: the handle a CNI call or the node agent uses to configure the switch.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use crate::attach::{self, AttachError, attach_tc_program, attach_xdp_program, ifindex_of};
use crate::forwarding::{self, EndpointConfig, ForwardingError, NetworkConfig, NetworkId};
use crate::loader::{self, FROM_ENDPOINT, FROM_UPLINK, LoadError, Programs};
use crate::maps::{Counters, Maps, MapsError};
use crate::peer;
use crate::pin_dir::{Hook, PinDir, PinDirError, PinDirLock};
use crate::policy::{self, PolicyError, PolicyId, PolicyRule};
use crate::testrun::{self, Program, TestRunError, TestRunInput, TestRunOutput};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ferrovirt";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Where maps, programs and links are pinned; a directory on bpffs.
    pub pin_dir: PathBuf,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
        }
    }
}

/// How frames from an uplink enter the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkMode {
    /// TC ingress only.
    Tc,
    /// XDP (native, else generic) for known unicast, TC ingress for the rest.
    Xdp,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    PinDir(#[from] PinDirError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Forwarding(#[from] ForwardingError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    TestRun(#[from] TestRunError),
    #[error("interface index {0} has no counters; attach it as an endpoint or uplink first")]
    NoCounters(u32),
}

/// The maps and programs, behind one mutex so a process changes them one call at a time.
struct State {
    maps: Maps,
    programs: Programs,
}

/// The eBPF switch on this node, shared through its pin directory by every process that
/// opens it.
pub struct Datapath {
    pin_dir: PinDir,
    state: Mutex<State>,
}

impl Datapath {
    /// Opens the pinned maps/programs under pin_dir, or loads datapath.o and pins them.
    pub fn open_or_load(config: &DatapathConfig) -> Result<Self, DatapathError> {
        let pin_dir = PinDir::new(&config.pin_dir);
        let (maps, programs) = loader::open_or_load(&pin_dir)?;
        Ok(Datapath {
            pin_dir,
            state: Mutex::new(State { maps, programs }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock left at worst a half-applied change, which every
        // call here re-applies from scratch; the maps themselves are in the kernel.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state, with the pin directory locked against other processes' changes.
    fn change(&self) -> Result<(MutexGuard<'_, State>, PinDirLock), DatapathError> {
        let state = self.state();
        let lock = self.pin_dir.lock()?;
        Ok((state, lock))
    }

    /// Creates the network or changes its VLAN (idempotent upsert).
    pub fn add_network(&self, id: NetworkId, config: &NetworkConfig) -> Result<(), DatapathError> {
        let (mut state, _lock) = self.change()?;
        forwarding::add_network(&mut state.maps, id, config)?;
        Ok(())
    }

    /// Creates the network without a VLAN unless it exists, whose settings are kept (for a
    /// CNI plugin's first attachment to a network nobody set up); whether it was created.
    pub fn ensure_network(&self, id: NetworkId) -> Result<bool, DatapathError> {
        let (mut state, _lock) = self.change()?;
        Ok(forwarding::ensure_network(&mut state.maps, id)?)
    }

    /// Removes the network; an error while endpoints are still on it. Detaches its uplink
    /// if no other network uses that.
    pub fn remove_network(&self, id: NetworkId) -> Result<(), DatapathError> {
        let (mut state, _lock) = self.change()?;
        if let Some(uplink) = forwarding::remove_network(&mut state.maps, id)? {
            self.detach_uplink_programs(uplink)?;
        }
        Ok(())
    }

    /// Makes `ifname` the uplink of `network` and attaches the uplink programs to it.
    pub fn attach_uplink(
        &self,
        ifname: &str,
        network: NetworkId,
        mode: UplinkMode,
    ) -> Result<(), DatapathError> {
        let ifindex = ifindex_of(ifname)?;
        let (mut state, _lock) = self.change()?;
        if let Some(previous) = forwarding::configure_uplink(&mut state.maps, ifindex, network)? {
            self.detach_uplink_programs(previous)?;
        }
        let programs = &mut state.programs;
        attach_tc_program(
            &mut programs.from_uplink,
            &self.pin_dir,
            Hook::UplinkTc,
            ifindex,
            ifname,
        )?;
        match mode {
            UplinkMode::Xdp => attach_xdp_program(
                &mut programs.xdp_from_uplink,
                &self.pin_dir,
                ifindex,
                ifname,
            )?,
            UplinkMode::Tc => {
                attach::detach_program(&self.pin_dir, Hook::UplinkXdp, ifindex, None)?
            }
        }
        Ok(())
    }

    /// Takes `ifname` away as `network`'s uplink; its programs are detached once no network
    /// uses it.
    pub fn detach_uplink(&self, ifname: &str, network: NetworkId) -> Result<(), DatapathError> {
        let (mut state, _lock) = self.change()?;
        for ifindex in self.ifindexes_of(Hook::UplinkTc, ifname)? {
            if forwarding::remove_uplink(&mut state.maps, ifindex, network)? {
                self.detach_uplink_programs(ifindex)?;
            }
        }
        Ok(())
    }

    /// Fills the maps for the endpoint on `ifname` and attaches fv_from_endpoint to its TC
    /// ingress through a TCX link, replacing a filter [`Datapath::attach_endpoint_filter`]
    /// put there. Idempotent; with another config it moves the endpoint.
    pub fn attach_endpoint(
        &self,
        ifname: &str,
        config: &EndpointConfig,
    ) -> Result<(), DatapathError> {
        let (ifindex, mut state, _lock) = self.configured_endpoint(ifname, config)?;
        self.link_endpoint(&mut state, ifindex, ifname)
    }

    /// Like [`Datapath::attach_endpoint`], but the program becomes a cls_bpf filter on the
    /// TAP's clsact ingress, which costs no RCU grace period to attach (a TCX link costs two,
    /// ~10 ms on a small VM). For a caller that must be quick, like a CNI ADD; a long-lived
    /// one then makes it a TCX link with [`Datapath::link_endpoint_filter`], which saves the
    /// qdisc hop on every packet.
    pub fn attach_endpoint_filter(
        &self,
        ifname: &str,
        config: &EndpointConfig,
    ) -> Result<(), DatapathError> {
        let (ifindex, mut state, _lock) = self.configured_endpoint(ifname, config)?;
        if self
            .pin_dir
            .link_by_ifindex(Hook::Endpoint, ifindex)?
            .is_some()
        {
            // A TCX link is there already: it would run first, the filter never.
            return self.link_endpoint(&mut state, ifindex, ifname);
        }
        attach::attach_endpoint_filter(
            &mut state.programs.from_endpoint,
            &self.pin_dir,
            ifindex,
            ifname,
        )?;
        Ok(())
    }

    /// Fills the maps for the endpoint on `ifname`; returns its ifindex and the locks the
    /// caller attaches under.
    fn configured_endpoint(
        &self,
        ifname: &str,
        config: &EndpointConfig,
    ) -> Result<(u32, MutexGuard<'_, State>, PinDirLock), DatapathError> {
        let ifindex = ifindex_of(ifname)?;
        let peer = peer::peer_in_other_netns(ifname);
        let (mut state, lock) = self.change()?;
        forwarding::configure_endpoint(&mut state.maps, ifindex, config, peer)?;
        Ok((ifindex, state, lock))
    }

    /// Swaps the cls_bpf filter of the endpoint on `ifname` for a TCX link, leaving its maps
    /// as they are: the link is attached first (TCX runs before clsact, so it decides from
    /// then on), then the filter goes. True when there was a filter to swap.
    pub fn link_endpoint_filter(&self, ifname: &str) -> Result<bool, DatapathError> {
        let ifindex = ifindex_of(ifname)?;
        let (mut state, _lock) = self.change()?;
        if self
            .pin_dir
            .link_by_ifindex(Hook::EndpointFilter, ifindex)?
            .is_none()
        {
            return Ok(false);
        }
        self.link_endpoint(&mut state, ifindex, ifname)?;
        Ok(true)
    }

    /// Attaches (or swaps) the endpoint's TCX link, then removes any filter of it.
    fn link_endpoint(
        &self,
        state: &mut State,
        ifindex: u32,
        ifname: &str,
    ) -> Result<(), DatapathError> {
        attach_tc_program(
            &mut state.programs.from_endpoint,
            &self.pin_dir,
            Hook::Endpoint,
            ifindex,
            ifname,
        )?;
        attach::detach_endpoint_filter(&self.pin_dir, ifindex)?;
        Ok(())
    }

    /// Detaches the endpoint's program (link or filter) and removes its map entries.
    /// Idempotent, and fine when the interface is gone (the pins remember its ifindex).
    pub fn detach_endpoint(&self, ifname: &str) -> Result<(), DatapathError> {
        let (mut state, _lock) = self.change()?;
        let mut ifindexes = self.ifindexes_of(Hook::Endpoint, ifname)?;
        for ifindex in self.ifindexes_of(Hook::EndpointFilter, ifname)? {
            if !ifindexes.contains(&ifindex) {
                ifindexes.push(ifindex);
            }
        }
        for ifindex in ifindexes {
            self.detach_endpoint_programs(ifindex)?;
            forwarding::remove_endpoint(&mut state.maps, ifindex)?;
        }
        Ok(())
    }

    fn detach_endpoint_programs(&self, ifindex: u32) -> Result<(), DatapathError> {
        // Without TCX (Linux < 6.6) attach_tc_program made an unpinned filter: by name, when
        // the endpoint has no recorded filter of ours (detach_endpoint_filter removes that).
        let recorded = self
            .pin_dir
            .link_by_ifindex(Hook::EndpointFilter, ifindex)?
            .is_some();
        let ifname = ifname_of(ifindex).filter(|_| !recorded);
        let netlink_name = ifname.as_deref().map(|name| (name, FROM_ENDPOINT));
        attach::detach_program(&self.pin_dir, Hook::Endpoint, ifindex, netlink_name)?;
        attach::detach_endpoint_filter(&self.pin_dir, ifindex)?;
        Ok(())
    }

    /// The ifindex `ifname` has now and the ones links pinned under that name were
    /// attached to (different if the interface was re-created).
    fn ifindexes_of(&self, hook: Hook, ifname: &str) -> Result<Vec<u32>, DatapathError> {
        let mut ifindexes: Vec<u32> = ifindex_of(ifname).ok().into_iter().collect();
        for pin in self.pin_dir.links(hook)? {
            if pin.ifname == ifname && !ifindexes.contains(&pin.ifindex) {
                ifindexes.push(pin.ifindex);
            }
        }
        Ok(ifindexes)
    }

    fn detach_uplink_programs(&self, ifindex: u32) -> Result<(), DatapathError> {
        let ifname = ifname_of(ifindex);
        let netlink_name = ifname.as_deref().map(|name| (name, FROM_UPLINK));
        attach::detach_program(&self.pin_dir, Hook::UplinkTc, ifindex, netlink_name)?;
        attach::detach_program(&self.pin_dir, Hook::UplinkXdp, ifindex, None)?;
        Ok(())
    }

    /// Replaces policy `id` with `rules` (an empty list denies everything).
    pub fn set_policy(&self, id: PolicyId, rules: &[PolicyRule]) -> Result<(), DatapathError> {
        let entries = policy::compile_policy(id, rules)?;
        let (mut state, _lock) = self.change()?;
        policy::write_policy(&mut state.maps, id, &entries)?;
        Ok(())
    }

    /// Removes policy `id`; endpoints still using it deny everything.
    pub fn remove_policy(&self, id: PolicyId) -> Result<(), DatapathError> {
        self.set_policy(id, &[])
    }

    /// The counters of an endpoint or uplink, summed over CPUs.
    pub fn counters(&self, ifname: &str) -> Result<Counters, DatapathError> {
        self.counters_by_ifindex(ifindex_of(ifname)?)
    }

    pub fn counters_by_ifindex(&self, ifindex: u32) -> Result<Counters, DatapathError> {
        let state = self.state();
        let counters = state.maps.summed_counters(ifindex)?;
        counters.ok_or(DatapathError::NoCounters(ifindex))
    }

    /// Fills the maps for an endpoint on `ifindex` without attaching anything (for
    /// BPF_PROG_TEST_RUN with made-up ifindexes).
    pub fn configure_endpoint_maps(
        &self,
        ifindex: u32,
        config: &EndpointConfig,
    ) -> Result<(), DatapathError> {
        let (mut state, _lock) = self.change()?;
        forwarding::configure_endpoint(&mut state.maps, ifindex, config, false)?;
        Ok(())
    }

    /// Makes `ifindex` the uplink of `network` in the maps without attaching anything.
    pub fn configure_uplink_maps(
        &self,
        ifindex: u32,
        network: NetworkId,
    ) -> Result<(), DatapathError> {
        let (mut state, _lock) = self.change()?;
        forwarding::configure_uplink(&mut state.maps, ifindex, network)?;
        Ok(())
    }

    /// Detaches everything we attached and removes every pin under pin_dir. For tests and
    /// uninstall; other processes' handles keep working on the unpinned objects until
    /// they close them.
    pub fn destroy(self) -> Result<(), DatapathError> {
        {
            let (state, _lock) = self.change()?;
            let (endpoints, uplinks) = forwarding::attached_ifindexes(&state.maps)?;
            for ifindex in endpoints {
                self.detach_endpoint_programs(ifindex)?;
            }
            for ifindex in uplinks {
                self.detach_uplink_programs(ifindex)?;
            }
        }
        self.pin_dir.remove_all()?;
        Ok(())
    }

    /// Runs `program` once (or `input.repeat` times) on a frame with BPF_PROG_TEST_RUN.
    pub fn test_run(
        &self,
        program: Program,
        input: &TestRunInput<'_>,
    ) -> Result<TestRunOutput, DatapathError> {
        let state = self.state();
        Ok(testrun::run_program(&state.programs, program, input)?)
    }
}

/// The name of `ifindex` in this network namespace, if it exists.
fn ifname_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes (NUL included) into `buf`,
    // which is that long, and returns NULL or `buf`.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datapath_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Datapath>();
    }
}
