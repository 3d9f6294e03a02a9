"""One training step of every backbone x stage x task, read against CUDA's rules on a CPU.

- Deterministic kernels: the step (the real stage function, loader to optimizer and
  checkpoint) runs under ``OpRecorder``; no op it dispatches may be one that PyTorch
  documents as raising on CUDA under ``torch.use_deterministic_algorithms(True)``, the
  trainer's default there (``medtx.train.determinism``).
- bf16: the same step with the trainer's autocast (``Trainer.autocast``, bf16 on
  CUDA) pointed at the CPU in bf16; its loss is finite and within ``BF16_RTOL`` of
  fp32's.
"""

from __future__ import annotations

import math

import pytest
import torch

from medtx.train.determinism import OpRecorder, cuda_determinism_problems
from medtx.train.loop import Trainer
from tests.distributed import matrix

pytestmark = pytest.mark.distributed

# bf16 keeps 8 bits of mantissa (~0.4 % per rounding); a step's loss sums thousands
# of them, mostly cancelling: 3 % leaves room for the largest seen (below 1 %)
BF16_RTOL = 0.03


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    matrix.prepare(root)
    return root


@pytest.mark.parametrize("cid", matrix.CONFIGS)
def test_a_step_runs_no_op_that_cuda_refuses_and_holds_in_bf16(root, cid, monkeypatch):
    folder = root / cid
    folder.mkdir()
    with OpRecorder() as recorder:
        matrix.run(cid, root, folder / "fp32.pt", max_steps=1)
    assert "_to_copy" in recorder.ops and len(recorder.ops) > 20  # it recorded a step
    assert cuda_determinism_problems(recorder.ops) == []
    fp32 = matrix.first_step_loss(folder / "fp32.pt")
    # where the step runs under autocast on CUDA; the loader's collate stays outside
    monkeypatch.setattr(Trainer, "autocast", lambda self: torch.autocast("cpu", torch.bfloat16))
    matrix.run(cid, root, folder / "bf16.pt", max_steps=1)
    bf16 = matrix.first_step_loss(folder / "bf16.pt")
    print(f"{cid}: first-step loss fp32 {fp32:.6g}, bf16 {bf16:.6g}")
    assert math.isfinite(bf16) and bf16 == pytest.approx(fp32, rel=BF16_RTOL)
    assert bf16 != fp32  # autocast did reach the step
