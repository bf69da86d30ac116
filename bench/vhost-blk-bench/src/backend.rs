//! Starting, connecting to and stopping the two back ends, and sampling CPU time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vhost::vhost_user::Frontend;

/// Which back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `bulkhead-blockd`.
    Blockd,
    /// `qemu-storage-daemon --export type=vhost-user-blk`.
    Qsd,
}

impl Kind {
    /// Short name (JSON, `--only`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Blockd => "blockd",
            Kind::Qsd => "qsd",
        }
    }

    /// Column title.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Blockd => "blockd",
            Kind::Qsd => "qemu-storage-daemon",
        }
    }
}

/// How to start a back end.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Which.
    pub kind: Kind,
    /// Its executable.
    pub bin: PathBuf,
    /// More arguments, appended to the command line.
    pub extra: Vec<String>,
    /// qsd only: the file node's `aio=` (none: QEMU's default, `threads`).
    pub aio: Option<String>,
}

/// `none` (O_DIRECT) or `writeback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// `O_DIRECT`: blockd `--cache none`, qsd `cache.direct=on`.
    None,
    /// Page cache: blockd `--cache writeback`, qsd `cache.direct=off`.
    Writeback,
}

impl Cache {
    /// blockd's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Cache::None => "none",
            Cache::Writeback => "writeback",
        }
    }

    /// Parses `none` / `writeback`.
    pub fn parse(s: &str) -> Option<Cache> {
        match s {
            "none" => Some(Cache::None),
            "writeback" => Some(Cache::Writeback),
            _ => None,
        }
    }
}

/// A started back end.
pub struct Running {
    /// Which.
    pub kind: Kind,
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    /// The command line, for the record.
    pub command: Vec<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl Spec {
    /// The argument list for a back end serving `image` on `sock`.
    pub fn args(
        &self,
        image: &Path,
        sock: &Path,
        cache: Cache,
        queues: u16,
    ) -> Result<Vec<String>> {
        let nq = queues.to_string();
        let image = image
            .to_str()
            .ok_or_else(|| anyhow!("image path not UTF-8"))?;
        let sock = sock
            .to_str()
            .ok_or_else(|| anyhow!("socket path not UTF-8"))?;
        Ok(match self.kind {
            Kind::Blockd => {
                let mut a: Vec<String> = [
                    "--socket",
                    sock,
                    "--file",
                    image,
                    "--format",
                    "raw",
                    "--num-queues",
                    &nq,
                    "--cache",
                    cache.name(),
                    "--sandbox",
                    "on",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                a.extend(self.extra.iter().cloned());
                a
            }
            Kind::Qsd => {
                if image.contains(',') || sock.contains(',') {
                    bail!("qemu-storage-daemon options cannot take paths with commas");
                }
                let direct = if cache == Cache::None { "on" } else { "off" };
                let mut file =
                    format!("driver=file,node-name=f,filename={image},cache.direct={direct}");
                if let Some(aio) = &self.aio {
                    file.push_str(&format!(",aio={aio}"));
                }
                let mut a = vec![
                    "--blockdev".to_string(),
                    file,
                    "--export".to_string(),
                    format!(
                        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},\
                         writable=on,num-queues={nq}"
                    ),
                ];
                a.extend(self.extra.iter().cloned());
                a
            }
        })
    }

    /// Starts the back end with `queues` queues; `tag` makes its socket and log names unique in
    /// `dir`.
    pub fn start(
        &self,
        image: &Path,
        cache: Cache,
        queues: u16,
        dir: &Path,
        tag: &str,
    ) -> Result<Running> {
        let sock = dir.join(format!("{}-{tag}.sock", self.kind.name()));
        let log = dir.join(format!("{}-{tag}.log", self.kind.name()));
        let _ = std::fs::remove_file(&sock);
        let args = self.args(image, &sock, cache, queues)?;
        let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&self.bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let mut command = vec![self.bin.display().to_string()];
        command.extend(args);
        Ok(Running {
            kind: self.kind,
            child,
            sock,
            log,
            command,
        })
    }
}

impl Running {
    /// Fails if the back end has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "{} exited: {st}; log: {}",
                self.kind.title(),
                self.log_text()
            );
        }
        Ok(())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Connects as the front end, retrying until the socket accepts (10 s at most).
    pub fn connect(&mut self) -> Result<Frontend> {
        let start = Instant::now();
        loop {
            if self.sock.exists() {
                if let Ok(f) = Frontend::connect(&self.sock, 1) {
                    return Ok(f);
                }
            }
            self.check_alive()?;
            if start.elapsed() > Duration::from_secs(10) {
                bail!("{}: no socket after 10 s", self.kind.title());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the back end after the front end hung up: blockd exits by itself (and must exit
    /// 0 with no sandbox violation), qemu-storage-daemon gets SIGTERM.
    pub fn stop(mut self) -> Result<()> {
        match self.kind {
            Kind::Blockd => {
                let start = Instant::now();
                let st = loop {
                    if let Some(st) = self.child.try_wait()? {
                        break st;
                    }
                    if start.elapsed() > Duration::from_secs(10) {
                        bail!("blockd did not exit 10 s after the front end hung up");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                let log = self.log_text();
                if !st.success() || log.contains("SECCOMP-VIOLATION") {
                    bail!("blockd: {st}; log: {log}");
                }
            }
            Kind::Qsd => {
                // SAFETY: kill() on our own child, not yet reaped (the Child still holds it).
                unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
                let start = Instant::now();
                while self.child.try_wait()?.is_none() {
                    if start.elapsed() > Duration::from_secs(10) {
                        self.child.kill()?;
                        self.child.wait()?;
                        bail!("qemu-storage-daemon ignored SIGTERM for 10 s");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let _ = std::fs::remove_file(&self.log);
        Ok(())
    }

    /// CPU time of the back end, this process and the whole host, now.
    pub fn sample(&self) -> Sample {
        Sample::take(self.child.id())
    }
}

/// CPU counters in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Back end process (all threads, also exited ones): utime + stime.
    pub backend: u64,
    /// This process.
    pub driver: u64,
    /// Host: user + nice + system + irq + softirq + steal.
    pub host_busy: u64,
    /// Host steal time.
    pub host_steal: u64,
}

fn proc_ticks(path: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0;
    };
    // Fields after the command name, which may contain spaces: state is field 3, utime 14,
    // stime 15.
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum()
}

impl Sample {
    /// Takes a sample for back end `pid`.
    pub fn take(pid: u32) -> Sample {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let at = |i: usize| cpu.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        Sample {
            backend: proc_ticks(&format!("/proc/{pid}/stat")),
            driver: proc_ticks("/proc/self/stat"),
            host_busy: at(0) + at(1) + at(2) + at(5) + at(6) + at(7),
            host_steal: at(7),
        }
    }
}

/// Clock ticks per second.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf with a valid name only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
