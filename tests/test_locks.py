"""FolderLock: one writer per folder, stale takeover, races, heartbeats, ranks and read-only folders."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rslib.pipeline.locks import (
    LOCK_NAME,
    FolderLock,
    LockHeld,
    LockTimeout,
    lock_for_rank,
    lock_path,
    read_holder,
    sigterm_as_interrupt,
)

HOLD = """
import sys
from rslib.pipeline.locks import FolderLock
lock = FolderLock(sys.argv[1]).acquire()
print("ready", flush=True)
sys.stdin.readline()
lock.release()
"""

TRY = """
import sys
from rslib.pipeline.locks import FolderLock, LockHeld
try:
    FolderLock(sys.argv[1]).acquire()
except LockHeld as err:
    print(err)
    sys.exit(3)
"""

RACE = """
import os, sys, time
from rslib.pipeline.locks import FolderLock, LockHeld
lock = FolderLock(sys.argv[1], notify=lambda message: None)
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    lock.acquire()
except LockHeld:
    print("held", flush=True)
else:
    print("won", flush=True)
sys.stdin.readline()
lock.release()
"""

TERMINATED = """
import sys, time
from rslib.pipeline.locks import FolderLock, sigterm_as_interrupt
try:
    with sigterm_as_interrupt(), FolderLock(sys.argv[1]):
        print("ready", flush=True)
        time.sleep(30)
except KeyboardInterrupt:
    sys.exit(5)
