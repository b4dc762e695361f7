"""Offline dry-run replay of a capture: what would *this* ulogd have answered?

Theory of operation
===================

Input
-----
One or more capture files (pcapng or pcap, LINKTYPE_NETLINK, read by
:func:`ulogd.capture.read_capture`), each holding the datagrams one daemon saw and sent.
Several files are *one kernel talking to successive daemons*: ``dm-ulogd run --capture A`` was
killed or stopped and ``dm-ulogd run --capture B`` took over with the same run directory.

Two passes per file
-------------------
1. Every recorded reply (daemon->kernel) is decoded with :func:`ulogd.wire.decode_reply` and
   filed under its sequence number: ``dm_ulog_request.seq`` for full replies, ``cn_msg.seq``
   for the header-only form.  The kernel numbers requests with one counter for every log, so
   a capture holding several logs is paired correctly; a number reused later (the counter
   wraps, the kernel's retry uses a new one) is paired with the first reply recorded *after*
   the request.
2. Every request (kernel->daemon) is fed, in capture order, to a :class:`~ulogd.server.Server`
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
      image (:class:`~ulogd.disklog.MemoryDiskLog`, "no valid log yet", what a fresh device
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
names the packet (:class:`~ulogd.capture.CaptureFormatError`).  Exit status: 0 every answer
checked agrees, 1 at least one mismatch, 4 a file could not be read (wholly or in part) and
no mismatch was found before the defect (a file that does not exist: one line, no report),
5 ``--log`` matched no log of the capture (nothing was compared).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import re
import struct
import sys
import tempfile
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulogd import ctr, disklog, wire
from ulogd import protocol as p
from ulogd.capture import CaptureFormatError, Direction, Packet, read_capture
from ulogd.protocol import RequestType as T
from ulogd.server import Action, DiskRead, DiskWrite, Send, Server
from ulogd.statefile import StateDir

__all__ = [
    "EXIT_MISMATCH",
    "EXIT_NO_MATCH",
    "EXIT_OK",
    "EXIT_UNREADABLE",
    "Answer",
    "Outcome",
    "Report",
    "Until",
    "add_arguments",
    "parse_until",
    "replay",
    "request_text",
    "run_cli",
]

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_UNREADABLE = 4
EXIT_NO_MATCH = 5  # --log named no log of the capture: nothing was compared

MATCH = "match"
MISMATCH = "mismatch"
UNVERIFIABLE = "unverifiable"
UNANSWERED = "unanswered"  # no recorded reply
VERDICTS = (MATCH, MISMATCH, UNVERIFIABLE, UNANSWERED)
REJECTED = "(rejected)"

MID_STREAM = "mid-stream"
DISK_CONTENT = "disk-content"

#: Default size of a log device image no constructor has sized yet.
_DEFAULT_IMAGE = 1 << 20
_BLOCK = 512
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
_MAJMIN = re.compile(rb"^\d+:\d+$")


# ----------------------------------------------------------------------------------- answers
@dataclass(frozen=True, slots=True)
class Answer:
    """One side's answer to a request, as the kernel would read it."""

    error: int
    data: bytes
    ack_only: bool = False
    packet: int | None = None  # recorded reply's packet number

    @classmethod
    def of(cls, reply: wire.Reply, packet: int | None = None) -> Answer:
        return cls(reply.error, reply.data, reply.ack_only, packet)

    def same(self, other: Answer) -> bool:
        return (self.error, self.data, self.ack_only) == (other.error, other.data, other.ack_only)

    def describe(self, request_type: int | None) -> str:
        err = p.errno_name(self.error)
        if self.ack_only:
            return f"header-only ack, error {err}"
        return f"error {err}" + (f", {_payload_text(request_type, self.data)}" if self.data else "")

    def to_json(self, request_type: int | None) -> dict[str, Any]:
        return {
            "error": self.error,
            "error_name": p.errno_name(self.error),
            "ack_only": self.ack_only,
            "data_hex": self.data.hex(),
            "text": self.describe(request_type),
            "packet": self.packet,
        }


