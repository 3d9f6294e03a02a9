"""PUMIT's stages on tiny cached volumes: the tokenizer (against its discriminator)
and its codebook usage, MIM from the frozen tokenizer, and fine-tuning from the MIM
checkpoint's ViT."""

import functools
import json

import pytest
import torch

from medtx.errors import ConfigError, MedtxError
from medtx.io import sha256
from medtx.models.pumit import lpips as lpips_module
from medtx.models.pumit.tokenizer import GanSettings
from medtx.train import mim as mim_stage
from medtx.train.checkpoints import last_path, load_state
from medtx.train.finetune import finetune
from medtx.train.mim import build_tokenizer, pretrain_mim, pretrain_tokenizer
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
    # no lpips_weights file: the perceptual term is left out, and said so
    assert saved["metadata"]["left_out"] == ["perceptual (LPIPS: no lpips_weights file)"]
    assert saved["metadata"]["lpips_weights"] is None


def test_the_tokenizer_trains_against_its_discriminator_and_keeps_the_tokenizer_alone(chain):
    root, *_ = chain
    saved = load_state(root / "tokenizer.pt")
    assert saved["model"].keys() == build_tokenizer("tiny").state_dict().keys()
    meta = saved["metadata"]
    # the official loss.yaml's weights (the perceptual term needs the weights file)
    assert meta["losses"] == {"l1": 1.0, "diversity": 1.0, "sharpness": 0.2, "gan": 3e-3}
    assert meta["gan"]["threshold"] == 0.025 and meta["gan"]["momentum"] == 0.9
    assert meta["gan"]["disc_lr_scale"] == 10.0
    state = meta["gan_state"]
    assert state["disc_loss_ema"] != 0.1 and 0 < state["disc_loss_last"] < 2
    assert state["gan_on"] is False  # 4 steps: the EMA is still far above 0.025
    last = load_state(last_path(root / "tokenizer.pt"))
    assert any(k.startswith("discriminator.") for k in last["model"])  # resumable whole
    # tokenizer and discriminator, each split into decayed and spared parameters
    groups = last["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05, 0.0]
    assert groups[2]["initial_lr"] == pytest.approx(10 * groups[0]["initial_lr"])  # 1e-3 vs 1e-4


def test_a_resumed_tokenizer_run_continues_the_gan_ema_exactly(chain, tmp_path):
    root, items, *_ = chain
    config = {**PUMIT, "epochs": 2}
    first = pretrain_tokenizer(items, out=tmp_path / "t.pt", config=config, max_steps_this_run=3)
    assert first.status == "interrupted"
    stopped = load_state(last_path(tmp_path / "t.pt"))["model"]
    assert float(stopped["disc_loss_ema"]) != 0.1
    result = pretrain_tokenizer(items, out=tmp_path / "t.pt", config=config)
    assert result.resumed_from == (1, 1) and result.status == "finished"
    ours = load_state(last_path(tmp_path / "t.pt"))["model"]
    whole = load_state(last_path(root / "tokenizer.pt"))["model"]  # the chain's, not stopped
    assert ours.keys() == whole.keys()
    for key in ("disc_loss_ema", "disc_loss_last", "gan_on"):
        assert torch.equal(ours[key], whole[key]), key
    for key in ours:
        torch.testing.assert_close(ours[key], whole[key], rtol=0, atol=0, msg=key)


def test_the_gan_term_switches_on_below_the_threshold(tmp_path, monkeypatch):
    items = write_items(tmp_path / "d", 4, shape=SHAPE)
    # a threshold every discriminator loss is under: on from the second step
    monkeypatch.setattr(mim_stage, "GanSettings", functools.partial(GanSettings, threshold=10.0))
    pretrain_tokenizer(items, out=tmp_path / "t.pt", config={**PUMIT, "epochs": 1})
    assert load_state(tmp_path / "t.pt")["metadata"]["gan_state"]["gan_on"] is True


def test_the_perceptual_term_needs_a_readable_weights_file(tmp_path, monkeypatch):
    items = write_items(tmp_path / "d", 4, shape=SHAPE)
    config = {**PUMIT, "epochs": 1, "lpips_weights": str(tmp_path / "missing.pt")}
    with pytest.raises(MedtxError, match="lpips_weights .*missing.pt: no such file"):
        pretrain_tokenizer(items, out=tmp_path / "t.pt", config=config)
    assert not last_path(tmp_path / "t.pt").exists()  # refused before training
    from tests.unit.models.test_pumit_tokenizer import random_lpips_file

    weights = tmp_path / "lpips.pt"
    monkeypatch.setattr(lpips_module, "LIN_SHA256", random_lpips_file(weights))
    config["lpips_weights"] = str(weights)
    pretrain_tokenizer(items, out=tmp_path / "t.pt", config=config)
    meta = load_state(tmp_path / "t.pt")["metadata"]
    assert meta["lpips_weights"] == {"path": str(weights), "sha256": sha256(weights)}
    assert meta["losses"]["perceptual"] == 1.0 and meta["left_out"] == []


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
