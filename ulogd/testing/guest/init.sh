#!/bin/sh
# Stage 2, PID 1 in the Debian guest root: prepare the system, run $ULOGD_RUN/cmd.sh (or an
# interactive shell when there is none), record its exit status in $ULOGD_RUN/rc, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=${TERM:-linux}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp

for word in $(cat /proc/cmdline); do
    case "$word" in
        ulogd.work=*) ULOGD_SRC="${word#ulogd.work=}" ;;
        ulogd.run=*) ULOGD_RUN="${word#ulogd.run=}" ;;
    esac
done
export ULOGD_SRC ULOGD_RUN
export ULOGD_GUEST="$ULOGD_SRC/ulogd/testing/guest"
export PYTHONPATH="$ULOGD_SRC:/opt/ulogd-pydeps"
export PYTHONUNBUFFERED=1
export DM_DISABLE_UDEV=1

hostname ulogd-e2e
ip link set lo up 2>/dev/null
echo 1 > /proc/sys/kernel/sysrq
for m in dm-mod dm-mirror dm-log dm-log-userspace dm-flakey loop; do
    modprobe "$m" || echo "init: modprobe $m failed"
done
dmsetup mknodes >/dev/null 2>&1

echo "init: guest ready after $(cut -d' ' -f1 /proc/uptime) s"
rc=0
if [ -n "$ULOGD_RUN" ] && [ -f "$ULOGD_RUN/cmd.sh" ]; then
    cd "$ULOGD_RUN" || exit 1
    sh "$ULOGD_RUN/cmd.sh" < /dev/null
    rc=$?
    echo "$rc" > "$ULOGD_RUN/rc"
    echo "init: cmd.sh exited with $rc after $(cut -d' ' -f1 /proc/uptime) s"
else
    setsid -c /bin/bash -l
fi
sync
echo o > /proc/sysrq-trigger
sleep 30
