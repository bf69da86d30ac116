//! The command registry: every QMP command with its argument schema and handler.
//!
//! Dispatch follows QEMU's order of checks, so clients get the same error for the same mistake:
//! capabilities negotiation first (any other command, even an unknown one, is refused with
//! "Expecting capabilities negotiation with 'qmp_capabilities'"), then the command lookup
//! ("The command X has not been found"), then the arguments against the command's schema
//! ("Parameter 'x' is unexpected", "Parameter 'x' is missing", "Invalid parameter type for
//! 'x', expected: T"), and only then the handler. Adding a command is one [`Command`] entry;
//! a handler receives validated arguments and a [`Context`] with the VM and the session.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde_json::{Map, Value};

use super::protocol::QmpError;
use super::session::{SessionCtx, Shared};

mod block;
mod core;
mod fds;
mod hmp;
mod introspect;
mod net;
pub mod sandbox;
mod unsupported;

pub use unsupported::UNSUPPORTED;

/// Every table of implemented commands; a module per family adds its own.
const TABLES: &[&[Command]] = &[
    core::COMMANDS,
    block::COMMANDS,
    fds::COMMANDS,
    introspect::COMMANDS,
    hmp::COMMANDS,
    sandbox::COMMANDS,
    net::COMMANDS,
];

/// What a handler's future resolves to.
pub type HandlerResult = Result<Outcome, QmpError>;
/// A handler's future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
/// A command handler.
pub type Handler = fn(Context, Map<String, Value>) -> HandlerFuture;

/// JSON types an argument may be declared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    /// A JSON string.
    Str,
    /// A JSON integer.
    Int,
    /// A JSON boolean.
    Bool,
    /// A JSON object.
    Object,
    /// A list of strings, each one of the given values.
    EnumList(&'static [&'static str]),
    /// Any JSON value.
    Any,
}

impl ArgType {
    fn name(self) -> &'static str {
        match self {
            ArgType::Str => "string",
            ArgType::Int => "integer",
            ArgType::Bool => "boolean",
            ArgType::Object => "object",
            ArgType::EnumList(_) => "array",
            ArgType::Any => "any",
        }
    }
}

/// One declared argument.
#[derive(Debug, Clone, Copy)]
pub struct ArgSpec {
    /// The member name.
    pub name: &'static str,
    /// Its type.
    pub ty: ArgType,
    /// May be left out.
    pub optional: bool,
}

/// What the session does after queuing a successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostAction {
    /// Leave capabilities negotiation: the session gets events from now on.
    EnterCommandMode,
    /// Ask the monitor to exit (after `quit`).
    Exit,
    /// Emit an event once the reply is out (`system_powerdown`'s POWERDOWN).
    Emit(crate::qmp::events::Event),
}

/// A successful handler result.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The `return` value.
    pub value: Value,
    /// Follow-up for the session.
    pub post: Option<PostAction>,
}

impl Outcome {
    /// `{"return": {}}`.
    pub fn empty() -> Self {
        Outcome {
            value: Value::Object(Map::new()),
            post: None,
        }
    }

    /// `{"return": value}`.
    pub fn value(value: Value) -> Self {
        Outcome { value, post: None }
    }
}

/// What a handler can reach: what all sessions share (the VM, the fd sets, the registry, the
/// machine's facts) and the calling session's own state (its id and its fds).
#[derive(Debug, Clone)]
pub struct Context {
    /// Shared by every session.
    pub shared: std::sync::Arc<Shared>,
    /// The calling session.
    pub session: std::sync::Arc<SessionCtx>,
}

