"""ulogd: a userspace dirty-log server for device-mapper mirrors (dm-log-userspace)."""

__version__ = "0.1.0"
