//! Runs an L1 VM (QEMU under TCG, AMD CPU model) whose kernel's kvm_amd gives a standard
//! `/dev/kvm`, so that Bulkhead can boot a real Linux guest (L2) inside it.
//!
//! # Plumbing
//!
//! QEMU is started with three character devices, each a unix socket on which the *host* listens
//! and QEMU connects as a client (so nothing written before the host reads is lost):
//!
//! * `ttyS0` (ISA COM1): L1's kernel console and init messages -> [`NestedVm::console`].
//! * `ttyS1` (ISA COM2): the **agent**, a busybox sh loop (`/sbin/bulkhead-agent` in L1) that
//!   reads `CMD <id> <timeout> <base64 script>` lines and answers with the base64 of the
//!   script's combined output between `@@AGENT-BEGIN <id>` / `@@AGENT-END <id> <status>`.
//!   Every script runs under busybox `timeout -s KILL`, so a hung command cannot wedge the agent.
//!   See [`NestedVm::sh`].
//! * a PCI serial port (`pci-serial`, its own interrupt line, unlike ISA COM3 which would share
//!   COM1's) that L1 links to `/dev/bulkhead-out`: processes started with
//!   [`NestedVm::spawn_bulkhead`] / [`NestedVm::spawn`] write their stdout and stderr there. With
//!   Bulkhead's `-serial stdio`, that stream carries the L2 guest's console
//!   -> [`NestedVm::bulkhead_output`].
//!
//! QMP: L1 has a virtio-net NIC on QEMU user networking (`10.0.2.15/24`, configured statically by
//! L1's init) with `hostfwd=tcp:127.0.0.1:<port>-:4444`, so a Bulkhead started in L1 with
//! `-qmp tcp:0.0.0.0:4444,server=on,wait=off` is reachable from the host at
//! `127.0.0.1:<NestedVm::qmp_port()>` ([`NestedVm::qmp`] connects with retries, because the
//! forwarder accepts host connections even before anything listens in L1).
//!
//! L1 boots the generic Debian kernel as an ELF through QEMU's PVH entry (no decompression under
//! TCG), its init copies the initramfs into a tmpfs and `switch_root`s into it (so `pivot_root`
//! works for Bulkhead's sandbox), loads virtio-net, configures eth0 and starts the agent;
//! [`NestedVm::boot`] then loads kvm_amd through the agent and checks `/dev/kvm`.
//!
//! L1 gets one vCPU by default: with two, QEMU 7.2's emulation of SVM crashed L1 in about a
//! quarter of the runs (see [`NestedOpts::cpus`]); Bulkhead's L2 guests may still have several
//! vCPUs. Knobs for experiments are environment variables (see [`NestedOpts`]).
//!
//! QEMU gets `PR_SET_PDEATHSIG`, so it dies with the test process even if `Drop` never runs;
//! that signal is tied to the spawning *thread*, so keep a `NestedVm` on the thread that booted it.
//!
//! Logs of every run (L1 console, Bulkhead output, agent transcript, QEMU's stderr) are kept in
//! `<workspace>/target/nested-runs/<label>-<pid>-<n>/`; errors name that directory.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::console::{ConsoleLog, Mark};
use crate::kit::{self, GuestKit};
use crate::qmp::Qmp;
use crate::util::{
    base64_decode, base64_encode, scaled, shell_quote, tail_lines, unique_id, which, workspace_root,
};

/// TCP port the in-L1 Bulkhead's QMP server listens on (forwarded to a host port).
pub const L1_QMP_PORT: u16 = 4444;

