"""One mirror log's region state and every rule that changes it (pure, no I/O).

Theory of operation
-------------------
A mirror is cut into ``region_count`` regions.  Per region the log keeps two bits:

* **clean** — no write is outstanding (1) or a write may be in flight (0).  Persisted by disk
  logs: after a crash every region not recorded clean is resynchronised.
* **sync** — the mirror legs hold the same data (1), or the region must be recovered (0).

and, per region that some node is writing, the set of **holders** (node ids with a mark).
A region becomes clean only when its last holder clears it *and* it is in sync — stricter than
the kernel's own ``core``/``disk`` logs and the rule that keeps a cluster safe: no node ever
makes clean a region another node is still writing, and an out-of-sync region is never recorded
clean.  ``sync_count`` always equals the number of sync bits (repaired whenever it could drift).

Resynchronisation hands out one region at a time (``recovering``/``recoverer``): the next
out-of-sync region at or after ``sync_search``, after regions a writer is waiting for
(the priority list, filled by IS_REMOTE_RECOVERING).  A region whose sync bit is cleared (write
failure, a departed node's in-flight writes) moves ``sync_search`` back so it is found again.

The bitarrays are handed in by the owner (``statefile`` maps them onto files that outlive a
daemon crash) and may be longer than ``region_count`` (rounded up to whole words); bits past
``region_count`` stay 0 in both maps.  Scalar state that must survive a restart is exported by
:meth:`RegionLog.scalars` and restored by :meth:`RegionLog.restore_scalars`.

Disk logs: every clean-bit change records its 4096-region *chunk*; FLUSH and POSTSUSPEND hand
the changed chunks to the caller to write (:meth:`take_disk_work`), and the caller reports the
outcome (:meth:`disk_written`).  **A disk write must be durable (on stable storage before the
FLUSH is answered) when it records a region going dirty, or rewrites the whole unit; one that
only records regions becoming clean may stay in the device's volatile cache**: a lost mark
would let a crash skip the resync of a region being written, a lost clear only costs a
needless resync (the kernel's own ``disk`` log flushes the device cache on the same rule).
:meth:`take_disk_write` says which.  RESUME of a disk log that has not been loaded asks the caller
for the on-disk image (:meth:`resume` returns ``NEEDS_DISK``) and applies it in
:meth:`load_disk` with the kernel ``disk`` log's rules.

Node ids: single-node operation uses one node id throughout; the cluster layer passes the
originating member's id and keeps ``members`` current.

Own marks and live kernels
--------------------------
**No region is recovered or made clean while a live kernel may still be writing it.**  A
node's kernel outlives its daemon, so:

* ``mine`` is this node's kernel's view of its own marks, updated when a MARK (or the marks of
  a FLUSH) is *acknowledged* and when a CLEAR is acknowledged (:meth:`kernel_marked`,
  :meth:`kernel_cleared`), never at a later cluster delivery; the owner persists it beside the
  bitmaps, so a restarted daemon knows every region its kernel may be writing (the kernel does
  not re-send MARKs after a reconnect).
* A node whose daemon left its group while the node stays in the ring
  (:meth:`node_process_gone`) becomes an *orphan*: its marks stay, held by its node id; its
  regions stay dirty, keep their sync bits, are never handed out for recovery
  (:meth:`get_resync_work` skips them), and a recovery it was assigned stays its own (its
  kernel may be copying that region: :meth:`is_remote_recovering` counts it as remote).
* The orphan's marks are released only when its node's new daemon rejoins
  (:meth:`node_rejoined`: its own marks replace them; a node that comes back with a fresh
  kernel instead makes them lose sync), or when the node leaves the ring
  (:meth:`node_departed`: its regions lose sync and are recovered).

Nothing else assigns a log's state
----------------------------------
Every change goes through a method here; the other layers only read fields:

* a peer's checkpoint is loaded by :meth:`load`, which checks it first (no held or
  out-of-sync region clean, positions inside the log, chunks before its end) and changes
  nothing when it is refused; a state file's scalars by :meth:`restore_scalars` (the same
  range check, :func:`scalars_problem`), its census by :meth:`counted`;
* the group's membership is set by :meth:`set_members` only; what a node holds is
  :meth:`marks_of` (its own node: :meth:`own_marks`, the kernel's view);
* a log device that cannot be opened at a restart fails the log (:meth:`device_missing`);
* scalars are handed to the owner to save by :meth:`take_scalars`, which marks them saved.
* no region is made clean without quorum: what a member without it may send of its batch,
  and which CLEARs it holds back, is :meth:`without_quorum`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from bitarray import bitarray

from ulogd.protocol import spec as p
from ulogd.protocol.ctr import LogConfig, SyncMode

_Op = TypeVar("_Op")

CHUNK_SHIFT = 12  # 4096 regions = 512 bitmap bytes per disk chunk


class Resume(enum.Enum):
    DONE = "done"
    NEEDS_DISK = "needs-disk"


class Rejoin(enum.IntEnum):
    """What a node's new daemon says about its kernel's marks (see
    :meth:`RegionLog.node_rejoined`); the values travel in cluster messages."""

    FRESH = 0
    UNION = 1
    REPLACE = 2


class Scalars(NamedTuple):
    """The non-bitmap state that must survive a daemon restart (a named tuple: built before
    every reply that changed it, so it must be cheap to make)."""

    sync_search: int
    recovering: int
    recoverer: int
    resumed: bool
    recovery_halted: bool
    in_sync_override: bool
    disk_loaded: bool
    disk_failed: bool


def padded_bits(region_count: int) -> int:
    """Bitmap length rounded up to whole 64-bit words (never 0)."""
    return max(64, -(-region_count // 64) * 64)


def new_bitmaps(config: LogConfig) -> tuple[bitarray, bitarray]:
    """Fresh in-memory bitmaps for a new log (see :func:`initialise`)."""
    n = config.region_count
    clean = bitarray(padded_bits(n), endian="little")
    sync = bitarray(padded_bits(n), endian="little")
    initialise(config, clean, sync)
    return clean, sync


def initial_bit(config: LogConfig) -> int:
    """A new log's clean and sync bit for every region: in sync only with ``nosync``; clean
    exactly where in sync (no write is outstanding yet, but a region that must be recovered is
    never called clean).  A state file is built with this value (see ``statefile``)."""
    return 1 if config.sync is SyncMode.NOSYNC else 0


def initialise(config: LogConfig, clean: bitarray, sync: bitarray) -> None:
    """Fill in-memory bitmaps of a new log (see :func:`initial_bit`)."""
    n = config.region_count
    clean.setall(0)
    sync.setall(0)
    if initial_bit(config):
        sync[:n] = 1
        clean[:n] = 1


def scalars_problem(region_count: int, s: Scalars) -> str | None:
    """Why restored scalars cannot belong to a log of ``region_count`` regions (None: they
    can).  The one range check of restored scalars: state files and cluster snapshots."""
    n = region_count
    if not 0 <= s.sync_search <= n + 1:
        return f"sync search position {s.sync_search} outside 0..{n + 1}"
    if not -1 <= s.recovering < n:
        return f"region under recovery {s.recovering} outside -1..{n - 1}"
    if s.recovering >= 0 and s.recoverer < 0:
        return f"region {s.recovering} under recovery by no node ({s.recoverer})"
    if s.recoverer < -1:
        return f"recovering node {s.recoverer} is not a node id"
    return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A replica's shared state as a cluster checkpoint carries it (:meth:`RegionLog.load`)."""

    clean: bitarray
    sync: bitarray
    holders: dict[int, set[int]]
    orphans: set[int]
    priority: list[int]
    dirty_chunks: set[int]
    sync_search: int
    recovering: int
    recoverer: int
    disk_failed: bool
    full_write: bool
    in_sync_override: bool


