"""The replay tool's report model: answers, verdicts, per-log information, the report.

Theory of operation
-------------------
:mod:`ulogd.ops.replay` feeds a capture to a fresh server and compares every reply it makes
with the one recorded (see there); what it finds is kept here: an :class:`Answer` (a reply
decoded for people), an :class:`Outcome` per request with its verdict (:data:`MATCH`,
:data:`MISMATCH`, :data:`UNVERIFIABLE`, :data:`UNANSWERED`), a :class:`LogInfo` per log and
the :class:`Report` that renders them as text or JSON and names the exit status.  An
:class:`Until` (``--until``) says where the replay stops.
"""

from __future__ import annotations

import datetime as dt
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ulogd.protocol import spec as p
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T

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
            return str(p.U64.unpack(data)[0])
        if request_type in (T.IS_CLEAN, T.IN_SYNC) and len(data) == 8:
            return str(p.S64.unpack(data)[0])
        if request_type == T.GET_RESYNC_WORK and len(data) == 16:
            i, r = p.PAIR.unpack(data)
            return f"work={i} region={r}"
        if request_type == T.IS_REMOTE_RECOVERING and len(data) == 16:
            rec, hint = p.PAIR.unpack(data)
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
        return f"{name} region {p.U64.unpack(data)[0]}"
    if shape is p.Payload.REGIONS and data:
        regions = list(p.regions(data))
        shown = ", ".join(map(str, regions[:16])) + (", ..." if len(regions) > 16 else "")
        return f"{name} regions [{shown}]"
    if shape is p.Payload.REGION_SYNC and len(data) == 16:
        region, in_sync = p.REGION_SYNC.unpack(data)
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
