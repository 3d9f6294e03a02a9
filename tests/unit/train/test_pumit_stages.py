"""PUMIT's stages on tiny cached volumes: the tokenizer and its codebook usage, MIM
from the frozen tokenizer, and fine-tuning from the MIM checkpoint's ViT."""

import json

import pytest
import torch

from medtx.errors import ConfigError, MedtxError
from medtx.train.finetune import finetune
from medtx.train.loop import load_state
from medtx.train.mim import pretrain_mim, pretrain_tokenizer
from medtx.train.pretrain import pretrain_exemplar
from tests.unit.train.test_stages import FAST, TWO_CLASSES, write_items

PUMIT = {**FAST, "backbone": "pumit", "preset": "tiny", "batch_size": 2}
SHAPE = (20, 24, 18)  # padded to 32 x 32 x 32 inside: 2 x 2 x 2 = 8 tokens


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Tokenizer (2 epochs) then MIM (2 epochs) on 4 volumes."""
    root = tmp_path_factory.mktemp("pumit")
    items = write_items(root / "pre", 4, shape=SHAPE, prefix="p")
    tok = pretrain_tokenizer(items, out=root / "tokenizer.pt", config={**PUMIT, "epochs": 2})
    mim = pretrain_mim(
        items,
        init=root / "tokenizer.pt",
        out=root / "mim.pt",
        config={**PUMIT, "epochs": 2},
    )
    return root, items, tok, mim


def test_the_tokenizer_records_which_codes_the_volumes_use(chain):
    root, items, tok, _ = chain
    saved = load_state(root / "tokenizer.pt")
    usage = saved["metadata"]["codebook_usage"]
    assert len(usage) == 64  # the tiny codebook
    assert sum(usage) == len(items) * 8  # one code per token position of every volume
    assert usage == tok.extra["codebook_usage"]
    assert saved["metadata"]["stage"] == "pretrain_tokenizer"
    assert saved["metadata"]["left_out"]  # the perceptual and GAN terms, said so


def test_mim_trains_the_vit_and_leaves_the_tokenizer_frozen(chain):
    root, _, _, mim = chain
    saved = load_state(root / "mim.pt")
    tokenizer = load_state(root / "tokenizer.pt")["model"]
    for key, value in tokenizer.items():
        torch.testing.assert_close(saved["model"][f"tokenizer.{key}"], value)
    assert saved["metadata"]["trained"] == ["vit", "mim_head"]
    assert saved["metadata"]["mask_ratio"] == 0.55  # PUMIT's default, not the MT's 0.1
    assert saved["metadata"]["model_kwargs"]["backbone"] == "pumit"
    assert len(mim.history) == 2 and all(h["train_loss"] > 0 for h in mim.history)


def test_mim_needs_a_tokenizer_checkpoint(chain, tmp_path):
    root, items, _, _ = chain
    with pytest.raises(MedtxError, match="not a tokenizer checkpoint"):
        pretrain_mim(items, init=root / "mim.pt", out=tmp_path / "x.pt", config=PUMIT)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_finetuning_loads_the_pretrained_vit(chain, tmp_path, task):
    root, *_ = chain
    kw = {"shape": SHAPE, "task": task}
    train, val, test = (
        write_items(tmp_path / name, n, seed=s, prefix=name, **kw)
        for name, n, s in (("tr", 4, 0), ("va", 2, 1), ("te", 2, 2))
    )
    result = finetune(
        task,
        train,
        val,
        test,
        init=root / "mim.pt",
        out=tmp_path / "m.pt",
        predictions_out=tmp_path / "pred.tsv",
        config={**PUMIT, **TWO_CLASSES, "epochs": 1},
    )
    saved = load_state(tmp_path / "m.pt")
    assert saved["metadata"]["init"]["loaded"] == ["vit"]
    assert "head" in saved["metadata"]["trained"] or "decoder" in saved["metadata"]["trained"]
    metrics = json.loads((tmp_path / "pred.json").read_text())
    assert metrics["n"] == 2 and result.extra["metrics"]["n"] == 2
    if task == "segmentation":  # 4 channels: the 1-channel patch embedding inflated
        mim = load_state(root / "mim.pt")["model"]["vit.patch_embed.weight"]
        assert mim.shape[1] == 1 and saved["model"]["vit.patch_embed.weight"].shape[1] == 4


def test_a_checkpoint_of_the_other_backbone_is_refused(tmp_path):
    items = write_items(tmp_path / "d", 4, shape=SHAPE)
    pretrain_exemplar(items, out=tmp_path / "ex.pt", config={**FAST, "epochs": 1})
    with pytest.raises(ConfigError, match="pre-trained for backbone 'medical_transformer'"):
        finetune(
            "classification",
            items[:2],
            items[2:3],
            items[3:],
            init=tmp_path / "ex.pt",
            out=tmp_path / "m.pt",
            predictions_out=tmp_path / "p.tsv",
            config={**PUMIT, **TWO_CLASSES, "epochs": 1},
        )
