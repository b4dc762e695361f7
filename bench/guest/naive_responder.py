"""Baseline for bench/fio_qemu.py: the least a Python dm-log-userspace server can do.

Standard library only, one blocking ``recvfrom``/``sendto`` loop on the netlink connector
(group 7), no state beyond each log's geometry: every region is always in sync and clean,
MARK/CLEAR/FLUSH succeed without recording anything.  It is *not* a dirty log — it forgets
every mark, which is only harmless on a ``nosync`` mirror that is never recovered — and exists
to show, in the same run, what the round trips themselves cost a Python process under TCG
(the issue's "naive stdlib responder").  ``python3 naive_responder.py`` runs until SIGTERM.

``--unix PATH`` serves the same datagrams over a Unix datagram socket instead (ulogd's test
transport), replying to each sender: the smoke test and ``bench/transport_latency.py`` use
it natively.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys

NETLINK_CONNECTOR = 11
CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG = 7, 1
NLMSG_HDR = struct.Struct("=IHHII")
CN_MSG = struct.Struct("=IIIIHH")
REQ = struct.Struct("=Q129s3xIiIII")  # luid, uuid, version, error, seq, type, data_size
CTR, GET_REGION_SIZE, IS_CLEAN, IN_SYNC = 1, 6, 7, 8
GET_RESYNC_WORK, GET_SYNC_COUNT, STATUS_INFO, STATUS_TABLE = 12, 14, 15, 16
IS_REMOTE_RECOVERING = 17


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sys.argv[2])
        sock.bind(sys.argv[2])
    else:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        sock.bind((0, 1 << (CN_IDX_DM - 1)))
        sock.setsockopt(270, 1, CN_IDX_DM)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP
    peer: object = (0, 0)  # the kernel (netlink port 0), or the last Unix sender
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    geometry: dict[int, tuple[int, int]] = {}  # luid -> (region size, region count)
    print("naive responder ready", flush=True)
    while True:
        data, peer = sock.recvfrom(65536)
        if sock.family == socket.AF_NETLINK:
            peer = (0, 0)
        if len(data) < NLMSG_HDR.size + CN_MSG.size + REQ.size:
            continue
        cn_off = NLMSG_HDR.size
        idx, val, seq, ack, _length, flags = CN_MSG.unpack_from(data, cn_off)
        req_off = cn_off + CN_MSG.size
        luid, uuid, version, _error, rseq, rtype, size = REQ.unpack_from(data, req_off)
        payload = data[req_off + REQ.size : req_off + REQ.size + size]
        rtype &= 0xFF
        out = b""
        if rtype == CTR:
            words = payload.split(b"\0", 1)[0].split()
            target, region = int(words[0]), int(words[2])
            geometry[luid] = (region, (target + region - 1) // region)
        elif rtype == GET_REGION_SIZE:
            out = struct.pack("=Q", geometry.get(luid, (1024, 0))[0])
        elif rtype in (IS_CLEAN, IN_SYNC):
            out = struct.pack("=q", 1)
        elif rtype == GET_RESYNC_WORK:
            out = struct.pack("=qQ", 0, 0)
        elif rtype == GET_SYNC_COUNT:
            out = struct.pack("=Q", geometry.get(luid, (0, 0))[1])
        elif rtype in (STATUS_INFO, STATUS_TABLE):
            out = b"1 clustered-core\0"
        elif rtype == IS_REMOTE_RECOVERING:
            out = struct.pack("=qQ", 0, geometry.get(luid, (0, 0))[1])
        req = REQ.pack(luid, uuid, version, 0, rseq, rtype, len(out)) + out
        cn = CN_MSG.pack(idx, val, seq, ack, len(req), flags)
        nl = NLMSG_HDR.pack(NLMSG_HDR.size + len(cn) + len(req), 3, 0, 0, 0)  # NLMSG_DONE
        sock.sendto(nl + cn + req, peer)


if __name__ == "__main__":
    sys.exit(main())
