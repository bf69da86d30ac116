//! `human-monitor-command`: the HMP subset, each HMP command mapped onto its QMP twin.

use super::Command;

pub(super) static COMMANDS: &[Command] = &[];
