//! Introspection and machine queries: `query-commands`, `query-events`, `query-qmp-schema`,
//! `query-name`, `query-uuid`, `query-kvm`, `query-cpus`, `query-cpus-fast`, `query-chardev`,
//! `query-command-line-options`.
//!
//! Every reply is built with [`qdict::object`], so members come out in the order QEMU sends
//! them. The vCPU queries go to the VM actor, which asks `bulkhead-vcpu` (see
//! [`crate::vm::VmHandle::query_cpus`]): `query-cpus` samples the vCPUs each time (QEMU 2.12's
//! form: `CPU`, `current`, `halted`, `pc`, `qom_path`, `thread_id`, `props`, `arch`),
//! `query-cpus-fast` does not disturb them (QEMU 2.12–7.2's members, `arch` and `target` both).
//! With `-M none` both are empty lists, as QEMU's are.

use serde_json::{Map, Value};

use super::{ArgSpec, ArgType, Command, Context, HandlerFuture, Outcome};
use crate::cli::OPTION_GROUPS;
use crate::qmp::protocol::QmpError;
use crate::qmp::{qdict, schema};
use crate::vm::VcpuInfo;

/// What `query-uuid` says when no `-uuid` was given (QEMU's all-zero UUID).
const NO_UUID: &str = "00000000-0000-0000-0000-000000000000";

pub(super) static COMMANDS: &[Command] = &[
    Command {
        name: "query-commands",
        args: &[],
        handler: query_commands,
    },
    Command {
        name: "query-events",
        args: &[],
        handler: query_events,
    },
    Command {
        name: "query-qmp-schema",
        args: &[],
        handler: query_qmp_schema,
    },
    Command {
        name: "query-name",
        args: &[],
        handler: query_name,
    },
    Command {
        name: "query-uuid",
        args: &[],
        handler: query_uuid,
    },
    Command {
        name: "query-kvm",
        args: &[],
        handler: query_kvm,
    },
    Command {
        name: "query-cpus",
        args: &[],
        handler: query_cpus,
    },
    Command {
        name: "query-cpus-fast",
        args: &[],
        handler: query_cpus_fast,
    },
    Command {
        name: "query-chardev",
        args: &[],
        handler: query_chardev,
    },
    Command {
        name: "query-command-line-options",
        args: &[ArgSpec {
            name: "option",
            ty: ArgType::Str,
            optional: true,
        }],
        handler: query_command_line_options,
    },
];

fn names(list: impl Iterator<Item = &'static str>) -> Value {
    list.map(|n| qdict::object([("name", Value::from(n))]))
        .collect()
}

fn query_commands(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move { Ok(Outcome::value(names(ctx.shared.registry.names()))) })
}

fn query_events(_ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move { Ok(Outcome::value(names(schema::event_names()))) })
}

fn query_qmp_schema(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        schema::introspect(&ctx.shared.registry)
            .map(Outcome::value)
            .map_err(|e| QmpError::generic(e.to_string()))
    })
}

fn query_name(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let members = ctx
            .shared
            .info
            .name
            .as_ref()
            .map(|n| ("name", Value::from(n.as_str())));
        Ok(Outcome::value(qdict::object(members)))
    })
}

fn query_uuid(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let uuid = ctx.shared.info.uuid.as_deref().unwrap_or(NO_UUID);
        Ok(Outcome::value(qdict::object([("UUID", Value::from(uuid))])))
    })
}

fn query_kvm(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        // KVM is Bulkhead's only accelerator, always built in ("present"); it is in use when
        // the machine has a guest.
        Ok(Outcome::value(qdict::object([
            ("enabled", Value::from(ctx.shared.info.kvm_present)),
            ("present", Value::from(true)),
        ])))
    })
}

/// QEMU's QOM path of the vCPU: the x86 CPUs a machine creates itself sit unattached.
fn qom_path(cpu: &VcpuInfo) -> String {
    format!("/machine/unattached/device[{}]", cpu.index)
}

/// `CpuInstanceProperties` of the vCPU, as QEMU fills them for x86 (`die-id` only with more
/// than one die per socket).
fn props(cpu: &VcpuInfo) -> Value {
    let mut members = vec![("socket-id", Value::from(cpu.socket_id))];
    if let Some(die) = cpu.die_id {
        members.push(("die-id", Value::from(die)));
    }
    members.push(("core-id", Value::from(cpu.core_id)));
    members.push(("thread-id", Value::from(cpu.thread_in_core)));
    qdict::object(members)
}

