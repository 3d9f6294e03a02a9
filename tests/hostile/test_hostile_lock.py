"""One run at a time per results folder, whatever its working directory.

Issue 12: Snakemake locks one working directory only; two runs with
different ``-d`` on the same ``results:`` ran the same jobs, and one crashed
on a file the other had removed. ``medtx.workflow.lock`` holds the results
folder from the workflow's ``onstart`` to its ``onsuccess``/``onerror``.
These tests use real processes: a holder, a second run, a killed run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from medtx.data.scans import stamp_scan_table, write_scan_table
from medtx.workflow.lock import LOCK_NAME, ResultsLock, ResultsLockedError
from tests.conftest import REPO, sphere, write_nifti

SNAKEMAKE = str(REPO / ".venv" / "bin" / "snakemake")
HOLD = """
import sys
from medtx.workflow.lock import ResultsLock
lock = ResultsLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""
TAKE = """
import sys
from medtx.errors import MedtxError
from medtx.workflow.lock import ResultsLock
try:
    ResultsLock(sys.argv[1]).acquire()
except MedtxError as err:
    sys.exit(f"medtx: error: {err}")
print("taken", flush=True)
"""


def python(code: str, results: Path, cwd: Path, **kw) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(results)], cwd=cwd, env=env, text=True, **kw
    )


