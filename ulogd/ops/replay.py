"""Offline dry-run replay of a capture: what would *this* ulogd have answered?

Theory of operation
===================

Input
-----
One or more capture files (pcapng or pcap, LINKTYPE_NETLINK, read by
:func:`ulogd.edges.capture_reader.read_capture`), each holding the datagrams one daemon saw
and sent.
Several files are *one kernel talking to successive daemons*: ``dm-ulogd run --capture A`` was
killed or stopped and ``dm-ulogd run --capture B`` took over with the same run directory.

Two passes per file
-------------------
1. Every recorded reply (daemon->kernel) is decoded with :func:`ulogd.protocol.wire.decode_reply`
   and
   filed under its sequence number: ``dm_ulog_request.seq`` for full replies, ``cn_msg.seq``
   for the header-only form.  The kernel numbers requests with one counter for every log, so
   a capture holding several logs is paired correctly; a number reused later (the counter
   wraps, the kernel's retry uses a new one) is paired with the first reply recorded *after*
   the request.
2. Every request (kernel->daemon) is fed, in capture order, to a
   :class:`~ulogd.engine.server.Server`
   built exactly as the daemon builds it (one node, the chosen request layout), through the
   daemon's own entry points: :meth:`Server.handle` for a datagram that decodes (the replay
   decodes it once itself to know its log) and :meth:`Server.receive` for one the decoder
   rejects -- the daemon's answer to garbage is part of its behaviour.  Disk actions are
   performed at once, like :class:`ulogd.testing.driver.InProcess` does, so each log still
   sees its requests in arrival order, as in the daemon.

The first server has no state directory.  With several files a temporary state directory is
used and, between files, the replay restarts the server the way a restarted daemon does: the
old server is dropped (as by ``kill -9``: the state files stay) and a new one restores every
log with :meth:`Server.restore`.

Comparing answers
-----------------
An answer is the decoded reply: error, payload, and whether it is the header-only form.  Two
answers are *the same* when all three are equal byte for byte -- STATUS strings included.
One exception: a ``disk``/``clustered-disk`` log named by a *path* is reported by the daemon
with the device number it resolved (``253:4``); the replay cannot resolve a path that only
existed on the capturing machine, so a STATUS answer that differs only by that one token
(path here, ``MAJ:MIN`` there) counts as the same and the mapping is listed in the notes.

Each replayed request gets one verdict:

``match``
    the same answer, or no answer on either side (a foreign datagram);
``mismatch``
    the answers differ, or only one side answered, for a log whose whole history is in the
    capture -- a change of behaviour (exit status 1);
``unverifiable``
    the answers differ for a log whose earlier history the replay cannot know:

    * *mid-stream*: the capture starts in the middle of the log's life -- its first request in
      the capture is not a constructor (CTR without the reconnect NUL), e.g. a capture begun
      after a daemon restart.  A fresh server has never seen the log (it answers ``-ESRCH``
      or, after the kernel's reconnect CTR, starts from scratch) while the recorded daemon
      knew it.  A reload of such a log (same uuid, new luid, state carried over) inherits it.
    * *disk-content*: a disk log's RESUME read the log device, whose content before the
      capture is unknown.  The replay gives every log device argument a zeroed in-memory
      image (:class:`~ulogd.state.disklog.MemoryDiskLog`, "no valid log yet", what a fresh device
      holds), grown to fit every constructor that names it, kept across a DTR and re-create
      and across restarts, so a log that reads back what an earlier log of the capture wrote
      is checked normally.  Only when the image read was the invented one can a difference
      be the device's unknown past rather than a bug.

``unanswered`` (no recorded reply)
    the replay answered but the capture holds no reply: the daemon died before answering,
    or the capture lost its tail (a killed daemon's buffered records).

Requests after ``--until`` or for other logs than ``--log`` are not replayed (logs are
independent on one node, so filtering by uuid changes no answer); requests the capture cut
short (its snap length) are not replayed either, and counted.

A damaged file stops the replay at the defect: the report covers the packets before it and
names the packet (:class:`~ulogd.edges.capture.CaptureFormatError`).  Exit status: 0 every answer
checked agrees, 1 at least one mismatch, 4 a file could not be read (wholly or in part) and
no mismatch was found before the defect (a file that does not exist: one line, no report),
5 ``--log`` matched no log of the capture (nothing was compared).
"""

