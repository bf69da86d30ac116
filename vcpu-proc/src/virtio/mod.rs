//! virtio devices: the virtio-pci transport ([`pci`]) whose queues are served by a vhost-user
//! back end through the front end in [`vhost`].

pub mod pci;
pub mod vhost;
