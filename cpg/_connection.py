"""What every corosync client connection here shares: its life cycle around one C handle.

:class:`Connection` holds the C handle (``_h``, None when closed), the descriptor the event
loop polls (``_fd``) and the loaded library (``_lib``), and does for every service alike what
does not depend on the service: the context manager and the close on garbage collection,
:meth:`fileno`, the check that the handle is open, :meth:`dispatch` (callbacks run inside it;
an exception a callback raised is re-raised here, outside the C frames) and losing the local
corosync, which is not an exception: the connection closes itself and ``on_lost(Lost)`` gets
the closed descriptor to unregister.  A subclass names its service (``_service``, whose
``<service>_dispatch`` the library exports) and error class (``_error``), and implements
:meth:`close`; :meth:`_unsent` and :meth:`_dispatched` are its hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar, Self

from .errors import CONNECTION_LOST, CpgError, CsError
from .events import Lost

CS_DISPATCH_ALL = 2


class Connection:
    """Context manager, idempotent close on garbage collection, ``is_open``, ``fileno``,
    ``dispatch`` and the loss of the local corosync (see the module docstring)."""

    _service: ClassVar[str] = "cpg"
    _error: ClassVar[type[CpgError]] = CpgError
    _h: int | None = None
    _fd: int = -1
    _lib: Any = None
    _cb_error: BaseException | None = None
    on_lost: Callable[[Lost], object] | None = None
    lost: Lost | None = None

    def close(self) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def finalize(self) -> None:
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_h", None) is not None:
            with contextlib.suppress(Exception):  # interpreter shutdown
                self.close()

    @property
    def is_open(self) -> bool:
        return self._h is not None

    def _handle(self) -> int:
        if self._h is None:
            raise self._error(CsError.CS_ERR_BAD_HANDLE, self._service, "handle is closed")
        return self._h

    def _unsent(self) -> int:
        """Messages still queued when the connection is lost (dropped with it)."""
        return 0

    def _lose(self, op: str, code: int) -> None:
        unsent, fd = self._unsent(), self._fd
        self.close()
        try:
            value: CsError | int = CsError(code)
        except ValueError:
            value = code
        self.lost = Lost(op, value, unsent, fd)
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def fileno(self) -> int:
        """The fd to poll for readability (HUP means: dispatch now, corosync is gone)."""
        self._handle()
        return self._fd

    def dispatch(self) -> bool:
        """Run all pending callbacks (then :meth:`_dispatched`).

        Returns False when the connection is (now) lost: ``on_lost`` has been called and the fd
        must be unregistered.  Exceptions raised by callbacks are re-raised here.
        """
        if self._h is None:
            return False
        op = f"{self._service}_dispatch"
        rc = getattr(self._lib, op)(self._h, CS_DISPATCH_ALL)
        error, self._cb_error = self._cb_error, None
        if rc in CONNECTION_LOST:
            self._lose(op, rc)
            if error is not None:
                raise error
            return False
        if rc not in (CsError.CS_OK, CsError.CS_ERR_TRY_AGAIN):
            raise self._error(rc, op)
        if error is not None:
            raise error
        self._dispatched()
        return self._h is not None

    def _dispatched(self) -> None:
        """After a dispatch that kept the connection (the CPG handle flushes its queue)."""
