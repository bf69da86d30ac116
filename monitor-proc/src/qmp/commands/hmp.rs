//! `human-monitor-command`: the HMP subset, each HMP command mapped onto its QMP twin.
//!
//! Bulkhead's HMP knows `info status`, `info version`, `info kvm`, `info cpus`, `info name`,
//! `info chardev`, `info uuid`, `stop` (`s`), `cont` (`c`), `system_reset`, `quit` (`q`), and
//! `help` (`?`) and a bare `info`, which list these. Each of them runs the QMP command of the
//! same meaning through the registry (`info status` is `query-status`, `stop` is `stop`, ...)
//! and prints its answer the way QEMU 7.2's HMP prints it; a QMP error prints as QEMU's
//! `Error: ...`. The command line is parsed as QEMU parses it: the command name ends at
//! whitespace or `/`, unknown names answer `unknown command: '...'` quoting the line up to the
//! bad name, arguments a command does not take answer `NAME: extraneous characters at the end
//! of line` and `Try "help ..." for more information`. Every other HMP command of QEMU is
//! unknown here. Lines end in `\r\n`, as QEMU's HMP output does over QMP.
//!
//! `cpu-index` selects the current CPU (marked `*` by `info cpus`); a number that is not one of
//! the machine's vCPUs is refused with QEMU's error, before the command line is looked at, as
//! QEMU does (so with `-M none`, which has no CPUs, any `cpu-index` is refused).

use serde_json::{Map, Value};

use super::{ArgSpec, ArgType, Command, Context, HandlerFuture, Outcome, PostAction};
use crate::qmp::protocol::QmpError;

pub(super) static COMMANDS: &[Command] = &[Command {
    name: "human-monitor-command",
    args: &[
        ArgSpec {
            name: "command-line",
            ty: ArgType::Str,
            optional: false,
        },
        ArgSpec {
            name: "cpu-index",
            ty: ArgType::Int,
            optional: true,
        },
    ],
    handler: human_monitor_command,
}];

/// How the answer of the QMP twin is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Print {
    /// Nothing (`stop`, `cont`, ...).
    Nothing,
    Status,
    Version,
    Kvm,
    Cpus,
    Name,
    Chardev,
    Uuid,
    Block,
    Blockstats,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    /// Run this QMP command (no arguments) and print its answer.
    Qmp(&'static str, Print),
    /// The `info` table.
    Info,
    /// `info network` ([`super::net::info_network`]).
    Network,
    /// `help [cmd]`.
    Help,
}

#[derive(Debug)]
struct HmpCommand {
    /// Names separated by `|`, as QEMU writes them (`stop|s`).
    names: &'static str,
    /// The argument synopsis for `help`.
    params: &'static str,
    /// The `help` text.
    help: &'static str,
    action: Action,
}

const fn hmp(
    names: &'static str,
    params: &'static str,
    help: &'static str,
    action: Action,
) -> HmpCommand {
    HmpCommand {
        names,
        params,
        help,
        action,
    }
}

/// The top-level commands, sorted by name as QEMU sorts its tables.
static COMMANDS_HMP: &[HmpCommand] = &[
    hmp(
        "cont|c",
        "",
        "resume emulation",
        Action::Qmp("cont", Print::Nothing),
    ),
    hmp("help|?", "[cmd]", "show the help", Action::Help),
    hmp(
        "info",
        "[subcommand]",
        "show various information about the system state",
        Action::Info,
    ),
    hmp(
        "quit|q",
        "",
        "quit the emulator",
        Action::Qmp("quit", Print::Nothing),
    ),
    hmp(
        "stop|s",
        "",
        "stop emulation",
        Action::Qmp("stop", Print::Nothing),
    ),
    hmp(
        "system_reset",
        "",
        "reset the system",
        Action::Qmp("system_reset", Print::Nothing),
    ),
];

