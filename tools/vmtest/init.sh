#!/bin/busybox sh
# PID 1 of a vmtest VM. The host reads the serial console: every outcome
# ends in a line the host parses (VMTEST-EXIT=... or VMTEST-BOOT-FAILED:),
# then a forced poweroff so that qemu exits.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

fail() {
	echo "VMTEST-BOOT-FAILED: $*"
	poweroff -f
	exit 1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Written by vmtest at build time: KREL, KMODS (host path of the modules
# tree), MODULES (loaded with their dependencies before the command).
. /vmtest/conf

# virtio and 9p come from the initramfs: nothing else is reachable yet.
for m in $(cat /vmtest/ko/order); do
	insmod "/vmtest/ko/$m.ko" || fail "insmod $m"
done

R=/newroot
mkdir -p $R
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot $R ||
	fail "mount of the host root over 9p"

# The kernel's own module autoloading runs /sbin/modprobe in this
# initramfs (we chroot, we do not switch_root), so give busybox modprobe
# the whole modules tree here: anything not in MODULES still loads on demand.
mkdir -p /lib/modules/$KREL
mount --bind "$R$KMODS" /lib/modules/$KREL || fail "bind mount of $KMODS"
modprobe -a $MODULES || fail "modprobe of the module list"

# The host has no /lib/modules/$KREL, and programs in the VM run kmod's
# modprobe (moby/ipvs does); an overlay with a tmpfs upper layer adds the
# directory without touching the host.
# (/lib is a symlink to usr/lib on merged-/usr hosts: resolve it first.)
L=$(readlink -f $R/lib)
mkdir -p /ovl && mount -t tmpfs tmpfs /ovl && mkdir -p /ovl/upper /ovl/work &&
	mount -t overlay overlay -o lowerdir=$L,upperdir=/ovl/upper,workdir=/ovl/work $L &&
	mkdir -p $L/modules/$KREL &&
	mount -o remount,ro $L &&
	mount --bind /lib/modules/$KREL $L/modules/$KREL ||
	fail "/lib/modules in the chroot"

RUN=
for a in $(cat /proc/cmdline); do
	case "$a" in vmtest.run=*) RUN="${a#vmtest.run=}" ;; esac
done
[ -n "$RUN" ] || fail "no vmtest.run= on the kernel command line"
# NONCE and NET, written by the host for this run.
. "$R$RUN/conf" || fail "cannot read $RUN/conf"

mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
if [ -n "$KEEP" ]; then
	mkdir -p /hosttmp && mount --bind $R/tmp /hosttmp || fail "bind of the host /tmp"
fi
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || fail "tmpfs on /tmp"
if [ -n "$KEEP" ]; then
	# The repo lives under the host's /tmp: bring just that tree back.
	mkdir -p "$R$KEEP" && mount --bind "/hosttmp${KEEP#/tmp}" "$R$KEEP" ||
		fail "bind of $KEEP"
fi
mount -t tmpfs -o mode=755 tmpfs $R/run || fail "tmpfs on /run"

ip link set lo up || fail "loopback"
if [ "$NET" = 1 ]; then
	ip addr add 198.18.250.15/24 dev eth0 || fail "address on eth0"
	ip link set eth0 up || fail "eth0 up"
fi

# Kernel messages would interleave with the command's output from here on.
dmesg -n 1
echo "VMTEST-START $NONCE"
chroot $R /bin/sh "$RUN/cmd.sh" </dev/null
echo "VMTEST-EXIT=$? $NONCE"
poweroff -f
