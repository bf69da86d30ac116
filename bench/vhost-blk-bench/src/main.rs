//! `vhost-blk-bench`: vhost-user-blk back ends compared from the front end's side —
//! `bulkhead-blockd` against `qemu-storage-daemon --export type=vhost-user-blk`, on the same
//! image file, in the same run.
//!
//! Run it through `bench/blk.sh` (builds, makes the image, prints the tables); `--help` lists the
//! options. Results and method notes: `docs/PERFORMANCE.md`, "Issue 5".
//!
//! # What it does
//!
//! This program is the guest's virtio-blk driver and the VMM at once (library
//! [`vhost_blk_bench`]): it creates a memfd as guest memory, connects to the back end's socket
//! with rust-vmm's `vhost::vhost_user::Frontend`, negotiates (features with `VERSION_1`,
//! `EVENT_IDX`, `INDIRECT_DESC`; protocol features `CONFIG` and `MQ`), shares the memfd
//! (`SET_MEM_TABLE`), sets up one split virtqueue of 128 entries in it, and then puts virtio-blk
//! requests (header, data, status; through an indirect table, as Linux does) on the ring.
//!
//! * **Submission**: refill every free slot, publish the available index, kick the kick eventfd
//!   when the device's `avail_event` asks for it (`EVENT_IDX`) — one kick per batch, like Linux's
//!   blk-mq with plugging.
//! * **Completion**: **wait on the call eventfd** (`poll`), the way an interrupt would wake a
//!   guest, after writing `used_event` (interrupt on the next used entry) and checking the used
//!   ring once more; then reap every used entry. No busy polling: on a 2-CPU host a spinning
//!   driver would take a CPU from the back end. Both back ends are driven the same way.
//! * **Workloads**: 4 KiB random reads and writes at QD1 and QD32, 1 MiB sequential reads and
//!   writes at QD1 and QD8 (`--workloads` for others). Random offsets come from a fixed-seed
//!   generator, so both back ends see the same sequence. Each run warms up (`--warmup`, default
//!   1 s) and then measures for `--duration` (default 5 s): requests completed in the window per
//!   second; latency (submission to reaping) of every request submitted and completed inside it.
//! * **Runs**: every run starts a fresh back end (standalone blockd serves one front end and
//!   exits), connects, checks one 4 KiB read against the image file, runs one workload, hangs
//!   up, stops the back end and `fdatasync`s the image (so one run's dirty pages are not written
//!   back during the next). `--runs` (default 3) runs per back end and workload, alternating
//!   which back end goes first; the tables show the median run, and latency percentiles over all
//!   runs' samples pooled.
//! * **Back ends**, both with one queue (`--queues N` for more; the requests in flight are then
//!   spread round robin over them) on the same image file:
//!   `bulkhead-blockd --socket S --file IMG --format raw --num-queues 1 --cache none|writeback
//!   --sandbox on` and `qemu-storage-daemon --blockdev
//!   driver=file,node-name=f,filename=IMG,cache.direct=on|off --export
//!   type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=S,writable=on,num-queues=1`
//!   (QEMU's default `aio=threads`; `--qsd-aio` changes it).
//! * **Page cache**: before the `cache=writeback` runs the image is read once through the page
//!   cache, so reads there measure cache hits for both back ends, not whichever ran first.
//! * **CPU**: the back end's CPU time (utime + stime of all its threads, `/proc/PID/stat`) per
//!   request over the window, and the host's busy time minus the back end's and this driver's
//!   ("other load", in CPUs) so interference from other work on the host shows.
//!
//! Output: markdown tables on stdout, progress on stderr, every run as JSON with `--out`.

mod backend;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use vhost_blk_bench::blk::{BlkDevice, Config, Op};
use vm_memory::Bytes;

use backend::{clk_tck, Cache, Kind, Running, Spec};
use workload::{Rng, RunResult, Workload};

const USAGE: &str = "\
vhost-blk-bench: vhost-user-blk back ends from the front end's side,
bulkhead-blockd vs qemu-storage-daemon on one image

