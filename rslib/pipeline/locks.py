"""One experiment, one writer: an exclusive, crash-tolerant lock on an output folder.

Usage (the runner takes the lock of an experiment folder, or of a study folder for its plot
stage, before any stage runs)::

    with FolderLock(exp_dir).acquire(wait=args.wait, force=args.force_unlock):
        ...  # run the stages

``acquire(wait=False)`` raises ``LockHeld`` naming the holder; ``wait=True`` polls every ``poll``
seconds (reporting the holder through ``notify``) until the lock is free or ``timeout`` passes
(``LockTimeout``). Leaving the ``with`` block releases the lock, also on exceptions and
``KeyboardInterrupt``; wrap the run in ``sigterm_as_interrupt()`` so that SIGTERM unwinds too.
Under ``torchrun`` only rank 0 takes the lock: ``lock_for_rank(folder)`` (or ``enabled=False``).
The folder is created if missing; a folder that is not writable raises a ``PermissionError``
naming it, and leaves nothing behind.

Files
    ``<folder>/.rslib.lock`` holds the holder as JSON: a unique ``token``, ``host``, ``pid``,
    ``argv``, ``started`` (UTC) and, where ``/proc`` has them, the process start time
    (``proc_start``, /proc/<pid>/stat field 22), ``boot_id`` and ``pid_ns``. It is created with
    ``os.open(O_CREAT | O_EXCL | O_WRONLY)``, written and fsynced; its mtime is the heartbeat,
    touched every ``heartbeat`` seconds by a daemon thread through the open descriptor (so only
    ever our own file). ``<folder>/.rslib.lock.takeover.<token>`` is a short-lived claim that
    exists only while a process replaces the stale lock with that token.

When a holder counts as gone (``Holder.alive`` is False)
    - same host (hostname and pid namespace): its pid no longer exists (``os.kill(pid, 0)``
      raises ``ProcessLookupError``; ``PermissionError`` means alive), is a zombie, belongs to a
      process with another start time (pid reuse), or the host rebooted (``boot_id``);
    - another host: no heartbeat for more than ``stale_after`` seconds;
    - an unreadable lock file (e.g. its writer died before writing it): unchanged for more than
      ``stale_after`` seconds.
    A live holder is only ever displaced with ``force=True`` (the CLI's ``--force-unlock``).

Takeover
    To replace a stale lock with token T, a process must create the claim ``.takeover.T``
    (O_EXCL, so exactly one process wins it), re-read the lock under it, and only if it still
    carries T (and is still stale) delete it and create its own lock with O_EXCL. A claim whose
    creator died is itself claimed the same way (``.takeover.<its token>``). Release deletes the
    lock only if it still carries our token; a holder that finds its lock taken over reports it
    on its next heartbeat.

Guaranteed: at most one process holds the lock of a folder, provided O_EXCL create is atomic
(local file systems; NFSv3 or later with Linux 2.6 or later, see open(2)) and no live process is
judged dead. Not guaranteed, on NFS in particular:
    - heartbeat ages compare this host's clock with the lock file's mtime (set by the holder's
      host or the file server), so clocks must agree to well within ``stale_after``;
    - a holder on another host that is cut off (network partition, suspended VM, SIGSTOP) for
      longer than ``stale_after`` is taken over although it may resume writing; it notices
      only at its next heartbeat, and does not stop. Choose ``stale_after`` generously, above
      ``heartbeat`` plus the NFS attribute cache time (``acregmax``, 60 s by default);
    - hosts sharing a folder must have distinct hostnames;
    - SIGKILL, or SIGTERM without ``sigterm_as_interrupt()``, leaves the lock file behind: it
      is taken over at once from the same host, and after ``stale_after`` from another host.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Self

LOCK_NAME = ".rslib.lock"
DEFAULT_HEARTBEAT = 15.0
DEFAULT_STALE_AFTER = 120.0
DEFAULT_POLL = 2.0
_REMIND_EVERY = 60.0  # seconds between "still waiting" lines for the same holder
_TOKEN = re.compile(r"[0-9a-f]{32}")
_ADVICE = ("Wait for it with --wait, check it with `rslib status`, or, if you are sure that "
           "process is dead, break the lock with --force-unlock.")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Holder:
    """The process recorded in a lock file, and whether it still looks alive (``reason`` says why)."""

    folder: Path
    token: str
    host: str
    pid: int
    argv: tuple[str, ...]
    started: str
    heartbeat: float  # the lock file's mtime (seconds since the epoch)
    proc_start: int | None = None
    boot_id: str | None = None
    pid_ns: str | None = None
    alive: bool = True
    reason: str = ""

    def describe(self) -> str:
        """One line naming the holder: host, pid, command, since when, last heartbeat."""
        age = max(0.0, time.time() - self.heartbeat)
        if not self.pid:
            return f"an unreadable lock file {lock_path(self.folder)}, last modified {age:.0f} s ago"
        return (f"pid {self.pid} on host {self.host} (command: {shlex.join(self.argv) or '?'}), "
                f"since {self.started}, last heartbeat {age:.0f} s ago")


class LockHeld(RuntimeError):
    """The folder is locked by a live process (or a stale lock is being taken over by another)."""

    def __init__(self, holder: Holder, message: str | None = None) -> None:
        self.holder = holder
        super().__init__(message or _held_message(holder))


class LockTimeout(LockHeld):
    """``acquire(wait=True, timeout=...)`` gave up."""

    def __init__(self, holder: Holder, waited: float) -> None:
        super().__init__(holder, f"gave up after waiting {waited:.1f} s. {_held_message(holder)}")


def _held_message(holder: Holder) -> str:
    state = (f"{holder.folder} is locked by another run: {holder.describe()}." if holder.alive else
             f"{holder.folder} is being taken over by another process from a stale lock ({holder.reason}): "
             f"{holder.describe()}.")
    return f"{state}\n{_ADVICE}"


def _takeover_message(holder: Holder, force: bool) -> str:
    if holder.alive and force:
        return (f"force-unlocking {holder.folder}: breaking the lock of {holder.describe()}, "
                f"which still looks alive ({holder.reason})")
    return f"taking over the stale lock on {holder.folder} held by {holder.describe()}: {holder.reason}"


def lock_path(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / LOCK_NAME


def read_holder(folder: str | os.PathLike[str], stale_after: float = DEFAULT_STALE_AFTER) -> Holder | None:
    """Who holds the lock of ``folder`` and whether it is alive, without taking it; None if free."""
    return _read(lock_path(folder), Path(folder), stale_after)


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks after boot) of ``pid`` from /proc; None if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[19])


def _record(token: str) -> dict[str, Any]:
    """The JSON written into a lock (or claim) file by this process."""
    stat = _proc_stat(os.getpid())
    return {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv,
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "proc_start": stat[1] if stat else None,
            "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_ns()}


def _agree(recorded: str | None, here: str | None) -> bool:
    return recorded is None or here is None or recorded == here


def _local_liveness(holder: Holder) -> tuple[bool, str]:
    """Whether ``holder``, a process of this host, is still running."""
    pid = holder.pid
    if not _agree(holder.boot_id, _read_text("/proc/sys/kernel/random/boot_id")):
        return False, "this host has rebooted since"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"pid {pid} no longer exists on this host"
    except PermissionError:
        pass  # it exists, under another user
    stat = _proc_stat(pid)
    if stat and stat[0] in ("Z", "X"):
        return False, f"pid {pid} has exited"
    if stat and holder.proc_start is not None and stat[1] != holder.proc_start:
        return False, f"pid {pid} now belongs to another process (different start time)"
    return True, f"pid {pid} is running on this host"


def _judge(holder: Holder, stale_after: float) -> tuple[bool, str]:
    """Whether the holder of a lock is alive, and why."""
    if holder.pid and holder.host == socket.gethostname() and _agree(holder.pid_ns, _pid_ns()):
        return _local_liveness(holder)
    age = time.time() - holder.heartbeat
    what = "no heartbeat" if holder.pid else "unreadable lock file unchanged"
    if age > stale_after:
        return False, f"{what} for {age:.0f} s, more than {stale_after:g} s"
    return True, f"{what} for {max(age, 0.0):.0f} s, stale after {stale_after:g} s"


def _parse(data: bytes, folder: Path, stat: os.stat_result) -> Holder:
    """The holder recorded in ``data``; an unreadable record gives a holder with pid 0."""
    try:
        rec = json.loads(data)
        token, pid, argv = rec["token"], rec["pid"], rec["argv"]
        if not (isinstance(token, str) and _TOKEN.fullmatch(token) and type(pid) is int and pid > 0
                and isinstance(argv, list)):
            raise ValueError("not a lock record")
        return Holder(folder, token, str(rec["host"]), pid, tuple(map(str, argv)), str(rec["started"]),
                      stat.st_mtime, rec.get("proc_start"), rec.get("boot_id"), rec.get("pid_ns"))
    except (ValueError, KeyError, TypeError):
        return Holder(folder, f"unreadable-{stat.st_dev}-{stat.st_ino}", "", 0, (), "", stat.st_mtime)


def _load(path: Path, folder: Path) -> Holder | None:
    """The holder recorded in ``path`` (not judged); None if there is no such file (a symlink is an error)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        return _parse(file.read(), folder, os.fstat(fd))


