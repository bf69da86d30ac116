//! Boot-time and memory benchmark: Bulkhead against QEMU/KVM, both run inside the same L1 VM.
//!
//! Run with `bench/boot.sh` (= `cargo run --release -p bulkhead-tests --bin bench_boot -- ARGS`);
//! `--help` lists the options. Bulkhead's release binaries must be built
//! (`cargo build --release --bins`); the guest kit is built on first use (see
//! `bulkhead_tests::kit`).
//!
//! # Method
//!
//! One L1 VM is booted (the nested harness: QEMU/TCG `-cpu max`, kvm_amd in L1) with Bulkhead's
//! binaries and the host's `qemu-system-x86_64` copied in. Inside it, each VMM boots the test L2
//! guest (Debian cloud kernel + busybox initramfs whose `/init` prints `BULKHEAD-GUEST-UP`
//! first) with 256 MiB and one vCPU, `--runs` times each, alternating Bulkhead and QEMU so that
//! drift in the L1/host state affects both alike.
//!
//! Every run goes through a small shell wrapper in L1 (`/run/bench/wrap.sh`):
//!
//! * it reads L1's `/proc/uptime` (10 ms resolution) and then `exec`s the VMM from the same
//!   process, so the start time includes exec, dynamic loading and all VMM setup;
//! * the VMM's stdout+stderr (the L2 serial console) go through a `while read` loop in the
//!   wrapper, which reads `/proc/uptime` again as soon as it sees the `BULKHEAD-GUEST-UP` line,
//!   forwards every line to the harness, and starts the memory snapshots;
//! * snapshot script (`/run/bench/snap.sh`): for the VMM process and its direct children it
//!   saves `/proc/PID/status`, `/proc/PID/smaps_rollup` and the VMAs of at least 128 MiB from
//!   `/proc/PID/smaps` (the guest RAM mapping), once right at the marker and again after
//!   `--idle` seconds.
//!
//! The host does not talk to L1 while a guest boots (the agent on L1's second serial port would
//! compete for L1's single vCPU); it only watches the output stream. It also records its own
//! start→marker time (from just before the spawn request to the arrival of the marker line over
//! L1's serial port), which includes the agent round trip and serial latency, for comparison.
//! After the idle snapshot the host connects to the VMM's QMP server (port 4444 in L1,
//! forwarded) and sends `quit`, then waits for the VMM to exit.
//!
//! Output: a markdown table on stdout and `target/bench/boot-<unix-time>.json` with every run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bulkhead_tests::kit;
use bulkhead_tests::util::{scaled, shell_quote, which, workspace_root};
use bulkhead_tests::{bulkhead_l2_args, l2_append, qemu_l2_argv, NestedOpts, NestedVm, QmpError};
use serde_json::{json, Value};

const USAGE: &str = "\
bench_boot: boot time and memory of Bulkhead vs QEMU/KVM, inside one nested L1 VM

usage: bench_boot [--runs N] [--idle SECS] [--only bulkhead|qemu] [--sequential]
                  [--max-foreign CPUS] [--retries N] [--out FILE]

  --runs N        boots per VMM (default 5)
  --idle SECS     second memory snapshot this long after the marker (default 3)
  --only VMM      run only `bulkhead` or only `qemu`
  --sequential    all Bulkhead runs first, then all QEMU runs (default: alternate)
  --max-foreign CPUS
                  host CPU use by processes other than this benchmark and its L1 QEMU that
                  counts as interference (default 0.25 CPUs): before each boot the benchmark
                  waits (up to 15 min) until a 5 s sample is below it, and a boot during which
                  it was exceeded is discarded (reported in the JSON) and repeated
  --retries N     repeats of a disturbed boot before it is kept anyway, flagged (default 3)
  --out FILE      JSON output (default <workspace>/target/bench/boot-<unix-time>.json)

Environment: the nested harness's variables (BULKHEAD_BIN_DIR, BULKHEAD_TEST_L1_*,
BULKHEAD_TEST_TIMEOUT_SCALE, ...; see tests/src/nested.rs). The machine should be idle.
";

/// Marker printed by the L2 guest's `/init` as its first action.
const MARKER: &str = "BULKHEAD-GUEST-UP";
/// Time allowed from VMM start to the marker (scaled by `BULKHEAD_TEST_TIMEOUT_SCALE`).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// VMAs at least this large (KiB) are reported individually: the 256 MiB guest RAM mapping.
const BIG_VMA_KIB: u64 = 128 * 1024;