usage: vhost-blk-bench --image FILE [--blockd BIN] [--qsd BIN] [--dir DIR]
                       [--cache LIST] [--duration S] [--warmup S] [--runs N]
                       [--workloads LIST] [--only blockd|qsd] [--blockd-arg ARG]...
                       [--qsd-arg ARG]... [--qsd-aio threads|native|io_uring]
                       [--queues N] [--queue-size N] [--no-event-idx] [--no-indirect]
                       [--seed N]
                       [--out FILE]

  --image FILE     raw image both back ends serve (its contents get overwritten by the
                   write workloads); on a file system with O_DIRECT for --cache none
  --blockd BIN     bulkhead-blockd (default: next to this program)
  --qsd BIN        qemu-storage-daemon (default: from PATH)
  --dir DIR        sockets and back-end logs (default: the image's directory)
  --cache LIST     none (O_DIRECT) and/or writeback, comma-separated (default none)
  --duration S     measured seconds per run (default 5)
  --warmup S       unmeasured seconds before (default 1)
  --runs N         runs per back end and workload, alternating (default 3)
  --workloads LIST comma-separated NAMEs: (rand|seq)(read|write)-<size>(k|m)-qd<N>
                   (default randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd1,
                   randwrite-4k-qd32,seqread-1m-qd1,seqread-1m-qd8,seqwrite-1m-qd1,
                   seqwrite-1m-qd8)
  --only NAME      run only blockd or only qsd
  --blockd-arg ARG / --qsd-arg ARG
                   one more argument for that back end (repeatable)
  --qsd-aio MODE   aio= of qemu-storage-daemon's file node (default: QEMU's, threads)
  --queues N       queues to set up, requests spread over them (default 1)
  --queue-size N   virtqueue size (default 128)
  --no-event-idx   do not negotiate VIRTIO_RING_F_EVENT_IDX
  --no-indirect    direct descriptor chains instead of indirect tables
  --seed N         random-offset seed (default 1)
  --out FILE       write every run as JSON
";

const DEFAULT_WORKLOADS: &str = "randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd1,\
randwrite-4k-qd32,seqread-1m-qd1,seqread-1m-qd8,seqwrite-1m-qd1,seqwrite-1m-qd8";

#[derive(Debug, Clone)]
struct Opts {
    image: PathBuf,
    dir: Option<PathBuf>,
    blockd: Spec,
    qsd: Spec,
    caches: Vec<Cache>,
    duration: Duration,
    warmup: Duration,
    runs: usize,
    workloads: Vec<Workload>,
    only: Option<Kind>,
    queues: u16,
    queue_size: u16,
    event_idx: bool,
    indirect: bool,
    seed: u64,
    out: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Option<Opts>> {
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut o = Opts {
        image: PathBuf::new(),
        dir: None,
        blockd: Spec {
            kind: Kind::Blockd,
            bin: here.join("bulkhead-blockd"),
            extra: Vec::new(),
            aio: None,
        },
        qsd: Spec {
            kind: Kind::Qsd,
            bin: PathBuf::from("qemu-storage-daemon"),
            extra: Vec::new(),
            aio: None,
        },
        caches: vec![Cache::None],
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(1),
        runs: 3,
        workloads: parse_workloads(DEFAULT_WORKLOADS)?,
        only: None,
        queues: 1,
        queue_size: 128,
        event_idx: true,
        indirect: true,
        seed: 1,
        out: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow!("{a} needs a value"))
        };
        let secs = |v: String| -> Result<Duration> {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| anyhow!("{a}: expected seconds, got '{v}'"))
        };
        match a.as_str() {
            "--help" | "-h" => return Ok(None),
            "--image" => o.image = PathBuf::from(val()?),
            "--dir" => o.dir = Some(PathBuf::from(val()?)),
            "--blockd" => o.blockd.bin = PathBuf::from(val()?),
            "--qsd" => o.qsd.bin = PathBuf::from(val()?),
            "--cache" => {
                o.caches = val()?
                    .split(',')
                    .map(|c| Cache::parse(c).ok_or_else(|| anyhow!("--cache: unknown mode '{c}'")))
                    .collect::<Result<_>>()?;
            }
            "--duration" => o.duration = secs(val()?)?,
            "--warmup" => o.warmup = secs(val()?)?,
            "--runs" => {
                o.runs = val()?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| anyhow!("--runs: expected a positive integer"))?;
            }
            "--workloads" => o.workloads = parse_workloads(&val()?)?,
            "--only" => {
                o.only = Some(match val()?.as_str() {
                    "blockd" => Kind::Blockd,
                    "qsd" => Kind::Qsd,
                    v => bail!("--only: blockd or qsd, not '{v}'"),
                });
            }
            "--blockd-arg" => o.blockd.extra.push(val()?),
            "--qsd-arg" => o.qsd.extra.push(val()?),
            "--qsd-aio" => o.qsd.aio = Some(val()?),
            "--queues" => {
                o.queues = val()?
                    .parse()
                    .ok()
                    .filter(|n: &u16| (1..=16).contains(n))
                    .ok_or_else(|| anyhow!("--queues: 1 to 16"))?;
            }
            "--queue-size" => {
                o.queue_size = val()?
                    .parse()
                    .ok()
                    .filter(|n: &u16| n.is_power_of_two() && *n <= 256)
                    .ok_or_else(|| anyhow!("--queue-size: a power of two up to 256"))?;
            }
            "--no-event-idx" => o.event_idx = false,
            "--no-indirect" => o.indirect = false,
            "--seed" => {
                o.seed = val()?
                    .parse()
                    .map_err(|_| anyhow!("--seed: expected an integer"))?
            }
            "--out" => o.out = Some(PathBuf::from(val()?)),
            _ => bail!("unknown option '{a}' (--help lists them)"),
        }
    }
    if o.image.as_os_str().is_empty() {
        bail!("--image is required (--help lists the options)");
    }
    if o.duration.is_zero() {
        bail!("--duration must be positive");
    }
    Ok(Some(o))
}

