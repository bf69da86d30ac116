//! virtio devices: the virtio-pci transport ([`pci`]) whose queues are served by a vhost-user
//! back end through the front end in [`vhost`], except virtio-net's control virtqueue, which
//! the front end serves itself ([`net_ctrl`]).

pub mod net_ctrl;
pub mod pci;
pub mod vhost;
