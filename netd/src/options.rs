//! The standalone command line:
//! `bulkhead-netd --socket PATH (--tap IFNAME [--queues N] | --tap-fd N [--tap-fd N ...]) [--mac MAC]
//! [--sandbox on|off|allow-weak] [--max-guest-mem-mib N]`.

use crate::{Error, Result};

/// Where the tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Opened (created if needed) by name before the sandbox, with this many queues
    /// (`IFF_MULTI_QUEUE` when more than one): one queue pair each.
    Name(String, usize),
    /// Inherited as these fds: one queue of the tap each (several: queues of one multiqueue
    /// tap), one queue pair each.
    Fds(Vec<i32>),
}

/// Parsed options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The vhost-user socket to listen on.
    pub socket: String,
    /// The tap.
    pub tap: TapSource,
    /// The MAC address in the config space.
    pub mac: [u8; 6],
    /// Sandbox mode name (`on`, `off`, `allow-weak`).
    pub sandbox: String,
    /// Largest guest memory the front end may share, in bytes (sizes `RLIMIT_AS`).
    pub max_guest_mem: u64,
}

/// Usage text.
pub const USAGE: &str = "usage: bulkhead-netd --socket PATH (--tap IFNAME [--queues N (queue \
pairs, 1 to 8)] | --tap-fd N [--tap-fd N ...] (one queue pair per fd)) \
[--mac MAC (default 52:54:00:12:34:56)] [--sandbox on|off|allow-weak] \
[--max-guest-mem-mib N (default 4096)]\n\
   or: bulkhead-netd --ipc-fd N [--sandbox on|off|allow-weak] [--mem-bytes N] [--queues N] \
(worker mode: launched by the bulkhead monitor, which hands over the tap and the front end's \
socket)";

/// The default MAC (QEMU's first NIC's).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast addresses (a NIC's own address is unicast).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

