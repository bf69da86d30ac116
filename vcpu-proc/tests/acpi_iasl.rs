//! The ACPI tables vcpu-proc builds, checked by the reference toolchain: ACPICA's `iasl`
//! disassembles every table (the DSDT's AML included) without errors, and the DSDT holds the
//! objects Linux relies on (PCI host bridge with hot-plug slots, GED, power button). `iasl`
//! comes from Debian's acpica-tools (`.ci/run` installs it); without it this test fails.

use std::path::PathBuf;
use std::process::Command;

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("bulkhead-acpi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

#[test]
fn iasl_disassembles_every_table_cleanly() {
    let iasl = Command::new("iasl").arg("-v").output();
    assert!(
        iasl.is_ok(),
        "\n*** iasl is missing: apt-get install acpica-tools (.ci/run does) ***\n"
    );
    let tables = bulkhead_vcpu::acpi::build(&[0, 1]).expect("tables");
    let dir = scratch();
    let mut dsdt_text = String::new();
    for (_, blob) in tables.blobs.iter().skip(1) {
        let sig = String::from_utf8_lossy(&blob[..4]).to_string();
        let path = dir.join(format!("{sig}.dat"));
        std::fs::write(&path, blob).expect("write table");
        let out = Command::new("iasl")
            .current_dir(&dir)
            .arg("-d")
            .arg(&path)
            .output()
            .expect("run iasl");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d {sig} failed:\n{log}");
        assert!(
            !log.to_ascii_lowercase().contains("error"),
            "iasl reports errors for {sig}:\n{log}"
        );
        let dsl = std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).expect("dsl");
        if sig == "DSDT" {
            dsdt_text = dsl;
        }
    }
    for needle in [
        "Device (_SB.PCI0)",
        "\"PNP0A08\"",
        "Method (PCNT",
        "Device (S01)",
        "Device (S1F)",
        "Method (_EJ0",
        "Device (_SB.GED)",
        "\"ACPI0013\"",
        "Method (_EVT",
        "Device (_SB.PWRB)",
        "\"PNP0C0C\"",
        "Notify (\\_SB.PWRB, 0x80)",
    ] {
        assert!(
            dsdt_text.contains(needle),
            "DSDT lacks {needle}:\n{dsdt_text}"
        );
    }
    // Recompiling the disassembly must work too (the AML is well formed, not just parseable).
    let out = Command::new("iasl")
        .current_dir(&dir)
        .arg("-p")
        .arg(dir.join("recompiled"))
        .arg(dir.join("DSDT.dsl"))
        .output()
        .expect("run iasl");
    assert!(
        out.status.success(),
        "recompiling the DSDT failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