/// The `info` sub-commands, sorted by name.
static INFO_HMP: &[HmpCommand] = &[
    hmp(
        "block",
        "[-n] [-v] [device]",
        "show info of one block device or all block devices (-n: show named nodes; -v: show details)",
        Action::Qmp("query-block", Print::Block),
    ),
    hmp(
        "blockstats",
        "",
        "show block device statistics",
        Action::Qmp("query-blockstats", Print::Blockstats),
    ),
    hmp(
        "chardev",
        "",
        "show the character devices",
        Action::Qmp("query-chardev", Print::Chardev),
    ),
    hmp(
        "cpus",
        "",
        "show infos for each CPU",
        Action::Qmp("query-cpus-fast", Print::Cpus),
    ),
    hmp(
        "kvm",
        "",
        "show KVM information",
        Action::Qmp("query-kvm", Print::Kvm),
    ),
    hmp(
        "name",
        "",
        "show the current VM name",
        Action::Qmp("query-name", Print::Name),
    ),
    hmp(
        "network",
        "",
        "show the network state",
        Action::Network,
    ),
    hmp(
        "status",
        "",
        "show the current VM status (running|paused)",
        Action::Qmp("query-status", Print::Status),
    ),
    hmp(
        "uuid",
        "",
        "show the current VM UUID",
        Action::Qmp("query-uuid", Print::Uuid),
    ),
    hmp(
        "version",
        "",
        "show the version of QEMU",
        Action::Qmp("query-version", Print::Version),
    ),
];

impl HmpCommand {
    fn matches(&self, name: &str) -> bool {
        self.names.split('|').any(|n| n == name)
    }

    fn sub_table(&self) -> Option<&'static [HmpCommand]> {
        matches!(self.action, Action::Info).then_some(INFO_HMP)
    }
}

/// C's `isspace` in the C locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn skip_spaces(line: &[u8], mut p: usize) -> usize {
    while p < line.len() && is_space(line[p]) {
        p += 1;
    }
    p
}