impl Options {
    /// Parses the arguments after the program name.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options> {
        let mut socket = None;
        let mut name: Option<String> = None;
        let mut fds: Vec<i32> = Vec::new();
        let mut queues: Option<usize> = None;
        let mut mac = DEFAULT_MAC;
        let mut sandbox = "on".to_owned();
        let mut max_guest_mem = 4u64 << 30;
        let usage = |m: String| Error::Usage(format!("{m}\n{USAGE}"));
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let (key, inline) = match a.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k.to_owned(), Some(v.to_owned())),
                _ => (a.clone(), None),
            };
            let mut value = |k: &str| {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| usage(format!("{k} needs a value")))
            };
            match key.as_str() {
                "--socket" => socket = Some(value("--socket")?),
                "--tap" if name.is_some() || !fds.is_empty() => {
                    return Err(usage("one of --tap (once) and --tap-fd".into()))
                }
                "--tap-fd" if name.is_some() => {
                    return Err(usage("one of --tap (once) and --tap-fd".into()))
                }
                "--tap" => name = Some(value("--tap")?),
                "--tap-fd" => {
                    let v = value("--tap-fd")?;
                    let fd = v
                        .parse::<i32>()
                        .ok()
                        .filter(|&n| n > 2)
                        .ok_or_else(|| usage(format!("--tap-fd {v}: an fd number above 2")))?;
                    if fds.contains(&fd) {
                        return Err(usage(format!("--tap-fd {fd} given twice")));
                    }
                    if fds.len() >= crate::tap::MAX_TAP_QUEUES {
                        return Err(usage(format!(
                            "at most {} --tap-fd (queue pairs)",
                            crate::tap::MAX_TAP_QUEUES
                        )));
                    }
                    fds.push(fd);
                }
                "--queues" => {
                    let v = value("--queues")?;
                    queues = Some(
                        v.parse::<usize>()
                            .ok()
                            .filter(|n| (1..=crate::tap::MAX_TAP_QUEUES).contains(n))
                            .ok_or_else(|| {
                                usage(format!("--queues {v}: 1 to {}", crate::tap::MAX_TAP_QUEUES))
                            })?,
                    );
                }
                "--mac" => {
                    let v = value("--mac")?;
                    mac = parse_mac(&v)
                        .ok_or_else(|| usage(format!("--mac {v}: a unicast aa:bb:cc:dd:ee:ff")))?;
                }
                "--sandbox" => sandbox = value("--sandbox")?,
                "--max-guest-mem-mib" => {
                    let v = value("--max-guest-mem-mib")?;
                    max_guest_mem = v
                        .parse::<u64>()
                        .ok()
                        .filter(|&n| n > 0 && n <= 1 << 24)
                        .ok_or_else(|| usage(format!("--max-guest-mem-mib {v}")))?
                        << 20;
                }
                "-h" | "--help" => return Err(Error::Usage(USAGE.into())),
                other => return Err(usage(format!("unknown argument {other:?}"))),
            }
        }
        Ok(Options {
            socket: socket.ok_or_else(|| usage("--socket is required".into()))?,
            tap: match (name, queues) {
                (Some(n), q) => TapSource::Name(n, q.unwrap_or(1)),
                (None, Some(_)) => {
                    return Err(usage(
                        "--queues goes with --tap (with --tap-fd, each fd is one queue)".into(),
                    ))
                }
                (None, None) if fds.is_empty() => {
                    return Err(usage("--tap or --tap-fd is required".into()))
                }
                (None, None) => TapSource::Fds(fds),
            },
            mac,
            sandbox,
            max_guest_mem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Options> {
        Options::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_the_standalone_command_line() {
        let o = parse("--socket /tmp/s --tap tap0 --mac 02:00:00:00:00:01").expect("parse");
        assert_eq!(o.socket, "/tmp/s");
        assert_eq!(o.tap, TapSource::Name("tap0".into(), 1));
        assert_eq!(o.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(o.sandbox, "on");
        assert_eq!(o.max_guest_mem, 4 << 30);
        let o = parse("--socket=/s --tap-fd=5 --sandbox off --max-guest-mem-mib 128").expect("p");
        assert_eq!(o.tap, TapSource::Fds(vec![5]));
        assert_eq!(o.sandbox, "off");
        assert_eq!(o.mac, DEFAULT_MAC);
        assert_eq!(o.max_guest_mem, 128 << 20);
        let o = parse("--socket /s --tap t --queues 4").expect("parse");
        assert_eq!(o.tap, TapSource::Name("t".into(), 4));
        let o = parse("--socket /s --tap-fd 5 --tap-fd=6").expect("parse");
        assert_eq!(o.tap, TapSource::Fds(vec![5, 6]));
        assert_eq!(o.max_guest_mem, 4 << 30);
        let eight = (5..13)
            .map(|n| format!("--tap-fd {n}"))
            .collect::<Vec<_>>()
            .join(" ");
        let o = parse(&format!("--socket /s {eight}")).expect("parse");
        assert_eq!(o.tap, TapSource::Fds((5..13).collect()));
    }

    #[test]
    fn refuses_bad_command_lines() {
        for bad in [
            "--tap tap0",
            "--socket /s",
            "--socket /s --tap a --tap-fd 5",
            "--socket /s --tap-fd 5 --tap a",
            "--socket /s --tap-fd 5 --tap-fd 5",
            "--socket /s --tap-fd 5 --queues 2",
            "--socket /s --tap a --queues 0",
            "--socket /s --tap a --queues 9",
            "--socket /s --tap-fd 5 --tap-fd 6 --tap-fd 7 --tap-fd 8 --tap-fd 9 --tap-fd 10 \
             --tap-fd 11 --tap-fd 12 --tap-fd 13",
            "--socket /s --queues 2 --tap a --tap b",
            "--socket /s --tap-fd 1",
            "--socket /s --tap a --mac 01:00:00:00:00:01",
            "--socket /s --tap a --mac 02:00:00:00:00",
            "--socket /s --tap a --mac 02:00:00:00:00:01:02",
            "--socket /s --tap a --bogus",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
