//! Running a program on a frame with BPF_PROG_TEST_RUN, for unit tests and the benchmark.

use aya::programs::{ProgramError, TestRun, TestRunOptions};

use crate::loader::Programs;

/// The datapath's programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// fv_from_endpoint: TC ingress on a VM's TAP.
    FromEndpoint,
    /// fv_from_uplink: TC ingress on an uplink.
    FromUplink,
    /// fv_xdp_from_uplink: XDP on an uplink.
    XdpFromUplink,
}

/// A frame to run a program on. `ingress_ifindex` is the interface the frame arrives on;
/// TC programs accept any value, XDP needs a real device in the caller's network namespace
/// (1, `lo`, always exists).
#[derive(Debug, Clone, Copy)]
pub struct TestRunInput<'a> {
    pub frame: &'a [u8],
    pub ingress_ifindex: u32,
    /// Runs per call (at least 1); the duration is their average. The kernel runs the
    /// program on the same skb each time, so a program that changes the frame (pops a VLAN
    /// tag) sees its own output from the second run on.
    pub repeat: u32,
}

/// The program's verdict (TC_ACT_* or XDP_*), the frame as it left the program, and the
/// average run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutput {
    pub verdict: u32,
    pub frame: Vec<u8>,
    pub duration_ns: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    #[error(
        "a test frame needs at least an Ethernet header (14 bytes), got {0}; build a whole frame"
    )]
    FrameTooShort(usize),
    #[error(
        "BPF_PROG_TEST_RUN of {program:?} failed; for XDP the ingress ifindex must be a real device in this network namespace"
    )]
    Run {
        program: Program,
        #[source]
        source: ProgramError,
    },
}

const ETH_HLEN: usize = 14;
/// Room for what a program may add to the frame (a VLAN tag).
const OUTPUT_HEADROOM: usize = 256;
/// offsetof(struct __sk_buff, ingress_ifindex) in linux/bpf.h.
const SKB_INGRESS_IFINDEX: usize = 36;
/// sizeof(struct xdp_md) and its fields' offsets in linux/bpf.h.
const XDP_MD_SIZE: usize = 24;
const XDP_MD_DATA_END: usize = 4;
const XDP_MD_INGRESS_IFINDEX: usize = 12;

pub(crate) fn run_program(
    programs: &Programs,
    program: Program,
    input: &TestRunInput<'_>,
) -> Result<TestRunOutput, TestRunError> {
    if input.frame.len() < ETH_HLEN {
        return Err(TestRunError::FrameTooShort(input.frame.len()));
    }
    let ctx = match program {
        Program::FromEndpoint | Program::FromUplink => skb_context(input.ingress_ifindex),
        Program::XdpFromUplink => xdp_context(input.ingress_ifindex, input.frame.len()),
    };
    let mut frame_out = vec![0u8; input.frame.len() + OUTPUT_HEADROOM];
    let options = TestRunOptions {
        data_in: Some(input.frame),
        data_out: Some(&mut frame_out),
        ctx_in: Some(&ctx),
        repeat: input.repeat.max(1),
        ..TestRunOptions::default()
    };
    let result = match program {
        Program::FromEndpoint => programs.from_endpoint.test_run(options),
        Program::FromUplink => programs.from_uplink.test_run(options),
        Program::XdpFromUplink => programs.xdp_from_uplink.test_run(options),
    }
    .map_err(|source| TestRunError::Run { program, source })?;
    frame_out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput {
        verdict: result.return_value,
        frame: frame_out,
        duration_ns: u32::try_from(result.duration.as_nanos()).unwrap_or(u32::MAX),
    })
}

/// The head of a `struct __sk_buff` with only ingress_ifindex set; the kernel zero-fills the
/// rest and refuses non-zero values in most fields (convert___skb_to_skb in
/// net/bpf/test_run.c).
fn skb_context(ingress_ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; SKB_INGRESS_IFINDEX + 4];
    ctx[SKB_INGRESS_IFINDEX..].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

/// A `struct xdp_md`: no metadata, data_end at the frame's end (the kernel checks both),
/// and the ingress device.
fn xdp_context(ingress_ifindex: u32, frame_len: usize) -> Vec<u8> {
    let mut ctx = vec![0u8; XDP_MD_SIZE];
    let data_end = u32::try_from(frame_len).unwrap_or(u32::MAX);
    ctx[XDP_MD_DATA_END..XDP_MD_DATA_END + 4].copy_from_slice(&data_end.to_ne_bytes());
    ctx[XDP_MD_INGRESS_IFINDEX..XDP_MD_INGRESS_IFINDEX + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}
