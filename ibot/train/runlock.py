"""One run per run folder: an exclusive lock on ``RUN_DIR/.ibot.lock`` held while training.

Two runs writing to one folder would interleave ``metrics.jsonl``, overwrite each other's
checkpoint, and the start-up clean-up of stale temporaries could delete the other run's file
mid-write. The lock is an ``fcntl.flock`` (released by the kernel when the process dies, so a lock
left by a killed run is taken over); the file records the holder's pid and host for the error
message. Where ``fcntl`` does not exist, the recorded pid is checked for liveness instead.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".ibot.lock"
_HELD: dict[str, list] = {}  # resolved folder -> [file object, reference count] (one process may nest)


class RunLockError(RuntimeError):
    """Another live process trains into the same run folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(text: str) -> dict:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


class RunLock:
    """A held lock; :meth:`release` is idempotent."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.held = folder, True

    def release(self) -> None:
        if self.held:
            self.held = False
            _release(self.folder)


def acquire(folder: str | Path, log=print) -> RunLock:
    """Take the folder's lock (creating the folder). Raises :class:`RunLockError` naming the holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return RunLock(folder)
    path = folder / LOCK_NAME
    f = open(path, "a+")  # noqa: SIM115 - held open for the life of the lock
    f.seek(0)
    previous = _holder(f.read())
    pid, host = previous.get("pid"), previous.get("host")
    busy = False
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            busy = True
    elif isinstance(pid, int) and host == socket.gethostname() and pid != os.getpid():
        busy = _pid_alive(pid)
    if busy:
        f.close()
        who = f"process {pid} on {host}" if pid else "another process"
        since = f" since {previous['started']}" if previous.get("started") else ""
        raise RunLockError(
            f"run folder {folder} is in use by {who}{since} ({path}); wait for it, stop it, "
            "or choose another run.output_dir"
        )
    if pid and pid != os.getpid():
        log(f"taking over the lock of {folder} left by process {pid} on {host}, which is no longer running")
    f.seek(0)
    f.truncate()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    f.write(json.dumps(info))
    f.flush()
    _HELD[key] = [f, 1]
    return RunLock(folder)


def _release(folder: Path) -> None:
    """Release one :func:`acquire` of this process (the lock goes when the last one is released)."""
    key = str(Path(folder).resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    f = _HELD.pop(key)[0]
    try:
        f.seek(0)
        f.truncate()
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()