/// Options for [`NestedVm::boot`].
#[derive(Debug, Clone)]
pub struct NestedOpts {
    /// Label for the log directory (e.g. the test name).
    pub label: String,
    /// L1 memory in MiB.
    pub memory_mib: u32,
    /// L1 vCPUs (MTTCG threads on the host; `BULKHEAD_TEST_L1_SMP`, default 1). With 2, QEMU
    /// 7.2's SVM emulation crashed L1 (a #GP loop in L1's kernel, or the L2 triple-faulting) in
    /// about a quarter of the runs; with 1 it did not, and L2 booted faster.
    pub cpus: u32,
    /// Time allowed from starting QEMU until the agent answers (scaled by
    /// `BULKHEAD_TEST_TIMEOUT_SCALE`).
    pub boot_timeout: Duration,
    /// Copy Bulkhead's binaries into L1 (fails loudly if they are not built).
    pub with_bulkhead: bool,
    /// Copy the host's qemu-system-x86_64 (with libraries and firmware) into L1.
    pub with_host_qemu: bool,
    /// Load kvm_amd and require `/dev/kvm` during boot.
    pub load_kvm: bool,
    /// Boot L1 from the bzImage instead of the (faster) ELF vmlinux via PVH.
    pub use_bzimage: bool,
    /// Extra L1 kernel command line arguments (`BULKHEAD_TEST_L1_APPEND`).
    pub extra_append: String,
    /// QEMU CPU model for L1; must expose SVM (`BULKHEAD_TEST_L1_CPU`, default `max`).
    pub cpu_model: String,
    /// TCG threading, `multi` or `single` (`BULKHEAD_TEST_L1_TCG_THREAD`, default `multi`).
    pub tcg_thread: String,
    /// Parameters for `insmod kvm.ko` in L1 (`BULKHEAD_TEST_KVM_PARAMS`).
    pub kvm_params: String,
    /// Parameters for `insmod kvm-amd.ko` in L1 (`BULKHEAD_TEST_KVM_AMD_PARAMS`).
    pub kvm_amd_params: String,
}

/// `$name` if set and not empty.
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

impl Default for NestedOpts {
    /// Defaults, with the overrides from the environment variables named on the fields.
    fn default() -> Self {
        NestedOpts {
            label: "nested".into(),
            memory_mib: 3072,
            cpus: env_or("BULKHEAD_TEST_L1_SMP", "1").parse().unwrap_or(1),
            boot_timeout: Duration::from_secs(180),
            with_bulkhead: true,
            with_host_qemu: false,
            load_kvm: true,
            use_bzimage: false,
            extra_append: env_or("BULKHEAD_TEST_L1_APPEND", ""),
            cpu_model: env_or("BULKHEAD_TEST_L1_CPU", "max"),
            tcg_thread: env_or("BULKHEAD_TEST_L1_TCG_THREAD", "multi"),
            kvm_params: env_or("BULKHEAD_TEST_KVM_PARAMS", ""),
            kvm_amd_params: env_or("BULKHEAD_TEST_KVM_AMD_PARAMS", ""),
        }
    }
}

impl NestedOpts {
    /// Defaults with the given log label.
    pub fn new(label: &str) -> Self {
        NestedOpts {
            label: label.into(),
            ..Default::default()
        }
    }
}

/// Synchronous client of the in-L1 agent (on ttyS1).
struct Agent {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    transcript: File,
}

