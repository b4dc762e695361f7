"""corosync's ``cs_error_t`` codes and the exceptions the bindings raise.

Every libcpg / libquorum call returns a ``cs_error_t``.  :func:`check` turns anything but
``CS_OK`` into a :class:`CpgError` (or a subclass) whose ``code`` is a :class:`CsError` member,
so callers can test ``err.code is CsError.CS_ERR_TRY_AGAIN`` and logs read
``cpg_join: CS_ERR_EXIST (14)``.  Codes unknown to this table (a newer corosync) are kept as
plain ints rather than hidden.
"""

from __future__ import annotations

import enum


class CsError(enum.IntEnum):
    """``cs_error_t`` from ``corosync/corotypes.h`` (values checked by the header self-check)."""

    CS_OK = 1
    CS_ERR_LIBRARY = 2
    CS_ERR_VERSION = 3
    CS_ERR_INIT = 4
    CS_ERR_TIMEOUT = 5
    CS_ERR_TRY_AGAIN = 6
    CS_ERR_INVALID_PARAM = 7
    CS_ERR_NO_MEMORY = 8
    CS_ERR_BAD_HANDLE = 9
    CS_ERR_BUSY = 10
    CS_ERR_ACCESS = 11
    CS_ERR_NOT_EXIST = 12
    CS_ERR_NAME_TOO_LONG = 13
    CS_ERR_EXIST = 14
    CS_ERR_NO_SPACE = 15
    CS_ERR_INTERRUPT = 16
    CS_ERR_NAME_NOT_FOUND = 17
    CS_ERR_NO_RESOURCES = 18
    CS_ERR_NOT_SUPPORTED = 19
    CS_ERR_BAD_OPERATION = 20
    CS_ERR_FAILED_OPERATION = 21
    CS_ERR_MESSAGE_ERROR = 22
    CS_ERR_QUEUE_FULL = 23
    CS_ERR_QUEUE_NOT_AVAILABLE = 24
    CS_ERR_BAD_FLAGS = 25
    CS_ERR_TOO_BIG = 26
    CS_ERR_NO_SECTIONS = 27
    CS_ERR_CONTEXT_NOT_FOUND = 28
    CS_ERR_TOO_MANY_GROUPS = 30
    CS_ERR_SECURITY = 100


#: Codes meaning "the connection to the local corosync is gone": the handle is dead and a new
#: one must be opened once corosync is back.
CONNECTION_LOST = frozenset({CsError.CS_ERR_LIBRARY, CsError.CS_ERR_BAD_HANDLE})


def code_name(code: int) -> str:
    """``CS_ERR_TRY_AGAIN`` for 6; ``cs_error_t(99)`` for a code not in the table."""
    try:
        return CsError(code).name
    except ValueError:
        return f"cs_error_t({code})"


class CpgError(Exception):
    """A corosync client call failed.

    ``code`` is the :class:`CsError` member (or the raw int for an unknown code), ``op`` the
    C function that returned it.
    """

    def __init__(self, code: int, op: str, detail: str = "") -> None:
        try:
            self.code: CsError | int = CsError(code)
        except ValueError:
            self.code = code
        self.op = op
        self.detail = detail
        text = f"{op}: {code_name(code)} ({int(code)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)

    @property
    def name(self) -> str:
        """The symbolic code name, e.g. ``CS_ERR_TRY_AGAIN``."""
        return code_name(int(self.code))

    @property
    def connection_lost(self) -> bool:
        """True when the local corosync is unreachable through this handle."""
        return self.code in CONNECTION_LOST


class MessageTooLarge(CpgError):
    """A message longer than ``cpg_max_atomic_msgsize`` was refused before reaching libcpg.

    libcpg would fragment it and block inside ``cpg_mcast_joined``; the cluster layer chunks
    large checkpoints itself instead.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            CsError.CS_ERR_TOO_BIG,
            "cpg_mcast_joined",
            f"message of {size} bytes exceeds max_atomic_msgsize {limit}; chunk it",
        )


class QuorumError(CpgError):
    """A libquorum call failed (same codes as :class:`CpgError`)."""


def check(rc: int, op: str, error: type[CpgError] = CpgError) -> None:
    """Raise *error* for any return code but ``CS_OK``."""
    if rc != CsError.CS_OK:
        raise error(rc, op)
