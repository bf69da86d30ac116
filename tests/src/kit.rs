//! The guest kit: kernels and initramfs images built from Debian packages.
//!
//! Everything comes from the Debian archive through `apt-get download` (no other network access is
//! needed) and is cached under `<workspace>/target/guest-kit/`:
//!
//! * **L2** (the guest Bulkhead runs): the kernel of `linux-image-cloud-amd64` as bzImage
//!   (`l2/vmlinuz`) and as an ELF `vmlinux` decompressed from the bzImage payload (`l2/vmlinux`,
//!   the way the kernel's `scripts/extract-vmlinux` does it), plus a small initramfs
//!   (`l2/initrd.img`, uncompressed newc cpio) with `busybox-static` and the test `/init`
//!   described in [`L2_INIT`].
//! * **L1** (the QEMU/TCG VM that provides a standard `/dev/kvm` for Bulkhead): the kernel of
//!   `linux-image-amd64` (bzImage and vmlinux; the harness boots the vmlinux through QEMU's PVH
//!   entry, which skips the slow decompression under TCG) and a base initramfs (`l1/base.cpio`)
//!   with busybox, the kvm/kvm_amd and virtio-net modules with their dependencies, the L1 init
//!   scripts and agent (see [`crate::nested`]) and the L2 files under `/l2/`.
//! * Bulkhead's binaries change with every build, so they are not cached: [`bulkhead_overlay`]
//!   writes them (with their shared libraries and the dynamic loader, found with `ldd`) into a
//!   small cpio that is appended to the base archive for each boot.
//!
//! Parallel test processes (cargo nextest runs each test in its own process) share the cache: an
//! `flock` on `target/guest-kit/.lock` makes exactly one of them build it, and the result appears
//! atomically (built in a scratch directory, then renamed). Delete `target/guest-kit` to rebuild
//! with newer Debian packages.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};

use crate::cpio::CpioWriter;
use crate::util::{which, workspace_root};

/// Bump when the layout or contents of the cached kit change, so stale caches are rebuilt.
const KIT_FORMAT: u32 = 15;

/// Names of the Bulkhead binaries copied into L1 (`/bin/<name>`).
pub const BULKHEAD_BINARIES: [&str; 4] = [
    "bulkhead",
    "bulkhead-vcpu",
    "bulkhead-blockd",
    "bulkhead-netd",
];

/// Path of the L2 bzImage inside L1.
pub const L2_BZIMAGE: &str = "/l2/vmlinuz";
/// Path of the L2 ELF vmlinux inside L1.
pub const L2_VMLINUX: &str = "/l2/vmlinux";
/// Path of the L2 initramfs inside L1.
pub const L2_INITRD: &str = "/l2/initrd.img";

/// Modules loaded by L1's init (with their dependencies): networking for the QMP port forward.
const L1_BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_net"];
/// Modules loaded by [`crate::nested::NestedVm::boot`] through the agent.
const L1_KVM_MODULES: &[&str] = &["kvm_amd"];
/// Modules shipped in L1 (with dependencies) but not loaded: available to tests via `modprobe`.
/// `null_blk` (with `configfs`) gives memory-backed block devices whose `badblocks` fail reads
/// and writes with EIO: the host I/O errors of `rerror`.
const L1_EXTRA_MODULES: &[&str] = &[
    "tun",
    "vhost_net",
    "vhost_vsock",
    "virtio_console",
    "null_blk",
];
/// Modules shipped in the L2 initramfs (with dependencies) and loaded by `bulkhead.test=blk`:
/// the cloud kernel has virtio-pci and virtio-blk as modules.
const L2_BLK_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];
/// Modules shipped in the L2 initramfs (with dependencies) and loaded by `bulkhead.test=net`:
/// virtio-net (with failover and net_failover) on virtio-pci.
const L2_NET_MODULES: &[&str] = &["virtio_pci", "virtio_net"];

/// Modules shipped in the L2 initramfs (with dependencies, beyond the blk and net ones) and
/// loaded by `bulkhead.test=hotplug`: the ACPI power button driver and evdev, whose event device
/// the guest's init watches (PCI hot-plug itself, acpiphp, is built into the cloud kernel).
const L2_HOTPLUG_MODULES: &[&str] = &["button", "evdev"];

/// The static address `bulkhead.test=hotplug` gives a new interface (/24).
pub const NET_GUEST_ADDR: &str = "10.77.0.2";
/// The peer on the tap's far side: the address `bulkhead.test=hotplug` pings, and what the
/// tests' DHCP server ([`crate::dhcp`]) hands out as the router, which `bulkhead.test=net`
/// pings and fetches `http://<router>:8080/blob` from.
pub const NET_PEER_ADDR: &str = "10.77.0.1";
/// The L2 guest's udhcpc script, `/etc/udhcpc/default.script` (busybox udhcpc's default path).
/// It configures the interface from the lease, writes `/run/udhcpc.<interface>` (shell
/// assignments `dhcp_ip`, `dhcp_mask`, `dhcp_router`, `dhcp_server`) and prints a
/// `BULKHEAD-DHCP-EVENT <event> <interface> ip=.. mask=.. router=.. server=..` line per event.
pub const L2_UDHCPC_SCRIPT: &str = include_str!("kit/udhcpc-default.script");

/// The MAC address `bulkhead.test=netctrl` gives eth0 through the control virtqueue.
pub const NET_CTRL_MAC: &str = "02:00:00:00:00:77";
/// Offset in bytes at which `bulkhead.test=blk` writes its pattern.
pub const BLK_PATTERN_OFFSET: u64 = 1 << 20;
/// Length in bytes of that pattern: [`BLK_PATTERN_LINE`] repeated, cut to this length.
pub const BLK_PATTERN_LEN: usize = 65536;
/// Bytes `bulkhead.test=blkerr` writes at the start of `/dev/vda`, and `bulkhead.test=blkread`
/// reads there (4 MiB).
pub const BLKERR_LEN: u64 = 4 << 20;
/// Bytes `bulkhead.test=blkctl` reads (64 blocks of 64 KiB, 4 MiB) while the test throttles it.
pub const BLKCTL_READ_LEN: u64 = 4 << 20;
/// The line `bulkhead.test=blk` repeats (busybox `yes`, so followed by a newline each time).
pub const BLK_PATTERN_LINE: &str = "BULKHEAD-BLK-PATTERN";

