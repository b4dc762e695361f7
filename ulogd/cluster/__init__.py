"""Clustered logs: each log's state replicated over a corosync closed process group.

``messages`` (the codec), ``checkpoint`` (state snapshots for joiners) and ``group`` (the
per-log replica state machine) are pure; ``node`` wires them to ``cpg`` handles and the server.
"""
