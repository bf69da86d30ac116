//! A stand-in monitor for development: spawns `bulkhead-vcpu`, sets up a VM from a kernel
//! (bzImage or ELF vmlinux) and optional initrd, and runs a script of steps.
//!
//! ```text
//! drive --kernel PATH [--initrd PATH] [--cmdline STR] [--mem MIB] [--vcpus N]
//!       [--no-reboot] [--worker PATH] [--quiet] [STEP ...]
//! steps: run | pause | reset | query | quit | rss | sleep:MS
//!        wait:TEXT[:SECS]    wait for TEXT in serial output after the previous wait
//!        event:NAME[:SECS]   wait for an event whose debug form starts with NAME
//!        quiet:MS            fail if the serial output grows within MS milliseconds
//!        exit[:SECS]         wait for the worker to exit
//! ```
//! Without steps it runs the guest and prints events until the worker exits. Serial output
//! is echoed to stdout (unless --quiet); driver lines start with `[drive +SECONDS]`. It ends
//! with `DRIVE-OK` or `DRIVE-FAIL: why` and the matching exit status.

#[path = "../tests/common/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bulkhead_ipc::messages::{VcpuReply, VcpuRequest};
use harness::{Boot, Worker};

struct Args {
    worker: PathBuf,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    mem_mib: u64,
    vcpus: u32,
    no_reboot: bool,
    quiet: bool,
    steps: Vec<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        worker: std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("bulkhead-vcpu")))
            .unwrap_or_else(|| PathBuf::from("bulkhead-vcpu")),
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        mem_mib: 256,
        vcpus: 1,
        no_reboot: false,
        quiet: false,
        steps: vec![],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--worker" => a.worker = val()?.into(),
            "--kernel" => a.kernel = val()?.into(),
            "--initrd" => a.initrd = Some(val()?.into()),
            "--cmdline" => a.cmdline = val()?,
            "--mem" => a.mem_mib = val()?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--vcpus" => a.vcpus = val()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--no-reboot" => a.no_reboot = true,
            "--quiet" => a.quiet = true,
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ => a.steps.push(arg),
        }
    }
    if a.kernel.as_os_str().is_empty() {
        return Err("--kernel is required".into());
    }
    Ok(a)
}

fn secs(spec: Option<&str>, default: u64) -> Duration {
    Duration::from_secs(spec.and_then(|s| s.parse().ok()).unwrap_or(default))
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("drive: {e}");
            std::process::exit(2);
        }
    };
    match drive(&args) {
        Ok(()) => {
            println!("DRIVE-OK");
        }
        Err(e) => {
            println!("DRIVE-FAIL: {e}");
            std::process::exit(1);
        }
    }
}

fn drive(a: &Args) -> Result<(), String> {
    let t0 = Instant::now();
    let say = |msg: String| println!("\n[drive +{:.3}] {msg}", t0.elapsed().as_secs_f64());
    let mut w = Worker::spawn(&a.worker, a.mem_mib, a.vcpus)
        .map_err(|e| format!("spawn {}: {e}", a.worker.display()))?;
    say(format!("worker pid {} up", w.child.pid()));
    let setup_at = Instant::now();
    let reply = w.setup(&Boot {
        kernel: &a.kernel,
        initrd: a.initrd.as_deref(),
        cmdline: &a.cmdline,
        mem_mib: a.mem_mib,
        vcpus: a.vcpus,
        no_reboot: a.no_reboot,
        serial_in: false,
        echo: !a.quiet,
    })?;
    if reply != VcpuReply::Ok {
        return Err(format!("setup: {reply:?}"));
    }
    say(format!(
        "setup done in {:.3}s",
        setup_at.elapsed().as_secs_f64()
    ));
    let default = ["run".to_string(), "exit:100000".to_string()];
    let steps: &[String] = if a.steps.is_empty() {
        &default
    } else {
        &a.steps
    };
    let mut mark = 0usize;
    for step in steps {
        let mut parts = step.splitn(2, ':');
        let verb = parts.next().unwrap_or("");
        let rest = parts.next();
        match verb {
            "run" => w.ok(VcpuRequest::Run)?,
            "pause" => {
                let t = Instant::now();
                w.ok(VcpuRequest::Pause)?;
                say(format!(
                    "paused in {:.3} ms",
                    t.elapsed().as_secs_f64() * 1e3
                ));
            }
            "reset" => {
                mark = w.serial.len();
                w.ok(VcpuRequest::Reset)?;
            }
            "quit" => w.ok(VcpuRequest::Quit)?,
            "query" => match w.request(VcpuRequest::QueryCpus, &[], Duration::from_secs(10))? {
                VcpuReply::Cpus(c) => {
                    for cpu in c {
                        say(format!("cpu {cpu:?}"));
                    }
                }
                other => return Err(format!("query: {other:?}")),
            },
            "rss" => say(format!("worker memory (KiB): {}", w.rss_breakdown())),
            "sleep" => std::thread::sleep(Duration::from_millis(
                rest.and_then(|s| s.parse().ok()).unwrap_or(1000),
            )),
            "wait" => {
                let spec = rest.unwrap_or("");
                let (text, limit) = match spec.rsplit_once(':') {
                    Some((t, s)) if s.parse::<u64>().is_ok() => (t, secs(Some(s), 60)),
                    _ => (spec, Duration::from_secs(60)),
                };
                match w.serial.wait_for(text, mark, limit) {
                    Some(end) => {
                        mark = end;
                        say(format!(
                            "saw {text:?} {:.3}s after setup",
                            setup_at.elapsed().as_secs_f64()
                        ));
                    }
                    None => return Err(format!("timed out waiting for {text:?}")),
                }
            }
            "quiet" => {
                let ms = rest.and_then(|s| s.parse().ok()).unwrap_or(1000);
                std::thread::sleep(Duration::from_millis(50));
                let before = w.serial.len();
                std::thread::sleep(Duration::from_millis(ms));
                let after = w.serial.len();
                if after != before {
                    return Err(format!("{} bytes of output while quiet", after - before));
                }
                say(format!("no output for {ms} ms"));
                mark = after;
            }
            "event" => {
                let spec = rest.unwrap_or("");
                let (name, limit) = match spec.rsplit_once(':') {
                    Some((n, s)) if s.parse::<u64>().is_ok() => (n, secs(Some(s), 60)),
                    _ => (spec, Duration::from_secs(60)),
                };
                match w.next_event(limit) {
                    Some((_, ev)) => {
                        let shown = format!("{ev:?}");
                        say(format!("event {shown}"));
                        if !shown.starts_with(name) {
                            return Err(format!("expected event {name}, got {shown}"));
                        }
                        mark = w.serial.len();
                    }
                    None => return Err(format!("no event {name} in time")),
                }
            }
            "exit" => {
                let limit = secs(rest, 60);
                let deadline = Instant::now() + limit;
                loop {
                    if let Some((_, ev)) = w.next_event(Duration::from_millis(100)) {
                        say(format!("event {ev:?}"));
                    }
                    if let Ok(Some(st)) = w.child.try_wait() {
                        say(format!("worker exited: {st}"));
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err("worker did not exit".into());
                    }
                }
            }
            other => return Err(format!("unknown step {other:?}")),
        }
    }
    Ok(())
}
