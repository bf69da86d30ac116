//! One workload run against a connected device: a closed loop keeping `qd` requests in flight
//! for a fixed time, as fio's `rw=randread/randwrite/read/write` with `iodepth=qd` and
//! `direct=1` would from inside a guest.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use vhost_blk_bench::blk::{BlkDevice, Op, S_OK};

use crate::backend::{Running, Sample};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random, block-size aligned offsets over the whole disk.
    Random,
    /// Consecutive blocks from offset 0, wrapping at the end of the disk.
    Sequential,
}

/// A workload: what, how large, how many in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Read or write.
    pub op: Op,
    /// Random or sequential.
    pub pattern: Pattern,
    /// Bytes per request.
    pub bs: u32,
    /// Requests in flight.
    pub qd: usize,
}

impl Workload {
    /// Parses `randread-4k-qd1`, `seqwrite-1m-qd8`, ...
    pub fn parse(s: &str) -> Option<Workload> {
        let mut p = s.split('-');
        let (kind, size, qd) = (p.next()?, p.next()?, p.next()?);
        if p.next().is_some() {
            return None;
        }
        let (pattern, op) = match kind {
            "randread" => (Pattern::Random, Op::Read),
            "randwrite" => (Pattern::Random, Op::Write),
            "seqread" => (Pattern::Sequential, Op::Read),
            "seqwrite" => (Pattern::Sequential, Op::Write),
            _ => return None,
        };
        let (num, mult) = if let Some(k) = size.strip_suffix('k') {
            (k, 1024)
        } else {
            (size.strip_suffix('m')?, 1 << 20)
        };
        let bs = num.parse::<u32>().ok()?.checked_mul(mult)?;
        let qd = qd.strip_prefix("qd")?.parse::<usize>().ok()?;
        (bs > 0 && bs % 4096 == 0 && qd > 0).then_some(Workload {
            op,
            pattern,
            bs,
            qd,
        })
    }

    /// The name [`Workload::parse`] reads.
    pub fn name(&self) -> String {
        let kind = match (self.pattern, self.op) {
            (Pattern::Random, Op::Write) => "randwrite",
            (Pattern::Random, _) => "randread",
            (Pattern::Sequential, Op::Write) => "seqwrite",
            (Pattern::Sequential, _) => "seqread",
        };
        format!("{kind}-{}-qd{}", size_name(self.bs, false), self.qd)
    }

    /// Row title.
    pub fn title(&self) -> String {
        let what = match (self.pattern, self.op) {
            (Pattern::Random, Op::Write) => "random write",
            (Pattern::Random, _) => "random read",
            (Pattern::Sequential, Op::Write) => "sequential write",
            (Pattern::Sequential, _) => "sequential read",
        };
        format!(
            "{} {what}, QD{} ({})",
            size_name(self.bs, true),
            self.qd,
            if self.throughput() { "MB/s" } else { "IOPS" }
        )
    }

    /// Whether the row reports MB/s (sequential) rather than IOPS (random).
    pub fn throughput(&self) -> bool {
        self.pattern == Pattern::Sequential
    }
}

fn size_name(bs: u32, long: bool) -> String {
    let (n, k, m) = if bs % (1 << 20) == 0 {
        (bs >> 20, "m", "MiB")
    } else {
        (bs >> 10, "k", "KiB")
    };
    if long {
        format!("{n} {m}")
    } else {
        format!("{n}{k}")
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Requests completed inside the measured window.
    pub ios: u64,
    /// Length of the window, seconds.
    pub secs: f64,
    /// Latency of each request submitted and completed inside the window, ns.
    pub lat_ns: Vec<u64>,
    /// Kicks sent in the window.
    pub kicks: u64,
    /// Times the driver slept on the call eventfd and was woken in the window.
    pub wakeups: u64,
    /// CPU counters at the window's start and end.
    pub cpu: (Sample, Sample),
}

impl RunResult {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.secs
    }
}

/// xorshift64*: the same offsets for every back end given the same seed.
pub struct Rng(u64);

