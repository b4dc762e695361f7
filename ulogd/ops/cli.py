"""Command line: ``dm-ulogd run`` and friends (argument parsing and process set-up only)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ulogd import __version__
from ulogd.protocol import wire

#: The installed command (not "ulogd": that is netfilter's logging daemon on root's PATH).
PROG = "dm-ulogd"
DEFAULT_RUN_DIR = "/run/dm-ulogd"
EXIT_USAGE = 2
EXIT_SETUP = 3

log = logging.getLogger("ulogd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Userspace dirty-log server for device-mapper mirrors (dm-log-userspace).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="serve the kernel's dm-log-userspace requests")
    run.add_argument("--foreground", "-f", action="store_true", help="do not detach; log to stderr")
    run.add_argument(
        "--config",
        metavar="FILE",
        help="TOML configuration (default /etc/dm-ulogd/dm-ulogd.toml if it exists); flags "
        "override it",
    )
    run.add_argument(
        "--run-dir",
        default=None,
        type=Path,
        help=f"pid file and live log state (default {DEFAULT_RUN_DIR}; must not outlive a "
        "reboot: use tmpfs)",
    )
    run.add_argument("--capture", metavar="FILE", help="record every request and reply (pcapng)")
    run.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default info)",
    )
    run.add_argument(
        "--transport",
        default=None,
        metavar="SPEC",
        help="'netlink' (the kernel, default) or 'unix:PATH' (test transport: kernel-format "
        "datagrams over a root-only Unix socket)",
    )
    run.add_argument(
        "--protocol",
        default=wire.CURRENT.name,
        choices=sorted(wire.LAYOUTS),
        help="request layout: 'current' (protocol 1-3, 160-byte header) or 'legacy-2009' "
        "(the original 152-byte header without luid/version)",
    )
    run.add_argument(
        "--node-id",
        type=int,
        default=None,
        help="this node's id in region-mark bookkeeping (single node: any; default 0)",
    )
    run.add_argument(
        "--cluster",
        choices=["off", "corosync"],
        default=None,
        help="cluster mode (default off)",
    )
    run.add_argument(
        "--poll",
        metavar="MODE",
        default=None,
        help="after a reply keep polling the socket: 'off' (default), 'adaptive' or a fixed "
        "budget in microseconds ('250'); see dm-ulogd(8) and docs/operations.rst",
    )
    run.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics over HTTP on this loopback address (default: off)",
    )

    status = commands.add_parser(
        "status", help="show the running daemon's logs (talks to its control socket; root only)"
    )
    status.add_argument(
        "--run-dir",
        default=None,
        type=Path,
        help=f"the daemon's run directory (default: from the configuration, else "
        f"{DEFAULT_RUN_DIR})",
    )
    status.add_argument("--config", metavar="FILE", help="read run_dir from this configuration")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    status.add_argument(
        "--watch", "-w", action="store_true", help="redraw with a resync progress bar"
    )
    status.add_argument(
        "--interval", type=float, default=1.0, help="seconds between redraws (default 1)"
    )
    status.add_argument("--count", type=int, default=None, help="stop after this many redraws")
    status.add_argument(
        "--wide", action="store_true", help="show whole uuids (default: LVM-...a1b2c3d4)"
    )

    from ulogd.ops import tablegen

    table = commands.add_parser(
        "table",
        help="print (or --create) the dmsetup table of a mirror with a ulogd-served log",
        description="Print the device-mapper table line of a mirror whose dirty log is served "
        "by ulogd (dm-log-userspace).",
    )
    tablegen.add_arguments(table)

    from ulogd.ops import replay_cli

    replay_cli.add_arguments(
        commands.add_parser(
            "replay",
            help="dry-run a capture through this ulogd and compare its answers",
            description="Feed every recorded kernel request to a fresh ulogd core and compare "
            "each answer with the recorded one.  Exit status: 0 all agree, 1 mismatch, "
            "4 capture unreadable or missing, 5 --log matched no log.",
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "run":
        return cmd_run(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command == "table":
        from ulogd.ops import tablegen

        return tablegen.main(args)
    if args.command == "replay":
        from ulogd.ops import replay_cli

        return replay_cli.run_cli(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def setup_logging(level: str, foreground: bool) -> None:
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    handler: logging.Handler
    if _stderr_is_journal():
        # Started by systemd with stderr connected to journald: no timestamp of our own, and a
        # sd-daemon(3) priority prefix so that journalctl -p works.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JournalFormatter("%(levelname)s: %(message)s"))
    elif foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {PROG} %(levelname)s: %(message)s"))
    else:
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(f"{PROG}[%(process)d]: %(levelname)s: %(message)s"))
    root.handlers[:] = [handler]


class _JournalFormatter(logging.Formatter):
    _PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{self._PRIORITY.get(record.levelname, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def _stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal ($JOURNAL_STREAM is its dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def cmd_status(args: argparse.Namespace) -> int:
    from ulogd.ops import config, status

    run_dir = args.run_dir
    if run_dir is None:
        try:
            run_dir = config.resolve(args.config, {}).run_dir
        except config.ConfigError as exc:
            print(f"dm-ulogd status: configuration: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.interval <= 0:
        print("dm-ulogd status: --interval must be positive", file=sys.stderr)
        return EXIT_USAGE
    if args.count is not None and args.count < 1:
        print("dm-ulogd status: --count must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    return status.main(str(run_dir), args.json, args.watch, args.interval, args.count, args.wide)


_SETTINGS = (
    "run_dir",
    "log_level",
    "capture",
    "transport",
    "node_id",
    "cluster",
    "metrics_listen",
    "poll",
)


def cmd_run(args: argparse.Namespace) -> int:
    from ulogd.ops import config

    try:
        settings = config.resolve(args.config, {k: getattr(args, k) for k in _SETTINGS})
        if settings.metrics_listen:
            config.parse_listen(settings.metrics_listen)
    except (config.ConfigError, ValueError) as exc:
        print(f"{PROG}: configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name in _SETTINGS:
        setattr(args, name, getattr(settings, name))
    args.settings = settings
    setup_logging(args.log_level, args.foreground)
    if settings.source == str(config.PREVIOUS_PATH):
        log.warning(
            "read %s, the configuration file of ulogd's old name: move it to %s",
            config.PREVIOUS_PATH,
            config.DEFAULT_PATH,
        )
    elif args.config is None and config.PREVIOUS_PATH.exists():
        log.warning(
            "%s (ulogd's old name) says what %s says and is no longer needed: remove it",
            config.PREVIOUS_PATH,
            config.DEFAULT_PATH,
        )
    ready_fd = None if args.foreground else _detach()
    _raise_fd_limit()
    try:
        daemon = _build_daemon(args)
        try:
            daemon.announce_ready()
        except Exception:
            daemon.server.close()
            raise
    except Exception as exc:
        log.error("cannot start: %s", exc)
        _report(ready_fd, f"error: {exc}")
        return EXIT_SETUP
    _report(ready_fd, "ready")
    daemon.run()
    return 0


def _raise_fd_limit() -> None:
    """Each log holds one descriptor (its state file's mapping): take the hard limit as the
    soft one (the loop uses epoll, so descriptors past 1024 are fine)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < 16 + SUPPORTED_LOGS:
        log.warning(
            "descriptor limit %d: fewer than the %d logs ulogd supports can be created "
            "(each holds one descriptor); raise LimitNOFILE / ulimit -n",
            soft,
            SUPPORTED_LOGS,
        )


#: logs per daemon the documentation promises (docs/operations.rst, "Limits")
SUPPORTED_LOGS = 10_000
#: state files from this size on are built and counted off the event loop
OFFLOAD_BYTES = 1 << 20


def _build_daemon(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ulogd.edges import blockdev
    from ulogd.edges.daemon import Daemon
    from ulogd.edges.transport import open_transport
    from ulogd.engine.actions import DeviceError, LogDevice
    from ulogd.engine.server import Server
    from ulogd.ops import config
    from ulogd.state import disklog, statefile
    from ulogd.state.statefile import StateDir

    layout = wire.LAYOUTS[args.protocol]
    run_dir: Path = args.run_dir
    _make_run_dir(run_dir)
    node_dir = run_dir / "dev"
    if run_dir == config.DEFAULT_RUN_DIR:
        # An upgrade across the rename with mirrors loaded: continue from the old run dir.
        imported = statefile.import_previous(config.PREVIOUS_RUN_DIR / "logs", run_dir / "logs")
        if imported:
            log.warning(
                "imported %d log state file(s) from %s (the run directory of ulogd's old name); "
                "it is no longer used and can be removed",
                imported,
                config.PREVIOUS_RUN_DIR,
            )

    def open_device(arg: str) -> LogDevice:
        try:
            dev = blockdev.resolve(arg, node_dir=str(node_dir))
            return disklog.DiskLogDevice.open(dev.path)
        except OSError as exc:
            raise DeviceError(exc.errno or 5, str(exc)) from exc

    clustered = args.cluster == "corosync"
    node_id = args.node_id or 0
    if clustered:
        from ulogd.edges.corosync import local_nodeid

        try:
            node_id = local_nodeid()
        except Exception as exc:
            raise RuntimeError(
                f"cluster = 'corosync' needs a running corosync ({exc}); start corosync first, "
                "or run with cluster = 'off' for single-node logs"
            ) from exc
        log.info("cluster mode: corosync node id %d; clustered-* logs join process groups",
                 node_id)  # fmt: skip
    else:
        log.info("cluster mode off: clustered-* logs are served as single-node logs")
    server = Server(
        state_dir=StateDir(run_dir / "logs"),
        open_device=open_device,
        local_node=node_id,
        layout=layout,
        cluster=clustered,
        member_pid=os.getpid(),
        offload_bytes=OFFLOAD_BYTES,
    )
    capture = None
    daemon_box: list[Daemon] = []
    try:
        transport = open_transport(args.transport, reply_seq_offset=layout.offsets["seq"])
        from ulogd.edges.poll import PollSetting

        poll = PollSetting.parse(getattr(args, "poll", None) or "off")
        daemon = Daemon(server, transport, run_dir=run_dir, poll=poll)
        daemon_box.append(daemon)
        daemon.lock_run_dir()
        from ulogd.ops.control import attach_services

        # Before restore(), so that errors about restored logs reach ``dm-ulogd status``.
        attach_services(daemon, run_dir, getattr(args, "settings", None))
        assert server.state_dir is not None
        restored = server.restore(server.state_dir.load_all())
        if args.capture:
            from ulogd.edges.capture import CaptureWriter

            capture = CaptureWriter(args.capture)
            daemon.capture = capture
        if clustered:
            from ulogd.edges.corosync import CorosyncLink

            def register(fd: int, callback: Callable[[], None] | None) -> None:
                if callback is None:
                    daemon.remove_fd(fd)
                else:
                    daemon.add_reader(fd, callback)

            settings = getattr(args, "settings", None)
            link = CorosyncLink(
                server,
                daemon.execute,
                register,
                require_quorum=bool(getattr(settings, "require_quorum", True)),
                metrics=daemon.metrics,
            )
            daemon.cluster = link
            daemon.at_shutdown(link.close)
        # Restored clustered logs rejoin their groups before they answer anything; huge
        # restored logs are counted by a worker thread.
        daemon.execute(restored)
    except BaseException:
        server.close()
        raise
    return daemon


def _make_run_dir(run_dir: Path) -> None:
    """Create the run directory 0700 before anything inside it (its ``logs/`` would otherwise
    create it with the umask's mode); one that exists keeps the mode it was given (e.g. by
    systemd's ``RuntimeDirectoryMode``)."""
    try:
        run_dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    os.chmod(run_dir, 0o700)  # whatever the umask


def _detach() -> int:
    """Fork into the background; the parent exits once the child reports readiness."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            message = pipe.read().strip()
        if message == "ready":
            os._exit(0)
        print(f"{PROG}: {message or 'the daemon exited during start-up'}", file=sys.stderr)
        os._exit(EXIT_SETUP)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return write_end


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message.encode())
    finally:
        os.close(fd)


if __name__ == "__main__":
    raise SystemExit(main())
