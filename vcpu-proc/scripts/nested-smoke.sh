#!/bin/bash
# Layer-3 smoke test by hand: boots Debian's cloud kernel (bzImage and extracted ELF vmlinux)
# under bulkhead-vcpu inside an L1 Debian guest (QEMU TCG, -cpu max, kvm_amd), driven by
# examples/drive.rs. Needs: apt-get download'ed linux-image-*-amd64, linux-image-*-cloud-amd64
# and busybox-static .debs in $KIT (default target/vcpu-kit), qemu-system-x86_64, lz4, cpio.
# The bulkhead-tests harness (tests/) is the real home of this; this script is the vcpu-proc
# developer's quick loop.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
KIT=${KIT:-$ROOT/target/vcpu-kit}
T=${CARGO_TARGET_DIR:-$ROOT/target}
mkdir -p "$KIT"
cd "$KIT"
ls ./*.deb >/dev/null 2>&1 || apt-get download linux-image-amd64 linux-image-cloud-amd64 \
    "$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6/{print $2}')" \
    "$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-6/{print $2}')" busybox-static
for d in ./*.deb; do n=$(basename "$d" | cut -d_ -f1); [ -d "x/$n" ] || { mkdir -p "x/$n"; dpkg -x "$d" "x/$n"; }; done
L1K=$(ls x/linux-image-6*-amd64/boot/vmlinuz-* | grep -v cloud | head -1)
L2K=$(ls x/linux-image-6*-cloud-amd64/boot/vmlinuz-* | head -1)
M=$(ls -d x/linux-image-6*-amd64/lib/modules/* | grep -v cloud | head -1)
BB=x/busybox-static/bin/busybox
# ELF vmlinux out of the (LZ4-compressed) bzImage.
[ -f vmlinux ] || python3 - "$L2K" <<'EOF'
import subprocess, sys
b = open(sys.argv[1], 'rb').read()
for magic, tool in [(b'\x02\x21\x4c\x18', ['lz4', '-dc']), (b'\x28\xb5\x2f\xfd', ['zstd', '-dc']),
                    (b'\xfd7zXZ\x00', ['xz', '-dc']), (b'\x1f\x8b\x08', ['gzip', '-dc'])]:
    pos = b.find(magic)
    while pos >= 0:
        out = subprocess.run(tool, input=b[pos:], capture_output=True).stdout
        if out[:4] == b'\x7fELF':
            open('vmlinux', 'wb').write(out)
            sys.exit(0)
        pos = b.find(magic, pos + 1)
sys.exit('no ELF payload found')
EOF
(cd "$ROOT" && cargo build --release -p bulkhead-vcpu-proc --bins --examples)
R=$T/release
rm -rf l2root l1root
mkdir -p l2root/{bin,proc,sys,dev} l1root/{bin,proc,sys,dev,tmp,lib64,lib/x86_64-linux-gnu,mods,l2,opt}
cp $BB l2root/bin/busybox
cat > l2root/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo BULKHEAD-GUEST-UP
echo "BULKHEAD-NCPUS=$(grep -c ^processor /proc/cpuinfo)"
echo "BULKHEAD-RTC=$(cat /sys/class/rtc/rtc0/date 2>/dev/null) $(cat /sys/class/rtc/rtc0/time 2>/dev/null) date=$(date -u +%F)"
echo "BULKHEAD-CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
mode=$(sed -n 's/.*bulkhead\.test=\([a-z]*\).*/\1/p' /proc/cmdline)
case "$mode" in
  poweroff) poweroff -f ;;
  reboot) reboot -f ;;
  count) i=0; while true; do echo "BULKHEAD-TICK $i"; i=$((i+1)); sleep 1; done ;;
  *) while true; do sleep 3600; done ;;
esac
EOF
chmod +x l2root/init
(cd l2root && find . | cpio -o -H newc --quiet | gzip -1 > ../l1root/l2/initrd)
cp $BB l1root/bin/busybox
for m in virt/lib/irqbypass.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko; do cp "$M/kernel/$m" l1root/mods/; done
cp "$R/bulkhead-vcpu" "$R/examples/drive" l1root/opt/ && strip l1root/opt/*
cp /lib/x86_64-linux-gnu/libgcc_s.so.1 /lib/x86_64-linux-gnu/libc.so.6 l1root/lib/x86_64-linux-gnu/
cp /lib64/ld-linux-x86-64.so.2 l1root/lib64/
cp "$L2K" l1root/l2/bzImage
cp vmlinux l1root/l2/vmlinux
cat > l1root/script.sh <<'EOF'
D="/opt/drive --worker /opt/bulkhead-vcpu"
L2="console=ttyS0 panic=-1 quiet"
echo "=== bzImage poweroff"
$D --kernel /l2/bzImage --initrd /l2/initrd --cmdline "$L2 bulkhead.test=poweroff" run wait:BULKHEAD-GUEST-UP:300 rss event:Shutdown:120 exit:20
echo "=== ELF vmlinux, 2 vCPUs, reboot"
$D --kernel /l2/vmlinux --initrd /l2/initrd --vcpus 2 --cmdline "$L2 bulkhead.test=reboot" run wait:BULKHEAD-GUEST-UP:300 wait:BULKHEAD-NCPUS=2:30 event:Reset:120 wait:BULKHEAD-GUEST-UP:300 quit
echo "=== bzImage, -no-reboot, reboot"
$D --kernel /l2/bzImage --initrd /l2/initrd --no-reboot --cmdline "$L2 bulkhead.test=reboot" run wait:BULKHEAD-GUEST-UP:300 event:Shutdown:120 exit:20
echo "=== ELF vmlinux, 2 vCPUs, pause/resume/reset"
$D --kernel /l2/vmlinux --initrd /l2/initrd --vcpus 2 --cmdline "$L2 bulkhead.test=count" run wait:BULKHEAD-GUEST-UP:300 "wait:BULKHEAD-TICK 2:60" query pause quiet:3000 run "wait:BULKHEAD-TICK:30" reset wait:BULKHEAD-GUEST-UP:300 "wait:BULKHEAD-TICK 1:60" quit
EOF
cat > l1root/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in irqbypass ccp kvm kvm-amd; do insmod /mods/$m.ko || echo "L1: insmod $m failed"; done
sh /script.sh
poweroff -f
EOF
chmod +x l1root/init
(cd l1root && find . | cpio -o -H newc --quiet | gzip -1 > ../l1-initrd.gz)
qemu-system-x86_64 -accel tcg -cpu max -M q35 -m 2G -smp 2 -nographic -no-reboot \
    -kernel "$L1K" -initrd l1-initrd.gz -append "console=ttyS0 panic=-1 quiet" | tee nested.log
grep -c DRIVE-OK nested.log | grep -qx 4 && echo "nested smoke: all 4 scenarios passed"
