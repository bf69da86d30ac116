//! A live process's confinement as `/proc` shows it, for `x-query-sandbox`.
//!
//! Everything here is read from the running process, never from configuration:
//! `/proc/PID/status` (`NSpid`, `Uid`, `Gid`, `Groups`, `CapInh`/`CapPrm`/`CapEff`/`CapBnd`/
//! `CapAmb`, `NoNewPrivs`, `Seccomp`, `Seccomp_filters`), `/proc/PID/ns/*` (the namespace ids),
//! `/proc/PID/uid_map` and `gid_map` (to say what the process's ids are inside its user
//! namespace) and `/proc/PID/limits`. What `/proc` does not show (landlock, the size of a
//! seccomp filter) comes from elsewhere; see `qmp/commands/sandbox.rs`.
//!
//! Ids are as the reading process (the monitor) sees them: `Uid:` shows the target's ids mapped
//! into the reader's user namespace, and a map read by a process outside the target's user
//! namespace gives the outside ids in the reader's namespace too.

use std::path::PathBuf;

/// Why a process could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A file could not be read (the process exited, or the monitor may not read it).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file did not have the expected content.
    #[error("{path}: {what}")]
    Parse {
        /// The file.
        path: String,
        /// What was wrong.
        what: String,
    },
}

/// One namespace of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Its kind as `/proc/PID/ns` names it (`user`, `mnt`, `pid`, ...).
    pub kind: String,
    /// Its id (the inode number in `user:[4026531837]`).
    pub inode: u64,
}

/// One line of a `uid_map` or `gid_map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id inside the process's user namespace.
    pub inside: u64,
    /// First id outside (in the reader's user namespace).
    pub outside: u64,
    /// How many ids.
    pub count: u64,
}

/// A process's effective uid or gid, outside and inside its user namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// The effective id as the reader sees it (`Uid:`/`Gid:` second field).
    pub outside: u64,
    /// The same id inside the process's user namespace (`None`: the map does not cover it).
    pub inside: Option<u64>,
    /// The process's map.
    pub map: Vec<IdRange>,
}

/// One resource limit (`/proc/PID/limits`); `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Its name as the file writes it (`Max open files`).
    pub name: String,
    /// Soft limit.
    pub soft: Option<u64>,
    /// Hard limit.
    pub hard: Option<u64>,
    /// Units (`bytes`, `files`, ...; may be empty).
    pub units: String,
}

/// A process's confinement, read from `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcView {
    /// The pid as the reader sees it.
    pub pid: u32,
    /// The pid inside the process's own pid namespace (last `NSpid` field).
    pub ns_pid: u32,
    /// Its namespaces, sorted by kind.
    pub namespaces: Vec<Namespace>,
    /// Effective uid.
    pub uid: Ids,
    /// Effective gid.
    pub gid: Ids,
    /// Supplementary groups (as the reader sees them).
    pub groups: Vec<u64>,
    /// `CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb`.
    pub caps: [u64; 5],
    /// `NoNewPrivs`.
    pub no_new_privs: bool,
    /// `Seccomp`: 0 disabled, 1 strict, 2 filter.
    pub seccomp_mode: u32,
    /// `Seccomp_filters`: filters attached.
    pub seccomp_filters: u32,
    /// Every limit.
    pub limits: Vec<Limit>,
}