/// The L2 guest's `/init` (busybox sh). Markers, each on its own line on the console:
///
/// * `BULKHEAD-GUEST-UP` as soon as `/init` runs;
/// * `BULKHEAD-NCPUS=<n>` (number of `processor` lines in `/proc/cpuinfo`);
/// * then by `bulkhead.test=` on the kernel command line:
///   * `idle` (default): `BULKHEAD-TICK <n> <uptime seconds>` every second, forever;
///   * `poweroff`: `BULKHEAD-POWEROFF`, then `poweroff -f`;
///   * `reboot`: `BULKHEAD-REBOOT`, then `reboot -f`;
///   * `blk`: loads the virtio-pci and virtio-blk modules, waits for `/dev/vda`, prints
///     `BULKHEAD-BLK-SIZE=<sectors>`, `BULKHEAD-BLK-SERIAL=<serial>`, `BULKHEAD-BLK-MD5=<md5 of
///     the whole disk>`, writes [`BLK_PATTERN_LEN`] bytes of [`BLK_PATTERN_LINE`] lines at
///     [`BLK_PATTERN_OFFSET`], syncs, drops the page cache, prints `BULKHEAD-BLK-WROTE=<md5>` and
///     `BULKHEAD-BLK-READBACK=<md5 read back from the disk>`, then `BULKHEAD-BLK-DONE` and
///     `poweroff -f` (any failure prints `BULKHEAD-BLK-FAIL <what>` first).
///   * `blkerr`: loads virtio-pci and virtio-blk, waits for `/dev/vda`, makes
///     [`BLKERR_LEN`] bytes of [`BLK_PATTERN_LINE`] lines, prints `BULKHEAD-BLKERR-WROTE=<md5>`
///     and `BULKHEAD-BLKERR-WRITING`, writes them at offset 0 with `dd bs=64k oflag=direct
///     conv=fsync`, then prints `BULKHEAD-BLKERR-DD=<exit status> <dd's first error line, else its last>` and
///     `BULKHEAD-BLKERR-DONE` and idles (ticks) so the test can still query the VM. For host
///     write errors (`werror`): the test makes the image's file system run out of space.
///   * `blkread`: loads virtio-pci and virtio-blk, waits for `/dev/vda`, prints
///     `BULKHEAD-BLKREAD-READING`, reads [`BLKERR_LEN`] bytes at offset 0 with `dd bs=64k
///     iflag=direct` into a file, then prints `BULKHEAD-BLKREAD-DD=<exit status> <dd's first
///     error line, else its last>`, `BULKHEAD-BLKREAD-MD5=<md5 of what dd read>` and
///     `BULKHEAD-BLKREAD-DONE` and idles (ticks). For host read errors (`rerror`): the test
///     gives the disk sectors that fail to read.
///   * `blkctl`: loads virtio-pci and virtio-blk, waits for `/dev/vda`, prints
///     `BULKHEAD-BLKCTL-SIZE=<sectors>`, reads [`BLKCTL_READ_LEN`] bytes at 1 MiB with `dd
///     bs=64k iflag=direct` and prints `BULKHEAD-BLKCTL-READ=<uptime before> <uptime after>`
///     (seconds), then waits up to 120 s for the size to change and prints
///     `BULKHEAD-BLKCTL-NEWSIZE=<sectors>` and `BULKHEAD-BLKCTL-TAIL=<md5 of the disk's last
///     4 KiB>`, then `BULKHEAD-BLKCTL-DONE` and `poweroff -f`. For `block_set_io_throttle` (the
///     read's duration) and `block_resize` (the guest's view of the new size).
///   * `net`: loads virtio-pci and virtio-net, waits for `eth0`, brings it up and asks for an
///     address by DHCP (`udhcpc -i eth0 -q`, with [`L2_UDHCPC_SCRIPT`]), prints
///     `BULKHEAD-NET-DHCP=<leased ip>`, `BULKHEAD-NET-ROUTER=<router>`,
///     `BULKHEAD-NET-ADDR=<ip/prefix on eth0>`, `BULKHEAD-NET-MAC=<mac>` and
///     `BULKHEAD-NET-CARRIER=<0|1>`, pings the router (`BULKHEAD-NET-PING-OK`), prints
///     `BULKHEAD-NET-MD5=<md5 of http://router:8080/blob>`, then `BULKHEAD-NET-DONE` and
///     `poweroff -f` (failures print `BULKHEAD-NET-FAIL <what>`, no lease `BULKHEAD-NET-FAIL
///     dhcp`).
///   * `netloop`: as `net`, but after `BULKHEAD-NET-DONE` it fetches the blob again every second,
///     forever, printing `BULKHEAD-NET-FETCH <n> OK <md5> carrier=<0|1>` or
///     `BULKHEAD-NET-FETCH <n> FAIL carrier=<0|1>` (each fetch given at most 10 s), so a test can
///     take the link down and up and watch.
///   * `hotplug`: loads the blk, net and hotplug modules (virtio, the ACPI button, evdev),
///     starts one watcher per "Power Button" input device (`BULKHEAD-HP-BUTTONS=<n>`), each of
///     which prints `BULKHEAD-POWER-BUTTON` and runs `poweroff -f` on the first event, prints
///     `BULKHEAD-HP-READY`, then every half second compares the `vd*` disks and `eth*`
///     interfaces with the last look: a new disk prints `BULKHEAD-HP-BLK-ADDED <vdX>
///     size=<sectors> md5=<md5 of the whole disk>`, a new interface gets [`NET_GUEST_ADDR`]/24,
///     pings [`NET_PEER_ADDR`] and prints `BULKHEAD-HP-NET-ADDED <ethN> ping=<ok|fail>
///     mac=<mac>`, and one that went prints `BULKHEAD-HP-BLK-GONE <vdX>` /
///     `BULKHEAD-HP-NET-GONE <ethN>`.
///   * `netctrl`: as `net` up to `BULKHEAD-NET-DONE` but with the static address
///     [`NET_GUEST_ADDR`]/24 and [`NET_PEER_ADDR`] as the peer (no DHCP server on that far
///     side), then drives the control virtqueue one step at a time, each step started by the test making `http://peer:8080/go-<step>` exist (the
///     guest polls it every half second): `promisc` (`ip link set eth0 promisc on`, then
///     `BULKHEAD-NET-PROMISC-ON`), `mac` (`ip link set eth0 address` [`NET_CTRL_MAC`], then
///     `BULKHEAD-NET-MAC-SET=<address>`, a ping of the peer from the new address and
///     `BULKHEAD-NET-PING2-OK`); then `BULKHEAD-NET-CTRL-DONE` and idles.
///   * `netmq`: as `net` with `netctrl`'s static address up to `BULKHEAD-NET-DONE`, then
///     `BULKHEAD-NET-QUEUES=<rx> <tx>` (eth0's queues in use, from sysfs), three rounds of eight parallel fetches of the blob, one
///     `BULKHEAD-NET-IRQ <line>` per virtio input/output vector of `/proc/interrupts`, then
///     `BULKHEAD-NET-MQ-DONE` and idles.
///
/// If `poweroff -f`/`reboot -f` returns, it prints `BULKHEAD-POWEROFF-RETURNED` /
/// `BULKHEAD-REBOOT-RETURNED` and idles, so that a VMM that ignores the request is visible.
pub const L2_INIT: &str = r#"#!/bin/sh
echo BULKHEAD-GUEST-UP
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "BULKHEAD-NCPUS=$(grep -c '^processor' /proc/cpuinfo)"
mode=idle
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        bulkhead.test=*) mode="${arg#bulkhead.test=}" ;;
    esac