/// The outcome of looking a command line up.
#[derive(Debug)]
enum Lookup {
    /// Nothing but whitespace.
    Blank,
    /// No such command: the line up to the end of the bad name.
    Unknown(usize),
    /// The command, and where its arguments start (after the name and its whitespace).
    Found(&'static HmpCommand, usize),
}

/// QEMU's `monitor_parse_command`: the name at `p` in `table`, descending into a sub-table
/// when more follows.
fn lookup(line: &[u8], p: usize, table: &'static [HmpCommand]) -> Lookup {
    let start = skip_spaces(line, p);
    if start >= line.len() {
        return Lookup::Blank;
    }
    let mut end = start;
    while end < line.len() && line[end] != b'/' && !is_space(line[end]) {
        end += 1;
    }
    let name = String::from_utf8_lossy(&line[start..end]);
    let Some(cmd) = table.iter().find(|c| c.matches(&name)) else {
        return Lookup::Unknown(end);
    };
    let rest = skip_spaces(line, end);
    match cmd.sub_table() {
        Some(sub) if rest < line.len() => match lookup(line, rest, sub) {
            // Only whitespace cannot follow here: `rest` is not whitespace.
            Lookup::Blank => Lookup::Found(cmd, rest),
            other => other,
        },
        _ => Lookup::Found(cmd, rest),
    }
}

/// QEMU's `get_str`: one word, or a double-quoted string with `\n \r \\ \' \"` escapes.
fn get_str(line: &[u8], p: &mut usize) -> Option<Vec<u8>> {
    let mut i = skip_spaces(line, *p);
    if i >= line.len() {
        *p = i;
        return None;
    }
    let mut out = Vec::new();
    if line[i] == b'"' {
        i += 1;
        while i < line.len() && line[i] != b'"' {
            if line[i] == b'\\' {
                let c = *line.get(i + 1)?;
                out.push(match c {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b'\\' | b'\'' | b'"' => c,
                    _ => return None,
                });
                i += 2;
            } else {
                out.push(line[i]);
                i += 1;
            }
        }
        if i >= line.len() {
            return None; // unterminated
        }
        i += 1;
    } else {
        while i < line.len() && !is_space(line[i]) {
            out.push(line[i]);
            i += 1;
        }
    }
    *p = i;
    Some(out)
}

/// Most words `help` looks at (QEMU's `MAX_ARGS`).
const MAX_HELP_ARGS: usize = 16;

fn help_line(out: &mut String, prefix: &[String], cmd: &HmpCommand) {
    for p in prefix {
        out.push_str(p);
        out.push(' ');
    }
    out.push_str(&format!("{} {} -- {}\n", cmd.names, cmd.params, cmd.help));
}

/// QEMU's `help_cmd_dump`.
fn help_dump(out: &mut String, table: &'static [HmpCommand], args: &[String], index: usize) {
    let Some(word) = args.get(index) else {
        for cmd in table {
            help_line(out, &args[..index], cmd);
        }
        return;
    };
    match table.iter().find(|c| c.matches(word)) {
        Some(cmd) => match cmd.sub_table() {
            Some(sub) => help_dump(out, sub, args, index + 1),
            None => help_line(out, &args[..index], cmd),
        },
        None => out.push_str(&format!(
            "unknown command: '{}'\n",
            args[..=index].join(" ")
        )),
    }
}

/// `help` with the rest of its line (QEMU's `help_cmd`); a line it cannot split prints nothing.
fn help(out: &mut String, rest: &[u8]) {
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        p = skip_spaces(rest, p);
        if p >= rest.len() {
            break;
        }
        if args.len() >= MAX_HELP_ARGS {
            return;
        }
        match get_str(rest, &mut p) {
            Some(word) => args.push(String::from_utf8_lossy(&word).into_owned()),
            None => return,
        }
    }
    help_dump(out, COMMANDS_HMP, &args, 0);
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn int_of(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or_default()
}

fn bool_of(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or_default()
}

/// Prints a QMP answer as QEMU's HMP does. `current` is the current CPU.
fn print(out: &mut String, how: Print, v: &Value, current: i64) {
    match how {
        Print::Nothing => {}
        Print::Status => {
            let running = bool_of(v, "running");
            let status = str_of(v, "status");
            out.push_str("VM status: ");
            out.push_str(if running { "running" } else { "paused" });
            if bool_of(v, "singlestep") {
                out.push_str(" (single step mode)");
            }
            if !running && status != "paused" {
                out.push_str(&format!(" ({status})"));
            }
            out.push('\n');
        }
        Print::Version => {
            let q = v.get("qemu").unwrap_or(&Value::Null);
            out.push_str(&format!(
                "{}.{}.{}{}\n",
                int_of(q, "major"),
                int_of(q, "minor"),
                int_of(q, "micro"),
                str_of(v, "package")
            ));
        }
        Print::Kvm => {
            out.push_str("kvm support: ");
            out.push_str(match (bool_of(v, "present"), bool_of(v, "enabled")) {
                (false, _) => "not compiled\n",
                (true, true) => "enabled\n",
                (true, false) => "disabled\n",
            });
        }
        Print::Cpus => {
            for cpu in v.as_array().map(Vec::as_slice).unwrap_or_default() {
                let index = int_of(cpu, "cpu-index");
                let mark = if index == current { '*' } else { ' ' };
                out.push_str(&format!(
                    "{mark} CPU #{index}: thread_id={}\n",
                    int_of(cpu, "thread-id")
                ));
            }
        }
        Print::Name => {
            if let Some(name) = v.get("name").and_then(Value::as_str) {
                out.push_str(name);
                out.push('\n');
            }
        }
        Print::Chardev => {
            for dev in v.as_array().map(Vec::as_slice).unwrap_or_default() {
                out.push_str(&format!(
                    "{}: filename={}\n",
                    str_of(dev, "label"),
                    str_of(dev, "filename")
                ));
            }
        }
        Print::Uuid => {
            out.push_str(str_of(v, "UUID"));
            out.push('\n');
        }
        Print::Blockstats => {
            for b in v.as_array().map(Vec::as_slice).unwrap_or_default() {
                let st = b.get("stats").unwrap_or(&Value::Null);
                out.push_str(&format!("{}:", str_of(b, "device")));
                for k in [
                    "rd_bytes",
                    "wr_bytes",
                    "rd_operations",
                    "wr_operations",
                    "flush_operations",
                    "wr_total_time_ns",
                    "rd_total_time_ns",
                    "flush_total_time_ns",
                    "rd_merged",
                    "wr_merged",
                    "idle_time_ns",
                ] {
                    out.push_str(&format!(" {k}={}", int_of(st, k)));
                }
                out.push('\n');
            }
        }
        Print::Block => {
            for (i, b) in v
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                if i > 0 {
                    out.push('\n');
                }
                let ins = b.get("inserted").unwrap_or(&Value::Null);
                let device = str_of(b, "device");
                let node = str_of(ins, "node-name");
                if device.is_empty() {
                    out.push_str(node);
                } else {
                    out.push_str(&format!("{device} ({node})"));
                }
                out.push_str(&format!(
                    ": {} ({}{})\n",
                    str_of(ins, "file"),
                    str_of(ins, "drv"),
                    if bool_of(ins, "ro") {
                        ", read-only"
                    } else {
                        ""
                    }
                ));
                if let Some(q) = b.get("qdev").and_then(Value::as_str) {
                    out.push_str(&format!("    Attached to:      {q}\n"));
                }
                match b.get("io-status").and_then(Value::as_str) {
                    Some(st) if st != "ok" => {
                        out.push_str(&format!("    I/O status:       {st}\n"));
                    }
                    _ => {}
                }
                if bool_of(b, "removable") {
                    out.push_str(&format!(
                        "    Removable device: {}locked, tray {}\n",
                        if bool_of(b, "locked") { "" } else { "not " },
                        if bool_of(b, "tray_open") {
                            "open"
                        } else {
                            "closed"
                        }
                    ));
                }
                let cache = ins.get("cache").unwrap_or(&Value::Null);
                out.push_str(&format!(
                    "    Cache mode:       {}{}{}\n",
                    if bool_of(cache, "writeback") {
                        "writeback"
                    } else {
                        "writethrough"
                    },
                    if bool_of(cache, "direct") {
                        ", direct"
                    } else {
                        ""
                    },
                    if bool_of(cache, "no-flush") {
                        ", ignore flushes"
                    } else {
                        ""
                    }
                ));
                if let Some(b) = ins.get("backing_file").and_then(Value::as_str) {
                    out.push_str(&format!(
                        "    Backing file:     {b} (chain depth: {})\n",
                        int_of(ins, "backing_file_depth")
                    ));
                }
                let limits = ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"];
                if limits.iter().any(|k| int_of(ins, k) != 0) {
                    out.push_str("    I/O throttling:  ");
                    for k in [
                        "bps",
                        "bps_rd",
                        "bps_wr",
                        "bps_max",
                        "bps_rd_max",
                        "bps_wr_max",
                        "iops",
                        "iops_rd",
                        "iops_wr",
                        "iops_max",
                        "iops_rd_max",
                        "iops_wr_max",
                        "iops_size",
                    ] {
                        out.push_str(&format!(" {k}={}", int_of(ins, k)));
                    }
                    out.push_str(&format!(" group={}\n", str_of(ins, "group")));
                }
            }
        }
    }
}

