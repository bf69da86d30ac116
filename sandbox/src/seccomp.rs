//! The seccomp side: a role's allowlist compiled to BPF (seccompiler), the `SIGSYS` handler that
//! reports a violation, and the report's parser for the monitor.
//!
//! A call outside the allowlist returns `SECCOMP_RET_TRAP`: the kernel does not run it and sends
//! the thread a `SIGSYS` carrying the call's number. The handler [`on_sigsys`] (installed before
//! the filter) writes one line to the report fd (a pipe whose other end the launcher keeps),
//! then makes the process die *by* `SIGSYS`: it calls `rt_sigaction(SIGSYS, …)`, which the filter
//! traps too; that second `SIGSYS` arrives while the first is still blocked, and for a blocked
//! seccomp signal the kernel resets the action to the default (core dump, so: death, even for a
//! pid-namespace init that ignores other self-sent signals) and delivers it. `raise(SIGSYS)`
//! would not do: pid 1 of a namespace ignores a signal it sends itself with the default action.
//!
//! Why TRAP and not `SECCOMP_RET_KILL_PROCESS`: a kill leaves nothing in userspace that names the
//! call (only the audit log does, which the monitor cannot read), and the issue wants the number
//! in the monitor's log. TRAP keeps the guarantee that matters: the forbidden call never runs,
//! whatever the handler then does. The handler cannot be swapped (the filter refuses
//! `rt_sigaction` on `SIGSYS`); a compromised worker that blocks `SIGSYS` only loses its report
//! (the kernel forces the default action on a blocked seccomp `SIGSYS`), and a report it forges
//! is only believed when the process really died by `SIGSYS`.
//!
//! Filters: one main filter (listed calls allowed, everything else trapped) and, for calls the
//! policy answers with an errno (`clone3` → `ENOSYS`), one small filter per errno value. The
//! kernel runs every installed filter and takes the strictest answer (TRAP beats ERRNO beats
//! ALLOW), so the errno filter only has to say what it refuses.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::policy::{Policy, Rule};
use crate::syscall_names;
use crate::{Error, Result};

/// `si_code` of a seccomp `SIGSYS`.
const SYS_SECCOMP: i32 = 1;
/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// The report line's first word.
const MAGIC: &str = "BULKHEAD-SECCOMP-VIOLATION";

/// The fd the handler writes its report to (-1: stderr).
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// The filters for `policy`, compiled for this process (`own_pid` is what `getpid()` returns in
/// it, for the `tgkill` rule). Returns nothing for a policy without a seccomp allowlist.
pub fn compile(policy: &Policy, own_pid: i32) -> Result<Vec<BpfProgram>> {
    if policy.seccomp.is_none() {
        return Ok(Vec::new());
    }
    let arch = TargetArch::x86_64;
    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for a in policy.allowed() {
        let rules = match a.rule {
            Rule::Errno(e) => {
                errno.entry(e).or_default().insert(a.nr, Vec::new());
                // Let the main filter pass it, so the errno filter's answer stands.
                Vec::new()
            }
            other => rules_for(other, own_pid).map_err(|e| Error::Seccomp {
                what: "building a rule",
                detail: format!("{}: {e}", a.name),
            })?,
        };
        allow.insert(a.nr, rules);
    }
    let mut out = Vec::new();
    for (e, calls) in errno {
        let f = SeccompFilter::new(calls, SeccompAction::Allow, SeccompAction::Errno(e), arch)
            .map_err(|e| Error::Seccomp {
                what: "building the errno filter",
                detail: e.to_string(),
            })?;
        out.push(BpfProgram::try_from(f).map_err(|e| Error::Seccomp {
            what: "compiling the errno filter",
            detail: e.to_string(),
        })?);
    }
    let f = SeccompFilter::new(allow, SeccompAction::Trap, SeccompAction::Allow, arch).map_err(
        |e| Error::Seccomp {
            what: "building the filter",
            detail: e.to_string(),
        },
    )?;
    out.push(BpfProgram::try_from(f).map_err(|e| Error::Seccomp {
        what: "compiling the filter",
        detail: e.to_string(),
    })?);
    Ok(out)
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    v: u64,
) -> std::result::Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, len, op, v)
}