done
echo "BULKHEAD-MODE=$mode"
case "$mode" in
    poweroff)
        echo BULKHEAD-POWEROFF
        poweroff -f
        echo BULKHEAD-POWEROFF-RETURNED
        ;;
    reboot)
        echo BULKHEAD-REBOOT
        reboot -f
        echo BULKHEAD-REBOOT-RETURNED
        ;;
    blk)
        for m in $(cat /etc/bulkhead/blk-modules); do
            insmod "/lib/modules/$m" || echo "BULKHEAD-BLK-FAIL insmod $m"
        done
        n=0
        while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n + 1)); done
        if [ -b /dev/vda ]; then
            echo "BULKHEAD-BLK-SIZE=$(cat /sys/block/vda/size)"
            echo "BULKHEAD-BLK-SERIAL=$(cat /sys/block/vda/serial 2>/dev/null)"
            echo "BULKHEAD-BLK-MD5=$(md5sum < /dev/vda | cut -d' ' -f1)"
            yes BULKHEAD-BLK-PATTERN | head -c 65536 > /tmp/pattern
            echo "BULKHEAD-BLK-WROTE=$(md5sum < /tmp/pattern | cut -d' ' -f1)"
            dd if=/tmp/pattern of=/dev/vda bs=4096 seek=256 conv=notrunc,fsync 2>/dev/null \
                || echo "BULKHEAD-BLK-FAIL dd write"
            sync
            echo 3 > /proc/sys/vm/drop_caches
            echo "BULKHEAD-BLK-READBACK=$(dd if=/dev/vda bs=4096 skip=256 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
        else
            echo "BULKHEAD-BLK-FAIL no /dev/vda"
        fi
        echo BULKHEAD-BLK-DONE
        poweroff -f
        ;;
    hotplug)
        for m in $(cat /etc/bulkhead/blk-modules /etc/bulkhead/net-modules /etc/bulkhead/hotplug-modules); do
            name=$(echo "${m%.ko}" | tr - _)
            grep -q "^$name " /proc/modules && continue
            insmod "/lib/modules/$m" || echo "BULKHEAD-HP-FAIL insmod $m"
        done
        sleep 1
        buttons=0
        for d in /sys/class/input/event*; do
            if grep -q "Power Button" "$d/device/name" 2>/dev/null; then
                ev=/dev/input/${d##*/}
                (dd if="$ev" bs=24 count=1 >/dev/null 2>&1 && echo BULKHEAD-POWER-BUTTON && poweroff -f) &
                buttons=$((buttons + 1))
            fi
        done
        echo "BULKHEAD-HP-BUTTONS=$buttons"
        echo BULKHEAD-HP-READY
        blks=""
        nets=""
        while true; do
            now=$(cd /sys/block && ls -d vd* 2>/dev/null | tr '\n' ' ')
            for n in $now; do
                case " $blks " in
                    *" $n "*) ;;
                    *) echo "BULKHEAD-HP-BLK-ADDED $n size=$(cat /sys/block/$n/size) md5=$(md5sum < /dev/$n | cut -d' ' -f1)" ;;
                esac
            done
            for n in $blks; do
                case " $now " in *" $n "*) ;; *) echo "BULKHEAD-HP-BLK-GONE $n" ;; esac
            done
            blks=$now
            now=$(cd /sys/class/net && ls -d eth* 2>/dev/null | tr '\n' ' ')
            for n in $now; do
                case " $nets " in
                    *" $n "*) ;;
                    *)
                        ip addr add 10.77.0.2/24 dev "$n"
                        ip link set "$n" up
                        sleep 1
                        if ping -c 3 -W 10 10.77.0.1 >/dev/null; then p=ok; else p=fail; fi
                        echo "BULKHEAD-HP-NET-ADDED $n ping=$p mac=$(cat /sys/class/net/$n/address)"
                        ;;
                esac
            done
            for n in $nets; do
                case " $now " in *" $n "*) ;; *) echo "BULKHEAD-HP-NET-GONE $n" ;; esac
            done
            nets=$now
            sleep 0.5
        done
        ;;
    blkerr)
        for m in $(cat /etc/bulkhead/blk-modules); do
            insmod "/lib/modules/$m" || echo "BULKHEAD-BLK-FAIL insmod $m"
        done
        n=0
        while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n + 1)); done
        yes BULKHEAD-BLK-PATTERN | head -c 4194304 > /tmp/pattern
        echo "BULKHEAD-BLKERR-WROTE=$(md5sum < /tmp/pattern | cut -d' ' -f1)"
        echo BULKHEAD-BLKERR-WRITING
        dd if=/tmp/pattern of=/dev/vda bs=65536 oflag=direct conv=notrunc,fsync 2>/tmp/dd.err
        rc=$?
        echo "BULKHEAD-BLKERR-DD=$rc $(grep -m 1 error /tmp/dd.err || tail -n 1 /tmp/dd.err)"
        echo BULKHEAD-BLKERR-DONE
        ;;
    blkread)
        for m in $(cat /etc/bulkhead/blk-modules); do
            insmod "/lib/modules/$m" || echo "BULKHEAD-BLK-FAIL insmod $m"
        done
        n=0
        while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n + 1)); done
        echo BULKHEAD-BLKREAD-READING
        dd if=/dev/vda of=/tmp/read bs=65536 count=64 iflag=direct 2>/tmp/dd.err
        rc=$?
        echo "BULKHEAD-BLKREAD-DD=$rc $(grep -m 1 error /tmp/dd.err || tail -n 1 /tmp/dd.err)"
        echo "BULKHEAD-BLKREAD-MD5=$(md5sum < /tmp/read | cut -d' ' -f1)"
        echo BULKHEAD-BLKREAD-DONE
        ;;
    blkctl)
        for m in $(cat /etc/bulkhead/blk-modules); do
            insmod "/lib/modules/$m" || echo "BULKHEAD-BLK-FAIL insmod $m"
        done
        n=0
        while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n + 1)); done
        [ -b /dev/vda ] || echo "BULKHEAD-BLK-FAIL no /dev/vda"
        old=$(cat /sys/block/vda/size)
        echo "BULKHEAD-BLKCTL-SIZE=$old"
        t0=$(cut -d' ' -f1 /proc/uptime)
        dd if=/dev/vda of=/dev/null bs=65536 skip=16 count=64 iflag=direct 2>/dev/null \
            || echo "BULKHEAD-BLK-FAIL dd read"
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "BULKHEAD-BLKCTL-READ=$t0 $t1"
        n=0
        while [ "$(cat /sys/block/vda/size)" = "$old" ] && [ $n -lt 1200 ]; do
            sleep 0.1
            n=$((n + 1))
        done
        new=$(cat /sys/block/vda/size)
        echo "BULKHEAD-BLKCTL-NEWSIZE=$new"
        echo "BULKHEAD-BLKCTL-TAIL=$(dd if=/dev/vda bs=4096 skip=$((new / 8 - 1)) count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
        echo BULKHEAD-BLKCTL-DONE
        poweroff -f
        ;;
    net|netloop|netctrl|netmq)
        for m in $(cat /etc/bulkhead/net-modules); do
            name=$(echo "${m%.ko}" | tr - _)
            grep -q "^$name " /proc/modules && continue
            insmod "/lib/modules/$m" || echo "BULKHEAD-NET-FAIL insmod $m"
        done
        n=0
        while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n + 1)); done
        ip link set lo up
        ip link set eth0 up || echo "BULKHEAD-NET-FAIL ip link"
        dhcp_ip=""
        dhcp_router=""
        if [ "$mode" = netctrl ] || [ "$mode" = netmq ]; then
            # The control-queue and multiqueue tests' far side has no DHCP server: a static
            # address.
            ip addr add 10.77.0.2/24 dev eth0 || echo "BULKHEAD-NET-FAIL ip addr"
            dhcp_router=10.77.0.1
        else
            # The address, prefix and router come from the far side's DHCP server: discover up
            # to 10 times 2 s apart, exit once bound (-q) or without a lease (-n).
            udhcpc -i eth0 -f -q -n -t 10 -T 2 || echo "BULKHEAD-NET-FAIL dhcp"
            [ -s /run/udhcpc.eth0 ] && . /run/udhcpc.eth0
        fi
        echo "BULKHEAD-NET-DHCP=$dhcp_ip"
        echo "BULKHEAD-NET-ROUTER=$dhcp_router"
        echo "BULKHEAD-NET-ADDR=$(ip -o -4 addr show dev eth0 | awk '{print $4}')"
        peer=${dhcp_router:-no-router}
        echo "BULKHEAD-NET-MAC=$(cat /sys/class/net/eth0/address)"
        echo "BULKHEAD-NET-CARRIER=$(cat /sys/class/net/eth0/carrier)"
        if ping -c 3 -W 10 "$peer" >/dev/null; then
            echo BULKHEAD-NET-PING-OK
        else
            echo "BULKHEAD-NET-FAIL ping $peer"
        fi
        # No `wget -T`: bookworm's busybox 1.35 wget dies of SIGSEGV parsing it.
        timeout 60 wget -q -O /tmp/blob "http://$peer:8080/blob" || echo "BULKHEAD-NET-FAIL wget"
        echo "BULKHEAD-NET-MD5=$(md5sum < /tmp/blob | cut -d' ' -f1)"
        echo BULKHEAD-NET-DONE
        step() {
            n=0
            until wget -q -O /dev/null "http://10.77.0.1:8080/go-$1" 2>/dev/null; do
                n=$((n + 1))
                [ $n -gt 600 ] && { echo "BULKHEAD-NET-FAIL step $1 never came"; return 1; }
                sleep 0.5
            done
        }
        if [ "$mode" = netmq ]; then
            # Multiqueue: the driver's queue pairs in use, then parallel fetches (their flows
            # spread over both CPUs' transmit queues, the replies over the tap's queues), then
            # the per-queue interrupt counts.
            echo "BULKHEAD-NET-QUEUES=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l) $(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)"
            i=0
            while [ $i -lt 3 ]; do
                for j in 1 2 3 4 5 6 7 8; do
                    timeout 60 wget -q -O /dev/null http://10.77.0.1:8080/blob \
                        || echo "BULKHEAD-NET-FAIL parallel wget" &
                done
                wait
                i=$((i + 1))
            done
            grep -E 'virtio[0-9]+-(input|output)' /proc/interrupts | tr -s ' ' \
                | sed 's/^/BULKHEAD-NET-IRQ /'
            echo BULKHEAD-NET-MQ-DONE
            while true; do sleep 5; done
        fi
        if [ "$mode" = netctrl ]; then
            step promisc
            ip link set eth0 promisc on && echo BULKHEAD-NET-PROMISC-ON \
                || echo "BULKHEAD-NET-FAIL promisc"
            step mac
            ip link set eth0 address 02:00:00:00:00:77 \
                && echo "BULKHEAD-NET-MAC-SET=$(cat /sys/class/net/eth0/address)" \
                || echo "BULKHEAD-NET-FAIL address"
            if ping -c 3 -W 10 10.77.0.1 >/dev/null; then
                echo BULKHEAD-NET-PING2-OK
            else
                echo "BULKHEAD-NET-FAIL ping after the MAC change"
            fi
            echo BULKHEAD-NET-CTRL-DONE
            while true; do sleep 5; done
        fi
        n=0
        while [ "$mode" = netloop ]; do
            rm -f /tmp/b
            c=$(cat /sys/class/net/eth0/carrier)
            if timeout 10 wget -q -O /tmp/b "http://$peer:8080/blob" 2>/dev/null; then
                echo "BULKHEAD-NET-FETCH $n OK $(md5sum < /tmp/b | cut -d' ' -f1) carrier=$c"
            else
                echo "BULKHEAD-NET-FETCH $n FAIL carrier=$c"
            fi
            n=$((n + 1))
            sleep 1
        done
        poweroff -f
        ;;