/// Wrapper that times one VMM run inside L1. Arguments: run directory, idle seconds, argv.
const WRAP_SH: &str = r#"#!/bin/sh
# wrap.sh DIR IDLE_SECS ARGV...: runs ARGV, timing start -> BULKHEAD-GUEST-UP with /proc/uptime.
D=$1; IDLE=$2; shift 2
rm -rf "$D"; mkdir -p "$D"
{
    echo "@@BENCH-START $D"
    # $$ of this sh is the VMM's pid after exec; the uptime is read just before the exec.
    sh -c 'read up _ < /proc/uptime; echo "$$ $up" > "$0/start"; exec "$@"' "$D" "$@"
    rc=$?
    echo "$rc" > "$D/rc"
    echo "@@BENCH-EXIT $D $rc"
} 2>&1 | {
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in
            *BULKHEAD-GUEST-UP*)
                if [ ! -e "$D/marker" ]; then
                    read up _ < /proc/uptime
                    echo "$up" > "$D/marker"
                    ( sh /run/bench/snap.sh "$D" marker; sleep "$IDLE"; sh /run/bench/snap.sh "$D" idle ) \
                        < /dev/null > /dev/null 2>&1 &
                fi
                ;;
        esac
        printf '%s\n' "$line"
    done
}
exit "$(cat "$D/rc" 2>/dev/null || echo 255)"
"#;

