//! File descriptors passed in by clients: what a session holds (fds received with
//! `SCM_RIGHTS` and waiting for a command, and the fds `getfd` named) and the fd sets all
//! sessions share (`add-fd`).

use std::os::fd::OwnedFd;

/// Most fds a session may hold between commands; more are closed on arrival.
pub const MAX_PENDING_FDS: usize = 16;

/// One session's fds.
#[derive(Debug, Default)]
pub struct SessionFds {
    pending: Vec<OwnedFd>,
}

impl SessionFds {
    /// Holds fds that arrived with `SCM_RIGHTS` until the next command; beyond
    /// [`MAX_PENDING_FDS`] they are closed. Returns how many were closed.
    pub fn add_received(&mut self, fds: Vec<OwnedFd>) -> usize {
        let mut dropped = 0;
        for fd in fds {
            if self.pending.len() < MAX_PENDING_FDS {
                self.pending.push(fd);
            } else {
                dropped += 1;
            }
        }
        dropped
    }

    /// Takes the fds received for the current command (for `getfd`/`add-fd`).
    pub fn take_pending(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.pending)
    }
}

/// The fd sets every session shares.
#[derive(Debug, Default)]
pub struct FdSets {}