esac
n=0
while true; do
    read -r up _ < /proc/uptime
    echo "BULKHEAD-TICK $n $up"
    n=$((n + 1))
    sleep 1
done
"#;

/// L1 init, stage 1: copy the initramfs into a tmpfs and switch_root into it. `pivot_root(2)`
/// refuses to work when the root is the initramfs itself, and Bulkhead's sandbox uses it.
const L1_INIT_STAGE1: &str = r#"#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "BULKHEAD-L1-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
mkdir -p /newroot
mount -t tmpfs -o mode=0755 root /newroot
for d in /*; do
    case "$d" in
        /newroot|/proc|/sys|/dev|/init) ;;
        *) cp -a "$d" /newroot/ || echo "BULKHEAD-L1-COPY-FAILED $d" ;;
    esac
done
mkdir -p /newroot/proc /newroot/sys /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/bulkhead-l1-init
"#;

/// L1 init, stage 2 (runs as pid 1 on the tmpfs root). `@KVER@` is replaced at build time.
const L1_INIT_STAGE2: &str = r#"#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mkdir -p /dev/pts /dev/shm /run /tmp /var/tmp /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname bulkhead-l1
for m in $(cat /etc/bulkhead/boot-modules); do
    insmod "/lib/modules/@KVER@/$m" || echo "BULKHEAD-L1-INSMOD-FAILED $m"
done
ip link set lo up
if ip link set eth0 up; then
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
else
    echo "BULKHEAD-L1-NO-ETH0"
fi
# The PCI serial port (its own IRQ, unlike ISA COM3/COM4) carries Bulkhead's stdout/stderr.
for t in /sys/class/tty/ttyS*; do
    case "$(readlink -f "$t/device" 2>/dev/null)" in
        */pci*) ln -sf "/dev/${t##*/}" /dev/bulkhead-out ;;
    esac
done
if [ -e /dev/bulkhead-out ]; then
    stty -F /dev/bulkhead-out raw -echo
else
    echo "BULKHEAD-L1-NO-PCI-SERIAL"
fi
echo "BULKHEAD-L1-UP uptime=$(cut -d' ' -f1 /proc/uptime)"
/sbin/bulkhead-agent &
# Stay alive as pid 1 and reap orphans (ash reaps any child while waiting for `sleep`).
while true; do
    sleep 5
done
"#;

/// The agent on ttyS1: runs shell scripts sent by the host and returns output and status.
///
/// Request: `CMD <id> <timeout seconds> <base64 script>\n`.
/// Response: `@@AGENT-BEGIN <id>`, base64 of the combined stdout/stderr (wrapped), then
/// `@@AGENT-END <id> <exit status>`. The script runs under `timeout -s KILL`, so a hung
/// command costs 137 but never the agent.
const L1_AGENT: &str = r#"#!/bin/sh
tty=/dev/ttyS1
stty -F $tty raw -echo
exec 0<$tty 1>$tty 2>&1
mkdir -p /run/agent
echo "@@AGENT-READY"
while read -r verb id tmo script; do
    case "$verb" in
        CMD) ;;
        *) echo "@@AGENT-IGNORED $verb"; continue ;;
    esac
    echo "$script" | base64 -d > /run/agent/cmd.sh
    (cd / && exec timeout -s KILL "$tmo" sh /run/agent/cmd.sh) < /dev/null > /run/agent/out 2>&1
    rc=$?
    echo "@@AGENT-BEGIN $id"
    base64 /run/agent/out
    echo "@@AGENT-END $id $rc"
done
echo "@@AGENT-EXIT"
"#;

/// Loads kvm_amd (and dependencies) and checks `/dev/kvm`; `@KVER@` is replaced at build time.
/// Arguments: parameters for kvm.ko, parameters for kvm-amd.ko (each one word, may be empty).
const L1_LOAD_KVM: &str = r#"#!/bin/sh
fail=0
for m in $(cat /etc/bulkhead/kvm-modules); do
    name=$(basename "$m" .ko | tr - _)
    grep -q "^$name " /proc/modules && continue
    case "$name" in
        kvm) params="$1" ;;
        kvm_amd) params="$2" ;;
        *) params="" ;;
    esac
    insmod "/lib/modules/@KVER@/$m" $params || { echo "insmod $m $params failed"; fail=1; }
