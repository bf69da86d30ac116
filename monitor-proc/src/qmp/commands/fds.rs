//! The fd commands: `getfd`, `closefd`, `add-fd`, `remove-fd`, `query-fdsets`.

use super::Command;

pub(super) static COMMANDS: &[Command] = &[];
