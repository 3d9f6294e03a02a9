"""A damaged newest checkpoint: resume from the previous one, never from zero silently.

Real torch checkpoints written by the training loop, then truncated on disk (as a
full disk or a partial copy leaves them).
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtx.cli import main
from medtx.data.cache import write_cache_index
from medtx.errors import MedtxError
from medtx.train.checkpoints import last_path, load_state, previous_path
from medtx.train.data import items_from_indexes
from medtx.train.loop import train
from medtx.train.pretrain import pretrain_exemplar

CONFIG = {
    "lr": 1e-2,
    "lr_decay": 0.9,
    "epochs": 3,
    "patience": 10,
    "batch_size": 4,
    "seed": 7,
    "log_every": 1,
    "threads": 1,
}  # 10 items in batches of 4: 3 steps per epoch, a save at each epoch's end


def toy_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g)
    return [{"x": x[i], "y": x[i, :2].sum(0, keepdim=True)} for i in range(10)]


def toy_loss(model, batch, ctx):
    shape = batch["x"].shape[1:]  # each volume's noise from its own generator
    noise = 0.01 * torch.stack([torch.randn(shape, generator=g) for g in ctx.generators()])
    return F.mse_loss(model(batch["x"] + noise), batch["y"])


def run(out, lines=None, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    return train(
        model,
        toy_data(),
        loss_fn=toy_loss,
        out=out,
        config=CONFIG,
        log=(lines.append if lines is not None else lambda _: None),
        handle_signals=False,
        **kw,
    )


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2


def global_step(path):
    return torch.load(path, weights_only=True)["global_step"]


@pytest.fixture
def cut(tmp_path):
    """A run stopped after 4 steps: <out>.last.pt at step 4, <out>.prev.pt at step 3."""
    out = tmp_path / "m.pt"
    assert run(out, max_steps_this_run=4).status == "interrupted"
    assert global_step(last_path(out)) == 4 and global_step(previous_path(out)) == 3
    return out


def test_truncated_newest_resumes_from_previous_and_says_so(tmp_path, cut):
    whole = run(tmp_path / "whole.pt")
    truncate(last_path(cut))
    lines = []
    rest = run(cut, lines=lines)
    assert rest.status == "finished" and rest.resumed_from == (1, 0)
    assert rest.steps_this_run == 6  # steps 4..9 redone from the epoch-1 state
    (warning,) = [line for line in lines if "WARNING" in line]
    assert str(last_path(cut)) in warning and str(previous_path(cut)) in warning
    assert "cannot read checkpoint" in warning and "\n" not in warning
    # resuming from an earlier state is still an exact resume
    for key, value in load_state(tmp_path / "whole.pt")["model"].items():
        torch.testing.assert_close(load_state(cut)["model"][key], value, atol=1e-6, rtol=0)
    assert [h["train_loss"] for h in rest.history] == pytest.approx(
        [h["train_loss"] for h in whole.history], abs=1e-6
    )


def test_fallback_never_displaces_the_good_previous_state(cut):
    truncate(last_path(cut))
    previous = previous_path(cut).read_bytes()
    assert run(cut, max_steps_this_run=1).status == "interrupted"
    # the unreadable newest was replaced by step 4 again; step 3 is still kept
    assert previous_path(cut).read_bytes() == previous
    assert global_step(last_path(cut)) == 4
    run(cut, max_steps_this_run=1)  # now both are good: the save rotates
    assert global_step(previous_path(cut)) == 4 and global_step(last_path(cut)) == 5


def test_missing_newest_resumes_from_previous(cut):
    last_path(cut).unlink()  # a kill between keeping the previous and renaming the new
    lines = []
    rest = run(cut, lines=lines)
    assert rest.status == "finished" and rest.resumed_from == (1, 0)
    assert any(f"{last_path(cut)} is missing" in line for line in lines)


def test_no_readable_checkpoint_fails_in_one_line_and_keeps_the_files(tmp_path, cut):
    kept = {p: truncate(p) for p in (last_path(cut), previous_path(cut))}
    with pytest.raises(MedtxError) as err:
        run(cut)
    message = str(err.value)
    assert "\n" not in message
    assert message.count("cannot read checkpoint") == 2
    assert f"delete {last_path(cut)} and {previous_path(cut)} to train from scratch" in message
    assert {p: p.stat().st_size for p in kept} == kept  # nothing was overwritten
    assert not cut.exists()


def test_only_a_truncated_checkpoint_fails_instead_of_starting_from_zero(tmp_path):
    out = tmp_path / "m.pt"
    run(out, max_steps_this_run=2)  # one save: no previous state yet
    assert not previous_path(out).exists()
    truncate(last_path(out))
    with pytest.raises(MedtxError, match=rf"delete {last_path(out)} to train from scratch"):
        run(out)
    last_path(out).unlink()  # the user asks for a fresh start by deleting it
    fresh = run(out)
    assert fresh.status == "finished" and fresh.resumed_from is None


def test_previous_state_of_another_config_is_no_fallback(cut):
    CONFIG["lr"] = 5e-3  # the previous state must belong to this run's config
    try:
        run(cut.with_name("other.pt"), max_steps_this_run=4)
        previous_path(cut).write_bytes(previous_path(cut.with_name("other.pt")).read_bytes())
    finally:
        CONFIG["lr"] = 1e-2
    truncate(last_path(cut))
    with pytest.raises(MedtxError, match="cannot be read and .* was written for another config"):
        run(cut)


def test_cli_prints_one_line_for_an_unreadable_checkpoint(tmp_path, capsys):
    """A real stage checkpoint, truncated: ``medtx pretrain`` exits 1 with one line."""
    scans, images = ["sub-a", "sub-b"], []
    rng = np.random.default_rng(0)
    for scan in scans:
        images.append(tmp_path / f"{scan}.npy")
        np.save(images[-1], rng.uniform(0, 1, (1, 16, 20, 12)).astype(np.float16))
    index = write_cache_index("toy", scans, images, tmp_path / "index.tsv")
    config = {"threads": 1, "batch_size": 2, "downsample": 1, "seed": 3}
    out = tmp_path / "enc.pt"
    items = items_from_indexes([index])
    result = pretrain_exemplar(items, out=out, config=config, max_steps_this_run=1, log=print)
    assert result.status == "interrupted"
    truncate(last_path(out))
    args = ["pretrain", "exemplar", "--index", str(index), "--out", str(out)]
    code = main([*args, "--config", json.dumps(config)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"medtx: error: {last_path(out)}: cannot read")
    assert not out.exists()