done
if [ ! -c /dev/kvm ]; then
    echo "/dev/kvm is missing after loading kvm_amd"
    fail=1
fi
if [ "$fail" != 0 ]; then
    echo "--- /proc/cpuinfo flags ---"
    grep -m1 '^flags' /proc/cpuinfo
    echo "--- dmesg (tail) ---"
    dmesg | tail -n 60
    exit 1
fi
echo "kvm ok: $(ls -l /dev/kvm)"
"#;

/// Paths of a built guest kit (all files exist once a `GuestKit` is returned).
#[derive(Debug, Clone)]
pub struct GuestKit {
    /// Directory holding this kit version.
    pub dir: PathBuf,
    /// Version of the L1 (generic) kernel, e.g. `6.1.0-56-amd64`.
    pub l1_kernel_version: String,
    /// L1 kernel, bzImage.
    pub l1_bzimage: PathBuf,
    /// L1 kernel, ELF vmlinux (booted through PVH by default).
    pub l1_vmlinux: PathBuf,
    /// Base L1 initramfs (everything except Bulkhead's binaries).
    pub l1_base_initrd: PathBuf,
    /// Version of the L2 (cloud) kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub l2_kernel_version: String,
    /// L2 kernel, bzImage.
    pub l2_bzimage: PathBuf,
    /// L2 kernel, ELF vmlinux extracted from the bzImage.
    pub l2_vmlinux: PathBuf,
    /// L2 initramfs (uncompressed newc cpio).
    pub l2_initrd: PathBuf,
    /// The `busybox-static` binary (host copy).
    pub busybox: PathBuf,
}

impl GuestKit {
    /// Returns the guest kit, building it on first use (once per machine, see module docs).
    pub fn get() -> Result<GuestKit> {
        static CACHE: Mutex<Option<GuestKit>> = Mutex::new(None);
        let mut cached = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kit) = cached.as_ref() {
            return Ok(kit.clone());
        }
        let kit = Self::load_or_build(&kit_root())
            .context("building the guest kit (Debian kernels + busybox) failed")?;
        *cached = Some(kit.clone());
        Ok(kit)
    }

    fn paths(dir: &Path, meta: &serde_json::Value) -> Result<GuestKit> {
        let s = |k: &str| -> Result<String> {
            meta.get(k)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("kit.json lacks {k}"))
        };
        Ok(GuestKit {
            dir: dir.to_path_buf(),
            l1_kernel_version: s("l1_kernel_version")?,
            l1_bzimage: dir.join("l1/vmlinuz"),
            l1_vmlinux: dir.join("l1/vmlinux"),
            l1_base_initrd: dir.join("l1/base.cpio"),
            l2_kernel_version: s("l2_kernel_version")?,
            l2_bzimage: dir.join("l2/vmlinuz"),
            l2_vmlinux: dir.join("l2/vmlinux"),
            l2_initrd: dir.join("l2/initrd.img"),
            busybox: dir.join("busybox"),
        })
    }

    fn try_load(dir: &Path) -> Option<GuestKit> {
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("kit.json")).ok()?).ok()?;
        if meta.get("format").and_then(|v| v.as_u64()) != Some(u64::from(KIT_FORMAT)) {
            return None;
        }
        let kit = Self::paths(dir, &meta).ok()?;
        let all = [
            &kit.l1_bzimage,
            &kit.l1_vmlinux,
            &kit.l1_base_initrd,
            &kit.l2_bzimage,
            &kit.l2_vmlinux,
            &kit.l2_initrd,
            &kit.busybox,
        ];
        all.iter().all(|p| p.is_file()).then_some(kit)
    }

    /// Loads the kit from `root`, building it (under an exclusive flock) if it is missing.
    pub fn load_or_build(root: &Path) -> Result<GuestKit> {
        let dir = root.join(format!("v{KIT_FORMAT}"));
        if let Some(kit) = Self::try_load(&dir) {
            return Ok(kit);
        }
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let _lock = FileLock::exclusive(&root.join(".lock"))?;
        // Another process may have finished the build while we waited for the lock.
        if let Some(kit) = Self::try_load(&dir) {
            return Ok(kit);
        }
        eprintln!(
            "[bulkhead-tests] building guest kit in {} (one-time, needs apt-get download)",
            dir.display()
        );
        let started = std::time::Instant::now();
        let scratch = root.join(format!("build-{}", std::process::id()));
        // Leftovers of crashed builds (we hold the lock, so nobody else is building).
        if let Ok(entries) = fs::read_dir(root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("build-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let result = build_kit(root, &scratch);
        match result {
            Ok(()) => {
                let _ = fs::remove_dir_all(&dir);
                fs::rename(&scratch, &dir).with_context(|| {
                    format!("renaming {} to {}", scratch.display(), dir.display())
                })?;
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&scratch);
                return Err(e);
            }
        }
        eprintln!(
            "[bulkhead-tests] guest kit built in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Self::try_load(&dir)
            .ok_or_else(|| anyhow!("guest kit in {} is incomplete after build", dir.display()))
    }
}

/// `<workspace>/target/guest-kit`.
pub fn kit_root() -> PathBuf {
    workspace_root().join("target").join("guest-kit")
}

/// An exclusive `flock(2)` held until drop.
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Blocks until the exclusive lock on `path` (created if missing) is held.
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        loop {
            // SAFETY: flock on a valid, owned file descriptor; no memory is shared with the kernel.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).with_context(|| format!("flock {}", path.display()));
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking a valid, owned file descriptor.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// Runs a command, returning its stdout; fails with its stderr on a non-zero exit.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `apt-get update` (once per process).
fn apt_update() -> Result<()> {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if !*done {
        eprintln!("[bulkhead-tests] running apt-get update");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        *done = true;
    }
    Ok(())
}

/// Makes sure host tools exist, installing their Debian packages with apt-get (as root) if not.
pub fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<(&str, &str)> = tools
        .iter()
        .copied()
        .filter(|(t, _)| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let pkgs: BTreeSet<&str> = missing.iter().map(|(_, p)| *p).collect();
    if !is_root() {
        bail!(
            "missing host tools {:?}; install the Debian packages {:?} (e.g. run .ci/run as root)",
            missing.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            pkgs
        );
    }
    eprintln!("[bulkhead-tests] installing missing packages {pkgs:?}");
    let install = |pkgs: &BTreeSet<&str>| {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs.iter()))
    };
    if install(&pkgs).is_err() {
        apt_update()?;
        install(&pkgs)?;
    }
    for (t, p) in &missing {
        if which(t).is_none() {
            bail!("{t} is still missing after installing {p}");
        }
    }
    Ok(())
}

/// Resolves a metapackage (e.g. `linux-image-amd64`) to the versioned package it depends on.
fn resolve_metapackage(meta: &str) -> Result<String> {
    let query = || run(Command::new("apt-cache").args(["depends", "--important", meta]));
    let out = match query() {
        Ok(o) if o.contains("Depends:") => o,
        _ => {
            apt_update()?;
            query()?
        }
    };
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| {
            d.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| anyhow!("cannot resolve {meta} to a versioned kernel package:\n{out}"))
}

