"""Same commit, config and inputs on one machine: bit-identical pre-training checkpoints.

docs/reproducibility.md promises this; across machines it promises only closeness.
"""

import torch

from medtx.train.checkpoints import load_state
from medtx.train.mim import pretrain_mim, pretrain_tokenizer
from medtx.train.pretrain import pretrain_exemplar, pretrain_masked
from tests.unit.train.test_stages import FAST, TWO_CLASSES, write_items

PUMIT = {**FAST, **TWO_CLASSES, "backbone": "pumit", "preset": "tiny"}


def differing(a: dict, b: dict) -> list[str]:
    """Names of the tensors that are not bit-identical (or present in one state only)."""
    names = sorted(set(a) | set(b))
    return [k for k in names if k not in a or k not in b or not torch.equal(a[k], b[k])]


def medical_transformer(items, out):
    cfg = {**FAST, **TWO_CLASSES, "epochs": 2}
    pretrain_exemplar(items, out=out / "s1.pt", config=cfg, log=lambda _: None)
    pretrain_masked(items, init=out / "s1.pt", out=out / "s2.pt", config=cfg, log=lambda _: None)
    return [load_state(out / name) for name in ("s1.pt", "s2.pt")]


def pumit(items, out):
    pretrain_tokenizer(items, out=out / "tok.pt", config={**PUMIT, "epochs": 2}, log=lambda _: None)
    pretrain_mim(
        items,
        init=out / "tok.pt",
        out=out / "mim.pt",
        config={**PUMIT, "epochs": 2},
        log=lambda _: None,
    )
    return [load_state(out / name) for name in ("tok.pt", "mim.pt")]


def test_pre_training_twice_gives_bit_identical_checkpoints(tmp_path):
    items = write_items(tmp_path / "data", 5, seed=5, prefix="pre")
    for backbone in (medical_transformer, pumit):
        first = backbone(items, tmp_path / backbone.__name__ / "first")
        second = backbone(items, tmp_path / backbone.__name__ / "second")
        for a, b in zip(first, second):
            assert a["global_step"] == b["global_step"] > 0
            assert not differing(a["model"], b["model"]), backbone.__name__
            assert losses(a) == losses(b)


def losses(state: dict) -> list:
    """Each epoch's training figures, without its timings."""
    return [
        {k: v for k, v in epoch.items() if "second" not in k and "time" not in k}
        for epoch in state["history"]
    ]
