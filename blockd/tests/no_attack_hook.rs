//! The attack hook must never be in a binary built without the `attack-hook` feature — the
//! release build `tests/run-all.sh` makes and the .deb ships included. Under
//! `cargo nextest run --workspace --release` (CI) this checks the very `bulkhead-blockd` that the
//! preceding `cargo build --release --workspace --bins` produced with the same features: it must
//! refuse `--attack` as an unknown argument and must not contain the attack module's code (its
//! report marker).
#![cfg(not(feature = "attack-hook"))]

use std::path::Path;

const WORKER: &str = env!("CARGO_BIN_EXE_bulkhead-blockd");

#[test]
fn the_worker_built_without_the_feature_has_no_attack_hook() {
    let out = std::process::Command::new(WORKER)
        .args([
            "--socket",
            "/nonexistent/bulkhead-attack-hook.sock",
            "--file",
            "/nonexistent/image",
            "--attack",
            "open-host-file",
            "--attack-target",
            "pid=1,addr=0x0,port=1,mnt=/",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run bulkhead-blockd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unknown argument \"--attack\""), "{stderr}");
    assert!(out.stdout.is_empty());
    // Nothing of the attack module is linked in.
    let bytes = std::fs::read(Path::new(WORKER)).expect("read the binary");
    for marker in [&b"BULKHEAD-ATTACK-BEGIN"[..], b"BULKHEAD-ATTACK-RESULT"] {
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "{WORKER} contains {}",
            String::from_utf8_lossy(marker)
        );
    }
}
