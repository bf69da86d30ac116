//! QMP round-trip benchmark: `query-status` latency and throughput, Bulkhead against QEMU, both
//! with `-M none`, in the same run.
//!
//! Run with `bench/qmp.sh` (= `cargo run --release -p bulkhead-tests --bin bench_qmp -- ARGS`);
//! `--help` lists the options. Bulkhead's release binaries must be built
//! (`cargo build --release --bins`); `qemu-system-x86_64` must be installed.
//!
//! # Method
//!
//! Both servers run on this host: `bulkhead -M none -qmp unix:...` and
//! `qemu-system-x86_64 -M none -nodefaults -display none -qmp unix:...`. QEMU serves one client per
//! `-qmp` chardev, so it gets one `-qmp` socket per session; Bulkhead serves every session on one
//! socket (how it is meant to be used).
//!
//! A scenario is a number of sessions, each on its own client thread, each in a closed loop:
//! write `{"execute": "query-status"}\n` in one `write`, read lines until the reply, and record
//! the round trip with a monotonic clock. Sessions connect and negotiate first, warm up with
//! `--warmup` commands each, then start together on a barrier. Throughput is all replies divided
//! by the wall time from the barrier to the last session's end. The server's CPU time (user +
//! system, from `/proc/PID/stat`) over the measured phase is reported per request.
//!
//! Rounds alternate Bulkhead and QEMU (`--rounds`, default 3) so that drift in the host state
//! affects both alike; latencies of all rounds are pooled for the percentiles, throughput is the
//! median of the rounds. The clients share the machine with the server: on a 2-core host, 32
//! client threads compete with the server for CPU, equally for both servers.
//!
//! Output: a markdown table on stdout and `target/bench/qmp-<unix-time>.json`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bulkhead_tests::kit;
use bulkhead_tests::util::{which, workspace_root};
use serde_json::json;

const USAGE: &str = "\
bench_qmp: QMP query-status latency and throughput, Bulkhead vs QEMU (-M none)

usage: bench_qmp [--sessions LIST] [--requests N] [--warmup N] [--rounds N]
                 [--only bulkhead|qemu] [--bulkhead-arg ARG]... [--out FILE]

  --sessions LIST  comma-separated session counts (default 1,32)
  --requests N     measured requests per scenario, split evenly over its sessions
                   (default 20000)
  --warmup N       unmeasured requests per session before each scenario (default 200)
  --rounds N       rounds per server, alternating (default 3)
  --only SERVER    run only `bulkhead` or only `qemu`
  --bulkhead-arg ARG
                   one more argument for bulkhead (repeatable), e.g. --bulkhead-arg
                   --sandbox --bulkhead-arg off
  --out FILE       JSON output (default target/bench/qmp-<unix-time>.json)
";

const REQUEST: &[u8] = b"{\"execute\": \"query-status\"}\n";

#[derive(Debug, Clone)]
struct Opts {
    sessions: Vec<usize>,
    requests: usize,
    warmup: usize,
    rounds: usize,
    only: Option<Server>,
    bulkhead_args: Vec<String>,
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Bulkhead,
    Qemu,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Bulkhead => "bulkhead",
            Server::Qemu => "qemu",
        }
    }
}

fn parse_args(args: &[String]) -> Result<Option<Opts>> {
    let mut o = Opts {
        sessions: vec![1, 32],
        requests: 20_000,
        warmup: 200,
        rounds: 3,
        only: None,
        bulkhead_args: Vec::new(),
        out: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow!("{a} needs a value"))
        };
        let num = |v: String| -> Result<usize> {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| anyhow!("{a}: expected a positive integer, got '{v}'"))
        };
        match a.as_str() {
            "--help" | "-h" => return Ok(None),
            "--sessions" => {
                o.sessions = val()?
                    .split(',')
                    .map(|s| num(s.to_string()))
                    .collect::<Result<_>>()?;
            }
            "--requests" => o.requests = num(val()?)?,
            "--warmup" => o.warmup = num(val()?)?,
            "--rounds" => o.rounds = num(val()?)?,
            "--only" => {
                o.only = Some(match val()?.as_str() {
                    "bulkhead" => Server::Bulkhead,
                    "qemu" => Server::Qemu,
                    other => bail!("--only: expected bulkhead or qemu, got '{other}'"),
                })
            }
            "--bulkhead-arg" => o.bulkhead_args.push(val()?),
            "--out" => o.out = Some(PathBuf::from(val()?)),
            other => bail!("unknown option '{other}'\n\n{USAGE}"),
        }
    }
    Ok(Some(o))
}

