//! Network commands: `netdev_add`, `netdev_del`, `device_add` / `device_del` (of a
//! `virtio-net-pci`), `set_link` and `query-rx-filter`, executed by the VM actor on its NICs
//! ([`crate::nics`]); HMP's `info network` prints [`crate::nics::Nics::info_network`].
//!
//! `netdev_add` takes QEMU's tap members: `fd` is the name of an fd the session received with
//! `getfd` (taken from the session once the netdev exists, as QEMU does), or `ifname` with `script`/`downscript` "no"
//! (refused once the monitor has confined itself: it can no longer open `/dev/net/tun`).
//! Members bulkhead does not implement (`vhost` on, `queues`, `fds`, ...) are refused by name.

use serde_json::{Map, Value};

use super::{ArgSpec, ArgType, Command, Context, HandlerFuture, Outcome};
use crate::nics::{NetAnswer, NetOp, NewNetdev};
use crate::qmp::protocol::{ErrorClass, QmpError};

const fn arg(name: &'static str, ty: ArgType, optional: bool) -> ArgSpec {
    ArgSpec { name, ty, optional }
}

pub(super) static COMMANDS: &[Command] = &[
    Command {
        name: "netdev_add",
        args: &[
            arg("type", ArgType::Str, false),
            arg("id", ArgType::Str, false),
            arg("fd", ArgType::Str, true),
            arg("ifname", ArgType::Str, true),
            arg("script", ArgType::Str, true),
            arg("downscript", ArgType::Str, true),
            arg("vnet_hdr", ArgType::Bool, true),
            arg("vhost", ArgType::Bool, true),
            arg("vhostforce", ArgType::Bool, true),
            arg("fds", ArgType::Str, true),
            arg("vhostfd", ArgType::Str, true),
            arg("vhostfds", ArgType::Str, true),
            arg("br", ArgType::Str, true),
            arg("helper", ArgType::Str, true),
            arg("sndbuf", ArgType::Int, true),
            arg("queues", ArgType::Int, true),
            arg("poll-us", ArgType::Int, true),
        ],
        handler: netdev_add,
    },
    Command {
        name: "netdev_del",
        args: &[arg("id", ArgType::Str, false)],
        handler: netdev_del,
    },
    Command {
        name: "device_add",
        args: &[
            arg("driver", ArgType::Str, false),
            arg("bus", ArgType::Str, true),
            arg("id", ArgType::Str, true),
            arg("netdev", ArgType::Str, true),
            arg("mac", ArgType::Str, true),
            arg("addr", ArgType::Any, true),
            // virtio-net-pci multiqueue (QEMU 7.2 takes "on"/"off" or a boolean for mq)
            arg("mq", ArgType::Any, true),
            arg("vectors", ArgType::Any, true),
            // virtio-blk-pci (super::block)
            arg("drive", ArgType::Str, true),
            arg("serial", ArgType::Str, true),
            arg("num-queues", ArgType::Any, true),
            arg("queue-size", ArgType::Any, true),
            arg("werror", ArgType::Any, true),
            arg("rerror", ArgType::Any, true),
        ],
        handler: device_add,
    },
    Command {
        name: "device_del",
        args: &[arg("id", ArgType::Str, false)],
        handler: device_del,
    },
    Command {
        name: "set_link",
        args: &[
            arg("name", ArgType::Str, false),
            arg("up", ArgType::Bool, false),
        ],
        handler: set_link,
    },
    Command {
        name: "query-rx-filter",
        args: &[arg("name", ArgType::Str, true)],
        handler: query_rx_filter,
    },
];

fn str_arg(args: &Map<String, Value>, key: &str) -> Option<String> {
    args.get(key).and_then(Value::as_str).map(str::to_string)
}

/// The arguments as `-netdev`'s `key=value` strings (booleans as on/off).
fn pairs(args: &Map<String, Value>) -> Vec<(String, String)> {
    args.iter()
        .map(|(k, v)| {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                other => other.to_string(),
            };
            (k.clone(), s)
        })
        .collect()
}

async fn done(ctx: &Context, op: NetOp) -> Result<Outcome, QmpError> {
    match ctx.shared.vm.net(op).await? {
        NetAnswer::Value(v) => Ok(Outcome::value(v)),
        NetAnswer::Text(t) => Ok(Outcome::value(Value::String(t))),
        NetAnswer::Done => Ok(Outcome::empty()),
    }
}

