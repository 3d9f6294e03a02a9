"""DDP on CPUs, every backbone x stage x task: 2 gloo processes under torchrun against 1.

One torchrun job (``ranks.py``) trains each configuration of ``matrix.CONFIGS`` for
3 steps in 2 processes (``find_unused_parameters=False``, as on a cluster), which
checkpoint and stop; meanwhile this process trains each one whole, alone. Then each
2-process run resumes here in 1 process. Without dropout and with the same global
batches (3 volumes, split 2 + 1), the two must agree:

- the first step's gradients, as DDP averaged them, equal one process's (float
  tolerance of the all-reduce), on both ranks, and every trained parameter has one;
- the run resumed with world size 1 ends where the single process ended: weights,
  the epoch losses and validation metrics (sharded over the 2 ranks in epoch 1),
  and the test predictions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medtx.train.checkpoints import last_path, load_state
from tests.distributed import matrix

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
STEPS = 3  # epoch 1 (2 steps, then validation) and one step of epoch 2
RTOL, ATOL = 1e-4, 1e-6  # gradients: relative to the largest of each tensor, plus this
WEIGHTS_RTOL = 0.01  # the final weights' distance, against how far training moved them
METRIC_RTOL = 5e-3  # epoch losses, validation metrics and test predictions


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    matrix.prepare(root)
    for cid in matrix.CONFIGS:
        (root / cid).mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = root / "torchrun.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            + ["--nproc-per-node", "2", str(REPO / "tests/distributed/ranks.py")]
            + [str(root), str(STEPS)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        one = {}
        with matrix.no_dropout():  # meanwhile: each configuration whole, in one process
            for cid in matrix.CONFIGS:
                with matrix.first_step_gradients(root / cid / "grads-1.pt"):
                    one[cid] = matrix.run(cid, root, root / cid / "one.pt")
                matrix.run(cid, root, root / cid / "init.pt", max_steps=0)  # the start
        rc = job.wait(timeout=900)
    assert rc == 0, "torchrun failed:\n" + log.read_text()[-4000:]
    resumed = {}
    with matrix.no_dropout():
        for cid in matrix.CONFIGS:
            saved = load_state(last_path(root / cid / "ddp.pt"))
            assert saved["world_size"] == 2 and saved["global_step"] == STEPS, cid
            resumed[cid] = matrix.run(cid, root, root / cid / "ddp.pt")
    return root, one, resumed


def assert_close_tensors(ours, theirs, what):
    assert len(ours) == len(theirs), what
    for i, (a, b) in enumerate(zip(ours, theirs)):
        scale = float(b.abs().max()) if b.numel() else 0.0
        assert torch.allclose(a, b, rtol=RTOL, atol=ATOL + RTOL * scale), f"{what}: tensor {i}"


@pytest.mark.parametrize("cid", matrix.CONFIGS)
def test_two_processes_compute_the_gradients_of_one(runs, cid):
    root = runs[0]
    one, two, other_rank = (
        torch.load(root / cid / name, weights_only=True)["grads"]
        for name in ("grads-1.pt", "grads-2.pt", "grads-2.rank1.pt")
    )
    for grads in (one, two):  # every trained parameter got a gradient
        assert grads and not any(g.isnan().any() for g in grads), cid
    assert any(g.abs().sum() > 0 for g in one)  # a step that moved something
    assert_close_tensors(two, one, f"{cid}: rank 0 against 1 process")
    assert_close_tensors(other_rank, two, f"{cid}: rank 1 against rank 0")


@pytest.mark.parametrize("cid", matrix.CONFIGS)
def test_a_two_process_run_resumed_alone_ends_as_one_process(runs, cid):
    root, one, resumed = runs
    result = resumed[cid]
    assert result.status == "finished" and result.resumed_from == (1, 1), cid
    assert result.world_size == 1
    for key in ("train_loss", "val_metric"):  # pre-training has no validation metric
        ours = [h[key] for h in result.history]
        theirs = [h[key] for h in one[cid].history]
        if theirs[0] is None:
            assert ours == theirs, key
        else:
            assert ours == pytest.approx(theirs, rel=METRIC_RTOL, abs=1e-6), key
    # Adam turns round-off in gradients that should be 0 (a bias before a norm) into
    # whole steps, so the weights are compared as a whole: their distance against how
    # far training moved them (one step of difference would be ~25 % of it)
    # the last states (a stage's <out> may keep part of what it trains: the tokenizer
    # without its discriminator)
    a, b, start = (
        load_state(last_path(root / cid / name))["model"]
        for name in ("ddp.pt", "one.pt", "init.pt")
    )
    assert a.keys() == b.keys() == start.keys()
    apart = torch.cat([(a[k].float() - b[k].float()).flatten() for k in a]).norm()
    moved = torch.cat([(b[k].float() - start[k].float()).flatten() for k in a]).norm()
    assert moved > 0 and apart <= WEIGHTS_RTOL * moved, f"{cid}: {apart:.3g} of {moved:.3g}"
    if cid.split("-")[1] in matrix.TASKS:
        ours = pd.read_csv(root / cid / "ddp.tsv", sep="\t").select_dtypes("number")
        theirs = pd.read_csv(root / cid / "one.tsv", sep="\t").select_dtypes("number")
        np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), rtol=METRIC_RTOL, atol=1e-4)
