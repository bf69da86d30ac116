//! The standalone command line, spelled like `qemu-storage-daemon --export vhost-user-blk`'s
//! essentials:
//! `bulkhead-blockd --socket PATH --file IMAGE [--format raw|qcow2] [--readonly] [--serial ID]
//! [--num-queues N] [--cache none|writeback] [--sandbox on|off|allow-weak]
//! [--max-guest-mem-mib N]`.

use crate::format::{Cache, Format};
use crate::{Error, Result};

/// Parsed options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The vhost-user socket to listen on.
    pub socket: String,
    /// The image file.
    pub file: String,
    /// Its format (a qcow2 image's backing files are named by its header).
    pub format: Format,
    /// Refuse writes (`VIRTIO_BLK_F_RO`).
    pub readonly: bool,
    /// `GET_ID` answer.
    pub serial: String,
    /// Queues offered.
    pub num_queues: usize,
    /// Cache mode.
    pub cache: Cache,
    /// Sandbox mode name (`on`, `off`, `allow-weak`).
    pub sandbox: String,
    /// Largest guest memory the front end may share, in bytes (sizes `RLIMIT_AS`).
    pub max_guest_mem: u64,
}

/// Usage text.
pub const USAGE: &str =
    "usage: bulkhead-blockd --socket PATH --file IMAGE [--format raw|qcow2 (default raw)] \
[--readonly] [--serial ID] [--num-queues N] [--cache none|writeback] \
[--sandbox on|off|allow-weak] [--max-guest-mem-mib N (default 4096)]\n\
A qcow2 image's backing chain (the files its header names, relative names next to the image) \
is opened read-only before the sandbox; the virtual size comes from the header.";

impl Options {
    /// Parses the arguments after the program name.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options> {
        let mut o = Options {
            socket: String::new(),
            file: String::new(),
            format: Format::Raw,
            readonly: false,
            serial: String::new(),
            num_queues: 1,
            cache: Cache::Writeback,
            sandbox: "on".into(),
            max_guest_mem: 4 << 30,
        };
        let mut it = args.into_iter();
        let usage = |m: String| Error::Usage(format!("{m}\n{USAGE}"));
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
                "--socket" => o.socket = value("--socket")?,
                "--file" => o.file = value("--file")?,
                "--format" => {
                    let f = value("--format")?;
                    o.format = Format::from_name(&f).ok_or_else(|| {
                        usage(format!("format {f:?} not supported (raw or qcow2)"))
                    })?;
                }
                "--readonly" => o.readonly = true,
                "--serial" => o.serial = value("--serial")?,
                "--num-queues" => {
                    let v = value("--num-queues")?;
                    o.num_queues = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=crate::backend::MAX_QUEUES).contains(n))
                        .ok_or_else(|| usage(format!("--num-queues {v}: 1 to 16")))?;
                }
                "--cache" => {
                    let v = value("--cache")?;
                    o.cache = Cache::from_name(&v)
                        .ok_or_else(|| usage(format!("--cache {v}: none or writeback")))?;
                }
                "--sandbox" => o.sandbox = value("--sandbox")?,
                "--max-guest-mem-mib" => {
                    let v = value("--max-guest-mem-mib")?;
                    let mib: u64 = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| usage(format!("--max-guest-mem-mib {v}")))?;
                    o.max_guest_mem = mib.saturating_mul(1 << 20);
                }
                "-h" | "--help" => return Err(Error::Usage(USAGE.into())),
                _ => return Err(usage(format!("unknown argument {a:?}"))),
            }
        }
        if o.socket.is_empty() || o.file.is_empty() {
            return Err(usage("--socket and --file are required".into()));
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Options> {
        Options::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_the_documented_options() {
        let o = p("--socket /s --file=/f --readonly --serial abc --num-queues 4 --cache none")
            .expect("parse");
        assert_eq!(o.socket, "/s");
        assert_eq!(o.file, "/f");
        assert!(o.readonly);
        assert_eq!(o.serial, "abc");
        assert_eq!(o.num_queues, 4);
        assert_eq!(o.cache, Cache::None);
        assert_eq!(o.sandbox, "on");
        assert_eq!(o.format, Format::Raw);
        let o = p("--socket /s --file /f --format qcow2").expect("qcow2");
        assert_eq!(o.format, Format::Qcow2);
        for bad in [
            "--file /f",
            "--socket /s",
            "--socket /s --file /f --format vmdk",
            "--socket /s --file /f --num-queues 0",
            "--socket /s --file /f --num-queues 17",
            "--socket /s --file /f --cache weird",
            "--socket /s --file /f --bogus",
            "--socket",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