/// Runs one HMP command line; returns its output (with `\n` line ends) and what the session
/// does afterwards (`quit`).
async fn run(
    ctx: &Context,
    line: &str,
    current_cpu: i64,
) -> Result<(String, Option<PostAction>), QmpError> {
    // C strings end at the first NUL.
    let line = line.split('\0').next().unwrap_or_default().as_bytes();
    let mut out = String::new();
    let (cmd, args_at) = match lookup(line, 0, COMMANDS_HMP) {
        Lookup::Blank => return Ok((out, None)),
        Lookup::Unknown(end) => {
            out.push_str(&format!(
                "unknown command: '{}'\n",
                String::from_utf8_lossy(&line[..end])
            ));
            return Ok((out, None));
        }
        Lookup::Found(cmd, at) => (cmd, at),
    };
    let rest = &line[args_at..];
    match cmd.action {
        Action::Help => help(&mut out, rest),
        // `info` alone: its table (QEMU's `info` without an item).
        Action::Info => help(&mut out, b"info"),
        Action::Qmp(_, _) | Action::Network if !rest.is_empty() => {
            let mut end = args_at;
            while end > 0 && is_space(line[end - 1]) {
                end -= 1;
            }
            out.push_str(&format!(
                "{}: extraneous characters at the end of line\nTry \"help {}\" for more information\n",
                cmd.names,
                String::from_utf8_lossy(&line[..end])
            ));
        }
        Action::Network => match super::net::info_network(ctx).await {
            Ok(text) => out.push_str(&text),
            Err(e) => out.push_str(&format!("Error: {}\n", e.desc)),
        },
        Action::Qmp(name, how) => {
            let answer = match ctx
                .shared
                .registry
                .prepare(name, Map::new(), true, ctx.clone())
            {
                Ok(fut) => fut.await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(outcome) => {
                    print(&mut out, how, &outcome.value, current_cpu);
                    return Ok((out, outcome.post));
                }
                Err(e) => out.push_str(&format!("Error: {}\n", e.desc)),
            }
        }
    }
    Ok((out, None))
}

