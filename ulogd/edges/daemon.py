"""The daemon: one event loop wiring the transport, the server, disk workers and signals.

Theory of operation
-------------------
A single thread runs a ``selectors`` loop over three kinds of descriptor:

* the transport socket — every readable datagram is drained and fed to
  :meth:`Server.receive <ulogd.engine.server.Server.receive>`; replies go out at once;
* an ``eventfd`` that disk workers signal — one worker thread per log device performs the
  :class:`~ulogd.engine.server.DiskRead`/:class:`~ulogd.engine.server.DiskWrite` actions in order,
  so a
  slow device delays only the log that owns it; completions are handed back to the server
  on the loop thread (the server is never touched from another thread);
* the signal wake-up pipe — SIGTERM/SIGINT stop the loop (state lives in the run directory's
  mapped files, so the next daemon continues where this one stopped); SIGUSR1 logs every log.

Timers (:meth:`Daemon.call_later`, :meth:`Daemon.call_every`) run on the loop thread too: the
select timeout is the nearest one.  The server's housekeeping runs every
:data:`HOUSEKEEPING_INTERVAL` seconds (retrying the removal of destroyed logs' files, and
logging the rate limits' "suppressed N similar lines" summaries once their window is over).

Polling (:mod:`ulogd.edges.poll`): after a turn that sent a reply the loop may keep polling (a
zero-timeout ``select`` over the same descriptors, so a disk completion or a cluster message
ends the window too) for the window :class:`~ulogd.edges.poll.PollPolicy` returns, instead of
blocking at once: the kernel's next request of the same write then finds the loop running.

Capture (``--capture``) records each datagram as it crosses the transport, in both
directions, through a buffered writer that never blocks the reply path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import heapq
import itertools
import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ulogd.edges.capture import Direction
from ulogd.edges.counters import Metrics
from ulogd.edges.poll import PollPolicy, PollSetting
from ulogd.edges.transport import Transport
from ulogd.engine.actions import (
    Action,
    ClusterSend,
    Cycle,
    DiskRead,
    DiskWrite,
    Join,
    Leave,
    LogDevice,
    Prepare,
    Send,
)
from ulogd.engine.server import Server
from ulogd.engine.table import about

log = logging.getLogger(__name__)

#: seconds between two runs of the server's housekeeping (see :meth:`Daemon.housekeeping`)
HOUSEKEEPING_INTERVAL = 10.0


class ClusterEdge(Protocol):
    """What the loop needs of the corosync edge (:class:`ulogd.edges.corosync.CorosyncLink`)."""

    def timeout(self) -> float | None: ...
    def tick(self) -> None: ...
    def describe(self) -> str: ...
    def perform(self, action: Join | ClusterSend | Leave) -> None: ...


@dataclasses.dataclass
class DiskCounts:
    """What retired workers counted (the metrics are counters: they must not go back)."""

    reads: int = 0
    writes: int = 0
    bytes_written: int = 0
    errors: int = 0


class DiskWorker:
    """Performs one device's I/O in order, off the event loop."""

    def __init__(self, device: LogDevice, done: queue.SimpleQueue[Any], wake: int) -> None:
        self.device = device
        self._jobs: queue.SimpleQueue[DiskRead | DiskWrite | None] = queue.SimpleQueue()
        self._done = done
        self._wake = wake
        # Counted on the worker thread only, read by metrics on the loop thread.
        self.reads = 0
        self.writes = 0
        self.bytes_written = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="ulogd-disk", daemon=True)
        self._thread.start()

    def submit(self, action: DiskRead | DiskWrite) -> None:
        self._jobs.put(action)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def retire(self) -> None:
        """Exit once the queued jobs are done (their results are still reported)."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            data: bytes | None = None
            error: OSError | None = None
            try:
                if isinstance(job, DiskRead):
                    data = self.device.read(job.nbytes)
                    self.reads += 1
                else:
                    self.device.write_extents(job.extents, job.durable)
                    self.writes += 1
                    self.bytes_written += sum(len(chunk) for _, chunk in job.extents)
            except OSError as exc:
                error = exc
                self.errors += 1
            except Exception as exc:  # a bug in the I/O layer must not kill the worker
                error = OSError(5, f"unexpected {type(exc).__name__}: {exc}")
                self.errors += 1
            self._done.put((job.token, data, error))
            os.eventfd_write(self._wake, 1)


class JobWorker:
    """Runs :class:`~ulogd.engine.server.Prepare` jobs (building or counting a huge log's state
    file) in order, off the event loop; results go to the same queue as disk I/O."""

    def __init__(self, done: queue.SimpleQueue[Any], wake: int) -> None:
        self._jobs: queue.SimpleQueue[Prepare | None] = queue.SimpleQueue()
        self._done = done
        self._wake = wake
        self._thread = threading.Thread(target=self._run, name="ulogd-state", daemon=True)
        self._thread.start()

    def submit(self, job: Prepare) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.job()
            except Exception as exc:  # reported to the server, which answers for it
                error = exc
            self._done.put((job.token, result, error))
            os.eventfd_write(self._wake, 1)


class Daemon:
    """Runs a :class:`Server` on a :class:`Transport` until told to stop."""

    def __init__(
        self,
        server: Server,
        transport: Transport,
        *,
        run_dir: Path | None = None,
        capture: Any | None = None,
        poll: PollSetting | None = None,
    ) -> None:
        self.server = server
        self.transport = transport
        self.run_dir = run_dir
        self.capture = capture
        self._selector = selectors.DefaultSelector()
        self._done: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
        self._jobs: JobWorker | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Every descriptor the loop needs is made here, so that a start without enough of
        # them fails before it announces readiness (one "cannot start" line, no traceback).
        self._rsig, self._wsig = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._workers: dict[int, DiskWorker] = {}
        self._retired = DiskCounts()
        self._stop = False
        self._signals: list[int] = []
        self._pidfile: int | None = None
        self.served = 0
        #: counters and the reply-latency histogram (ulogd.ops.metrics renders them)
        self.metrics = Metrics()
        self._observe = self.metrics.latency.observe  # once per reply: keep the lookup short
        self._io_started: dict[int, int] = {}  # disk token → arrival of the request (ns)
        self._at_shutdown: list[Callable[[], None]] = []
        #: the corosync edge (cluster mode): performs Join/ClusterSend/Leave actions
        self.cluster: ClusterEdge | None = None
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # a heap by due time
        self._timer_order = itertools.count()
        self.call_every(HOUSEKEEPING_INTERVAL, self.housekeeping)
        self._status_sent: str | None = None  # the last STATUS= told to systemd
        #: what decides the poll window after a reply (off unless told: ``dm-ulogd run``
        #: passes the ``poll`` setting, adaptive by default)
        self.poll = PollPolicy(poll or PollSetting("off"))
        self._sent = 0  # replies sent (a turn that sent one may open a poll window)
        self._drained = 0  # datagrams the last transport wake-up found

    # ------------------------------------------------------------------ extension hooks
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable."""
        self._watch(fd, selectors.EVENT_READ, callback)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is writable (replaces a reader on ``fd``)."""
        self._watch(fd, selectors.EVENT_WRITE, callback)

    def remove_fd(self, fd: int) -> None:
        """Stop watching ``fd`` (before closing it)."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def at_shutdown(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` when the daemon stops, before the server closes."""
        self._at_shutdown.append(callback)

    def _watch(self, fd: int, events: int, callback: Callable[[], None]) -> None:
        # Never modify(): if a closed descriptor's number was reused, the selector still maps
        # it while epoll dropped it, and modify() with the same events would not re-add it.
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(fd)
        self._selector.register(fd, events, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop thread in ``delay`` seconds (monotonic clock)."""
        due = time.monotonic() + delay
        heapq.heappush(self._timers, (due, next(self._timer_order), callback))

    def call_every(self, interval: float, callback: Callable[[], None]) -> None:
        """Call ``callback()`` every ``interval`` seconds on the loop thread."""

        def again() -> None:
            self.call_later(interval, again)
            callback()

        self.call_later(interval, again)

    def _run_timers(self) -> float | None:
        """Run the timers that are due; the seconds until the next one (None: none)."""
        timers = self._timers
        while timers:
            due, _, callback = timers[0]
            now = time.monotonic()
            if due > now:
                return due - now
            heapq.heappop(timers)
            try:
                callback()
            except Exception:
                log.exception("internal error in a timer")
        return None

    def housekeeping(self) -> None:
        """Periodic work of the server that needs no request to trigger it."""
        if self.server.unremoved:
            self.server.retry_removals()
        self.server.log_summaries()

    def execute(self, actions: list[Action]) -> None:
        """Perform actions produced outside a request (cluster events, timers)."""
        self._execute(actions)

    def disk_workers(self) -> list[DiskWorker | DiskCounts]:
        return [*self._workers.values(), self._retired]

    # ------------------------------------------------------------------ set-up
    def lock_run_dir(self) -> None:
        """Take the run directory's pid-file lock (one daemon per run directory)."""
        if self.run_dir is None:
            return
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.run_dir / "ulogd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"another ulogd already uses the run directory {self.run_dir}"
            ) from None
        self._pidfile = fd

    def announce_ready(self) -> None:
        """Write the pid file and tell systemd (Type=notify) that requests are served."""
        if self.run_dir is not None:
            tmp = self.run_dir / "ulogd.pid.new"
            try:
                tmp.write_text(f"{os.getpid()}\n")
                tmp.rename(self.run_dir / "ulogd.pid")
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise RuntimeError(f"cannot write the pid file {tmp}: {exc.strerror}") from exc
        self._status_sent = self.status_text()
        sd_notify(f"READY=1\nSTATUS={self._status_sent}")
        log.info(
            "ready: %d log(s) restored, serving over %s (%s)",
            len(self.server.logs),
            self.transport.name,
            self.poll.describe(),
        )

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        sel = self._selector
        sel.register(self.transport.fileno(), selectors.EVENT_READ, self._on_transport)
        sel.register(self._wake, selectors.EVENT_READ, self._on_disk_done)
        rsig, wsig = self._rsig, self._wsig
        sel.register(rsig, selectors.EVENT_READ, lambda: self._on_signal(rsig))
        old_wakeup = signal.set_wakeup_fd(wsig, warn_on_full_buffer=False)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
        previous = {s: signal.signal(s, lambda *_: None) for s in handled}
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        watchdog = _watchdog_interval()
        next_ping = time.monotonic() + watchdog if watchdog else None
        notify = bool(os.environ.get("NOTIFY_SOCKET"))
        policy = self.poll
        ns = time.monotonic_ns
        poll_from = poll_until = 0  # the open poll window (ns; 0: none)
        replied = 0  # when the last turn that replied ended, while no event came since (ns)
        schedstat = _open_schedstat() if policy.wants_sample(ns()) else None
        try:
            while not self._stop:
                timeout = self._run_timers()
                if self._stop:  # a timer may end the loop too
                    break
                if next_ping is not None:
                    ping = max(0.0, next_ping - time.monotonic())
                    timeout = ping if timeout is None else min(timeout, ping)
                if self.cluster is not None:
                    wait = self.cluster.timeout()
                    if wait is not None:
                        timeout = wait if timeout is None else min(timeout, wait)
                sent = self._sent
                if poll_until:
                    # The poll window: spin on a zero-timeout select until something is
                    # ready or the window is over (then block as usual).
                    while not (events := sel.select(0)) and (now := ns()) < poll_until:
                        pass
                    if events:
                        policy.arrived(ns() - poll_from)
                        replied = 0
                    else:
                        policy.expired(now - poll_from)
                        events = sel.select(timeout)
                    poll_until = 0
                else:
                    events = sel.select(timeout)
                if replied and events:
                    policy.blocked(ns() - replied)
                    replied = 0
                for key, _ in events:
                    key.data()
                if self._sent != sent and policy.mode != "off":
                    now = ns()
                    if policy.wants_sample(now):
                        policy.sample(now, _run_delay(schedstat))
                    budget = policy.window(self._drained)
                    replied = now
                    if budget:
                        poll_from, poll_until = now, now + budget
                if self.cluster is not None:
                    self.cluster.tick()
                if notify:
                    self._update_status()
                if watchdog and next_ping is not None and time.monotonic() >= next_ping:
                    sd_notify("WATCHDOG=1")
                    next_ping = time.monotonic() + watchdog
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in previous.items():
                signal.signal(s, h)
            sel.unregister(rsig)
            if schedstat is not None:
                os.close(schedstat)
            os.close(rsig)
            os.close(wsig)
            self._shutdown()

    def status_text(self) -> str:
        """One line for ``systemctl status``: logs served, the cluster's state."""
        count = len(self.server.logs)
        text = f"serving {count} log{'' if count == 1 else 's'} over {self.transport.name}"
        if self.cluster is None:
            return f"{text}; cluster off"
        return f"{text}; {self.cluster.describe()}"

    def _update_status(self) -> None:
        """Tell systemd when the status line changed (a few comparisons per wake-up)."""
        text = self.status_text()
        if text != self._status_sent:
            self._status_sent = text
            sd_notify(f"STATUS={text}")

    def _on_transport(self) -> None:
        receive = self.server.receive
        execute = self._execute
        capture = self.capture
        clock = time.perf_counter_ns
        drained = 0
        while (item := self.transport.recv()) is not None:
            drained += 1
            started = clock()
            data, port = item
            if capture is not None:
                capture.record(Direction.TO_DAEMON, data)
            self.served += 1
            try:
                actions = receive(data, port)
            except Exception:
                # A bug must cost one request, never the daemon and every other log.
                log.exception("internal error while handling a %d-byte datagram", len(data))
                continue
            if actions:
                execute(actions, started)
        self._drained = drained

    def _on_disk_done(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        while True:
            try:
                token, data, error = self._done.get_nowait()
            except queue.Empty:
                return
            started = self._io_started.pop(token, 0)
            try:
                actions = self.server.disk_done(token, data, error)
            except Exception:
                log.exception("internal error after disk I/O %d", token)
                continue
            self._execute(actions, started)

    def _execute(self, actions: list[Action], started: int = 0) -> None:
        """Perform actions; ``started`` is when the request behind them arrived (ns, 0:
        unknown) — each reply sent is observed in the latency histogram from then.  Replies
        released by disk I/O count from the arrival of the request that started the I/O."""
        for action in actions:
            if isinstance(action, Send):
                self._sent += 1
                try:
                    self.transport.send(action.data)
                except OSError as exc:
                    log.error("sending a reply failed: %s", exc)
                if started:
                    self._observe(time.perf_counter_ns() - started)
                if self.capture is not None:
                    self.capture.record(Direction.FROM_DAEMON, action.data)
            elif isinstance(action, Cycle):
                self._cycle(action.key)
            elif isinstance(action, Prepare):
                if self._jobs is None:
                    self._jobs = JobWorker(self._done, self._wake)
                self._jobs.submit(action)
            elif isinstance(action, Join | ClusterSend | Leave):
                if self.cluster is None:
                    log.error("cluster action without a cluster link: %s", type(action).__name__)
                else:
                    self.cluster.perform(action)
            else:
                worker = self._workers.get(id(action.device))
                if worker is None:
                    self._retire_workers()
                    worker = DiskWorker(action.device, self._done, self._wake)
                    self._workers[id(action.device)] = worker
                if started:
                    self._io_started[action.token] = started
                worker.submit(action)

    def _retire_workers(self) -> None:
        """Let the workers of devices no log uses any more (DTR, reload) finish their queued
        jobs and exit: one thread per device ever opened would pile up for good."""
        if len(self._workers) < len(self.server.logs):
            return
        in_use = {id(e.device) for e in self.server.logs.values() if e.device is not None}
        for key in [k for k in self._workers if k not in in_use]:
            worker = self._workers.pop(key)
            worker.retire()  # its log is gone, so are its jobs: the counts are final
            total = self._retired
            total.reads += worker.reads
            total.writes += worker.writes
            total.bytes_written += worker.bytes_written
            total.errors += worker.errors

    def _cycle(self, key: tuple[str, int]) -> None:
        """Suspend/resume the local mirror(s) using this log, without blocking the loop."""
        from ulogd.edges import dmcontrol

        tag = key[0][-8:]
        try:
            names = dmcontrol.mirrors_using(key[0])
        except dmcontrol.DmsetupError as exc:
            self.metrics.cycle_failed(dmsetup=True)
            self.server.cycle_done(key, False, str(exc))  # (logs it, once)
            return
        if not names:
            self.metrics.cycle_failed(dmsetup=False)
            self.server.cycle_done(key, False, "no local mirror uses this log")
            return
        log.warning("[%s] suspend/resume of %s to recover a departed member's regions",
                    tag, ", ".join(names), extra=about(key))  # fmt: skip
        try:
            child = dmcontrol.start_cycle(names)
        except dmcontrol.DmsetupError as exc:
            self.metrics.cycle_failed(dmsetup=True)
            self.server.cycle_done(key, False, str(exc))
            return
        pidfd = os.pidfd_open(child.pid)

        def finished() -> None:
            self.remove_fd(pidfd)
            os.close(pidfd)
            rc = child.wait()
            why = ""
            if rc != 0:
                self.metrics.cycle_failed(dmsetup=True)
                said = child.stderr.read().decode(errors="replace") if child.stderr else ""
                why = f"dmsetup exited with status {rc}: {' '.join(said.split()) or 'no message'}"
            else:
                self.metrics.recovery_cycles["ok"] += 1
            if child.stderr is not None:
                child.stderr.close()
            self.server.cycle_done(key, rc == 0, why)

        self.add_reader(pidfd, finished)

    def _on_signal(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            for signum in os.read(fd, 64):
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal %s: stopping", signal.Signals(signum).name)
                    self._stop = True
                elif signum == signal.SIGUSR1:
                    self.dump()
                elif signum == signal.SIGHUP:
                    log.info("SIGHUP: nothing to reload")

    def dump(self) -> None:
        lines = self.server.dump(time.time())
        log.warning(
            "state of %d log(s), %d datagrams served; %s:",
            len(lines),
            self.served,
            self.poll.describe(),
        )
        for line in lines:
            log.warning("  %s", line)

    def _shutdown(self) -> None:
        sd_notify("STOPPING=1")
        for worker in self._workers.values():
            worker.stop()
        if self._jobs is not None:
            self._jobs.stop()
        self._on_disk_done()  # answer what the workers finished
        for callback in self._at_shutdown:
            try:
                callback()
            except Exception:
                log.exception("error while shutting down")
        if self.server.logs:
            log.info(
                "%d log(s) active: their state stays in %s for the next daemon",
                len(self.server.logs),
                self.run_dir,
            )
        self.server.close()
        self.transport.close()
        if self.capture is not None:
            self.capture.close()
        os.close(self._wake)
        if self.run_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / "ulogd.pid").unlink()
        if self._pidfile is not None:
            os.close(self._pidfile)


def sd_notify(message: str) -> None:
    """The sd_notify datagram protocol (a few lines; no library needed for this)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.sendto(message.encode(), address)


def _open_schedstat() -> int | None:
    """The loop thread's ``schedstat`` (run time, run-queue delay, slices), kept open."""
    try:
        return os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _run_delay(fd: int | None) -> int | None:
    """The loop thread's cumulated run-queue delay in ns (None: not available)."""
    if fd is None:
        return None
    try:
        return int(os.pread(fd, 128, 0).split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
