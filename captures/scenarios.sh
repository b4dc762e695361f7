#!/bin/sh
# Guest-side scenarios that record the shipped captures (run inside the QEMU guest by
# tools/make-captures and by tests/e2e/test_capture_replay.py; needs root, dmsetup, losetup
# and the real dm-log-userspace module).
#
#   sh captures/scenarios.sh OUTDIR SCENARIO...
#
# SCENARIO is one of: lifecycle, integrated-flush, restart, clustered-disk.  Each one starts
# `dm-ulogd run --capture` on the real netlink transport, drives a small mirror through dmsetup
# and writes <scenario>.pcapng (restart: restart-1.pcapng and restart-2.pcapng) plus the
# daemon's log (<name>.log) and the commands' output (<scenario>.steps) into OUTDIR.
# Captures are written to tmpfs first and copied to OUTDIR at the end (9p is slow).
set -eu

OUT=$1
shift
WORK=$(mktemp -d /tmp/ulogd-scenarios.XXXXXX)
SECTORS=16384        # 8 MiB legs
REGION=2048          # 1 MiB regions: 8 regions, so a capture stays a few KiB
REGIONS=$((SECTORS / REGION))
DAEMON_PID=

log() { echo "[$(cut -d' ' -f1 /proc/uptime)] $*" | tee -a "$WORK/$SCENARIO.steps"; }

new_loop() {  # new_loop NAME MIB -> prints the loop device (detached by losetup -D)
    truncate -s "$2M" "$WORK/$1.img"
    losetup -f --show "$WORK/$1.img"
}

# ulogd's netlink transport asks pyroute2 0.9.7 to bind with pid=0, which that version
# records without binding the socket, so the kernel finds no listener ("Userspace log server
# not found").  Until the transport binds itself, ulogd is started through this shim, which
# binds the transport's socket only when it is still unbound (a no-op once that is fixed).
# The datagrams and the capture are the daemon's own either way.
cat >"$WORK/ulogd-shim.py" <<'EOF'
import sys

import ulogd.edges.transport.netlink as netlink
from ulogd.ops.cli import main

_init = netlink.NetlinkTransport.__init__


def _init_and_bind(self):
    _init(self)
    if self._sock.getsockname()[0] == 0:
        self._sock.bind((0, netlink.GROUP_BIT))
        self._sock.setsockopt(270, 1, 7)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group 7
        print("ulogd-shim: bound the unbound netlink socket", file=sys.stderr)


netlink.NetlinkTransport.__init__ = _init_and_bind
sys.exit(main(sys.argv[1:]))
EOF

start_daemon() {  # start_daemon CAPTURE_NAME
    rm -f "$WORK/run/ulogd.pid"
    python3 "$WORK/ulogd-shim.py" run -f --run-dir "$WORK/run" --capture "$WORK/$1.pcapng" \
        --log-level debug 2>>"$WORK/$1.log" &
    DAEMON_PID=$!
    i=0
    while [ ! -f "$WORK/run/ulogd.pid" ]; do
        i=$((i + 1))
        if [ $i -gt 600 ] || ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            echo "ulogd did not start" >&2
            cat "$WORK/$1.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    log "ulogd started (pid $DAEMON_PID, capture $1.pcapng)"
}

stop_daemon() {
    kill -TERM "$DAEMON_PID"
    wait "$DAEMON_PID" || true
    log "ulogd stopped"
}

wait_sync() {  # wait_sync DM_NAME: poll the status until every region is in sync
    i=0
    until dmsetup status "$1" | grep -q " $REGIONS/$REGIONS "; do
        i=$((i + 1))
        [ $i -lt 120 ] || { echo "mirror $1 never synced" >&2; dmsetup status "$1" >&2; exit 1; }
        sleep 0.5
    done
    log "in sync: $(dmsetup status "$1")"
}

write_region() {  # write_region DM_NAME REGION: one 4 KiB direct write into a region
    write_region_of "$1" "$2" "$REGION"
}

write_region_of() {  # write_region_of DM_NAME REGION REGION_SECTORS
    dd if=/dev/urandom of="/dev/mapper/$1" bs=4096 count=1 oflag=direct conv=notrunc \
        seek=$(($2 * $3 / 8)) 2>/dev/null
}

