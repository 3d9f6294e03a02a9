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
a warning once that process and every process it started are gone: the jobs
of a killed Snakemake run on, and write, until they end.

The run's processes are told by the lock's token, which the holder puts in
its environment (``MEDTX_RUN_LOCK``) for every process it starts, and, where
a process's environment cannot be read, by the holder's process group and
start time, both recorded in the lock (Linux /proc; elsewhere the group alone).

Anything at the lock's path that is not a regular file (a folder, a FIFO, a
symbolic link) is named in one line and left alone: it is never followed,
opened for a blocking read, or removed.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import json
import os
import socket
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from medtx.errors import MedtxError

LOCK_NAME = ".medtx-run.lock"
RUN_ENV = "MEDTX_RUN_LOCK"  # the holder's token, in the environment of every process it starts
MAX_LOCK_BYTES = 1 << 16  # a lock record is a few hundred bytes
MAX_PIDS_SHOWN = 5


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
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ResultsLockedError(
                f"results folder {self.folder}: cannot be created ({err.strerror})"
            ) from None
        mine = self._owner()
        for _ in range(5):  # each pass either takes the lock or clears a stale one
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                other = read_owner(self.path)
                if other is None:  # gone between the two calls: try again
                    continue
                if not is_stale(other):
                    raise ResultsLockedError(self._in_use(other)) from None
                self._take_over(other)
                continue
            except OSError as err:
                raise ResultsLockedError(
                    f"results folder {self.folder}: cannot create its lock file {self.path}"
                    f" ({err.strerror})"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(mine, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.held = True
            # every process the run starts from now on carries the token (its jobs)
            os.environ[RUN_ENV] = self.token
            atexit.register(self.release)  # a run that ends without onsuccess/onerror
            return
        raise ResultsLockedError(f"results folder {self.folder}: could not take {self.path}")

    def release(self) -> None:
        """Remove the lock if this process holds it; a lock taken over meanwhile is kept."""
        if not self.held:
            return
        self.held = False
        if os.environ.get(RUN_ENV) == self.token:
            del os.environ[RUN_ENV]
        try:
            owner = read_owner(self.path)
        except ResultsLockedError:  # replaced by something that is not a lock: not ours
            return
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _owner(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "pgid": os.getpgrp(),
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
        if holder_gone(other):
            pids = run_processes(other)
            shown = ", ".join(map(str, pids[:MAX_PIDS_SHOWN])) + (
                ", ..." if len(pids) > MAX_PIDS_SHOWN else ""
            )
            return (
                f"results folder {self.folder} is in use by another run ({describe(other)}):"
                f" that process is gone, but {len(pids)} process(es) it started still run"
                f" (pid {shown}); wait for them to end, or stop them and delete {self.path}"
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

    Raises:
        ResultsLockedError: the path is not a regular file (a folder, a FIFO, a
            symbolic link), or it cannot be read; the message names it.
    """
    for i in range(attempts):
        text = _read_lock_file(path)
        if text is None:
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


_FILE_TYPES = [
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISCHR, "a device"),
]


def _odd_lock(path: Path, mode: int) -> ResultsLockedError:
    what = next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")
    return ResultsLockedError(
        f"results folder {path.parent}: its lock file {path} is {what}, not a lock file;"
        " delete it if no other run is using this folder"
    )


def _read_lock_file(path: Path) -> str | None:
    """The lock file's text; None if there is none. Never follows a symbolic link
    or waits on a FIFO: the type is checked before and after opening."""
    unreadable = (
        f"results folder {path.parent}: its lock file {path} cannot be read ({{}});"
        " delete it if no other run is using this folder"
    )
    try:
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode):
            raise _odd_lock(path, mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ResultsLockedError(unreadable.format(err.strerror)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between the two looks
            raise _odd_lock(path, mode)
        data = os.read(fd, MAX_LOCK_BYTES)
    except OSError as err:
        raise ResultsLockedError(unreadable.format(err.strerror)) from None
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace")


def holder_gone(owner: dict) -> bool:
    """True if the owner ran on this host and its process is gone (or its pid reused).

    A lock from another host is never gone here: its process cannot be seen.
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


def is_stale(owner: dict) -> bool:
    """True if the owner's process is gone (``holder_gone``) and so is every
    process it started: the jobs of a killed Snakemake go on writing."""
    return holder_gone(owner) and not run_processes(owner)


def run_processes(owner: dict) -> list[int]:
    """Live processes on this host that the owner's run started, by pid.

    On Linux, a process is the run's if its environment carries the run's
    token (``RUN_ENV``, inherited by everything the holder started), or, where
    its environment cannot be read (another user's), if it is in the holder's
    process group and started no earlier than the holder. Without /proc, the
    holder's group having any process at all counts (unless it is this
    process's own group, which would always have one).
    """
    pgid = owner.get("pgid")
    pgid = pgid if isinstance(pgid, int) and pgid > 0 else None
    if not Path("/proc/self/stat").exists():
        if pgid is None or pgid == os.getpgrp():
            return []
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    marker = f"{RUN_ENV}={owner.get('token')}".encode()
    since = owner.get("pid_start")
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        fields = _proc_stat(pid)
        if len(fields) < 20 or fields[0] in ("Z", "X"):
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            environ = None
        if environ is not None:
            if marker in environ.split(b"\0"):
                found.append(pid)
        elif (
            pgid is not None
            and int(fields[2]) == pgid
            and (not isinstance(since, int) or int(fields[19]) >= since)
        ):
            found.append(pid)
    return sorted(found)


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
