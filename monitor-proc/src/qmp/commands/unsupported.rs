//! Commands of QEMU's QMP reference that Bulkhead knows and deliberately does not implement,
//! each with the reason given to a client that calls it. They are not listed by
//! `query-commands` or `query-qmp-schema` (a management stack probes those to learn what
//! exists), and calling one answers `CommandNotFound` with a description that says the command
//! is not supported and why, rather than QEMU's bare "has not been found".
//!
//! Two kinds of reasons, told apart by how they begin: "not implemented yet: ..." for a command
//! Bulkhead may implement later (block and net commands arrive with blockd and netd; migration,
//! dumps and the like are not planned yet), and a plain statement of what Bulkhead lacks for one
//! it will not implement (display, Xen, COLO, rocker, TPM, QOM, ...).
//!
//! `docs/QMP.md` accounts for every command of the reference documents; a test
//! (`tests/qmp_doc.rs`) keeps that table and this list in agreement with the registry.

/// CPU hot-plug.
const CPUHP: &str = "Bulkhead has no CPU hot-plug: the vCPUs are fixed by -smp at start";

/// Display, VNC and SPICE.
const DISPLAY: &str = "Bulkhead has no display: no graphics device, no VNC and no SPICE";

/// Guest memory dumps: not planned.
const DUMP: &str = "not implemented yet: guest memory dumps are not planned yet";

/// Keyboard, mouse and tablet input.
const INPUT: &str =
    "Bulkhead has no keyboard, mouse or tablet device (its i8042 only implements the reset line)";

/// Block jobs: beyond issue 5, not planned.
const JOBS: &str =
    "not implemented yet: block jobs (stream, commit, mirror, backup) are not planned yet";

/// Removable media (trays, CD-ROM, floppy).
const MEDIA: &str =
    "Bulkhead has no removable media: its disks are virtio-blk, with no tray and no medium to change (no CD-ROM or floppy emulation)";

/// Migration: not planned.
const MIG: &str = "not implemented yet: Bulkhead cannot migrate a VM (not planned yet)";

/// NBD export: not planned.
const NBD: &str = "not implemented yet: Bulkhead has no NBD server (not planned yet)";

/// The QOM object tree.
const QOM: &str = "Bulkhead has no QOM object tree to list, read or write";

/// The rocker switch device.
const ROCKER: &str = "Bulkhead has no rocker switch device";

/// Snapshots, dirty bitmaps and `transaction`: not planned.
const SNAP: &str = "not implemented yet: disk snapshots and dirty bitmaps are not planned yet";

/// TPM devices.
const TPM: &str = "Bulkhead has no TPM device";

/// QEMU trace events.
const TRACE: &str = "Bulkhead has no QEMU trace events (it logs through BULKHEAD_LOG instead)";

/// Xen.
const XEN: &str = "Bulkhead is a KVM-only VMM; Xen is not supported";