class SnapshotError(ValueError):
    """A snapshot no replica of this log can be in."""


class RegionLog:
    """The state machine of one log instance (see the module docstring)."""

    def __init__(
        self,
        config: LogConfig,
        clean: bitarray,
        sync: bitarray,
        *,
        local_node: int = 0,
        device_id: str | None = None,
        mine: bitarray | None = None,
        sync_count: int | None = None,
    ) -> None:
        """``sync_count``: the number of sync bits when the caller knows it (a new log, or a
        count made elsewhere), so that a huge log is not counted here."""
        n = config.region_count
        if len(clean) < n or len(sync) < n:
            raise ValueError("bitmaps shorter than the region count")
        if mine is None:
            mine = bitarray(len(clean), endian="little")
            mine.setall(0)
        elif len(mine) < n:
            raise ValueError("own-marks bitmap shorter than the region count")
        #: the regions this node's kernel may be writing, as acknowledged to it (persisted)
        self.mine = mine
        self.local_node = local_node
        #: nodes whose daemon left while the node stayed in the ring: their marks stay held
        self.orphans: set[int] = set()
        self.config = config
        self.region_count = n
        self.clean = clean
        self.sync = sync
        self.sync_count = sync.count(1, 0, n) if sync_count is None else sync_count
        self.device_id = device_id  # "MAJ:MIN" of the log device, for status strings
        self.holders: dict[int, set[int]] = {}
        self.members: set[int] = {local_node}
        self.sync_search = 0
        self.recovering = -1
        self.recoverer = -1
        self.priority: list[int] = []
        self.resumed = False
        self.recovery_halted = False
        self.in_sync_override = False
        self.has_disk = config.has_disk
        self.disk_loaded = False
        self.disk_failed = False
        self.dirty_chunks: set[int] = set()
        #: a clean bit went 1 -> 0 since the last write was handed out: that write is durable
        self.marks_unwritten = False
        self.full_write = self.has_disk  # a write must cover header and whole bitmap
        #: set whenever a field in :class:`Scalars` changes; the owner clears it after saving
        self.scalars_changed = True

    # ------------------------------------------------------------------ persistence
    def scalars(self) -> Scalars:
        return Scalars(
            self.sync_search,
            self.recovering,
            self.recoverer,
            self.resumed,
            self.recovery_halted,
            self.in_sync_override,
            self.disk_loaded,
            self.disk_failed,
        )

    def take_scalars(self) -> Scalars:
        """The scalars to save now: the owner persists them, and they count as saved."""
        self.scalars_changed = False
        return self.scalars()

    def counted(self, census: tuple[int, list[int]] | None) -> None:
        """A restored log's census is in (``(sync_count, own marks)`` counted off the loop),
        or None: count it here (slower, never wrong)."""
        if census is None:
            self.sync_count = self.sync.count(1, 0, self.region_count)
            self.restore_own_marks()
        else:
            self.sync_count, marks = census
            self.restore_own_marks(marks)

    def restore_scalars(self, s: Scalars) -> None:
        """Scalars saved by a previous daemon (checked with :func:`scalars_problem` first)."""
        if problem := scalars_problem(self.region_count, s):
            raise ValueError(problem)
        self.sync_search = s.sync_search
        self.recovering = s.recovering
        self.recoverer = s.recoverer
        self.resumed = s.resumed
        self.recovery_halted = s.recovery_halted
        self.in_sync_override = s.in_sync_override
        self.disk_loaded = s.disk_loaded
        self.disk_failed = s.disk_failed
        # What was written before the restart is unknown: rewrite everything on next flush.
        self.full_write = self.has_disk
        self.scalars_changed = False

    def adopt(self, previous: RegionLog) -> None:
        """Carry the region state of a previous instance of the same log (table reload)."""
        n = self.region_count
        self.clean[:n] = previous.clean[:n]
        self.sync[:n] = previous.sync[:n]
        self.mine[:n] = previous.mine[:n]
        self.sync_count = self.sync.count(1, 0, n)
        self.holders = {r: set(h) for r, h in previous.holders.items()}
        self.in_sync_override = previous.in_sync_override
        if self.has_disk:
            self.disk_loaded = True
            self.full_write = True
        self.scalars_changed = True

    def restore_own_marks(self, marks: Iterable[int] | None = None) -> int:
        """After a daemon restart: this node's kernel still holds the marks it was
        acknowledged (``mine``, or ``marks`` when the caller found them there already); they
        become its mark references again.  Returns how many."""
        n = self.region_count
        node = self.local_node
        count = 0
        for r in self.mine.search(1, 0, n) if marks is None else marks:
            self.holders.setdefault(r, set()).add(node)
            self._set_clean(r, 0)
            count += 1
        return count

    def own_marks(self) -> list[int]:
        """The regions this node's kernel may be writing (see ``mine``)."""
        return list(self.mine[: self.region_count].search(1))

    def kernel_marked(self, regions: Sequence[int]) -> None:
        """A MARK (or a FLUSH's integrated marks) is acknowledged to this node's kernel."""
        mine = self.mine
        for r in regions:
            mine[r] = 1

    def kernel_cleared(self, regions: Sequence[int]) -> None:
        """A CLEAR is acknowledged to this node's kernel."""
        mine = self.mine
        for r in regions:
            mine[r] = 0

    def blank_copy(self) -> RegionLog:
        """A log of the same geometry with fresh in-memory bitmaps (to load a peer's state)."""
        clean = bitarray(len(self.clean), endian="little")
        sync = bitarray(len(self.sync), endian="little")
        clean.setall(0)
        sync.setall(0)
        copy = RegionLog(self.config, clean, sync, device_id=self.device_id)
        copy.has_disk = self.has_disk
        return copy

    # ------------------------------------------------------------------ checks
    def check_regions(self, regions: Iterable[int]) -> int:
        """0, or -EINVAL when any region is out of range."""
        n = self.region_count
        for r in regions:
            if r >= n:
                return p.EINVAL
        return 0

    def _set_clean(self, r: int, value: int) -> None:
        if self.clean[r] != value:
            self.clean[r] = value
            if self.has_disk:
                self.dirty_chunks.add(r >> CHUNK_SHIFT)
                if not value:
                    self.marks_unwritten = True

    def _lose_sync(self, r: int) -> None:
        """Region ``r`` must be recovered: not in sync, not clean, found again by the scan."""
        if self.sync[r]:
            self.sync[r] = 0
            self.sync_count -= 1
        self._set_clean(r, 0)
        if r < self.sync_search:
            self.sync_search = r
            self.scalars_changed = True

    # ------------------------------------------------------------------ writes
    def mark(self, node: int, regions: Sequence[int]) -> int:
        if err := self.check_regions(regions):
            return err
        holders = self.holders
        for r in regions:
            h = holders.get(r)
            if h is None:
                holders[r] = {node}
                self._set_clean(r, 0)
            else:
                h.add(node)
        return 0

    def clear(self, node: int, regions: Sequence[int]) -> int:
        if err := self.check_regions(regions):
            return err
        holders = self.holders
        for r in regions:
            h = holders.get(r)
            if h is not None:
                h.discard(node)
                if h:
                    continue  # another node is still writing r
                del holders[r]
            if self.sync[r]:
                self._set_clean(r, 1)
        return 0

    def flush(self, node: int, marks: Sequence[int] = ()) -> int:
        """FLUSH, with the marks of an integrated flush (protocol 3) applied first."""
        return self.mark(node, marks) if marks else 0

    # ------------------------------------------------------------------ queries
    def is_clean(self, r: int) -> tuple[int, int]:
        if r >= self.region_count:
            return p.EINVAL, 0
        return 0, self.clean[r]

    def in_sync(self, r: int) -> tuple[int, int]:
        if r >= self.region_count:
            return p.EINVAL, 0
        return 0, 1 if self.in_sync_override else self.sync[r]

    def hint(self) -> int:
        """Regions below the hint are in sync (what IS_REMOTE_RECOVERING reports)."""
        return min(max(self.sync_search - 1, 0), self.region_count)

    # ------------------------------------------------------------------ resync
    def get_resync_work(self, node: int) -> tuple[int, int]:
        """(1, region) to recover, or (0, 0) when there is nothing for ``node`` to do."""
        if self.recovering >= 0:
            if self.recoverer == node:
                return 1, self.recovering  # a retry of the same request
            return 0, 0  # one region at a time, cluster-wide
        if self.orphans:
            return self._resync_work_beside_orphans(node)
        while self.priority:
            r = self.priority.pop()
            if not self.sync[r]:
                return self._assign(node, r)
        n = self.region_count
        r = self.sync.find(0, self.sync_search, n) if self.sync_search < n else -1
        if r < 0:
            if self.sync_search != n + 1:
                self.sync_search = n + 1  # makes the hint the region count
                self.scalars_changed = True
            return 0, 0
        self.sync_search = r + 1
        return self._assign(node, r)

    def _held_by_orphan(self, r: int) -> bool:
        h = self.holders.get(r)
        return h is not None and not h.isdisjoint(self.orphans)

    def _resync_work_beside_orphans(self, node: int) -> tuple[int, int]:
        """As :meth:`get_resync_work`, but a region an orphan's live kernel may be writing is
        never handed out (recovery would copy under its writes); the scan stays at the first
        such region so it is found again once the orphan is released."""
        kept = [r for r in self.priority if self._held_by_orphan(r)]
        while self.priority:
            r = self.priority.pop()
            if not self.sync[r] and not self._held_by_orphan(r):
                self.priority = kept + self.priority
                return self._assign(node, r)
        self.priority = kept
        n = self.region_count
        start = self.sync_search
        first_skipped = -1
        r = self.sync.find(0, start, n) if start < n else -1
        while r >= 0 and self._held_by_orphan(r):
            if first_skipped < 0:
                first_skipped = r
            r = self.sync.find(0, r + 1, n) if r + 1 < n else -1
        if r < 0:
            if first_skipped >= 0:
                if self.sync_search != first_skipped:
                    self.sync_search = first_skipped
                    self.scalars_changed = True
                return 0, 0
            if self.sync_search != n + 1:
                self.sync_search = n + 1
                self.scalars_changed = True
            return 0, 0
        self.sync_search = first_skipped if first_skipped >= 0 else r + 1
        return self._assign(node, r)

    def _assign(self, node: int, r: int) -> tuple[int, int]:
        self.recovering = r
        self.recoverer = node
        self.scalars_changed = True
        return 1, r

    def set_region_sync(self, node: int, r: int, in_sync: bool) -> int:
        if r >= self.region_count:
            return p.EINVAL
        if r == self.recovering:
            # Only the region being recovered ends the recovery (cmirrord reset it on any
            # report, which let a second recovery start while the first was still running).
            self.recovering = -1
            self.recoverer = -1
            self.scalars_changed = True
        if in_sync:
            if not self.sync[r]:
                self.sync[r] = 1
                self.sync_count += 1
                if self.sync_count >= self.region_count and not self.in_sync_override:
                    self.in_sync_override = True
                    self.scalars_changed = True
        else:
            self._lose_sync(r)
        return 0

    def is_remote_recovering(self, node: int, r: int) -> tuple[int, int, int]:
        """(error, is_recovering, hint).

        With other members, any out-of-sync region may be under recovery elsewhere, so writes
        to it wait (and the region jumps the recovery queue).  Alone, the kernel quiesces its
        own recovery against its own writes, so nothing is remote.
        """
        n = self.region_count
        if r >= n:
            return p.EINVAL, 0, 0
        if self.recovery_halted:
            return 0, 0, n
        # An orphan's kernel may be copying the region it was assigned: that is remote too.
        remote = self.recoverer in self.orphans or any(m != node for m in self.members)
        recovering = remote and not self.sync[r]
        if recovering and r != self.recovering and r not in self.priority:
            self.priority.append(r)
        return 0, int(recovering), self.hint()

    # ------------------------------------------------------------------ life cycle
    def presuspend(self) -> int:
        if not self.recovery_halted:
            self.recovery_halted = True
            self.scalars_changed = True
        return 0

    def postsuspend(self) -> int:
        self.resumed = False
        self.recovering = -1
        self.recoverer = -1
        self.scalars_changed = True
        return 0

    def resume(self) -> Resume:
        """RESUME: a no-op when already resumed (kernel retries, daemon reconnects)."""
        if self.resumed:
            return Resume.DONE
        if self.has_disk and not self.disk_loaded:
            return Resume.NEEDS_DISK
        self._finish_resume()
        return Resume.DONE

    def resume_member(self) -> None:
        """RESUME of a member that received the group's state: only this node's flags change
        (the search position and priority list are the group's, not this node's)."""
        self.resumed = True
        self.recovery_halted = False
        self.in_sync_override = False
        self.disk_loaded = True
        self.scalars_changed = True

    def rejoined_after_restart(self, resumed: bool, halted: bool, override: bool) -> None:
        """A restarted daemon received the group's state: its kernel did not resume, so this
        node's own flags stay what they were before the restart."""
        self.resumed = resumed
        self.recovery_halted = halted
        self.in_sync_override = override
        self.disk_loaded = True
        self.scalars_changed = True

    def _finish_resume(self) -> None:
        self.resumed = True
        self.recovery_halted = False
        self.in_sync_override = False
        # ``sync_count`` is kept exact, so a log wholly in sync has nothing to search (a
        # scan of a 2^32-region bitmap costs the event loop a noticeable pause).
        n = self.region_count
        self.sync_search = n + 1 if self.sync_count >= n else 0
        self.priority.clear()
        self.scalars_changed = True

    def load_disk(self, image_clean: bitarray | None, nr_regions: int, read_failed: bool) -> None:
        """Apply the on-disk log at the first RESUME (the kernel ``disk`` log's rules).

        ``image_clean`` holds the on-disk clean bits (None when the header was not valid);
        ``nr_regions`` the header's region count.  Regions the disk does not describe are new:
        clean and in sync with ``nosync``, otherwise dirty and out of sync.  A ``sync`` or
        ``nosync`` keyword re-initialises the log.  Everything on disk that is not clean is
        out of sync.  The whole log is written back afterwards.
        """
        n = self.region_count
        known = 0
        if read_failed:
            self.disk_failed = True
        elif image_clean is not None and self.config.sync is SyncMode.DEFAULT:
            known = min(nr_regions, n)
            self.clean[:known] = image_clean[:known]
        if known < n:
            self.clean[known:n] = 1 if self.config.sync is SyncMode.NOSYNC else 0
        self.sync[:n] = self.clean[:n]
        self.sync_count = self.sync.count(1, 0, n)
        self.holders.clear()
        self.disk_loaded = True
        self.full_write = True
        self._finish_resume()

    # ------------------------------------------------------------------ disk
    def take_disk_work(self) -> set[int] | bool | None:
        """What a flush must write: False (nothing), None (everything) or a set of chunks.

        The work is handed over: a failed write is reported with :meth:`disk_written`.
        """
        if not self.has_disk:
            return False
        self.marks_unwritten = False
        if self.full_write:
            self.full_write = False
            self.dirty_chunks = set()
            return None
        if not self.dirty_chunks:
            return False
        chunks, self.dirty_chunks = self.dirty_chunks, set()
        return chunks

    def take_disk_write(self) -> tuple[set[int] | bool | None, bool]:
        """:meth:`take_disk_work` and whether that write must be durable: it rewrites the
        whole unit or records a region going dirty (see the module's docstring)."""
        durable = self.full_write or self.marks_unwritten
        return self.take_disk_work(), durable

    def disk_written(self, ok: bool) -> int:
        if ok:
            return 0
        self.full_write = True  # whatever reached the device is unknown: rewrite it all
        if not self.disk_failed:
            self.disk_failed = True
            self.scalars_changed = True
        return p.EIO

    # ------------------------------------------------------------------ cluster hooks
    def node_departed(self, node: int) -> list[int]:
        """A member left without clearing its marks: its writes may have reached one leg only.

        Every region it held and nobody else holds loses sync (recovered later); a recovery
        it was running is handed out again.  Returns the regions that lost sync.
        """
        lost = self._release_as_lost(node)
        self.members.discard(node)
        self.orphans.discard(node)
        return lost

    def _release_as_lost(self, node: int) -> list[int]:
        """The marks of a kernel that is gone: its regions lose sync, its recovery is
        handed out again.  Returns the regions that lost sync."""
        lost: list[int] = []
        for r, h in list(self.holders.items()):
            if node in h:
                h.discard(node)
                if not h:
                    del self.holders[r]
                self._lose_sync(r)
                lost.append(r)
        if self.recoverer == node:
            self.recovering = -1
            self.recoverer = -1
            self.scalars_changed = True
        return lost

    def node_process_gone(self, node: int) -> int:
        """A member's daemon left its group while its node stays in the ring: its kernel may
        still be writing the regions it holds.  They stay held by ``node`` (dirty, sync bits
        as they are, never recovered), and so does a recovery it was running.  Returns how
        many regions it holds (0: nothing to keep, the node is not an orphan)."""
        self.members.discard(node)
        held = sum(1 for h in self.holders.values() if node in h)
        if held or self.recoverer == node:
            self.orphans.add(node)
        return held

    def load(self, snap: Snapshot) -> None:
        """Replace this replica's shared state with a peer's snapshot, after checking it:
        no held or out-of-sync region clean, no recovery or search position outside the log,
        no disk chunk past its end (raises :class:`SnapshotError`, leaving this replica as
        it was)."""
        n = self.region_count
        clean, sync = snap.clean, snap.sync
        if len(clean) < n or len(sync) < n:
            raise SnapshotError("snapshot bitmaps shorter than the log")
        if any(r >= n for r in snap.holders) or any(r >= n for r in snap.priority):
            raise SnapshotError("snapshot body inconsistent: regions beyond the log")
        scalars = Scalars(snap.sync_search, snap.recovering, snap.recoverer, *[False] * 5)
        if (
            any(clean[r] for r in snap.holders)
            or (clean[:n] & ~sync[:n]).any()
            or scalars_problem(n, scalars) is not None
            or any(c > (n - 1) >> CHUNK_SHIFT for c in snap.dirty_chunks)
        ):
            raise SnapshotError("snapshot state inconsistent")
        self.clean[:n] = clean[:n]
        self.sync[:n] = sync[:n]
        self.sync_count = self.sync.count(1, 0, n)
        self.holders = snap.holders
        self.orphans = snap.orphans
        self.priority = snap.priority
        self.dirty_chunks = snap.dirty_chunks
        self.sync_search = snap.sync_search
        self.recovering = snap.recovering
        self.recoverer = snap.recoverer
        self.disk_failed = snap.disk_failed
        self.full_write = snap.full_write
        self.in_sync_override = snap.in_sync_override
        self.scalars_changed = True

    def device_missing(self) -> None:
        """The log's device could not be opened at a restart: the log is failed (health D)
        until the device is back at a resume."""
        self.disk_failed = True

    def marks_of(self, node: int) -> list[int]:
        """The regions ``node`` holds a mark on, in order (what it may be writing)."""
        return sorted(r for r, nodes in self.holders.items() if node in nodes)

    @staticmethod
    def without_quorum(
        batch: Sequence[_Op],
        *,
        kind: Callable[[_Op], str],
        regions: Callable[[_Op], Sequence[int]],
        narrowed: Callable[[_Op, tuple[int, ...]], _Op],
    ) -> tuple[list[_Op], list[_Op]]:
        """What a member without quorum may send of ``batch`` (in order), and what it holds.

        A member without quorum never makes a region clean: its CLEARs are held back.  A
        later MARK of a held region (a new write) cancels that region's CLEAR: sent after the
        MARK, it would clear the region while the new write is in flight.  ``kind`` names an
        op ``"clear"``, ``"mark"`` (a MARK or a FLUSH with marks) or anything else,
        ``regions`` gives its regions and ``narrowed`` rebuilds a CLEAR for fewer regions."""
        held: list[_Op] = []
        sent: list[_Op] = []
        for op in batch:
            what = kind(op)
            if what == "clear":
                held.append(op)
                continue
            if held and what == "mark" and regions(op):
                marked = set(regions(op))
                held = [narrowed(h, tuple(r for r in regions(h) if r not in marked)) for h in held]
                held = [h for h in held if regions(h)]
            sent.append(op)
        return sent, held

    def set_members(self, nodes: Iterable[int]) -> None:
        """The nodes with a member in the group now (an orphan that is a member again is one
        no more only through :meth:`node_rejoined`)."""
        self.members = set(nodes)

    def node_rejoined(self, node: int, mode: Rejoin, regions: Sequence[int]) -> list[int]:
        """A new daemon of ``node`` holds the group's state again and tells what its kernel
        holds: ``REPLACE`` — exactly ``regions`` (from its state file; marks it no longer
        holds are cleared), ``UNION`` — at least ``regions`` (nothing is released), ``FRESH``
        — its kernel is new (the node rebooted): the old marks belong to a kernel that is gone
        and their regions lose sync, as at a departure.  Returns the regions that lost sync."""
        lost: list[int] = []
        if mode is Rejoin.FRESH:
            lost = self._release_as_lost(node)
        elif self.check_regions(regions):
            return lost  # a malformed list changes nothing (the sender's bug, not ours)
        else:
            keep = set(regions)
            if mode is Rejoin.REPLACE:
                stale = [r for r, h in self.holders.items() if node in h and r not in keep]
                self.clear(node, stale)
            self.mark(node, sorted(keep))
        self.orphans.discard(node)
        self.members.add(node)
        if node == self.local_node and mode is Rejoin.UNION:
            # A kernel that reconnected to a log without state: what the group says it held
            # is what it may be writing.  (``mine`` only grows here: acknowledgements made
            # since this message was sent are newer than it.)
            for r, h in self.holders.items():
                if node in h:
                    self.mine[r] = 1
        return lost

    def merge_from(self, sides: Sequence[tuple[RegionLog, Collection[int]]]) -> list[int]:
        """Combine the replicas of partitions that merged, alike in any order.  ``sides``
        holds each side's replica (this one's among them) with the node ids that held state
        on that side:

        * a node's mark references come only from the side it was on: that side applied every
          MARK and CLEAR it sent, any other side's copy is old (a node whose corosync died
          comes back with a replica that still shows marks cleared since);
        * a node on no side has left the merged group: every region a side says it holds
          loses sync, as at any departure;
        * a region is in sync only if every side says so, and clean only if it is in sync,
          nobody holds it, and every side says it is clean or would become clean once its
          holders there clear it (held and in sync);
        * a recovery assignment survives only if every side agrees and its node is on a
          side; the priority lists unite.

        Returns the regions that lost sync in this replica.  The whole disk log is rewritten
        afterwards."""
        n = self.region_count
        on_side = {node for _, nodes in sides for node in nodes}
        sync = bitarray(n, endian="little")
        sync.setall(1)
        clean = sync.copy()
        holders: dict[int, set[int]] = {}
        orphaned: set[int] = set()  # regions held by a node on no side
        assignments = set()
        # A node on no side whose daemon some side saw go while the node stayed in the ring
        # is an orphan, not a departed node: its live kernel's marks stay (from the sides
        # that call it an orphan), until it rejoins or leaves the ring.
        orphans = {o for other, _ in sides for o in other.orphans} - on_side
        for other, nodes in sides:
            sync &= other.sync[:n]
            settled = other.clean[:n]
            for region, held_by in other.holders.items():
                if other.sync[region]:
                    settled[region] = 1  # clean once its holders clear it
                for node in held_by:
                    if node in nodes or (node in orphans and node in other.orphans):
                        holders.setdefault(region, set()).add(node)
                    elif node not in on_side and node not in orphans:
                        orphaned.add(region)
            clean &= settled
            assignments.add((other.recovering, other.recoverer))
        for region in orphaned:
            sync[region] = 0
        clean &= sync
        for region in holders:
            clean[region] = 0
        lost = sorted((self.sync[:n] & ~sync).search(1))
        self.sync[:n] = sync
        self.clean[:n] = clean
        self.holders = holders
        self.sync_count = sync.count(1)
        self.sync_search = min(
            [other.sync_search for other, _ in sides] + sorted(orphaned)[:1], default=0
        )
        recovering, recoverer = assignments.pop() if len(assignments) == 1 else (-1, -1)
        if recoverer not in on_side and recoverer not in orphans:
            recovering, recoverer = -1, -1
        self.orphans = orphans
        self.recovering, self.recoverer = recovering, recoverer
        self.priority = sorted({r for other, _ in sides for r in other.priority})
        self.disk_failed = any(other.disk_failed for other, _ in sides)
        self.in_sync_override = all(other.in_sync_override for other, _ in sides)
        self.full_write = self.has_disk
        self.scalars_changed = True
        return lost

    def rewrite_whole_log(self) -> None:
        """The disk server changed (or partitions merged): what reached the device is
        unknown, so the next write covers the whole log and nothing else is pending."""
        self.full_write = self.has_disk
        self.take_disk_work()

    def reread_disk_at_resume(self) -> None:
        """The next RESUME reads the on-disk log again (others wrote it while this node was
        away from the group)."""
        if self.has_disk:
            self.disk_loaded = False

    def lose_all_sync(self) -> list[int]:
        """Nothing about the legs can be trusted (a partition's writers vanished unseen):
        every region is out of sync and not clean; recovery starts from the beginning.
        Returns the regions that were in sync."""
        n = self.region_count
        lost = list(self.sync[:n].search(1))
        self.sync[:n] = 0
        self.clean[:n] = 0
        self.sync_count = 0
        self.sync_search = 0
        self.recovering = -1
        self.recoverer = -1
        self.full_write = self.has_disk
        self.scalars_changed = True
        return lost

    # ------------------------------------------------------------------ status
    def health(self) -> str:
        return "D" if self.disk_failed else "A"

    def status_info(self) -> str:
        word = self.config.type_word
        if self.has_disk:
            return f"3 {word} {self.device_id} {self.health()}"
        return f"1 {word}"

    def status_table(self) -> str:
        c = self.config
        sync = f"{c.sync.value} " if c.sync is not SyncMode.DEFAULT else ""
        if c.clustered:
            dev = f"{self.device_id} " if c.has_disk else ""
            block = "block_on_error" if c.block_on_error else ""
            return f"{c.type_word} {dev}{c.region_size} {sync}{block} "
        count = (2 if c.has_disk else 1) + (1 if sync else 0)
        dev = f"{self.device_id} " if c.has_disk else ""
        return f"{c.type_word} {count} {dev}{c.region_size} {sync}"

    def describe(self) -> str:
        """One line for logs and SIGUSR1 dumps."""
        marked = len(self.holders)
        orphans = ",".join(
            f"{o}:{sum(1 for h in self.holders.values() if o in h)}" for o in sorted(self.orphans)
        )
        return (
            f"{self.config.type_word} regions={self.region_count} size={self.config.region_size}"
            f" in_sync={self.sync_count}/{self.region_count} marked={marked}"
            f" recovering={self.recovering}@{self.recoverer} search={self.sync_search}"
            f" resumed={int(self.resumed)} halted={int(self.recovery_halted)}"
            f" override={int(self.in_sync_override)} disk={self.health() if self.has_disk else '-'}"
            + (f" orphans={orphans}" if orphans else "")
        )
