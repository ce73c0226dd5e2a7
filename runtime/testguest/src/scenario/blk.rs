//! `blk`, `blk-discard`, `blk-ro`, `blk-mq`: drive the first virtio-blk device (1af4:1042)
//! with the polling driver in `virtio::blk`, writing and verifying a deterministic pattern.
//!
//! Parameters (command line, decimal): `blk_seed` (1), `blk_sectors` (2048), `blk_req`
//! sectors per request (8), `blk_depth` requests in flight per queue (16), `blk_mode`
//! `rw`|`write`|`verify` (rw), `blk_discard_zeroes` 1|0 (1: discarded sectors must read as
//! zeroes). Sector `s` (512 bytes) holds the little-endian 64-bit words
//! `pattern_word(seed, s, 0..64)`; README.md gives the formula for host-side checks.

use super::{ScenarioError, check_failed, param};
use crate::console::Ascii;
use crate::dma::Scratch;
use crate::pci::{self, MmioAllocator};
use crate::say;
use crate::start_info::{self, StartInfo};
use crate::tsc::{self, Deadline};
use crate::virtio::blk::{
    BlkDevice, DATA_PER_QUEUE, F_DISCARD, F_FLUSH, F_MQ, F_RO, F_WRITE_ZEROES, ID_BYTES, MAX_SLOTS,
    Request, SECTOR_SIZE, Status,
};
use crate::virtio::{VIRTIO_ID_BLOCK, VIRTIO_PCI_VENDOR, modern_pci_device_id};

/// No completion for this long fails the scenario.
const IDLE_TIMEOUT_US: u64 = 5_000_000;
const WORDS_PER_SECTOR: usize = SECTOR_SIZE / 8;
/// Seed for the write `blk-ro` attempts, so it differs from whatever the image holds.
const RO_PROBE_SEED: u64 = 0x5eed_0f4e_ad0a_1f00;

/// The 64-bit word `word` (0..64) of sector `sector` for `seed`: a murmur3 finaliser of
/// `seed * K1 ^ sector * K2 ^ word`, stored little-endian.
pub fn pattern_word(seed: u64, sector: u64, word: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ sector.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ word;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    ReadWrite,
    Write,
    Verify,
}

struct Params {
    seed: u64,
    sectors: u64,
    req: u64,
    depth: usize,
    mode: Mode,
    discard_zeroes: bool,
}

impl Params {
    fn parse(info: &StartInfo) -> Result<Self, ScenarioError> {
        let c = info.cmdline();
        let mode = match start_info::cmdline_param(c, "blk_mode") {
            None | Some(b"rw") => Mode::ReadWrite,
            Some(b"write") => Mode::Write,
            Some(b"verify") => Mode::Verify,
            Some(other) => {
                return Err(check_failed!(
                    "blk_mode={} is not rw, write or verify",
                    Ascii(other)
                ));
            }
        };
        let p = Self {
            seed: param(c, "blk_seed", 1)?,
            sectors: param(c, "blk_sectors", 2048)?,
            req: param(c, "blk_req", 8)?,
            depth: param(c, "blk_depth", 16)? as usize,
            mode,
            discard_zeroes: param(c, "blk_discard_zeroes", 1)? != 0,
        };
        if p.req == 0 || p.depth == 0 || p.depth > MAX_SLOTS || p.sectors == 0 {
            return Err(check_failed!(
                "need blk_sectors >= 1, blk_req >= 1 and 1 <= blk_depth <= {MAX_SLOTS}"
            ));
        }
        let bytes = (p.depth as u64).saturating_mul(p.req.saturating_mul(SECTOR_SIZE as u64));
        if bytes > DATA_PER_QUEUE as u64 {
            return Err(check_failed!(
                "blk_depth * blk_req * 512 = {bytes} exceeds the {DATA_PER_QUEUE}-byte buffer per queue"
            ));
        }
        Ok(p)
    }
}

/// What a range of sectors must read back as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Pattern,
    Zero,
    Anything,
}

/// Sectors `[start, end)` read back as `expect` (outside every range: the pattern).
#[derive(Clone, Copy)]
struct Special {
    start: u64,
    end: u64,
    expect: Expect,
    /// Why, for a mismatch report.
    why: &'static str,
}

fn expected(specials: &[Special], sector: u64) -> (Expect, &'static str) {
    specials
        .iter()
        .find(|s| (s.start..s.end).contains(&sector))
        .map_or((Expect::Pattern, "pattern"), |s| (s.expect, s.why))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Read,
}

