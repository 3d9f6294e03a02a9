"""A step is skipped while its records hold this run, and runs when anything changed."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtx.preprocess.context import StepContext
from medtx.preprocess.steps import rerun_key, run_step
from medtx.workflow.codehash import code_hash
from tests.conftest import write_nifti

PARAMS = {"pool": {"factor": 2}, "normalize": {"within": "brain"}}


@pytest.fixture
def pool_step(tmp_path):
    """pool_normalize's files by role, on a small synthetic volume."""
    rng = np.random.default_rng(3)
    mask = np.zeros((16, 18, 16), np.float32)
    mask[3:13, 4:14, 3:13] = 1
    image = write_nifti(
        tmp_path / "n4.nii.gz", (rng.random(mask.shape) * 900 * mask).astype(np.float32)
    )
    inputs = {"image": str(image), "mask": str(write_nifti(tmp_path / "mask.nii.gz", mask))}
    outputs = {
        role: str(tmp_path / name)
        for role, name in (
            ("pooled", "pooled.nii.gz"),
            ("mask", "pmask.nii.gz"),
            ("pool_record", "pool.json"),
            ("image", "preproc.nii.gz"),
            ("record", "norm.json"),
        )
    }
    return inputs, outputs


def starts(outputs):
    return [json.loads(open(outputs[r]).read())["start"] for r in ("pool_record", "record")]


def test_a_second_run_with_the_same_inputs_settings_and_code_is_skipped(pool_step):
    inputs, outputs = pool_step
    ctx = StepContext(scan="sub-01")
    assert run_step("pool_normalize", inputs, outputs, PARAMS, ctx) is True
    first = starts(outputs)
    record = json.loads(open(outputs["record"]).read())
    assert record["rerun"] == rerun_key("pool_normalize", PARAMS, ctx)
    assert record["rerun"]["code"] == code_hash("pool_normalize")
    assert run_step("pool_normalize", inputs, outputs, PARAMS, ctx) is False
    assert starts(outputs) == first


@pytest.mark.parametrize(
    "change",
    ["params", "context", "input", "output", "record", "force"],
)
def test_any_change_runs_the_step_again(pool_step, change):
    inputs, outputs = pool_step
    ctx = StepContext(scan="sub-01")
    run_step("pool_normalize", inputs, outputs, PARAMS, ctx)
    params, force = PARAMS, False
    if change == "params":
        params = {**PARAMS, "normalize": {"within": "brain", "clip_percentile": 99.5}}
    elif change == "context":
        ctx = StepContext(scan="sub-01", seed=7)
    elif change == "input":  # a new N4 output
        data = np.asarray(nib.load(inputs["image"]).dataobj)
        write_nifti(Path(inputs["image"]), (data * 2).astype(np.float32))
    elif change == "output":  # an output edited after the step wrote it
        with open(outputs["image"], "ab") as f:
            f.write(b"\x00")
    elif change == "record":  # a record made by other code (another code hash)
        record = json.loads(open(outputs["pool_record"]).read())
        record["rerun"]["code"] = "0" * 16
        open(outputs["pool_record"], "w").write(json.dumps(record))
    else:
        force = True
    assert run_step("pool_normalize", inputs, outputs, params, ctx, force=force) is True


def test_a_record_without_a_rerun_key_runs_the_step(pool_step):
    """Records written before rerun keys existed are not trusted: the step runs."""
    inputs, outputs = pool_step
    ctx = StepContext(scan="sub-01")
    run_step("pool_normalize", inputs, outputs, PARAMS, ctx)
    record = json.loads(open(outputs["record"]).read())
    del record["rerun"]
    open(outputs["record"], "w").write(json.dumps(record))
    assert run_step("pool_normalize", inputs, outputs, PARAMS, ctx) is True


def test_the_rerun_key_names_the_steps_code_and_settings():
    ctx = StepContext(scan="sub-01")
    key = rerun_key("n4", {"shrink_factor": 4}, ctx)
    assert key["code"] == code_hash("n4") != code_hash("bet")
    assert key != rerun_key("n4", {"shrink_factor": 2}, ctx)
    assert key != rerun_key("n4", {"shrink_factor": 4}, StepContext(scan="sub-01", threads=2))