impl Agent {
    /// Reads one line (without the newline), failing at `deadline`; `alive` is polled while waiting.
    fn read_line(
        &mut self,
        deadline: Instant,
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("timed out waiting for the L1 agent");
            }
            let slice = (deadline - now).min(Duration::from_millis(500));
            self.stream.set_read_timeout(Some(slice))?;
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("the L1 agent connection closed (L1 died?)"),
                Ok(n) => {
                    let _ = self.transcript.write_all(&chunk[..n]);
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    alive()?;
                }
                Err(e) => return Err(e).context("reading from the L1 agent"),
            }
        }
    }

    fn exec(
        &mut self,
        script: &str,
        timeout: Duration,
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<(String, i32)> {
        let id = self.next_id;
        self.next_id += 1;
        let encoded = base64_encode(script.as_bytes());
        if encoded.len() > 48 * 1024 {
            bail!("agent command too long ({} bytes encoded)", encoded.len());
        }
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let request = format!("CMD {id} {secs} {encoded}\n");
        let _ = writeln!(
            self.transcript,
            "\n>>> [{id}] (timeout {secs}s)\n{script}\n<<<"
        );
        self.stream
            .write_all(request.as_bytes())
            .context("writing to the L1 agent")?;
        // Allow for serial transfer of the output on top of the command's own timeout.
        let deadline = Instant::now() + timeout + scaled(Duration::from_secs(20));
        let begin = format!("@@AGENT-BEGIN {id}");
        let end = format!("@@AGENT-END {id} ");
        let mut in_body = false;
        let mut body = String::new();
        loop {
            let line = self
                .read_line(deadline, alive)
                .with_context(|| format!("running in L1: {}", first_line(script)))?;
            if line == begin {
                in_body = true;
            } else if let Some(rc) = line.strip_prefix(&end) {
                let rc: i32 = rc
                    .trim()
                    .parse()
                    .map_err(|_| anyhow!("bad agent status line {line:?}"))?;
                let out = base64_decode(&body).map_err(|e| anyhow!("bad agent output: {e}"))?;
                let out = String::from_utf8_lossy(&out).into_owned();
                if rc == 137 && timeout >= Duration::from_secs(1) {
                    bail!(
                        "command timed out after {secs}s in L1 (killed): {}\noutput:\n{}",
                        first_line(script),
                        tail_lines(&out, 40)
                    );
                }
                return Ok((out, rc));
            } else if in_body {
                body.push_str(&line);
            }
        }
    }
}

fn first_line(s: &str) -> &str {
    s.trim().lines().next().unwrap_or("")
}

/// A running L1 VM. Dropping it kills QEMU.
pub struct NestedVm {
    qemu: Mutex<Child>,
    agent: Mutex<Agent>,
    console: ConsoleLog,
    output: ConsoleLog,
    qmp_port: u16,
    log_dir: PathBuf,
    /// Dropped after `Drop for NestedVm` killed QEMU.
    _files: RunFiles,
    boot_time: Duration,
    next_proc: AtomicU32,
    kit: GuestKit,
}

/// Picks a currently free TCP port on the loopback interface.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(l.local_addr()?.port())
}

