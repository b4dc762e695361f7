"""One log's state, every rule that changes it, and its persistent forms."""