def _payload_text(request_type: int | None, data: bytes) -> str:
    """A reply payload, decoded the way the kernel reads it for that request type."""
    try:
        if request_type in (T.GET_REGION_SIZE, T.GET_SYNC_COUNT) and len(data) == 8:
            return str(struct.unpack("=Q", data)[0])
        if request_type in (T.IS_CLEAN, T.IN_SYNC) and len(data) == 8:
            return str(struct.unpack("=q", data)[0])
        if request_type == T.GET_RESYNC_WORK and len(data) == 16:
            i, r = struct.unpack("=qQ", data)
            return f"work={i} region={r}"
        if request_type == T.IS_REMOTE_RECOVERING and len(data) == 16:
            rec, hint = struct.unpack("=qQ", data)
            return f"recovering={rec} hint={hint}"
        if request_type in (T.STATUS_INFO, T.STATUS_TABLE, T.CTR):
            return repr(data.decode("ascii", "backslashreplace"))
    except struct.error:
        pass
    return f"{len(data)} bytes {data[:32].hex()}{'...' if len(data) > 32 else ''}"


def request_text(request: wire.Request) -> str:
    """The request and its payload, for people."""
    name = p.type_name(request.request_type)
    data = request.data
    shape = p.SPECS[request.request_type].payload
    if shape is p.Payload.STRING:
        nul = data.endswith(b"\0")
        text = (data[:-1] if nul else data).decode("ascii", "backslashreplace")
        return f"{name} {text!r}" + (" +NUL (reconnect)" if nul else "")
    if shape is p.Payload.REGION and len(data) == 8:
        return f"{name} region {struct.unpack('=Q', data)[0]}"
    if shape is p.Payload.REGIONS and data:
        regions = list(memoryview(data).cast("Q"))
        shown = ", ".join(map(str, regions[:16])) + (", ..." if len(regions) > 16 else "")
        return f"{name} regions [{shown}]"
    if shape is p.Payload.REGION_SYNC and len(data) == 16:
        region, in_sync = struct.unpack("=Qq", data)
        return f"{name} region {region} in_sync={in_sync}"
    return name


# ----------------------------------------------------------------------------------- results
@dataclass(slots=True)
class Outcome:
    """The verdict on one replayed request (kept for every verdict but ``match``)."""

    file: str
    packet: int
    timestamp_ns: int
    type_name: str
    request: str
    uuid: str | None
    luid: int | None
    seq: int | None
    verdict: str
    recorded: Answer | None
    replayed: Answer | None
    request_type: int | None = None
    reason: str = ""
    state: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "packet": self.packet,
            "timestamp_ns": self.timestamp_ns,
            "type": self.type_name,
            "request": self.request,
            "uuid": self.uuid,
            "luid": self.luid,
            "seq": self.seq,
            "verdict": self.verdict,
            "reason": self.reason,
            "recorded": None if self.recorded is None else self.recorded.to_json(self.request_type),
            "replayed": None if self.replayed is None else self.replayed.to_json(self.request_type),
            "state": self.state,
        }


@dataclass(slots=True)
class LogInfo:
    """What the replay learnt about one log instance."""

    uuid: str
    luid: int
    file: str
    first_packet: int
    origin: str  # "capture" (constructed in it), "mid-stream", "restored"
    type_word: str | None = None
    taint: str | None = None  # MID_STREAM / DISK_CONTENT: differences are unverifiable
    final_state: str | None = None
    removed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "luid": self.luid,
            "file": self.file,
            "first_packet": self.first_packet,
            "origin": self.origin,
            "type": self.type_word,
            "unverifiable_because": self.taint,
            "removed": self.removed,
            "final_state": self.final_state,
        }


