//! `docs/QMP.md` against the code: every command of QEMU's QMP reference documents
//! (`docs/qmp-reference-commands.txt`, extracted by `scripts/qmp-reference-commands.py`) has
//! exactly one row in the command tables; rows marked implemented or partly are in the
//! registry; rows marked not yet or not supported are in `UNSUPPORTED` (with a reason of the
//! matching kind) and not in the registry; every registry command has a row; the counts the
//! document states are the counts of its rows. Then, against a running `bulkhead -M none`,
//! commands of each unsupported family answer `CommandNotFound` with their reason, and
//! `query-commands` does not list them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use bulkhead_monitor::qmp::commands::{Registry, UNSUPPORTED};
use serde_json::Value;

use common::*;

const OWNERS: &[&str] = &["monitor", "vcpu-proc", "blockd", "netd"];
/// How a reason in `UNSUPPORTED` says the command may come later.
const NOT_YET_PREFIX: &str = "not implemented yet";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Implemented,
    Partly,
    NotYet,
    NotSupported,
}

#[derive(Debug)]
struct Row {
    status: Status,
    line: usize,
}

fn repo_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn reference_commands() -> Vec<String> {
    let text = repo_file("docs/qmp-reference-commands.txt");
    let names: Vec<String> = text.lines().map(str::to_string).collect();
    assert!(names.len() > 100, "suspiciously few reference commands");
    for pair in names.windows(2) {
        assert!(pair[0] < pair[1], "not sorted or not unique: {pair:?}");
    }
    names
}

/// The status cell: "implemented", or "partly: ...", "not yet: ...", "not supported: ..." with a
/// non-empty explanation.
fn parse_status(cell: &str) -> Result<Status, String> {
    if cell == "implemented" {
        return Ok(Status::Implemented);
    }
    for (prefix, status) in [
        ("partly: ", Status::Partly),
        ("not yet: ", Status::NotYet),
        ("not supported: ", Status::NotSupported),
    ] {
        if let Some(rest) = cell.strip_prefix(prefix) {
            if rest.trim().is_empty() {
                return Err(format!("'{cell}' says {prefix}but not what or why"));
            }
            return Ok(status);
        }
    }
    Err(format!("unknown status '{cell}'"))
}

/// The owner cell: "—" (nothing does it) or processes separated by ", ".
fn check_owner(cell: &str) -> Result<(), String> {
    if cell == "—" {
        return Ok(());
    }
    for p in cell.split(", ") {
        if !OWNERS.contains(&p) {
            return Err(format!("unknown owner '{p}' in '{cell}'"));
        }
    }
    Ok(())
}

/// Every row of every table whose header is `| command | status | owner | notes |`, with the
/// problems found on the way.
fn doc_rows(doc: &str) -> (Vec<(String, Row)>, Vec<String>) {
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let mut in_table = false;
    for (i, line) in doc.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.first() == Some(&"command") {
            in_table = cells == ["command", "status", "owner", "notes"];
            if !in_table {
                problems.push(format!("line {line_no}: unexpected command table header"));
            }
            continue;
        }
        if !in_table || cells.iter().all(|c| c.chars().all(|ch| ch == '-')) {
            continue;
        }
        if cells.len() != 4 {
            problems.push(format!("line {line_no}: {} cells, want 4", cells.len()));
            continue;
        }
        let Some(name) = cells[0].strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
            problems.push(format!("line {line_no}: command cell not in backticks"));
            continue;
        };
        match parse_status(cells[1]) {
            Ok(status) => rows.push((
                name.to_string(),
                Row {
                    status,
                    line: line_no,
                },
            )),
            Err(e) => problems.push(format!("line {line_no} ({name}): {e}")),
        }
        if let Err(e) = check_owner(cells[2]) {
            problems.push(format!("line {line_no} ({name}): {e}"));
        }
    }
    (rows, problems)
}

/// The "Counts: N reference commands; A implemented, B partly, C not yet, D not supported."
/// line.
fn stated_counts(doc: &str) -> [usize; 5] {
    let line = doc
        .lines()
        .find(|l| l.starts_with("Counts: "))
        .expect("docs/QMP.md has no 'Counts: ' line");
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("number"))
        .collect();
    numbers
        .try_into()
        .unwrap_or_else(|n| panic!("want 5 numbers in '{line}', got {n:?}"))
}

