//! The device life cycle the disks ([`crate::disks`]) and the NICs ([`crate::nics`]) share:
//! plugging a virtio-pci device into the machine worker, asking the guest to eject one, the
//! unplugs still waiting for the guest, and the `DEVICE_DELETED` events a removal ends with.
//!
//! Before the guest first runs, `device_add`/`device_del` change the machine at once (cold
//! plug). After, the machine worker hot-plugs through ACPI PCI hot-plug: an added device is
//! announced to the guest (a device check on its slot), and a `device_del` only *asks* the
//! guest to eject the device. The command returns at once, as QEMU 7.2's does; the device, its
//! back end and its drive/netdev binding go when the worker reports
//! [`bulkhead_ipc::messages::VcpuEvent::DeviceEjected`], or at the next machine reset (QEMU
//! executes pending removals on reset). Until then the device is listed in [`Unplugs`], and a
//! second `device_del` gets QEMU's "already in the process of unplug". A guest that never
//! ejects keeps the device (and its worker) as QEMU keeps it: nothing is lost or leaked, the
//! removal just does not happen until a reset, a new machine worker, or `quit`.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use bulkhead_ipc::messages::{VcpuProtocol, VcpuReply, VcpuRequest, VirtioDevice};
use bulkhead_ipc::RpcClient;

use crate::qmp::events::Event;

/// How long the machine worker has to answer a plug or unplug request.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the machine worker a device request and maps its answer to a text error.
async fn ask(
    rpc: &RpcClient<VcpuProtocol>,
    req: VcpuRequest,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), String> {
    match tokio::time::timeout(CALL_TIMEOUT, rpc.call(req, fds)).await {
        Ok(Ok((VcpuReply::Ok, _))) => Ok(()),
        Ok(Ok((VcpuReply::Error(e), _))) => Err(e),
        Ok(Ok((other, _))) => Err(format!("unexpected reply {other:?}")),
        Ok(Err(e)) => Err(format!("the vCPU worker is gone: {e}")),
        Err(_) => Err("the vCPU worker did not answer".into()),
    }
}

/// Plugs `dev` (its back end's vhost-user socket `sock`) into the machine worker: cold-plug
/// before the guest first runs, ACPI hot-plug after.
pub async fn plug(
    rpc: &RpcClient<VcpuProtocol>,
    dev: &VirtioDevice,
    sock: &OwnedFd,
) -> Result<(), String> {
    ask(rpc, VcpuRequest::AddDevice(dev.clone()), &[sock.as_fd()]).await
}

/// Unplugs the device the machine worker knows as `id`: at once before the guest first runs;
/// after, an eject request to the guest (the removal then waits for `DeviceEjected`).
pub async fn unplug(rpc: &RpcClient<VcpuProtocol>, id: &str) -> Result<(), String> {
    ask(rpc, VcpuRequest::RemoveDevice { id: id.to_string() }, &[]).await
}

/// The `DEVICE_DELETED` events of a virtio-pci device, in QEMU 7.2's order: its virtio
/// back end (`<path>/virtio-backend`, never with a `device` member), then the device itself
/// (`device` only when it has an id). `path` is the device's QOM path
/// (`/machine/peripheral/ID` or `/machine/peripheral-anon/device[N]`).
pub fn deleted_events(id: Option<&str>, path: &str) -> Vec<Event> {
    vec![
        Event::DeviceDeleted {
            device: None,
            path: format!("{path}/virtio-backend"),
        },
        Event::DeviceDeleted {
            device: id.map(str::to_string),
            path: path.to_string(),
        },
    ]
}

/// QEMU's error for a second `device_del` while the guest has not ejected the device yet.
pub fn already_unplugging(id: &str) -> String {
    format!("Device {id} is already in the process of unplug")
}

/// The devices the guest was asked to eject and has not yet (by the id the machine worker
/// knows them by).
#[derive(Debug, Default)]
pub struct Unplugs {
    pending: BTreeSet<String>,
}

impl Unplugs {
    /// Whether `id` waits for the guest's eject.
    pub fn is_pending(&self, id: &str) -> bool {
        self.pending.contains(id)
    }

    /// `id` now waits for the guest's eject.
    pub fn begin(&mut self, id: &str) {
        self.pending.insert(id.to_string());
    }

    /// The guest ejected `id`: whether it was waited for (an eject nobody asked for, or a
    /// second report of one, is ignored).
    pub fn finish(&mut self, id: &str) -> bool {
        self.pending.remove(id)
    }

    /// Every pending unplug, now done (a machine reset or a new machine worker carries them
    /// out, as QEMU's reset executes pending removals).
    pub fn take_all(&mut self) -> Vec<String> {
        std::mem::take(&mut self.pending).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_events_name_the_backend_first_and_the_id_only_on_the_device() {
        let ev = deleted_events(Some("vd0"), "/machine/peripheral/vd0");
        let names: Vec<_> = ev
            .iter()
            .map(|e| match e {
                Event::DeviceDeleted { device, path } => (device.clone(), path.clone()),
                _ => unreachable!("only DEVICE_DELETED"),
            })
            .collect();
        assert_eq!(
            names,
            vec![
                (None, "/machine/peripheral/vd0/virtio-backend".to_string()),
                (Some("vd0".into()), "/machine/peripheral/vd0".to_string())
            ]
        );
        let anon = deleted_events(None, "/machine/peripheral-anon/device[0]");
        assert!(
            matches!(&anon[1], Event::DeviceDeleted { device: None, path }
            if path == "/machine/peripheral-anon/device[0]")
        );
    }

    #[test]
    fn unplugs_finish_once_and_reset_takes_them_all() {
        let mut u = Unplugs::default();
        u.begin("a");
        u.begin("b");
        assert!(u.is_pending("a"));
        assert!(u.finish("a"));
        assert!(!u.finish("a"), "a second eject report is ignored");
        assert!(!u.finish("never-asked"));
        assert_eq!(u.take_all(), vec!["b".to_string()]);
        assert!(!u.is_pending("b"));
    }
}
