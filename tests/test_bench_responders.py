"""The benchmarks' stateless responders (C and Python) answer every request plausibly.

They are fio_qemu.py's baselines on the kernel's connector; here they serve the same
kernel-format datagrams over the test transport's Unix socket, and every reply is decoded by
ulogd's own codec.  The C one is built with the host's compiler (statically), installed from
Debian's archive when missing.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

from tests.harness import apt
from ulogd.edges.transport.unixsock import UnixClient
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import responders

UUID = "LVM-responderRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRR0001"
Q = struct.Struct("=Q")
q = struct.Struct("=q")


#: what builds the C responder statically (Debian): the compiler and the static C library
C_PACKAGES = ("gcc", "libc6-dev")


@pytest.fixture(scope="module")
def c_responder() -> None:
    """The C responder, built after installing a compiler and the static C library from
    Debian's archive when they are missing (as the other fixtures install their tools), so
    the test command skips nothing on a fresh machine; only where neither can be had (not
    root, no apt) is it skipped, saying why."""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        apt.install(C_PACKAGES)
    if responders.build_c_responder() is None:
        pytest.skip(f"C responder not built: {responders.WHY_NO_C[0]}")


@pytest.fixture(params=["c", "python"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "c":
        request.getfixturevalue("c_responder")
    return str(request.param)


def test_every_request_gets_a_plausible_reply(kind: str, tmp_path: Path) -> None:
    path = str(tmp_path / f"{kind}.sock")
    with responders.serve_unix(kind, path), UnixClient(path) as link:
        seq = 100

        def call(rtype: int, data: bytes = b"") -> wire.Reply:
            nonlocal seq
            seq += 1
            reply = wire.decode_reply(
                link.request(wire.encode_request(rtype, uuid=UUID, luid=9, seq=seq, data=data))
            )
            assert reply.seq == seq and reply.error == 0, (rtype, reply)
            return reply

        call(T.CTR, b"204800 clustered-core 1024 nosync\0")
        assert Q.unpack(call(T.GET_REGION_SIZE).data) == (1024,)
        call(T.RESUME)
        region = Q.pack(7)
        assert q.unpack(call(T.IN_SYNC, region).data) == (1,)
        assert q.unpack(call(T.IS_CLEAN, region).data) == (1,)
        for rtype, data in ((T.MARK_REGION, region), (T.FLUSH, b""), (T.CLEAR_REGION, region)):
            assert call(rtype, data).data == b""
        assert Q.unpack(call(T.GET_SYNC_COUNT).data) == (200,)
        assert struct.unpack("=qQ", call(T.GET_RESYNC_WORK).data) == (0, 0)
        assert struct.unpack("=qQ", call(T.IS_REMOTE_RECOVERING, region).data) == (0, 200)
        assert call(T.STATUS_INFO).data.rstrip(b"\0") == b"1 clustered-core"


@pytest.mark.usefixtures("c_responder")
def test_the_c_responder_reads_the_geometry_of_every_table_form(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    forms = {
        1: b"204800 integrated_flush clustered-core 2048 nosync\0",
        2: b"204800 clustered-disk 253:4 512\0",
    }
    with responders.serve_unix("c", path), UnixClient(path) as link:
        for luid, ctr in forms.items():
            for rtype, data in ((T.CTR, ctr), (T.GET_SYNC_COUNT, b"")):
                reply = wire.decode_reply(
                    link.request(wire.encode_request(rtype, uuid=UUID, luid=luid, data=data))
                )
            assert Q.unpack(reply.data) == ({1: 100, 2: 400}[luid],)


@pytest.mark.usefixtures("c_responder")
def test_the_c_responder_also_polls_when_told(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    with responders.serve_unix("c", path, poll_us=500), UnixClient(path) as link:
        for seq in range(1, 50):
            datagram = wire.encode_request(T.IN_SYNC, uuid=UUID, luid=9, seq=seq, data=Q.pack(1))
            reply = wire.decode_reply(link.request(datagram))
            assert reply.seq == seq and q.unpack(reply.data) == (1,)