/// Accepts one connection on `l`, failing at `deadline` or when `qemu` exits.
fn accept(l: &UnixListener, deadline: Instant, qemu: &mut Child, what: &str) -> Result<UnixStream> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).with_context(|| format!("accepting {what}")),
        }
        if let Some(st) = qemu.try_wait()? {
            bail!("QEMU exited ({st}) before connecting {what}");
        }
        if Instant::now() >= deadline {
            bail!("QEMU did not connect {what} in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl NestedVm {
    /// Boots L1 and waits until the agent answers (and, with `load_kvm`, `/dev/kvm` exists).
    pub fn boot(opts: NestedOpts) -> Result<NestedVm> {
        let qemu_bin = which("qemu-system-x86_64").ok_or_else(|| {
            anyhow!(
                "\n\n*** qemu-system-x86_64 is not installed: the nested tests need it \
                 (apt-get install qemu-system-x86) ***\n"
            )
        })?;
        let kit = GuestKit::get()?;
        let mut last_err = None;
        // The host port for QMP can be taken between probing and QEMU's bind: retry then.
        for _ in 0..3 {
            match Self::boot_once(&opts, &kit, &qemu_bin) {
                Ok(vm) => return Ok(vm),
                Err(e) if format!("{e:#}").contains("host forwarding") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("L1 boot failed")))
    }

    fn boot_once(opts: &NestedOpts, kit: &GuestKit, qemu_bin: &Path) -> Result<NestedVm> {
        let n = unique_id();
        let pid = std::process::id();
        let label: String = opts
            .label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let log_dir = workspace_root()
            .join("target/nested-runs")
            .join(format!("{label}-{pid}-{n}"));
        let _ = fs::remove_dir_all(&log_dir);
        fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        // Unix socket paths are limited to 108 bytes: keep them short in /tmp.
        remove_stale_socket_dirs();
        let sock_dir = std::env::temp_dir().join(format!("bulkhead-l1-{pid}-{n}"));
        let _ = fs::remove_dir_all(&sock_dir);
        fs::create_dir_all(&sock_dir)?;
        // Initrd = cached base + overlays (Linux unpacks concatenated cpio archives in order).
        let initrd = log_dir.join("initrd.cpio");
        let files = RunFiles {
            sock_dir: sock_dir.clone(),
            initrd: initrd.clone(),
        };
        {
            let mut out = File::create(&initrd)?;
            std::io::copy(&mut File::open(&kit.l1_base_initrd)?, &mut out)?;
            if opts.with_bulkhead {
                let bins = kit::bin_dir();
                let overlay = log_dir.join("bulkhead-overlay.cpio");
                kit::bulkhead_overlay(&bins, &overlay)?;
                std::io::copy(&mut File::open(&overlay)?, &mut out)?;
                let _ = fs::remove_file(&overlay);
                eprintln!(
                    "[bulkhead-tests] using Bulkhead binaries from {}",
                    bins.display()
                );
            }
            if opts.with_host_qemu {
                let overlay = kit.dir.join(kit::host_qemu_overlay_name()?);
                if !overlay.is_file() {
                    let tmp = kit.dir.join(format!("host-qemu-overlay.{pid}.tmp"));
                    kit::host_qemu_overlay(&tmp)?;
                    fs::rename(&tmp, &overlay)?;
                }
                std::io::copy(&mut File::open(&overlay)?, &mut out)?;
            }
        }

        let console_sock = sock_dir.join("console.sock");
        let agent_sock = sock_dir.join("agent.sock");
        let output_sock = sock_dir.join("output.sock");
        let console_l = UnixListener::bind(&console_sock)?;
        let agent_l = UnixListener::bind(&agent_sock)?;
        let output_l = UnixListener::bind(&output_sock)?;
        let qmp_port = free_port()?;

        let kernel = if opts.use_bzimage {
            &kit.l1_bzimage
        } else {
            &kit.l1_vmlinux
        };
        let mut append = String::from(
            "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init mitigations=off \
             8250.nr_uarts=4 random.trust_cpu=on nmi_watchdog=0",
        );
        if !opts.extra_append.is_empty() {
            append.push(' ');
            append.push_str(&opts.extra_append);
        }
        let qemu_log = log_dir.join("qemu.log");
        let mut cmd = Command::new(qemu_bin);
        cmd.args(["-accel", &format!("tcg,thread={}", opts.tcg_thread)])
            .args(["-cpu", &opts.cpu_model, "-M", "q35"])
            .args([
                "-m",
                &opts.memory_mib.to_string(),
                "-smp",
                &opts.cpus.to_string(),
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .arg("-chardev")
            .arg(format!("socket,id=con,path={}", console_sock.display()))
            .args(["-serial", "chardev:con"])
            .arg("-chardev")
            .arg(format!("socket,id=agent,path={}", agent_sock.display()))
            .args(["-serial", "chardev:agent"])
            .arg("-chardev")
            .arg(format!("socket,id=out,path={}", output_sock.display()))
            .args(["-device", "pci-serial,chardev=out"])
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{qmp_port}-:{L1_QMP_PORT}"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(File::create(&qemu_log)?)
            .stderr(File::create(log_dir.join("qemu.stderr.log"))?);
        // The kernel kills QEMU if the test process dies without running Drop (e.g. nextest
        // killing a timed-out test).
        // SAFETY: the closure only calls prctl(2), async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        fs::write(log_dir.join("qemu.cmdline"), format!("{cmd:?}\n"))?;
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", qemu_bin.display()))?;
        let boot_timeout = scaled(opts.boot_timeout);
        let deadline = started + boot_timeout;

        let fail = |child: &mut Child,
                    log_dir: &Path,
                    console: Option<&ConsoleLog>,
                    e: anyhow::Error| {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = fs::read_to_string(log_dir.join("qemu.stderr.log")).unwrap_or_default();
            let tail = console
                .map(|c| {
                    std::thread::sleep(Duration::from_millis(200));
                    c.tail(50)
                })
                .unwrap_or_default();
            anyhow!(
                "{e:#}\nL1 boot failed after {:.1}s (logs in {})\n--- QEMU stderr ---\n{}\n--- L1 console (tail) ---\n{}",
                started.elapsed().as_secs_f64(),
                log_dir.display(),
                tail_lines(&stderr, 20),
                tail
            )
        };

        let streams = (|| -> Result<(UnixStream, UnixStream, UnixStream)> {
            let c = accept(&console_l, deadline, &mut child, "the L1 console")?;
            let a = accept(&agent_l, deadline, &mut child, "the agent serial port")?;
            let o = accept(&output_l, deadline, &mut child, "the output serial port")?;
            Ok((c, a, o))
        })();
        let (con_s, agent_s, out_s) = match streams {
            Ok(s) => s,
            Err(e) => return Err(fail(&mut child, &log_dir, None, e)),
        };
        let console = ConsoleLog::capture("L1 console", con_s, &log_dir.join("l1-console.log"))?;
        let output = ConsoleLog::capture(
            "bulkhead output",
            out_s,
            &log_dir.join("bulkhead-output.log"),
        )?;
        let mut agent = Agent {
            stream: agent_s,
            buf: Vec::new(),
            next_id: 1,
            transcript: File::create(log_dir.join("agent.log"))?,
        };

        // Wait for the agent's greeting.
        let ready = {
            let child_ref = &mut child;
            let mut alive = || -> Result<()> {
                if let Some(st) = child_ref.try_wait()? {
                    bail!("QEMU exited ({st}) during L1 boot");
                }
                Ok(())
            };
            (|| -> Result<()> {
                loop {
                    let line = agent.read_line(deadline, &mut alive)?;
                    if line.contains("@@AGENT-READY") {
                        return Ok(());
                    }
                }
            })()
        };
        if let Err(e) = ready {
            return Err(fail(
                &mut child,
                &log_dir,
                Some(&console),
                e.context("L1 agent did not come up"),
            ));
        }
        let boot_time = started.elapsed();
        eprintln!(
            "[bulkhead-tests] L1 up in {:.1}s (logs in {})",
            boot_time.as_secs_f64(),
            log_dir.display()
        );

        let vm = NestedVm {
            qemu: Mutex::new(child),
            agent: Mutex::new(agent),
            console,
            output,
            qmp_port,
            log_dir,
            _files: files,
            boot_time,
            next_proc: AtomicU32::new(1),
            kit: kit.clone(),
        };
        if opts.load_kvm {
            let script = format!(
                "sh /etc/bulkhead/load-kvm.sh {} {}",
                shell_quote(&opts.kvm_params),
                shell_quote(&opts.kvm_amd_params)
            );
            let (out, rc) = vm.sh(&script, scaled(Duration::from_secs(60)))?;
            if rc != 0 {
                bail!(
                    "\n\n*** kvm_amd failed to load in L1: no /dev/kvm for Bulkhead (exit {rc}) ***\n{out}\n\
                     (QEMU must run with -cpu max or an AMD model exposing SVM; logs in {})",
                    vm.log_dir.display()
                );
            }
        }
        Ok(vm)
    }

    /// Runs `script` with `sh` in L1 (cwd `/`, stdin `/dev/null`) and returns its combined
    /// stdout+stderr and exit status. The script is killed after `timeout` (then this fails).
    pub fn sh(&self, script: &str, timeout: Duration) -> Result<(String, i32)> {
        let mut agent = self.agent.lock().unwrap_or_else(|e| e.into_inner());
        let mut alive = || self.check_alive();
        agent.exec(script, timeout, &mut alive).map_err(|e| {
            anyhow!(
                "{e:#}{}\n(logs in {})\n--- L1 console (tail) ---\n{}",
                self.l1_diagnosis(),
                self.log_dir.display(),
                self.console.tail(30)
            )
        })
    }

    /// A loud note if L1's own kernel reported a crash or hang (an environment failure, not a
    /// Bulkhead one: nested SVM under TCG is emulated, not hardware); empty otherwise.
    pub fn l1_diagnosis(&self) -> String {
        const SIGNS: &[&str] = &[
            "Kernel panic",
            "BUG:",
            "Oops:",
            "soft lockup",
            "hung_task",
            "rcu_sched self-detected stall",
            "rcu: INFO",
        ];
        let hits: Vec<String> = self
            .console
            .lines_since(0)
            .into_iter()
            .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
            .take(5)
            .collect();
        if hits.is_empty() {
            return String::new();
        }
        format!(
            "\n\n*** The L1 VM's kernel reported a problem (TCG/nested-SVM environment failure, \
             see {}):\n{}\n",
            self.console.log_path().display(),
            hits.join("\n")
        )
    }

    /// The far side of the nested network tests: loads `tun` and writes `mib` MiB of random data
    /// to `/tmp/www/blob` in L1 (for the tests' busybox `httpd -h /tmp/www`); returns its md5.
    pub fn far_side_blob(&self, mib: u32) -> Result<String> {
        let out = self.sh_ok(
            &format!(
                "modprobe tun && mkdir -p /tmp/www && \
                 dd if=/dev/urandom of=/tmp/www/blob bs=1M count={mib} 2>/dev/null && \
                 md5sum /tmp/www/blob | cut -d' ' -f1"
            ),
            Duration::from_secs(60),
        )?;
        Ok(out.trim().to_owned())
    }

    /// Like [`NestedVm::sh`] but fails unless the exit status is 0; returns the output.
    pub fn sh_ok(&self, script: &str, timeout: Duration) -> Result<String> {
        let (out, rc) = self.sh(script, timeout)?;
        if rc != 0 {
            bail!(
                "`{}` failed in L1 with status {rc}:\n{out}",
                first_line(script)
            );
        }
        Ok(out)
    }

    /// Fails if QEMU has exited.
    pub fn check_alive(&self) -> Result<()> {
        let mut q = self.qemu.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = q.try_wait()? {
            bail!("the L1 QEMU exited ({st})");
        }
        Ok(())
    }

    /// Starts `/bin/bulkhead <args>` in L1 in the background; its stdout and stderr go to
    /// [`NestedVm::bulkhead_output`]. Requires `with_bulkhead` (the default).
    pub fn spawn_bulkhead(&self, args: &[&str]) -> Result<L1Process<'_>> {
        let mut argv = vec!["/bin/bulkhead"];
        argv.extend_from_slice(args);
        self.spawn(&argv)
    }

    /// Starts `argv` in L1 in the background in its own session, with stdin `/dev/null` and
    /// stdout/stderr on [`NestedVm::bulkhead_output`].
    pub fn spawn(&self, argv: &[&str]) -> Result<L1Process<'_>> {
        let prog = argv.first().ok_or_else(|| anyhow!("spawn: empty argv"))?;
        let id = self.next_proc.fetch_add(1, Ordering::Relaxed);
        let dir = format!("/run/l1proc/{id}");
        let cmdline: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
        let cmdline = cmdline.join(" ");
        let script = format!(
            "set -e\nmkdir -p {dir}\ncat > {dir}/run.sh <<'__BULKHEAD_EOF__'\n\
             {cmdline} < /dev/null > /dev/bulkhead-out 2>&1 &\n\
             echo $! > {dir}/pid.tmp && mv {dir}/pid.tmp {dir}/pid\n\
             wait $!\n\
             echo $? > {dir}/rc.tmp && mv {dir}/rc.tmp {dir}/rc\n\
             __BULKHEAD_EOF__\n\
             setsid sh {dir}/run.sh < /dev/null > {dir}/wrapper.log 2>&1 &\n\
             i=0\nwhile [ ! -s {dir}/pid ]; do i=$((i+1)); [ $i -lt 100 ] || exit 3; sleep 0.1; done\n\
             cat {dir}/pid\n"
        );
        let mark = self.output.mark();
        let started = Instant::now();
        let out = self
            .sh_ok(&script, scaled(Duration::from_secs(30)))
            .with_context(|| format!("starting {prog} in L1"))?;
        let pid: u32 = out
            .trim()
            .parse()
            .map_err(|_| anyhow!("starting {prog} in L1: unexpected pid output {out:?}"))?;
        Ok(L1Process {
            vm: self,
            dir,
            prog: (*prog).to_owned(),
            pid,
            mark,
            started,
        })
    }

    /// PIDs (in L1) of processes named `name` (busybox `pidof`).
    pub fn pidof(&self, name: &str) -> Result<Vec<u32>> {
        let (out, _) = self.sh(
            &format!("pidof {}", shell_quote(name)),
            scaled(Duration::from_secs(20)),
        )?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Host TCP port forwarded to port 4444 in L1 (Bulkhead's QMP).
    pub fn qmp_port(&self) -> u16 {
        self.qmp_port
    }

    /// Connects to the in-L1 QMP server through the port forward, retrying until its greeting
    /// arrives (or `timeout` passes), and negotiates capabilities.
    pub fn qmp(&self, timeout: Duration) -> Result<Qmp> {
        Qmp::connect_tcp_retry(("127.0.0.1", self.qmp_port), scaled(timeout))
            .with_context(|| format!("connecting to QMP in L1 (host port {})", self.qmp_port))
    }

    /// L1's kernel console (ttyS0).
    pub fn console(&self) -> &ConsoleLog {
        &self.console
    }

    /// Output of processes started with [`NestedVm::spawn`] (the L2 console for Bulkhead).
    pub fn bulkhead_output(&self) -> &ConsoleLog {
        &self.output
    }

    /// Time from starting QEMU until the agent answered.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Directory with this run's logs.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The guest kit this VM was booted with.
    pub fn kit(&self) -> &GuestKit {
        &self.kit
    }
}

impl Drop for NestedVm {
    fn drop(&mut self) {
        let q = self.qemu.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = q.kill();
        let _ = q.wait();
    }
}

/// Removes `bulkhead-l1-<pid>-<n>` socket directories and initrd copies of test processes that
/// no longer exist (killed before they could clean up).
fn remove_stale_socket_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("bulkhead-l1-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    // Likewise the large initrd copies in `<label>-<pid>-<n>` log directories.
    let Ok(entries) = fs::read_dir(workspace_root().join("target/nested-runs")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        let initrd = e.path().join("initrd.cpio");
        if let Some(pid) = pid {
            if initrd.exists() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_file(initrd);
            }
        }
    }
}

/// Per-run scratch files, removed on drop (also when booting fails). The logs stay.
struct RunFiles {
    sock_dir: PathBuf,
    /// The initrd copy is large and reproducible.
    initrd: PathBuf,
}

impl Drop for RunFiles {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.sock_dir);
        let _ = fs::remove_file(&self.initrd);
    }
}

