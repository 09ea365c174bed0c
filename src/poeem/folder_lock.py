"""One writer at a time per run or index folder: ``FOLDER/writer.lock`` names the process
writing it.

The file holds the writer's pid, host, command and start time (JSON), and the writer holds an
advisory ``flock`` on it while it runs, so the kernel releases the lock when the process ends,
however it ends. A second writer is refused with the owner's pid and host. A lock file that no
process holds any more (its writer was killed) is taken over, with a warning. A lock of another
host cannot be checked from here: it is refused until its process ends and the file is deleted.
On a file system without ``flock`` the pid alone decides, on this host.

Under torch.distributed, rank 0 takes the lock and every rank gets its answer
(:func:`folder_writer`), so that all ranks run or all refuse with the same error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from poeem import distributed
from poeem.errors import PoeemError

LOCK_FILE = "writer.lock"


@dataclass(frozen=True)
class Owner:
    """Who holds a folder's lock: what ``writer.lock`` records."""

    pid: int
    host: str
    command: str
    started: str  # local time, ISO 8601

    @classmethod
    def me(cls, command: str) -> Owner:
        """This process, running ``command``."""
        return cls(os.getpid(), socket.gethostname(), command, time.strftime("%Y-%m-%dT%H:%M:%S"))

    @classmethod
    def read(cls, path: Path) -> Owner | None:
        """The owner a lock file records; None for an empty or unreadable one (a writer that
        ended before writing it)."""
        try:
            raw = json.loads(path.read_text())
            return cls(int(raw["pid"]), str(raw["host"]), str(raw["command"]), str(raw["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def __str__(self) -> str:
        return f"pid {self.pid} on host '{self.host}' ('{self.command}', since {self.started})"


def _runs_here(owner: Owner) -> bool:
    """Whether the owner is a running process of this host."""
    if owner.host != socket.gethostname():
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _flock(fd: int) -> bool | None:
    """Take the exclusive flock of ``fd`` without waiting: True, False when another process
    holds it, None when the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


class FolderLock:
    """A held folder lock; :meth:`release` gives it back (and deletes the lock file)."""

    def __init__(self, folder: Path, command: str) -> None:
        self.folder, self.path = folder, folder / LOCK_FILE
        self.created = not folder.exists()  # an empty folder made only for the lock goes with it
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.fd, owner = self._open()
        except OSError as err:
            raise PoeemError(
                f"'{folder}'", "a folder this process can write", str(err), "pass another folder"
            ) from None
        try:
            self._check(owner, command)
            me = Owner.me(command)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(asdict(me)).encode(), 0)
            os.fsync(self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self) -> tuple[int, Owner | None]:
        """The lock file, open with its flock taken (where the file system has one), and the
        owner it records; a lock held by a running process is an error."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            taken = _flock(fd)
            owner = Owner.read(self.path)
            if taken is False:
                os.close(fd)
                raise self._held(owner)
            try:  # a writer that released meanwhile deleted the file this fd opened: open anew
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.flocked = bool(taken)
                return fd, owner
            os.close(fd)

    def _check(self, owner: Owner | None, command: str) -> None:
        """Refuse an owner that may still run; warn when taking over from one that has ended."""
        if owner is None:
            return
        if owner.host != socket.gethostname():
            raise self._held(owner, f"if it has ended, delete '{self.path}' and run this again")
        if not self.flocked and _runs_here(owner):  # no flock here: the pid decides
            raise self._held(owner)
        warnings.warn(
            f"'{self.folder}' was locked by {owner}, which has ended: '{command}' takes the lock over",
            stacklevel=3,
        )

    def _held(self, owner: Owner | None, fix: str | None = None) -> PoeemError:
        who = str(owner) if owner is not None else "another process (starting)"
        pid = owner.pid if owner is not None else "PID"
        return PoeemError(
            f"'{self.folder}'",
            "a folder no other process writes",
            f"a lock held by {who}",
            fix or f"wait for that process to end, or end it ('kill {pid}'), then run this again",
        )

    def release(self) -> None:
        """Delete the lock file and give the lock back; a folder made for it alone goes too."""
        try:
            owner = Owner.read(self.path)
            if owner is not None and owner.pid == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only if nothing else was written there


def writer_of(folder: str | Path) -> Owner | None:
    """The process writing ``folder`` now (a lock held by a running process), or None."""
    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        taken = _flock(fd)
        owner = Owner.read(path)
        if taken is None:  # no flock on this file system: the pid decides
            return owner if owner is not None and _runs_here(owner) else None
        return owner if not taken else None
    finally:
        os.close(fd)  # a flock taken to look is given back


@contextmanager
def folder_writer(folder: str | Path, command: str) -> Iterator[None]:
    """Hold ``folder``'s writer lock while the block runs (see the module doc); a collective call
    under torch.distributed: rank 0 takes the lock and every rank raises its error alike.

    Raises:
        PoeemError: another process writes the folder (its pid, host and command named).
    """
    lock, refused = None, None
    if distributed.is_main():
        try:
            lock = FolderLock(Path(folder), command)
        except PoeemError as err:
            refused = (err.what, err.expected, err.received, err.fix)
    refused = distributed.from_rank0(refused)
    if refused is not None:
        raise PoeemError(*refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
