//! The ipc request loop: a reader thread turns monitor frames into messages for the machine
//! thread, which also hears from the vCPUs when the guest asks for poweroff or reset; the
//! machine thread answers each request with its id and sends the resulting events.

use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use bulkhead_ipc::messages::{VcpuEvent, VcpuProtocol, VcpuReply, VcpuRequest};
use bulkhead_ipc::{Channel, Frame, Role};

use crate::machine::{GuestOutcome, Machine, SetupFds};

/// Errors that end the worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ipc channel failed.
    #[error("ipc: {0}")]
    Ipc(#[from] bulkhead_ipc::Error),
}

/// How the worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The monitor sent Quit.
    Quit,
    /// The guest shut the machine down (a Shutdown event was sent).
    Shutdown,
    /// The monitor went away.
    MonitorGone,
}

enum Msg {
    Request(u64, VcpuRequest, Vec<OwnedFd>),
    Guest,
    MonitorGone(Option<String>),
}

/// Serves the monitor on `chan` until Quit, guest shutdown, or the monitor's disappearance.
pub fn serve(chan: Channel<VcpuProtocol>) -> Result<Exit, Error> {
    let hello = chan.handshake(Role::Vcpu, Role::Monitor)?;
    log::debug!("handshake with monitor pid {}", hello.pid);
    let chan = Arc::new(chan);
    let (tx, rx) = mpsc::channel::<Msg>();

    let reader_chan = chan.clone();
    let reader_tx = tx.clone();
    std::thread::Builder::new()
        .name("ipc-reader".into())
        .spawn(move || loop {
            match reader_chan.recv() {
                Ok((Frame::Request { id, body }, fds)) => {
                    if reader_tx.send(Msg::Request(id, body, fds)).is_err() {
                        return;
                    }
                }
                Ok((other, _)) => {
                    log::warn!("ignoring unexpected frame from the monitor: {other:?}");
                }
                Err(bulkhead_ipc::Error::PeerClosed) => {
                    let _ = reader_tx.send(Msg::MonitorGone(None));
                    return;
                }
                Err(
                    e @ (bulkhead_ipc::Error::Decode(_)
                    | bulkhead_ipc::Error::FdMismatch { .. }
                    | bulkhead_ipc::Error::Oversize { .. }
                    | bulkhead_ipc::Error::TooManyFds { .. }),
                ) => {
                    // A bad frame is dropped (its fds were closed); the channel stays usable.
                    log::warn!("dropping a malformed frame: {e}");
                }
                Err(e) => {
                    let _ = reader_tx.send(Msg::MonitorGone(Some(e.to_string())));
                    return;
                }
            }
        })
        .map_err(bulkhead_ipc::Error::Io)?;

    let notify_tx = Mutex::new(tx);
    let notify: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        let _ = notify_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Msg::Guest);
    });

    let mut machine: Option<Machine> = None;
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Request(id, req, fds) => {
                let quit = matches!(req, VcpuRequest::Quit);
                let reply = handle_request(&mut machine, req, fds, &notify);
                chan.reply(id, reply, &[])?;
                if quit {
                    return Ok(Exit::Quit);
                }
            }
            Msg::Guest => {
                let Some(m) = machine.as_mut() else { continue };
                match m.handle_guest_request() {
                    GuestOutcome::Nothing => {}
                    GuestOutcome::Reset => {
                        log::info!("guest reset");
                        chan.send_event(VcpuEvent::Reset { guest: true })?;
                    }
                    GuestOutcome::Shutdown(cause) => {
                        log::info!("guest shutdown: {cause:?}");
                        m.quit();
                        chan.send_event(VcpuEvent::Shutdown(cause))?;
                        return Ok(Exit::Shutdown);
                    }
                    GuestOutcome::InternalError(msg) => {
                        log::error!("{msg}");
                        chan.send_event(VcpuEvent::InternalError(msg))?;
                    }
                }
                for id in m.take_ejected() {
                    chan.send_event(VcpuEvent::DeviceEjected { id })?;
                }
                for u in m.take_rx_filters() {
                    chan.send_event(VcpuEvent::RxFilterChanged {
                        id: u.id,
                        filter: u.filter,
                        reset: u.reset,
                    })?;
                }
            }
            Msg::MonitorGone(why) => {
                if let Some(why) = why {
                    log::error!("monitor channel failed: {why}");
                }
                if let Some(m) = machine.as_mut() {
                    m.quit();
                }
                return Ok(Exit::MonitorGone);
            }
        }
    }
    Ok(Exit::MonitorGone)
}

fn handle_request(
    machine: &mut Option<Machine>,
    req: VcpuRequest,
    fds: Vec<OwnedFd>,
    notify: &Arc<dyn Fn() + Send + Sync>,
) -> VcpuReply {
    let not_set_up = || VcpuReply::Error("the machine is not set up".into());
    match req {
        VcpuRequest::Setup(setup) => {
            if machine.is_some() {
                return VcpuReply::Error("the machine is already set up".into());
            }
            let built = SetupFds::from_vec(&setup, fds)
                .and_then(|fds| Machine::new(setup, fds, notify.clone()));
            match built {
                Ok(m) => {
                    *machine = Some(m);
                    VcpuReply::Ok
                }
                Err(e) => {
                    log::error!("setup failed: {e}");
                    VcpuReply::Error(e.to_string())
                }
            }
        }
        VcpuRequest::Run => match machine {
            Some(m) => {
                m.run();
                VcpuReply::Ok
            }
            None => not_set_up(),
        },
        VcpuRequest::Pause => match machine {
            Some(m) => match m.pause() {
                Ok(()) => VcpuReply::Ok,
                Err(e) => VcpuReply::Error(e.to_string()),
            },
            None => not_set_up(),
        },
        VcpuRequest::Reset => match machine {
            Some(m) => match m.reset() {
                Ok(()) => VcpuReply::Ok,
                Err(e) => VcpuReply::Error(e.to_string()),
            },
            None => not_set_up(),
        },
        VcpuRequest::QueryCpus => match machine {
            Some(m) => match m.query_cpus() {
                Ok(c) => VcpuReply::Cpus(c),
                Err(e) => VcpuReply::Error(e.to_string()),
            },
            None => not_set_up(),
        },
        VcpuRequest::QuerySandbox => VcpuReply::Sandbox(bulkhead_worker::sandbox_report()),
        VcpuRequest::Quit => {
            if let Some(m) = machine.as_mut() {
                m.quit();
            }
            VcpuReply::Ok
        }
        VcpuRequest::AddDevice(desc) => match (machine, fds.into_iter().next()) {
            (Some(m), Some(sock)) => result(m.add_device(&desc, sock)),
            (Some(_), None) => VcpuReply::Error("AddDevice without its socket".into()),
            (None, _) => not_set_up(),
        },
        VcpuRequest::RemoveDevice { id } => match machine {
            Some(m) => result(m.remove_device(&id).map(|_| ())),
            None => not_set_up(),
        },
        VcpuRequest::ConfigChanged { id } => match machine {
            Some(m) => result(m.config_changed(&id)),
            None => not_set_up(),
        },
        VcpuRequest::SetLink { id, up } => match machine {
            Some(m) => result(m.set_link(&id, up)),
            None => not_set_up(),
        },
        VcpuRequest::PowerButton => match machine {
            Some(m) => {
                m.power_button();
                VcpuReply::Ok
            }
            None => not_set_up(),
        },
    }
}

fn result(r: Result<(), crate::machine::Error>) -> VcpuReply {
    match r {
        Ok(()) => VcpuReply::Ok,
        Err(e) => VcpuReply::Error(e.to_string()),
    }
}
