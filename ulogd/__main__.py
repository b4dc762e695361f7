"""``python -m ulogd``: the same as the ``ulogd`` command."""

from ulogd.ops.cli import main

raise SystemExit(main())