fn parse_workloads(s: &str) -> Result<Vec<Workload>> {
    s.split(',')
        .map(|n| Workload::parse(n.trim()).ok_or_else(|| anyhow!("unknown workload '{n}'")))
        .collect()
}

/// One run's record.
struct Run {
    cache: Cache,
    workload: Workload,
    kind: Kind,
    rep: usize,
    result: RunResult,
    command: Vec<String>,
}

impl Run {
    /// IOPS, or MB/s (10^6 bytes) for throughput rows.
    fn value(&self) -> f64 {
        let iops = self.result.iops();
        if self.workload.throughput() {
            iops * f64::from(self.workload.bs) / 1e6
        } else {
            iops
        }
    }

    fn cpu_secs(&self, f: impl Fn(&backend::Sample) -> u64) -> f64 {
        let (a, b) = &self.result.cpu;
        f(b).saturating_sub(f(a)) as f64 / clk_tck()
    }

    /// Back-end CPU µs per request.
    fn backend_us_per_io(&self) -> f64 {
        self.cpu_secs(|s| s.backend) * 1e6 / self.result.ios.max(1) as f64
    }

    /// CPUs busy with other work than the back end and the driver.
    fn other_cpus(&self) -> f64 {
        let other = self.cpu_secs(|s| s.host_busy)
            - self.cpu_secs(|s| s.backend)
            - self.cpu_secs(|s| s.driver);
        (other / self.result.secs).max(0.0)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted `v`, in µs.
fn pct_us(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i] as f64 / 1000.0
}

/// Image size in bytes.
fn image_size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("{}", p.display()))?
        .len())
}

/// Compares one 4 KiB read through the device with the image file.
fn check_read(dev: &mut BlkDevice, backend: &mut Running, image: &Path, seed: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let size = image_size(image)?;
    let block = Rng::new(seed ^ 0x5eed).next_u64() % (size / 4096);
    dev.submit(0, Op::Read, block * 8, 4096)?;
    dev.kick()?;
    workload::drain(dev, backend)?;
    let mut got = vec![0u8; 4096];
    dev.mem()
        .read_slice(&mut got, dev.data(0))
        .map_err(|e| anyhow!("{e}"))?;
    let mut want = vec![0u8; 4096];
    std::fs::File::open(image)?.read_exact_at(&mut want, block * 4096)?;
    if got != want {
        bail!(
            "{}: 4 KiB at block {block} differs from the image file",
            backend.kind.title()
        );
    }
    Ok(())
}

