"""Servers in cluster mode, joined by an in-process ordered bus: RESUME waits for the group's
state, requests are ordered through the group, POSTSUSPEND leaves it, and a member that dies
holding marks makes the survivors cycle their local mirrors."""

from __future__ import annotations

import struct

from ulogd.edges import dmcontrol
from ulogd.engine.actions import ClusterSend, Cycle, Join, Leave, Send
from ulogd.engine.server import Server
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T

CTR = b"131072 clustered-core 1024 nosync"
UUID = "LVM-bus"


class Bus:
    """One group's total order for a handful of in-process servers."""

    def __init__(self) -> None:
        self.members: dict[tuple[int, int], Server] = {}
        self.queue: list[tuple[tuple[int, int], bytes]] = []
        self.replies: dict[tuple[int, int], list[wire.Reply]] = {}
        self.cycles: list[tuple[int, int]] = []

    def ident(self, server: Server) -> tuple[int, int]:
        return (server.local_node, server.member_pid)

    def perform(self, server: Server, actions: list) -> None:
        me = self.ident(server)
        for a in actions:
            if isinstance(a, Send):
                self.replies.setdefault(me, []).append(wire.decode_reply(a.data))
            elif isinstance(a, Join):
                self.members[me] = server
                self._confchg(left=[], joined=[me])
            elif isinstance(a, ClusterSend):
                self.queue.append((me, a.data))
            elif isinstance(a, Leave):
                self.members.pop(me, None)
                self._confchg(left=[me], joined=[])
            elif isinstance(a, Cycle):
                self.cycles.append(me)

    def _confchg(self, left: list, joined: list) -> None:
        members = sorted(self.members)
        for ident, srv in list(self.members.items()):
            self.perform(srv, srv.group_confchg((UUID, ident[0]), members, left, joined))

    def crash(self, server: Server) -> None:
        me = self.ident(server)
        self.run()
        del self.members[me]
        self._confchg(left=[me], joined=[])

    def run(self) -> None:
        while self.queue:
            sender, data = self.queue.pop(0)
            for ident, srv in list(self.members.items()):
                self.perform(srv, srv.group_deliver((UUID, ident[0]), sender, data))

    def request(self, server: Server, rtype: int, data: bytes = b"", seq: int = 0) -> wire.Reply:
        me = self.ident(server)
        datagram = wire.encode_request(rtype, uuid=UUID, luid=me[0], seq=seq, data=data)
        before = len(self.replies.get(me, []))
        self.perform(server, server.receive(datagram))
        self.run()
        got = self.replies.get(me, [])[before:]
        assert [r.seq for r in got] == [seq], f"expected one reply to {seq}, got {got}"
        return got[0]


def node(n: int) -> Server:
    return Server(cluster=True, local_node=n, member_pid=100 + n)


def create(bus: Bus, srv: Server, seq: int) -> None:
    assert bus.request(srv, T.CTR, CTR, seq).error == 0
    assert bus.request(srv, T.RESUME, b"", seq + 1).error == 0


def test_resume_waits_for_state_and_requests_are_ordered_through_the_group() -> None:
    bus = Bus()
    a, b = node(1), node(2)
    create(bus, a, 10)
    assert a.logs[(UUID, 1)].group.direct  # alone: no multicast
    bus.request(a, T.MARK_REGION, struct.pack("=Q", 4), 12)
    bus.request(a, T.FLUSH, b"", 13)
    create(bus, b, 20)  # b's RESUME is answered only once it holds the state
    rb = b.logs[(UUID, 2)].log
    assert rb.holders == {4: {1}} and not rb.clean[4]
    assert not a.logs[(UUID, 1)].group.direct
    bus.request(b, T.MARK_REGION, struct.pack("=Q", 4), 22)
    bus.request(b, T.FLUSH, b"", 23)
    bus.request(a, T.CLEAR_REGION, struct.pack("=Q", 4), 14)
    bus.request(a, T.FLUSH, b"", 15)
    for srv, luid in ((a, 1), (b, 2)):
        rl = srv.logs[(UUID, luid)].log
        assert rl.holders == {4: {2}} and not rl.clean[4]  # b still writes region 4


def test_postsuspend_leaves_the_group_and_resume_rejoins() -> None:
    bus = Bus()
    a, b = node(1), node(2)
    create(bus, a, 10)
    create(bus, b, 20)
    bus.request(b, T.PRESUSPEND, b"", 24)
    bus.request(b, T.POSTSUSPEND, b"", 25)
    assert sorted(bus.members) == [(1, 101)]
    assert b.logs[(UUID, 2)].group is None
    assert bus.request(b, T.RESUME, b"", 26).error == 0
    assert sorted(bus.members) == [(1, 101), (2, 102)]