from __future__ import annotations

import contextlib
import re
import struct
import tempfile
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ulogd.edges.capture import CaptureFormatError, Direction, Packet
from ulogd.edges.capture_reader import read_capture
from ulogd.engine.actions import Action, DiskRead, DiskWrite
from ulogd.engine.runner import SyncRunner
from ulogd.engine.server import Server
from ulogd.ops.replay_report import (
    DISK_CONTENT,
    MATCH,
    MID_STREAM,
    MISMATCH,
    REJECTED,
    UNANSWERED,
    UNVERIFIABLE,
    Answer,
    LogInfo,
    Outcome,
    Report,
    Until,
    request_text,
)
from ulogd.protocol import ctr, wire
from ulogd.protocol import spec as p
from ulogd.protocol.spec import RequestType as T
from ulogd.state import disklog
from ulogd.state.statefile import StateDir

#: Default size of a log device image no constructor has sized yet.
_DEFAULT_IMAGE = 1 << 20
_BLOCK = 512
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
_MAJMIN = re.compile(rb"^\d+:\d+$")


# ----------------------------------------------------------------------------------- devices
class _Image:
    """One log device argument's in-memory content, shared by every open of it."""

    def __init__(self, arg: str) -> None:
        self.arg = arg
        self.store = disklog.MemoryDiskLog(_DEFAULT_IMAGE, block_size=_BLOCK, path=arg)
        #: True while the content is the invented zeroed image (not written by the replay
        #: on behalf of a log whose answers are verifiable).
        self.unknown = True
        self.read_while_unknown = False

    def ensure(self, nbytes: int) -> None:
        if nbytes > len(self.store.data):
            self.store.data.extend(bytes(nbytes - len(self.store.data)))


class _ReplayRunner(SyncRunner):
    """The one synchronous runner, keeping the images' bookkeeping: a read of an image whose
    content is unknown taints the log's answers; a write leaves it unknown while the log is
    tainted.  Cluster actions are never produced by a server with cluster=False: counted."""

    def __init__(self, replayer: _Replayer, key: tuple[str, int] | None) -> None:
        super().__init__(replayer.server)
        self.replayer = replayer
        self.key = key

    def read(self, action: DiskRead) -> bytes:
        device, key, rp = action.device, self.key, self.replayer
        if isinstance(device, _ReplayDevice) and device.image.unknown and rp._reads_disk_state(key):
            device.image.read_while_unknown = True
            assert key is not None
            rp.taint.setdefault(key, DISK_CONTENT)
        return device.read(action.nbytes)

    def write(self, action: DiskWrite) -> None:
        device = action.device
        device.write_extents(action.extents, action.durable)
        if isinstance(device, _ReplayDevice):
            device.image.unknown = self.key is None or self.key in self.replayer.taint

    def other(self, action: Action) -> None:
        self.replayer.report.skipped[f"{type(action).__name__} actions"] += 1


class _ReplayDevice:
    """An open of an :class:`_Image` (what ``Server.open_device`` returns)."""

    def __init__(self, image: _Image) -> None:
        self.image = image
        self.block_size = image.store.block_size
        major, sep, minor = image.arg.partition(":")
        numeric = sep and major.isdigit() and minor.isdigit()
        self.rdev: tuple[int, int] | None = (int(major), int(minor)) if numeric else None
        self.size_bytes = image.store.size_bytes  # sized for this open's CTR beforehand
        self.closed = False

    def read(self, nbytes: int) -> bytes:
        return self.image.store.read(nbytes)

    def write_extents(self, extents: list[tuple[int, bytes]], flush: bool = True) -> None:
        self.image.store.write_extents(extents, flush)

    def close(self) -> None:
        self.closed = True


# ----------------------------------------------------------------------------------- engine
@dataclass(slots=True)
class _Pending:
    """A recorded reply."""

    packet: int
    data: bytes


