//! File descriptors passed in by clients: what a session holds (the fds received with
//! `SCM_RIGHTS` for the command being run, and the fds `getfd` named) and the fd sets all
//! sessions share (`add-fd`, `-add-fd`), plus the way other code uses them: [`FdSets::open`]
//! opens a path that may be `/dev/fdset/N`, [`SessionFds::take_named`] hands a `getfd` fd to an
//! `fd=NAME` consumer.
//!
//! The rules are QEMU's (monitor/fds.c), with its error texts:
//!
//! - `getfd NAME` takes the first fd that came with the command (any others are closed) and
//!   names it in the session; a name must not start with an ASCII digit; re-using a name closes
//!   the fd it named. `closefd NAME` closes it. Names belong to one session and are closed with
//!   it.
//! - `add-fd` puts the fd in fd set `fdset-id` (created if needed) or, without an id, in a new
//!   set with the lowest free id; it answers the fd's number in the monitor. `remove-fd` closes
//!   one fd of a set (or all of them) at once. A set lives while it holds fds or while anyone
//!   holds a duplicate made from it ([`SetDup`]): removing the last fd of a set whose dup is still
//!   in use leaves an empty set that disappears when the dup is closed.
//! - Opening `/dev/fdset/N` duplicates (`F_DUPFD_CLOEXEC`) the newest fd of set N whose access
//!   mode (`O_ACCMODE`) equals the one asked for, truncating it if the open would have truncated,
//!   as QEMU's `qemu_open` does; the duplicate is registered with the set until it is dropped.
//!
//! Unlike QEMU 7.2 (and like QEMU since 9.1, commit "monitor: Stop removing non-duplicated fds"),
//! `remove-fd` closes at once whatever the run state, and nothing is closed when the last QMP
//! client disconnects.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Most fds one received message may carry; more are closed by the kernel on arrival.
pub const MAX_PENDING_FDS: usize = 16;

/// Most fds one session may name with `getfd` (QEMU has no bound; without one a client could
/// exhaust the monitor's fd table and starve every other session and the workers).
pub const MAX_NAMED_FDS: usize = 256;
/// Most fds all fd sets together may hold (same reason).
pub const MAX_SET_FDS: usize = 1024;

/// The prefix that names an fd set instead of a file.
pub const FDSET_PREFIX: &str = "/dev/fdset/";

/// Errors of the fd commands, worded as QEMU words them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FdError {
    /// `getfd`/`add-fd` without an fd.
    #[error("No file descriptor supplied via SCM_RIGHTS")]
    NoneSupplied,
    /// `getfd` with a name that starts with a digit.
    #[error("Parameter 'fdname' expects a name not starting with a digit")]
    NameStartsWithDigit,
    /// `closefd` of an unknown name.
    #[error("File descriptor named '{0}' not found")]
    NotFound(String),
    /// An `fd=NAME` consumer named an unknown fd.
    #[error("File descriptor named '{0}' has not been found")]
    NotFoundForUse(String),
    /// The session already names [`MAX_NAMED_FDS`] fds.
    #[error("Too many named file descriptors in this session (at most {MAX_NAMED_FDS}); close some with 'closefd'")]
    TooManyNamed,
    /// The fd sets already hold [`MAX_SET_FDS`] fds.
    #[error("Too many file descriptors in fd sets (at most {MAX_SET_FDS}); remove some with 'remove-fd'")]
    TooManyInSets,
    /// `add-fd` with a negative set id.
    #[error("Parameter 'fdset-id' expects a non-negative value")]
    NegativeSetId,
    /// `remove-fd` of a set or fd that does not exist.
    #[error("File descriptor named '{}' not found", set_fd_name(*set, *fd))]
    NotInSet {
        /// The set id asked for.
        set: i64,
        /// The fd number asked for, if any.
        fd: Option<i64>,
    },
    /// Duplicating a named fd failed.
    #[error("cannot duplicate file descriptor '{name}': {errno}")]
    Dup {
        /// The name.
        name: String,
        /// `errno` (the error is kept comparable).
        errno: i32,
    },
}

fn set_fd_name(set: i64, fd: Option<i64>) -> String {
    match fd {
        Some(fd) => format!("fdset-id:{set}, fd:{fd}"),
        None => format!("fdset-id:{set}"),
    }
}

