#!/bin/sh
# Stage 1 (initramfs, busybox): load the modules needed to reach the root, mount the read-only
# ext4 guest root image under a tmpfs overlay, mount the checkout at its host path and switch_root into
# guest/init.sh of that checkout.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "initramfs: $*" >&2
    echo o > /proc/sysrq-trigger
    sleep 60
}

while read -r mod; do
    insmod "/lib/modules/$mod" || echo "initramfs: insmod $mod failed" >&2
done < /lib/modules/load-order

work=
for word in $(cat /proc/cmdline); do
    case "$word" in
        ulogd.work=*) work="${word#ulogd.work=}" ;;
    esac
done
[ -n "$work" ] || fail "no ulogd.work= on the kernel command line"

# The root image is the virtio disk whose serial is "ulogdroot".
rootdev=
tries=0
while [ -z "$rootdev" ] && [ $tries -lt 50 ]; do
    for dev in /sys/block/vd*; do
        [ "$(cat "$dev/serial" 2>/dev/null)" = ulogdroot ] && rootdev=/dev/${dev##*/}
    done
    [ -n "$rootdev" ] || { sleep 0.1; tries=$((tries + 1)); }
done
[ -n "$rootdev" ] || fail "no virtio disk with serial ulogdroot"
mount -t ext4 -o ro "$rootdev" /lower || fail "cannot mount the guest root $rootdev"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay"
mkdir -p "/newroot$work"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose ulogdwork "/newroot$work" || fail "cannot mount the checkout"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /bin/sh "$work/tests/harness/guest/init.sh"
