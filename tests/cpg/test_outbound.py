"""Unit tests (no corosync): the outbound queue and the Handle's use of it, with a fake libcpg."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import cpg
from cpg.errors import CsError
from cpg.outbound import RETRY_AFTER, OutboundQueue, Parts

OK, TRY_AGAIN, LIBRARY = (
    int(CsError.CS_OK),
    int(CsError.CS_ERR_TRY_AGAIN),
    int(CsError.CS_ERR_LIBRARY),
)


class ScriptedSender:
    """Answers from a script of return codes (then OK), recording what was accepted."""

    def __init__(self, script: list[int] | None = None) -> None:
        self.script = list(script or [])
        self.calls: list[Parts] = []
        self.accepted: list[Parts] = []

    def __call__(self, parts: Parts) -> int:
        self.calls.append(parts)
        rc = self.script.pop(0) if self.script else OK
        if rc == OK:
            self.accepted.append(parts)
        return rc


def test_flush_sends_everything_in_order() -> None:
    send = ScriptedSender()
    q = OutboundQueue(send)
    for i in range(5):
        q.push([b"m%d" % i])
    assert len(q) == 5 and q.pending_bytes == 10
    assert q.flush() is True
    assert [p[0] for p in send.accepted] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert not q and q.pending_bytes == 0 and q.sent == 5
    assert q.retry_after() is None


def test_try_again_stops_the_flush_and_keeps_order() -> None:
    send = ScriptedSender([OK, TRY_AGAIN, TRY_AGAIN, OK, TRY_AGAIN])
    q = OutboundQueue(send)
    for i in range(4):
        q.push([b"%d" % i])
    assert q.flush() is False  # 0 sent, 1 refused
    assert q.blocked and len(q) == 3 and q.retry_after() == RETRY_AFTER
    assert q.flush() is False  # 1 refused again: exactly one call, no spinning
    assert len(send.calls) == 3
    assert q.flush() is False  # 1 sent, 2 refused
    assert q.flush() is True
    assert [p[0] for p in send.accepted] == [b"0", b"1", b"2", b"3"]
    assert q.try_again == 3 and not q.blocked


def test_flush_limit_bounds_one_round() -> None:
    send = ScriptedSender()
    q = OutboundQueue(send)
    for i in range(10):
        q.push([bytes([i])])
    assert q.flush(limit=4) is False
    assert len(send.accepted) == 4 and len(q) == 6 and not q.blocked
    assert q.flush() is True


def test_other_errors_raise_and_leave_the_message_at_the_head() -> None:
    send = ScriptedSender([OK, int(CsError.CS_ERR_NOT_EXIST)])
    q = OutboundQueue(send)
    q.push([b"a"])
    q.push([b"b"])
    with pytest.raises(cpg.CpgError) as info:
        q.flush()
    assert info.value.code is CsError.CS_ERR_NOT_EXIST
    assert len(q) == 1
    assert q.flush() is True
    assert [p[0] for p in send.accepted] == [b"a", b"b"]


def test_multi_part_messages_count_their_bytes_and_clear_returns_them() -> None:
    q = OutboundQueue(ScriptedSender([TRY_AGAIN]))
    q.push([b"head", b"payload"])
    assert q.flush() is False
    assert q.pending_bytes == 11
    assert q.clear() == [(b"head", b"payload")]
    assert not q and q.pending_bytes == 0 and not q.blocked


# -- Handle with a fake libcpg ----------------------------------------------------------------


class FakeLib:
    """Stands in for the dlopen'ed libcpg: scripted mcast and dispatch return codes."""

    def __init__(self) -> None:
        self.mcast_rc: list[int] = []
        self.dispatch_rc = OK
        self.sent: list[bytes] = []
        self.finalized = 0

    def cpg_mcast_joined(self, h: int, guarantee: int, iov: Any, n: int) -> int:
        assert guarantee == 2  # CPG_TYPE_AGREED
        rc = self.mcast_rc.pop(0) if self.mcast_rc else OK
        if rc == OK:
            self.sent.append(b"".join(cpg.handle.ffi.unpack(
                cpg.handle.ffi.cast("char *", iov[i].iov_base), iov[i].iov_len
            ) for i in range(n)))  # fmt: skip
        return rc

    def cpg_dispatch(self, h: int, flags: int) -> int:
        assert flags == 2  # CS_DISPATCH_ALL
        return self.dispatch_rc

    def cpg_finalize(self, h: int) -> int:
        self.finalized += 1
        return OK


