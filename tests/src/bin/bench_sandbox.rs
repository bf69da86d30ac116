//! Start-up cost of the sandbox, per role, on this host: the same process started `--runs`
//! times with its sandbox on and off.
//!
//! Run with `bench/sandbox.sh` (= `cargo run --release -p bulkhead-tests --bin bench_sandbox --
//! ARGS`); `--help` lists the options. Bulkhead's release binaries must be built
//! (`cargo build --release --bins`; taken from `target/release` or `BULKHEAD_BIN_DIR`).
//!
//! # Method
//!
//! Scenarios, each measured with a monotonic clock in this process, on and off interleaved
//! run by run so that drift in the host state affects both alike:
//!
//! * `vcpu` (the real `bulkhead-vcpu`): launched exactly as the monitor launches it
//!   (`bulkhead_sandbox::launch`: fds 0–3, the report pipe, `--mem-bytes 256 MiB --vcpus 1`); *on*
//!   = its six namespaces, uid 0 inside mapped to nobody (or the caller's ids) and `--sandbox on`,
//!   *off* = no namespaces and `--sandbox off`. Measured: before `spawn` → the ipc handshake
//!   done (the worker confines itself before it sends its hello), split into `spawn` (clone3, id
//!   maps, exec) and the rest; and the worker's own `enter` time, asked over ipc
//!   (`QuerySandbox`).
//! * `vcpu`, `blockd`, `netd` policies in `bulkhead-sandbox-probe` (blockd and netd have no
//!   worker binaries yet): the same launch, → its `READY` line on stdout (printed right after
//!   `enter`), and the `enter` time it prints.
//! * `monitor`: `bulkhead -M none --sandbox on|off -qmp unix:...,server=on,wait=off` as a plain
//!   child process, exec → the QMP greeting read on the socket (connect retried every 200 µs).
//!   With `-M none` no worker starts, so the difference is what the monitor's own sandbox
//!   handling costs at start (the kernel preflight, and its own confinement where it applies
//!   one).
//!
//! Output: a markdown table (median and p90 of each, in µs, and the on − off difference of the
//! medians) on stdout and `target/bench/sandbox-<unix-time>.json` with every sample.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bulkhead_ipc::messages::{VcpuProtocol, VcpuReply, VcpuRequest};
use bulkhead_ipc::{Channel, Frame, Role as IpcRole};
use bulkhead_sandbox::launch::{Command, IdMap};
use bulkhead_sandbox::policy::WORKER_NAMESPACES;
use bulkhead_sandbox::Role;
use bulkhead_tests::kit;
use bulkhead_tests::util::workspace_root;
use serde_json::json;

const USAGE: &str = "\
bench_sandbox: start-up time each sandbox adds, per role, on this host

usage: bench_sandbox [--runs N] [--out FILE]

  --runs N    launches per scenario and mode (default 50)
  --out FILE  JSON output (default target/bench/sandbox-<unix-time>.json)
";