fn netdev_add(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let spec = crate::nics::netdev_from_qmp(&pairs(&args)).map_err(QmpError::generic)?;
        let names: Vec<String> = match &spec.source {
            crate::nics::TapSource::Fd(_) => vec![str_arg(&args, "fd").unwrap_or_default()],
            crate::nics::TapSource::Fds(l) => l.clone(),
            crate::nics::TapSource::Ifname(..) => Vec::new(),
        };
        let tap = match spec.source {
            crate::nics::TapSource::Ifname(name, queues) => Err((name, queues)),
            crate::nics::TapSource::Fd(_) | crate::nics::TapSource::Fds(_) => {
                let mut queues = Vec::new();
                for name in &names {
                    if name.parse::<i32>().is_ok() {
                        return Err(QmpError::generic(format!(
                            "fd={name}: bulkhead takes a tap by the name it was given with \
                             'getfd', not by fd number"
                        )));
                    }
                    if names.iter().filter(|n| *n == name).count() > 1 {
                        return Err(QmpError::generic(format!("fds: '{name}' is given twice")));
                    }
                    // A duplicate: the name is taken from the session only once the netdev
                    // exists.
                    let fd = ctx
                        .session
                        .fds()
                        .dup_named(name)
                        .map_err(|e| QmpError::generic(e.to_string()))?;
                    let info = {
                        use std::os::fd::AsRawFd;
                        format!("fd={}", fd.as_raw_fd())
                    };
                    queues.push((fd, info));
                }
                Ok(queues)
            }
        };
        let named = if tap.is_ok() { names } else { Vec::new() };
        let r = done(&ctx, NetOp::NetdevAdd(NewNetdev { id: spec.id, tap })).await?;
        for name in named {
            // As QEMU: the netdev consumed the named fds.
            let _ = ctx.session.fds().take_named(&name);
        }
        Ok(r)
    })
}

fn netdev_del(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let id = str_arg(&args, "id").unwrap_or_default();
        done(&ctx, NetOp::NetdevDel(id)).await
    })
}

fn device_add(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let driver = str_arg(&args, "driver").unwrap_or_default();
        if matches!(driver.as_str(), "virtio-blk-pci" | "virtio-blk") {
            return super::block::device_add(&ctx, pairs(&args)).await;
        }
        if !matches!(driver.as_str(), "virtio-net-pci" | "virtio-net") {
            return Err(QmpError::generic(format!(
                "device_add: driver '{driver}' is not supported by bulkhead (it can add \
                 virtio-net-pci and virtio-blk-pci)"
            )));
        }
        done(&ctx, NetOp::DeviceAdd(pairs(&args))).await
    })
}

fn device_del(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let given = str_arg(&args, "id").unwrap_or_default();
        let id = peripheral_id(&given).to_owned();
        if let Some(r) = super::block::device_del(&ctx, &id).await {
            return r;
        }
        match done(&ctx, NetOp::DeviceDel(id)).await {
            // QEMU names the device as the client did.
            Err(e) if e.class == ErrorClass::DeviceNotFound => Err(QmpError {
                class: ErrorClass::DeviceNotFound,
                desc: format!("Device '{given}' not found"),
            }),
            r => r,
        }
    })
}

/// The id `device_del` looks up: QEMU resolves its `id` as a QOM path below
/// `/machine/peripheral`, so the absolute path `/machine/peripheral/ID` names the device `ID`
/// too. Anything else is taken as it is (an anonymous device's `peripheral-anon` path is not
/// resolved: docs/QMP.md).
fn peripheral_id(id: &str) -> &str {
    id.strip_prefix("/machine/peripheral/")
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .unwrap_or(id)
}

fn set_link(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let name = str_arg(&args, "name").unwrap_or_default();
        let up = args.get("up").and_then(Value::as_bool).unwrap_or(true);
        done(&ctx, NetOp::SetLink { name, up }).await
    })
}

fn query_rx_filter(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move { done(&ctx, NetOp::QueryRxFilter(str_arg(&args, "name"))).await })
}

/// HMP `info network`.
pub(super) async fn info_network(ctx: &Context) -> Result<String, QmpError> {
    match ctx.shared.vm.net(NetOp::InfoNetwork).await? {
        NetAnswer::Text(t) => Ok(t),
        _ => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::peripheral_id;

    #[test]
    fn device_del_takes_a_peripheral_qom_path_for_the_id() {
        assert_eq!(peripheral_id("vd0"), "vd0");
        assert_eq!(peripheral_id("/machine/peripheral/vd0"), "vd0");
        // Not a device of /machine/peripheral itself: looked up as given (and not found).
        for other in [
            "/machine/peripheral/",
            "/machine/peripheral/vd0/virtio-backend",
            "/machine/peripheral-anon/device[0]",
            "machine/peripheral/vd0",
        ] {
            assert_eq!(peripheral_id(other), other);
        }
    }
}
