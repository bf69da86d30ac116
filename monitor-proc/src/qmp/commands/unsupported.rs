//! Commands of QEMU's QMP reference that Bulkhead knows and deliberately does not implement,
//! each with the reason given to a client that calls it. They are not listed by
//! `query-commands` or `query-qmp-schema` (a management stack probes those to learn what
//! exists), and calling one answers `CommandNotFound` with a description that says the command
//! is not supported and why, rather than QEMU's bare "has not been found".
//!
//! `docs/QMP.md` accounts for every command of the reference documents; a test keeps that table
//! and this list in agreement with the registry.

/// `(command, reason)`, sorted by command.
pub const UNSUPPORTED: &[(&str, &str)] = &[];

/// Why `name` is not supported, if it is one of [`UNSUPPORTED`].
pub fn reason(name: &str) -> Option<&'static str> {
    UNSUPPORTED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
}
