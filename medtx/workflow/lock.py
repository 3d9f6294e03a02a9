"""One run at a time per results folder, from whichever working directory.

Snakemake locks its working directory (``-d``) only: two runs from different
working directories on the same ``results:`` ran the same jobs, and one
crashed on a file the other had removed. This lock lives in the results
folder itself, so every run that writes there sees it.

The workflow takes it in ``onstart`` and gives it back in ``onsuccess`` and
``onerror`` (Ctrl-C ends in ``onerror``). Snakemake calls none of these in a
dry run, when there is nothing to do, or in the jobs it spawns itself (SLURM
jobs, group jobs: they run with ``--no-hooks``), so those neither take nor
wait on it. A run that ends some other way releases it at exit; one that is
killed leaves it behind, and the next run on the same host takes it over with
a warning once that process is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from medtx.errors import MedtxError

LOCK_NAME = ".medtx-run.lock"


class ResultsLockedError(MedtxError):
    """Another run holds the results folder; the message names it."""


class ResultsLock:
    """The lock on one results folder, held by this process between acquire and release."""

    def __init__(self, results: str | Path):
        self.folder = Path(results).absolute()
        self.path = self.folder / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise ``ResultsLockedError`` naming the run that holds it."""
        if self.held:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = self._owner()
        for _ in range(5):  # each pass either takes the lock or clears a stale one
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = read_owner(self.path)
                if other is None:  # gone between the two calls: try again
                    continue
                if not is_stale(other):
                    raise ResultsLockedError(self._in_use(other)) from None
                self._take_over(other)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(mine, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.held = True
            atexit.register(self.release)  # a run that ends without onsuccess/onerror
            return
        raise ResultsLockedError(f"results folder {self.folder}: could not take {self.path}")

    def release(self) -> None:
        """Remove the lock if this process holds it; a lock taken over meanwhile is kept."""
        if not self.held:
            return
        self.held = False
        owner = read_owner(self.path)
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _owner(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "workdir": os.getcwd(),
            "token": self.token,
        }

    def _in_use(self, other: dict) -> str:
        if not other.get("token"):
            return (
                f"results folder {self.folder}: its lock file {self.path} cannot be read;"
                " delete it if no other run is using this folder"
            )
        return (
            f"results folder {self.folder} is in use by another run ({describe(other)});"
            f" wait for it to end, or delete {self.path} if that run is gone"
        )

    def _take_over(self, stale: dict) -> None:
        """Remove ``stale`` unless another run on this host already replaced it."""
        with _folder_guard(self.folder):
            current = read_owner(self.path)
            if current is not None and current.get("token") == stale.get("token"):
                self.path.unlink(missing_ok=True)
                print(
                    f"medtx: warning: results folder {self.folder}: taking over the lock"
                    f" of a run that is gone ({describe(stale)})",
                    file=sys.stderr,
                    flush=True,
                )


def describe(owner: dict) -> str:
    keys = ("host", "pid", "started", "workdir")
    return ", ".join(f"{k} {owner.get(k, '?')}" for k in keys)


def read_owner(path: Path, *, attempts: int = 10) -> dict | None:
    """The lock's owner record; None if there is no lock.

    A lock file is created empty and then written: a reader that comes in
    between waits briefly for the content. One that never becomes a record
    reads as ``{}`` (an owner nobody can name, never judged stale).
    """
    for i in range(attempts):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:
            owner = None
        if isinstance(owner, dict) and owner.get("token"):
            return owner
        if i + 1 < attempts:
            time.sleep(0.1)
    return {}


def is_stale(owner: dict) -> bool:
    """True if the owner ran on this host and its process is gone (or its pid reused).

    A lock from another host is never stale here: its process cannot be seen.
    """
    if not owner.get("token") or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not pid_alive(pid):
        return True
    started = owner.get("pid_start")
    return started is not None and process_start(pid) not in (None, started)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_stat(pid)[:1] != ["Z"]


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (Linux), to tell a reused pid."""
    fields = _proc_stat(pid)
    return int(fields[19]) if len(fields) > 19 else None


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state first); [] if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rfind(")") + 2 :].split()


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """Serialize stale-lock take-overs on this host (flock on the folder itself).

    Only runs on the same host ever take a lock over, so a host-local lock is
    enough; where the file system refuses flock, take-overs go unguarded.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