fn query_cpus(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let cpus = ctx.shared.vm.query_cpus(true).await?;
        let list = cpus
            .iter()
            .enumerate()
            .map(|(i, c)| {
                qdict::object([
                    ("CPU", Value::from(c.index)),
                    // QEMU 2.12: "current" is the first CPU.
                    ("current", Value::from(i == 0)),
                    ("halted", Value::from(c.halted)),
                    ("qom_path", Value::from(qom_path(c))),
                    ("thread_id", Value::from(c.thread_id)),
                    ("props", props(c)),
                    ("arch", Value::from("x86")),
                    ("pc", Value::from(c.pc)),
                ])
            })
            .collect();
        Ok(Outcome::value(list))
    })
}

fn query_cpus_fast(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let cpus = ctx.shared.vm.query_cpus(false).await?;
        let list = cpus
            .iter()
            .map(|c| {
                qdict::object([
                    ("cpu-index", Value::from(c.index)),
                    ("qom-path", Value::from(qom_path(c))),
                    ("thread-id", Value::from(c.thread_id)),
                    ("props", props(c)),
                    ("arch", Value::from("x86")),
                    ("target", Value::from("x86_64")),
                ])
            })
            .collect();
        Ok(Outcome::value(list))
    })
}

fn query_chardev(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let list = ctx
            .shared
            .info
            .chardevs
            .iter()
            .map(|d| {
                qdict::object([
                    ("label", Value::from(d.label())),
                    ("filename", Value::from(d.filename())),
                    ("frontend-open", Value::from(d.frontend_open())),
                ])
            })
            .collect();
        Ok(Outcome::value(list))
    })
}

fn query_command_line_options(_ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let wanted = args.get("option").and_then(Value::as_str);
        let list: Vec<Value> = OPTION_GROUPS
            .iter()
            .filter(|g| wanted.is_none_or(|w| w == g.name))
            .map(|g| {
                // QEMU lists an option's parameters last-declared first.
                let params: Vec<Value> = g
                    .params
                    .iter()
                    .rev()
                    .map(|p| {
                        qdict::object([
                            ("name", Value::from(p.name)),
                            ("type", Value::from(p.ty.as_str())),
                            ("help", Value::from(p.help)),
                        ])
                    })
                    .collect();
                qdict::object([
                    ("option", Value::from(g.name)),
                    ("parameters", Value::from(params)),
                ])
            })
            .collect();
        if let (Some(w), true) = (wanted, list.is_empty()) {
            return Err(QmpError::generic(format!("invalid option name: {w}")));
        }
        Ok(Outcome::value(Value::from(list)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cpu(index: u32, die_id: Option<u32>) -> VcpuInfo {
        VcpuInfo {
            index,
            thread_id: 4242,
            halted: true,
            pc: 0xffff_ffff_8100_0000,
            socket_id: 0,
            die_id,
            core_id: 1,
            thread_in_core: 0,
        }
    }

    #[test]
    fn cpu_properties_in_qemu_order() {
        assert_eq!(
            serde_json::to_string(&props(&cpu(0, Some(1)))).expect("json"),
            r#"{"core-id":1,"thread-id":0,"die-id":1,"socket-id":0}"#
        );
        assert_eq!(
            serde_json::to_string(&props(&cpu(0, None))).expect("json"),
            r#"{"core-id":1,"thread-id":0,"socket-id":0}"#
        );
        assert_eq!(qom_path(&cpu(3, None)), "/machine/unattached/device[3]");
    }

    #[tokio::test]
    async fn command_line_options_come_from_the_cli_table() {
        let (_vm, ctx) = Context::for_tests();
        let all = query_command_line_options(ctx.clone(), Map::new())
            .await
            .expect("all")
            .value;
        let names: Vec<&str> = all
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|o| o["option"].as_str())
            .collect();
        let table: Vec<&str> = OPTION_GROUPS.iter().map(|g| g.name).collect();
        assert_eq!(names, table);
        let mut args = Map::new();
        args.insert("option".into(), json!("memory"));
        let memory = query_command_line_options(ctx.clone(), args)
            .await
            .expect("memory")
            .value;
        assert_eq!(
            memory,
            json!([{"parameters": [{"name": "size", "help": "guest RAM", "type": "size"}],
                    "option": "memory"}])
        );
        let mut args = Map::new();
        args.insert("option".into(), json!("kernel"));
        let e = query_command_line_options(ctx, args)
            .await
            .expect_err("no such group");
        assert_eq!(e.desc, "invalid option name: kernel");
    }
}
