//! The machine: builds the VM from a [`VmSetup`] and its fds (memory slots, in-kernel irqchip
//! and PIT, devices, ACPI, kernel, vCPUs), snapshots its power-on state, and implements run,
//! pause, reset (park the vCPUs, restore irqchip/PIT/vCPU state, reload kernel, initrd and
//! tables, reset devices, resume if it was running), guest requests and CPU queries.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use std::collections::BTreeMap;

use bulkhead_ipc::messages::{CpuInfo, RxFilter, ShutdownCause, VirtioDevice, VmSetup};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::devices::ged::{self, Ged};
use crate::devices::{acpi_pm, i8042, rtc, serial, GuestRequest, RequestSink};
use crate::memory::{self, GuestMem};
use crate::pci::msix::IrqRouter;
use crate::pci::{self, ConfigIo, Ecam, MmioWindow, PciRoot, SharedPciRoot};
use crate::vcpu::{self, ExitContext, InitialState, Shared, VcpuSlot};
use crate::virtio::pci::{RxFilterSink, VirtioPciDevice};
use crate::{acpi, boot, cpuid};

/// How long a pause may take before it is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most vCPUs a machine may have (xAPIC ids, MADT uids).
pub const MAX_VCPUS: u32 = 254;

/// Errors building or driving the machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The setup is inconsistent.
    #[error("invalid setup: {0}")]
    Setup(String),
    /// A KVM system or VM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// vCPUs.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Device wiring.
    #[error(transparent)]
    Bus(#[from] crate::bus::Error),
    /// A virtio device could not be plugged.
    #[error("device {id}: {source}")]
    Virtio {
        /// Device id.
        id: String,
        /// Why.
        source: crate::virtio::pci::Error,
    },
    /// The PCI bus refused a device.
    #[error(transparent)]
    Pci(#[from] pci::Error),
    /// A device request that cannot be honoured now.
    #[error("{0}")]
    Device(String),
    /// Eventfd creation.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// What the control loop should do after a guest request was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestOutcome {
    /// Report `Shutdown(cause)` and exit.
    Shutdown(ShutdownCause),
    /// Report `Reset { guest: true }`; the machine runs again (if it was running).
    Reset,
    /// Report `InternalError`; the vCPUs stay stopped.
    InternalError(String),
    /// Nothing to report.
    Nothing,
}

/// The fds of a setup, in order.
pub struct SetupFds {
    /// /dev/kvm.
    pub kvm: OwnedFd,
    /// The guest memory memfd.
    pub memory: OwnedFd,
    /// The kernel image.
    pub kernel: OwnedFd,
    /// The initrd.
    pub initrd: Option<OwnedFd>,
    /// Serial input.
    pub serial_in: Option<OwnedFd>,
    /// Serial output.
    pub serial_out: Option<OwnedFd>,
    /// One connected vhost-user socket per device of the setup.
    pub devices: Vec<OwnedFd>,
}

impl SetupFds {
    /// Splits the fds that came with `setup` (in the order `VmSetup` documents).
    pub fn from_vec(setup: &VmSetup, fds: Vec<OwnedFd>) -> Result<Self, Error> {
        if fds.len() != setup.fd_count() {
            return Err(Error::Setup(format!(
                "expected {} fds, got {}",
                setup.fd_count(),
                fds.len()
            )));
        }
        let mut it = fds.into_iter();
        let mut next = || it.next().ok_or_else(|| Error::Setup("missing fd".into()));
        Ok(SetupFds {
            kvm: next()?,
            memory: next()?,
            kernel: next()?,
            initrd: if setup.has_initrd {
                Some(next()?)
            } else {
                None
            },
            serial_in: if setup.serial_in { Some(next()?) } else { None },
            serial_out: if setup.serial_out {
                Some(next()?)
            } else {
                None
            },
            devices: it.collect(),
        })
    }
}

/// The plugged virtio devices by id: slot and device. Shared with the GED's eject handler,
/// which runs on the vCPU thread that wrote the eject register.
type DeviceMap = BTreeMap<String, (u8, Arc<Mutex<VirtioPciDevice>>)>;
type SharedDevices = Arc<Mutex<DeviceMap>>;

/// One rx-filter change of a net device (see [`Machine::take_rx_filters`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilterUpdate {
    /// The device id.
    pub id: String,
    /// The filter now.
    pub filter: RxFilter,
    /// A device reset changed it, not a guest command.
    pub reset: bool,
}