fn one_run(o: &Opts, spec: &Spec, cache: Cache, w: &Workload, rep: usize) -> Result<Run> {
    let dir = o
        .dir
        .clone()
        .or_else(|| o.image.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let size = image_size(&o.image)?;
    let tag = format!("{}-{rep}", std::process::id());
    let mut be = spec.start(&o.image, cache, o.queues, &dir, &tag)?;
    let fe = be.connect()?;
    let cfg = Config {
        queue_size: o.queue_size,
        queues: o.queues,
        slots: w.qd,
        max_io: w.bs,
        event_idx: o.event_idx,
        indirect: o.indirect,
    };
    let mut dev = BlkDevice::new(fe, cfg).context(spec.kind.title())?;
    if let Some(c) = dev.negotiated().capacity {
        if c != size {
            bail!("{}: capacity {c} bytes, image {size}", spec.kind.title());
        }
    }
    // Data buffers: not zeroes, so writes carry real data.
    let mut rng = Rng::new(o.seed ^ 0xda7a);
    let fill: Vec<u8> = (0..w.bs as usize / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    for s in 0..w.qd {
        dev.mem()
            .write_slice(&fill, dev.data(s))
            .map_err(|e| anyhow!("{e}"))?;
    }
    check_read(&mut dev, &mut be, &o.image, o.seed + rep as u64)?;
    // The check read overwrote slot 0's buffer.
    dev.mem()
        .write_slice(&fill, dev.data(0))
        .map_err(|e| anyhow!("{e}"))?;
    let result = workload::run(&mut dev, &mut be, w, size, o.warmup, o.duration, o.seed)?;
    drop(dev);
    let command = be.command.clone();
    be.stop()?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&o.image)?
        .sync_data()?;
    Ok(Run {
        cache,
        workload: *w,
        kind: spec.kind,
        rep,
        result,
        command,
    })
}

/// Reads the whole image through the page cache.
fn warm_page_cache(image: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(image)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    eprintln!("  page cache warmed with the image");
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.0}")
    }
}

fn report(o: &Opts, runs: &[Run]) {
    let kinds: Vec<Kind> = [Kind::Blockd, Kind::Qsd]
        .into_iter()
        .filter(|k| o.only.is_none_or(|x| x == *k))
        .collect();
    for cache in &o.caches {
        let mode = match cache {
            Cache::None => "cache=none (O_DIRECT)",
            Cache::Writeback => "cache=writeback (page cache)",
        };
        println!(
            "\n### {mode}, {} queue{}: median of {} runs × {:.0} s\n",
            o.queues,
            if o.queues == 1 { "" } else { "s" },
            o.runs,
            o.duration.as_secs_f64()
        );
        let of = |w: &Workload, k: Kind| -> Vec<&Run> {
            runs.iter()
                .filter(|r| r.cache == *cache && r.workload == *w && r.kind == k)
                .collect()
        };
        print!("| workload |");
        for k in &kinds {
            print!(" {} |", k.title());
        }
        println!("{}", if kinds.len() == 2 { " ratio |" } else { "" });
        println!(
            "|---|{}",
            "---:|".repeat(kinds.len() + usize::from(kinds.len() == 2))
        );
        for w in &o.workloads {
            let meds: Vec<f64> = kinds
                .iter()
                .map(|k| median(of(w, *k).iter().map(|r| r.value()).collect()))
                .collect();
            print!("| {} |", w.title());
            for m in &meds {
                print!(" {} |", fmt_value(*m));
            }
            if meds.len() == 2 {
                print!(" {:.2} |", meds[0] / meds[1]);
            }
            println!();
        }
        println!(
            "\nLatency (µs, all runs pooled), back-end CPU per request, spread, other load:\n"
        );
        print!("| workload |");
        for k in &kinds {
            print!(" {} p50 / p99 |", k.name());
        }
        for k in &kinds {
            print!(" {} CPU µs/req |", k.name());
        }
        for k in &kinds {
            print!(" {} runs |", k.name());
        }
        println!(" other load (CPUs, max) |");
        println!("|---|{}---:|", "---:|".repeat(kinds.len() * 3));
        for w in &o.workloads {
            print!("| {} |", w.name());
            for k in &kinds {
                let mut lat: Vec<u64> = of(w, *k)
                    .iter()
                    .flat_map(|r| r.result.lat_ns.iter().copied())
                    .collect();
                lat.sort_unstable();
                print!(" {:.1} / {:.1} |", pct_us(&lat, 50.0), pct_us(&lat, 99.0));
            }
            for k in &kinds {
                let c = median(of(w, *k).iter().map(|r| r.backend_us_per_io()).collect());
                print!(" {c:.1} |");
            }
            for k in &kinds {
                let v: Vec<String> = of(w, *k).iter().map(|r| fmt_value(r.value())).collect();
                print!(" {} |", v.join(", "));
            }
            let other = runs
                .iter()
                .filter(|r| r.cache == *cache && r.workload == *w)
                .map(|r| r.other_cpus())
                .fold(0.0, f64::max);
            println!(" {other:.2} |");
        }
    }
}