fn starts_with_digit(name: &str) -> bool {
    name.as_bytes().first().is_some_and(u8::is_ascii_digit)
}

/// `F_DUPFD_CLOEXEC`: a new close-on-exec fd for the same open file description.
pub fn dup_cloexec(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    // std's try_clone_to_owned is F_DUPFD_CLOEXEC (with a lowest number of 3).
    fd.try_clone_to_owned()
}

/// One session's fds.
#[derive(Debug, Default)]
pub struct SessionFds {
    /// Received with the command being run (or just ahead of it).
    pending: Vec<OwnedFd>,
    /// Named by `getfd`.
    named: BTreeMap<String, OwnedFd>,
}

impl SessionFds {
    /// Gives the command about to run the fds that came with it, closing any left over.
    pub fn offer(&mut self, fds: Vec<OwnedFd>) {
        self.pending = fds;
    }

    /// Takes every fd received for the current command (the session closes what is left after
    /// each command).
    pub fn take_pending(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.pending)
    }

    /// Takes the first fd received for the current command and closes the others, as QEMU's
    /// `qemu_chr_fe_get_msgfd` does.
    pub fn take_received(&mut self) -> Option<OwnedFd> {
        let mut fds = self.take_pending().into_iter();
        fds.next()
    }

    /// How many fds wait for the current command.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// `getfd NAME`: names the fd received with the command. Returns the fd the name stood for
    /// before, if any, for the caller to close (outside any lock).
    pub fn getfd(&mut self, name: &str) -> Result<Option<OwnedFd>, FdError> {
        let fd = self.take_received().ok_or(FdError::NoneSupplied)?;
        self.name_fd(name, fd)
    }

    /// Names `fd` (closing it if the name is not valid); returns the fd the name stood for.
    pub fn name_fd(&mut self, name: &str, fd: OwnedFd) -> Result<Option<OwnedFd>, FdError> {
        if starts_with_digit(name) {
            drop(fd);
            return Err(FdError::NameStartsWithDigit);
        }
        if !self.named.contains_key(name) && self.named.len() >= MAX_NAMED_FDS {
            drop(fd);
            return Err(FdError::TooManyNamed);
        }
        Ok(self.named.insert(name.to_string(), fd))
    }

    /// `closefd NAME`: forgets the name and returns its fd for the caller to close.
    pub fn closefd(&mut self, name: &str) -> Result<OwnedFd, FdError> {
        self.named
            .remove(name)
            .ok_or_else(|| FdError::NotFound(name.to_string()))
    }

    /// For an `fd=NAME` consumer (a tap `netdev`, say): takes the named fd out of the session,
    /// as QEMU's `monitor_get_fd` does (the name is gone afterwards; the consumer owns the fd).
    pub fn take_named(&mut self, name: &str) -> Result<OwnedFd, FdError> {
        self.named
            .remove(name)
            .ok_or_else(|| FdError::NotFoundForUse(name.to_string()))
    }

    /// For a consumer that must leave the name in place: a close-on-exec duplicate of the named
    /// fd.
    pub fn dup_named(&self, name: &str) -> Result<OwnedFd, FdError> {
        let fd = self
            .named
            .get(name)
            .ok_or_else(|| FdError::NotFoundForUse(name.to_string()))?;
        dup_cloexec(fd.as_fd()).map_err(|e| FdError::Dup {
            name: name.to_string(),
            errno: e.raw_os_error().unwrap_or(0),
        })
    }

    /// The names in use, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.named.keys().map(String::as_str)
    }
}

/// What `add-fd` answers: the set and the fd's number in the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddedFd {
    /// The set the fd went into.
    pub fdset_id: i64,
    /// The fd number.
    pub fd: RawFd,
}

/// One fd of a set as `query-fdsets` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdInfo {
    /// The fd number in the monitor.
    pub fd: RawFd,
    /// The client's description.
    pub opaque: Option<String>,
}

/// One set as `query-fdsets` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdsetInfo {
    /// The set id.
    pub fdset_id: i64,
    /// Its fds, oldest first.
    pub fds: Vec<FdInfo>,
}

/// How a file is to be opened (the part of the open flags fd sets care about).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `O_RDONLY`.
    ReadOnly,
    /// `O_WRONLY`.
    WriteOnly,
    /// `O_RDWR`.
    ReadWrite,
}