#[test]
fn qmp_md_accounts_for_every_reference_command() {
    let doc = repo_file("docs/QMP.md");
    let reference = reference_commands();
    let (rows, mut problems) = doc_rows(&doc);
    let registry = Registry::new();
    let registered: BTreeSet<&str> = registry.names().collect();
    let unsupported: BTreeMap<&str, &str> = UNSUPPORTED.iter().copied().collect();

    let mut by_name: BTreeMap<&str, &Row> = BTreeMap::new();
    for (name, row) in &rows {
        if let Some(first) = by_name.insert(name, row) {
            problems.push(format!(
                "{name}: rows at lines {} and {}",
                first.line, row.line
            ));
        }
    }
    for name in &reference {
        if !by_name.contains_key(name.as_str()) {
            problems.push(format!("{name}: reference command without a row"));
        }
    }
    for (name, row) in &by_name {
        let in_registry = registered.contains(name);
        let reason = unsupported.get(name);
        match row.status {
            Status::Implemented | Status::Partly => {
                if !in_registry {
                    problems.push(format!(
                        "{name} (line {}): marked {:?} but not in the registry",
                        row.line, row.status
                    ));
                }
                if reason.is_some() {
                    problems.push(format!(
                        "{name}: marked {:?} but in UNSUPPORTED",
                        row.status
                    ));
                }
            }
            Status::NotYet | Status::NotSupported => {
                if in_registry {
                    problems.push(format!(
                        "{name} (line {}): marked {:?} but in the registry",
                        row.line, row.status
                    ));
                }
                match reason {
                    None => problems.push(format!(
                        "{name} (line {}): marked {:?} but not in UNSUPPORTED",
                        row.line, row.status
                    )),
                    Some(why) => {
                        let says_not_yet = why.starts_with(NOT_YET_PREFIX);
                        if says_not_yet != (row.status == Status::NotYet) {
                            problems.push(format!(
                                "{name}: marked {:?} in docs/QMP.md, but its reason is {why:?}",
                                row.status
                            ));
                        }
                    }
                }
            }
        }
        if !in_registry && reason.is_none() && !reference.iter().any(|r| r == name) {
            problems.push(format!("{name}: a row for a command that is nowhere"));
        }
    }
    for name in &registered {
        if !by_name.contains_key(name) {
            problems.push(format!("{name}: in the registry but has no row"));
        }
    }
    for name in unsupported.keys() {
        if !by_name.contains_key(name) {
            problems.push(format!("{name}: in UNSUPPORTED but has no row"));
        }
        if registered.contains(name) {
            problems.push(format!("{name}: both in the registry and in UNSUPPORTED"));
        }
    }
    for pair in UNSUPPORTED.windows(2) {
        if pair[0].0 >= pair[1].0 {
            problems.push(format!(
                "UNSUPPORTED not sorted: {} then {}",
                pair[0].0, pair[1].0
            ));
        }
    }

    let count = |s: Status| {
        reference
            .iter()
            .filter(|n| by_name.get(n.as_str()).is_some_and(|r| r.status == s))
            .count()
    };
    let actual = [
        reference.len(),
        count(Status::Implemented),
        count(Status::Partly),
        count(Status::NotYet),
        count(Status::NotSupported),
    ];
    let stated = stated_counts(&doc);
    if stated != actual {
        problems.push(format!(
            "the Counts line says {stated:?}, the rows give {actual:?} \
             (reference, implemented, partly, not yet, not supported)"
        ));
    }

    assert!(
        problems.is_empty(),
        "docs/QMP.md, the registry and UNSUPPORTED disagree ({} problems):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// One command per family of not-supported or not-yet commands, with arguments a client might
/// send (the arguments must not change the answer).
const PROBES: &[(&str, &str)] = &[
    ("screendump", r#"{"filename": "/tmp/x.ppm"}"#), // display
    ("send-key", r#"{"keys": []}"#),                 // input
    ("eject", r#"{"device": "cd0"}"#),               // removable media
    ("xen-save-devices-state", r#"{"filename": "/tmp/x"}"#), // Xen
    ("x-colo-lost-heartbeat", "{}"),                 // COLO
    ("query-rocker", r#"{"name": "sw1"}"#),          // rocker
    ("query-tpm", "{}"),                             // TPM
    ("qom-list", r#"{"path": "/"}"#),                // QOM
    ("cpu-add", r#"{"id": 2}"#),                     // CPU hot-plug
    ("migrate", r#"{"uri": "tcp:0:4446"}"#),         // migration (not yet)
    ("inject-nmi", "{}"),                            // vcpu-proc (not yet)
    ("pmemsave", r#"{"val": 0, "size": 1, "filename": "/tmp/x"}"#), // memory (not yet)
];

#[test]
fn unsupported_commands_answer_command_not_found_with_their_reason() {
    let s = Scratch::new("qmpdoc");
    let sock = s.s("qmp.sock");
    let qmp = format!("unix:{sock},server=on,wait=off");
    let _m = Monitor::start(&s, &["-M", "none", "-qmp", &qmp, "-nographic"]);
    wait_for_socket(&sock, Duration::from_secs(10));
    let mut q = Qmp::unix(&sock);

    // Before negotiation they are refused like any other command.
    let r = q.cmd("screendump");
    assert_eq!(error_class(&r), "CommandNotFound");
    assert_eq!(
        error_desc(&r),
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    q.negotiate();

    for (name, args) in PROBES {
        let why = UNSUPPORTED
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, w)| *w)
            .unwrap_or_else(|| panic!("{name} is not in UNSUPPORTED"));
        let want = format!("The command {name} is not supported by Bulkhead: {why}");
        for input in [
            format!(r#"{{"execute": "{name}", "id": "{name}"}}"#),
            format!(r#"{{"execute": "{name}", "arguments": {args}, "id": "{name}"}}"#),
        ] {
            let r = q.raw(&input);
            assert_eq!(error_class(&r), "CommandNotFound", "{input}: {r}");
            assert_eq!(error_desc(&r), want, "{input}");
            assert_eq!(r["id"], Value::from(*name), "{input}: id echoed");
        }
    }
    // The session still works, and nothing happened to the VM.
    assert_eq!(q.status(), "running");
    assert!(q.events.is_empty(), "events: {:?}", q.events);
}

#[test]
fn query_commands_lists_no_unsupported_command() {
    let s = Scratch::new("qmpdoc-list");
    let sock = s.s("qmp.sock");
    let qmp = format!("unix:{sock},server=on,wait=off");
    let _m = Monitor::start(&s, &["-M", "none", "-qmp", &qmp, "-nographic"]);
    wait_for_socket(&sock, Duration::from_secs(10));
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let r = q.cmd("query-commands");
    let listed: BTreeSet<&str> = r["return"]
        .as_array()
        .unwrap_or_else(|| panic!("query-commands: {r}"))
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    let registered: BTreeSet<&str> = Registry::new().names().collect();
    assert_eq!(listed, registered, "query-commands lists the registry");
    for (name, _) in UNSUPPORTED {
        assert!(!listed.contains(name), "{name} is listed");
    }
}
