"""The dm-log-userspace vocabulary and byte formats (no state)."""