@dataclass(slots=True, eq=False)
class _Await:
    """A replayed request waiting for its recorded reply (see the module docs)."""

    label: str
    packet: Packet
    seqs: tuple[int, ...]
    ours: list[bytes]  # the replay's reply datagrams
    request: wire.Request | None = None
    rejected: str | None = None
    taint: str | None = None
    device_path: str | None = None
    state: str | None = None
    done: bool = False


class _Replayer:
    def __init__(
        self,
        report: Report,
        layout: wire.Layout,
        log_filter: str | None,
        until: Until | None,
        state_dir: Path | None,
    ) -> None:
        self.report = report
        self.layout = layout
        self.log_filter = log_filter
        self.until = until
        self.state_dir = StateDir(state_dir) if state_dir is not None else None
        self.images: dict[str, _Image] = {}
        self.taint: dict[tuple[str, int], str] = {}
        self.seen: set[tuple[str, int]] = set()
        self.first_ts: int | None = None
        self.server = self._new_server()
        self._device_notes: set[str] = set()
        # per file: requests waiting for their reply, by candidate seq
        self._waiting: dict[int, deque[_Await]] = {}
        # per log: waiting requests whose state after them has not been snapshotted yet
        self._unsnapped: dict[tuple[str, int], list[_Await]] = {}
        self._skipped_seqs: set[int] = set()

    def _new_server(self) -> Server:
        return Server(
            state_dir=self.state_dir,
            open_device=self._open_device,
            local_node=0,
            layout=self.layout,
        )

    def _open_device(self, arg: str) -> _ReplayDevice:
        image = self.images.get(arg)
        if image is None:
            image = self.images[arg] = _Image(arg)
        return _ReplayDevice(image)

    def restart(self, file_label: str) -> None:
        """The next file comes from a restarted daemon: drop the server, restore its logs."""
        self.report.restarts += 1
        self.server.close()  # as after kill -9: the state files stay
        self.server = self._new_server()
        assert self.state_dir is not None
        self.server.restore(self.state_dir.load_all())

    # -- one pass per file --------------------------------------------------------------------
    def replay_file(self, path: Path, label: str, *, last: bool) -> bool:
        """Replay one file; False when it could not be read to its end."""
        ok = True
        try:
            for packet in read_capture(path):
                self.report.packets += 1
                if self.first_ts is None:
                    self.first_ts = packet.timestamp_ns
                if packet.direction is Direction.FROM_DAEMON:
                    self._recorded_reply(packet)
                elif self._beyond(packet, last):
                    self.report.skipped["after --until"] += 1
                    self._skipped_seqs.update(self._raw_seqs(packet.data))
                else:
                    self._request(packet, label)
        except CaptureFormatError as exc:
            self.report.error = str(exc)
            self.report.error_file = label
            self.report.error_packet = exc.packet_number
            ok = False
        except OSError as exc:
            self.report.error = f"cannot read: {exc.strerror or exc}"
            self.report.error_file = label
            ok = False
        # requests still waiting: the capture holds no reply for them
        for queue in self._waiting.values():
            for waiting in queue:
                if not waiting.done:
                    self._settle(waiting, None)
        self._waiting.clear()
        self._unsnapped.clear()
        self._skipped_seqs.clear()
        return ok

    def _beyond(self, packet: Packet, last: bool) -> bool:
        u = self.until
        if u is None:
            return False
        if u.packet is not None:
            return last and packet.number > u.packet
        if u.seconds is not None:
            assert self.first_ts is not None
            return packet.timestamp_ns - self.first_ts > u.seconds * 1e9
        return u.timestamp_ns is not None and packet.timestamp_ns > u.timestamp_ns

    def _recorded_reply(self, packet: Packet) -> None:
        self.report.recorded_replies += 1
        data = packet.data
        seq = _reply_seq(data, self.layout)
        if seq is None:
            self.report.orphan_replies += 1
            return
        queue = self._waiting.get(seq)
        while queue:
            waiting = queue.popleft()
            if not waiting.done:
                self._settle(waiting, _Pending(packet.number, data))
                return
        if seq not in self._skipped_seqs:
            self.report.orphan_replies += 1

    def _request(self, packet: Packet, label: str) -> None:
        data = packet.data
        if packet.truncated:
            self.report.skipped["cut short by the capture's snap length"] += 1
            self._skipped_seqs.update(self._raw_seqs(data))
            return
        request = wire.decode(data, self.layout)
        if isinstance(request, wire.Rejected):
            seqs = self._raw_seqs(data)
            if self.log_filter is not None:
                self.report.skipped["rejected datagrams (no log, --log given)"] += 1
                self._skipped_seqs.update(seqs)
                return
            sent = self._perform(self.server.receive(data), None)
            self._wait(
                _Await(label, packet, tuple(seqs), sent, rejected=request.reason),
                None,
            )
            return
        if self.log_filter is not None and not _uuid_matches(request.uuid, self.log_filter):
            self.report.skipped["requests of other logs (--log)"] += 1
            self._skipped_seqs.add(request.seq)
            return
        self._replay_request(packet, label, request)

    def _raw_seqs(self, data: bytes) -> list[int]:
        seqs = []
        off = self.layout.offsets["seq"]
        if len(data) >= off + 4:
            seqs.append(_U32.unpack_from(data, off)[0])
        if len(data) >= 28:
            cn_seq = _U32.unpack_from(data, 24)[0]
            if cn_seq not in seqs:
                seqs.append(cn_seq)
        return seqs

    def _wait(self, waiting: _Await, key: tuple[str, int] | None) -> None:
        for seq in waiting.seqs:
            queue = self._waiting.get(seq)
            if queue is None:
                queue = self._waiting[seq] = deque()
            queue.append(waiting)
        if not waiting.seqs:
            self._settle(waiting, None)
        elif key is not None:
            self._unsnapped.setdefault(key, []).append(waiting)

    def _snapshot(self, key: tuple[str, int]) -> None:
        """The log is about to change: record its state for the requests still waiting."""
        waiting = self._unsnapped.pop(key, None)
        if waiting and any(not w.done for w in waiting):
            state = self._describe(key)
            for w in waiting:
                if not w.done:
                    w.state = state

    def _describe(self, key: tuple[str, int] | None) -> str | None:
        if key is None:
            return None
        entry = self.server.logs.get(key)
        return entry.log.describe() if entry is not None else "(no such log)"

    def _settle(self, waiting: _Await, recorded: _Pending | None) -> None:
        waiting.done = True
        request = waiting.request
        verdict, reason = _compare(waiting.ours, recorded, waiting.device_path, self.layout)
        if reason.startswith("log device"):
            if reason not in self._device_notes:
                self._device_notes.add(reason)
                self.report.notes.append(
                    f"{reason} (STATUS answers compared with that number in place of the path)"
                )
            reason = ""
        if verdict == MISMATCH and waiting.taint is not None:
            verdict, reason = UNVERIFIABLE, waiting.taint
        rtype = request.request_type if request is not None else None
        name = p.type_name(rtype) if rtype is not None else REJECTED
        counter = self.report.counts.get(name)
        if counter is None:
            counter = self.report.counts[name] = Counter()
        counter[verdict] += 1
        if verdict == MATCH:
            return
        packet = waiting.packet
        state = waiting.state
        if state is None and request is not None:
            state = self._describe(request.key)
        self.report.outcomes.append(
            Outcome(
                waiting.label,
                packet.number,
                packet.timestamp_ns,
                name,
                request_text(request) if request is not None else f"rejected: {waiting.rejected}",
                request.uuid if request is not None else None,
                request.luid if request is not None else None,
                request.seq if request is not None else (waiting.seqs or (None,))[0],
                verdict,
                _recorded_answer(recorded, self.layout),
                _answer(waiting.ours[0], self.layout) if waiting.ours else None,
                request_type=rtype,
                reason=reason,
                state=state,
            )
        )

    def _perform(self, actions: list[Action], key: tuple[str, int] | None) -> list[bytes]:
        """Run the server's actions to completion, disk I/O included; return the replies."""
        return _ReplayRunner(self, key).run(actions)

    def _reads_disk_state(self, key: tuple[str, int] | None) -> bool:
        """Whether the log's state will come from the image read (not with sync/nosync)."""
        entry = self.server.logs.get(key) if key is not None else None
        return entry is None or entry.log.config.sync is ctr.SyncMode.DEFAULT

    def _replay_request(self, packet: Packet, label: str, request: wire.Request) -> None:
        key = request.key
        rtype = request.request_type
        server = self.server
        known = key in server.logs
        if key in self._unsnapped:
            self._snapshot(key)
        if not known:
            self._first_sight(packet, label, request)
        if rtype == T.CTR:
            self._size_image(request)
        sent = self._perform(server.handle(request), key)
        entry = server.logs.get(key)
        if rtype == T.CTR or rtype == T.DTR:
            self._life_cycle(key, rtype, known, entry)
        self._wait(
            _Await(
                label,
                packet,
                (request.seq,),
                sent,
                request=request,
                taint=self.taint.get(key),
                device_path=entry.log.config.log_device if entry is not None else None,
            ),
            key,
        )

    def _life_cycle(self, key: tuple[str, int], rtype: int, known: bool, entry: Any) -> None:
        """Bookkeeping after a CTR or DTR (kept off the path of the other requests)."""
        info = self.report.logs.get(key)
        if info is None:
            return
        if entry is not None:
            info.type_word = entry.log.config.type_word
            info.removed = False
            if rtype == T.CTR and not known and key not in self.taint:
                inherited = self._inherited_taint(key, entry.predecessor)
                if inherited is not None:
                    self.taint[key] = inherited
        elif rtype == T.DTR and known:
            info.removed = True
        if key in self.taint:
            info.taint = self.taint[key]

    def _inherited_taint(
        self, key: tuple[str, int], predecessor: tuple[str, int] | None
    ) -> str | None:
        """A reload (same uuid, new luid) of a log with an unknown history: the recorded daemon
        carried that history over, so the new instance's is unknown too -- also when the
        fresh server never knew the old instance and so had nothing to carry over."""
        if predecessor is not None and predecessor in self.taint:
            return self.taint[predecessor]
        for other, reason in self.taint.items():
            info = self.report.logs.get(other)
            if other[0] == key[0] and other != key and (info is None or not info.removed):
                return reason
        return None

    def _first_sight(self, packet: Packet, label: str, request: wire.Request) -> None:
        key = request.key
        if key in self.seen:
            return  # removed earlier in the capture: the recorded daemon did not know it either
        self.seen.add(key)
        fresh = request.request_type == T.CTR and not request.data.endswith(b"\0")
        info = LogInfo(
            request.uuid,
            request.luid,
            label,
            packet.number,
            "capture" if fresh else MID_STREAM,
        )
        self.report.logs[key] = info
        if not fresh:
            self.taint[key] = MID_STREAM
            info.taint = MID_STREAM
            first = request_text(request)
            self.report.notes.append(
                f"log {request.uuid} luid={request.luid:#x} starts mid-stream in {label} "
                f"(packet {packet.number}: {first}); the daemon that answered knew its earlier "
                "history, the replay does not: its differing answers are unverifiable, "
                "not mismatches"
            )

    def _size_image(self, request: wire.Request) -> None:
        try:
            config = ctr.parse(request.data)
        except ctr.CtrError:
            return
        if config.log_device is None:
            return
        image = self.images.get(config.log_device)
        if image is None:
            image = self.images[config.log_device] = _Image(config.log_device)
        image.ensure(disklog.io_size(config.region_count, _BLOCK))

    def finish(self) -> None:
        for key, info in self.report.logs.items():
            info.taint = self.taint.get(key, info.taint)
            entry = self.server.logs.get(key)
            if entry is not None:
                info.final_state = entry.log.describe()
        for image in self.images.values():
            if image.read_while_unknown:
                self.report.notes.append(
                    f"log device {image.arg}: its content before the capture is unknown; the "
                    "replay read a zeroed image (no valid log yet, as on a fresh device), so a "
                    "differing answer of a log that read it is reported as unverifiable "
                    f"({DISK_CONTENT})"
                )
        self.server.close()


