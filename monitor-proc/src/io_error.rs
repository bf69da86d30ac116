//! Host I/O errors of the disks, the monitor's side of `werror`/`rerror` (QEMU's
//! `BlockdevOnError`): how the options are spelled and checked, which policy a device's
//! `bulkhead-blockd` is given, the I/O status `query-block` reports, and the `BLOCK_IO_ERROR`
//! event's data. The run-state change the `stop` action causes is the VM actor's
//! ([`crate::vm`]); blockd decides the action per failed request and holds the request when
//! it is `stop` (`BlockEvent::IoError`, `BlockRequest::Resume`).
//!
//! QEMU 7.2's rules, as `blockdev.c`, `hw/block/block.c` and `block/block-backend.c` have them:
//! - `-drive werror=` takes `ignore`, `enospc`, `stop`, `report` (default `enospc`);
//!   `-drive rerror=` the same but `enospc` (default `report`); anything else is
//!   `'X' invalid write error action` / `'X' invalid read error action`.
//! - `-device virtio-blk-pci,werror=,rerror=` (and `device_add`) take the whole enum plus
//!   `auto` (the default): `auto` keeps the backend's setting (the `-drive`'s, or `blk_new`'s
//!   `report`/`enospc` for the anonymous backend of a device on a `-blockdev` node); anything
//!   else is `Parameter 'werror' does not accept value 'X'`.
//! - A `stop` action first sets the backend's I/O status (`failed`, or `nospace` for ENOSPC)
//!   if it is `ok`, then sends `BLOCK_IO_ERROR`, then stops the VM (`io-error`, STOP). `report`
//!   and `ignore` send the event and leave the status alone. `cont` resets every status.

use bulkhead_ipc::messages::{ErrorAction, ErrorPolicy};

/// A backend's I/O status (QEMU's `BlockDeviceIoStatus`, `query-block`'s `io-status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoStatus {
    /// No error since the last `cont`.
    #[default]
    Ok,
    /// A request failed and the VM was stopped for it.
    Failed,
    /// A request failed with ENOSPC and the VM was stopped for it.
    Nospace,
}

impl IoStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }

    /// The status after an error whose action was `action` (QEMU's `blk_iostatus_set_err`,
    /// called for `stop` only): the first error since `cont` sticks.
    pub fn after_error(self, action: ErrorAction, nospace: bool) -> IoStatus {
        match (self, action) {
            (IoStatus::Ok, ErrorAction::Stop) if nospace => IoStatus::Nospace,
            (IoStatus::Ok, ErrorAction::Stop) => IoStatus::Failed,
            (s, _) => s,
        }
    }
}

/// `-drive werror=`/`rerror=` (`read`: `rerror`), with QEMU's text for a bad value.
pub fn drive_policy(value: &str, read: bool) -> Result<ErrorPolicy, String> {
    match ErrorPolicy::from_name(value) {
        Some(ErrorPolicy::Enospc) if read => {}
        Some(p) => return Ok(p),
        None => {}
    }
    Err(format!(
        "'{value}' invalid {} error action",
        if read { "read" } else { "write" }
    ))
}

/// `-device virtio-blk-pci,werror=`/`rerror=` (`key` is which): `None` for `auto`, with QEMU's
/// text for a bad value.
pub fn device_policy(key: &str, value: &str) -> Result<Option<ErrorPolicy>, String> {
    if value == "auto" {
        return Ok(None);
    }
    ErrorPolicy::from_name(value)
        .map(Some)
        .ok_or_else(|| format!("Parameter '{key}' does not accept value '{value}'"))
}

/// QEMU's defaults for a backend (`blk_new`, and `-drive` without the options): (rerror, werror).
pub const BACKEND_DEFAULT: (ErrorPolicy, ErrorPolicy) = (ErrorPolicy::Report, ErrorPolicy::Enospc);

/// The policy a device applies: its own unless `auto` (QEMU's `blkconf_apply_backend_options`).
pub fn effective(backend: ErrorPolicy, device: Option<ErrorPolicy>) -> ErrorPolicy {
    device.unwrap_or(backend)
}

/// One `BLOCK_IO_ERROR` (QEMU 7.2's members).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIoError {
    /// The backend's name (the `-drive` id; "" for a device's anonymous backend).
    pub device: String,
    /// The backend's root node.
    pub node_name: Option<String>,
    /// A write (`werror`) rather than a read.
    pub write: bool,
    /// What was done.
    pub action: ErrorAction,
    /// The error was ENOSPC. QEMU sends `nospace` when the backend keeps an I/O status, which
    /// every virtio-blk device's does.
    pub nospace: bool,
    /// `strerror` of the error.
    pub reason: String,
}

impl BlockIoError {
    /// `operation`: `read` or `write` (QEMU's `IoOperationType`).
    pub fn operation(&self) -> &'static str {
        if self.write {
            "write"
        } else {
            "read"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_values_follow_qemu() {
        for (v, p) in [
            ("report", ErrorPolicy::Report),
            ("ignore", ErrorPolicy::Ignore),
            ("stop", ErrorPolicy::Stop),
            ("enospc", ErrorPolicy::Enospc),
        ] {
            assert_eq!(drive_policy(v, false), Ok(p));
        }
        assert_eq!(drive_policy("stop", true), Ok(ErrorPolicy::Stop));
        assert_eq!(
            drive_policy("enospc", true),
            Err("'enospc' invalid read error action".into())
        );
        assert_eq!(
            drive_policy("auto", false),
            Err("'auto' invalid write error action".into())
        );
        assert_eq!(
            drive_policy("", false),
            Err("'' invalid write error action".into())
        );
        assert_eq!(
            drive_policy("STOP", true),
            Err("'STOP' invalid read error action".into())
        );
    }

    #[test]
    fn device_values_follow_qemu() {
        assert_eq!(device_policy("werror", "auto"), Ok(None));
        assert_eq!(
            device_policy("rerror", "enospc"),
            Ok(Some(ErrorPolicy::Enospc))
        );
        assert_eq!(
            device_policy("werror", "foo"),
            Err("Parameter 'werror' does not accept value 'foo'".into())
        );
        assert_eq!(effective(ErrorPolicy::Stop, None), ErrorPolicy::Stop);
        assert_eq!(
            effective(ErrorPolicy::Stop, Some(ErrorPolicy::Ignore)),
            ErrorPolicy::Ignore
        );
    }

    #[test]
    fn the_first_stopping_error_sets_the_status_and_sticks() {
        use ErrorAction::*;
        assert_eq!(IoStatus::Ok.after_error(Report, true), IoStatus::Ok);
        assert_eq!(IoStatus::Ok.after_error(Ignore, false), IoStatus::Ok);
        assert_eq!(IoStatus::Ok.after_error(Stop, true), IoStatus::Nospace);
        assert_eq!(IoStatus::Ok.after_error(Stop, false), IoStatus::Failed);
        assert_eq!(IoStatus::Failed.after_error(Stop, true), IoStatus::Failed);
        assert_eq!(
            IoStatus::Nospace.after_error(Stop, false),
            IoStatus::Nospace
        );
        assert_eq!(IoStatus::default().as_str(), "ok");
    }
}