/// `(command, reason)`, sorted by command.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    ("add_client", DISPLAY),
    (
        "balloon",
        "not implemented yet: Bulkhead has no balloon device (not planned yet)",
    ),
    ("block-commit", JOBS),
    ("block-dirty-bitmap-clear", SNAP),
    ("block-job-cancel", JOBS),
    ("block-job-complete", JOBS),
    ("block-job-pause", JOBS),
    ("block-job-resume", JOBS),
    ("block-job-set-speed", JOBS),
    ("block-stream", JOBS),
    (
        "block_passwd",
        "password-encrypted images are not supported (QEMU dropped this command too)",
    ),
    ("blockdev-backup", JOBS),
    ("blockdev-change-medium", MEDIA),
    ("blockdev-close-tray", MEDIA),
    ("blockdev-mirror", JOBS),
    ("blockdev-open-tray", MEDIA),
    ("blockdev-snapshot-delete-internal-sync", SNAP),
    ("blockdev-snapshot-internal-sync", SNAP),
    ("blockdev-snapshot-sync", SNAP),
    (
        "change",
        "Bulkhead has neither removable media (its disks are virtio-blk) nor VNC, the two things this command changes",
    ),
    ("change-backing-file", SNAP),
    ("change-vnc-password", DISPLAY),
    (
        "chardev-add",
        "not implemented yet: character devices can only be created on the command line",
    ),
    (
        "chardev-remove",
        "not implemented yet: character devices can only be created on the command line",
    ),
    ("client_migrate_info", DISPLAY),
    (
        "cpu",
        "selecting a default CPU is an HMP notion; pass cpu-index to human-monitor-command instead",
    ),
    ("cpu-add", CPUHP),
    (
        "device-list-properties",
        "not implemented yet: not planned yet (no device models to describe)",
    ),
    ("drive-backup", JOBS),
    ("drive-mirror", JOBS),
    ("dump-guest-memory", DUMP),
    ("eject", MEDIA),
    ("expire_password", DISPLAY),
    (
        "inject-nmi",
        "not implemented yet: NMI injection is not planned yet",
    ),
    (
        "memsave",
        "not implemented yet: saving guest virtual memory to a file is not planned yet",
    ),
    ("migrate", MIG),
    ("migrate-incoming", MIG),
    ("migrate-set-cache-size", MIG),
    ("migrate-set-capabilities", MIG),
    ("migrate_cancel", MIG),
    ("migrate_set_downtime", MIG),
    ("migrate_set_speed", MIG),
    ("nbd-server-add", NBD),
    ("nbd-server-start", NBD),
    ("nbd-server-stop", NBD),
    (
        "object-add",
        "not implemented yet: Bulkhead has no user-creatable objects (not planned yet)",
    ),
    (
        "object-del",
        "not implemented yet: Bulkhead has no user-creatable objects (not planned yet)",
    ),
    (
        "pmemsave",
        "not implemented yet: saving guest physical memory to a file is not planned yet",
    ),
    ("qom-get", QOM),
    ("qom-list", QOM),
    ("qom-list-types", QOM),
    ("qom-set", QOM),
    (
        "query-acpi-ospm-status",
        "not implemented yet: Bulkhead has no ACPI hot-plug",
    ),
    (
        "query-balloon",
        "not implemented yet: Bulkhead has no balloon device (not planned yet)",
    ),
    ("query-block-jobs", JOBS),
    (
        "query-chardev-backends",
        "not implemented yet: not planned yet (the back ends are those of -serial: stdio, file, unix, null, none)",
    ),
    (
        "query-cpu-definitions",
        "not implemented yet: not planned yet (Bulkhead has no named CPU models; vCPUs get the host's CPUID)",
    ),
    ("query-dump", DUMP),
    ("query-dump-guest-memory-capability", DUMP),
    (
        "query-gic-capabilities",
        "the GIC is an ARM interrupt controller; Bulkhead runs x86_64 guests only",
    ),
    ("query-hotpluggable-cpus", CPUHP),
    (
        "query-iothreads",
        "Bulkhead has no iothread objects: each device back end is a process of its own",
    ),
    (
        "query-machines",
        "not implemented yet: not planned yet (the machines are 'bulkhead' and 'none', see -machine help)",
    ),
    (
        "query-memdev",
        "not implemented yet: not planned yet (guest RAM is one memfd, there are no memory backend objects)",
    ),
    (
        "query-memory-devices",
        "Bulkhead has no memory hot-plug (no pc-dimm or nvdimm devices)",
    ),
    ("query-mice", INPUT),
    ("query-migrate", MIG),
    ("query-migrate-cache-size", MIG),
    ("query-migrate-capabilities", MIG),
    (
        "query-pci",
        "not implemented yet: Bulkhead has no PCI bus",
    ),
    ("query-rocker", ROCKER),
    ("query-rocker-of-dpa-flows", ROCKER),
    ("query-rocker-of-dpa-groups", ROCKER),
    ("query-rocker-ports", ROCKER),
    ("query-spice", DISPLAY),
    (
        "query-target",
        "not implemented yet: not planned yet (Bulkhead runs x86_64 guests only)",
    ),
    ("query-tpm", TPM),
    ("query-tpm-models", TPM),
    ("query-tpm-types", TPM),
    ("query-vnc", DISPLAY),
    ("query-vnc-servers", DISPLAY),
    (
        "ringbuf-read",
        "not implemented yet: Bulkhead has no ringbuf character device back end",
    ),
    (
        "ringbuf-write",
        "not implemented yet: Bulkhead has no ringbuf character device back end",
    ),
    (
        "rtc-reset-reinjection",
        "Bulkhead's RTC does not reinject lost ticks, so there is nothing to reset",
    ),
    ("screendump", DISPLAY),
    ("send-key", INPUT),
    ("set_password", DISPLAY),
    (
        "system_wakeup",
        "Bulkhead's guests cannot suspend (its ACPI offers no S3), so there is nothing to wake up",
    ),
    ("trace-event-get-state", TRACE),
    ("trace-event-set-state", TRACE),
    ("transaction", SNAP),
    (
        "x-blockdev-change",
        "Bulkhead has no quorum block driver",
    ),
    ("x-blockdev-insert-medium", MEDIA),
    ("x-blockdev-remove-medium", MEDIA),
    (
        "x-colo-lost-heartbeat",
        "COLO (coarse-grained lock-stepping fault tolerance) is not supported",
    ),
    ("x-input-send-event", INPUT),
    ("xen-load-devices-state", XEN),
    ("xen-save-devices-state", XEN),
    ("xen-set-global-dirty-log", XEN),
];

/// Why `name` is not supported, if it is one of [`UNSUPPORTED`].
pub fn reason(name: &str) -> Option<&'static str> {
    UNSUPPORTED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_unique_and_explained() {
        for pair in UNSUPPORTED.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} then {}", pair[0].0, pair[1].0);
        }
        for (name, why) in UNSUPPORTED {
            assert!(!why.is_empty() && !why.ends_with('.'), "{name}: {why:?}");
        }
        assert_eq!(reason("screendump"), Some(DISPLAY));
        assert_eq!(reason("query-status"), None);
    }
}