/// Memory snapshot of the VMM process (pid in DIR/start) and its direct children.
const SNAP_SH: &str = r#"#!/bin/sh
# snap.sh DIR TAG: writes DIR/snap-TAG.
D=$1; T=$2
root=$(cut -d' ' -f1 "$D/start")
{
    read up _ < /proc/uptime
    echo "@@SNAP $T $up"
    role=root
    for p in $root $(cat /proc/$root/task/*/children 2>/dev/null); do
        if [ -d /proc/$p ]; then
            echo "@@PROC $role $p $(cat /proc/$p/comm)"
            cat /proc/$p/status /proc/$p/smaps_rollup
            awk -v min=@BIG@ '
                $1 ~ /^[0-9a-f]+-[0-9a-f]+$/ { name = ""; for (i = 6; i <= NF; i++) name = name " " $i; next }
                $1 == "Size:" { size = $2 }
                $1 == "Rss:" { rss = $2 }
                $1 == "Pss:" { pss = $2 }
                $1 == "Anonymous:" { anon = $2 }
                $1 == "AnonHugePages:" { thp = $2 }
                $1 == "VmFlags:" && size >= min { print "@@BIGVMA " size " " rss " " pss " " anon " " thp name }
            ' /proc/$p/smaps
        fi
        role=child
    done
    echo "@@END"
} > "$D/snap-$T.tmp" 2>&1
mv "$D/snap-$T.tmp" "$D/snap-$T"
"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Bulkhead,
    Qemu,
}

impl Vmm {
    fn key(self) -> &'static str {
        match self {
            Vmm::Bulkhead => "bulkhead",
            Vmm::Qemu => "qemu",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Vmm::Bulkhead => "Bulkhead",
            Vmm::Qemu => "QEMU/KVM",
        }
    }

    /// The VMM's command line inside L1.
    fn argv(self) -> Vec<String> {
        match self {
            Vmm::Bulkhead => {
                let mut v = vec!["/bin/bulkhead".to_owned()];
                v.extend(bulkhead_l2_args(1, "idle", &[]));
                v
            }
            // As tests/tests/nested_reference_qemu.rs runs it, with -smp 1 and a QMP server for
            // `quit` (same address as Bulkhead's).
            Vmm::Qemu => qemu_l2_argv(1, "idle"),
        }
    }
}

struct Opts {
    runs: usize,
    idle_secs: u64,
    vmms: Vec<Vmm>,
    alternate: bool,
    max_foreign: f64,
    retries: usize,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Option<Opts>> {
    let mut o = Opts {
        runs: 5,
        idle_secs: 3,
        vmms: vec![Vmm::Bulkhead, Vmm::Qemu],
        alternate: true,
        max_foreign: 0.25,
        retries: 3,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| anyhow!("{name} needs a value"));
        match a.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "--runs" => {
                o.runs = value("--runs")?.parse().context("--runs")?;
                if o.runs == 0 {
                    bail!("--runs must be at least 1");
                }
            }
            "--idle" => o.idle_secs = value("--idle")?.parse().context("--idle")?,
            "--only" => {
                o.vmms = match value("--only")?.as_str() {
                    "bulkhead" => vec![Vmm::Bulkhead],
                    "qemu" => vec![Vmm::Qemu],
                    v => bail!("--only: unknown VMM {v:?} (bulkhead or qemu)"),
                }
            }
            "--sequential" => o.alternate = false,
            "--max-foreign" => {
                o.max_foreign = value("--max-foreign")?.parse().context("--max-foreign")?
            }
            "--retries" => o.retries = value("--retries")?.parse().context("--retries")?,
            "--out" => o.out = Some(PathBuf::from(value("--out")?)),
            _ => bail!("unknown argument {a:?}\n\n{USAGE}"),
        }
    }
    Ok(Some(o))
}

/// One process in a memory snapshot; sizes in KiB.
#[derive(Debug, Clone)]
struct ProcMem {
    /// `root` (the process the wrapper exec'd) or `child`.
    role: String,
    pid: u32,
    comm: String,
    /// Every `Key: <n> kB` line of status and smaps_rollup.
    kib: BTreeMap<String, u64>,
    /// VMAs of at least [`BIG_VMA_KIB`]: (size, rss, pss, anonymous, anon THP, name).
    big_vmas: Vec<(u64, u64, u64, u64, u64, String)>,
}

impl ProcMem {
    fn get(&self, k: &str) -> u64 {
        self.kib.get(k).copied().unwrap_or(0)
    }

    /// Resident pages of the guest RAM mapping(s): the big VMAs.
    fn guest_ram_rss(&self) -> u64 {
        self.big_vmas.iter().map(|v| v.1).sum()
    }

    /// Figures reported in the summary (KiB), by name.
    fn figures(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for k in [
            "VmRSS",
            "RssAnon",
            "RssFile",
            "RssShmem",
            "Pss",
            "Pss_Anon",
            "Pss_File",
            "Pss_Shmem",
            "AnonHugePages",
        ] {
            m.insert(k, self.get(k));
        }
        m.insert("AnonPlusFile", self.get("RssAnon") + self.get("RssFile"));
        let guest = self.guest_ram_rss();
        let own = self.get("VmRSS").saturating_sub(guest);
        let guest_anon: u64 = self.big_vmas.iter().map(|v| v.3).sum();
        let own_anon = self.get("RssAnon").saturating_sub(guest_anon);
        m.insert("GuestRamRss", guest);
        m.insert("OwnRss", own);
        m.insert("OwnAnon", own_anon);
        m.insert("OwnMapped", own.saturating_sub(own_anon));
        m
    }

    fn to_json(&self) -> Value {
        json!({
            "role": self.role,
            "pid": self.pid,
            "comm": self.comm,
            "kib": self.kib,
            "figures_kib": self.figures(),
            "big_vmas": self.big_vmas.iter().map(|v| json!({
                "size_kib": v.0, "rss_kib": v.1, "pss_kib": v.2, "anonymous_kib": v.3,
                "anon_huge_pages_kib": v.4, "name": v.5,
            })).collect::<Vec<_>>(),
        })
    }
}

#[derive(Debug, Clone)]
struct Snapshot {
    /// L1 uptime when the snapshot started.
    uptime: f64,
    procs: Vec<ProcMem>,
}

/// Parses the output of `snap.sh`.
fn parse_snapshot(text: &str) -> Result<Snapshot> {
    let mut uptime = None;
    let mut procs: Vec<ProcMem> = Vec::new();
    let mut ended = false;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("@@SNAP ") {
            uptime = rest.split_whitespace().nth(1).and_then(|u| u.parse().ok());
        } else if let Some(rest) = line.strip_prefix("@@PROC ") {
            let mut it = rest.splitn(3, ' ');
            let role = it.next().unwrap_or_default().to_owned();
            let pid = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let comm = it.next().unwrap_or_default().to_owned();
            procs.push(ProcMem {
                role,
                pid,
                comm,
                kib: BTreeMap::new(),
                big_vmas: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("@@BIGVMA ") {
            let p = procs
                .last_mut()
                .ok_or_else(|| anyhow!("@@BIGVMA before @@PROC"))?;
            let mut it = rest.splitn(6, ' ');
            let mut num = || it.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            let v = (num(), num(), num(), num(), num());
            let name = it.next().unwrap_or_default().trim().to_owned();
            p.big_vmas.push((v.0, v.1, v.2, v.3, v.4, name));
        } else if line == "@@END" {
            ended = true;
        } else if let (Some(p), Some((key, val))) = (procs.last_mut(), line.split_once(':')) {
            if let Some(n) = val.trim().strip_suffix(" kB") {
                if let Ok(n) = n.trim().parse::<u64>() {
                    // status comes first; smaps_rollup has no key that status also has.
                    p.kib.entry(key.trim().to_owned()).or_insert(n);
                }
            }
        }
    }
    if !ended {
        bail!("incomplete memory snapshot:\n{text}");
    }
    if procs.is_empty() {
        bail!("memory snapshot found no process (did the VMM exit?):\n{text}");
    }
    Ok(Snapshot {
        uptime: uptime.ok_or_else(|| anyhow!("snapshot without uptime:\n{text}"))?,
        procs,
    })
}

/// Host CPU accounting, to detect other load on the host (which slows the TCG-emulated L1 and
/// shows up directly in boot times). Units: clock ticks of /proc/stat and /proc/PID/stat.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    /// All CPUs, all states (busy + idle), divided by the number of CPUs: elapsed ticks.
    elapsed: f64,
    /// Busy ticks of all CPUs.
    busy: f64,
    /// Ticks used by this process and the L1 QEMU (its child).
    ours: f64,
}

/// utime + stime of `/proc/<pid>/stat`, and its ppid.
fn proc_ticks(pid: &str) -> Option<(f64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised comm: state ppid ... utime(12th) stime(13th).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((ticks, ppid))
}

fn cpu_sample() -> Result<CpuSample> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ncpu = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count()
        .max(1) as f64;
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    let all = busy + at(3) + at(4);
    let me = std::process::id();
    let mut ours = proc_ticks("self").map(|t| t.0).unwrap_or(0.0);
    for e in std::fs::read_dir("/proc")?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some((t, ppid)) = proc_ticks(&name) {
            if ppid == me {
                ours += t;
            }
        }
    }
    Ok(CpuSample {
        elapsed: all / ncpu,
        busy,
        ours,
    })
}

/// CPUs' worth of host CPU used between `a` and `b` by processes other than ours.
fn foreign_cpus(a: &CpuSample, b: &CpuSample) -> f64 {
    let dt = b.elapsed - a.elapsed;
    if dt <= 0.0 {
        return 0.0;
    }
    ((b.busy - a.busy) - (b.ours - a.ours)).max(0.0) / dt
}

/// Waits until a 5 s sample shows less than `max` foreign CPUs (at most 15 minutes); returns the
/// seconds waited.
fn wait_for_quiet_host(max: f64) -> Result<f64> {
    let started = Instant::now();
    let mut warned = false;
    loop {
        let a = cpu_sample()?;
        std::thread::sleep(Duration::from_secs(5));
        let b = cpu_sample()?;
        let f = foreign_cpus(&a, &b);
        if f < max {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(900) {
            eprintln!("[bench_boot] WARNING: host still busy ({f:.2} foreign CPUs) after 15 min; going on");
            return Ok(started.elapsed().as_secs_f64());
        }
        if !warned {
            eprintln!("[bench_boot] host busy ({f:.2} CPUs used by other processes); waiting ...");
            warned = true;
        }
    }
}

/// Result of one boot.
struct RunResult {
    vmm: Vmm,
    index: usize,
    /// Start -> marker measured in L1 (`/proc/uptime`).
    l1_seconds: f64,
    /// Start -> marker as the host saw it (spawn request -> marker line on the host).
    host_seconds: f64,
    start_uptime: f64,
    marker_uptime: f64,
    marker: Snapshot,
    idle: Snapshot,
    exit_status: i32,
    quit_reply: String,
    /// Foreign host CPUs (see [`foreign_cpus`]) from spawn to marker.
    foreign_cpus_boot: f64,
    /// Seconds waited for a quiet host before this boot.
    waited_s: f64,
    /// Attempt number for this run index (1 = first).
    attempt: usize,
    /// Kept although disturbed (retries exhausted).
    disturbed: bool,
}

impl RunResult {
    fn to_json(&self) -> Value {
        let snap = |s: &Snapshot| {
            json!({
                "l1_uptime": s.uptime,
                "seconds_after_marker": s.uptime - self.marker_uptime,
                "processes": s.procs.iter().map(ProcMem::to_json).collect::<Vec<_>>(),
            })
        };
        json!({
            "vmm": self.vmm.key(),
            "run": self.index + 1,
            "start_to_marker_l1_s": self.l1_seconds,
            "start_to_marker_host_s": self.host_seconds,
            "l1_uptime_start": self.start_uptime,
            "l1_uptime_marker": self.marker_uptime,
            "memory_at_marker": snap(&self.marker),
            "memory_idle": snap(&self.idle),
            "quit_reply": self.quit_reply,
            "exit_status": self.exit_status,
            "host_foreign_cpus_during_boot": self.foreign_cpus_boot,
            "waited_for_quiet_host_s": self.waited_s,
            "attempt": self.attempt,
            "disturbed": self.disturbed,
        })
    }
}

/// Runs one boot of `vmm` in L1 and collects its timings and memory snapshots.
fn run_one(vm: &NestedVm, vmm: Vmm, index: usize, idle_secs: u64) -> Result<RunResult> {
    let dir = format!("/run/bench/{}-{}", vmm.key(), index + 1);
    let mut argv = vec![
        "sh".to_owned(),
        "/run/bench/wrap.sh".to_owned(),
        dir.clone(),
        idle_secs.to_string(),
    ];
    argv.extend(vmm.argv());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = vm.bulkhead_output();
    let mark = out.mark();
    let cpu_start = cpu_sample()?;
    let host_start = Instant::now();
    let proc = vm.spawn(&argv)?;
    let exit_line = format!("@@BENCH-EXIT {dir} ");
    let mut exited = || -> Result<()> {
        if let Some((_, l)) = out.find(mark, &exit_line) {
            bail!(
                "{} exited before printing {MARKER}: {l}\n--- output (tail) ---\n{}",
                vmm.title(),
                out.tail(40)
            );
        }
        Ok(())
    };
    // Only the output stream is watched until the marker: no agent traffic in L1 meanwhile.
    let start_line = format!("@@BENCH-START {dir}");
    let (start_idx, _) = out.wait_until(
        mark,
        &start_line,
        scaled(Duration::from_secs(60)),
        &|l| l.contains(&start_line),
        &mut exited,
        Duration::from_millis(500),
    )?;
    out.wait_until(
        start_idx + 1,
        MARKER,
        scaled(BOOT_TIMEOUT),
        &|l| l.contains(MARKER),
        &mut exited,
        Duration::from_millis(500),
    )
    .with_context(|| {
        format!(
            "{} run {}: logs in {}",
            vmm.title(),
            index + 1,
            vm.log_dir().display()
        )
    })?;
    let host_seconds = host_start.elapsed().as_secs_f64();
    let foreign_cpus_boot = foreign_cpus(&cpu_start, &cpu_sample()?);

    // Let the idle snapshot be taken before asking for the results.
    std::thread::sleep(Duration::from_secs(idle_secs) + Duration::from_millis(500));
    let script = format!(
        "i=0\nwhile [ ! -e {d}/snap-idle ]; do i=$((i+1)); [ $i -le 300 ] || exit 124; sleep 0.2; done\n\
         echo \"@@START $(cat {d}/start)\"\necho \"@@MARKER $(cat {d}/marker)\"\n\
         echo @@SNAP-MARKER\ncat {d}/snap-marker\necho @@SNAP-IDLE\ncat {d}/snap-idle\n",
        d = shell_quote(&dir)
    );
    let text = vm
        .sh_ok(&script, scaled(Duration::from_secs(90)))
        .with_context(|| format!("collecting the results of {dir}"))?;
    let field = |prefix: &str| -> Result<&str> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .ok_or_else(|| anyhow!("no {prefix:?} in the results of {dir}:\n{text}"))
    };
    let start = field("@@START ")?;
    let start_uptime: f64 = start
        .split_whitespace()
        .nth(1)
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| anyhow!("bad start record {start:?}"))?;
    let marker_uptime: f64 = field("@@MARKER ")?
        .trim()
        .parse()
        .context("bad marker record")?;
    let (marker_text, idle_text) = text
        .split_once("@@SNAP-MARKER")
        .and_then(|(_, rest)| rest.split_once("@@SNAP-IDLE"))
        .ok_or_else(|| anyhow!("snapshots missing in the results of {dir}:\n{text}"))?;
    let marker = parse_snapshot(marker_text).context("memory snapshot at the marker")?;
    let idle = parse_snapshot(idle_text).context("idle memory snapshot")?;

    // Quit through QMP and wait for the exit.
    let quit_reply = {
        let mut qmp = vm.qmp(Duration::from_secs(30))?;
        match qmp.execute("quit", None) {
            Ok(v) => v.to_string(),
            // The VMM may close the connection as it exits.
            Err(e @ (QmpError::Closed | QmpError::Io(_))) => format!("({e})"),
            Err(e) => return Err(e).context("QMP quit"),
        }
    };
    let exit_status = proc.wait_exit(Duration::from_secs(60))?;
    Ok(RunResult {
        vmm,
        index,
        l1_seconds: marker_uptime - start_uptime,
        host_seconds,
        start_uptime,
        marker_uptime,
        marker,
        idle,
        exit_status,
        quit_reply,
        foreign_cpus_boot,
        waited_s: 0.0,
        attempt: 1,
        disturbed: false,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Display name of a process in the memory tables.
fn proc_label(vmm: Vmm, p: &ProcMem) -> String {
    match (vmm, p.role.as_str()) {
        (Vmm::Bulkhead, "root") => format!("{} (monitor)", p.comm),
        (Vmm::Bulkhead, _) => format!("{} (worker)", p.comm),
        _ => p.comm.clone(),
    }
}

/// Median over runs of every figure, per process label and for the VMM's total; in KiB.
/// Returns rows in a stable order: processes as they appear in the first run, then "total".
fn memory_medians(
    vmm: Vmm,
    runs: &[&RunResult],
    pick: fn(&RunResult) -> &Snapshot,
) -> Vec<(String, BTreeMap<&'static str, f64>)> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, BTreeMap<&'static str, Vec<f64>>> = BTreeMap::new();
    for r in runs {
        let snap = pick(r);
        let mut total: BTreeMap<&'static str, u64> = BTreeMap::new();
        for p in &snap.procs {
            let label = proc_label(vmm, p);
            if !order.contains(&label) {
                order.push(label.clone());
            }
            for (k, v) in p.figures() {
                values
                    .entry(label.clone())
                    .or_default()
                    .entry(k)
                    .or_default()
                    .push(v as f64);
                *total.entry(k).or_default() += v;
            }
        }
        if snap.procs.len() > 1 {
            for (k, v) in total {
                values
                    .entry("total".to_owned())
                    .or_default()
                    .entry(k)
                    .or_default()
                    .push(v as f64);
            }
        }
    }
    if values.contains_key("total") {
        order.push("total".to_owned());
    }
    order
        .into_iter()
        .map(|label| {
            let med = values
                .get(&label)
                .map(|m| m.iter().map(|(k, v)| (*k, median(v))).collect())
                .unwrap_or_default();
            (label, med)
        })
        .collect()
}

fn mib(kib: f64) -> String {
    format!("{:.1}", kib / 1024.0)
}

fn cmd_output(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_boot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let Some(opts) = parse_args()? else {
        return Ok(());
    };
    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let date = cmd_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
    let command: Vec<String> = std::env::args().collect();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let load_before = loadavg();
    let load1: f64 = load_before
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load1 > 0.5 * nproc as f64 {
        eprintln!(
            "[bench_boot] WARNING: host load average is {load1} on {nproc} CPUs; results will be noisy"
        );
    }
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let qemu_bin = which("qemu-system-x86_64")
        .ok_or_else(|| anyhow!("qemu-system-x86_64 is not installed"))?;
    let qemu_version = cmd_output(&qemu_bin.to_string_lossy(), &["--version"])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let bulkhead_version = cmd_output(
        &kit::bin_dir().join("bulkhead").to_string_lossy(),
        &["--version"],
    );
    let root = workspace_root();
    let root_s = root.to_string_lossy().into_owned();
    let git_rev = cmd_output("git", &["-C", &root_s, "rev-parse", "--short", "HEAD"]);
    let git_dirty = !cmd_output("git", &["-C", &root_s, "status", "--porcelain"]).is_empty();

    let with_qemu = opts.vmms.contains(&Vmm::Qemu);
    let l1_opts = NestedOpts {
        with_bulkhead: true,
        with_host_qemu: with_qemu,
        ..NestedOpts::new("bench-boot")
    };
    let (l1_cpus, l1_mem, l1_cpu_model, l1_tcg) = (
        l1_opts.cpus,
        l1_opts.memory_mib,
        l1_opts.cpu_model.clone(),
        l1_opts.tcg_thread.clone(),
    );
    eprintln!("[bench_boot] booting L1 ...");
    let vm = NestedVm::boot(l1_opts)?;
    let l1_boot = vm.boot_time().as_secs_f64();
    eprintln!(
        "[bench_boot] L1 up in {l1_boot:.1}s; logs in {}",
        vm.log_dir().display()
    );
    let kit = vm.kit().clone();

    // L1 facts, and the wrapper scripts.
    let info = vm.sh_ok(
        "echo \"kernel=$(uname -r)\"\n\
         echo \"thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled)\"\n\
         echo \"shmem_thp=$(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled)\"\n\
         echo \"clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\"\n\
         echo \"memtotal=$(grep MemTotal /proc/meminfo)\"\n\
         echo \"nproc=$(grep -c ^processor /proc/cpuinfo)\"\n\
         [ -x /usr/bin/qemu-system-x86_64 ] && echo \"qemu=$(/usr/bin/qemu-system-x86_64 --version | head -n1)\"\n\
         true\n",
        scaled(Duration::from_secs(30)),
    )?;
    let l1_info: BTreeMap<String, String> = info
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect();
    let l1_get = |k: &str| l1_info.get(k).cloned().unwrap_or_default();
    vm.sh_ok(
        &format!(
            "mkdir -p /run/bench\ncat > /run/bench/wrap.sh <<'__EOF__'\n{WRAP_SH}__EOF__\n\
             cat > /run/bench/snap.sh <<'__EOF__'\n{}__EOF__\n",
            SNAP_SH.replace("@BIG@", &BIG_VMA_KIB.to_string())
        ),
        scaled(Duration::from_secs(30)),
    )?;

    let mut schedule = Vec::new();
    if opts.alternate {
        for i in 0..opts.runs {
            for &v in &opts.vmms {
                schedule.push((v, i));
            }
        }
    } else {
        for &v in &opts.vmms {
            for i in 0..opts.runs {
                schedule.push((v, i));
            }
        }
    }
    let mut results: Vec<RunResult> = Vec::new();
    let mut discarded: Vec<Value> = Vec::new();
    for (vmm, i) in schedule {
        let mut attempt = 1;
        loop {
            let waited_s = wait_for_quiet_host(opts.max_foreign)?;
            eprintln!(
                "[bench_boot] {} run {}/{} (attempt {attempt}) ...",
                vmm.title(),
                i + 1,
                opts.runs
            );
            let mut r = run_one(&vm, vmm, i, opts.idle_secs)?;
            r.waited_s = waited_s;
            r.attempt = attempt;
            eprintln!(
                "[bench_boot] {} run {}: {:.2}s in L1 ({:.2}s host-side), other host load {:.2} CPUs, exit {}",
                vmm.title(),
                i + 1,
                r.l1_seconds,
                r.host_seconds,
                r.foreign_cpus_boot,
                r.exit_status
            );
            if r.exit_status != 0 {
                eprintln!(
                    "[bench_boot] WARNING: {} exited with status {} after quit",
                    vmm.title(),
                    r.exit_status
                );
            }
            if r.foreign_cpus_boot >= opts.max_foreign {
                if attempt <= opts.retries {
                    eprintln!(
                        "[bench_boot] discarding this boot: other processes used {:.2} CPUs on the host meanwhile",
                        r.foreign_cpus_boot
                    );
                    discarded.push(r.to_json());
                    attempt += 1;
                    continue;
                }
                eprintln!("[bench_boot] WARNING: keeping a disturbed boot (retries exhausted)");
                r.disturbed = true;
            }
            results.push(r);
            break;
        }
    }
    let load_after = loadavg();

    // Summary.
    let mut md = String::new();
    let qemu_in_l1 = l1_get("qemu");
    md.push_str(&format!(
        "Boot benchmark, {date}: {} runs per VMM ({}), one L1 VM\n\n",
        opts.runs,
        if opts.alternate {
            "alternating"
        } else {
            "sequential"
        }
    ));
    md.push_str(&format!(
        "- host: kernel {host_kernel}, {nproc} CPUs, load average before {load_before}, after {load_after}\n\
         - L1: {qemu_version}, TCG thread={l1_tcg}, -cpu {l1_cpu_model}, {l1_cpus} vCPU, {l1_mem} MiB, \
         kernel {}, clocksource {}; booted in {l1_boot:.1} s (QEMU start -> L1 agent ready, host clock)\n\
         - L2: kernel {} (bzImage), busybox initramfs, -m 256 -smp 1, `{}`\n\
         - Bulkhead: {bulkhead_version}, git {git_rev}{}\n\
         - QEMU in L1: {}\n\n",
        l1_get("kernel"),
        l1_get("clocksource"),
        kit.l2_kernel_version,
        l2_append("idle"),
        if git_dirty { " (dirty tree)" } else { "" },
        if qemu_in_l1.is_empty() {
            "(not run)"
        } else {
            qemu_in_l1.as_str()
        },
    ));
    md.push_str(
        "Start -> `BULKHEAD-GUEST-UP`, seconds (in L1: /proc/uptime before exec -> marker line; \
         host: spawn request -> marker seen on the host; other load: CPUs used on the host by \
         processes other than the benchmark and L1 during a boot, max over the kept runs; \
         discarded: boots repeated because that load was at least the --max-foreign limit; `*`: a disturbed \
         boot kept after the retries)\n\n\
         | VMM | median (L1) | min (L1) | max (L1) | median (host-side) | runs (L1) | other load | discarded |\n\
         |---|---:|---:|---:|---:|---|---:|---:|\n",
    );
    let mut summary = serde_json::Map::new();
    for &vmm in &opts.vmms {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.vmm == vmm).collect();
        let l1: Vec<f64> = runs.iter().map(|r| r.l1_seconds).collect();
        let host: Vec<f64> = runs.iter().map(|r| r.host_seconds).collect();
        let (lo, hi) = min_max(&l1);
        let (hlo, hhi) = min_max(&host);
        let list: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.2}{}", r.l1_seconds, if r.disturbed { "*" } else { "" }))
            .collect();
        let other = runs.iter().map(|r| r.foreign_cpus_boot).fold(0.0, f64::max);
        let n_discarded = discarded.iter().filter(|d| d["vmm"] == vmm.key()).count();
        md.push_str(&format!(
            "| {} | {:.2} | {lo:.2} | {hi:.2} | {:.2} | {} | {other:.2} | {n_discarded} |\n",
            vmm.title(),
            median(&l1),
            median(&host),
            list.join(", ")
        ));
        let mem = |pick: fn(&RunResult) -> &Snapshot| -> Value {
            memory_medians(vmm, &runs, pick)
                .into_iter()
                .map(|(label, m)| json!({ "process": label, "median_kib": m }))
                .collect()
        };
        summary.insert(
            vmm.key().to_owned(),
            json!({
                "start_to_marker_l1_s": { "median": median(&l1), "min": lo, "max": hi, "all": l1 },
                "start_to_marker_host_s": { "median": median(&host), "min": hlo, "max": hhi, "all": host },
                "memory_at_marker": mem(|r| &r.marker),
                "memory_idle": mem(|r| &r.idle),
            }),
        );
    }
    for (title, pick) in [
        (
            "at the marker".to_owned(),
            (|r: &RunResult| &r.marker) as fn(&RunResult) -> &Snapshot,
        ),
        (
            format!("after {} s idle", opts.idle_secs),
            (|r: &RunResult| &r.idle) as fn(&RunResult) -> &Snapshot,
        ),
    ] {
        md.push_str(&format!(
            "\nMemory {title}, MiB, median of {} runs\n\n\
             | VMM | process | VmRSS | RssAnon | RssFile | RssShmem | Pss | RssAnon+RssFile | guest RAM | VMM own | own anon | own mapped | AnonHugePages |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            opts.runs
        ));
        for &vmm in &opts.vmms {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.vmm == vmm).collect();
            for (label, m) in memory_medians(vmm, &runs, pick) {
                let g = |k: &str| mib(m.get(k).copied().unwrap_or(f64::NAN));
                md.push_str(&format!(
                    "| {} | {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    vmm.title(),
                    g("VmRSS"),
                    g("RssAnon"),
                    g("RssFile"),
                    g("RssShmem"),
                    g("Pss"),
                    g("AnonPlusFile"),
                    g("GuestRamRss"),
                    g("OwnRss"),
                    g("OwnAnon"),
                    g("OwnMapped"),
                    g("AnonHugePages"),
                ));
            }
        }
    }
    md.push_str(
        "\nVmRSS, RssAnon, RssFile, RssShmem: /proc/PID/status; Pss, AnonHugePages: \
         /proc/PID/smaps_rollup; guest RAM: Rss of the 256 MiB guest-RAM VMA in /proc/PID/smaps; \
         VMM own = VmRSS - guest RAM; own anon = RssAnon - anonymous pages of the guest-RAM VMA; \
         own mapped = VMM own - own anon (binaries and libraries: L1's root file system is a \
         tmpfs, so their pages count as RssShmem, not RssFile). `total` sums the processes.\n",
    );
    // Where each VMM keeps guest RAM, from the big VMAs of the first run.
    md.push_str("\nGuest RAM mappings (first run, at the marker):\n\n");
    for &vmm in &opts.vmms {
        if let Some(r) = results.iter().find(|r| r.vmm == vmm) {
            for p in &r.marker.procs {
                for v in &p.big_vmas {
                    md.push_str(&format!(
                        "- {} {}: {} KiB VMA `{}`, Rss {} KiB, Anonymous {} KiB\n",
                        vmm.title(),
                        proc_label(vmm, p),
                        v.0,
                        if v.5.is_empty() {
                            "[anon]"
                        } else {
                            v.5.as_str()
                        },
                        v.1,
                        v.3
                    ));
                }
            }
        }
    }
    println!("{md}");

    let json = json!({
        "benchmark": "boot",
        "date": date,
        "unix_time": unix_time,
        "command": command,
        "options": {
            "runs": opts.runs,
            "idle_s": opts.idle_secs,
            "order": if opts.alternate { "alternating" } else { "sequential" },
            "max_foreign_cpus": opts.max_foreign,
            "retries": opts.retries,
        },
        "method": "One L1 VM (nested harness). In L1 a shell wrapper reads /proc/uptime (10 ms \
                   resolution) and execs the VMM; its stdout+stderr go through a `while read` \
                   loop that reads /proc/uptime on the first BULKHEAD-GUEST-UP line and starts \
                   memory snapshots (/proc/PID/status, /proc/PID/smaps_rollup, smaps VMAs >= 128 \
                   MiB of the VMM and its children) at the marker and after the idle time. Then \
                   QMP quit. The host does not use the L1 agent while a guest boots.",
        "host": {
            "kernel": host_kernel,
            "cpus": nproc,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "qemu": qemu_version,
        },
        "l1": {
            "boot_s": l1_boot,
            "boot_definition": "host clock, QEMU start -> L1 agent ready (before kvm_amd is loaded)",
            "kernel": l1_get("kernel"),
            "cpus": l1_cpus,
            "memory_mib": l1_mem,
            "cpu_model": l1_cpu_model,
            "tcg_thread": l1_tcg,
            "info": l1_info,
            "log_dir": vm.log_dir().display().to_string(),
        },
        "l2": {
            "kernel": kit.l2_kernel_version,
            "append": l2_append("idle"),
        },
        "bulkhead": {
            "version": bulkhead_version,
            "git": git_rev,
            "git_dirty": git_dirty,
            "argv": Vmm::Bulkhead.argv(),
        },
        "qemu": {
            "version": qemu_in_l1,
            "argv": Vmm::Qemu.argv(),
        },
        "summary": summary,
        "runs": results.iter().map(RunResult::to_json).collect::<Vec<_>>(),
        "discarded_runs": discarded,
        "table_markdown": md,
    });
    let out = match opts.out {
        Some(p) => p,
        None => root
            .join("target/bench")
            .join(format!("boot-{unix_time}.json")),
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("JSON: {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_snapshot() {
        let text = "@@SNAP marker 12.34\n\
                    @@PROC root 100 bulkhead\nName:\tbulkhead\nPid:\t100\nVmRSS:\t  2048 kB\n\
                    RssAnon:\t  1024 kB\nRssFile:\t 1024 kB\nRssShmem:\t 0 kB\n\
                    00400000-7fff0000 ---p 00000000 00:00 0 [rollup]\nRss:   2048 kB\nPss:  1500 kB\n\
                    @@PROC child 101 bulkhead-vcpu\nVmRSS:\t 40000 kB\nRssShmem:\t 30000 kB\n\
                    @@BIGVMA 262144 30000 30000 0 0 /memfd:bulkhead-guest-ram (deleted)\n@@END\n";
        let s = parse_snapshot(text).expect("parse");
        assert_eq!(s.uptime, 12.34);
        assert_eq!(s.procs.len(), 2);
        assert_eq!(s.procs[0].get("VmRSS"), 2048);
        assert_eq!(s.procs[0].get("Pss"), 1500);
        assert_eq!(s.procs[0].get("Pid"), 0);
        assert_eq!(s.procs[1].guest_ram_rss(), 30000);
        assert_eq!(s.procs[1].figures()["OwnRss"], 10000);
        assert_eq!(
            s.procs[1].big_vmas[0].5,
            "/memfd:bulkhead-guest-ram (deleted)"
        );
        assert!(parse_snapshot("@@SNAP x 1\n").is_err());
    }

    #[test]
    fn host_cpu_accounting() {
        let a = cpu_sample().expect("sample");
        std::thread::sleep(Duration::from_millis(200));
        let b = cpu_sample().expect("sample");
        assert!(b.elapsed > a.elapsed);
        let f = foreign_cpus(&a, &b);
        assert!((0.0..=64.0).contains(&f), "{f}");
        assert!(proc_ticks("self").is_some());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(min_max(&[3.0, 1.0, 2.0]), (1.0, 3.0));
    }
}
