//! The QMP front end.
//!
//! - [`protocol`]: the wire format (stream splitting, request validation, QEMU-shaped output);
//! - [`commands`]: the command registry with argument schemas and handlers;
//! - [`schema`]: what `query-qmp-schema` and `query-events` report (return and event types);
//! - [`qdict`]: QEMU's member order for the objects replies carry;
//! - [`events`]: event types and the bus that fans them out to sessions;
//! - [`session`]: one connection (negotiation, dispatch, bounded output queue, SCM_RIGHTS);
//! - [`server`]: the `-qmp` listeners.

pub mod commands;
pub mod events;
pub mod protocol;
pub mod qdict;
pub mod schema;
pub mod server;
pub mod session;
