"""The server and its state files: huge logs built and counted by Prepare jobs while every
other log is served, and state files that cannot be made answered with an error."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

from ulogd.engine.actions import Prepare, Send
from ulogd.engine.server import Server
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state.statefile import StateDir
from ulogd.testing.driver import InProcess, LogDriver


def _replies(actions: list) -> list[wire.Reply]:  # type: ignore[type-arg]
    return [wire.decode_reply(a.data) for a in actions if isinstance(a, Send)]


def _request(uuid: str, rtype: int, data: bytes = b"", seq: int = 1, luid: int = 1) -> bytes:
    return wire.encode_request(rtype, uuid=uuid, luid=luid, seq=seq, data=data)


def test_a_huge_ctr_is_answered_when_its_file_is_built_and_others_are_served_meanwhile(
    tmp_path: Path,
) -> None:
    server = Server(state_dir=StateDir(tmp_path), offload_bytes=8192)
    other = LogDriver(InProcess(server), uuid="LVM-small", luid=1)
    other.create("512 core 8")  # 64 regions: a file below the threshold, built at once
    (prepare,) = server.receive(_request("LVM-huge", T.CTR, b"8000000 core 8 nosync", seq=5))
    assert isinstance(prepare, Prepare)
    # The kernel times out and repeats the CTR: it waits for the same file.
    assert server.receive(_request("LVM-huge", T.CTR, b"8000000 core 8 nosync", seq=6)) == []
    assert other.mark([3]).error == 0 and other.is_clean(3) == 0  # served meanwhile
    replies = _replies(server.prepared(prepare.token, prepare.job(), None))
    assert [(r.seq, r.error) for r in replies] == [(5, 0), (6, 0)]
    huge = LogDriver(InProcess(server), uuid="LVM-huge", luid=1)
    huge.ok(T.RESUME)
    assert huge.sync_count() == 1_000_000 and huge.resync_work() == (0, 0)
    assert huge.in_sync(999_999) == 1
    server.close()


def test_a_failed_build_answers_the_ctr_with_its_errno_and_leaves_nothing(tmp_path: Path) -> None:
    server = Server(state_dir=StateDir(tmp_path), offload_bytes=0)
    (prepare,) = server.receive(_request("LVM-x", T.CTR, b"512 core 8", seq=9))
    assert isinstance(prepare, Prepare)
    failure = OSError(errno.ENOSPC, "No space left on device")
    (reply,) = _replies(server.prepared(prepare.token, None, failure))
    assert (reply.seq, reply.error) == (9, -errno.ENOSPC)
    assert server.logs == {} and list(tmp_path.iterdir()) == []
    (again,) = server.receive(_request("LVM-x", T.CTR, b"512 core 8", seq=10))
    assert isinstance(again, Prepare)  # nothing stuck: a later CTR tries again
    (reply,) = _replies(server.prepared(again.token, None, MemoryError()))
    assert (reply.seq, reply.error) == (10, -errno.ENOMEM)
    server.close()


def test_a_huge_restored_log_waits_for_its_census_and_others_do_not(tmp_path: Path) -> None:
    first = Server(state_dir=StateDir(tmp_path))
    huge = LogDriver(InProcess(first), uuid="LVM-huge", luid=1)
    huge.create("8000000 core 8 nosync")
    huge.set_region_sync(77, False)
    huge.mark([5, 900_000])
    small = LogDriver(InProcess(first), uuid="LVM-small", luid=1)
    small.create("512 core 8 nosync")
    small.mark([2])
    # kill -9: nothing closed; the next server restores with the census off the loop
    second = Server(state_dir=StateDir(tmp_path), offload_bytes=8192)
    assert second.state_dir is not None
    (census,) = second.restore(second.state_dir.load_all())
    assert isinstance(census, Prepare)
    waiting = second.receive(_request("LVM-huge", T.GET_SYNC_COUNT, seq=3))
    assert waiting == []  # queued until counted
    other = LogDriver(InProcess(second), uuid="LVM-small", luid=1)
    assert other.is_clean(2) == 0 and other.is_clean(3) == 1
    (reply,) = _replies(second.prepared(census.token, census.job(), None))
    assert reply.seq == 3 and struct.unpack("=Q", reply.data) == (999_999,)
    rl = second.logs[("LVM-huge", 1)].log
    assert rl.holders == {5: {0}, 900_000: {0}}
    second.close()
    first.close()


def test_a_ctr_whose_state_file_cannot_be_made_is_answered_with_the_errno(tmp_path: Path) -> None:
    state_dir = StateDir(tmp_path / "logs")
    server = Server(state_dir=state_dir)
    d = LogDriver(InProcess(server), uuid="LVM-ok", luid=1)
    d.create("512 core 8")
    d.mark([1])
    state_dir.path.chmod(0o500)  # root ignores modes: take the directory away instead
    state_dir.path.rename(tmp_path / "gone")
    reply = LogDriver(InProcess(server), uuid="LVM-new", luid=1).ctr("512 core 8")
    assert reply.error == -errno.ENOENT
    assert ("LVM-new", 1) not in server.logs
    assert d.is_clean(1) == 0 and d.is_clean(2) == 0  # the other log is untouched
    server.close()


def test_logs_whose_uuids_share_their_ends_both_survive_a_restart(tmp_path: Path) -> None:
    """The pair from issue 14: the old file names (first 120 characters + hex of the last 32)
    were equal, so the second CTR replaced the first log's file."""
    uuids = ("+" * 60 + "A" + "+" * 68, "+" * 60 + "B" + "+" * 68)
    first = Server(state_dir=StateDir(tmp_path))
    for i, uuid in enumerate(uuids):
        d = LogDriver(InProcess(first), uuid=uuid, luid=1)
        d.create("512 core 8 nosync")
        d.mark([10 + i])
    second = Server(state_dir=StateDir(tmp_path))  # after kill -9
    assert second.state_dir is not None
    second.restore(second.state_dir.load_all())
    for i, uuid in enumerate(uuids):
        d = LogDriver(InProcess(second), uuid=uuid, luid=1)
        assert (d.is_clean(10 + i), d.is_clean(11 - i)) == (0, 1), uuid[60]
    second.close()
    first.close()