/// A running server, killed on drop.
struct Running {
    child: Child,
    sockets: Vec<PathBuf>,
    dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(server: Server, sessions: usize, extra: &[String]) -> Result<Running> {
    let dir = std::env::temp_dir().join(format!(
        "bench-qmp-{}-{}-{sessions}",
        std::process::id(),
        server.name()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (program, mut args, sockets): (PathBuf, Vec<String>, Vec<PathBuf>) = match server {
        Server::Bulkhead => {
            let sock = dir.join("bh.sock");
            (
                kit::bin_dir().join("bulkhead"),
                vec![
                    "-M".into(),
                    "none".into(),
                    "-nographic".into(),
                    "-qmp".into(),
                    format!("unix:{},server=on,wait=off", sock.display()),
                ],
                vec![sock],
            )
        }
        Server::Qemu => {
            let qemu = which("qemu-system-x86_64")
                .ok_or_else(|| anyhow!("qemu-system-x86_64 is not installed"))?;
            let mut args: Vec<String> = [
                "-M",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-no-user-config",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut socks = Vec::new();
            for i in 0..sessions {
                let sock = dir.join(format!("q{i}.sock"));
                args.push("-qmp".into());
                args.push(format!("unix:{},server=on,wait=off", sock.display()));
                socks.push(sock);
            }
            (qemu, args, socks)
        }
    };
    if server == Server::Bulkhead {
        args.extend(extra.iter().cloned());
    }
    if !program.exists() {
        bail!(
            "{} not found: build the release binaries first (cargo build --release --bins)",
            program.display()
        );
    }
    let child = Command::new(&program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let running = Running {
        child,
        sockets,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    for s in &running.sockets {
        while !s.exists() {
            if Instant::now() > deadline {
                bail!("{} did not create {}", server.name(), s.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(running)
}

/// One negotiated session.
struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Session {
    fn open(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = s.try_clone()?;
        let mut sess = Session {
            reader: BufReader::new(s),
            writer,
            line: String::new(),
        };
        sess.read_reply()?; // the greeting
        sess.writer
            .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
        let r = sess.read_reply()?;
        if !r.contains("\"return\"") {
            bail!("negotiation failed: {r}");
        }
        Ok(sess)
    }

    /// Reads lines until one that is not an event.
    fn read_reply(&mut self) -> Result<String> {
        loop {
            self.line.clear();
            if self.reader.read_line(&mut self.line)? == 0 {
                bail!("the server closed the connection");
            }
            if !self.line.contains("\"event\"") {
                return Ok(self.line.clone());
            }
        }
    }

    fn round_trip(&mut self) -> Result<Duration> {
        let t = Instant::now();
        self.writer.write_all(REQUEST)?;
        let r = self.read_reply()?;
        let dt = t.elapsed();
        if !r.contains("\"return\"") {
            bail!("unexpected reply {r}");
        }
        Ok(dt)
    }
}

/// CPU time (user + system) of `pid` so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ticks: u64 = f
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .zip(f.get(12).and_then(|s| s.parse::<u64>().ok()))
        .map(|(u, s)| u + s)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    Ok(Duration::from_micros(ticks * 1_000_000 / hz))
}

#[derive(Debug, Default, Clone)]
struct Sample {
    latencies_ns: Vec<u64>,
    wall: Duration,
    server_cpu: Duration,
}

fn run_scenario(server: Server, sessions: usize, opts: &Opts) -> Result<Sample> {
    let running = start(server, sessions, &opts.bulkhead_args)?;
    let pid = running.child.id();
    let mut conns = Vec::new();
    for i in 0..sessions {
        let path = &running.sockets[i % running.sockets.len()];
        conns.push(Session::open(path)?);
    }
    let per_session = opts.requests.div_ceil(sessions);
    let barrier = Arc::new(Barrier::new(sessions + 1));
    let mut threads = Vec::new();
    for mut s in conns {
        let barrier = barrier.clone();
        let warmup = opts.warmup;
        threads.push(std::thread::spawn(
            move || -> Result<(Vec<u64>, Instant)> {
                for _ in 0..warmup {
                    s.round_trip()?;
                }
                barrier.wait();
                let mut lat = Vec::with_capacity(per_session);
                for _ in 0..per_session {
                    let d = s.round_trip()?;
                    lat.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                }
                Ok((lat, Instant::now()))
            },
        ));
    }
    barrier.wait();
    let t0 = Instant::now();
    let cpu0 = cpu_time(pid)?;
    let mut sample = Sample::default();
    let mut end = t0;
    for t in threads {
        let (lat, done) = t
            .join()
            .map_err(|_| anyhow!("a client thread panicked"))??;
        sample.latencies_ns.extend(lat);
        end = end.max(done);
    }
    sample.wall = end - t0;
    sample.server_cpu = cpu_time(pid)?.saturating_sub(cpu0);
    drop(running);
    Ok(sample)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match real_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_qmp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: &[String]) -> Result<()> {
    let Some(opts) = parse_args(args)? else {
        print!("{USAGE}");
        return Ok(());
    };
    let servers: Vec<Server> = match opts.only {
        Some(s) => vec![s],
        None => vec![Server::Bulkhead, Server::Qemu],
    };
    let qemu_version = Command::new("qemu-system-x86_64")
        .arg("-version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    let mut rows = Vec::new();
    let mut raw = Vec::new();
    for &sessions in &opts.sessions {
        let mut samples: Vec<(Server, Vec<Sample>)> =
            servers.iter().map(|s| (*s, Vec::new())).collect();
        for round in 0..opts.rounds {
            for (server, list) in samples.iter_mut() {
                eprintln!(
                    "bench_qmp: {} sessions, round {}/{}, {}",
                    sessions,
                    round + 1,
                    opts.rounds,
                    server.name()
                );
                list.push(run_scenario(*server, sessions, &opts)?);
            }
        }
        for (server, list) in samples {
            let mut all: Vec<u64> = list
                .iter()
                .flat_map(|s| s.latencies_ns.iter().copied())
                .collect();
            all.sort_unstable();
            let mut tputs: Vec<f64> = list
                .iter()
                .map(|s| s.latencies_ns.len() as f64 / s.wall.as_secs_f64())
                .collect();
            let mut cpu_us: Vec<f64> = list
                .iter()
                .map(|s| s.server_cpu.as_secs_f64() * 1e6 / s.latencies_ns.len() as f64)
                .collect();
            let row = json!({
                "server": server.name(),
                "sessions": sessions,
                "requests": all.len(),
                "p50_us": percentile(&all, 50.0),
                "p99_us": percentile(&all, 99.0),
                "p999_us": percentile(&all, 99.9),
                "throughput_per_s": median(&mut tputs),
                "server_cpu_us_per_request": median(&mut cpu_us),
            });
            raw.push(json!({
                "server": server.name(),
                "sessions": sessions,
                "rounds": list.iter().map(|s| json!({
                    "requests": s.latencies_ns.len(),
                    "wall_s": s.wall.as_secs_f64(),
                    "server_cpu_s": s.server_cpu.as_secs_f64(),
                })).collect::<Vec<_>>(),
            }));
            rows.push(row);
        }
    }
    println!(
        "\n| server | sessions | requests | p50 (µs) | p99 (µs) | p99.9 (µs) | throughput (req/s) | server CPU (µs/req) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} |",
            r["server"].as_str().unwrap_or("?"),
            r["sessions"],
            r["requests"],
            f("p50_us"),
            f("p99_us"),
            f("p999_us"),
            f("throughput_per_s"),
            f("server_cpu_us_per_request"),
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let out = opts.out.clone().unwrap_or_else(|| {
        workspace_root()
            .join("target/bench")
            .join(format!("qmp-{now}.json"))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let doc = json!({
        "benchmark": "qmp",
        "unix_time": now,
        "qemu": qemu_version,
        "bulkhead": kit::bin_dir().join("bulkhead").display().to_string(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg_after": load.trim(),
        "options": {
            "sessions": opts.sessions, "requests": opts.requests,
            "warmup": opts.warmup, "rounds": opts.rounds,
            "bulkhead_args": opts.bulkhead_args,
        },
        "results": rows,
        "raw": raw,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    eprintln!("bench_qmp: wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn options() {
        let a = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let o = parse_args(&a(&["--sessions", "1,8", "--rounds", "2"]))
            .expect("ok")
            .expect("opts");
        assert_eq!(o.sessions, vec![1, 8]);
        assert_eq!(o.rounds, 2);
        assert!(parse_args(&a(&["--sessions", "0"])).is_err());
        assert!(parse_args(&a(&["--only", "x"])).is_err());
        assert!(parse_args(&a(&["--help"])).expect("ok").is_none());
    }
}