impl Rng {
    /// A generator; `seed` 0 is replaced.
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs `w` on `dev` for `warmup` (unmeasured) then `duration`; drains before returning.
pub fn run(
    dev: &mut BlkDevice,
    backend: &mut Running,
    w: &Workload,
    capacity: u64,
    warmup: Duration,
    duration: Duration,
    seed: u64,
) -> Result<RunResult> {
    let blocks = capacity / u64::from(w.bs);
    if blocks == 0 {
        bail!("disk smaller than one {}-byte block", w.bs);
    }
    let mut rng = Rng::new(seed);
    let mut seq = 0u64;
    let mut free: Vec<usize> = (0..w.qd).rev().collect();
    let mut started = vec![Instant::now(); w.qd];
    let mut r = RunResult::default();
    let t0 = Instant::now();
    let (w_start, w_end) = (t0 + warmup, t0 + warmup + duration);
    let mut window: Option<Instant> = None;
    let mut last_progress = Instant::now();

    loop {
        let now = Instant::now();
        if window.is_none() && now >= w_start {
            window = Some(now);
            r.cpu.0 = backend.sample();
        }
        if now >= w_end {
            r.cpu.1 = backend.sample();
            r.secs = (now - window.unwrap_or(now)).as_secs_f64();
            break;
        }
        // Refill.
        let mut n = 0;
        while let Some(slot) = free.pop() {
            let block = match w.pattern {
                Pattern::Random => rng.next_u64() % blocks,
                Pattern::Sequential => {
                    let b = seq;
                    seq = (seq + 1) % blocks;
                    b
                }
            };
            let sector = block * u64::from(w.bs) / 512;
            dev.submit(slot, w.op, sector, w.bs)?;
            started[slot] = Instant::now();
            n += 1;
        }
        if n > 0 {
            let k = dev.kick()?;
            if window.is_some() {
                r.kicks += u64::from(k);
            }
        }
        // Reap what is there; sleep on the call eventfd when nothing is.
        let mut got = 0;
        let mut seen = Instant::now();
        loop {
            match dev.complete()? {
                Some(c) => {
                    if c.status != S_OK {
                        bail!("{}: request failed with status {}", w.name(), c.status);
                    }
                    if let Some(ws) = window {
                        if seen < w_end {
                            r.ios += 1;
                            if started[c.slot] >= ws {
                                r.lat_ns.push((seen - started[c.slot]).as_nanos() as u64);
                            }
                        }
                    }
                    free.push(c.slot);
                    got += 1;
                }
                None if got > 0 => break,
                None => {
                    if dev.wait(Duration::from_millis(100))? {
                        if window.is_some() {
                            r.wakeups += 1;
                        }
                    } else {
                        backend.check_alive()?;
                        if last_progress.elapsed() > Duration::from_secs(10) {
                            bail!("{}: no completion for 10 s", w.name());
                        }
                    }
                    seen = Instant::now();
                }
            }
        }
        last_progress = seen;
    }
    drain(dev, backend)?;
    Ok(r)
}

/// Waits until no request is in flight.
pub fn drain(dev: &mut BlkDevice, backend: &mut Running) -> Result<()> {
    let start = Instant::now();
    while dev.in_flight() > 0 {
        match dev.complete()? {
            Some(c) if c.status != S_OK => bail!("request failed with status {}", c.status),
            Some(_) => {}
            None => {
                if !dev.wait(Duration::from_millis(100))? {
                    backend.check_alive()?;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    return Err(anyhow!(
                        "{} requests still in flight after 10 s",
                        dev.in_flight()
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        for n in [
            "randread-4k-qd1",
            "randwrite-4k-qd32",
            "seqread-1m-qd8",
            "seqwrite-64k-qd2",
        ] {
            assert_eq!(Workload::parse(n).map(|w| w.name()).as_deref(), Some(n));
        }
        for bad in [
            "randread-4k",
            "read-4k-qd1",
            "randread-1k-qd1",
            "randread-4k-qd0",
            "x",
        ] {
            assert!(Workload::parse(bad).is_none(), "{bad}");
        }
        let w = Workload::parse("seqwrite-1m-qd8").expect("parse");
        assert_eq!(w.title(), "1 MiB sequential write, QD8 (MB/s)");
    }
}