impl Access {
    /// The `O_ACCMODE` bits.
    pub fn flags(self) -> libc::c_int {
        match self {
            Access::ReadOnly => libc::O_RDONLY,
            Access::WriteOnly => libc::O_WRONLY,
            Access::ReadWrite => libc::O_RDWR,
        }
    }

    /// The access mode of open flags.
    pub fn from_flags(flags: libc::c_int) -> Option<Self> {
        match flags & libc::O_ACCMODE {
            libc::O_RDONLY => Some(Access::ReadOnly),
            libc::O_WRONLY => Some(Access::WriteOnly),
            libc::O_RDWR => Some(Access::ReadWrite),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Access::ReadOnly => "read-only",
            Access::WriteOnly => "write-only",
            Access::ReadWrite => "read-write",
        }
    }
}

/// An open request: access mode, and for ordinary paths whether to create (mode 0666 less the
/// umask) and truncate. `/dev/fdset/N` honours `truncate` (with `ftruncate`, as QEMU does) and
/// ignores `create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenSpec {
    /// The access mode.
    pub access: Access,
    /// `O_CREAT`.
    pub create: bool,
    /// `O_TRUNC`.
    pub truncate: bool,
}

impl OpenSpec {
    /// `O_RDONLY`: kernels, initrds.
    pub const READ: OpenSpec = OpenSpec {
        access: Access::ReadOnly,
        create: false,
        truncate: false,
    };
    /// `O_WRONLY | O_CREAT | O_TRUNC`: a `file:` chardev, as QEMU opens it.
    pub const WRITE_TRUNCATE: OpenSpec = OpenSpec {
        access: Access::WriteOnly,
        create: true,
        truncate: true,
    };
}

/// Why [`FdSets::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `/dev/fdset/` followed by something that is not a set number.
    #[error("Could not parse fdset {0}")]
    BadFdsetPath(String),
    /// No such set.
    #[error("fd set {0} does not exist")]
    NoSuchSet(i64),
    /// The set holds no fd with the access mode asked for.
    #[error("fd set {set} holds no file descriptor opened {}", access.describe())]
    NoMatchingAccess {
        /// The set.
        set: i64,
        /// The access asked for.
        access: Access,
    },
    /// The set's fd is `O_SYNC` and the open did not ask for it (QEMU refuses this too).
    #[error("fd set {0}: the file descriptor is O_SYNC, the open is not")]
    SyncMismatch(i64),
    /// A system call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl OpenError {
    /// The `errno` QEMU's `qemu_open` would leave for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            OpenError::BadFdsetPath(_) | OpenError::SyncMismatch(_) => libc::EINVAL,
            OpenError::NoSuchSet(_) => libc::ENOENT,
            OpenError::NoMatchingAccess { .. } => libc::EACCES,
            OpenError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Parses the set number of `/dev/fdset/N` the way QEMU's `qemu_parse_fd` does (decimal,
/// 0..=INT_MAX). `None` if `path` does not name a set at all; `Some(Err)` if it is malformed.
pub fn parse_fdset_path(path: &str) -> Option<Result<i64, OpenError>> {
    let rest = path.strip_prefix(FDSET_PREFIX)?;
    // strtol accepts leading white space and a sign.
    let digits = rest.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    let ok = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    Some(
        ok.then(|| digits.parse::<i64>().ok())
            .flatten()
            .filter(|n| *n <= i64::from(i32::MAX))
            .ok_or_else(|| OpenError::BadFdsetPath(path.to_string())),
    )
}

#[derive(Debug)]
struct SetFd {
    fd: OwnedFd,
    opaque: Option<String>,
}

#[derive(Debug, Default)]
struct FdSet {
    /// Oldest first.
    fds: Vec<SetFd>,
    /// Duplicates made from this set and still open.
    dups: BTreeSet<u64>,
}

impl FdSet {
    fn is_dead(&self) -> bool {
        self.fds.is_empty() && self.dups.is_empty()
    }
}

#[derive(Debug, Default)]
struct SetsInner {
    sets: BTreeMap<i64, FdSet>,
    next_dup: u64,
}

/// The fd sets every session shares.
#[derive(Debug, Default)]
pub struct FdSets {
    inner: Mutex<SetsInner>,
}