fn write_json(o: &Opts, runs: &[Run], load_before: &str, started: u64) -> Result<()> {
    let Some(out) = &o.out else {
        return Ok(());
    };
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    let runs: Vec<_> = runs
        .iter()
        .map(|r| {
            let mut lat = r.result.lat_ns.clone();
            lat.sort_unstable();
            json!({
                "cache": r.cache.name(),
                "workload": r.workload.name(),
                "backend": r.kind.name(),
                "rep": r.rep,
                "command": r.command,
                "ios": r.result.ios,
                "secs": r.result.secs,
                "value": r.value(),
                "unit": if r.workload.throughput() { "MB/s" } else { "IOPS" },
                "lat_p50_us": pct_us(&lat, 50.0),
                "lat_p99_us": pct_us(&lat, 99.0),
                "lat_p999_us": pct_us(&lat, 99.9),
                "kicks": r.result.kicks,
                "wakeups": r.result.wakeups,
                "backend_cpu_s": r.cpu_secs(|s| s.backend),
                "driver_cpu_s": r.cpu_secs(|s| s.driver),
                "host_busy_cpu_s": r.cpu_secs(|s| s.host_busy),
                "host_steal_cpu_s": r.cpu_secs(|s| s.host_steal),
                "other_cpus": r.other_cpus(),
            })
        })
        .collect();
    let doc = json!({
        "benchmark": "vhost-blk",
        "unix_time": started,
        "image": o.image.display().to_string(),
        "image_bytes": image_size(&o.image)?,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "options": {
            "duration_s": o.duration.as_secs_f64(), "warmup_s": o.warmup.as_secs_f64(),
            "runs": o.runs, "queues": o.queues, "queue_size": o.queue_size, "event_idx": o.event_idx,
            "indirect": o.indirect, "seed": o.seed, "qsd_aio": o.qsd.aio,
        },
        "runs": runs,
    });
    std::fs::write(out, serde_json::to_string_pretty(&doc)?)?;
    eprintln!("raw data: {}", out.display());
    Ok(())
}

fn run(o: &Opts) -> Result<()> {
    let size = image_size(&o.image)?;
    if size < 64 << 20 || size % 4096 != 0 {
        bail!("image of {size} bytes: use at least 64 MiB, a multiple of 4 KiB");
    }
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let load_before = loadavg();
    eprintln!(
        "vhost-blk-bench: image {} ({} MiB), load average {load_before}",
        o.image.display(),
        size >> 20
    );
    let mut runs = Vec::new();
    for cache in &o.caches {
        if *cache == Cache::Writeback {
            warm_page_cache(&o.image)?;
        }
        for w in &o.workloads {
            for rep in 0..o.runs {
                let mut order = [&o.blockd, &o.qsd];
                if rep % 2 == 1 {
                    order.reverse();
                }
                for spec in order {
                    if o.only.is_some_and(|k| k != spec.kind) {
                        continue;
                    }
                    let r = one_run(o, spec, *cache, w, rep).with_context(|| {
                        format!("{} cache={} {}", spec.kind.title(), cache.name(), w.name())
                    })?;
                    eprintln!(
                        "  cache={} {:<18} {:<6} run {}: {:>8.0} {}  (load {}, other {:.2} CPUs)",
                        cache.name(),
                        w.name(),
                        spec.kind.name(),
                        rep + 1,
                        r.value(),
                        if w.throughput() { "MB/s" } else { "IOPS" },
                        loadavg(),
                        r.other_cpus()
                    );
                    runs.push(r);
                }
            }
        }
    }
    eprintln!("load average at the end: {}", loadavg());
    report(o, &runs);
    write_json(o, &runs, &load_before, started)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vhost-blk-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-blk-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_median() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(pct_us(&v, 50.0), 50.0);
        assert_eq!(pct_us(&v, 99.0), 99.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn options_parse() {
        let a: Vec<String> = ["--image", "/x", "--cache", "none,writeback", "--runs", "5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = parse_args(&a).expect("parse").expect("opts");
        assert_eq!(o.caches, vec![Cache::None, Cache::Writeback]);
        assert_eq!(o.runs, 5);
        assert_eq!(o.workloads.len(), 8);
        assert!(parse_args(&["--bogus".to_string()]).is_err());
    }
}
