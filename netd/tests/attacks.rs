//! Proof by attack against the real, standalone `bulkhead-netd`: started with `--tap NAME` (a
//! fresh tap it creates, so the test needs root, as CI is) and `--sandbox on`, it opens the tap,
//! binds its socket, moves into an empty network namespace and enters the netd sandbox, and
//! then, instead of accepting a front end, makes one attempt of `bulkhead_sandbox::attack`
//! (`--attack`, a hook compiled only with the feature `attack-hook`), one worker per attempt.
//! It holds what it holds in service at that point (the tap fd, the listening socket) plus a
//! sealed 1 MiB memfd the test hands it in place of the guest memory a front end would send.
//! Each attempt runs under the whole sandbox and again with seccomp left out
//! (`--attack-without seccomp`; where landlock stops it there, a third time without landlock
//! too, which must get further). No attempt may succeed under the whole sandbox, and the
//! outcomes must be the netd columns of both tables in `docs/SECURITY.md`
//! (`BULKHEAD_BLESS_SECURITY_MD=1` rewrites those two columns from what was observed).
//!
//! Run: `cargo test -p bulkhead-netd-proc --features attack-hook --test attacks -- --nocapture`.
#![cfg(feature = "attack-hook")]

use std::path::Path;

use bulkhead_sandbox::attack;
use bulkhead_sandbox::Role;

const WORKER: &str = env!("CARGO_BIN_EXE_bulkhead-netd");

#[test]
fn every_attempt_fails_in_the_real_netd_and_docs_say_what_stops_it() {
    let dir = std::env::temp_dir().join(format!("bulkhead-netd-attack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/SECURITY.md");
    let proved = attack::prove_standalone_worker(Role::Netd, Path::new(WORKER), &doc, &dir, |a| {
        // Interface names: at most 15 bytes.
        let tap = format!("bha{}{:02}", std::process::id() % 100_000, a as usize);
        let socket = dir.join(format!("{}.sock", a.name()));
        let _ = std::fs::remove_file(&socket);
        vec![
            "--socket".into(),
            socket.display().to_string(),
            "--tap".into(),
            tap,
        ]
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = proved {
        panic!("{e}");
    }
}