impl FdSets {
    fn lock(&self) -> MutexGuard<'_, SetsInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `add-fd`: puts `fd` in set `fdset_id` (created if needed) or, without an id, in a new set
    /// with the lowest unused id. On error `fd` is closed.
    pub fn add(
        &self,
        fd: OwnedFd,
        fdset_id: Option<i64>,
        opaque: Option<String>,
    ) -> Result<AddedFd, FdError> {
        let mut inner = self.lock();
        if inner.sets.values().map(|s| s.fds.len()).sum::<usize>() >= MAX_SET_FDS {
            drop(inner);
            drop(fd);
            return Err(FdError::TooManyInSets);
        }
        let id = match fdset_id {
            Some(id) if id < 0 => {
                drop(inner);
                drop(fd);
                return Err(FdError::NegativeSetId);
            }
            Some(id) => id,
            None => {
                // Ids are kept sorted: the first gap in 0, 1, 2, ...
                let mut next = 0i64;
                for &used in inner.sets.keys() {
                    if used != next {
                        break;
                    }
                    next += 1;
                }
                next
            }
        };
        let raw = fd.as_raw_fd();
        inner
            .sets
            .entry(id)
            .or_default()
            .fds
            .push(SetFd { fd, opaque });
        Ok(AddedFd {
            fdset_id: id,
            fd: raw,
        })
    }

    /// `remove-fd`: closes fd `fd` of set `fdset_id`, or all its fds. A set left without fds
    /// and without open duplicates disappears.
    pub fn remove(&self, fdset_id: i64, fd: Option<i64>) -> Result<(), FdError> {
        let not_found = FdError::NotInSet { set: fdset_id, fd };
        let closed: Vec<SetFd>;
        {
            let mut inner = self.lock();
            let set = inner.sets.get_mut(&fdset_id).ok_or(not_found.clone())?;
            closed = match fd {
                Some(n) => {
                    let i = set
                        .fds
                        .iter()
                        .position(|f| i64::from(f.fd.as_raw_fd()) == n)
                        .ok_or(not_found)?;
                    vec![set.fds.remove(i)]
                }
                None => std::mem::take(&mut set.fds),
            };
            if set.is_dead() {
                inner.sets.remove(&fdset_id);
            }
        }
        // Closed outside the lock.
        drop(closed);
        Ok(())
    }

