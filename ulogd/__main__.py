"""``python -m ulogd``: the same as the ``ulogd`` command."""

from ulogd.cli import main

raise SystemExit(main())