/// Downloads `pkg` into `debs` (reusing an earlier download) and returns the .deb path.
fn download(debs: &Path, pkg: &str) -> Result<PathBuf> {
    let find = || -> Option<PathBuf> {
        let prefix = format!("{pkg}_");
        let mut found: Vec<PathBuf> = fs::read_dir(debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
            .collect();
        found.sort();
        found.pop()
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let get = || {
        run(Command::new("apt-get")
            .args(["download", "-q", pkg])
            .current_dir(debs))
    };
    if get().is_err() {
        apt_update()?;
        get().with_context(|| format!("apt-get download {pkg}"))?;
    }
    find().ok_or_else(|| {
        anyhow!(
            "apt-get download {pkg} produced no .deb in {}",
            debs.display()
        )
    })
}

/// `dpkg -x` a package into a fresh directory.
fn extract_deb(deb: &Path, into: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(into);
    fs::create_dir_all(into)?;
    run(Command::new("dpkg").arg("-x").arg(deb).arg(into))?;
    Ok(())
}

/// The single `lib/modules/<kver>` directory name in an extracted kernel package.
fn kernel_version(root: &Path) -> Result<String> {
    let dir = root.join("lib/modules");
    let mut kvers: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if kvers.len() != 1 {
        bail!(
            "expected exactly one kernel version in {}, found {kvers:?}",
            dir.display()
        );
    }
    Ok(kvers.remove(0))
}

/// Decompressor commands by payload magic.
const DECOMPRESSORS: &[(&[u8], &str, &[&str])] = &[
    (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    (b"\xfd7zXZ\x00", "xz", &["-dc"]),
    (b"BZh", "bzip2", &["-dc"]),
    (b"\x5d\x00\x00\x00", "xz", &["--format=lzma", "-dc"]),
    (b"\x89LZO", "lzop", &["-dc"]),
    (b"\x02!L\x18", "lz4", &["-dc"]),
    (b"(\xb5/\xfd", "zstd", &["-dc"]),
];

/// Decompresses the payload of a bzImage into an ELF vmlinux, like `scripts/extract-vmlinux`.
///
/// The payload is located from the setup header (`setup_sects`, `payload_offset`); if that does not
/// yield an ELF, every occurrence of every known compression magic is tried in turn.
pub fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let img = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let mut candidates: Vec<usize> = Vec::new();
    if img.len() > 0x250 && &img[0x202..0x206] == b"HdrS" {
        let setup_sects = match img[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let payload_offset =
            u32::from_le_bytes([img[0x248], img[0x249], img[0x24a], img[0x24b]]) as usize;
        candidates.push((setup_sects + 1) * 512 + payload_offset);
    }
    for (magic, _, _) in DECOMPRESSORS {
        let mut start = 0;
        while let Some(pos) = find_bytes(&img[start..], magic) {
            candidates.push(start + pos);
            start += pos + 1;
        }
    }
    let mut tried = Vec::new();
    for &pos in &candidates {
        let Some((_, tool, args)) = DECOMPRESSORS
            .iter()
            .find(|(m, _, _)| img.get(pos..).is_some_and(|s| s.starts_with(m)))
        else {
            continue;
        };
        // Decompressors complain about the trailing data (size word, padding) after the
        // payload; like extract-vmlinux, ignore the status and check the output instead.
        let mut child = Command::new(tool)
            .args(*args)
            .stdin(Stdio::piped())
            .stdout(File::create(out)?)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {tool}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&img[pos..]);
        }
        let _ = child.wait();
        let mut head = [0u8; 4];
        if let Ok(mut f) = File::open(out) {
            use std::io::Read;
            if f.read_exact(&mut head).is_ok() && &head == b"\x7fELF" {
                return Ok(());
            }
        }
        tried.push(format!("{tool}@{pos:#x}"));
    }
    let _ = fs::remove_file(out);
    bail!(
        "could not extract an ELF vmlinux from {} (tried {tried:?})",
        bzimage.display()
    )
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Adds busybox at `/bin/busybox` with a symlink for every applet.
fn add_busybox<W: Write>(cpio: &mut CpioWriter<W>, busybox: &Path) -> Result<()> {
    cpio.file_from_host("bin/busybox", busybox)?;
    let list = run(Command::new(busybox).arg("--list-full"))?;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet == "bin/busybox" {
            continue;
        }
        cpio.symlink(applet, "/bin/busybox")?;
    }
    Ok(())
}

/// Skeleton every initramfs needs: /dev/console for init's stdio and the usual mount points.
fn add_skeleton<W: Write>(cpio: &mut CpioWriter<W>) -> Result<()> {
    for d in [
        "dev", "proc", "sys", "tmp", "run", "root", "etc", "mnt", "var",
    ] {
        cpio.dir(d, 0o755)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.char_dev("dev/null", 0o666, 1, 3)?;
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    cpio.file("etc/group", 0o644, b"root:x:0:\n")?;
    Ok(())
}

/// Module dependency graph from `modules.dep` (module name with `-` as `_` -> relative path, deps).
struct ModuleDeps {
    by_name: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
}

impl ModuleDeps {
    fn load(moddir: &Path) -> Result<ModuleDeps> {
        let text = fs::read_to_string(moddir.join("modules.dep"))
            .with_context(|| format!("reading modules.dep in {}", moddir.display()))?;
        let mut by_name = BTreeMap::new();
        let mut deps = BTreeMap::new();
        for line in text.lines() {
            let Some((m, d)) = line.split_once(':') else {
                continue;
            };
            by_name.insert(module_name(m), m.to_owned());
            deps.insert(
                m.to_owned(),
                d.split_whitespace().map(str::to_owned).collect(),
            );
        }
        Ok(ModuleDeps { by_name, deps })
    }

    /// Relative paths of `names` and all their dependencies, dependencies first.
    fn closure(&self, names: &[&str]) -> Result<Vec<String>> {
        fn visit(
            md: &ModuleDeps,
            path: &str,
            seen: &mut BTreeSet<String>,
            order: &mut Vec<String>,
        ) {
            if !seen.insert(path.to_owned()) {
                return;
            }
            // modules.dep lists dependencies so that the last one must be loaded first.
            for d in md.deps.get(path).into_iter().flatten().rev() {
                visit(md, d, seen, order);
            }
            order.push(path.to_owned());
        }
        let mut seen = BTreeSet::new();
        let mut order = Vec::new();
        for n in names {
            let path = self
                .by_name
                .get(&n.replace('-', "_"))
                .ok_or_else(|| anyhow!("kernel module {n} not found in modules.dep"))?;
            visit(self, path, &mut seen, &mut order);
        }
        Ok(order)
    }
}

/// `kernel/arch/x86/kvm/kvm-amd.ko` -> `kvm_amd`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz` (busybox insmod wants plain).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool: Option<(&str, &[&str])> = if name.ends_with(".xz") {
        Some(("xz", &["-dc"]))
    } else if name.ends_with(".zst") {
        Some(("zstd", &["-dc"]))
    } else if name.ends_with(".gz") {
        Some(("gzip", &["-dc"]))
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some((tool, args)) => {
            let out = Command::new(tool)
                .args(args)
                .arg(path)
                .output()
                .with_context(|| format!("spawning {tool}"))?;
            if !out.status.success() {
                bail!("{tool} failed on {}", path.display());
            }
            Ok(out.stdout)
        }
    }
}

/// Strips a compression suffix: `x.ko.xz` -> `x.ko`.
fn plain_module_path(rel: &str) -> String {
    match rel.find(".ko") {
        Some(i) => format!("{}.ko", &rel[..i]),
        None => rel.to_owned(),
    }
}