def _read(path: Path, folder: Path, stale_after: float) -> Holder | None:
    """The holder recorded in ``path``, judged alive or stale; None if there is no such file."""
    holder = _load(path, folder)
    if holder is None:
        return None
    alive, reason = _judge(holder, stale_after)
    return replace(holder, alive=alive, reason=reason)


def _create(path: Path, record: dict[str, Any]) -> int | None:
    """Create ``path`` exclusively, holding ``record`` (fsynced): its open descriptor, or None if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    try:
        data = (json.dumps(record, indent=1) + "\n").encode()
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(path)
        raise
    return fd


@contextmanager
def _writable(folder: Path) -> Iterator[None]:
    """Turn a permission or read-only file system error into one that names ``folder``."""
    try:
        yield
    except OSError as err:
        if not isinstance(err, PermissionError) and err.errno != errno.EROFS:
            raise
        raise PermissionError(f"cannot lock {folder}: the folder must be writable by this user "
                              f"({err.strerror or err})") from err


class FolderLock:
    """Exclusive lock of one writer process on ``folder``; a context manager (see the module docstring).

    ``enabled=False`` makes every method a no-op (``torchrun`` ranks other than 0). ``notify``
    receives takeover, waiting and heartbeat messages (default: printed to stderr)."""

    def __init__(self, folder: str | os.PathLike[str], *, enabled: bool = True,
                 heartbeat: float = DEFAULT_HEARTBEAT, stale_after: float = DEFAULT_STALE_AFTER,
                 poll: float = DEFAULT_POLL, notify: Callable[[str], None] = _to_stderr) -> None:
        if heartbeat <= 0 or poll <= 0:
            raise ValueError(f"heartbeat ({heartbeat}) and poll ({poll}) must be positive")
        if stale_after < 2 * heartbeat:
            raise ValueError(f"stale_after ({stale_after} s) must be at least twice heartbeat ({heartbeat} s)")
        self.folder, self.path, self.enabled = Path(folder), lock_path(folder), enabled
        self.heartbeat, self.stale_after, self.poll, self.notify = heartbeat, stale_after, poll, notify
        self._fd: int | None = None
        self._token, self._pid, self._stop = "", 0, threading.Event()
        self._beater: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """Whether this object has acquired the lock (and not released it)."""
        return self._fd is not None

    def acquire(self, wait: bool = False, timeout: float | None = None, force: bool = False) -> Self:
        """Take the lock as the module docstring describes; ``force`` breaks a live holder's lock."""
        if not self.enabled or self.held:
            return self
        try:
            self._wait(wait, timeout, force)
        except BaseException:  # e.g. KeyboardInterrupt right after the lock file was created
            self.release()
            raise
        self._start_heartbeat()
        return self

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours; safe to call twice."""
        if self._fd is None:
            return
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
        try:
            if self.owned():
                with suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def owned(self) -> bool:
        """Whether the lock file on disk is still the one this process created (not taken over)."""
        if self._fd is None or os.getpid() != self._pid:  # a forked child must not release it
            return False
        holder = _load(self.path, self.folder)
        return holder is not None and holder.token == self._token

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _wait(self, wait: bool, timeout: float | None, force: bool) -> None:
        """Try until we hold the lock, as ``acquire`` describes."""
        start = time.monotonic()
        announced: tuple[str, float] | None = None  # holder token and time of the last progress line
        while (holder := self._attempt(force)) is not None:
            waited = time.monotonic() - start
            if not wait:
                raise LockHeld(holder)
            if timeout is not None and waited >= timeout:
                raise LockTimeout(holder, waited)
            announced = self._announce(holder, waited, announced)
            time.sleep(self.poll if timeout is None else min(self.poll, timeout - waited))

    def _attempt(self, force: bool) -> Holder | None:
        """One try: None once we hold the lock, else the holder that keeps us out."""
        tried: str | None = None  # token of a stale lock whose takeover another process won
        with _writable(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            while not self._create_lock():
                holder = _read(self.path, self.folder, self.stale_after)
                if holder is None:
                    continue  # released meanwhile
                if (holder.alive and not force) or holder.token == tried:
                    return holder
                if self._take_over(holder, force):
                    break
                tried = holder.token
        return None

    def _create_lock(self) -> bool:
        token = uuid.uuid4().hex
        fd = _create(self.path, _record(token))
        if fd is None:
            return False
        self._fd, self._token, self._pid = fd, token, os.getpid()
        return True

    def _take_over(self, holder: Holder, force: bool) -> bool:
        """Replace ``holder``'s lock if it is still there and stale (or ``force``); True if we now hold it."""
        claims = self._claim(holder.token)
        if claims is None:
            return False
        try:
            current = _read(self.path, self.folder, self.stale_after)
            if current is None or current.token != holder.token or (current.alive and not force):
                return False
            self.notify(_takeover_message(current, force))
            with suppress(FileNotFoundError):
                os.unlink(self.path)
            return self._create_lock()
        finally:
            for claim in claims:  # superseded dead claims first, ours last
                with suppress(FileNotFoundError):
                    os.unlink(claim)

    def _claim(self, token: str) -> list[Path] | None:
        """Win the sole right to replace the lock with ``token``: the claim files to delete afterwards
        (dead claims superseded, then ours), or None if a live process holds the claim."""
        superseded: list[Path] = []
        while True:
            path = self.path.with_name(f"{LOCK_NAME}.takeover.{token}")
            fd = _create(path, _record(uuid.uuid4().hex))
            if fd is not None:
                os.close(fd)
                return [*superseded, path]
            claimer = _read(path, self.folder, self.stale_after)
            if claimer is None or claimer.alive:
                return None  # finished or in progress elsewhere: the lock has changed or will
            superseded.append(path)
            token = claimer.token

    def _announce(self, holder: Holder, waited: float, last: tuple[str, float] | None) -> tuple[str, float]:
        """Report a new holder, or the same one again every ``_REMIND_EVERY`` seconds."""
        if last is not None and last[0] == holder.token and waited - last[1] < _REMIND_EVERY:
            return last
        self.notify(f"waiting for the lock on {self.folder} ({waited:.0f} s so far): held by {holder.describe()}")
        return holder.token, waited

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._beater = threading.Thread(target=self._beat, args=(self._fd, self._stop),
                                        name="rslib-lock-heartbeat", daemon=True)
        self._beater.start()

    def _beat(self, fd: int, stop: threading.Event) -> None:
        """Touch our lock file every ``heartbeat`` seconds; stop if it was taken over."""
        while not stop.wait(self.heartbeat):
            try:
                if not self.owned():
                    self.notify(f"the lock on {self.folder} was taken over by another process "
                                f"({lock_path(self.folder)}); this run no longer holds it")
                    return
                os.utime(fd)
            except OSError as err:
                self.notify(f"heartbeat of {self.path} failed, will retry: {err}")


def lock_for_rank(folder: str | os.PathLike[str], rank: int | None = None, **options: Any) -> FolderLock:
    """The lock of ``folder`` for one ``torchrun`` rank: only rank 0 takes it (``rank`` defaults to
    the ``RANK`` environment variable, else 0). ``options`` go to ``FolderLock``."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    return FolderLock(folder, enabled=rank == 0, **options)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises ``KeyboardInterrupt``, so ``with`` blocks (the lock's) unwind.

    Signal handlers can only be set from the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