fn rules_for(
    rule: Rule,
    own_pid: i32,
) -> std::result::Result<Vec<SeccompRule>, seccompiler::BackendError> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq, Ne};
    let one = |c: SeccompCondition| SeccompRule::new(vec![c]);
    Ok(match rule {
        Rule::Any | Rule::Errno(_) => Vec::new(),
        Rule::ArgIn { arg, values } => values
            .iter()
            .map(|&v| one(cond(arg, Dword, Eq, v)?))
            .collect::<std::result::Result<_, _>>()?,
        Rule::Ioctl(list) => list
            .iter()
            .map(|i| one(cond(1, Dword, Eq, i.nr & 0xffff_ffff)?))
            .collect::<std::result::Result<_, _>>()?,
        Rule::ArgNot { arg, value } => vec![one(cond(arg, Dword, Ne, value)?)?],
        Rule::ArgHasBits { arg, bits } => vec![one(cond(arg, Qword, MaskedEq(bits), bits)?)?],
        Rule::OwnThreadSignal(signals) => signals
            .iter()
            .map(|s| {
                SeccompRule::new(vec![
                    cond(0, Dword, Eq, own_pid as u64)?,
                    cond(2, Dword, Eq, s.number() as u64)?,
                ])
            })
            .collect::<std::result::Result<_, _>>()?,
    })
}

/// Installs the `SIGSYS` reporter (writing to `report_fd`, or stderr if `None`) and then the
/// filters, on every thread. Call with one thread only, before anything untrusted is read.
pub fn install(filters: &[BpfProgram], report_fd: Option<RawFd>) -> Result<()> {
    REPORT_FD.store(report_fd.unwrap_or(-1), Ordering::SeqCst);
    // SAFETY: a zeroed sigaction is a valid value; handler, flags and mask are then set.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: sa_mask is a valid sigset_t inside `sa`.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installing a handler that only makes async-signal-safe system calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(Error::sys("sigaction(SIGSYS)"));
    }
    for f in filters {
        seccompiler::apply_filter_all_threads(f).map_err(|e| Error::Seccomp {
            what: "installing the filter",
            detail: e.to_string(),
        })?;
    }
    Ok(())
}

/// The layout of a `SIGSYS` siginfo (`_sigsys` in the kernel's `siginfo_t`).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer the handler formats into (no allocation in a signal handler).
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn dec(&mut self, v: i64) {
        if v < 0 {
            self.push(b"-");
        }
        let mut v = v.unsigned_abs();
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.push(&[digits[n]]);
        }
    }

    fn hex(&mut self, v: u64) {
        self.push(b"0x");
        let mut started = false;
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            if d != 0 || started || i == 0 {
                started = true;
                self.push(&[if d < 10 { b'0' + d } else { b'a' + d - 10 }]);
            }
        }
    }
}

/// The `SIGSYS` handler. Only async-signal-safe work: format into a stack buffer, `write`, then
/// die by the trapped `rt_sigaction` (see the module documentation).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for SIGSYS its union
    // holds `_sigsys`, which `SigsysInfo` lays out.
    let si = unsafe { &*(info as *const SigsysInfo) };
    if si.code != SYS_SECCOMP {
        // Not from seccomp (someone sent SIGSYS with kill): nothing to report, nothing ran.
        return;
    }
    let mut args = [0u64; 6];
    if !ctx.is_null() {
        // SAFETY: for a SA_SIGINFO handler the third argument is the interrupted context.
        let uc = unsafe { &*(ctx as *const libc::ucontext_t) };
        let g = &uc.uc_mcontext.gregs;
        for (a, reg) in args.iter_mut().zip([
            libc::REG_RDI,
            libc::REG_RSI,
            libc::REG_RDX,
            libc::REG_R10,
            libc::REG_R8,
            libc::REG_R9,
        ]) {
            *a = g[reg as usize] as u64;
        }
    }
    let mut line = Line {
        buf: [0; 320],
        len: 0,
    };
    line.push(MAGIC.as_bytes());
    line.push(b" nr=");
    line.dec(i64::from(si.syscall));
    line.push(b" arch=");
    line.hex(u64::from(si.arch));
    line.push(b" args=");
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            line.push(b",");
        }
        line.hex(*a);
    }
    line.push(b"\n");
    let fd = match REPORT_FD.load(Ordering::SeqCst) {
        fd if fd >= 0 => fd,
        _ => libc::STDERR_FILENO,
    };
    // SAFETY: write(2) of a buffer we own, bounded by its length; the result does not matter.
    unsafe { libc::write(fd, line.buf.as_ptr().cast(), line.len) };
    // The filter traps this rt_sigaction (on SIGSYS it is refused) and the nested, blocked SIGSYS
    // kills the process with the default action; were it to return (no filter), exit_group ends
    // the process all the same.
    // SAFETY: a zeroed sigaction is SIG_DFL; both calls take plain values and local pointers.
    unsafe {
        let dfl: libc::sigaction = std::mem::zeroed();
        libc::syscall(
            libc::SYS_rt_sigaction,
            libc::SIGSYS,
            &dfl as *const libc::sigaction,
            std::ptr::null_mut::<libc::sigaction>(),
            std::mem::size_of::<libc::sigset_t>().min(8),
        );
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

/// A violation a worker reported before it died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The system call's number.
    pub nr: i64,
    /// Its audit architecture.
    pub arch: u32,
    /// Its six arguments as the registers held them.
    pub args: [u64; 6],
}

