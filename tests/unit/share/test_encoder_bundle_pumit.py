"""PUMIT's pre-trained ViT as an encoder bundle: `medtx export` of a real MIM
checkpoint (``stage-mim.pt``), then fine-tuning from the bundle predicts what
fine-tuning from the checkpoint predicts, file for file."""

import pytest

from medtx.config import load_config
from medtx.share.export import export_encoder
from medtx.train.checkpoints import load_state
from medtx.train.finetune import finetune
from medtx.train.mim import pretrain_mim, pretrain_tokenizer
from medtx.workflow.inputs import model_input_settings, settings_hash
from tests.unit.train.test_stages import FAST, TWO_CLASSES, write_items

CFG = {**FAST, **TWO_CLASSES, "backbone": "pumit", "preset": "tiny", "batch_size": 2}
CFG.update(epochs=1)
SHAPE = (20, 24, 18)  # 8 tokens once padded


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """Tokenizer then MIM trained for real on toy:pre00..pre03, then exported."""
    root = tmp_path_factory.mktemp("pumit-encoder")
    config = load_config()
    settings = model_input_settings(config["preprocess"], "ants", brats=False)
    meta = {"preprocess_hash": settings_hash(settings), "backend": "ants"}
    items = write_items(root / "data", 4, shape=SHAPE, seed=5, prefix="pre")
    quiet = {"config": CFG, "log": lambda _: None, "metadata": meta}
    pretrain_tokenizer(items, out=root / "stage-tokenizer.pt", **quiet)
    pretrain_mim(items, init=root / "stage-tokenizer.pt", out=root / "stage-mim.pt", **quiet)
    bundle = export_encoder(root / "stage-mim.pt", root / "bundle", config=config)
    return root, bundle


def test_the_mim_checkpoint_exports_as_an_encoder_bundle(encoder):
    _, bundle = encoder
    assert bundle.meta["kind"] == "pretrained-encoder" and bundle.meta["stage"] == "pretrain_mim"
    assert bundle.meta["training"]["n_subjects"] == 4


def test_fine_tuning_from_the_bundle_predicts_what_the_checkpoint_predicts(encoder, tmp_path):
    root, bundle = encoder
    items = write_items(tmp_path / "d", 6, shape=SHAPE)
    tables = []
    for name, init in (("ckpt", root / "stage-mim.pt"), ("bundle", bundle.path)):
        finetune(
            "classification",
            items[:2],
            items[2:4],
            items[4:],
            init=init,
            out=tmp_path / f"{name}.pt",
            predictions_out=tmp_path / f"{name}.tsv",
            config=CFG,
            log=lambda _: None,
        )
        assert load_state(tmp_path / f"{name}.pt")["metadata"]["init"]["loaded"] == ["vit"]
        tables.append((tmp_path / f"{name}.tsv").read_bytes())
    assert tables[0] == tables[1]
