"""One run per output directory: the lock a run holds on its output, from before it checks the directory until its
manifest is written.

Where the output is a local path (a local disk or a mounted network filesystem), the run (rank 0 under
``torchrun``) holds an operating-system lock (``filelock``'s ``FileLock``, an ``flock``) on ``.fxfeat/lock`` and
writes who it is (host, pid, start time, command) to ``.fxfeat/lock.json`` beside it. A second run into the directory
fails at once with an :class:`~fxfeat.OutputDirectoryError` naming that holder. The kernel drops the lock of a
process however it ends (``kill -9``, a lost node's NFS lease), so a rerun after a crash takes it over; the holder
file only ever names the holder of a lock found taken, never decides anything, and one naming a process of this
host that is no longer alive (a crashed holder's, not yet replaced by the new holder's) is not believed. The lock
file stays in place when released: removing it would let two runs lock two different files.

Object stores (``s3://``, ``gs://``, ...) have no locks: there, runs stay apart by their run-unique temporary
folders and the part records written last (see docs/extract.md).

Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> first = output_lock(out)
    >>> first.acquire()
    >>> output_lock(out).acquire()
    Traceback (most recent call last):
    ...
    fxfeat.errors.OutputDirectoryError: ... is being written by another fxfeat run: pid ... on ..., started ...
    Hint: wait for that run to finish, or write to another directory. ...
    >>> first.release()
    >>> output_lock(out).acquire()   # released: the next run takes it
    >>> output_lock("s3://bucket/features") is None   # an object store: no lock
    True
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import datetime
from typing import Any

from fxfeat.errors import MissingDependencyError, OutputDirectoryError
from fxfeat.extraction.files import is_url
from fxfeat.extraction.filesystem import local_files, write_file
from fxfeat.extraction.format import LOCK, LOCK_HOLDER, MANIFEST, STATE

__all__ = ["OutputLock", "is_local_output", "output_lock"]

# How long a run that finds the lock taken waits for its holder to write who it is (the holder writes it right
# after taking the lock).
_HOLDER_WAIT_SECONDS = 2.0


def is_local_output(out: str | os.PathLike) -> bool:
    """Whether the output ``out`` is a path of this machine's filesystems (where a lock works) rather than a URL
    of another filesystem (an object store, a remote server); ``file://`` URLs are local.

    Example:
        >>> is_local_output("features"), is_local_output("file:///data/features"), is_local_output("s3://b/f")
        (True, True, False)
    """
    out = os.fspath(out)
    return not is_url(out) or out.startswith("file://")


def output_lock(out: str | os.PathLike) -> OutputLock | None:
    """The lock of the output directory ``out``, or ``None`` where ``out`` is on a filesystem without locks."""
    if not is_local_output(out):
        return None
    return OutputLock(os.fspath(out).removeprefix("file://"))


class OutputLock:
    """The lock of one local output directory (see the module docstring).

    Args:
        out: the output directory (it need not exist yet).
    """

    def __init__(self, out: str):
        self.out = out
        self._lock: Any = None

    def acquire(self) -> None:
        """Take the lock, or fail at once.

        A path that is a file, or a directory that holds other files and nothing of fxfeat's, is not locked
        (nothing is written into it): the directory check refuses it.

        Raises:
            OutputDirectoryError: another run holds the lock; the message names it.
        """
        if os.path.exists(self.out) and (not os.path.isdir(self.out) or self._foreign()):
            return
        filelock = _filelock()
        os.makedirs(os.path.join(self.out, STATE), exist_ok=True)
        lock = filelock.FileLock(os.path.join(self.out, LOCK), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise self._taken() from None
        self._lock = lock
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.orig_argv)[:500]}
        write_file(local_files(), os.path.join(self.out, LOCK_HOLDER), json.dumps(holder).encode())

    def release(self) -> None:
        """Let the next run take the directory (nothing where the lock was not taken)."""
        if self._lock is None:
            return
        try:  # before the lock is released: a holder file never outlives its lock
            os.unlink(os.path.join(self.out, LOCK_HOLDER))
        except FileNotFoundError:
            pass
        self._lock.release()
        self._lock = None

    def _foreign(self) -> bool:
        entries = os.listdir(self.out)
        return bool(entries) and STATE not in entries and MANIFEST not in entries

    def _taken(self) -> OutputDirectoryError:
        holder = self._live_holder()
        if holder is None:
            who = "a process that has not yet written who it is (in .fxfeat/lock.json)"
        else:
            started = datetime.fromtimestamp(holder["started"]).astimezone()
            who = (f"pid {holder['pid']} on {holder['host']}, started {started:%Y-%m-%d %H:%M:%S %Z} "
                   f"({_ago(time.time() - holder['started'])} ago): {holder['command']}")
        return OutputDirectoryError(
            f"{self.out} is being written by another fxfeat run: {who}.",
            hint="wait for that run to finish, or write to another directory. A run that died (killed, crashed, a "
                 "lost node) holds nothing: the operating system released its lock, and a rerun of the same command "
                 "takes over and resumes; there is no lock file to delete.")

    def _live_holder(self) -> dict[str, Any] | None:
        """The holder file's contents, once they name a live process (or one of another host, which cannot be
        checked from here); ``None`` if they do not within a moment."""
        deadline = time.monotonic() + _HOLDER_WAIT_SECONDS
        while True:
            holder = _read_holder(os.path.join(self.out, LOCK_HOLDER))
            if holder is not None and (holder["host"] != socket.gethostname() or _alive(holder["pid"])):
                return holder
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)


def _read_holder(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            holder = json.load(handle)
        return holder if {"host", "pid", "started", "command"} <= set(holder) else None
    except (OSError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _ago(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _filelock():
    try:
        import filelock
    except ImportError:
        raise MissingDependencyError("fxfeat.extract locks its output directory with filelock.",
                                     hint="pip install 'fxfeat[extract]'.") from None
    return filelock
