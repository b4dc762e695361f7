#!/bin/sh
# Stage 2, PID 1 in the Debian guest root: prepare the system, run $ULOGD_RUN/cmd.sh, record
# its exit status in $ULOGD_RUN/rc, power off.  Without a run directory on the kernel command
# line: an interactive shell.  With ulogd.init=systemd: hand PID 1 over to systemd, which runs
# cmd.sh as a service (ulogd-e2e-run.service, written below) and powers off after it.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=${TERM:-linux}
mount -t proc proc /proc
mount -t sysfs sysfs /sys

ULOGD_INIT=
for word in $(cat /proc/cmdline); do
    case "$word" in
        ulogd.work=*) ULOGD_SRC="${word#ulogd.work=}" ;;
        ulogd.run=*) ULOGD_RUN="${word#ulogd.run=}" ;;
        ulogd.init=*) ULOGD_INIT="${word#ulogd.init=}" ;;
    esac
done
export ULOGD_SRC ULOGD_RUN
export ULOGD_GUEST="$ULOGD_SRC/tests/harness/guest"
export PYTHONPATH="$ULOGD_SRC:/opt/ulogd-pydeps"
export PYTHONUNBUFFERED=1

power_off() {
    sync
    echo o > /proc/sysrq-trigger
    sleep 30
}
echo 1 > /proc/sys/kernel/sysrq

# The checkout is mounted at its host path, which may lie under a directory that gets a fresh
# tmpfs below (a clone in /tmp, a checkout under /run): keep a second mount of it, and put
# it back over the tmpfs when it is hidden.
mkdir -p /.ulogd-work
mount --bind "$ULOGD_SRC" /.ulogd-work || echo "init: cannot bind the checkout $ULOGD_SRC"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
if [ ! -f "$ULOGD_GUEST/init.sh" ]; then
    mkdir -p "$ULOGD_SRC" && mount --bind /.ulogd-work "$ULOGD_SRC" \
        || echo "init: cannot mount the checkout again at $ULOGD_SRC"
fi

if [ -n "$ULOGD_RUN" ] && [ ! -f "$ULOGD_RUN/cmd.sh" ]; then
    # Given a command to run but none to be found: say so and stop, never wait for a shell.
    echo "init: no command: $ULOGD_RUN/cmd.sh does not exist in the guest (checkout $ULOGD_SRC)"
    echo "init: powering off"
    power_off
fi

hostname ulogd-e2e
ip link set lo up 2>/dev/null

if [ "$ULOGD_INIT" = systemd ]; then
    # systemd and udev make the /dev/mapper nodes and load modules-load.d: nothing forced
    # here (no DM_DISABLE_UDEV, no dm-log-userspace: the scenario installs the package's
    # modules-load.d file and checks that it loads the module).
    for m in dm-mod dm-mirror dm-log dm-flakey loop; do
        modprobe "$m" || echo "init: modprobe $m failed"
    done
    echo 0123456789abcdef0123456789abcdef > /etc/machine-id  # not a first boot
    units=/etc/systemd/system
    mkdir -p "$units/multi-user.target.wants"
    ln -sf /lib/systemd/system/multi-user.target "$units/default.target"
    # Nothing the command does not need: no logins, no timers, no corosync at boot (the
    # image's package enabled it; the scenario checks that ulogd does not pull it in).
    for unit in getty@tty1.service serial-getty@ttyS0.service systemd-firstboot.service \
        apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
        systemd-timesyncd.service corosync.service; do
        ln -sf /dev/null "$units/$unit"
    done
    rm -f "$units/multi-user.target.wants/corosync.service"
    cat > "$units/ulogd-e2e-run.service" <<EOF
[Unit]
Description=e2e command of this boot ($ULOGD_RUN/cmd.sh)
After=multi-user.target

[Service]
Type=oneshot
WorkingDirectory=$ULOGD_RUN
Environment=ULOGD_SRC=$ULOGD_SRC ULOGD_RUN=$ULOGD_RUN ULOGD_GUEST=$ULOGD_GUEST
Environment=PYTHONPATH=$PYTHONPATH PYTHONUNBUFFERED=1 HOME=/root LANG=C.UTF-8
ExecStart=/bin/sh -c 'sh ./cmd.sh </dev/null; rc=\$\$?; echo \$\$rc > rc; \
echo "init: cmd.sh exited with \$\$rc after \$\$(cut -d" " -f1 /proc/uptime) s"; \
sync; echo o > /proc/sysrq-trigger'
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
EOF
    ln -sf "$units/ulogd-e2e-run.service" "$units/multi-user.target.wants/ulogd-e2e-run.service"
    umount /dev/pts /dev/shm 2>/dev/null
    echo "init: handing over to systemd after $(cut -d' ' -f1 /proc/uptime) s"
    exec /lib/systemd/systemd --log-target=console --show-status=0
fi

export DM_DISABLE_UDEV=1  # no udev here: dmsetup makes the /dev/mapper nodes itself
for m in dm-mod dm-mirror dm-log dm-log-userspace dm-flakey loop; do
    modprobe "$m" || echo "init: modprobe $m failed"
done
dmsetup mknodes >/dev/null 2>&1

echo "init: guest ready after $(cut -d' ' -f1 /proc/uptime) s"
rc=0
if [ -n "$ULOGD_RUN" ]; then
    cd "$ULOGD_RUN" || power_off
    sh "$ULOGD_RUN/cmd.sh" < /dev/null
    rc=$?
    echo "$rc" > "$ULOGD_RUN/rc"
    echo "init: cmd.sh exited with $rc after $(cut -d' ' -f1 /proc/uptime) s"
else
    setsid -c /bin/bash -l
fi
power_off
