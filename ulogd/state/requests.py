"""One row per request type: what each request means, for every path that serves it (pure).

Theory of operation
-------------------
A request's meaning is written once, in :data:`OPERATIONS`, and read by the single-node path
(:class:`ulogd.engine.server.Server`), the cluster path (:class:`ulogd.cluster.group.Group`, which
applies the same row at delivery with the originator's node id), the replay tool and the
fuzz targets.  A row (:class:`Operation`) names:

* ``decode`` — the payload codec: the request's payload as a sequence of ints (a cluster
  ``OpRecord`` carries exactly these values);
* ``check`` — the refusal decided before anything changes or is ordered (a region beyond the
  log's end: ``-EINVAL``), or None;
* ``acknowledge`` — what this node's kernel is known to hold once the request is acknowledged
  (:meth:`RegionLog.kernel_marked` / :meth:`RegionLog.kernel_cleared`), or None;
* ``apply`` — the :class:`~ulogd.state.regionlog.RegionLog` operation and the reply codec:
  ``(rl, node, values) -> (error, reply payload)``; None for the life-cycle requests (CTR,
  DTR, PRESUSPEND, POSTSUSPEND, RESUME), which open devices, join groups and read disks, and
  which the engine serves itself;
* ``ordered`` — the request changes replicated state: a clustered log orders it through its
  group (unless the member is alone); ``at_once`` — ordered, but acknowledged at submission
  (MARK and CLEAR ride in the next batch; the kernel writes nothing before its FLUSH returns);
* ``writes_disk`` — the log's changed disk chunks are written before the reply (FLUSH);
* ``local`` — an ordered request the member answers from its own replica when this holds
  (IS_REMOTE_RECOVERING of a presuspended log: its recovery is not running).

Every state rule stays in :class:`RegionLog`; a row only says which rule a request invokes and
how its payload and reply are spelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ulogd.protocol import spec as p
from ulogd.protocol.spec import PAIR, S64, U64
from ulogd.protocol.spec import RequestType as T
from ulogd.state.regionlog import RegionLog

Values = Sequence[int]

#: the payload codec of a request without a payload: its (empty) bytes as a tuple, ()
_nothing: Callable[[bytes], Values] = tuple
#: the payload codec of a one-region request (the bound method of the struct: no Python frame)
_one_region: Callable[[bytes], Values] = U64.unpack
#: the RegionLog rules a row names directly (unbound methods: no wrapper on the hot path)
_check_regions = RegionLog.check_regions
_kernel_marked = RegionLog.kernel_marked
_kernel_cleared = RegionLog.kernel_cleared
Result = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class Operation:
    """One request type's row (see the module docstring)."""

    type: T
    decode: Callable[[bytes], Values]
    apply: Callable[[RegionLog, int, Values], Result] | None = None
    check: Callable[[RegionLog, Values], int] | None = None
    acknowledge: Callable[[RegionLog, Values], None] | None = None
    ordered: bool = False
    at_once: bool = False
    writes_disk: bool = False
    local: Callable[[RegionLog], bool] | None = None


def _region_sync(data: bytes) -> Values:
    region, in_sync = p.REGION_SYNC.unpack(data)
    return (region, 1 if in_sync else 0)


def _first_in_range(rl: RegionLog, values: Values) -> int:
    return p.EINVAL if values[0] >= rl.region_count else 0


def _get_region_size(rl: RegionLog, _node: int, _values: Values) -> Result:
    return 0, U64.pack(rl.config.region_size)


def _is_clean(rl: RegionLog, _node: int, values: Values) -> Result:
    err, value = rl.is_clean(values[0])
    return err, S64.pack(value)


def _in_sync(rl: RegionLog, _node: int, values: Values) -> Result:
    err, value = rl.in_sync(values[0])
    return err, S64.pack(value)


def _flush(rl: RegionLog, node: int, values: Values) -> Result:
    return rl.flush(node, values), b""


def _mark(rl: RegionLog, node: int, values: Values) -> Result:
    return rl.mark(node, values), b""


def _clear(rl: RegionLog, node: int, values: Values) -> Result:
    return rl.clear(node, values), b""


def _get_resync_work(rl: RegionLog, node: int, _values: Values) -> Result:
    return 0, PAIR.pack(*rl.get_resync_work(node))


def _set_region_sync(rl: RegionLog, node: int, values: Values) -> Result:
    return rl.set_region_sync(node, values[0], bool(values[1])), b""


def _get_sync_count(rl: RegionLog, _node: int, _values: Values) -> Result:
    return 0, U64.pack(rl.sync_count)


def _status_info(rl: RegionLog, _node: int, _values: Values) -> Result:
    return 0, rl.status_info().encode() + b"\0"


def _status_table(rl: RegionLog, _node: int, _values: Values) -> Result:
    return 0, rl.status_table().encode() + b"\0"


def _is_remote_recovering(rl: RegionLog, node: int, values: Values) -> Result:
    err, recovering, hint = rl.is_remote_recovering(node, values[0])
    return err, PAIR.pack(recovering, hint)


def _recovery_halted(rl: RegionLog) -> bool:
    return rl.recovery_halted


_ROWS = (
    # life cycle: served by the engine
    Operation(T.CTR, _nothing),
    Operation(T.DTR, _nothing),
    Operation(T.PRESUSPEND, _nothing),
    Operation(T.POSTSUSPEND, _nothing),
    Operation(T.RESUME, _nothing),
    # queries of this node's replica
    Operation(T.GET_REGION_SIZE, _nothing, _get_region_size),
    Operation(T.IS_CLEAN, _one_region, _is_clean),
    Operation(T.IN_SYNC, _one_region, _in_sync),
    Operation(T.GET_SYNC_COUNT, _nothing, _get_sync_count),
    Operation(T.STATUS_INFO, _nothing, _status_info),
    Operation(T.STATUS_TABLE, _nothing, _status_table),
    # changes of replicated state: ordered through the group
    Operation(
        T.MARK_REGION, p.regions, _mark, _check_regions, _kernel_marked, ordered=True, at_once=True
    ),
    Operation(
        T.CLEAR_REGION,
        p.regions,
        _clear,
        _check_regions,
        _kernel_cleared,
        ordered=True,
        at_once=True,
    ),
    Operation(
        T.FLUSH, p.regions, _flush, _check_regions, _kernel_marked, ordered=True, writes_disk=True
    ),
    Operation(T.GET_RESYNC_WORK, _nothing, _get_resync_work, ordered=True),
    Operation(T.SET_REGION_SYNC, _region_sync, _set_region_sync, _first_in_range, ordered=True),
    Operation(
        T.IS_REMOTE_RECOVERING,
        _one_region,
        _is_remote_recovering,
        _first_in_range,
        ordered=True,
        local=_recovery_halted,
    ),
)

#: request type → its row; every type of :data:`ulogd.protocol.spec.SPECS` has one
OPERATIONS: dict[int, Operation] = {int(row.type): row for row in _ROWS}

#: the request types a clustered log orders through its group
ORDERED: frozenset[int] = frozenset(t for t, row in OPERATIONS.items() if row.ordered)

assert OPERATIONS.keys() == p.SPECS.keys(), "a request type without its row"
