"""``dm-ulogd replay``: the command line of the replay tool (:mod:`ulogd.ops.replay`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from ulogd.ops.replay import replay
from ulogd.ops.replay_report import EXIT_UNREADABLE, parse_until
from ulogd.protocol import wire


# ----------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dm-ulogd replay`` options (called by :mod:`ulogd.ops.cli`)."""
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="capture file (pcapng/pcap, LINKTYPE_NETLINK); several files are successive "
        "daemons of one kernel (e.g. before and after a restart)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    parser.add_argument(
        "--until",
        metavar="N|TIME",
        help="stop after packet N (of the last file), after TIME seconds ('12.5s') from the "
        "first packet, or at an ISO 8601 date-time",
    )
    parser.add_argument("--log", metavar="UUID", help="replay only this log (uuid or its tail)")
    parser.add_argument(
        "--protocol",
        default=wire.CURRENT.name,
        choices=sorted(wire.LAYOUTS),
        help="request layout the capture uses (default current)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=20,
        metavar="N",
        help="details shown per section of the readable report (default 20; --json has all)",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="show the replayed server's own log lines"
    )


def run_cli(args: argparse.Namespace) -> int:
    """``dm-ulogd replay``: returns the exit status."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.CRITICAL,
        format="  | %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    quiet = logging.getLogger("ulogd")
    level = quiet.level
    if not args.verbose:
        quiet.setLevel(logging.CRITICAL)
    try:
        return _run_cli(args)
    finally:
        quiet.setLevel(level)  # called in-process too (tests): leave logging as it was


def _run_cli(args: argparse.Namespace) -> int:
    try:
        until = parse_until(args.until) if args.until else None
    except ValueError as exc:
        print(f"dm-ulogd replay: {exc}", file=sys.stderr)
        return 2
    for name in args.files:
        # A file that is not there is one line, not an empty report of a "damaged" capture.
        try:
            os.stat(name)
        except FileNotFoundError:
            print(f"dm-ulogd replay: {name}: no such file", file=sys.stderr)
            return EXIT_UNREADABLE
    report = replay(
        args.files, layout=wire.LAYOUTS[args.protocol], log_filter=args.log, until=until
    )
    text = (
        json.dumps(report.to_json(), indent=1) + "\n"
        if args.json
        else report.render(limit=args.limit)
    )
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if report.error is not None:
        print(f"dm-ulogd replay: {report.error_file}: {report.error}", file=sys.stderr)
    return report.exit_status