fn proc_path(pid: u32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

fn read(pid: u32, file: &str) -> Result<String, InspectError> {
    let path = proc_path(pid, file);
    std::fs::read_to_string(&path).map_err(|source| InspectError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn parse_err(pid: u32, file: &str, what: impl Into<String>) -> InspectError {
    InspectError::Parse {
        path: proc_path(pid, file).display().to_string(),
        what: what.into(),
    }
}

/// The value of `key:` in a `/proc/PID/status` text.
fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

fn numbers(s: &str) -> Vec<u64> {
    s.split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// Parses a `uid_map`/`gid_map` text.
pub fn parse_map(text: &str) -> Vec<IdRange> {
    text.lines()
        .filter_map(|l| match numbers(l)[..] {
            [inside, outside, count] => Some(IdRange {
                inside,
                outside,
                count,
            }),
            _ => None,
        })
        .collect()
}

/// `outside` mapped through `map` into the namespace.
pub fn inside_id(map: &[IdRange], outside: u64) -> Option<u64> {
    map.iter()
        .find(|r| outside >= r.outside && outside - r.outside < r.count)
        .map(|r| r.inside + (outside - r.outside))
}

/// Parses a `/proc/PID/limits` text (fixed columns: `%-25s %-20s %-20s %-10s`).
pub fn parse_limits(text: &str) -> Vec<Limit> {
    let value = |s: &str| match s.trim() {
        "unlimited" => None,
        v => v.parse().ok(),
    };
    text.lines()
        .skip(1)
        .filter(|l| l.len() > 47)
        .filter_map(|l| {
            let name = l.get(..26)?.trim().to_string();
            let soft = l.get(26..47)?;
            let hard = l.get(47..).unwrap_or("");
            let (hard, units) = match hard.get(..21) {
                Some(h) => (h, hard.get(21..).unwrap_or("")),
                None => (hard, ""),
            };
            Some(Limit {
                name,
                soft: value(soft),
                hard: value(hard),
                units: units.trim().to_string(),
            })
        })
        .collect()
}

/// Parses a `/proc/PID/ns/*` link target: `user:[4026531837]`.
pub fn parse_ns_link(link: &str) -> Option<(String, u64)> {
    let (kind, rest) = link.split_once(':')?;
    let inode = rest.strip_prefix('[')?.strip_suffix(']')?.parse().ok()?;
    Some((kind.to_string(), inode))
}

fn namespaces(pid: u32) -> Result<Vec<Namespace>, InspectError> {
    let dir = proc_path(pid, "ns");
    let entries = std::fs::read_dir(&dir).map_err(|source| InspectError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let Some(kind) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if let Some((_, inode)) = link.to_str().and_then(parse_ns_link) {
            out.push(Namespace { kind, inode });
        }
    }
    if out.is_empty() {
        return Err(parse_err(pid, "ns", "no namespace could be read"));
    }
    out.sort_by(|a, b| a.kind.cmp(&b.kind));
    Ok(out)
}

fn ids(pid: u32, status: &str, key: &str, map_file: &str) -> Result<Ids, InspectError> {
    let outside = field(status, key)
        .map(numbers)
        .and_then(|v| v.get(1).copied())
        .ok_or_else(|| parse_err(pid, "status", format!("no {key}")))?;
    let map = parse_map(&read(pid, map_file)?);
    Ok(Ids {
        outside,
        inside: inside_id(&map, outside),
        map,
    })
}

/// Reads process `pid`'s confinement (see the module documentation).
pub fn read_process(pid: u32) -> Result<ProcView, InspectError> {
    read_process_with(pid, None)
}

/// [`read_process`], with the namespace ids given (kind, inode) instead of read from
/// `/proc/PID/ns`: a landlocked monitor may not read those links of a process outside its
/// landlock domain (landlock applies the ptrace access rules there), so its launcher reads them.
pub fn read_process_with(pid: u32, ns: Option<Vec<(&str, u64)>>) -> Result<ProcView, InspectError> {
    let status = read(pid, "status")?;
    let num = |key: &str| -> Result<u64, InspectError> {
        field(&status, key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| parse_err(pid, "status", format!("no {key}")))
    };
    let hex = |key: &str| -> Result<u64, InspectError> {
        field(&status, key)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(|| parse_err(pid, "status", format!("no {key}")))
    };
    let nspid = field(&status, "NSpid").map(numbers).unwrap_or_default();
    let ns_pid = nspid.last().copied().unwrap_or(u64::from(pid));
    Ok(ProcView {
        pid,
        ns_pid: u32::try_from(ns_pid).unwrap_or(pid),
        namespaces: match ns {
            Some(list) if !list.is_empty() => {
                let mut v: Vec<Namespace> = list
                    .into_iter()
                    .map(|(kind, inode)| Namespace {
                        kind: kind.to_string(),
                        inode,
                    })
                    .collect();
                v.sort_by(|a, b| a.kind.cmp(&b.kind));
                v
            }
            Some(_) => return Err(parse_err(pid, "ns", "no namespace could be read")),
            None => namespaces(pid)?,
        },
        uid: ids(pid, &status, "Uid", "uid_map")?,
        gid: ids(pid, &status, "Gid", "gid_map")?,
        groups: field(&status, "Groups").map(numbers).unwrap_or_default(),
        caps: [
            hex("CapInh")?,
            hex("CapPrm")?,
            hex("CapEff")?,
            hex("CapBnd")?,
            hex("CapAmb")?,
        ],
        no_new_privs: num("NoNewPrivs")? == 1,
        seccomp_mode: u32::try_from(num("Seccomp")?).unwrap_or(u32::MAX),
        // Older kernels (before 5.9) lack the line.
        seccomp_filters: field(&status, "Seccomp_filters")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        limits: parse_limits(&read(pid, "limits")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_limits_and_links_parse() {
        let map = parse_map("         0      65534          1\n");
        assert_eq!(
            map,
            [IdRange {
                inside: 0,
                outside: 65534,
                count: 1
            }]
        );
        assert_eq!(inside_id(&map, 65534), Some(0));
        assert_eq!(inside_id(&map, 1000), None);
        let identity = parse_map("         0          0 4294967295\n");
        assert_eq!(inside_id(&identity, 1000), Some(1000));
        let limits = parse_limits(
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max cpu time              unlimited            unlimited            seconds   \n\
             Max open files            64                   64                   files     \n",
        );
        assert_eq!(limits.len(), 2);
        assert_eq!(limits[0].name, "Max cpu time");
        assert_eq!((limits[0].soft, limits[0].hard), (None, None));
        assert_eq!(limits[1].soft, Some(64));
        assert_eq!(limits[1].units, "files");
        assert_eq!(
            parse_ns_link("user:[4026531837]"),
            Some(("user".into(), 4026531837))
        );
        assert_eq!(parse_ns_link("user:4026531837"), None);
    }

    #[test]
    fn this_process_reads_back() {
        let me = std::process::id();
        let v = read_process(me).expect("own /proc");
        assert_eq!(v.pid, me);
        assert_eq!(v.ns_pid, me);
        assert!(v.namespaces.iter().any(|n| n.kind == "user"));
        // SAFETY: geteuid cannot fail.
        let euid = u64::from(unsafe { libc::geteuid() });
        assert_eq!(v.uid.outside, euid);
        assert_eq!(v.uid.inside, Some(euid));
        assert!(v.limits.iter().any(|l| l.name == "Max open files"));
        assert!(v.seccomp_mode <= 2);
        assert!(read_process(u32::MAX).is_err());
    }
}
