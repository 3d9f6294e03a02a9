"""Parse-time helpers of the Snakefile (medtx.workflow.hooks)."""

import gc
import os
import subprocess
import sys

import pytest

from medtx.workflow.hooks import (
    PLANNING_GC_THRESHOLDS,
    RUN_GC_THRESHOLDS,
    plan_with_fewer_gc_passes,
    restore_gc,
    take_results_lock,
)
from medtx.workflow.lock import RUN_ENV, ResultsLock


@pytest.fixture
def keep_gc():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_planning_defers_gc_and_onstart_restores_it(keep_gc):
    gc.set_threshold(*RUN_GC_THRESHOLDS)
    plan_with_fewer_gc_passes()
    assert gc.get_threshold() == PLANNING_GC_THRESHOLDS
    assert PLANNING_GC_THRESHOLDS[0] > RUN_GC_THRESHOLDS[0]
    assert gc.isenabled()  # deferred, not switched off
    restore_gc()
    assert gc.get_threshold() == RUN_GC_THRESHOLDS


def test_onstart_on_an_odd_lock_path_is_one_line(tmp_path, caplog):
    """A folder where the lock file goes: ``medtx: error: ...``, exit status 1, kept."""
    lock = ResultsLock(tmp_path / "results")
    lock.path.mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        take_results_lock(lock)
    assert stop.value.code == 1 and not lock.held
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        f"medtx: error: results folder {lock.folder}: its lock file {lock.path} is a directory,"
        " not a lock file; delete it if no other run is using this folder"
    ]
    assert lock.path.is_dir()


def test_onstart_marks_the_runs_processes_until_release(tmp_path):
    """Every process the run starts carries its token, so a killed run's jobs are seen."""
    lock = ResultsLock(tmp_path / "results")
    take_results_lock(lock)
    try:
        assert os.environ[RUN_ENV] == lock.token
        child = subprocess.run(
            [sys.executable, "-c", f"import os; print(os.environ['{RUN_ENV}'])"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == lock.token
    finally:
        lock.release()
    assert RUN_ENV not in os.environ and not lock.path.exists()