impl Context {
    /// A context on a `-M none` machine with a fresh bus, for unit tests. The returned VM actor
    /// is not running: commands that reach it wait until it is spawned.
    #[doc(hidden)]
    pub fn for_tests() -> (crate::vm::Vm, Context) {
        let bus = super::events::EventBus::new();
        let (exit, _rx) = crate::vm::ExitRequest::new();
        let (vm, handle) = crate::vm::Vm::new(bus.clone(), None, false, exit.clone());
        let shared = std::sync::Arc::new(Shared::new(
            bus,
            handle,
            exit,
            crate::info::MachineInfo::default(),
        ));
        let session = std::sync::Arc::new(SessionCtx::new(1));
        (vm, Context { shared, session })
    }
}

/// One command.
#[derive(Debug, Clone, Copy)]
pub struct Command {
    /// Its name.
    pub name: &'static str,
    /// Its arguments.
    pub args: &'static [ArgSpec],
    /// Its handler.
    pub handler: Handler,
}

/// The name of the negotiation command.
pub const QMP_CAPABILITIES: &str = "qmp_capabilities";

/// All commands, by name.
#[derive(Debug)]
pub struct Registry {
    commands: BTreeMap<&'static str, Command>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// The registry with every command Bulkhead implements.
    pub fn new() -> Self {
        let mut r = Registry {
            commands: BTreeMap::new(),
        };
        for table in TABLES {
            for c in *table {
                let old = r.commands.insert(c.name, *c);
                debug_assert!(old.is_none(), "command {} registered twice", c.name);
            }
        }
        r
    }

    /// Looks a command up.
    pub fn get(&self, name: &str) -> Option<&Command> {
        self.commands.get(name)
    }

    /// Every command name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.commands.keys().copied()
    }

    /// Checks negotiation state, finds the command and validates its arguments, as QEMU does.
    /// Returns the handler's future, ready to run.
    pub fn prepare(
        &self,
        name: &str,
        args: Map<String, Value>,
        negotiated: bool,
        ctx: Context,
    ) -> Result<HandlerFuture, QmpError> {
        if !negotiated && name != QMP_CAPABILITIES {
            return Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        if negotiated && name == QMP_CAPABILITIES {
            return Err(QmpError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let cmd = self
            .get(name)
            .ok_or_else(|| match unsupported::reason(name) {
                Some(why) => QmpError::not_found(format!(
                    "The command {name} is not supported by Bulkhead: {why}"
                )),
                None => QmpError::not_found(format!("The command {name} has not been found")),
            })?;
        validate_args(cmd.args, &args)?;
        Ok((cmd.handler)(ctx, args))
    }
}

/// Validates `args` against `spec` with QEMU's messages.
pub fn validate_args(spec: &[ArgSpec], args: &Map<String, Value>) -> Result<(), QmpError> {
    for key in args.keys() {
        if !spec.iter().any(|s| s.name == key) {
            return Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected"
            )));
        }
    }
    for s in spec {
        let Some(v) = args.get(s.name) else {
            if s.optional {
                continue;
            }
            return Err(QmpError::generic(format!(
                "Parameter '{}' is missing",
                s.name
            )));
        };
        let ok = match s.ty {
            ArgType::Str => v.is_string(),
            ArgType::Int => v.is_i64() || v.is_u64(),
            ArgType::Bool => v.is_boolean(),
            ArgType::Object => v.is_object(),
            ArgType::Any => true,
            ArgType::EnumList(allowed) => {
                let Some(items) = v.as_array() else {
                    return Err(type_error(s));
                };
                for (i, item) in items.iter().enumerate() {
                    let Some(text) = item.as_str() else {
                        return Err(QmpError::generic(format!(
                            "Invalid parameter type for '{}[{i}]', expected: string",
                            s.name
                        )));
                    };
                    if !allowed.contains(&text) {
                        return Err(QmpError::generic(format!(
                            "Parameter '{}[{i}]' does not accept value '{text}'",
                            s.name
                        )));
                    }
                }
                true
            }
        };
        if !ok {
            return Err(type_error(s));
        }
    }
    Ok(())
}

fn type_error(s: &ArgSpec) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{}', expected: {}",
        s.name,
        s.ty.name()
    ))
}