/// One queue's share of a transfer.
struct Lane {
    queue: usize,
    start: u64,
    end: u64,
    next: u64,
    free: u64,
    wrote: u64,
    read: u64,
    verified: u64,
    zeroes: u64,
}

impl Lane {
    fn new(queue: usize, start: u64, end: u64) -> Self {
        Self {
            queue,
            start,
            end,
            next: start,
            free: 0,
            wrote: 0,
            read: 0,
            verified: 0,
            zeroes: 0,
        }
    }
}

/// Writes or reads (and verifies) every lane's range, keeping up to `depth` requests of
/// `req` sectors in flight per queue. A lane refills when half its slots are free (or
/// none are in flight) and notifies once per refill; lanes take turns, so queues run
/// concurrently.
fn transfer(
    dev: &mut BlkDevice,
    lanes: &mut [Lane],
    op: Op,
    p: &Params,
    specials: &[Special],
) -> Result<(), ScenarioError> {
    let all_slots = if p.depth >= 64 {
        u64::MAX
    } else {
        (1u64 << p.depth) - 1
    };
    for lane in lanes.iter_mut() {
        lane.next = lane.start;
        lane.free = all_slots;
    }
    let slot_bytes = p.req as usize * SECTOR_SIZE;
    let refill_at = (p.depth / 2).max(1) as u32;
    let mut idle = Deadline::after_us(IDLE_TIMEOUT_US);
    loop {
        let mut busy = None;
        for lane in lanes.iter_mut() {
            let q = dev
                .queue(lane.queue)
                .ok_or_else(|| check_failed!("queue {} is not set up", lane.queue))?;
            if lane.next < lane.end && (lane.free.count_ones() >= refill_at || q.outstanding() == 0)
            {
                while lane.next < lane.end && lane.free != 0 && q.can_submit() {
                    let slot = lane.free.trailing_zeros();
                    let count = p.req.min(lane.end - lane.next);
                    let offset = slot as usize * slot_bytes;
                    let len = count as usize * SECTOR_SIZE;
                    let sector = lane.next;
                    let request = match op {
                        Op::Write => {
                            fill(q.data(), offset, p.seed, sector, count);
                            Request::Write {
                                sector,
                                offset,
                                len,
                            }
                        }
                        Op::Read => Request::Read {
                            sector,
                            offset,
                            len,
                        },
                    };
                    q.submit(request, slot)?;
                    lane.free &= !(1 << slot);
                    lane.next += count;
                }
                q.kick();
            }
            while let Some(c) = q.poll()? {
                idle = Deadline::after_us(IDLE_TIMEOUT_US);
                let (Request::Read {
                    sector,
                    offset,
                    len,
                }
                | Request::Write {
                    sector,
                    offset,
                    len,
                }) = c.request
                else {
                    return Err(check_failed!(
                        "queue {}: unexpected {} completion",
                        lane.queue,
                        c.request.name()
                    ));
                };
                let count = (len / SECTOR_SIZE) as u64;
                if c.status != Status::Ok {
                    return Err(check_failed!(
                        "queue {}: {} of sectors {}..{} failed with status {}",
                        lane.queue,
                        c.request.name(),
                        sector,
                        sector + count,
                        c.status
                    ));
                }
                match op {
                    Op::Write => lane.wrote += count,
                    Op::Read => {
                        let (ok, zero) = verify(q.data(), offset, p.seed, sector, count, specials)?;
                        lane.read += count;
                        lane.verified += ok;
                        lane.zeroes += zero;
                    }
                }
                lane.free |= 1 << c.tag;
            }
            if lane.next < lane.end || q.outstanding() > 0 {
                busy = busy.or(Some((lane.queue, q.outstanding())));
            }
        }
        let Some((queue, outstanding)) = busy else {
            return Ok(());
        };
        if idle.passed() {
            return Err(check_failed!(
                "queue {queue}: {outstanding} request(s) outstanding and no completion for {} ms; is the backend serving the queue?",
                IDLE_TIMEOUT_US / 1000
            ));
        }
        core::hint::spin_loop();
    }
}

/// Fills `count` sectors at `data + offset` with the pattern from `sector` on.
fn fill(data: *mut u8, offset: usize, seed: u64, sector: u64, count: u64) {
    for s in 0..count {
        for w in 0..WORDS_PER_SECTOR {
            let at = offset + s as usize * SECTOR_SIZE + w * 8;
            // SAFETY: `submit` checks requests lie inside the data area and this slot's
            // request is not yet submitted, so the device does not read it concurrently;
            // `at` is 8-byte aligned (the area is page-aligned, offsets are sector multiples).
            unsafe {
                data.add(at)
                    .cast::<u64>()
                    .write_volatile(pattern_word(seed, sector + s, w as u64).to_le())
            };
        }
    }
}