def hold(results: Path, cwd: Path) -> subprocess.Popen:
    """A process holding the lock until its stdin closes."""
    proc = python(HOLD, results, cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def take(results: Path, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """A second process taking the lock (and releasing it as it exits)."""
    proc = python(TAKE, results, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"taking the lock hung for {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_second_run_refuses_naming_the_first(tmp_path):
    results = tmp_path / "results"
    holder = hold(results, tmp_path / "wd1")
    owner = json.loads((results / LOCK_NAME).read_text())
    second = take(results, tmp_path / "wd2")
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert lines[0] == (
        f"medtx: error: results folder {results} is in use by another run (host"
        f" {socket.gethostname()}, pid {holder.pid}, started {owner['started']},"
        f" workdir {tmp_path / 'wd1'}); wait for it to end, or delete"
        f" {results / LOCK_NAME} if that run is gone"
    )
    assert json.loads((results / LOCK_NAME).read_text()) == owner  # untouched

    holder.communicate("", timeout=60)  # the first run ends and gives the lock back
    assert holder.returncode == 0 and not (results / LOCK_NAME).exists()
    third = take(results, tmp_path / "wd2")
    assert third.returncode == 0 and third.stdout == "taken\n", third.stderr
    assert not (results / LOCK_NAME).exists()  # released at exit


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    results = tmp_path / "results"
    (results / "kept.txt").parent.mkdir(parents=True)
    (results / "kept.txt").write_text("computed")
    holder = hold(results, tmp_path / "wd1")
    holder.kill()
    holder.wait()
    assert json.loads((results / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
    second = take(results, tmp_path / "wd2")
    assert second.returncode == 0 and second.stdout == "taken\n", second.stderr
    warning = second.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(
        f"medtx: warning: results folder {results}: taking over the lock of a run that is gone"
    )
    assert f"pid {holder.pid}," in warning[0] and str(tmp_path / "wd1") in warning[0]
    assert (results / "kept.txt").read_text() == "computed"


def write_lock(results: Path, **owner) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / LOCK_NAME
    path.write_text(json.dumps({"token": "x", "started": "then", "workdir": "/w", **owner}))
    return path


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    path = write_lock(tmp_path / "r", host="elsewhere.example", pid=999_999_999)
    with pytest.raises(ResultsLockedError, match=r"in use by another run \(host elsewhere"):
        ResultsLock(tmp_path / "r").acquire()
    assert json.loads(path.read_text())["host"] == "elsewhere.example"


def test_reused_pid_is_a_gone_run(tmp_path, capsys):
    """Our own pid, but a different process start time: the recorded run is gone."""
    write_lock(tmp_path / "r", host=socket.gethostname(), pid=os.getpid(), pid_start=1)
    lock = ResultsLock(tmp_path / "r")
    lock.acquire()
    assert "taking over" in capsys.readouterr().err
    assert json.loads(lock.path.read_text())["token"] == lock.token
    lock.release()
    assert not lock.path.exists()


def test_unreadable_lock_refuses_naming_its_file(tmp_path):
    path = tmp_path / "r" / LOCK_NAME
    path.parent.mkdir()
    path.write_text("garbage")
    with pytest.raises(ResultsLockedError) as err:
        ResultsLock(tmp_path / "r").acquire()
    assert str(err.value) == (
        f"results folder {tmp_path / 'r'}: its lock file {path} cannot be read;"
        " delete it if no other run is using this folder"
    )
    assert path.read_text() == "garbage"


def test_release_keeps_a_lock_another_run_took_over(tmp_path):
    lock = ResultsLock(tmp_path / "r")
    lock.acquire()
    path = write_lock(tmp_path / "r", host="elsewhere.example", pid=1)
    lock.release()
    assert json.loads(path.read_text())["host"] == "elsewhere.example"


# --- the workflow: one cheap job (bet, template method, on a tiny image) ---


def tiny_workflow(tmp_path: Path) -> tuple[Path, Path]:
    """A one-scan CSV dataset; returns (config file, results folder shared by runs)."""
    write_nifti(
        tmp_path / "data" / "h0.nii.gz",
        sphere((40, 48, 40), radius=14),
        np.diag([4.0, 4.0, 4.0, 1.0]),
    )
    set_site(tmp_path, None)
    results = tmp_path / "shared results"
    config = {
        "results": str(results),
        "datasets": {
            "h": {"kind": "csv", "role": ["pretrain"], "path": str(tmp_path / "data/scans.csv")}
        },
        "preprocess": {
            "backend": "ants",
            "bet": {"ants": {"method": "template", "aff_iterations": [20, 10]}},
            "job_per": "step",  # so that `--until bet` runs one cheap step
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "c.yaml", results


def set_site(tmp_path: Path, site: str | None) -> None:
    """(Re)write the tiny dataset's table, with a site column when ``site`` is given."""
    rows = [["subject", "t1"], ["h0", "h0.nii.gz"]]
    if site is not None:
        rows = [[*rows[0], "site"], [*rows[1], site]]
    with open(tmp_path / "data" / "scans.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def snakemake_cmd(configfile: Path, work: Path, *args: str, until: str | None = "bet") -> list[str]:
    work.mkdir(exist_ok=True)
    return [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(work)] + [
        "--configfile",
        str(configfile),
        "--cores",
        "1",
        *(["--until", until] if until else []),
        *args,
    ]


@pytest.mark.integration
def test_snakemake_refuses_while_another_run_holds_the_results(tmp_path, medtx_env):
    configfile, results = tiny_workflow(tmp_path)
    holder = hold(results, tmp_path / "wd1")
    try:
        lock = (results / LOCK_NAME).read_text()
        dry = subprocess.run(
            snakemake_cmd(configfile, tmp_path / "wd2", "-n"),
            capture_output=True,
            text=True,
            timeout=300,
            env=medtx_env,
        )
        assert dry.returncode == 0, dry.stderr[-3000:]  # a dry run neither takes nor waits
        assert "bet" in dry.stdout

        run = subprocess.run(
            snakemake_cmd(configfile, tmp_path / "wd2"),
            capture_output=True,
            text=True,
            timeout=300,
            env=medtx_env,
        )
        out = run.stdout + run.stderr
        assert run.returncode == 1, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"medtx: error: results folder {results} is in use by another run")
        assert f"pid {holder.pid}," in last and f"workdir {tmp_path / 'wd1'})" in last
        assert "Traceback" not in out and 'File "' not in out
        assert (results / LOCK_NAME).read_text() == lock  # the first run's, untouched
        assert not (results / "work").exists()  # no job ran
        assert not list((tmp_path / "wd2" / ".snakemake").glob("locks/*"))  # -d not left locked

        # A job Snakemake spawns (SLURM, group jobs) runs with --no-hooks --nolock:
        # it works inside the run that holds the lock, so it must not wait on it.
        inner = subprocess.run(
            snakemake_cmd(configfile, tmp_path / "wd1", "--no-hooks", "--nolock"),
            capture_output=True,
            text=True,
            timeout=300,
            env=medtx_env,
        )
        assert inner.returncode == 0, inner.stderr[-3000:]
        assert (results / "work" / "h" / "sub-h0" / "sub-h0_step-bet.json").exists()
        assert (results / LOCK_NAME).read_text() == lock
    finally:
        holder.communicate("", timeout=60)


def _bet_job_running(tmp_path) -> bool:
    """Whether a ``python -m medtx step bet`` of this test's run has started."""
    found = subprocess.run(
        ["pgrep", "-f", f"^[^ ]*python[^ ]* -m medtx step bet .*{tmp_path.name}"],
        capture_output=True,
        text=True,
    )
    return bool(found.stdout.strip())


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted_run(tmp_path, medtx_env) -> tuple[int, str, Path]:
    """A run Ctrl-C'd while its bet job runs: (exit status, output, results folder)."""
    configfile, results = tiny_workflow(tmp_path)
    proc = subprocess.Popen(
        snakemake_cmd(configfile, tmp_path / "wd"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=medtx_env,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches it
        # a Ctrl-C as a terminal delivers it, even where this test runs with SIGINT
        # ignored (started with & by a non-interactive shell, which every child inherits)
        preexec_fn=_default_sigint,
    )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 120
        while not (results / LOCK_NAME).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        assert json.loads((results / LOCK_NAME).read_text())["pid"] == proc.pid
        while not _bet_job_running(tmp_path):  # the step's Python, not only its shell
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, results


@pytest.mark.integration
def test_ctrl_c_gives_the_lock_back(tmp_path, medtx_env):
    # On a busy machine the job can finish before Snakemake acts on the
    # interrupt; the run then ends normally. Such a try proves nothing either
    # way, so up to three are made.
    for attempt in range(3):
        code, out, results = _interrupted_run(tmp_path / f"try{attempt}", medtx_env)
        assert not (results / LOCK_NAME).exists(), out[-3000:]
        if code != 0:
            break
    assert code != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


# --- issue 31: the lock covers every write, and a killed run's jobs ---


def lock_line(results: Path, what: str) -> str:
    return (
        f"medtx: error: results folder {results}: its lock file {results / LOCK_NAME} is"
        f" {what}, not a lock file; delete it if no other run is using this folder"
    )


def odd_lock(results: Path, kind: str) -> Path:
    results.mkdir(parents=True)
    path = results / LOCK_NAME
    if kind == "a directory":
        path.mkdir()
        (path / "inside").write_text("kept")
    elif kind == "a FIFO":
        os.mkfifo(path)
    else:  # a symbolic link to a valid-looking lock: not ours to follow or remove
        target = write_lock(results / "elsewhere", host=socket.gethostname(), pid=1)
        path.symlink_to(target)
    return path


@pytest.mark.parametrize("kind", ["a directory", "a FIFO", "a symbolic link"])
def test_odd_lock_path_is_one_line_and_kept(tmp_path, kind):
    results = tmp_path / "results"
    path = odd_lock(results, kind)
    before = path.lstat()
    second = take(results, tmp_path / "wd", timeout=20)  # a FIFO opened for reading hangs
    assert second.returncode == 1, second.stderr
    assert second.stderr.strip().splitlines() == [lock_line(results, kind)], second.stderr
    after = path.lstat()
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # left as it was


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_lock_is_one_line(tmp_path):
    path = write_lock(tmp_path / "r", host=socket.gethostname(), pid=1)
    path.chmod(0)
    try:
        second = take(tmp_path / "r", tmp_path / "wd", timeout=20)
    finally:
        path.chmod(0o644)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"medtx: error: results folder {tmp_path / 'r'}: its lock file {path} cannot be read"
        " (Permission denied); delete it if no other run is using this folder"
    ]


def results_state(results: Path) -> dict[str, bytes | None]:
    """Every path under the results folder with its bytes (None for a folder)."""
    if not results.exists():
        return {}
    return {
        str(p.relative_to(results)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(results.rglob("*"))
    }


def snakemake(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.integration
def test_refused_run_leaves_the_first_runs_scan_table(tmp_path, medtx_env):
    """Scan tables are written by a job, under the lock, never while parsing."""
    configfile, results = tiny_workflow(tmp_path)
    set_site(tmp_path, "first")
    table = results / "scans" / "h.tsv"
    first = snakemake(
        snakemake_cmd(configfile, tmp_path / "wd1", str(table), until=None), medtx_env
    )
    assert first.returncode == 0, first.stderr[-3000:]
    written = table.read_bytes()
    assert b"\tfirst\t" in written
    holder = hold(results, tmp_path / "wd1")  # the first run, still going
    try:
        set_site(tmp_path, "second")  # the second run reads other site values
        second = snakemake(snakemake_cmd(configfile, tmp_path / "wd2"), medtx_env)
        out = second.stdout + second.stderr
        assert second.returncode == 1, out[-3000:]
        assert (
            out.strip()
            .splitlines()[-1]
            .startswith(f"medtx: error: results folder {results} is in use by another run")
        )
        assert table.read_bytes() == written  # the first run's table, untouched
    finally:
        holder.communicate("", timeout=60)

    # Once the first run is gone, a run from another working directory (no
    # Snakemake metadata there) brings the table up to date.
    third = snakemake(
        snakemake_cmd(configfile, tmp_path / "wd3", str(table), until=None), medtx_env
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert b"\tsecond\t" in table.read_bytes()
    again = snakemake(
        snakemake_cmd(configfile, tmp_path / "wd1", str(table), "-n", until=None), medtx_env
    )
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.integration
def test_dry_run_writes_nothing_into_results(tmp_path, medtx_env):
    configfile, results = tiny_workflow(tmp_path)
    fresh = snakemake(snakemake_cmd(configfile, tmp_path / "wd", "-n"), medtx_env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert not results.exists(), results_state(results)

    table = results / "scans" / "h.tsv"
    done = snakemake(snakemake_cmd(configfile, tmp_path / "wd", str(table), until=None), medtx_env)
    assert done.returncode == 0, done.stderr[-3000:]
    before = results_state(results)
    assert "scans/h.tsv" in before
    set_site(tmp_path, "changed")  # the table would change
    dry = snakemake(snakemake_cmd(configfile, tmp_path / "wd", "-n"), medtx_env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert results_state(results) == before


SLOW_WORKFLOW = """
from medtx.workflow.hooks import take_results_lock
from medtx.workflow.lock import ResultsLock

LOCK = ResultsLock(config["results"])


onstart:
    take_results_lock(LOCK)


onsuccess:
    LOCK.release()


onerror:
    LOCK.release()


rule slow:
    output:
        "done",
    shell:
        "touch started; while [ ! -e go ]; do sleep 0.1; done; touch {output}"
"""


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_lock_of_a_killed_snakemake_is_kept_while_its_jobs_run(tmp_path, medtx_env):
    work = tmp_path / "wd"
    work.mkdir()
    (work / "Snakefile").write_text(SLOW_WORKFLOW)
    results = tmp_path / "results"
    env = {**medtx_env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [SNAKEMAKE, "-d", str(work), "--cores", "1", "--config", f"results={results}"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a group of its own, as a terminal gives it
    )
    try:
        deadline = time.monotonic() + 120
        while not (work / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert json.loads((results / LOCK_NAME).read_text())["pid"] == proc.pid
        proc.kill()  # Snakemake only; its job goes on
        proc.wait()
        time.sleep(1.5)  # the reported window: taken over about 1 s after the kill
        jobs = group_members(proc.pid)
        assert jobs, "the job should still run"

        second = take(results, tmp_path / "wd2")
        assert second.returncode == 1, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith(
            f"medtx: error: results folder {results} is in use by another run (host"
            f" {socket.gethostname()}, pid {proc.pid},"
        )
        assert "still run" in lines[0] and str(jobs[0]) in lines[0], lines[0]
        assert json.loads((results / LOCK_NAME).read_text())["pid"] == proc.pid

        (work / "go").touch()  # the job ends
        while group_members(proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (work / "done").exists()
        third = take(results, tmp_path / "wd2")
        assert third.returncode == 0 and third.stdout == "taken\n", third.stderr
        warning = third.stderr.strip().splitlines()
        assert len(warning) == 1 and warning[0].startswith(
            f"medtx: warning: results folder {results}: taking over the lock of a run that is gone"
        )
    finally:
        (work / "go").touch()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_scan_table_stamp_is_newer_exactly_when_the_table_is_out_of_date(tmp_path):
    """The scan_table job's input, written at parse time outside the results folder."""
    table, stamp = tmp_path / "results" / "scans" / "d.tsv", tmp_path / "wd" / "d.stamp"
    assert stamp_scan_table(table, "a\n", stamp) == str(stamp)  # no table yet
    assert not table.exists() and stamp.exists()
    write_scan_table("a\n", table)  # the job
    os.utime(table, (1_000_000, 1_000_000))
    stamp_scan_table(table, "a\n", stamp)  # unchanged: older, so nothing reruns
    assert stamp.stat().st_mtime < table.stat().st_mtime
    stamp.unlink()  # another working directory, or tables from before stamps
    stamp_scan_table(table, "a\n", stamp)
    assert stamp.stat().st_mtime < table.stat().st_mtime
    stamp_scan_table(table, "b\n", stamp)  # changed: newer, the job and its readers run
    first = stamp.read_text()
    assert stamp.stat().st_mtime > table.stat().st_mtime and table.read_text() == "a\n"
    stamp_scan_table(table, "b\n", stamp)  # a checksum Snakemake may have recorded: new
    assert stamp.read_text() != first
    stamp_scan_table(table, "a\n", stamp)  # back to what the table holds
    assert stamp.stat().st_mtime < table.stat().st_mtime
