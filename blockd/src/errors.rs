//! The `rerror`/`werror` error policy: what happens to a request the host failed, as QEMU 7.2
//! does it (`blk_get_error_action`, `blk_error_action` in block/block-backend.c and
//! `virtio_blk_handle_rw_error` in hw/block/virtio-blk.c).
//!
//! Reads follow `rerror`, writes, flushes, discards and write-zeroes `werror`;
//! [`ErrorPolicy::action`] turns the policy and the errno into an action:
//!
//! * `report`: the guest gets `VIRTIO_BLK_S_IOERR`;
//! * `ignore`: the request completes as if it had succeeded;
//! * `stop`: the request is not completed but held here, in failure order, and the device
//!   takes no new request from any queue until the monitor says the VM runs again
//!   ([`ErrorState::resume_done`] after the held requests were retried, in order, each under the
//!   same policy again).
//!
//! Every failure is a [`BlockEvent::IoError`] for the monitor (`BLOCK_IO_ERROR`), with QEMU's
//! `reason` (glibc's `strerror` text) and `nospace`. Guest-caused errors (bad descriptors, a
//! range beyond the disk, a write to a read-only disk) never come here: they keep their status.
//!
//! A guest must not be able to flood the monitor with events: QEMU does not rate-limit
//! `BLOCK_IO_ERROR`, but here `report` and `ignore` events pass an [`EventBudget`] (a burst of
//! [`EVENT_BURST`], then [`EVENT_RATE`] a second; the rest are counted and the count is logged
//! with the next event sent). A `stop` event is always sent: each one holds a request and stops
//! the device, so a guest cannot make more of them than it has requests in its queues before
//! the monitor has resumed it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use bulkhead_ipc::messages::{BlockEvent, BlockProtocol, ErrorAction, ErrorPolicy};
use bulkhead_ipc::Channel;

use crate::request::HostError;

/// `report`/`ignore` events sent at once before the rate applies.
pub const EVENT_BURST: f64 = 32.0;
/// `report`/`ignore` events a second, in the long run.
pub const EVENT_RATE: f64 = 10.0;

/// The two policies of a disk (QEMU's defaults for a `-device`'s BlockBackend are `report` and
/// `enospc`; standalone, with no monitor to resume the device, both are `report`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policies {
    /// For reads.
    pub rerror: ErrorPolicy,
    /// For writes, flushes, discards and write-zeroes.
    pub werror: ErrorPolicy,
}

impl Policies {
    /// The action for `e`.
    pub fn action(&self, e: &HostError) -> ErrorAction {
        let p = if e.write { self.werror } else { self.rerror };
        p.action(e.errno)
    }
}

