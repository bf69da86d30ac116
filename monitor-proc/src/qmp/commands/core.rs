//! The core commands: negotiation, run state and version (`qmp_capabilities`, `query-status`,
//! `query-version`, `stop`, `cont`, `system_reset`, `system_powerdown`, `quit`).

use serde_json::{Map, Value};

use super::{
    ArgSpec, ArgType, Command, Context, HandlerFuture, Outcome, PostAction, QMP_CAPABILITIES,
};
use crate::qmp::protocol::{version_value, QmpError};

/// The QMP capabilities QEMU defines; Bulkhead offers none of them yet.
const QMP_CAPABILITY_VALUES: &[&str] = &["oob"];

pub(super) static COMMANDS: &[Command] = &[
    Command {
        name: QMP_CAPABILITIES,
        args: &[ArgSpec {
            name: "enable",
            ty: ArgType::EnumList(QMP_CAPABILITY_VALUES),
            optional: true,
        }],
        handler: qmp_capabilities,
    },
    Command {
        name: "query-status",
        args: &[],
        handler: query_status,
    },
    Command {
        name: "query-version",
        args: &[],
        handler: query_version,
    },
    Command {
        name: "stop",
        args: &[],
        handler: stop,
    },
    Command {
        name: "cont",
        args: &[],
        handler: cont,
    },
    Command {
        name: "system_reset",
        args: &[],
        handler: system_reset,
    },
    Command {
        name: "system_powerdown",
        args: &[],
        handler: system_powerdown,
    },
    Command {
        name: "quit",
        args: &[],
        handler: quit,
    },
];

fn qmp_capabilities(_ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        // Every value passed validation, but none is offered (the greeting lists none).
        if let Some(Value::Array(list)) = args.get("enable") {
            let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
            if !names.is_empty() {
                return Err(QmpError::generic(format!(
                    "Capability {} not available",
                    names.join(", ")
                )));
            }
        }
        Ok(Outcome {
            value: Value::Object(Map::new()),
            post: Some(PostAction::EnterCommandMode),
        })
    })
}

fn query_status(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let state = ctx.shared.vm.status().await?;
        let mut m = Map::new();
        m.insert("status".into(), state.as_str().into());
        m.insert("singlestep".into(), false.into());
        m.insert(
            "running".into(),
            (state == crate::vm::RunState::Running).into(),
        );
        Ok(Outcome::value(Value::Object(m)))
    })
}

fn query_version(_ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move { Ok(Outcome::value(version_value())) })
}

fn stop(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        ctx.shared.vm.stop().await?;
        Ok(Outcome::empty())
    })
}

fn cont(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        ctx.shared.vm.cont().await?;
        Ok(Outcome::empty())
    })
}

fn system_reset(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        ctx.shared.vm.reset().await?;
        Ok(Outcome::empty())
    })
}

/// `system_powerdown`: the guest's ACPI power button, then POWERDOWN after the reply (QEMU
/// 7.2 emits it from its main loop once the command has answered, in every run state).
fn system_powerdown(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        ctx.shared.vm.powerdown().await?;
        Ok(Outcome {
            value: Value::Object(Map::new()),
            post: Some(PostAction::Emit(crate::qmp::events::Event::Powerdown)),
        })
    })
}

fn quit(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        ctx.shared.vm.quit().await?;
        Ok(Outcome {
            value: Value::Object(Map::new()),
            post: Some(PostAction::Exit),
        })
    })
}