@dataclass(slots=True)
class Report:
    files: list[str]
    protocol: str
    packets: int = 0
    recorded_replies: int = 0
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)  # every verdict except match
    logs: dict[tuple[str, int], LogInfo] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    orphan_replies: int = 0
    error: str | None = None
    error_file: str | None = None
    error_packet: int | None = None
    restarts: int = 0
    log_filter: str | None = None

    # -- summaries --------------------------------------------------------------------------
    def total(self, verdict: str) -> int:
        return sum(c[verdict] for c in self.counts.values())

    @property
    def replayed(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def of(self, verdict: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.verdict == verdict]

    @property
    def nothing_matched(self) -> bool:
        """``--log`` was given and no request of the capture names a log it matches."""
        return self.log_filter is not None and not self.logs

    @property
    def exit_status(self) -> int:
        if self.total(MISMATCH):
            return EXIT_MISMATCH
        if self.error is not None:
            return EXIT_UNREADABLE
        if self.nothing_matched:
            return EXIT_NO_MATCH
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "protocol": self.protocol,
            "packets": self.packets,
            "recorded_replies": self.recorded_replies,
            "replayed": self.replayed,
            "restarts": self.restarts,
            "totals": {v: self.total(v) for v in VERDICTS},
            "counts": {t: {v: c[v] for v in VERDICTS} for t, c in self.counts.items()},
            "skipped": dict(self.skipped),
            "orphan_replies": self.orphan_replies,
            "logs": [info.to_json() for info in self.logs.values()],
            "mismatches": [o.to_json() for o in self.of(MISMATCH)],
            "unverifiable": [o.to_json() for o in self.of(UNVERIFIABLE)],
            "unanswered": [o.to_json() for o in self.of(UNANSWERED)],
            "notes": self.notes,
            "error": None
            if self.error is None
            else {"message": self.error, "file": self.error_file, "packet": self.error_packet},
            "exit_status": self.exit_status,
        }

    def render(self, *, limit: int = 20) -> str:
        """The readable report."""
        out: list[str] = []
        files = " + ".join(self.files)
        out.append(f"dm-ulogd replay of {files} (protocol {self.protocol})")
        restarts = f", {self.restarts} daemon restart(s) replayed" if self.restarts else ""
        out.append(
            f"{self.packets} packets: {self.replayed} requests replayed, "
            f"{self.recorded_replies} recorded replies{restarts}"
        )
        if self.skipped:
            out.append("not replayed: " + ", ".join(f"{n} {k}" for k, n in self.skipped.items()))
        out.append("")
        head = ("request", "replayed", "match", "mismatch", "unverifiable", "no reply")
        rows = []
        order = [t.name for t in T] + [REJECTED]
        for name in sorted(self.counts, key=lambda n: order.index(n) if n in order else 99):
            c = self.counts[name]
            rows.append((name, sum(c.values()), *(c[v] for v in VERDICTS)))
        rows.append(("total", self.replayed, *(self.total(v) for v in VERDICTS)))
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        for i, row in enumerate([head, *rows]):
            if i == len(rows):
                out.append("  ".join("-" * w for w in widths))
            cells = [str(row[0]).ljust(widths[0])]
            cells += [str(v).rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)]
            out.append("  ".join(cells).rstrip())
        if self.logs:
            out.append("")
            out.append("logs:")
            for info in self.logs.values():
                origin = {
                    "capture": f"constructed at packet {info.first_packet}",
                    "mid-stream": f"starts mid-stream (first seen at packet {info.first_packet})",
                    "restored": "restored by the restarted daemon",
                }.get(info.origin, info.origin)
                taint = f"; differences unverifiable ({info.taint})" if info.taint else ""
                end = "removed" if info.removed else (info.final_state or "unknown to the replay")
                out.append(
                    f"  {info.uuid} luid={info.luid:#x} [{info.file}] "
                    f"{info.type_word or 'type unknown'}: {origin}{taint}"
                )
                out.append(f"      at the end: {end}")
        for verdict, title in (
            (MISMATCH, "MISMATCHES"),
            (UNVERIFIABLE, "unverifiable differences"),
            (UNANSWERED, "requests without a recorded reply"),
        ):
            items = self.of(verdict)
            if not items:
                continue
            out.append("")
            out.append(f"{title} ({len(items)}):")
            for o in items[:limit]:
                out.extend(_render_outcome(o))
            if len(items) > limit:
                out.append(f"  ... {len(items) - limit} more (see --json)")
        if self.notes:
            out.append("")
            out.append("notes:")
            out.extend(f"  - {n}" for n in self.notes)
        if self.error is not None:
            out.append("")
            out.append(f"capture damaged: {self.error_file}: {self.error}")
            out.append("  (the report covers the packets before the defect)")
        out.append("")
        status = self.exit_status
        if status == EXIT_MISMATCH:
            verdict_line = f"RESULT: {self.total(MISMATCH)} mismatch(es)"
        elif status == EXIT_UNREADABLE:
            verdict_line = "RESULT: capture unreadable (no mismatch before the defect)"
        elif status == EXIT_NO_MATCH:
            verdict_line = f"RESULT: nothing compared: no log matches --log {self.log_filter!r}"
        else:
            verdict_line = f"RESULT: OK, {self.total(MATCH)} answers agree with the capture" + (
                f" ({self.total(UNVERIFIABLE)} unverifiable)" if self.total(UNVERIFIABLE) else ""
            )
        out.append(verdict_line)
        return "\n".join(out) + "\n"