fn lock_device(d: &Arc<Mutex<VirtioPciDevice>>) -> std::sync::MutexGuard<'_, VirtioPciDevice> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_devices(d: &SharedDevices) -> std::sync::MutexGuard<'_, DeviceMap> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// A built machine.
pub struct Machine {
    setup: VmSetup,
    // Field order matters for drop: vCPU fds and slots before the VM, the VM before memory.
    slots: Vec<Arc<VcpuSlot>>,
    initial: Vec<InitialState>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    pci: SharedPciRoot,
    router: Arc<IrqRouter>,
    virtio: SharedDevices,
    ged: Arc<Ged>,
    ejected: Arc<Mutex<Vec<String>>>,
    rx_filters: Arc<Mutex<Vec<RxFilterUpdate>>>,
    rx_sink: RxFilterSink,
    started: bool,
    mem: GuestMem,
    kernel: File,
    initrd: Option<File>,
    tables: acpi::Tables,
    irqchip_init: Vec<kvm_irqchip>,
    pit_init: kvm_pit_state2,
    pio: Bus,
    shared: Arc<Shared>,
    topology: cpuid::Topology,
    monitor_running: bool,
    _threads: Vec<JoinHandle<()>>,
    _serial_irq: Arc<EventFd>,
}

impl Machine {
    /// Builds the machine. `notify` is called (on a vCPU thread) after a guest request was
    /// recorded, so the control loop can come and call [`Machine::handle_guest_request`].
    pub fn new(
        setup: VmSetup,
        fds: SetupFds,
        notify: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Self, Error> {
        if setup.vcpus == 0 || setup.vcpus > MAX_VCPUS {
            return Err(Error::Setup(format!(
                "{} vCPUs requested; 1..={MAX_VCPUS} supported",
                setup.vcpus
            )));
        }
        // SAFETY: the monitor handed us this fd as /dev/kvm and we own it; it is checked with
        // KVM_GET_API_VERSION before any other use.
        let kvm = unsafe { Kvm::from_raw_fd(fds.kvm.into_raw_fd()) };
        if kvm.get_api_version() != 12 {
            return Err(Error::Setup(
                "the kvm fd is not /dev/kvm (API version mismatch)".into(),
            ));
        }
        if setup.topology.cpus() != Some(setup.vcpus) {
            return Err(Error::Setup(format!(
                "CPU topology {:?} does not hold exactly {} vCPUs",
                setup.topology, setup.vcpus
            )));
        }
        if setup.vcpus as usize > kvm.get_max_vcpus() {
            return Err(Error::Setup(format!(
                "KVM allows at most {} vCPUs",
                kvm.get_max_vcpus()
            )));
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm.set_tss_address(memory::KVM_TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if kvm.check_extension(Cap::SetIdentityMapAddr) {
            vm.set_identity_map_address(memory::KVM_IDENTITY_MAP_ADDR)
                .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem_file = File::from(fds.memory);
        let mem = memory::map_memfd(&mem_file, setup.mem_size)?;
        memory::register_slots(&vm, &mem)?;

        let n = setup.vcpus as usize;
        let shared = Shared::new(n);
        let sink: RequestSink = {
            let shared = shared.clone();
            let notify = notify.clone();
            Arc::new(move |req: GuestRequest| {
                if shared.guest_request(req) {
                    notify();
                }
            })
        };

        // Devices.
        let serial_irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
        vm.register_irqfd(&serial_irq, serial::COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial_dev = Arc::new(Mutex::new(serial::SerialDevice::new(
            serial_irq.clone(),
            fds.serial_out.map(File::from),
        )));
        let mut pio = Bus::new();
        pio.insert(
            u64::from(serial::COM1_PORT),
            serial::LEN,
            serial_dev.clone(),
        )?;
        pio.insert(
            u64::from(rtc::INDEX_PORT),
            rtc::LEN,
            Arc::new(Mutex::new(rtc::Rtc::new())),
        )?;
        pio.insert(
            u64::from(i8042::DATA_PORT),
            i8042::LEN,
            Arc::new(Mutex::new(i8042::I8042::new(sink.clone()))),
        )?;
        pio.insert(
            u64::from(acpi_pm::BASE_PORT),
            acpi_pm::LEN,
            Arc::new(Mutex::new(acpi_pm::AcpiPm::new(sink.clone()))),
        )?;
        // PCI: legacy configuration ports, ECAM, the BAR window, and the devices of the setup.
        let pci: SharedPciRoot = Arc::new(Mutex::new(PciRoot::new()));
        pio.insert(
            u64::from(pci::CONFIG_ADDRESS_PORT),
            pci::CONFIG_IO_LEN,
            Arc::new(Mutex::new(ConfigIo(pci.clone()))),
        )?;
        let mut mmio = Bus::new();
        mmio.insert(
            pci::ECAM_BASE,
            pci::ECAM_SIZE,
            Arc::new(Mutex::new(Ecam(pci.clone()))),
        )?;
        mmio.insert(
            pci::MMIO_WINDOW_START,
            pci::MMIO_WINDOW_END - pci::MMIO_WINDOW_START,
            Arc::new(Mutex::new(MmioWindow(pci.clone()))),
        )?;
        let router = Arc::new(IrqRouter::new(vm.clone()));
        if setup.devices.len() != fds.devices.len() {
            return Err(Error::Setup(format!(
                "{} devices but {} sockets",
                setup.devices.len(),
                fds.devices.len()
            )));
        }
        // Net devices' rx-filter changes (on a vCPU thread) wait here for the control loop.
        let rx_filters: Arc<Mutex<Vec<RxFilterUpdate>>> = Arc::new(Mutex::new(Vec::new()));
        let rx_sink: RxFilterSink = {
            let (rx_filters, notify) = (rx_filters.clone(), notify.clone());
            Arc::new(move |id: &str, filter: RxFilter, reset: bool| {
                rx_filters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(RxFilterUpdate {
                        id: id.to_owned(),
                        filter,
                        reset,
                    });
                notify();
            })
        };
        let mut map = BTreeMap::new();
        for (desc, sock) in setup.devices.iter().zip(fds.devices) {
            let (slot, dev) = plug(&pci, &router, &mem, &map, desc, sock)?;
            lock_device(&dev).set_rx_filter_sink(rx_sink.clone());
            map.insert(desc.id.clone(), (slot, dev));
        }
        let virtio: SharedDevices = Arc::new(Mutex::new(map));

        // The Generic Event Device: PCI hot-plug and the power button. A guest's eject (the
        // slot's _EJ0) unplugs the device on the vCPU thread and tells the control loop.
        let ejected: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&ged_irq, ged::GED_GSI)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let eject: ged::EjectSink = {
            let (pci, virtio, ejected, notify) =
                (pci.clone(), virtio.clone(), ejected.clone(), notify.clone());
            Arc::new(move |slot: u8| {
                let id = {
                    let mut map = lock_devices(&virtio);
                    let id = map
                        .iter()
                        .find(|(_, (s, _))| *s == slot)
                        .map(|(id, _)| id.clone());
                    if let Some(id) = &id {
                        map.remove(id);
                    }
                    id
                };
                let Some(id) = id else { return };
                if let Err(e) = pci.lock().unwrap_or_else(|p| p.into_inner()).unplug(slot) {
                    log::warn!("eject of slot {slot}: {e}");
                }
                log::info!("the guest ejected {id} (PCI slot {slot})");
                ejected.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                notify();
            })
        };
        let ged = Ged::new(ged_irq, eject);
        mmio.insert(
            ged::MMIO_BASE,
            ged::MMIO_LEN,
            Arc::new(Mutex::new(ged.bus_device())),
        )?;
        if let Some(input) = fds.serial_in {
            let dev = serial_dev.clone();
            let input = File::from(input);
            std::thread::Builder::new()
                .name("serial-in".into())
                .spawn(move || serial::input_loop(dev, input))
                .map_err(|e| Error::Setup(format!("cannot spawn the serial input thread: {e}")))?;
        }

        // Guest image.
        // CPUID has no die level in the leaves we fill, so dies fold into cores per socket.
        let topology = cpuid::Topology {
            threads_per_core: setup.topology.threads,
            cores_per_socket: setup.topology.dies * setup.topology.cores,
            sockets: setup.topology.sockets,
        };
        let apic_ids: Vec<u32> = (0..setup.vcpus).map(|i| topology.apic_id(i)).collect();
        let tables = acpi::build(&apic_ids)?;
        let mut kernel = File::from(fds.kernel);
        let mut initrd = fds.initrd.map(File::from);
        let loaded = load_guest(&mem, &setup, &mut kernel, initrd.as_mut(), &tables)?;

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_index = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let cfg = vcpu::Config {
            supported_cpuid: supported.as_slice(),
            topology,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            msr_index: msr_index.as_slice(),
            entry: loaded.entry,
        };
        let mut slots = Vec::with_capacity(n);
        let mut initial = Vec::with_capacity(n);
        for i in 0..setup.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            initial.push(vcpu::configure(&fd, i, &cfg)?);
            slots.push(Arc::new(VcpuSlot {
                index: i,
                fd: Mutex::new(fd),
                tid: Default::default(),
            }));
        }

        // Power-on state of the in-kernel irqchip and PIT.
        let mut irqchip_init = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            irqchip_init.push(chip);
        }
        let pit_init = vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;

        vcpu::install_kick_handler()?;
        let ctx = ExitContext {
            pio: pio.clone(),
            mmio,
            sink,
        };
        let mut threads = Vec::with_capacity(n);
        for slot in &slots {
            threads.push(vcpu::spawn(slot.clone(), shared.clone(), ctx.clone())?);
        }
        // Wait for every thread to park so thread ids are known and the machine is quiescent.
        shared.pause(PAUSE_TIMEOUT)?;
        log::info!(
            "machine ready: {} MiB, {} vCPU(s), entry {:#x}, initrd {:?}",
            setup.mem_size >> 20,
            setup.vcpus,
            loaded.entry,
            loaded.initrd
        );
        Ok(Machine {
            setup,
            slots,
            initial,
            vm,
            _kvm: kvm,
            pci,
            router,
            virtio,
            ged,
            ejected,
            rx_filters,
            rx_sink,
            started: false,
            mem,
            kernel,
            initrd,
            tables,
            irqchip_init,
            pit_init,
            pio,
            shared,
            topology,
            monitor_running: false,
            _threads: threads,
            _serial_irq: serial_irq,
        })
    }

    /// Starts or resumes the vCPUs.
    pub fn run(&mut self) {
        self.monitor_running = true;
        self.started = true;
        self.shared.resume();
    }

    /// Pauses the vCPUs; returns once all are out of `KVM_RUN`.
    pub fn pause(&mut self) -> Result<(), Error> {
        self.monitor_running = false;
        self.shared.pause(PAUSE_TIMEOUT)?;
        Ok(())
    }

    /// Resets the machine; it runs afterwards iff it was running.
    pub fn reset(&mut self) -> Result<(), Error> {
        self.shared.pause(PAUSE_TIMEOUT)?;
        for chip in &self.irqchip_init {
            self.vm
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.vm
            .set_pit2(&self.pit_init)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        load_guest(
            &self.mem,
            &self.setup,
            &mut self.kernel,
            self.initrd.as_mut(),
            &self.tables,
        )?;
        for (slot, init) in self.slots.iter().zip(&self.initial) {
            vcpu::restore(&slot.lock_fd(), slot.index, init)?;
        }
        self.pio.reset_all();
        self.pci.lock().unwrap_or_else(|p| p.into_inner()).reset();
        self.ged.reset();
        // A guest request raised while we were resetting belongs to the old boot.
        let _ = self.shared.take_guest_request();
        if self.monitor_running {
            self.shared.resume();
        }
        Ok(())
    }

    /// Acts on the guest request the vCPUs recorded, if any.
    pub fn handle_guest_request(&mut self) -> GuestOutcome {
        let Some(req) = self.shared.take_guest_request() else {
            return GuestOutcome::Nothing;
        };
        // Make sure no vCPU is still executing the old guest.
        let paused = self.shared.pause(PAUSE_TIMEOUT);
        let reset_cause = match req {
            GuestRequest::Shutdown => return GuestOutcome::Shutdown(ShutdownCause::GuestShutdown),
            GuestRequest::InternalError(msg) => return GuestOutcome::InternalError(msg),
            GuestRequest::Reset => ShutdownCause::GuestReset,
            GuestRequest::TripleFault => ShutdownCause::GuestTripleFault,
        };
        if self.setup.no_reboot {
            return GuestOutcome::Shutdown(reset_cause);
        }
        if let Err(e) = paused {
            return GuestOutcome::InternalError(format!("cannot stop vCPUs to reset: {e}"));
        }
        match self.reset() {
            Ok(()) => GuestOutcome::Reset,
            Err(e) => GuestOutcome::InternalError(format!("reset failed: {e}")),
        }
    }

    /// Reports every vCPU (briefly stopping a running machine to sample registers).
    pub fn query_cpus(&mut self) -> Result<Vec<CpuInfo>, Error> {
        self.shared.pause(PAUSE_TIMEOUT)?;
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let (pc, halted) = vcpu::sample(&slot.lock_fd());
            let (socket_id, core_id, thread_in_core) = self.topology.place(slot.index);
            out.push(CpuInfo {
                index: slot.index,
                thread_id: slot.tid.load(Ordering::SeqCst),
                halted,
                pc,
                socket_id,
                core_id,
                thread_in_core,
            });
        }
        if self.monitor_running {
            self.shared.resume();
        }
        Ok(out)
    }

    /// Plugs a virtio device. Before the guest first runs it is simply there at enumeration;
    /// afterwards the guest is told through ACPI PCI hot-plug (GED event, device check).
    pub fn add_device(&mut self, desc: &VirtioDevice, sock: OwnedFd) -> Result<(), Error> {
        let mut map = lock_devices(&self.virtio);
        let (slot, dev) = plug(&self.pci, &self.router, &self.mem, &map, desc, sock)?;
        lock_device(&dev).set_rx_filter_sink(self.rx_sink.clone());
        map.insert(desc.id.clone(), (slot, dev));
        drop(map);
        if self.started {
            self.ged.slot_up(slot);
        }
        Ok(())
    }

    /// Unplugs a virtio device: at once before the guest first runs; afterwards the guest is
    /// asked to eject it (ACPI eject request) and the device goes when it does, reported by
    /// [`Machine::take_ejected`]. Returns whether the device is already gone.
    pub fn remove_device(&mut self, id: &str) -> Result<bool, Error> {
        let mut map = lock_devices(&self.virtio);
        let slot = map
            .get(id)
            .map(|(s, _)| *s)
            .ok_or_else(|| Error::Device(format!("no device {id}")))?;
        if self.started {
            drop(map);
            self.ged.request_eject(slot);
            return Ok(false);
        }
        map.remove(id);
        drop(map);
        self.pci
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unplug(slot)?;
        Ok(true)
    }

    /// Devices the guest ejected since the last call.
    pub fn take_ejected(&mut self) -> Vec<String> {
        std::mem::take(&mut *self.ejected.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Net devices' rx-filter changes since the last call, oldest first.
    pub fn take_rx_filters(&mut self) -> Vec<RxFilterUpdate> {
        std::mem::take(&mut *self.rx_filters.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Presses the ACPI power button (`system_powerdown`).
    pub fn power_button(&mut self) {
        self.ged.power_button();
    }

    fn device(&self, id: &str) -> Result<Arc<Mutex<VirtioPciDevice>>, Error> {
        lock_devices(&self.virtio)
            .get(id)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| Error::Device(format!("no device {id}")))
    }

    /// The back end's configuration changed: re-read it and interrupt the guest.
    pub fn config_changed(&mut self, id: &str) -> Result<(), Error> {
        let dev = self.device(id)?;
        let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
        d.config_changed().map_err(|source| Error::Virtio {
            id: id.to_owned(),
            source,
        })
    }

    /// Sets a net device's link.
    pub fn set_link(&mut self, id: &str, up: bool) -> Result<(), Error> {
        let dev = self.device(id)?;
        let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
        d.set_link(up).map_err(|source| Error::Virtio {
            id: id.to_owned(),
            source,
        })
    }

    /// Stops the vCPU threads for good.
    pub fn quit(&mut self) {
        self.shared.quit();
    }

    /// Whether the monitor last asked the machine to run.
    pub fn is_running(&self) -> bool {
        self.monitor_running
    }
}

/// Builds the device for `desc` on its socket and plugs it into its slot.
fn plug(
    pci: &SharedPciRoot,
    router: &Arc<IrqRouter>,
    mem: &GuestMem,
    existing: &DeviceMap,
    desc: &VirtioDevice,
    sock: OwnedFd,
) -> Result<(u8, Arc<Mutex<VirtioPciDevice>>), Error> {
    if existing.contains_key(&desc.id) {
        return Err(Error::Device(format!("duplicate device id {}", desc.id)));
    }
    if desc.slot == 0 || desc.slot >= pci::SLOTS {
        return Err(Error::Pci(pci::Error::BadSlot(desc.slot)));
    }
    let dev = VirtioPciDevice::new(desc, sock, mem.clone(), router.clone()).map_err(|source| {
        Error::Virtio {
            id: desc.id.clone(),
            source,
        }
    })?;
    let dev = Arc::new(Mutex::new(dev));
    let shared: pci::SharedPciDevice = dev.clone();
    pci.lock()
        .unwrap_or_else(|p| p.into_inner())
        .plug(desc.slot, shared)?;
    log::info!("virtio device {} in PCI slot {}", desc.id, desc.slot);
    Ok((desc.slot, dev))
}

/// Loads kernel, initrd, command line, boot structures and ACPI tables.
fn load_guest(
    mem: &GuestMem,
    setup: &VmSetup,
    kernel: &mut File,
    initrd: Option<&mut File>,
    tables: &acpi::Tables,
) -> Result<boot::Loaded, Error> {
    acpi::write(mem, tables)?;
    let loaded = boot::load_linux(
        mem,
        setup.mem_size,
        kernel,
        initrd,
        &setup.cmdline,
        tables.rsdp_addr(),
    )?;
    Ok(loaded)
}