mirror_table() {  # mirror_table UUID LOG_ARGS...: a 2-leg userspace-log mirror on new loops
    uuid=$1
    shift
    leg0=$(new_loop "leg0-$uuid" 8)
    leg1=$(new_loop "leg1-$uuid" 8)
    count=$(($# + 1))
    echo "0 $SECTORS mirror userspace $count $uuid $* 2 $leg0 0 $leg1 0 1 handle_errors"
}

finish() {  # copy a capture and its daemon log to OUTDIR
    for name in "$@"; do
        cp "$WORK/$name.pcapng" "$OUT/$name.pcapng"
        cp "$WORK/$name.log" "$OUT/$name.log"
    done
    cp "$WORK/$SCENARIO.steps" "$OUT/$SCENARIO.steps"
}

scenario_lifecycle() {
    table=$(mirror_table ulogd-lifecycle clustered-core $REGION)
    start_daemon lifecycle
    log "create: $table"
    dmsetup create lifecycle --table "$table"
    wait_sync lifecycle
    for r in 0 3 3 7; do write_region lifecycle $r; done
    log "wrote regions 0 3 3 7"
    log "status: $(dmsetup status lifecycle)"
    log "table: $(dmsetup table lifecycle)"
    dmsetup suspend lifecycle
    log "suspended"
    dmsetup resume lifecycle
    log "resumed"
    write_region lifecycle 5
    dmsetup reload lifecycle --table "$table"
    dmsetup resume lifecycle
    log "reloaded (new luid) and resumed"
    write_region lifecycle 1
    log "status: $(dmsetup status lifecycle)"
    dmsetup remove lifecycle
    log "removed"
    stop_daemon
    finish lifecycle
}

scenario_integrated_flush() {
    table=$(mirror_table ulogd-integrated integrated_flush clustered-core $REGION)
    start_daemon integrated-flush
    log "create: $table"
    dmsetup create integrated --table "$table"
    wait_sync integrated
    for r in 2 2 6 1; do write_region integrated $r; done
    log "wrote regions 2 2 6 1"
    log "status: $(dmsetup status integrated)"
    dmsetup suspend integrated
    dmsetup resume integrated
    log "suspended and resumed"
    write_region integrated 4
    dmsetup remove integrated
    log "removed"
    stop_daemon
    finish integrated-flush
}

scenario_restart() {
    table=$(mirror_table ulogd-restart clustered-core $REGION)
    start_daemon restart-1
    log "create: $table"
    dmsetup create restart --table "$table"
    wait_sync restart
    for r in 1 4; do write_region restart $r; done
    log "wrote regions 1 4"
    sleep 1  # let the capture writer flush: kill -9 loses what is still buffered
    kill -KILL "$DAEMON_PID"
    wait "$DAEMON_PID" || true
    log "ulogd killed with SIGKILL"
    write_region restart 6 &
    writer=$!
    sleep 1
    log "a write to region 6 is waiting for the log server"
    start_daemon restart-2
    wait "$writer"
    log "the waiting write completed (the kernel reconnected: CTR with NUL, RESUME)"
    write_region restart 2
    log "status: $(dmsetup status restart)"
    dmsetup remove restart
    log "removed"
    stop_daemon
    finish restart-1 restart-2
}

scenario_clustered_disk() {
    # 64 regions (128 KiB): with 8 the core cannot serve a disk log (its first RESUME fails,
    # see captures/README.rst).  The first mirror is created with nosync (no resync, so the
    # capture stays small and its state does not depend on the device's old content); the
    # second reads back what the first wrote to the log device.
    logdev=$(new_loop disklog 1)
    table=$(mirror_table ulogd-disk clustered-disk "$logdev" 256 nosync)
    start_daemon clustered-disk
    log "create: $table (log device $logdev, zeroed)"
    dmsetup create disk --table "$table"
    log "status: $(dmsetup status disk)"
    for r in 0 5 5 40; do write_region_of disk "$r" 256; done
    log "wrote regions 0 5 5 40"
    dmsetup suspend disk
    dmsetup resume disk
    log "suspended and resumed"
    write_region_of disk 63 256
    log "status: $(dmsetup status disk)"
    dmsetup remove disk
    table=$(mirror_table ulogd-disk-again clustered-disk "$logdev" 256)
    log "removed; creating again on the same log device (read back from disk): $table"
    dmsetup create disk --table "$table"
    log "status: $(dmsetup status disk)"
    write_region_of disk 7 256
    dmsetup remove disk
    log "removed"
    stop_daemon
    finish clustered-disk
}

mkdir -p "$OUT"
trap 'cp "$WORK"/*.log "$WORK"/*.steps "$OUT"/ 2>/dev/null || true' EXIT
for SCENARIO in "$@"; do
    : >"$WORK/$SCENARIO.steps"
    rm -rf "$WORK/run"
    case "$SCENARIO" in
        lifecycle) scenario_lifecycle ;;
        integrated-flush) scenario_integrated_flush ;;
        restart) scenario_restart ;;
        clustered-disk) scenario_clustered_disk ;;
        *) echo "unknown scenario $SCENARIO" >&2; exit 2 ;;
    esac
    losetup -D
done
echo "scenarios done: $*"