fn build_kit(root: &Path, scratch: &Path) -> Result<()> {
    ensure_tools(&[
        ("apt-get", "apt"),
        ("dpkg", "dpkg"),
        ("depmod", "kmod"),
        ("xz", "xz-utils"),
        ("zstd", "zstd"),
        ("lz4", "lz4"),
        ("gzip", "gzip"),
        ("bzip2", "bzip2"),
    ])?;
    let debs = root.join("debs");
    fs::create_dir_all(&debs)?;
    fs::create_dir_all(scratch)?;
    let x = scratch.join("extract");

    let l1_pkg = resolve_metapackage("linux-image-amd64")?;
    let l2_pkg = resolve_metapackage("linux-image-cloud-amd64")?;
    eprintln!("[bulkhead-tests] L1 kernel package {l1_pkg}, L2 kernel package {l2_pkg}");
    let l1_deb = download(&debs, &l1_pkg)?;
    let l2_deb = download(&debs, &l2_pkg)?;
    let bb_deb = download(&debs, "busybox-static")?;
    let (l1_root, l2_root, bb_root) = (x.join("l1"), x.join("l2"), x.join("busybox"));
    extract_deb(&l1_deb, &l1_root)?;
    extract_deb(&l2_deb, &l2_root)?;
    extract_deb(&bb_deb, &bb_root)?;
    let l1_kver = kernel_version(&l1_root)?;
    let l2_kver = kernel_version(&l2_root)?;
    for (r, k) in [(&l1_root, &l1_kver), (&l2_root, &l2_kver)] {
        run(Command::new("depmod").arg("-b").arg(r).arg(k))?;
    }
    let busybox = bb_root.join("bin/busybox");
    if !busybox.is_file() {
        bail!("busybox-static package has no bin/busybox");
    }
    fs::copy(&busybox, scratch.join("busybox"))?;

    // Kernels.
    for (sub, r, k) in [("l1", &l1_root, &l1_kver), ("l2", &l2_root, &l2_kver)] {
        let d = scratch.join(sub);
        fs::create_dir_all(&d)?;
        let bz = r.join(format!("boot/vmlinuz-{k}"));
        fs::copy(&bz, d.join("vmlinuz")).with_context(|| format!("copying {}", bz.display()))?;
        extract_vmlinux(&bz, &d.join("vmlinux"))?;
    }

    // L2 initramfs.
    {
        let f = File::create(scratch.join("l2/initrd.img"))?;
        let mut cpio = CpioWriter::new(BufWriter::new(f));
        add_skeleton(&mut cpio)?;
        add_busybox(&mut cpio, &busybox)?;
        cpio.file("init", 0o755, L2_INIT.as_bytes())?;
        cpio.dir("etc/udhcpc", 0o755)?;
        cpio.file(
            "etc/udhcpc/default.script",
            0o755,
            L2_UDHCPC_SCRIPT.as_bytes(),
        )?;
        // virtio-pci + virtio-blk for bulkhead.test=blk, flat under /lib/modules, in load order.
        let moddir = l2_root.join("lib/modules").join(&l2_kver);
        let blk = ModuleDeps::load(&moddir)?.closure(L2_BLK_MODULES)?;
        let mut order = String::new();
        for rel in &blk {
            let plain = plain_module_path(rel);
            let name = Path::new(&plain)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| anyhow!("module path {plain} has no file name"))?;
            cpio.file(
                &format!("lib/modules/{name}"),
                0o644,
                &read_module(&moddir.join(rel))?,
            )?;
            order.push_str(&name);
            order.push('\n');
        }
        cpio.file("etc/bulkhead/blk-modules", 0o644, order.as_bytes())?;
        // virtio-pci + virtio-net for bulkhead.test=net: the files not already added above.
        let mut have: BTreeSet<String> = order.lines().map(str::to_owned).collect();
        let mut net_order = String::new();
        for rel in ModuleDeps::load(&moddir)?.closure(L2_NET_MODULES)? {
            let plain = plain_module_path(&rel);
            let name = Path::new(&plain)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| anyhow!("module path {plain} has no file name"))?;
            if have.insert(name.clone()) {
                cpio.file(
                    &format!("lib/modules/{name}"),
                    0o644,
                    &read_module(&moddir.join(&rel))?,
                )?;
            }
            net_order.push_str(&name);
            net_order.push('\n');
        }
        cpio.file("etc/bulkhead/net-modules", 0o644, net_order.as_bytes())?;
        // The ACPI button and evdev for bulkhead.test=hotplug: the files not already added.
        let mut hp_order = String::new();
        for rel in ModuleDeps::load(&moddir)?.closure(L2_HOTPLUG_MODULES)? {
            let plain = plain_module_path(&rel);
            let name = Path::new(&plain)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| anyhow!("module path {plain} has no file name"))?;
            if have.insert(name.clone()) {
                cpio.file(
                    &format!("lib/modules/{name}"),
                    0o644,
                    &read_module(&moddir.join(&rel))?,
                )?;
            }
            hp_order.push_str(&name);
            hp_order.push('\n');
        }
        cpio.file("etc/bulkhead/hotplug-modules", 0o644, hp_order.as_bytes())?;
        cpio.finish()?;
    }

    // L1 base initramfs.
    {
        let moddir = l1_root.join("lib/modules").join(&l1_kver);
        let md = ModuleDeps::load(&moddir)?;
        let boot = md.closure(L1_BOOT_MODULES)?;
        let kvm = md.closure(L1_KVM_MODULES)?;
        let mut all = md.closure(L1_BOOT_MODULES)?;
        all.extend(md.closure(L1_KVM_MODULES)?);
        all.extend(md.closure(L1_EXTRA_MODULES)?);
        let all: BTreeSet<String> = all.into_iter().collect();

        let f = File::create(scratch.join("l1/base.cpio"))?;
        let mut cpio = CpioWriter::new(BufWriter::new(f));
        add_skeleton(&mut cpio)?;
        cpio.dir("newroot", 0o755)?;
        add_busybox(&mut cpio, &busybox)?;
        let kdir = format!("lib/modules/{l1_kver}");
        let mut dep_lines = String::new();
        for rel in &all {
            let plain = plain_module_path(rel);
            cpio.file(
                &format!("{kdir}/{plain}"),
                0o644,
                &read_module(&moddir.join(rel))?,
            )?;
            let deps = md.deps.get(rel).cloned().unwrap_or_default();
            let deps: Vec<String> = deps.iter().map(|d| plain_module_path(d)).collect();
            dep_lines.push_str(&format!("{plain}: {}\n", deps.join(" ")));
        }
        // A modules.dep restricted to the shipped modules, for busybox modprobe.
        cpio.file(&format!("{kdir}/modules.dep"), 0o644, dep_lines.as_bytes())?;
        for extra in ["modules.builtin", "modules.order"] {
            let p = moddir.join(extra);
            if p.is_file() {
                cpio.file_from_host(&format!("{kdir}/{extra}"), &p)?;
            }
        }
        let list = |v: &[String]| {
            v.iter()
                .map(|m| plain_module_path(m) + "\n")
                .collect::<String>()
        };
        cpio.file("etc/bulkhead/boot-modules", 0o644, list(&boot).as_bytes())?;
        cpio.file("etc/bulkhead/kvm-modules", 0o644, list(&kvm).as_bytes())?;
        cpio.file("etc/bulkhead/kernel-version", 0o644, l1_kver.as_bytes())?;
        cpio.file("init", 0o755, L1_INIT_STAGE1.as_bytes())?;
        cpio.file(
            "sbin/bulkhead-l1-init",
            0o755,
            L1_INIT_STAGE2.replace("@KVER@", &l1_kver).as_bytes(),
        )?;
        cpio.file("sbin/bulkhead-agent", 0o755, L1_AGENT.as_bytes())?;
        cpio.file(
            "etc/bulkhead/load-kvm.sh",
            0o755,
            L1_LOAD_KVM.replace("@KVER@", &l1_kver).as_bytes(),
        )?;
        cpio.file("etc/hosts", 0o644, b"127.0.0.1 localhost bulkhead-l1\n")?;
        cpio.file_from_host(L2_BZIMAGE, &scratch.join("l2/vmlinuz"))?;
        cpio.file_from_host(L2_VMLINUX, &scratch.join("l2/vmlinux"))?;
        cpio.file_from_host(L2_INITRD, &scratch.join("l2/initrd.img"))?;
        cpio.finish()?;
    }

    let _ = fs::remove_dir_all(&x);
    let meta = serde_json::json!({
        "format": KIT_FORMAT,
        "l1_package": l1_pkg,
        "l1_kernel_version": l1_kver,
        "l2_package": l2_pkg,
        "l2_kernel_version": l2_kver,
        "busybox_deb": bb_deb.file_name().map(|n| n.to_string_lossy().into_owned()),
    });
    fs::write(scratch.join("kit.json"), serde_json::to_vec_pretty(&meta)?)?;
    Ok(())
}