def test_a_member_dying_with_marks_makes_survivors_cycle_their_mirror() -> None:
    bus = Bus()
    a, b = node(1), node(2)
    create(bus, a, 10)
    create(bus, b, 20)
    bus.request(b, T.MARK_REGION, struct.pack("=Q", 7), 21)
    bus.request(b, T.FLUSH, b"", 22)
    bus.crash(b)
    assert bus.cycles == [(1, 101)]
    entry = a.logs[(UUID, 1)]
    assert entry.cycling and entry.log.in_sync(7) == (0, 0)  # known out of sync from now on
    # The cycle's own suspend/resume keeps the log in its group.
    bus.request(a, T.PRESUSPEND, b"", 30)
    bus.request(a, T.POSTSUSPEND, b"", 31)
    assert entry.group is not None
    bus.request(a, T.RESUME, b"", 32)
    a.cycle_done((UUID, 1), True)
    assert not entry.cycling
    work = bus.request(a, T.GET_RESYNC_WORK, b"", 33)
    assert struct.unpack("=qQ", work.data) == (1, 7)


def test_mirrors_using_reads_dmsetup_table() -> None:
    legs = "2 7:0 0 7:1 0"
    table = (
        f"m0: 0 131072 mirror userspace 3 LVM-bus clustered-core 1024 {legs} 1 handle_errors\n"
        f"m1: 0 131072 mirror core 1 1024 {legs}\n"
        "lin: 0 8 linear 7:4 0\n"
        f"m2: 0 131072 mirror userspace 4 LVM-bus integrated_flush clustered-core 1024 {legs}\n"
    )
    assert dmcontrol.mirrors_using("LVM-bus", table) == ["m0", "m2"]
    assert dmcontrol.mirrors_using("LVM-other", table) == []


def test_a_restarted_daemon_rejoins_before_answering_and_keeps_its_kernels_marks(
    tmp_path,
) -> None:
    """kill -9 of b's daemon only (PROCDOWN): a keeps b's marks and cycles nothing; b's next
    daemon restores its log, rejoins the group before it answers (the kernel sends no CTR or
    RESUME: it just goes on, re-sending a request only after its timeout), and re-asserts the
    marks its kernel was acknowledged, including one that never reached the group."""
    from ulogd.state.statefile import StateDir

    bus = Bus()
    a = node(1)
    b = Server(cluster=True, local_node=2, member_pid=102, state_dir=StateDir(tmp_path))
    create(bus, a, 10)
    create(bus, b, 20)
    bus.request(b, T.MARK_REGION, struct.pack("=Q", 7), 21)
    bus.request(b, T.FLUSH, b"", 22)
    bus.request(b, T.MARK_REGION, struct.pack("=Q", 9), 23)  # acknowledged, not yet multicast
    me = bus.ident(b)
    del bus.members[me]  # the process is gone, its node (and kernel) stays in the ring
    members = sorted(bus.members)
    for ident, srv in list(bus.members.items()):
        bus.perform(srv, srv.group_confchg((UUID, ident[0]), members, [me], [], procdown=[me]))
    ra = a.logs[(UUID, 1)].log
    assert ra.holders == {7: {2}} and ra.orphans == {2} and not bus.cycles
    assert a.orphan_report(100.0) == [((UUID, 1), 2, 1, 100.0)]
    assert a.orphan_report(200.0) == [((UUID, 1), 2, 1, 100.0)]  # since the first report
    b.close()

    b2 = Server(cluster=True, local_node=2, member_pid=202, state_dir=StateDir(tmp_path))
    joins = b2.restore(b2.state_dir.load_all())  # type: ignore[union-attr]
    assert [type(j) for j in joins] == [Join]
    datagram = wire.encode_request(T.IS_CLEAN, uuid=UUID, luid=2, seq=30, data=struct.pack("=Q", 9))
    assert b2.receive(datagram) == []  # waits: the log has not got the group's state yet
    bus.perform(b2, joins)
    bus.run()
    got = bus.replies[bus.ident(b2)]
    assert [r.seq for r in got] == [30] and struct.unpack("=q", got[0].data) == (0,)
    for srv, luid in ((a, 1), (b2, 2)):
        rl = srv.logs[(UUID, luid)].log
        assert rl.holders == {7: {2}, 9: {2}} and rl.orphans == set()
    assert not bus.cycles and a.orphan_report(300.0) == []