const GUEST_MEM: u64 = 256 << 20;

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a writable array of two ints as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: pipe2 returned two new fds nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One launch: total time to ready, the part spent in `spawn`, the process's own `enter` time.
#[derive(Debug, Clone, Copy)]
struct Sample {
    total_us: f64,
    spawn_us: f64,
    enter_us: Option<f64>,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn confine(cmd: &mut Command, on: bool) -> Result<()> {
    if on {
        cmd.namespaces(WORKER_NAMESPACES, Some(IdMap::for_current_user(None)?));
        cmd.report_pipe(true);
    }
    Ok(())
}

/// The real `bulkhead-vcpu`, launched as the monitor launches it, → handshake.
fn run_vcpu(bin: &Path, on: bool) -> Result<Sample> {
    let devnull = std::fs::File::open("/dev/null")?;
    let (mine, theirs) = bulkhead_ipc::channel::seqpacket_pair()?;
    let mut cmd = Command::new(bin)?;
    let mode = if on { "on" } else { "off" };
    let mem = GUEST_MEM.to_string();
    for a in [
        "--ipc-fd",
        "3",
        "--sandbox",
        mode,
        "--mem-bytes",
        &mem,
        "--vcpus",
        "1",
    ] {
        cmd.arg(a)?;
    }
    cmd.fd(devnull.as_fd(), 0)?
        .fd(devnull.as_fd(), 1)?
        .fd(devnull.as_fd(), 2)?
        .fd(theirs.as_fd(), 3)?;
    confine(&mut cmd, on)?;
    let t0 = Instant::now();
    let mut child = cmd.spawn()?;
    let spawned = t0.elapsed();
    drop(theirs);
    let chan = Channel::<VcpuProtocol>::from_fd(mine);
    chan.handshake(IpcRole::Monitor, IpcRole::Vcpu)
        .context("handshake with bulkhead-vcpu")?;
    let total = t0.elapsed();
    chan.send(
        &Frame::Request {
            id: 1,
            body: VcpuRequest::QuerySandbox,
        },
        &[],
    )?;
    let enter_us = match chan.recv()? {
        (
            Frame::Reply {
                body: VcpuReply::Sandbox(r),
                ..
            },
            _,
        ) => r.entered.then_some(r.enter_micros as f64),
        (other, _) => bail!("unexpected answer to QuerySandbox: {other:?}"),
    };
    drop(chan);
    let status = child.wait()?;
    if !status.success() {
        bail!("bulkhead-vcpu exited with {status}");
    }
    Ok(Sample {
        total_us: us(total),
        spawn_us: us(spawned),
        enter_us: if on { enter_us } else { None },
    })
}

/// `bulkhead-sandbox-probe ROLE MODE wait` → its `READY` line.
fn run_probe(bin: &Path, role: Role, on: bool) -> Result<Sample> {
    let (stdin_r, stdin_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let devnull = std::fs::File::open("/dev/null")?;
    let mut cmd = Command::new(bin)?;
    for a in [role.name(), if on { "on" } else { "off" }, "wait"] {
        cmd.arg(a)?;
    }
    cmd.fd(stdin_r.as_fd(), 0)?
        .fd(out_w.as_fd(), 1)?
        .fd(devnull.as_fd(), 2)?;
    confine(&mut cmd, on)?;
    let t0 = Instant::now();
    let mut child = cmd.spawn()?;
    let spawned = t0.elapsed();
    drop(out_w);
    drop(stdin_r);
    let mut line = String::new();
    BufReader::new(std::fs::File::from(out_r)).read_line(&mut line)?;
    let total = t0.elapsed();
    if !line.starts_with("READY") {
        bail!("probe {}: {line:?}", role.name());
    }
    drop(stdin_w);
    let status = child.wait()?;
    if !status.success() {
        bail!("probe {} exited with {status}", role.name());
    }
    Ok(Sample {
        total_us: us(total),
        spawn_us: us(spawned),
        enter_us: if on { enter_micros(&line) } else { None },
    })
}

/// "READY sandbox entered in N µs: ..." → N.
fn enter_micros(line: &str) -> Option<f64> {
    let rest = line.split("entered in ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `bulkhead -M none` → the QMP greeting.
fn run_monitor(bin: &Path, dir: &Path, on: bool, n: usize) -> Result<Sample> {
    let sock = dir.join(format!("qmp-{n}.sock"));
    let _ = std::fs::remove_file(&sock);
    let spec = format!("unix:{},server=on,wait=off", sock.display());
    let t0 = Instant::now();
    let mut child = std::process::Command::new(bin)
        .args(["-M", "none", "--sandbox", if on { "on" } else { "off" }])
        .args(["-qmp", &spec, "-nographic"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting bulkhead")?;
    let spawned = t0.elapsed();
    let deadline = t0 + Duration::from_secs(10);
    let mut stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e).context("connecting to bulkhead's QMP socket");
            }
        }
    };
    let mut greeting = [0u8; 64];
    let n_read = stream.read(&mut greeting)?;
    let total = t0.elapsed();
    if !greeting[..n_read].starts_with(b"{\"QMP\"") {
        bail!("no QMP greeting");
    }
    stream.write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"quit\"}\n")?;
    let status = child.wait()?;
    if !status.success() {
        bail!("bulkhead exited with {status}");
    }
    Ok(Sample {
        total_us: us(total),
        spawn_us: us(spawned),
        enter_us: None,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn sorted(v: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    v
}

struct Args {
    runs: usize,
    out: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Option<Args>> {
    let mut a = Args {
        runs: 50,
        out: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => a.runs = value()?.parse().context("--runs takes a number")?,
            "--out" => a.out = Some(PathBuf::from(value()?)),
            "--help" | "-h" => return Ok(None),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(Some(a))
}

type Scenario<'a> = (&'a str, Box<dyn Fn(bool, usize) -> Result<Sample> + 'a>);

fn run(a: &Args) -> Result<()> {
    let bins = kit::bin_dir();
    let vcpu = bins.join("bulkhead-vcpu");
    let probe = bins.join("bulkhead-sandbox-probe");
    let monitor = bins.join("bulkhead");
    for b in [&vcpu, &probe, &monitor] {
        if !b.exists() {
            bail!(
                "{} is missing: run `cargo build --release --bins` first",
                b.display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("bench-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let scenarios: Vec<Scenario<'_>> = vec![
        (
            "vcpu (bulkhead-vcpu → handshake)",
            Box::new(|on, _| run_vcpu(&vcpu, on)),
        ),
        (
            "vcpu policy (probe → READY)",
            Box::new(|on, _| run_probe(&probe, Role::Vcpu, on)),
        ),
        (
            "blockd policy (probe → READY)",
            Box::new(|on, _| run_probe(&probe, Role::Blockd, on)),
        ),
        (
            "netd policy (probe → READY)",
            Box::new(|on, _| run_probe(&probe, Role::Netd, on)),
        ),
        (
            "monitor (bulkhead -M none → QMP greeting)",
            Box::new(|on, n| run_monitor(&monitor, &dir, on, n)),
        ),
    ];
    let mut results = Vec::new();
    println!(
        "| scenario | off: median / p90 | on: median / p90 | on − off (medians) | of which spawn | enter (on, median / p90) |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, f) in &scenarios {
        // Warm the page cache and the binary's first-run costs.
        f(false, 0)?;
        f(true, 0)?;
        let mut off = Vec::new();
        let mut on = Vec::new();
        for i in 0..a.runs {
            off.push(f(false, 2 * i + 1)?);
            on.push(f(true, 2 * i + 2)?);
        }
        let total = |v: &[Sample]| sorted(v.iter().map(|s| s.total_us));
        let spawn = |v: &[Sample]| sorted(v.iter().map(|s| s.spawn_us));
        let (t_off, t_on) = (total(&off), total(&on));
        let (s_off, s_on) = (spawn(&off), spawn(&on));
        let enter = sorted(on.iter().filter_map(|s| s.enter_us));
        let enter_text = if enter.is_empty() {
            "—".to_string()
        } else {
            format!("{:.0} / {:.0}", median(&enter), percentile(&enter, 90.0))
        };
        println!(
            "| {name} | {:.0} / {:.0} | {:.0} / {:.0} | {:+.0} | {:+.0} | {enter_text} |",
            median(&t_off),
            percentile(&t_off, 90.0),
            median(&t_on),
            percentile(&t_on, 90.0),
            median(&t_on) - median(&t_off),
            median(&s_on) - median(&s_off),
        );
        results.push(json!({
            "scenario": name,
            "off_total_us": t_off,
            "on_total_us": t_on,
            "off_spawn_us": s_off,
            "on_spawn_us": s_on,
            "on_enter_us": enter,
        }));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let out = a.out.clone().unwrap_or_else(|| {
        workspace_root()
            .join("target/bench")
            .join(format!("sandbox-{now}.json"))
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let doc = json!({
        "runs": a.runs,
        "unix_time": now,
        "kernel": kernel.trim(),
        // SAFETY: geteuid cannot fail.
        "euid": unsafe { libc::geteuid() },
        "landlock_abi": bulkhead_sandbox::features::landlock_abi(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "results": results,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    println!(
        "\nall times in µs; {} runs per mode; raw samples: {}",
        a.runs,
        out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = match parse_args(&args) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench_sandbox: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_sandbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_and_parsing() {
        let v = sorted([5.0, 1.0, 3.0, 2.0, 4.0].into_iter());
        assert_eq!(median(&v), 3.0);
        assert_eq!(percentile(&v, 90.0), 5.0);
        assert_eq!(median(&[1.0, 2.0]), 1.5);
        assert_eq!(
            enter_micros("READY sandbox entered in 812 µs: landlock ABI 7"),
            Some(812.0)
        );
        assert_eq!(enter_micros("READY"), None);
        let a = parse_args(&["--runs".into(), "3".into()])
            .expect("ok")
            .expect("args");
        assert_eq!(a.runs, 3);
        assert!(parse_args(&["--runs".into(), "0".into()]).is_err());
        assert!(parse_args(&["--help".into()]).expect("ok").is_none());
    }
}