"""


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen[str]) -> None:
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        pytest.fail(f"child did not start: {line!r} {proc.communicate()[1]}")


def start_holder(folder: Path) -> subprocess.Popen[str]:
    """A child process holding the lock of ``folder`` until a line arrives on its stdin."""
    proc = spawn(HOLD, str(folder))
    wait_ready(proc)
    return proc


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def proc_start(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[19])


def write_record(path: Path, *, host: str = "elsewhere", pid: int = 4242, age: float = 0.0,
                 **extra: object) -> str:
    """A lock (or claim) file as another process would have written it; its token."""
    token = uuid.uuid4().hex
    record = {"token": token, "host": host, "pid": pid, "argv": ["rslib", "run", "x.yaml"],
              "started": "2024-01-01T00:00:00+00:00", **extra}
    path.write_text(json.dumps(record))
    then = time.time() - age
    os.utime(path, (then, then))
    return token


def wait_for(condition, seconds: float = 2.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def fast_lock(folder: Path, messages: list[str] | None = None, **options: object) -> FolderLock:
    notify = messages.append if messages is not None else (lambda message: None)
    options = {"heartbeat": 0.05, "stale_after": 1.0, "poll": 0.05, **options}
    return FolderLock(folder, notify=notify, **options)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(LOCK_NAME))


def test_acquire_records_the_holder_and_release_removes_it(tmp_path):
    folder = tmp_path / "outputs" / "exp"  # created by the lock
    lock = FolderLock(folder)
    with lock:
        record = json.loads(lock_path(folder).read_text())
        assert (record["host"], record["pid"], record["argv"]) == (socket.gethostname(), os.getpid(), sys.argv)
        assert len(record["token"]) == 32 and record["started"].endswith("+00:00")
        holder = read_holder(folder)
        assert holder.alive and holder.pid == os.getpid() and holder.token == record["token"]
        assert lock.held and lock.owned()
    assert not lock.held and not lock_path(folder).exists() and read_holder(folder) is None
    lock.release()  # twice is fine


def test_exception_in_block_releases(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), FolderLock(tmp_path) as lock:
        assert lock.held
        raise RuntimeError("boom")
    assert read_holder(tmp_path) is None


def test_interrupt_during_acquire_leaves_no_lock(tmp_path, monkeypatch):
    create = FolderLock._create_lock

    def create_then_interrupt(self: FolderLock) -> bool:
        assert create(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(FolderLock, "_create_lock", create_then_interrupt)
    lock = FolderLock(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()
    assert not lock.held and read_holder(tmp_path) is None


def test_lock_can_be_taken_again_after_release(tmp_path):
    lock = FolderLock(tmp_path)
    with lock:
        first = read_holder(tmp_path).token
    with lock:
        assert read_holder(tmp_path).token != first


def test_other_process_gets_lock_held_naming_the_holder(tmp_path):
    with FolderLock(tmp_path):
        proc = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    for part in (f"pid {os.getpid()}", socket.gethostname(), "since", "--wait", "rslib status", "--force-unlock"):
        assert part in proc.stdout


def test_second_lock_in_same_process_is_refused(tmp_path):
    with FolderLock(tmp_path), pytest.raises(LockHeld) as info:
        FolderLock(tmp_path).acquire()
    assert info.value.holder.pid == os.getpid()
    assert str(tmp_path) in str(info.value)


def test_wait_acquires_once_the_holder_releases(tmp_path):
    holder = start_holder(tmp_path)
    messages: list[str] = []

    def notify(message: str) -> None:
        messages.append(message)
        if len(messages) == 1:  # we are waiting: let the holder go
            holder.stdin.write("\n")
            holder.stdin.flush()

    lock = FolderLock(tmp_path, poll=0.05, notify=notify)
    with lock.acquire(wait=True, timeout=10):
        assert read_holder(tmp_path).pid == os.getpid()
    assert holder.wait(5) == 0
    assert "waiting for the lock" in messages[0] and f"pid {holder.pid}" in messages[0]


def test_wait_gives_up_after_timeout(tmp_path):
    messages: list[str] = []
    with FolderLock(tmp_path), pytest.raises(LockTimeout, match="gave up") as info:
        fast_lock(tmp_path, messages).acquire(wait=True, timeout=0.2)
    assert isinstance(info.value, LockHeld) and info.value.holder.pid == os.getpid()
    assert len(messages) == 1  # one progress line per holder, not one per poll


def test_killed_holder_is_taken_over(tmp_path):
    holder = start_holder(tmp_path)
    holder.kill()
    holder.wait(5)
    stale = read_holder(tmp_path)
    assert not stale.alive and "no longer exists" in stale.reason
    messages: list[str] = []
    with fast_lock(tmp_path, messages):
        assert read_holder(tmp_path).pid == os.getpid()
    assert len(messages) == 1 and "taking over the stale lock" in messages[0]
    assert f"pid {holder.pid}" in messages[0]
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_zombie_holder_is_taken_over(tmp_path):
    holder = start_holder(tmp_path)
    holder.kill()  # not reaped: the pid still exists, as a zombie
    assert wait_for(lambda: Path(f"/proc/{holder.pid}/stat").read_text().split(") ")[1][0] == "Z")
    try:
        with fast_lock(tmp_path):
            pass
    finally:
        holder.wait(5)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize(("changes", "alive", "reason"), [
    ({}, True, "is running"),
    ({"proc_start": -1}, False, "another process"),
    ({"boot_id": "another-boot"}, False, "rebooted"),
    ({"pid": "dead"}, False, "no longer exists"),
])
def test_local_holder_liveness(tmp_path, changes, alive, reason):
    record = {"pid": os.getpid(), "proc_start": proc_start(os.getpid()), **changes}
    if record["pid"] == "dead":
        record["pid"] = dead_pid()
    write_record(lock_path(tmp_path), host=socket.gethostname(), **record)
    holder = read_holder(tmp_path)
    assert holder.alive is alive and reason in holder.reason


def test_other_host_is_stale_only_without_heartbeat(tmp_path):
    write_record(lock_path(tmp_path), age=0.0)
    with pytest.raises(LockHeld, match="host elsewhere"):
        fast_lock(tmp_path).acquire()
    write_record(lock_path(tmp_path), age=5.0)
    messages: list[str] = []
    with fast_lock(tmp_path, messages):
        pass
    assert "no heartbeat for 5 s" in messages[0] and "host elsewhere" in messages[0]


def test_unreadable_lock_is_stale_only_when_old(tmp_path):
    path = lock_path(tmp_path)
    path.write_text("")  # as if its writer had just created it
    with pytest.raises(LockHeld, match="unreadable"):
        fast_lock(tmp_path).acquire()
    os.utime(path, (time.time() - 5, time.time() - 5))
    with fast_lock(tmp_path):
        assert read_holder(tmp_path).pid == os.getpid()


def test_symlinked_lock_file_is_an_error_not_a_hang(tmp_path):
    lock_path(tmp_path).symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError, match="symbolic links"):
        fast_lock(tmp_path).acquire()


def test_heartbeat_refreshes_the_lock_and_stops_on_release(tmp_path):
    lock = fast_lock(tmp_path).acquire()
    path = lock_path(tmp_path)
    os.utime(path, (time.time() - 100, time.time() - 100))
    assert wait_for(lambda: time.time() - path.stat().st_mtime < 5)
    lock.release()
    assert not lock._beater.is_alive()


def test_force_breaks_a_live_lock_and_the_old_holder_keeps_hands_off(tmp_path):
    old_messages: list[str] = []
    old = fast_lock(tmp_path, old_messages).acquire()
    new_messages: list[str] = []
    new = fast_lock(tmp_path, new_messages).acquire(force=True)
    assert "force-unlocking" in new_messages[0] and read_holder(tmp_path).token == new._token
    assert not old.owned()
    assert wait_for(lambda: any("was taken over" in m for m in old_messages))
    old.release()  # must not delete the new holder's lock
    assert read_holder(tmp_path).token == new._token
    new.release()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("state", ["free", "other host, no heartbeat", "dead pid"])
def test_racing_processes_exactly_one_wins(tmp_path, state):
    if state == "other host, no heartbeat":
        write_record(lock_path(tmp_path), age=1000.0)
    elif state == "dead pid":
        write_record(lock_path(tmp_path), host=socket.gethostname(), pid=dead_pid())
    go = tmp_path.parent / f"{tmp_path.name}.go"
    racers = [spawn(RACE, str(tmp_path), str(go)) for _ in range(6)]
    for proc in racers:
        wait_ready(proc)
    go.touch()
    results = [proc.stdout.readline().strip() for proc in racers]
    winners = [proc.pid for proc, result in zip(racers, results, strict=True) if result == "won"]
    assert len(winners) == 1 and results.count("held") == 5, results
    assert read_holder(tmp_path).pid == winners[0]
    for proc in racers:
        proc.communicate("\n", timeout=10)
        assert proc.returncode == 0
    assert leftovers(tmp_path) == []


def test_dead_takeover_claim_is_superseded(tmp_path):
    stale = write_record(lock_path(tmp_path), age=1000.0)
    claim = tmp_path / f"{LOCK_NAME}.takeover.{stale}"
    write_record(claim, host=socket.gethostname(), pid=dead_pid())
    with fast_lock(tmp_path):
        assert read_holder(tmp_path).pid == os.getpid()
    assert leftovers(tmp_path) == []


def test_live_takeover_claim_blocks(tmp_path):
    stale = write_record(lock_path(tmp_path), age=1000.0)
    write_record(tmp_path / f"{LOCK_NAME}.takeover.{stale}", host=socket.gethostname(), pid=os.getpid())
    with pytest.raises(LockHeld, match="being taken over by another process"):
        fast_lock(tmp_path).acquire()
    assert read_holder(tmp_path).token == stale


@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS])
def test_read_only_folder_gives_a_clear_error(tmp_path, monkeypatch, error):
    folder = tmp_path / "exp"
    folder.mkdir()
    if error == errno.EACCES and os.geteuid() != 0:
        folder.chmod(0o555)
    else:  # root ignores permissions, and a read-only mount is not at hand: simulate both
        real_open = os.open

        def refuse(path, flags, *args, **kwargs):
            if Path(path).parent == folder:
                raise OSError(error, os.strerror(error), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    try:
        with pytest.raises(PermissionError, match="must be writable") as info:
            FolderLock(folder).acquire()
    finally:
        folder.chmod(0o755)
    assert str(folder) in str(info.value)
    assert list(folder.iterdir()) == []


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with lock_for_rank(tmp_path) as lock:
        assert not lock.held and read_holder(tmp_path) is None
    with lock_for_rank(tmp_path, rank=0) as lock:
        assert lock.held and read_holder(tmp_path).pid == os.getpid()
    monkeypatch.delenv("RANK")
    with lock_for_rank(tmp_path) as lock:
        assert lock.held


def test_sigterm_unwinds_and_releases(tmp_path):
    proc = spawn(TERMINATED, str(tmp_path))
    wait_ready(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 5
    assert read_holder(tmp_path) is None


def test_sigterm_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_forked_child_does_not_release_the_parents_lock(tmp_path):
    with FolderLock(tmp_path) as lock:
        pid = os.fork()
        if pid == 0:  # the child
            try:
                lock.release()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert lock.owned()


def test_read_holder_of_a_free_or_missing_folder(tmp_path):
    assert read_holder(tmp_path) is None
    assert read_holder(tmp_path / "missing") is None


def test_stale_after_must_exceed_heartbeat(tmp_path):
    with pytest.raises(ValueError, match="at least twice heartbeat"):
        FolderLock(tmp_path, heartbeat=10, stale_after=15)
