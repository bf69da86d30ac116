//! The fd commands: `getfd`, `closefd` (the session's named fds), `add-fd`, `remove-fd`,
//! `query-fdsets` (the fd sets all sessions share). The rules live in [`crate::fds`]; this module
//! maps arguments and results to QMP, with QEMU's member order in the replies.

use serde_json::{Map, Value};

use super::{ArgSpec, ArgType, Command, Context, HandlerFuture, Outcome};
use crate::fds::FdError;
use crate::qmp::protocol::QmpError;

const FDNAME: &[ArgSpec] = &[ArgSpec {
    name: "fdname",
    ty: ArgType::Str,
    optional: false,
}];

pub(super) static COMMANDS: &[Command] = &[
    Command {
        name: "getfd",
        args: FDNAME,
        handler: getfd,
    },
    Command {
        name: "closefd",
        args: FDNAME,
        handler: closefd,
    },
    Command {
        name: "add-fd",
        args: &[
            ArgSpec {
                name: "fdset-id",
                ty: ArgType::Int,
                optional: true,
            },
            ArgSpec {
                name: "opaque",
                ty: ArgType::Str,
                optional: true,
            },
        ],
        handler: add_fd,
    },
    Command {
        name: "remove-fd",
        args: &[
            ArgSpec {
                name: "fdset-id",
                ty: ArgType::Int,
                optional: false,
            },
            ArgSpec {
                name: "fd",
                ty: ArgType::Int,
                optional: true,
            },
        ],
        handler: remove_fd,
    },
    Command {
        name: "query-fdsets",
        args: &[],
        handler: query_fdsets,
    },
];

fn fd_error(e: FdError) -> QmpError {
    QmpError::generic(e.to_string())
}

fn str_arg(args: &Map<String, Value>, name: &str) -> Option<String> {
    args.get(name).and_then(Value::as_str).map(str::to_string)
}

/// An optional QAPI `int` (int64). The schema check lets any JSON integer through; QEMU's
/// visitor refuses one beyond int64 with the same message as any other wrong type.
fn int_arg(args: &Map<String, Value>, name: &str) -> Result<Option<i64>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| {
            QmpError::generic(format!(
                "Invalid parameter type for '{name}', expected: integer"
            ))
        }),
    }
}

fn getfd(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let name = str_arg(&args, "fdname").unwrap_or_default();
        let replaced = ctx.session.fds().getfd(&name).map_err(fd_error)?;
        // The fd the name stood for is closed here, outside the session's lock.
        drop(replaced);
        Ok(Outcome::empty())
    })
}

fn closefd(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let name = str_arg(&args, "fdname").unwrap_or_default();
        let fd = ctx.session.fds().closefd(&name).map_err(fd_error)?;
        drop(fd);
        Ok(Outcome::empty())
    })
}

fn add_fd(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let fdset_id = int_arg(&args, "fdset-id")?;
        let opaque = str_arg(&args, "opaque");
        // As QEMU: the missing fd is reported before anything about the set.
        let fd = ctx
            .session
            .fds()
            .take_received()
            .ok_or_else(|| fd_error(FdError::NoneSupplied))?;
        let added = ctx
            .shared
            .fdsets
            .add(fd, fdset_id, opaque)
            .map_err(fd_error)?;
        let mut m = Map::new();
        m.insert("fd".into(), added.fd.into());
        m.insert("fdset-id".into(), added.fdset_id.into());
        Ok(Outcome::value(Value::Object(m)))
    })
}

fn remove_fd(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let fdset_id = int_arg(&args, "fdset-id")?.unwrap_or_default();
        let fd = int_arg(&args, "fd")?;
        ctx.shared.fdsets.remove(fdset_id, fd).map_err(fd_error)?;
        Ok(Outcome::empty())
    })
}

fn query_fdsets(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let sets = ctx
            .shared
            .fdsets
            .query()
            .into_iter()
            .map(|set| {
                let fds = set
                    .fds
                    .into_iter()
                    .map(|f| {
                        let mut m = Map::new();
                        m.insert("fd".into(), f.fd.into());
                        if let Some(o) = f.opaque {
                            m.insert("opaque".into(), o.into());
                        }
                        Value::Object(m)
                    })
                    .collect();
                let mut m = Map::new();
                m.insert("fds".into(), Value::Array(fds));
                m.insert("fdset-id".into(), set.fdset_id.into());
                Value::Object(m)
            })
            .collect();
        Ok(Outcome::value(Value::Array(sets)))
    })
}

#[cfg(test)]
mod tests {
    use super::super::{args, Registry};
    use super::*;
    use serde_json::json;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn some_fd() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("open").into()
    }

    #[tokio::test]
    async fn commands_through_the_registry() {
        let r = Registry::new();
        let (_vm, ctx) = Context::for_tests();
        let run = |name: &str, a: Value| {
            r.prepare(name, args(a), true, ctx.clone())
                .expect("prepares")
        };
        let e = run("getfd", json!({"fdname": "a"}))
            .await
            .expect_err("no fd");
        assert_eq!(e.desc, "No file descriptor supplied via SCM_RIGHTS");
        ctx.session.fds().offer(vec![some_fd()]);
        run("getfd", json!({"fdname": "a"})).await.expect("getfd");
        run("closefd", json!({"fdname": "a"}))
            .await
            .expect("closefd");
        let e = run("closefd", json!({"fdname": "a"}))
            .await
            .expect_err("gone");
        assert_eq!(e.desc, "File descriptor named 'a' not found");

        let fd = some_fd();
        let raw = fd.as_raw_fd();
        ctx.session.fds().offer(vec![fd]);
        let ok = run("add-fd", json!({"fdset-id": 3, "opaque": "o"}))
            .await
            .expect("add-fd");
        assert_eq!(ok.value, json!({"fd": raw, "fdset-id": 3}));
        let q = run("query-fdsets", json!({})).await.expect("query");
        assert_eq!(
            q.value,
            json!([{"fds": [{"fd": raw, "opaque": "o"}], "fdset-id": 3}])
        );
        ctx.session.fds().offer(vec![some_fd()]);
        let e = run("add-fd", json!({"fdset-id": u64::MAX}))
            .await
            .expect_err("beyond int64");
        assert_eq!(
            e.desc,
            "Invalid parameter type for 'fdset-id', expected: integer"
        );
        let e = run("remove-fd", json!({"fdset-id": 3, "fd": raw + 1}))
            .await
            .expect_err("no such fd");
        assert_eq!(
            e.desc,
            format!(
                "File descriptor named 'fdset-id:3, fd:{}' not found",
                raw + 1
            )
        );
        run("remove-fd", json!({"fdset-id": 3, "fd": raw}))
            .await
            .expect("remove-fd");
        let q = run("query-fdsets", json!({})).await.expect("query");
        assert_eq!(q.value, json!([]));
    }
}
