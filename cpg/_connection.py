"""What every corosync client connection here shares: its life cycle around one C handle."""

from __future__ import annotations

import contextlib
from typing import Any


class Connection:
    """Context manager, idempotent close on garbage collection, ``is_open``.

    Subclasses set ``self._h`` (the C handle, None when closed) and implement ``close()``.
    """

    _h: int | None = None

    def close(self) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def finalize(self) -> None:
        self.close()

    def __enter__(self) -> Any:
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