impl Violation {
    /// Finds the first report line in `text` (a worker may log other lines around it).
    pub fn parse(text: &str) -> Option<Violation> {
        let line = text.lines().find(|l| l.starts_with(MAGIC))?;
        let mut nr = None;
        let mut arch = None;
        let mut args = None;
        for w in line.split_whitespace().skip(1) {
            let (k, v) = w.split_once('=')?;
            match k {
                "nr" => nr = v.parse().ok(),
                "arch" => arch = u32::try_from(parse_hex(v)?).ok(),
                "args" => {
                    let mut a = [0u64; 6];
                    let mut n = 0;
                    for (slot, s) in a.iter_mut().zip(v.split(',')) {
                        *slot = parse_hex(s)?;
                        n += 1;
                    }
                    if n == 6 {
                        args = Some(a);
                    }
                }
                _ => {}
            }
        }
        Some(Violation {
            nr: nr?,
            arch: arch?,
            args: args?,
        })
    }

    /// The call's name, if known.
    pub fn name(&self) -> Option<&'static str> {
        if self.arch == AUDIT_ARCH_X86_64 {
            syscall_names::name(self.nr)
        } else {
            None
        }
    }
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "system call {}", self.nr)?;
        if let Some(n) = self.name() {
            write!(f, " ({n})")?;
        }
        if self.nr == libc::SYS_ioctl {
            write!(f, " request {:#x}", self.args[1] & 0xffff_ffff)?;
        }
        if self.arch != AUDIT_ARCH_X86_64 {
            write!(f, " arch {:#x}", self.arch)?;
        }
        write!(
            f,
            " args [{:#x}, {:#x}, {:#x}, {:#x}, {:#x}, {:#x}]",
            self.args[0], self.args[1], self.args[2], self.args[3], self.args[4], self.args[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Role;

    #[test]
    fn every_role_with_an_allowlist_compiles() {
        for r in Role::ALL {
            let p = r.policy();
            let progs = compile(p, 1).expect("compiles");
            if p.seccomp.is_some() {
                assert!(!progs.is_empty(), "{r:?}");
                for prog in &progs {
                    assert!(prog.len() < 4096, "{r:?}: {} instructions", prog.len());
                }
            } else {
                assert!(progs.is_empty());
            }
        }
    }

    #[test]
    fn report_lines_round_trip() {
        let mut line = Line {
            buf: [0; 320],
            len: 0,
        };
        line.push(MAGIC.as_bytes());
        line.push(b" nr=");
        line.dec(41);
        line.push(b" arch=");
        line.hex(u64::from(AUDIT_ARCH_X86_64));
        line.push(b" args=");
        for (i, a) in [2u64, 1, 0, 0xdead_beef, 0, u64::MAX].iter().enumerate() {
            if i > 0 {
                line.push(b",");
            }
            line.hex(*a);
        }
        let text = format!(
            "some log line\n{}\n",
            std::str::from_utf8(&line.buf[..line.len]).expect("ascii")
        );
        let v = Violation::parse(&text).expect("parses");
        assert_eq!(v.nr, 41);
        assert_eq!(v.name(), Some("socket"));
        assert_eq!(v.args, [2, 1, 0, 0xdead_beef, 0, u64::MAX]);
        assert!(v
            .to_string()
            .starts_with("system call 41 (socket) args [0x2, 0x1"));
        assert_eq!(Violation::parse("nothing here"), None);
        assert_eq!(Violation::parse(&format!("{MAGIC} nr=x")), None);
        let mut neg = Line {
            buf: [0; 320],
            len: 0,
        };
        neg.dec(-12);
        assert_eq!(&neg.buf[..neg.len], b"-12");
    }

    #[test]
    fn ioctl_violations_name_the_request() {
        let v = Violation {
            nr: libc::SYS_ioctl,
            arch: AUDIT_ARCH_X86_64,
            args: [5, 0x4004_54d0, 0, 0, 0, 0],
        };
        assert!(v.to_string().contains("(ioctl) request 0x400454d0"));
    }
}