/// Checks `count` sectors read into `data + offset`; returns (sectors checked against the
/// pattern or zeroes, sectors that were expected zero).
fn verify(
    data: *mut u8,
    offset: usize,
    seed: u64,
    sector: u64,
    count: u64,
    specials: &[Special],
) -> Result<(u64, u64), ScenarioError> {
    let mut checked = 0;
    let mut zeroes = 0;
    for s in 0..count {
        let this = sector + s;
        let (expect, why) = expected(specials, this);
        if expect == Expect::Anything {
            continue;
        }
        for w in 0..WORDS_PER_SECTOR {
            let at = offset + s as usize * SECTOR_SIZE + w * 8;
            // SAFETY: as in `fill`; the device has completed this read (its chain was used).
            let got = u64::from_le(unsafe { data.add(at).cast::<u64>().read_volatile() });
            let want = match expect {
                Expect::Zero => 0,
                _ => pattern_word(seed, this, w as u64),
            };
            if got != want {
                return Err(check_failed!(
                    "sector {this} byte {}: read {got:#018x}, expected {want:#018x} ({why})",
                    w * 8
                ));
            }
        }
        checked += 1;
        if expect == Expect::Zero {
            zeroes += 1;
        }
    }
    Ok((checked, zeroes))
}

/// Finds and opens the first virtio-blk device and prints its description line.
fn open(info: &StartInfo) -> Result<BlkDevice, ScenarioError> {
    let mut scratch = Scratch::claim(info).ok_or_else(|| {
        check_failed!(
            "no RAM above the image for virtio-blk buffers (memory map missing, too small, or a boot module in the way)"
        )
    })?;
    let devices = pci::enumerate_bus0();
    let device_id = modern_pci_device_id(VIRTIO_ID_BLOCK);
    let pci_dev = devices.find(VIRTIO_PCI_VENDOR, device_id).ok_or_else(|| {
        check_failed!(
            "no virtio-blk ({VIRTIO_PCI_VENDOR:04x}:{device_id:04x}) on bus 0; give the VM one (QEMU: -device virtio-blk-pci,disable-legacy=on)"
        )
    })?;
    let mut alloc = MmioAllocator::avoiding(&devices);
    let mut dev = BlkDevice::open(pci_dev, &mut alloc, &mut scratch)?;
    let id = dev.run_one(0, Request::GetId, IDLE_TIMEOUT_US)?;
    let c = dev.config;
    say!(
        "blk device={} blk_size={} seg_max={} max_discard_sectors={} max_write_zeroes_sectors={} queues_used={}",
        dev.device().address,
        c.blk_size,
        c.seg_max,
        c.max_discard_sectors,
        c.max_write_zeroes_sectors,
        dev.queue_count()
    );
    let serial_len = id.id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
    let serial: &[u8] = if id.status == Status::Ok {
        &id.id[..serial_len]
    } else {
        b"-"
    };
    say!(
        "blk capacity={} features={:#x} queues={} ro={} serial={}",
        c.capacity,
        dev.features,
        c.num_queues,
        u8::from(dev.has(F_RO)),
        Ascii(serial)
    );
    Ok(dev)
}

fn check_range(dev: &BlkDevice, sectors: u64) -> Result<(), ScenarioError> {
    if sectors > dev.config.capacity {
        return Err(check_failed!(
            "blk_sectors={sectors} exceeds the device capacity of {} sectors",
            dev.config.capacity
        ));
    }
    Ok(())
}

/// Flushes through queue 0 if the device offers FLUSH; returns whether it did.
fn flush(dev: &mut BlkDevice) -> Result<bool, ScenarioError> {
    if !dev.has(F_FLUSH) {
        return Ok(false);
    }
    let c = dev.run_one(0, Request::Flush, IDLE_TIMEOUT_US)?;
    if c.status != Status::Ok {
        return Err(check_failed!("flush failed with status {}", c.status));
    }
    Ok(true)
}

