//! The error that ends a back end (blockd, netd) in worker mode.

use crate::args::ArgsError;
use crate::confine::PrepareError;

/// Errors that end a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Bad command line.
    #[error("{message}\n{usage}")]
    Usage {
        /// What is wrong.
        message: ArgsError,
        /// The program's usage line.
        usage: &'static str,
    },
    /// A step before serving failed.
    #[error("{what}: {source}")]
    Setup {
        /// The step.
        what: &'static str,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The ipc channel failed.
    #[error("ipc: {0}")]
    Ipc(#[from] bulkhead_ipc::Error),
}

impl From<PrepareError> for WorkerError {
    fn from(e: PrepareError) -> WorkerError {
        WorkerError::Setup {
            what: e.what,
            source: Box::new(e.source),
        }
    }
}

/// Makes an error of step `what` a [`WorkerError::Setup`] (for `map_err`).
pub fn setup_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> WorkerError {
    move |e| WorkerError::Setup {
        what,
        source: Box::new(e),
    }
}