@pytest.fixture
def fake() -> Iterator[tuple[cpg.Handle, FakeLib, list[cpg.Lost]]]:
    lost: list[cpg.Lost] = []
    h = cpg.Handle(on_lost=lost.append, open=False)
    lib = FakeLib()
    h._lib, h._h, h._fd, h._max_msg = lib, 12345, 7, 1000  # as open() would leave them
    yield h, lib, lost
    h._h = None


def test_handle_send_queues_on_try_again_and_dispatch_flushes(fake: Any) -> None:
    h, lib, lost = fake
    lib.mcast_rc = [OK, TRY_AGAIN]
    assert h.send(b"one") is True
    assert h.send(b"tw", b"o") is False
    assert h.pending == 1 and h.retry_after() == RETRY_AFTER
    assert h.dispatch() is True  # dispatch flushes the queue afterwards
    assert lib.sent == [b"one", b"two"] and h.pending == 0 and h.retry_after() is None
    assert h.try_again_count == 1 and not lost


def test_handle_refuses_messages_above_the_atomic_size(fake: Any) -> None:
    h, lib, _ = fake
    with pytest.raises(cpg.MessageTooLarge):
        h.send(b"x" * 600, b"y" * 401)
    with pytest.raises(cpg.MessageTooLarge):
        h.mcast(b"x" * 1001)
    assert h.pending == 0 and lib.sent == []
    h.send(b"x" * 1000)
    assert lib.sent == [b"x" * 1000]


def test_send_many_refuses_the_whole_batch_if_one_is_too_large(fake: Any) -> None:
    h, lib, _ = fake
    with pytest.raises(cpg.MessageTooLarge):
        h.send_many([b"ok", b"x" * 1001, b"ok too"])
    assert h.pending == 0 and lib.sent == []
    assert h.send_many([b"a", b"b"]) is True and lib.sent == [b"a", b"b"]


def test_handle_mcast_raises_try_again_without_queueing(fake: Any) -> None:
    h, lib, _ = fake
    lib.mcast_rc = [TRY_AGAIN]
    with pytest.raises(cpg.CpgError) as info:
        h.mcast(b"now")
    assert info.value.name == "CS_ERR_TRY_AGAIN"
    assert h.pending == 0


def test_dispatch_reports_loss_as_an_event_not_an_exception(fake: Any) -> None:
    h, lib, lost = fake
    lib.mcast_rc = [TRY_AGAIN]
    h.send(b"stuck")
    lib.dispatch_rc = LIBRARY
    assert h.dispatch() is False
    assert lost == [cpg.Lost("cpg_dispatch", CsError.CS_ERR_LIBRARY, unsent=1, fd=7)]
    assert h.lost == lost[0] and not h.is_open and lib.finalized == 1
    assert h.dispatch() is False and len(lost) == 1  # reported once
    assert h.retry_after() is None


def test_flush_reports_loss_from_mcast(fake: Any) -> None:
    h, lib, lost = fake
    lib.mcast_rc = [LIBRARY]
    assert h.send(b"a") is False
    assert [x.op for x in lost] == ["cpg_mcast_joined"] and not h.is_open


def test_callback_exceptions_surface_from_dispatch(fake: Any) -> None:
    h, _lib, _ = fake

    def boom(event: object) -> None:
        raise ValueError("from callback")

    h._call(boom, object())  # what a C callback does during cpg_dispatch
    with pytest.raises(ValueError, match="from callback"):
        h.dispatch()
    assert h.dispatch() is True  # kept only once


def test_group_names_are_checked() -> None:
    from cpg.handle import group_name

    name = group_name(b"0123-uuid\0")
    assert name.length == 10
    with pytest.raises(ValueError):
        group_name(b"x" * 129)
    with pytest.raises(ValueError):
        group_name(b"")
    with pytest.raises(TypeError):
        group_name("text")  # type: ignore[arg-type]