def _render_outcome(o: Outcome) -> list[str]:
    where = f"packet {o.packet}" + (f" of {o.file}" if o.file else "")
    log_name = f" {o.uuid} luid={o.luid:#x}" if o.uuid is not None and o.luid is not None else ""
    seq = f" seq={o.seq}" if o.seq is not None else ""
    lines = [f"  {where}:{log_name}{seq} {o.request}" + (f"  [{o.reason}]" if o.reason else "")]
    rec = "(none)" if o.recorded is None else o.recorded.describe(o.request_type)
    if o.recorded is not None and o.recorded.packet is not None:
        rec += f"  (packet {o.recorded.packet})"
    rep = "(no answer)" if o.replayed is None else o.replayed.describe(o.request_type)
    lines.append(f"      recorded: {rec}")
    lines.append(f"      replay:   {rep}")
    if o.state is not None:
        lines.append(f"      state:    {o.state}")
    return lines


# ----------------------------------------------------------------------------------- --until
@dataclass(frozen=True, slots=True)
class Until:
    """Where to stop: after packet ``packet`` (of the last file), or at a time."""

    packet: int | None = None
    seconds: float | None = None  # after the first packet of the first file
    timestamp_ns: int | None = None  # absolute


def parse_until(text: str) -> Until:
    """``N`` (packet number), ``12.5s`` (seconds after the first packet) or an ISO 8601
    date-time (``2026-11-21T17:25:36.5``; without a zone it is local time)."""
    text = text.strip()
    if text.isdigit():
        return Until(packet=int(text))
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)s", text)
    if m:
        return Until(seconds=float(m.group(1)))
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--until {text!r}: expected a packet number, seconds like 12.5s, or an ISO 8601 "
            "date-time"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()
    return Until(timestamp_ns=int(when.timestamp() * 1e9))


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
        sent: list[bytes] = []
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Send):
                sent.append(action.data)
                continue
            if not isinstance(action, DiskRead | DiskWrite):
                # cluster actions: never produced by a server with cluster=False
                self.report.skipped[f"{type(action).__name__} actions"] += 1
                continue
            device = action.device
            data: bytes | None = None
            error: OSError | None = None
            try:
                if isinstance(action, DiskRead):
                    if (
                        isinstance(device, _ReplayDevice)
                        and device.image.unknown
                        and self._reads_disk_state(key)
                    ):
                        device.image.read_while_unknown = True
                        assert key is not None
                        self.taint.setdefault(key, DISK_CONTENT)
                    data = device.read(action.nbytes)
                else:
                    device.write_extents(action.extents)
                    if isinstance(device, _ReplayDevice):
                        device.image.unknown = key is None or key in self.taint
            except OSError as exc:
                error = exc
            queue.extend(self.server.disk_done(action.token, data, error))
        return sent

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


# ----------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dm-ulogd replay`` options (called by :mod:`ulogd.cli`)."""
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="capture file (pcapng/pcap, LINKTYPE_NETLINK); several files are successive "
        "daemons of one kernel (e.g. before and after a restart)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    parser.add_argument(
        "--until",
        metavar="N|TIME",
        help="stop after packet N (of the last file), after TIME seconds ('12.5s') from the "
        "first packet, or at an ISO 8601 date-time",
    )
    parser.add_argument("--log", metavar="UUID", help="replay only this log (uuid or its tail)")
    parser.add_argument(
        "--protocol",
        default=wire.CURRENT.name,
        choices=sorted(wire.LAYOUTS),
        help="request layout the capture uses (default current)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=20,
        metavar="N",
        help="details shown per section of the readable report (default 20; --json has all)",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="show the replayed server's own log lines"
    )


def run_cli(args: argparse.Namespace) -> int:
    """``dm-ulogd replay``: returns the exit status."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.CRITICAL,
        format="  | %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    quiet = logging.getLogger("ulogd")
    level = quiet.level
    if not args.verbose:
        quiet.setLevel(logging.CRITICAL)
    try:
        return _run_cli(args)
    finally:
        quiet.setLevel(level)  # called in-process too (tests): leave logging as it was


def _run_cli(args: argparse.Namespace) -> int:
    try:
        until = parse_until(args.until) if args.until else None
    except ValueError as exc:
        print(f"dm-ulogd replay: {exc}", file=sys.stderr)
        return 2
    for name in args.files:
        # A file that is not there is one line, not an empty report of a "damaged" capture.
        try:
            os.stat(name)
        except FileNotFoundError:
            print(f"dm-ulogd replay: {name}: no such file", file=sys.stderr)
            return EXIT_UNREADABLE
    report = replay(
        args.files, layout=wire.LAYOUTS[args.protocol], log_filter=args.log, until=until
    )
    text = (
        json.dumps(report.to_json(), indent=1) + "\n"
        if args.json
        else report.render(limit=args.limit)
    )
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if report.error is not None:
        print(f"dm-ulogd replay: {report.error_file}: {report.error}", file=sys.stderr)
    return report.exit_status