/// The write / read+verify / flush sequence `blk_mode` asks for, over every lane; prints
/// `<label> stats ...` (notifications sent, phase times).
fn write_read_flush(
    dev: &mut BlkDevice,
    lanes: &mut [Lane],
    p: &Params,
    label: &str,
) -> Result<bool, ScenarioError> {
    let t0 = tsc::now();
    if p.mode != Mode::Verify {
        transfer(dev, lanes, Op::Write, p, &[])?;
    }
    let t1 = tsc::now();
    if p.mode != Mode::Write {
        transfer(dev, lanes, Op::Read, p, &[])?;
    }
    let t2 = tsc::now();
    let flushed = p.mode != Mode::Verify && flush(dev)?;
    let notifies: u64 = lanes
        .iter()
        .filter_map(|l| dev.queue(l.queue).map(|q| q.notifies))
        .sum();
    let us = |ticks: u64| ticks / tsc::ticks_per_us().max(1);
    say!(
        "{label} stats notifies={notifies} write_us={} read_us={}",
        us(t1 - t0),
        us(t2 - t1)
    );
    Ok(flushed)
}

pub fn run(info: &StartInfo) -> Result<(), ScenarioError> {
    let p = Params::parse(info)?;
    let mut dev = open(info)?;
    check_range(&dev, p.sectors)?;
    let mut lanes = [Lane::new(0, 0, p.sectors)];
    let flushed = write_read_flush(&mut dev, &mut lanes, &p, "blk")?;
    let l = &lanes[0];
    say!(
        "blk wrote={} read={} verified={} flushed={}",
        l.wrote,
        l.read,
        l.verified,
        u8::from(flushed)
    );
    dev.reset()?;
    Ok(())
}

pub fn run_mq(info: &StartInfo) -> Result<(), ScenarioError> {
    let p = Params::parse(info)?;
    let mut dev = open(info)?;
    check_range(&dev, p.sectors)?;
    if dev.queue_count() < 2 || p.sectors < 2 {
        return Err(check_failed!(
            "blk-mq needs 2 queues and blk_sectors >= 2; the device has {} (MQ {}; QEMU: num-queues=2)",
            dev.config.num_queues,
            if dev.has(F_MQ) {
                "negotiated"
            } else {
                "not offered"
            }
        ));
    }
    let half = p.sectors / 2;
    let mut lanes = [Lane::new(0, 0, half), Lane::new(1, half, p.sectors)];
    let flushed = write_read_flush(&mut dev, &mut lanes, &p, "blk-mq")?;
    for l in &lanes {
        say!(
            "blk-mq queue={} sectors={}..{} wrote={} read={} verified={}",
            l.queue,
            l.start,
            l.end,
            l.wrote,
            l.read,
            l.verified
        );
    }
    say!("blk-mq flushed={}", u8::from(flushed));
    dev.reset()?;
    Ok(())
}

/// Issues `make(sector, count)` requests covering `[start, end)` in chunks of at most
/// `max` sectors, one at a time on queue 0; each must succeed.
fn ranged(
    dev: &mut BlkDevice,
    start: u64,
    end: u64,
    max: u32,
    make: impl Fn(u64, u32) -> Request,
) -> Result<(), ScenarioError> {
    let mut sector = start;
    while sector < end {
        let count = (end - sector).min(u64::from(max)) as u32;
        let request = make(sector, count);
        let c = dev.run_one(0, request, IDLE_TIMEOUT_US)?;
        if c.status != Status::Ok {
            return Err(check_failed!(
                "{} of sectors {sector}..{} failed with status {}",
                request.name(),
                sector + u64::from(count),
                c.status
            ));
        }
        sector += u64::from(count);
    }
    Ok(())
}

