//! Static facts about the configured machine that query commands report (`query-name`,
//! `query-uuid`, `query-kvm`, `query-chardev`, ...): fixed at start-up, shared by every session.

/// What the configuration says about the machine.
#[derive(Debug, Clone, Default)]
pub struct MachineInfo {
    /// `-name`.
    pub name: Option<String>,
    /// `-uuid`, canonical lower-case form.
    pub uuid: Option<String>,
    /// A guest runs (false for `-M none`).
    pub has_guest: bool,
    /// `/dev/kvm` was opened for the guest.
    pub kvm_present: bool,
}
