"""Parse-time helpers of the Snakefile (medtx.workflow.hooks)."""

import gc

import pytest

from medtx.workflow.hooks import (
    PLANNING_GC_THRESHOLDS,
    RUN_GC_THRESHOLDS,
    plan_with_fewer_gc_passes,
    restore_gc,
)


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
