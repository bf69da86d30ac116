//! Introspection and machine queries: `query-commands`, `query-events`, `query-qmp-schema`, `query-name`, `query-uuid`, `query-kvm`, `query-cpus`, `query-cpus-fast`, `query-chardev`, `query-command-line-options`.

use super::Command;

pub(super) static COMMANDS: &[Command] = &[];