fn human_monitor_command(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let line = args
            .get("command-line")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        // Without cpu-index the current CPU is the first one.
        let current = match args.get("cpu-index") {
            None => 0,
            Some(v) => {
                let vcpus = i64::from(ctx.shared.info.vcpus);
                match v.as_i64() {
                    Some(i) if (0..vcpus).contains(&i) => i,
                    _ => {
                        return Err(QmpError::generic(
                            "Parameter 'cpu-index' expects a CPU number",
                        ))
                    }
                }
            }
        };
        let (text, post) = run(&ctx, &line, current).await?;
        Ok(Outcome {
            value: Value::from(text.replace('\n', "\r\n")),
            post,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::Vm;
    use serde_json::json;

    /// Runs `line` on a `-M none` machine whose VM actor runs.
    async fn hmp_none(line: &str) -> String {
        let (vm, ctx) = Context::for_tests();
        let task = tokio::spawn(vm.run());
        let mut args = Map::new();
        args.insert("command-line".into(), json!(line));
        let out = human_monitor_command(ctx.clone(), args)
            .await
            .expect("runs")
            .value;
        ctx.shared.vm.terminate().await;
        let _ = task.await;
        out.as_str().expect("text").to_string()
    }

    fn spawn_vm(vm: Vm) -> tokio::task::JoinHandle<()> {
        tokio::spawn(vm.run())
    }

    #[tokio::test]
    async fn parsing_follows_qemu() {
        for (line, want) in [
            ("", ""),
            ("   ", ""),
            ("foo", "unknown command: 'foo'\r\n"),
            ("  foo", "unknown command: '  foo'\r\n"),
            ("foo/x bar", "unknown command: 'foo'\r\n"),
            ("  info   foo  ", "unknown command: '  info   foo'\r\n"),
            ("info/x", "unknown command: 'info'\r\n"),
            ("INFO status", "unknown command: 'INFO'\r\n"),
            ("info STATUS", "unknown command: 'info STATUS'\r\n"),
            ("st", "unknown command: 'st'\r\n"),
            ("info balloon", "unknown command: 'info balloon'\r\n"),
            (
                "stop/x",
                "stop|s: extraneous characters at the end of line\r\n\
                 Try \"help stop\" for more information\r\n",
            ),
            (
                "system_reset now",
                "system_reset: extraneous characters at the end of line\r\n\
                 Try \"help system_reset\" for more information\r\n",
            ),
            (
                "  info   status  x",
                "status: extraneous characters at the end of line\r\n\
                 Try \"help   info   status\" for more information\r\n",
            ),
            ("info status", "VM status: paused (prelaunch)\r\n"),
            ("\tinfo\tstatus\n", "VM status: paused (prelaunch)\r\n"),
            ("info status\0garbage", "VM status: paused (prelaunch)\r\n"),
            ("help stop", "stop|s  -- stop emulation\r\n"),
            ("? cont", "cont|c  -- resume emulation\r\n"),
            ("help help", "help|? [cmd] -- show the help\r\n"),
            ("help stop cont", "stop|s  -- stop emulation\r\n"),
            (
                "help info status",
                "info status  -- show the current VM status (running|paused)\r\n",
            ),
            ("help \"stop\"", "stop|s  -- stop emulation\r\n"),
            ("help \"stop", ""),
            ("help nope", "unknown command: 'nope'\r\n"),
            ("help info nope", "unknown command: 'info nope'\r\n"),
            ("info name", ""),
            ("info cpus", ""),
            ("info kvm", "kvm support: disabled\r\n"),
            ("info uuid", "00000000-0000-0000-0000-000000000000\r\n"),
            ("info version", "2.12.0bulkhead 0.1.0\r\n"),
        ] {
            assert_eq!(hmp_none(line).await, want, "{line:?}");
        }
        let info = hmp_none("info").await;
        assert_eq!(info, hmp_none("info   ").await);
        assert_eq!(info, hmp_none("help info").await);
        assert!(info.starts_with("info block [-n] [-v] [device] -- show info of one block device"));
        assert!(info.contains("info chardev  -- show the character devices\r\n"));
        assert_eq!(info.lines().count(), INFO_HMP.len());
        let all = hmp_none("help").await;
        assert!(all.contains("info [subcommand] -- show various information"));
        assert_eq!(all.lines().count(), COMMANDS_HMP.len());
    }

    #[tokio::test]
    async fn commands_run_their_qmp_twins() {
        let (vm, ctx) = Context::for_tests();
        let task = spawn_vm(vm);
        let run = |line: &'static str| {
            let ctx = ctx.clone();
            async move {
                let mut args = Map::new();
                args.insert("command-line".into(), json!(line));
                human_monitor_command(ctx, args).await.expect("runs")
            }
        };
        assert_eq!(run("cont").await.value, json!(""));
        assert_eq!(
            run("info status").await.value,
            json!("VM status: running\r\n")
        );
        assert_eq!(run("s").await.value, json!(""));
        assert_eq!(
            run("info status").await.value,
            json!("VM status: paused\r\n")
        );
        assert_eq!(run("c").await.value, json!(""));
        assert_eq!(run("system_reset").await.value, json!(""));
        let q = run("q").await;
        assert_eq!(q.value, json!(""));
        assert_eq!(q.post, Some(PostAction::Exit));
        ctx.shared.vm.terminate().await;
        let _ = task.await;
    }

    #[tokio::test]
    async fn cpu_index_must_name_a_vcpu() {
        let (vm, ctx) = Context::for_tests();
        let task = spawn_vm(vm);
        for idx in [json!(0), json!(-1), json!(5)] {
            let mut args = Map::new();
            args.insert("command-line".into(), json!("info status"));
            args.insert("cpu-index".into(), idx);
            let e = human_monitor_command(ctx.clone(), args)
                .await
                .expect_err("-M none has no CPUs");
            assert_eq!(e.desc, "Parameter 'cpu-index' expects a CPU number");
        }
        ctx.shared.vm.terminate().await;
        let _ = task.await;
    }

    #[test]
    fn cpus_mark_the_current_one() {
        let list = json!([
            {"cpu-index": 0, "thread-id": 100},
            {"cpu-index": 1, "thread-id": 101}
        ]);
        let mut out = String::new();
        print(&mut out, Print::Cpus, &list, 1);
        assert_eq!(out, "  CPU #0: thread_id=100\n* CPU #1: thread_id=101\n");
        let mut out = String::new();
        print(
            &mut out,
            Print::Status,
            &json!({"running": false, "singlestep": false, "status": "internal-error"}),
            0,
        );
        assert_eq!(out, "VM status: paused (internal-error)\n");
    }
}