/// glibc's `strerror` text for `errno` (QEMU's `reason`), e.g. "No space left on device".
pub fn reason(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    // std formats "<strerror_r text> (os error N)".
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The leaky bucket `report`/`ignore` events pass: decisions take the time as an argument, so
/// they are tested without clocks.
#[derive(Debug)]
pub struct EventBudget {
    tokens: f64,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for EventBudget {
    fn default() -> Self {
        EventBudget {
            tokens: EVENT_BURST,
            last: None,
            suppressed: 0,
        }
    }
}

impl EventBudget {
    /// At `now`, whether an event may be sent (`always`: a `stop` event, which is): `Some(n)`
    /// with the number suppressed since the last one sent, or `None` (counted as suppressed).
    pub fn admit(&mut self, now: Instant, always: bool) -> Option<u64> {
        if let Some(last) = self.last {
            let secs = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + secs * EVENT_RATE).min(EVENT_BURST);
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
        if !always {
            if self.tokens < 1.0 {
                self.suppressed += 1;
                return None;
            }
            self.tokens -= 1.0;
        }
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A disk's error-policy state, shared by its queue threads and the thread that resumes it.
/// `H` is a held request (the back end's; generic so the logic is tested without rings).
pub struct ErrorState<H> {
    policies: Policies,
    /// A `stop` action happened and the VM has not been resumed since.
    stopped: AtomicBool,
    /// Held requests, oldest failure first.
    held: Mutex<VecDeque<H>>,
    budget: Mutex<EventBudget>,
    /// Where the events go (the monitor's channel; none standalone: logged only).
    events: OnceLock<Arc<Channel<BlockProtocol>>>,
}

impl<H> ErrorState<H> {
    /// Running, nothing held.
    pub fn new(policies: Policies) -> ErrorState<H> {
        ErrorState {
            policies,
            stopped: AtomicBool::new(false),
            held: Mutex::new(VecDeque::new()),
            budget: Mutex::new(EventBudget::default()),
            events: OnceLock::new(),
        }
    }

    /// Sends the events to `chan` from now on (set once).
    pub fn set_events(&self, chan: Arc<Channel<BlockProtocol>>) {
        let _ = self.events.set(chan);
    }

    /// Whether the device takes no new request (stopped by a held one).
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// The action for a request that failed with `e`; sends its event. A `stop` action holds
    /// `hold()` (at the back, or at the front for a `retry` of the oldest held request) and
    /// stops the device.
    pub fn fail(&self, e: &HostError, retry: bool, hold: impl FnOnce() -> H) -> ErrorAction {
        let action = self.policies.action(e);
        if action == ErrorAction::Stop {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            if retry {
                held.push_front(hold());
            } else {
                held.push_back(hold());
            }
            self.stopped.store(true, Ordering::Release);
        }
        self.event(e, action);
        action
    }

    fn event(&self, e: &HostError, action: ErrorAction) {
        let admitted = self
            .budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(Instant::now(), action == ErrorAction::Stop);
        let Some(suppressed) = admitted else {
            return;
        };
        let reason = reason(e.errno);
        let op = if e.write { "write" } else { "read" };
        if suppressed > 0 {
            log::warn!("{suppressed} I/O error events were not sent (more than {EVENT_RATE}/s)");
        }
        log::warn!("I/O error on a {op}: {reason}; action {}", action.name());
        if let Some(chan) = self.events.get() {
            let ev = BlockEvent::IoError {
                write: e.write,
                action,
                nospace: e.errno == libc::ENOSPC,
                reason,
            };
            if let Err(err) = chan.send_event(ev) {
                log::warn!("sending an I/O error event: {err}");
            }
        }
    }

    /// The oldest held request, taken out for a retry.
    pub fn take_held(&self) -> Option<H> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    /// After the retries: runs again if nothing is held any more (a retry that stopped again
    /// keeps it stopped); returns whether it runs.
    pub fn resume_done(&self) -> bool {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.is_empty() {
            self.stopped.store(false, Ordering::Release);
            true
        } else {
            false
        }
    }

    /// Requests held now.
    pub fn held_count(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bulkhead_ipc::Frame;
    use std::time::Duration;

    fn err(errno: i32, write: bool) -> HostError {
        HostError {
            errno,
            write,
            ignored_len: 0,
        }
    }

    #[test]
    fn reads_follow_rerror_and_writes_werror() {
        let p = Policies {
            rerror: ErrorPolicy::Ignore,
            werror: ErrorPolicy::Enospc,
        };
        assert_eq!(p.action(&err(libc::EIO, false)), ErrorAction::Ignore);
        assert_eq!(p.action(&err(libc::ENOSPC, false)), ErrorAction::Ignore);
        assert_eq!(p.action(&err(libc::ENOSPC, true)), ErrorAction::Stop);
        assert_eq!(p.action(&err(libc::EIO, true)), ErrorAction::Report);
        assert_eq!(
            Policies::default().action(&err(libc::ENOSPC, true)),
            ErrorAction::Report
        );
    }

    #[test]
    fn reasons_are_glibc_strerror_texts() {
        assert_eq!(reason(libc::ENOSPC), "No space left on device");
        assert_eq!(reason(libc::EIO), "Input/output error");
        assert_eq!(reason(libc::EPERM), "Operation not permitted");
    }

    #[test]
    fn stop_holds_in_failure_order_and_a_failed_retry_goes_back_first() {
        let s: ErrorState<u32> = ErrorState::new(Policies {
            rerror: ErrorPolicy::Report,
            werror: ErrorPolicy::Stop,
        });
        let (mine, theirs) = Channel::<BlockProtocol>::pair().unwrap();
        s.set_events(Arc::new(mine));
        assert!(!s.stopped());
        assert_eq!(
            s.fail(&err(libc::EIO, false), false, || 0),
            ErrorAction::Report
        );
        assert!(!s.stopped());
        assert_eq!(
            s.fail(&err(libc::EIO, true), false, || 1),
            ErrorAction::Stop
        );
        assert_eq!(
            s.fail(&err(libc::ENOSPC, true), false, || 2),
            ErrorAction::Stop
        );
        assert!(s.stopped());
        assert_eq!(s.held_count(), 2);
        // Resume: the oldest is retried first; it fails again and goes back in front.
        assert_eq!(s.take_held(), Some(1));
        assert_eq!(s.fail(&err(libc::EIO, true), true, || 1), ErrorAction::Stop);
        assert!(!s.resume_done());
        assert!(s.stopped());
        // Next resume: both succeed.
        assert_eq!(s.take_held(), Some(1));
        assert_eq!(s.take_held(), Some(2));
        assert_eq!(s.take_held(), None);
        assert!(s.resume_done());
        assert!(!s.stopped());
        // One event per failure, as QEMU's BLOCK_IO_ERROR.
        let mut got = Vec::new();
        for _ in 0..4 {
            match theirs.recv().unwrap().0 {
                Frame::Event(BlockEvent::IoError {
                    write,
                    action,
                    nospace,
                    reason,
                }) => got.push((write, action, nospace, reason)),
                other => panic!("{other:?}"),
            }
        }
        let io = "Input/output error".to_string();
        assert_eq!(
            got,
            vec![
                (false, ErrorAction::Report, false, io.clone()),
                (true, ErrorAction::Stop, false, io.clone()),
                (
                    true,
                    ErrorAction::Stop,
                    true,
                    "No space left on device".into()
                ),
                (true, ErrorAction::Stop, false, io),
            ]
        );
    }

    #[test]
    fn the_event_budget_bounds_report_and_ignore_events_but_never_stop() {
        let t0 = Instant::now();
        let mut b = EventBudget::default();
        let burst = EVENT_BURST as usize;
        for _ in 0..burst {
            assert_eq!(b.admit(t0, false), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(b.admit(t0, false), None);
        }
        // Stop events always pass, and carry the count of those not sent.
        assert_eq!(b.admit(t0, true), Some(1000));
        assert_eq!(b.admit(t0, true), Some(0));
        // Ten seconds of a flood: about EVENT_RATE a second get through.
        let mut sent = 0;
        for ms in 0..10_000u64 {
            if b.admit(t0 + Duration::from_millis(ms), false).is_some() {
                sent += 1;
            }
        }
        let want = (10.0 * EVENT_RATE) as i32;
        assert!((want - 2..=want + 1).contains(&sent), "{sent}");
        // A quiet minute refills the burst, not more.
        let later = t0 + Duration::from_secs(70);
        let n = (0..1000)
            .filter(|_| b.admit(later, false).is_some())
            .count();
        assert_eq!(n, burst);
    }
}