/// Directory holding the Bulkhead binaries: `BULKHEAD_BIN_DIR` if set, else
/// `$CARGO_TARGET_DIR/release` if `CARGO_TARGET_DIR` is set, else `<workspace>/target/release`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BULKHEAD_BIN_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        let d = PathBuf::from(d);
        let d = if d.is_relative() {
            workspace_root().join(d)
        } else {
            d
        };
        return d.join("release");
    }
    workspace_root().join("target").join("release")
}

/// Checks that all [`BULKHEAD_BINARIES`] exist in `dir`, failing loudly otherwise.
pub fn bulkhead_binaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = BULKHEAD_BINARIES.iter().map(|b| dir.join(b)).collect();
    let missing: Vec<&str> = BULKHEAD_BINARIES
        .iter()
        .zip(&paths)
        .filter(|(_, p)| !p.is_file())
        .map(|(b, _)| *b)
        .collect();
    if !missing.is_empty() {
        bail!(
            "\n\n*** Bulkhead binaries {missing:?} are missing in {} ***\n\
             *** Run `cargo build --release --bins` first (or set BULKHEAD_BIN_DIR). ***\n",
            dir.display()
        );
    }
    Ok(paths)
}

/// Shared libraries (and the dynamic loader) an ELF needs, as absolute host paths, via `ldd`.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("ldd {}: {line}", binary.display());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Adds host executables at `<dest_dir>/<file name>` together with their shared libraries (at
/// their host paths, which keeps the dynamic loader's search paths valid).
pub fn add_executables<W: Write>(
    cpio: &mut CpioWriter<W>,
    dest_dir: &str,
    bins: &[PathBuf],
) -> Result<()> {
    let mut libs = BTreeSet::new();
    for b in bins {
        let name = b
            .file_name()
            .ok_or_else(|| anyhow!("{} has no file name", b.display()))?
            .to_string_lossy()
            .into_owned();
        cpio.file_from_host(&format!("{}/{name}", dest_dir.trim_end_matches('/')), b)?;
        libs.extend(shared_libraries(b)?);
    }
    for lib in libs {
        cpio.file_from_host(&lib.to_string_lossy(), &lib)?;
    }
    Ok(())
}

/// Writes the overlay cpio with the Bulkhead binaries from `bin_dir` (see [`bin_dir`]) to `out`.
pub fn bulkhead_overlay(bin_dir: &Path, out: &Path) -> Result<()> {
    let bins = bulkhead_binaries(bin_dir)?;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cpio = CpioWriter::new(BufWriter::new(f));
    add_executables(&mut cpio, "bin", &bins)?;
    cpio.finish()?;
    Ok(())
}

/// Cache file name for [`host_qemu_overlay`], keyed on the QEMU binary's size and mtime so that
/// a QEMU upgrade on the host invalidates it.
pub fn host_qemu_overlay_name() -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let qemu = which("qemu-system-x86_64").ok_or_else(|| {
        anyhow!("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    })?;
    let md = fs::metadata(&qemu)?;
    // "-qsd": the overlay also holds qemu-storage-daemon (older overlays did not).
    Ok(format!(
        "host-qemu-overlay-qsd-{}-{}.cpio",
        md.size(),
        md.mtime()
    ))
}

/// Writes an overlay with the host's `qemu-system-x86_64` (and libraries and firmware) to `out`,
/// so that tests can compare Bulkhead with QEMU/KVM inside L1 (QEMU appears as
/// `/usr/bin/qemu-system-x86_64`, firmware under `/usr/share/qemu` and `/usr/share/seabios`),
/// and with `qemu-storage-daemon` (`/usr/bin/qemu-storage-daemon`), a vhost-user-blk back end
/// nobody here wrote.
pub fn host_qemu_overlay(out: &Path) -> Result<()> {
    let qemu = which("qemu-system-x86_64").ok_or_else(|| {
        anyhow!("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    })?;
    let qsd = which("qemu-storage-daemon").ok_or_else(|| {
        anyhow!("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
    })?;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cpio = CpioWriter::new(BufWriter::new(f));
    // At its host path: QEMU finds its firmware relative to the executable (../share/qemu).
    add_executables(&mut cpio, "usr/bin", &[qemu, qsd])?;
    for dir in ["/usr/share/qemu", "/usr/share/seabios"] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            // Only x86 firmware and option ROMs are needed.
            let wanted = name.ends_with(".bin") || name.ends_with(".rom");
            if wanted && p.is_file() {
                cpio.file_from_host(&format!("{dir}/{name}"), &p)?;
            }
        }
    }
    cpio.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/arch/x86/kvm/kvm-amd.ko"), "kvm_amd");
        assert_eq!(module_name("kernel/net/core/failover.ko.xz"), "failover");
        assert_eq!(plain_module_path("a/b/c.ko.zst"), "a/b/c.ko");
        assert_eq!(plain_module_path("a/b/c.ko"), "a/b/c.ko");
    }

    #[test]
    fn module_closure_orders_dependencies_first() {
        let md = ModuleDeps {
            by_name: [
                ("kvm_amd".to_owned(), "k/kvm-amd.ko".to_owned()),
                ("kvm".to_owned(), "k/kvm.ko".to_owned()),
                ("ccp".to_owned(), "c/ccp.ko".to_owned()),
                ("irqbypass".to_owned(), "v/irqbypass.ko".to_owned()),
            ]
            .into(),
            deps: [
                (
                    "k/kvm-amd.ko".to_owned(),
                    vec![
                        "c/ccp.ko".into(),
                        "k/kvm.ko".into(),
                        "v/irqbypass.ko".into(),
                    ],
                ),
                ("k/kvm.ko".to_owned(), vec!["v/irqbypass.ko".into()]),
                ("c/ccp.ko".to_owned(), vec![]),
                ("v/irqbypass.ko".to_owned(), vec![]),
            ]
            .into(),
        };
        let order = md.closure(&["kvm-amd"]).expect("closure");
        assert_eq!(
            order,
            ["v/irqbypass.ko", "k/kvm.ko", "c/ccp.ko", "k/kvm-amd.ko"]
        );
        assert!(md.closure(&["nope"]).is_err());
    }
}