def _uuid_matches(uuid: str, wanted: str) -> bool:
    return uuid == wanted or (len(wanted) >= 4 and uuid.endswith(wanted))


def _reply_seq(data: bytes, layout: wire.Layout) -> int | None:
    """The number a reply answers, read as the kernel reads it (see ``decode_reply``)."""
    if len(data) < layout.prefix_size:
        return None
    offset = layout.offsets["seq"]
    if _U16.unpack_from(data, 32)[0] == 0 or len(data) < offset + 4:
        return _U32.unpack_from(data, 24)[0]  # header-only form: cn_msg.seq
    return _U32.unpack_from(data, offset)[0]


def _answer(datagram: bytes, layout: wire.Layout, packet: int | None = None) -> Answer:
    try:
        return Answer.of(wire.decode_reply(datagram, layout), packet)
    except ValueError as exc:
        return Answer(0, f"<undecodable reply: {exc}>".encode(), False, packet)


def _recorded_answer(recorded: _Pending | None, layout: wire.Layout) -> Answer | None:
    return None if recorded is None else _answer(recorded.data, layout, recorded.packet)


def _compare(
    ours: list[bytes], recorded: _Pending | None, device_path: str | None, layout: wire.Layout
) -> tuple[str, str]:
    """(verdict, reason) for one request, before taints are applied."""
    if len(ours) > 1:
        return MISMATCH, f"the replay sent {len(ours)} replies"
    if recorded is None:
        return (MATCH, "") if not ours else (UNANSWERED, "")
    if not ours:
        return MISMATCH, "the replay sent no reply"
    if ours[0] == recorded.data:
        return MATCH, ""  # byte-identical datagrams: the common case, no decoding needed
    mine = _answer(ours[0], layout)
    theirs = _answer(recorded.data, layout)
    if mine.same(theirs):
        return MATCH, ""
    mapped = _device_number_equivalent(mine, theirs, device_path)
    if mapped is not None:
        return MATCH, mapped
    return MISMATCH, ""


