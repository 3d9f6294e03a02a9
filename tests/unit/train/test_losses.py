"""Losses and the GPU modes: the deterministic cross-entropy, and (with a GPU) that
``deterministic: true`` trains every stage bit for bit again."""

import pytest
import torch
import torch.nn.functional as F

from medtx.train.checkpoints import load_state
from medtx.train.finetune import finetune
from medtx.train.losses import cross_entropy
from medtx.train.pretrain import pretrain_exemplar, pretrain_masked
from tests.unit.train.test_stages import FAST, TWO_CLASSES, write_items


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_cross_entropy_is_torchs_in_value_and_gradient(classes):
    g = torch.Generator().manual_seed(classes)
    logits = (4 * torch.randn(9, classes, generator=g)).requires_grad_()
    target = torch.randint(0, classes, (9,), generator=g)
    ours, theirs = cross_entropy(logits, target), F.cross_entropy(logits, target)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-7)


def cuda_stages(root):
    """Stage 1, stage 2 and a segmentation and a classification fine-tuning on CUDA."""
    cfg = {**FAST, **TWO_CLASSES, "epochs": 2, "deterministic": True, "num_workers": 2}
    pre = write_items(root / "pre", 6, seed=5, prefix="p")
    pretrain_exemplar(pre, out=root / "s1.pt", config=cfg, device="cuda", log=print)
    pretrain_masked(pre, init=root / "s1.pt", out=root / "s2.pt", config=cfg, device="cuda")
    for task in ("classification", "segmentation"):
        sets = [
            write_items(root / task / n, k, task=task, seed=s, prefix=n)
            for n, k, s in (("tr", 8, 0), ("va", 4, 1), ("te", 4, 2))
        ]
        finetune(
            task,
            *sets,
            out=root / f"{task}.pt",
            predictions_out=root / f"{task}.tsv",
            config=cfg,
            device="cuda",
            log=print,
        )
    return {
        name: load_state(root / f"{name}.pt")["model"]
        for name in ("s1", "s2", "classification", "segmentation")
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_cuda_training_repeats_bit_for_bit(tmp_path):
    first, second = cuda_stages(tmp_path / "a"), cuda_stages(tmp_path / "b")
    for stage in first:
        for key, value in first[stage].items():
            assert torch.equal(value, second[stage][key]), f"{stage}: {key}"