/// The members of a JSON object literal, for unit tests that build arguments with `json!`.
#[cfg(test)]
pub(crate) fn args(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::protocol::ErrorClass;
    use serde_json::json;

    #[test]
    fn argument_validation_messages() {
        let spec = [
            ArgSpec {
                name: "a",
                ty: ArgType::Str,
                optional: false,
            },
            ArgSpec {
                name: "b",
                ty: ArgType::Int,
                optional: true,
            },
        ];
        assert!(validate_args(&spec, &args(json!({"a": "x"}))).is_ok());
        assert!(validate_args(&spec, &args(json!({"a": "x", "b": 3}))).is_ok());
        let e = |v| validate_args(&spec, &args(v)).expect_err("error").desc;
        assert_eq!(e(json!({"a": "x", "c": 1})), "Parameter 'c' is unexpected");
        assert_eq!(e(json!({})), "Parameter 'a' is missing");
        assert_eq!(
            e(json!({"a": 1})),
            "Invalid parameter type for 'a', expected: string"
        );
        assert_eq!(
            e(json!({"a": "x", "b": 1.5})),
            "Invalid parameter type for 'b', expected: integer"
        );
    }

    #[test]
    fn registry_has_the_minimum_command_set() {
        let r = Registry::new();
        let names: Vec<_> = r.names().collect();
        for c in [
            "cont",
            "qmp_capabilities",
            "query-status",
            "query-version",
            "quit",
            "stop",
            "system_reset",
        ] {
            assert!(names.contains(&c), "{c}");
        }
    }

    #[tokio::test]
    async fn dispatch_order_matches_qemu() {
        let r = Registry::new();
        let (_vm, ctx) = Context::for_tests();
        let err = |name: &str, a: Value, negotiated: bool| {
            r.prepare(name, args(a), negotiated, ctx.clone())
                .err()
                .expect("should fail")
        };
        let e = err("nope", json!({}), false);
        assert_eq!(e.class, ErrorClass::CommandNotFound);
        assert_eq!(
            e.desc,
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        let e = err("query-status", json!({"x": 1}), false);
        assert_eq!(
            e.desc,
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        let e = err("nope", json!({}), true);
        assert_eq!(e.class, ErrorClass::CommandNotFound);
        assert_eq!(e.desc, "The command nope has not been found");
        let e = err(QMP_CAPABILITIES, json!({}), true);
        assert_eq!(e.class, ErrorClass::CommandNotFound);
        assert_eq!(
            e.desc,
            "Capabilities negotiation is already complete, command ignored"
        );
        let e = err("stop", json!({"x": 1}), true);
        assert_eq!(e.class, ErrorClass::GenericError);
        assert_eq!(e.desc, "Parameter 'x' is unexpected");
        let e = err(QMP_CAPABILITIES, json!({"enable": ["foo"]}), false);
        assert_eq!(e.desc, "Parameter 'enable[0]' does not accept value 'foo'");
        let e = err(QMP_CAPABILITIES, json!({"enable": "oob"}), false);
        assert_eq!(
            e.desc,
            "Invalid parameter type for 'enable', expected: array"
        );
        // Valid negotiation, and the 'oob' capability that is not offered.
        let ok = r
            .prepare(QMP_CAPABILITIES, Map::new(), false, ctx.clone())
            .expect("ok")
            .await
            .expect("ok");
        assert_eq!(ok.post, Some(PostAction::EnterCommandMode));
        let e = r
            .prepare(
                QMP_CAPABILITIES,
                args(json!({"enable": ["oob"]})),
                false,
                ctx.clone(),
            )
            .expect("validates")
            .await
            .expect_err("not offered");
        assert_eq!(e.desc, "Capability oob not available");
        let v = r
            .prepare("query-version", Map::new(), true, ctx.clone())
            .expect("ok")
            .await
            .expect("ok");
        assert_eq!(v.value["qemu"]["major"], json!(2));
    }
}
