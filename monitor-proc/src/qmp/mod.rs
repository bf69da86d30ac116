//! The QMP front end.
//!
//! - [`protocol`]: the wire format (stream splitting, request validation, QEMU-shaped output);
//! - [`commands`]: the command registry with argument schemas and handlers;
//! - [`events`]: event types and the bus that fans them out to sessions;
//! - [`session`]: one connection (negotiation, dispatch, bounded output queue, SCM_RIGHTS);
//! - [`server`]: the `-qmp` listeners.

pub mod commands;
pub mod events;
pub mod protocol;
pub mod server;
pub mod session;