/// A background process in L1 started by [`NestedVm::spawn`].
pub struct L1Process<'vm> {
    vm: &'vm NestedVm,
    dir: String,
    prog: String,
    pid: u32,
    mark: Mark,
    started: Instant,
}

impl L1Process<'_> {
    /// PID in L1.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When the process was started (host clock, just before the spawn request).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Position of the output stream when the process was started.
    pub fn start_mark(&self) -> Mark {
        self.mark
    }

    /// Current end of the output stream.
    pub fn mark(&self) -> Mark {
        self.vm.output.mark()
    }

    /// Output lines since the process started.
    pub fn output_lines(&self) -> Vec<String> {
        self.vm.output.lines_since(self.mark)
    }

    /// Exit status if the process has exited (128+n for signal n).
    pub fn exit_status(&self) -> Result<Option<i32>> {
        let (out, rc) = self.vm.sh(
            &format!("cat {}/rc 2>/dev/null", self.dir),
            scaled(Duration::from_secs(20)),
        )?;
        if rc != 0 {
            return Ok(None);
        }
        out.trim()
            .parse()
            .map(Some)
            .map_err(|_| anyhow!("bad exit status file content {out:?}"))
    }

    /// Waits up to `timeout` (scaled by `BULKHEAD_TEST_TIMEOUT_SCALE`) for the process to exit
    /// and returns its exit status.
    pub fn wait_exit(&self, timeout: Duration) -> Result<i32> {
        let timeout = scaled(timeout);
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let script = format!(
            "i=0\nwhile [ ! -e {d}/rc ]; do i=$((i+1)); [ $i -le {n} ] || exit 124; sleep 0.2; done\ncat {d}/rc",
            d = self.dir,
            n = secs * 5
        );
        let (out, rc) = self.vm.sh(&script, timeout + Duration::from_secs(5))?;
        match rc {
            0 => out
                .trim()
                .parse()
                .map_err(|_| anyhow!("bad exit status file content {out:?}")),
            124 => bail!(
                "{} (pid {}) did not exit within {secs}s\n--- output (tail) ---\n{}",
                self.prog,
                self.pid,
                self.vm.output.tail(40)
            ),
            _ => bail!("waiting for {} failed ({rc}): {out}", self.prog),
        }
    }

    /// Sends `signal` (a number or name, e.g. `"KILL"`) to the process.
    pub fn kill(&self, signal: &str) -> Result<()> {
        self.vm
            .sh_ok(
                &format!("kill -{} {}", shell_quote(signal), self.pid),
                scaled(Duration::from_secs(20)),
            )
            .map(|_| ())
    }

    /// The value of the first `KEY=value` console line (the guest kit's markers), waiting up to
    /// 30 s (scaled) for it.
    pub fn marker(&self, key: &str) -> Result<String> {
        let tag = format!("{key}=");
        let line = self.wait_for_console(&tag, Duration::from_secs(30))?;
        let at = line.find(&tag).ok_or_else(|| anyhow!("marker {tag}"))?;
        Ok(line[at + tag.len()..].trim().to_owned())
    }

    /// Console lines containing `pattern` so far (e.g. a guest's `...-FAIL` reports).
    pub fn lines_with(&self, pattern: &str) -> Vec<String> {
        self.output_lines()
            .into_iter()
            .filter(|l| l.contains(pattern))
            .collect()
    }

    /// Waits for an output line containing `pattern`, searching from the process start. The
    /// timeout is scaled by `BULKHEAD_TEST_TIMEOUT_SCALE`.
    pub fn wait_for_console(&self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_for_console_from(self.mark, pattern, timeout)
            .map(|(_, l)| l)
    }

    /// Waits for an output line containing `pattern` at or after `from`; returns its index (pass
    /// `index + 1` to find the next occurrence) and text. Fails early if the process exits
    /// without printing it, or if the guest panics.
    pub fn wait_for_console_from(
        &self,
        from: Mark,
        pattern: &str,
        timeout: Duration,
    ) -> Result<(Mark, String)> {
        let timeout = scaled(timeout);
        let mut exited_at: Option<(Instant, i32)> = None;
        let mut check = || -> Result<()> {
            match exited_at {
                None => {
                    if let Some(st) = self.exit_status()? {
                        // Let output still in flight arrive before giving up.
                        exited_at = Some((Instant::now(), st));
                    }
                    Ok(())
                }
                Some((t, st)) if t.elapsed() > Duration::from_secs(3) => bail!(
                    "{} exited with status {st} before printing {pattern:?}\n--- output (tail) ---\n{}",
                    self.prog,
                    self.vm.output.tail(40)
                ),
                Some(_) => Ok(()),
            }
        };
        self.vm
            .output
            .wait_until(
                from,
                &format!("{pattern:?}"),
                timeout,
                &|l| l.contains(pattern),
                &mut check,
                Duration::from_secs(2),
            )
            .map_err(|e| {
                anyhow!(
                    "{e:#}{}\n(logs in {})",
                    self.vm.l1_diagnosis(),
                    self.vm.log_dir.display()
                )
            })
    }
}