pub fn run_discard(info: &StartInfo) -> Result<(), ScenarioError> {
    let p = Params::parse(info)?;
    let mut dev = open(info)?;
    check_range(&dev, p.sectors)?;
    let c = dev.config;
    let (r, quarter) = (p.sectors, p.sectors / 4);
    if quarter == 0 {
        return Err(check_failed!("blk-discard needs blk_sectors >= 4"));
    }
    if !dev.has(F_DISCARD) && !dev.has(F_WRITE_ZEROES) {
        return Err(check_failed!(
            "the device offers neither DISCARD nor WRITE_ZEROES (QEMU virtio-blk-pci: discard=on, write-zeroes=on, its defaults)"
        ));
    }
    let mut lanes = [Lane::new(0, 0, r)];
    transfer(&mut dev, &mut lanes, Op::Write, &p, &[])?;
    let mut specials = [Special {
        start: 0,
        end: 0,
        expect: Expect::Pattern,
        why: "pattern",
    }; 2];
    if dev.has(F_DISCARD) {
        let (start, end) = (quarter, 2 * quarter);
        let align = u64::from(c.discard_sector_alignment.max(1));
        if !start.is_multiple_of(align) || !end.is_multiple_of(align) {
            return Err(check_failed!(
                "discard range {start}..{end} is not aligned to discard_sector_alignment={align}; make blk_sectors a multiple of {}",
                4 * align
            ));
        }
        if c.max_discard_sectors == 0 || c.max_discard_seg == 0 {
            return Err(check_failed!(
                "device offers DISCARD with max_discard_sectors={} max_discard_seg={}; both must be >= 1",
                c.max_discard_sectors,
                c.max_discard_seg
            ));
        }
        ranged(
            &mut dev,
            start,
            end,
            c.max_discard_sectors,
            |sector, sectors| Request::Discard { sector, sectors },
        )?;
        specials[0] = Special {
            start,
            end,
            expect: if p.discard_zeroes {
                Expect::Zero
            } else {
                Expect::Anything
            },
            why: "zeroes after DISCARD; blk_discard_zeroes=0 accepts any data there",
        };
        say!("blk-discard discard={start}..{end}");
    } else {
        say!("blk-discard discard=not-offered");
    }
    if dev.has(F_WRITE_ZEROES) {
        let (start, end) = (2 * quarter, 3 * quarter);
        if c.max_write_zeroes_sectors == 0 || c.max_write_zeroes_seg == 0 {
            return Err(check_failed!(
                "device offers WRITE_ZEROES with max_write_zeroes_sectors={} max_write_zeroes_seg={}; both must be >= 1",
                c.max_write_zeroes_sectors,
                c.max_write_zeroes_seg
            ));
        }
        ranged(
            &mut dev,
            start,
            end,
            c.max_write_zeroes_sectors,
            |sector, sectors| Request::WriteZeroes {
                sector,
                sectors,
                unmap: false,
            },
        )?;
        specials[1] = Special {
            start,
            end,
            expect: Expect::Zero,
            why: "zeroes after WRITE_ZEROES",
        };
        say!("blk-discard write_zeroes={start}..{end}");
    } else {
        say!("blk-discard write_zeroes=not-offered");
    }
    transfer(&mut dev, &mut lanes, Op::Read, &p, &specials)?;
    let flushed = flush(&mut dev)?;
    let l = &lanes[0];
    say!(
        "blk-discard wrote={} read={} verified={} zeroes={} flushed={}",
        l.wrote,
        l.read,
        l.verified,
        l.zeroes,
        u8::from(flushed)
    );
    dev.reset()?;
    Ok(())
}

pub fn run_ro(info: &StartInfo) -> Result<(), ScenarioError> {
    let p = Params::parse(info)?;
    let mut dev = open(info)?;
    if !dev.has(F_RO) {
        return Err(check_failed!(
            "the device does not offer VIRTIO_BLK_F_RO (QEMU: readonly=on on the drive)"
        ));
    }
    let read0 = |dev: &mut BlkDevice, offset: usize| -> Result<(), ScenarioError> {
        let c = dev.run_one(
            0,
            Request::Read {
                sector: 0,
                offset,
                len: SECTOR_SIZE,
            },
            IDLE_TIMEOUT_US,
        )?;
        if c.status != Status::Ok {
            return Err(check_failed!(
                "read of sector 0 failed with status {}",
                c.status
            ));
        }
        Ok(())
    };
    read0(&mut dev, 0)?;
    let q = dev
        .queue(0)
        .ok_or_else(|| check_failed!("queue 0 is not set up"))?;
    fill(q.data(), SECTOR_SIZE, p.seed ^ RO_PROBE_SEED, 0, 1);
    let c = dev.run_one(
        0,
        Request::Write {
            sector: 0,
            offset: SECTOR_SIZE,
            len: SECTOR_SIZE,
        },
        IDLE_TIMEOUT_US,
    )?;
    say!("blk-ro write status={}", c.status);
    if c.status == Status::Ok {
        return Err(check_failed!(
            "the read-only device completed a write to sector 0 with status OK"
        ));
    }
    read0(&mut dev, 2 * SECTOR_SIZE)?;
    let q = dev
        .queue(0)
        .ok_or_else(|| check_failed!("queue 0 is not set up"))?;
    let data = q.data();
    for i in 0..SECTOR_SIZE {
        // SAFETY: offsets 0..1536 lie in the queue's data area; both reads completed.
        let (before, after) = unsafe {
            (
                data.add(i).read_volatile(),
                data.add(2 * SECTOR_SIZE + i).read_volatile(),
            )
        };
        if before != after {
            return Err(check_failed!(
                "sector 0 byte {i} changed from {before:#04x} to {after:#04x} although the write was refused"
            ));
        }
    }
    say!("blk-ro sector0=unchanged");
    dev.reset()?;
    Ok(())
}
