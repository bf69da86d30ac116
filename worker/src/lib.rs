//! What every Bulkhead worker process (`bulkhead-vcpu`, and `bulkhead-blockd` and
//! `bulkhead-netd` in worker mode) shares:
//!
//! - [`logger`]: the stderr logger (stderr is a worker's log channel to the monitor), lines
//!   `<program>[pid] LEVEL target: message` at the level `BULKHEAD_LOG` names;
//! - [`confine`]: the process hygiene before [`bulkhead_sandbox::enter`] and the log line
//!   after it;
//! - [`args`]: the worker-mode command line the monitor's launcher gives a back end,
//!   `--ipc-fd N [--sandbox on|off|allow-weak] [--mem-bytes N] [--queues N]`;
//! - [`error`]: the error that ends a back end in worker mode;
//! - [`report`]: what [`bulkhead_sandbox::enter`] did in this process, as the ipc
//!   [`SandboxReport`](bulkhead_ipc::messages::SandboxReport) the monitor asks for
//!   (`x-query-sandbox`).
//!
//! It depends on both `bulkhead-ipc` and `bulkhead-sandbox`, which know nothing of each other:
//! the one place a sandbox record becomes an ipc message is here.

pub mod args;
pub mod confine;
pub mod error;
pub mod logger;
pub mod report;

pub use args::{ArgsError, WorkerArgs};
pub use error::{setup_err, WorkerError};
pub use report::sandbox_report;