    /// `query-fdsets`: every set, highest id first (QEMU's order), fds oldest first.
    pub fn query(&self) -> Vec<FdsetInfo> {
        let inner = self.lock();
        inner
            .sets
            .iter()
            .rev()
            .map(|(&id, set)| FdsetInfo {
                fdset_id: id,
                fds: set
                    .fds
                    .iter()
                    .map(|f| FdInfo {
                        fd: f.fd.as_raw_fd(),
                        opaque: f.opaque.clone(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// How many duplicates of set `fdset_id` are open (0 for a set that does not exist).
    pub fn dup_count(&self, fdset_id: i64) -> usize {
        self.lock().sets.get(&fdset_id).map_or(0, |s| s.dups.len())
    }

    /// Opens `path` as `spec` asks. `/dev/fdset/N` gives a tracked duplicate of the newest fd
    /// of set N with the requested access mode; any other path is opened (close-on-exec).
    pub fn open(self: &Arc<Self>, path: &Path, spec: OpenSpec) -> Result<OpenedFile, OpenError> {
        if let Some(id) = path.to_str().and_then(parse_fdset_path) {
            let dup = self.dup_from_set(id?, spec)?;
            let (fd, lease) = dup.into_parts();
            return Ok(OpenedFile {
                file: File::from(fd),
                lease: Some(lease),
            });
        }
        let mut o = OpenOptions::new();
        match spec.access {
            Access::ReadOnly => o.read(true),
            Access::WriteOnly => o.write(true),
            Access::ReadWrite => o.read(true).write(true),
        };
        o.create(spec.create)
            .truncate(spec.truncate)
            .mode(0o666)
            .custom_flags(libc::O_CLOEXEC);
        Ok(OpenedFile {
            file: o.open(path)?,
            lease: None,
        })
    }

    /// QEMU's `monitor_fdset_dup_fd_add`: a close-on-exec duplicate of the newest fd of set
    /// `fdset_id` whose access mode is `spec.access`, registered with the set until dropped.
    pub fn dup_from_set(
        self: &Arc<Self>,
        fdset_id: i64,
        spec: OpenSpec,
    ) -> Result<SetDup, OpenError> {
        let mut inner = self.lock();
        let set = inner
            .sets
            .get(&fdset_id)
            .ok_or(OpenError::NoSuchSet(fdset_id))?;
        let mut chosen = None;
        for f in set.fds.iter().rev() {
            let flags = get_fl(f.fd.as_fd())?;
            if Access::from_flags(flags) == Some(spec.access) {
                chosen = Some((f.fd.as_fd(), flags));
                break;
            }
        }
        let (fd, flags) = chosen.ok_or(OpenError::NoMatchingAccess {
            set: fdset_id,
            access: spec.access,
        })?;
        // Bulkhead never asks for O_SYNC; QEMU refuses a mismatch either way.
        if flags & libc::O_SYNC == libc::O_SYNC {
            return Err(OpenError::SyncMismatch(fdset_id));
        }
        let dup = dup_cloexec(fd)?;
        if spec.truncate {
            // SAFETY: ftruncate on an fd we own, with a constant length.
            if unsafe { libc::ftruncate(dup.as_raw_fd(), 0) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        let id = inner.next_dup;
        inner.next_dup += 1;
        if let Some(set) = inner.sets.get_mut(&fdset_id) {
            set.dups.insert(id);
        }
        drop(inner);
        Ok(SetDup {
            fd: dup,
            lease: DupLease {
                sets: Arc::clone(self),
                fdset_id,
                id,
            },
        })
    }

    fn release(&self, fdset_id: i64, id: u64) {
        let mut inner = self.lock();
        if let Some(set) = inner.sets.get_mut(&fdset_id) {
            set.dups.remove(&id);
            if set.is_dead() {
                inner.sets.remove(&fdset_id);
            }
        }
    }

    /// `-add-fd fd=N,set=M[,opaque=S]`, in command-line order, with QEMU's checks: N must be
    /// above 2, open and inheritable (not close-on-exec), M non-negative. Each fd is duplicated
    /// into its set; once all are in, the inherited originals are closed. Call before the
    /// inherited fds are marked close-on-exec.
    pub fn add_inherited(&self, specs: &[crate::cli::AddFd]) -> Result<(), AddFdError> {
        for spec in specs {
            let bad = |reason: &str| AddFdError {
                spec: spec.text.clone(),
                reason: reason.to_string(),
            };
            // QEMU truncates the number to an int; a value beyond it is refused here instead.
            let fd = RawFd::try_from(spec.fd)
                .ok()
                .filter(|fd| *fd >= 0)
                .ok_or_else(|| bad("fd option is required and must be non-negative"))?;
            if fd <= libc::STDERR_FILENO {
                return Err(bad("fd cannot be a standard I/O stream"));
            }
            // SAFETY: F_GETFD on an integer; an unknown number fails with EBADF.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if flags < 0 || flags & libc::FD_CLOEXEC != 0 {
                return Err(bad("fd is not valid or already in use"));
            }
            if spec.set < 0 {
                return Err(bad("set option is required and must be non-negative"));
            }
            // SAFETY: F_DUPFD_CLOEXEC on an open fd; the result is a new fd we own.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(bad(&format!(
                    "error duplicating fd: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: fcntl just returned this fd; nothing else owns it.
            let dup = unsafe { OwnedFd::from_raw_fd(dup) };
            self.add(dup, Some(spec.set), spec.opaque.clone())
                .map_err(|e| bad(&e.to_string()))?;
        }
        for spec in specs {
            if let Ok(fd) = RawFd::try_from(spec.fd) {
                // An inherited fd the checks above proved open and not created by this process
                // (every fd Bulkhead opens is close-on-exec); a repeated number just fails.
                // SAFETY: its duplicate now lives in the set and nothing else uses the number.
                unsafe { libc::close(fd) };
            }
        }
        Ok(())
    }
}

fn get_fl(fd: BorrowedFd<'_>) -> std::io::Result<libc::c_int> {
    // SAFETY: F_GETFL on an fd the caller keeps open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(flags)
}

/// An `-add-fd` that QEMU's rules refuse; shown as `-add-fd SPEC: REASON`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("-add-fd {spec}: {reason}")]
pub struct AddFdError {
    /// The option's argument.
    pub spec: String,
    /// QEMU's message.
    pub reason: String,
}

/// Keeps a duplicate registered with its fd set: while it lives the set does not disappear,
/// even with all its fds removed. Dropping it unregisters the duplicate (and drops a set left
/// empty); keep it exactly as long as the duplicate's fd.
#[derive(Debug)]
pub struct DupLease {
    sets: Arc<FdSets>,
    fdset_id: i64,
    id: u64,
}

impl DupLease {
    /// The set the duplicate came from.
    pub fn fdset_id(&self) -> i64 {
        self.fdset_id
    }
}

impl Drop for DupLease {
    fn drop(&mut self) {
        self.sets.release(self.fdset_id, self.id);
    }
}

/// A duplicate of an fd-set fd, registered with the set until dropped.
#[derive(Debug)]
pub struct SetDup {
    // Field order: the fd is closed before the lease is released.
    fd: OwnedFd,
    lease: DupLease,
}

impl SetDup {
    /// The fd and the lease, for owners that keep them in different places.
    pub fn into_parts(self) -> (OwnedFd, DupLease) {
        (self.fd, self.lease)
    }
}

impl AsFd for SetDup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A file opened by [`FdSets::open`]: with a lease when it came from an fd set.
#[derive(Debug)]
pub struct OpenedFile {
    /// The open file (close-on-exec).
    pub file: File,
    /// Keeps an fd-set duplicate registered; `None` for an ordinary path.
    pub lease: Option<DupLease>,
}

impl OpenedFile {
    /// The file and its lease.
    pub fn into_parts(self) -> (File, Option<DupLease>) {
        (self.file, self.lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn scratch(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("bh-fds-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("dir");
        p
    }

    fn open(path: &Path, access: Access) -> OwnedFd {
        let mut o = OpenOptions::new();
        match access {
            Access::ReadOnly => o.read(true),
            Access::WriteOnly => o.write(true),
            Access::ReadWrite => o.read(true).write(true),
        };
        o.create(access != Access::ReadOnly)
            .open(path)
            .expect("open")
            .into()
    }

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD on an integer.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn getfd_naming_rules_and_reuse() {
        let dir = scratch("names");
        let p = dir.join("f");
        std::fs::write(&p, b"x").expect("write");
        let mut s = SessionFds::default();
        assert_eq!(s.getfd("a").err(), Some(FdError::NoneSupplied));
        s.offer(vec![open(&p, Access::ReadOnly)]);
        let raw = s.pending[0].as_raw_fd();
        assert_eq!(s.getfd("1a").err(), Some(FdError::NameStartsWithDigit));
        assert!(!is_open(raw), "a refused fd is closed");
        for name in ["", " x", "-1", "é"] {
            s.offer(vec![open(&p, Access::ReadOnly)]);
            assert_eq!(s.getfd(name).map(|o| o.is_none()), Ok(true), "{name:?}");
        }
        // Two fds: the first is named, the second closed.
        let (a, b) = (open(&p, Access::ReadOnly), open(&p, Access::ReadOnly));
        let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
        s.offer(vec![a, b]);
        assert!(s.getfd("two").expect("getfd").is_none());
        assert!(is_open(ra) && !is_open(rb));
        // Re-use hands back the old fd.
        s.offer(vec![open(&p, Access::ReadOnly)]);
        let old = s.getfd("two").expect("getfd").expect("old fd");
        assert_eq!(old.as_raw_fd(), ra);
        drop(old);
        assert!(s.closefd("two").is_ok());
        assert_eq!(
            s.closefd("two").map(drop),
            Err(FdError::NotFound("two".into()))
        );
        assert_eq!(
            FdError::NotFound("two".into()).to_string(),
            "File descriptor named 'two' not found"
        );
        // fd=NAME consumers.
        s.offer(vec![open(&p, Access::ReadOnly)]);
        s.getfd("tap").expect("getfd");
        let d = s.dup_named("tap").expect("dup");
        assert!(s.names().any(|n| n == "tap"));
        drop(d);
        let t = s.take_named("tap").expect("take");
        assert!(!s.names().any(|n| n == "tap"));
        drop(t);
        assert_eq!(
            s.take_named("tap").map(drop).expect_err("gone").to_string(),
            "File descriptor named 'tap' has not been found"
        );
        // A session names at most MAX_NAMED_FDS fds; re-using a name still works at the limit.
        let mut full = SessionFds::default();
        for i in 0..MAX_NAMED_FDS {
            full.offer(vec![open(&p, Access::ReadOnly)]);
            full.getfd(&format!("n{i}")).expect("getfd");
        }
        let f = open(&p, Access::ReadOnly);
        let raw = f.as_raw_fd();
        full.offer(vec![f]);
        assert_eq!(full.getfd("more").err(), Some(FdError::TooManyNamed));
        assert!(!is_open(raw), "the refused fd is closed");
        full.offer(vec![open(&p, Access::ReadOnly)]);
        assert!(full.getfd("n0").expect("re-use").is_some());
        drop(full);
        // The fd sets hold at most MAX_SET_FDS fds in all.
        let sets = FdSets::default();
        for i in 0..MAX_SET_FDS {
            sets.add(open(&p, Access::ReadOnly), Some((i % 7) as i64), None)
                .expect("add");
        }
        assert_eq!(
            sets.add(open(&p, Access::ReadOnly), None, None).err(),
            Some(FdError::TooManyInSets)
        );
        sets.remove(0, None).expect("remove");
        sets.add(open(&p, Access::ReadOnly), None, None)
            .expect("room again");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn set_ids_and_removal() {
        let dir = scratch("sets");
        let p = dir.join("f");
        std::fs::write(&p, b"x").expect("write");
        let sets = Arc::new(FdSets::default());
        let a = sets
            .add(open(&p, Access::ReadOnly), None, None)
            .expect("add");
        assert_eq!(a.fdset_id, 0);
        let b = sets
            .add(open(&p, Access::ReadOnly), Some(2), Some("two".into()))
            .expect("add");
        assert_eq!(b.fdset_id, 2);
        assert_eq!(
            sets.add(open(&p, Access::ReadOnly), None, None)
                .expect("add")
                .fdset_id,
            1
        );
        assert_eq!(
            sets.add(open(&p, Access::ReadOnly), None, None)
                .expect("add")
                .fdset_id,
            3
        );
        assert_eq!(
            sets.add(open(&p, Access::ReadOnly), Some(-1), None),
            Err(FdError::NegativeSetId)
        );
        let q = sets.query();
        assert_eq!(
            q.iter().map(|s| s.fdset_id).collect::<Vec<_>>(),
            vec![3, 2, 1, 0]
        );
        assert_eq!(q[1].fds[0].opaque.as_deref(), Some("two"));
        assert_eq!(
            sets.remove(2, Some(i64::from(a.fd))),
            Err(FdError::NotInSet {
                set: 2,
                fd: Some(i64::from(a.fd))
            })
        );
        assert_eq!(
            FdError::NotInSet {
                set: 9,
                fd: Some(3)
            }
            .to_string(),
            "File descriptor named 'fdset-id:9, fd:3' not found"
        );
        assert_eq!(
            FdError::NotInSet { set: 9, fd: None }.to_string(),
            "File descriptor named 'fdset-id:9' not found"
        );
        sets.remove(0, Some(i64::from(a.fd))).expect("remove");
        assert!(!is_open(a.fd));
        assert_eq!(sets.query().len(), 3);
        // The freed id is the lowest again.
        assert_eq!(
            sets.add(open(&p, Access::ReadOnly), None, None)
                .expect("add")
                .fdset_id,
            0
        );
        for id in 0..4 {
            sets.remove(id, None).expect("remove all");
        }
        assert!(sets.query().is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn open_picks_the_access_mode_and_tracks_the_dup() {
        let dir = scratch("open");
        let p = dir.join("f");
        std::fs::write(&p, b"content").expect("write");
        let sets = Arc::new(FdSets::default());
        let ro = sets
            .add(open(&p, Access::ReadOnly), Some(5), None)
            .expect("add");
        let wo = sets
            .add(open(&p, Access::WriteOnly), Some(5), None)
            .expect("add");
        let path = Path::new("/dev/fdset/5");
        // Read-only: the O_RDONLY fd; its duplicate reads the file.
        let r = sets.open(path, OpenSpec::READ).expect("open ro");
        assert_ne!(r.file.as_raw_fd(), ro.fd);
        let flags = get_fl(r.file.as_fd()).expect("flags");
        assert_eq!(Access::from_flags(flags), Some(Access::ReadOnly));
        // SAFETY: F_GETFD on an fd we own.
        let fd_flags = unsafe { libc::fcntl(r.file.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        let mut s = String::new();
        (&r.file).read_to_string(&mut s).expect("read");
        assert_eq!(s, "content");
        assert_eq!(sets.dup_count(5), 1);
        // No read-write fd in the set: EACCES, as QEMU.
        let e = sets
            .open(
                path,
                OpenSpec {
                    access: Access::ReadWrite,
                    create: false,
                    truncate: false,
                },
            )
            .expect_err("no rdwr fd");
        assert_eq!(e.errno(), libc::EACCES);
        assert_eq!(
            e.to_string(),
            "fd set 5 holds no file descriptor opened read-write"
        );
        // Write with truncation: the O_WRONLY fd, truncated like open(O_TRUNC).
        let w = sets.open(path, OpenSpec::WRITE_TRUNCATE).expect("open wo");
        assert_eq!(
            Access::from_flags(get_fl(w.file.as_fd()).expect("flags")),
            Some(Access::WriteOnly)
        );
        (&w.file).write_all(b"new").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"new");
        // The newest matching fd wins.
        let ro2 = sets
            .add(open(&p, Access::ReadOnly), Some(5), None)
            .expect("add");
        let r2 = sets.dup_from_set(5, OpenSpec::READ).expect("dup");
        // Same open file description: a seek on one moves the other.
        let same = |a: BorrowedFd<'_>, b: RawFd| {
            // SAFETY: lseek on fds we own.
            unsafe { libc::lseek(b, 3, libc::SEEK_SET) };
            // SAFETY: as above.
            let pos = unsafe { libc::lseek(a.as_raw_fd(), 0, libc::SEEK_CUR) };
            // SAFETY: as above.
            unsafe { libc::lseek(b, 0, libc::SEEK_SET) };
            pos == 3
        };
        assert!(same(r2.as_fd(), ro2.fd), "dup of the newest read-only fd");
        assert_eq!(sets.dup_count(5), 3);
        // Removing every fd leaves the set alive while dups are open...
        sets.remove(5, None).expect("remove");
        assert!(!is_open(ro.fd) && !is_open(wo.fd) && !is_open(ro2.fd));
        let q = sets.query();
        assert_eq!(q.len(), 1);
        assert!(q[0].fds.is_empty());
        // ...an open of it finds no fd, and remove-fd NAMING an fd fails, without one succeeds.
        assert!(matches!(
            sets.open(path, OpenSpec::READ),
            Err(OpenError::NoMatchingAccess { .. })
        ));
        assert!(sets.remove(5, Some(3)).is_err());
        sets.remove(5, None).expect("remove on empty set");
        // ...and add-fd without an id does not reuse its id.
        assert_eq!(
            sets.add(open(&p, Access::ReadOnly), None, None)
                .expect("add")
                .fdset_id,
            0
        );
        drop(r);
        drop(w);
        assert_eq!(sets.query().len(), 2);
        drop(r2);
        assert_eq!(
            sets.query().iter().map(|s| s.fdset_id).collect::<Vec<_>>(),
            vec![0]
        );
        // Unknown and malformed sets.
        let e = sets
            .open(Path::new("/dev/fdset/7"), OpenSpec::READ)
            .expect_err("none");
        assert_eq!(e.errno(), libc::ENOENT);
        for bad in [
            "/dev/fdset/",
            "/dev/fdset/x",
            "/dev/fdset/-1",
            "/dev/fdset/2147483648",
        ] {
            let e = sets
                .open(Path::new(bad), OpenSpec::READ)
                .expect_err("malformed");
            assert_eq!(e.to_string(), format!("Could not parse fdset {bad}"));
        }
        assert_eq!(
            parse_fdset_path("/dev/fdset/ +12").map(|r| r.ok()),
            Some(Some(12))
        );
        assert!(parse_fdset_path("/dev/fdsets/1").is_none());
        // Ordinary paths are opened.
        let f = sets.open(&p, OpenSpec::READ).expect("plain open");
        assert!(f.lease.is_none());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