def _device_number_equivalent(mine: Answer, theirs: Answer, path: str | None) -> str | None:
    """The STATUS exception: our path where the daemon reported the device number."""
    if not path or not path.startswith("/"):
        return None
    if mine.error != theirs.error or mine.ack_only or theirs.ack_only:
        return None
    a, b = mine.data.split(b" "), theirs.data.split(b" ")
    if len(a) != len(b):
        return None
    number = None
    for x, y in zip(a, b, strict=True):
        if x == y:
            continue
        if x != path.encode() or not _MAJMIN.match(y):
            return None
        number = y.decode()
    return None if number is None else f"log device {path} was {number} when captured"


# ----------------------------------------------------------------------------------- API
def replay(
    paths: Sequence[str | Path],
    *,
    layout: wire.Layout = wire.CURRENT,
    log_filter: str | None = None,
    until: Until | None = None,
) -> Report:
    """Replay the capture file(s) through a fresh server and compare (see module docs)."""
    if not paths:
        raise ValueError("no capture file given")
    labels = [str(p) for p in paths]
    report = Report(files=labels, protocol=layout.name, log_filter=log_filter)
    with contextlib.ExitStack() as stack:
        state_dir = None
        if len(paths) > 1:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ulogd-replay-"))
            state_dir = Path(tmp)
        replayer = _Replayer(report, layout, log_filter, until, state_dir)
        for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
            if i:
                replayer.restart(label)
            if not replayer.replay_file(Path(path), label, last=i == len(paths) - 1):
                break
        replayer.finish()
    if report.nothing_matched:
        report.notes.append(f"no request of the capture names a log matching {log_filter!r}")
    if report.orphan_replies:
        report.notes.append(
            f"{report.orphan_replies} recorded repl(ies) answer no replayed request"
            + (" (requests not replayed because of --log/--until)" if log_filter or until else "")
        )
    return report
