"""The training loop: exact resume after a kill, config checks, early stopping, seeds.

A toy network with dropout and a loss that draws from each volume's generators keeps
these tests fast while exercising every RNG the real stages use.
"""

import dataclasses
import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtx.errors import ConfigError, MedtxError
from medtx.train.checkpoints import CHECKPOINT_FORMAT, MODEL_FORMAT, last_path, load_state
from medtx.train.distributed import Group
from medtx.train.loop import (
    StepContext,
    TrainState,
    config_hash,
    epoch_batches,
    epoch_order,
    resolve_train_config,
    train,
)

BASE = {
    "lr": 1e-2,
    "lr_decay": 0.9,
    "epochs": 3,
    "patience": 10,
    "batch_size": 4,
    "seed": 7,
    "log_every": 1,
    "threads": 1,
}


def toy_data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :2].sum(dim=1, keepdim=True)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))


def toy_loss(model, batch, ctx):
    # noise from each volume's own generators: a resumed run must redraw the same
    shape = tuple(batch["x"].shape[1:])
    jitter = torch.stack(
        [torch.from_numpy(rng.normal(0, 0.01, shape)).float() for rng in ctx.rngs()]
    )
    jitter = jitter + 0.01 * torch.stack(
        [torch.randn(shape, generator=g) for g in ctx.generators()]
    )
    return F.mse_loss(model(batch["x"] + jitter), batch["y"])


def val_metric(data):
    batch = torch.utils.data.default_collate(data)
    return lambda model, group: -F.mse_loss(model(batch["x"]), batch["y"]).item()


def run(tmp_path, name, config=BASE, lines=None, **kw):
    data = toy_data()
    kw.setdefault("validate", val_metric(toy_data(6, seed=1)))
    return train(
        toy_model(),
        data,
        loss_fn=toy_loss,
        out=tmp_path / name,
        config=config,
        log=(lines.append if lines is not None else lambda _: None),
        **kw,
    )


def states_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------- resume


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    whole = run(tmp_path, "whole.pt")
    assert whole.status == "finished" and whole.global_step == 9  # 3 epochs x (4, 4, 2)

    lines = []
    cut = run(tmp_path, "cut.pt", lines=lines, max_steps_this_run=4)
    assert cut.status == "interrupted" and cut.out is None
    assert not (tmp_path / "cut.pt").exists()
    saved = torch.load(last_path(tmp_path / "cut.pt"), weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 1, 4)
    assert any("interrupted" in line for line in lines)

    # a resume that runs 0 steps re-saves what it loaded: the optimizer state survives
    again = run(tmp_path, "cut.pt", max_steps_this_run=0)
    assert again.status == "interrupted" and again.resumed_from == (1, 1)
    reloaded = torch.load(last_path(tmp_path / "cut.pt"), weights_only=True)
    assert reloaded["global_step"] == 4
    for pid, state in saved["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, reloaded["optimizer"]["state"][pid][key]), key
    assert saved["optimizer"]["param_groups"] == reloaded["optimizer"]["param_groups"]
    assert saved["scheduler"] == reloaded["scheduler"]
    states_close(saved["model"], reloaded["model"], atol=0)

    rest = run(tmp_path, "cut.pt")
    assert rest.status == "finished" and rest.resumed_from == (1, 1)
    assert rest.global_step == 9 and rest.steps_this_run == 5
    final_whole = load_state(tmp_path / "whole.pt")
    final_cut = load_state(tmp_path / "cut.pt")
    states_close(final_whole["model"], final_cut["model"])
    states_close(
        torch.load(last_path(tmp_path / "whole.pt"), weights_only=True)["model"],
        torch.load(last_path(tmp_path / "cut.pt"), weights_only=True)["model"],
    )
    assert [h["train_loss"] for h in whole.history] == pytest.approx(
        [h["train_loss"] for h in rest.history], abs=1e-6
    )


def test_interrupt_at_an_epoch_end_resumes_at_the_next_epoch(tmp_path):
    cut = run(tmp_path, "cut.pt", max_steps_this_run=3)  # the epoch has exactly 3 batches
    assert cut.status == "interrupted"
    rest = run(tmp_path, "cut.pt")
    whole = run(tmp_path, "whole.pt")
    states_close(
        load_state(tmp_path / "whole.pt")["model"], load_state(tmp_path / "cut.pt")["model"]
    )
    assert len(rest.history) == len(whole.history) == 3


def test_config_mismatch_starts_fresh_with_a_warning(tmp_path):
    run(tmp_path, "m.pt", max_steps_this_run=4)
    lines = []
    fresh = run(tmp_path, "m.pt", config={**BASE, "lr": 5e-3}, lines=lines)
    assert fresh.resumed_from is None and fresh.global_step == 9 and fresh.steps_this_run == 9
    warning = [line for line in lines if "WARNING" in line]
    assert len(warning) == 1 and "changed: lr" in warning[0] and "starting fresh" in warning[0]


def test_runtime_keys_do_not_block_a_resume(tmp_path):
    run(tmp_path, "m.pt", max_steps_this_run=4)
    rest = run(
        tmp_path, "m.pt", config={**BASE, "threads": 2, "log_every": 5, "checkpoint_minutes": 60}
    )
    assert rest.resumed_from == (1, 1)
    assert config_hash({**BASE, "threads": 2}) == config_hash(BASE)
    assert config_hash({**BASE, "seed": 8}) != config_hash(BASE)


def test_checkpoints_load_with_weights_only(tmp_path):
    run(
        tmp_path,
        "m.pt",
        metadata={
            "task": "toy",
            "subjects": ["d:s1", "d:s2"],
            "fold_sidecar": {"seed": 42, "n_folds": 5},
        },
    )
    state = torch.load(last_path(tmp_path / "m.pt"), map_location="cpu", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "global_step",
        "step_in_epoch",
        "best_metric",
        "best_state",
        "patience_counter",
        "rng",
        "history",
        "config_hash",
    ):
        assert key in state, key
    final = torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=True)
    assert final["format"] == MODEL_FORMAT and final["status"] == "finished"
    assert final["metadata"]["fold_sidecar"] == {"seed": 42, "n_folds": 5}
    assert final["metadata"]["subjects"] == ["d:s1", "d:s2"]
    assert [h["epoch"] for h in final["history"]] == [0, 1, 2]
    assert all(h["seconds"] >= 0 for h in final["history"])


# Other modules and saved runs read these layouts: a change must be deliberate.
LAST_KEYS = [
    "format",
    "version",
    "config_hash",
    "config",
    "seed",
    "seeds",
    "mode",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "world_size",
    "epoch",
    "step_in_epoch",
    "global_step",
    "epoch_loss_sum",
    "epoch_volumes",
    "epoch_steps",
    "epoch_seconds",
    "best_metric",
    "best_epoch",
    "best_state",
    "patience_counter",
    "history",
    "elapsed_s",
    "status",
    "best_tiebreak",
]
FINAL_KEYS = [
    "format",
    "version",
    "model",
    "config",
    "config_hash",
    "seed",
    "seeds",
    "metadata",
    "mode",
    "selected_by",
    "best_metric",
    "best_epoch",
    "epochs_done",
    "global_step",
    "status",
    "history",
    "elapsed_s",
    "device",
    "world_size",
    "deterministic",
    "amp",
    "torch_version",
]


def test_checkpoint_layouts_are_fixed(tmp_path):
    run(tmp_path, "m.pt", max_steps_this_run=4)
    assert list(torch.load(last_path(tmp_path / "m.pt"), weights_only=True)) == LAST_KEYS
    run(tmp_path, "m.pt")
    assert list(torch.load(last_path(tmp_path / "m.pt"), weights_only=True)) == LAST_KEYS
    assert list(torch.load(tmp_path / "m.pt", weights_only=True)) == FINAL_KEYS


def test_train_state_round_trips_through_a_checkpoint(tmp_path):
    state = TrainState(
        epoch=2,
        step_in_epoch=1,
        global_step=7,
        epoch_loss_sum=1.5,
        epoch_volumes=4,
        epoch_steps=1,
        epoch_seconds=0.25,
        best_metric=-0.5,
        best_epoch=1,
        best_state={"w": torch.arange(3.0)},
        patience_counter=1,
        history=[
            {
                "epoch": 0,
                "train_loss": 1.0,
                "val_metric": None,
                "lr": 0.01,
                "steps": 3,
                "seconds": 0.1,
                "improved": True,
            }
        ],
        elapsed_s=3.0,
        status="running",
    )
    torch.save(state.to_checkpoint(), tmp_path / "s.pt")
    back = TrainState.from_checkpoint(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(back.best_state["w"], state.best_state["w"])
    assert dataclasses.replace(back, best_state=None) == dataclasses.replace(state, best_state=None)
    # a run's saved state is the tail of <out>.last.pt and reads back to the same entries
    run(tmp_path, "m.pt", max_steps_this_run=4)
    saved = torch.load(last_path(tmp_path / "m.pt"), weights_only=True)
    entries = TrainState.from_checkpoint(saved).to_checkpoint()
    assert list(saved)[-len(entries) :] == list(entries)
    assert (entries["epoch"], entries["step_in_epoch"], entries["global_step"]) == (1, 1, 4)
    for key, value in entries.items():
        if key != "best_state":
            assert value == saved[key], key
    states_close(entries["best_state"], saved["best_state"], atol=0)


def test_unreadable_last_checkpoint_fails_instead_of_starting_fresh(tmp_path):
    last_path(tmp_path / "m.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedtxError, match="cannot read checkpoint.*to train from scratch"):
        run(tmp_path, "m.pt")
    assert last_path(tmp_path / "m.pt").read_bytes() == b"not a checkpoint"


def test_time_based_checkpoint_is_written_mid_epoch(tmp_path):
    seen = []

    def loss(model, batch, ctx):
        if ctx.global_step == 1:
            seen.append(last_path(tmp_path / "m.pt").exists())
        return toy_loss(model, batch, ctx)

    train(
        toy_model(),
        toy_data(),
        loss_fn=loss,
        out=tmp_path / "m.pt",
        config={**BASE, "epochs": 1, "checkpoint_minutes": 1e-9},
        log=lambda _: None,
    )
    assert seen == [True]


def test_sigterm_checkpoints_and_stops(tmp_path):
    def loss(model, batch, ctx):
        if ctx.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return toy_loss(model, batch, ctx)

    before = signal.getsignal(signal.SIGTERM)
    result = train(
        toy_model(),
        toy_data(),
        loss_fn=loss,
        out=tmp_path / "m.pt",
        config=BASE,
        log=lambda _: None,
    )
    assert result.status == "interrupted" and result.global_step == 2
    assert torch.load(last_path(tmp_path / "m.pt"), weights_only=True)["global_step"] == 2
    assert signal.getsignal(signal.SIGTERM) == before


# ---------------------------------------------------------------------------- selection


def test_early_stopping_keeps_the_best_validation_state(tmp_path):
    scripted = iter([0.5, 0.9, 0.7, 0.8, 0.6, 0.95, 0.99])
    snapshots = []

    def validate(model, group):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scripted)

    lines = []
    result = run(
        tmp_path,
        "m.pt",
        config={**BASE, "epochs": 10, "patience": 3},
        validate=validate,
        mode="max",
        lines=lines,
    )
    assert result.status == "early_stopped"
    assert result.epochs_done == 5  # best at epoch 2 (index 1), then 3 without improvement
    assert result.best_epoch == 1 and result.best_metric == 0.9
    assert [h["improved"] for h in result.history] == [True, True, False, False, False]
    final = load_state(tmp_path / "m.pt")
    states_close(final["model"], snapshots[1], atol=0)
    last_model = torch.load(last_path(tmp_path / "m.pt"), weights_only=True)["model"]
    assert not torch.equal(last_model["0.weight"], final["model"]["0.weight"])
    assert any("early stop" in line for line in lines)


def test_a_tie_in_the_metric_goes_to_the_better_tiebreak(tmp_path):
    # mAUC saturates at 1.0 on a small validation set; the likelier model must win
    scripted = iter([(1.0, -0.9), (1.0, -0.2), (1.0, -0.5), (0.9, 0.0), (1.0, -0.2)])
    result = run(
        tmp_path,
        "m.pt",
        config={**BASE, "epochs": 5, "patience": 5},
        validate=lambda m, group: next(scripted),
        mode="max",
    )
    assert [h["improved"] for h in result.history] == [True, True, False, False, False]
    assert result.best_epoch == 1 and result.best_metric == 1.0
    assert [h["val_tiebreak"] for h in result.history][:2] == [-0.9, -0.2]
    # an old checkpoint's state, saved before the field existed, reads back with its default
    saved = torch.load(last_path(tmp_path / "m.pt"), weights_only=True)
    del saved["best_tiebreak"]
    assert TrainState.from_checkpoint(saved).best_tiebreak is None


def test_mode_min_and_no_validation_selects_by_training_loss(tmp_path):
    scripted = iter([3.0, 1.0, 2.0])
    result = run(tmp_path, "a.pt", validate=lambda m, group: next(scripted), mode="min")
    assert result.best_epoch == 1 and result.best_metric == 1.0
    by_loss = run(tmp_path, "b.pt", validate=None)
    losses = [h["train_loss"] for h in by_loss.history]
    assert by_loss.best_epoch == int(np.argmin(losses))
    assert load_state(tmp_path / "b.pt")["selected_by"] == "training loss"


# ---------------------------------------------------------------------------- seeds


def test_same_seed_same_losses_and_seed_recorded(tmp_path):
    a = run(tmp_path, "a.pt")
    b = run(tmp_path, "b.pt")
    c = run(tmp_path, "c.pt", config={**BASE, "seed": 8})
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert [h["train_loss"] for h in a.history] != [h["train_loss"] for h in c.history]
    final = load_state(tmp_path / "a.pt")
    assert final["seed"] == 7 and final["seeds"]["torch"] == 7 and final["config"]["seed"] == 7


def test_data_order_is_fixed_by_seed_and_epoch():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 3)) == list(range(10))
    assert [len(b) for b in epoch_batches(9, 4, 0, 0)] == [4, 4, 1]
    assert [len(b) for b in epoch_batches(9, 4, 0, 0, min_batch=2)] == [4, 4]


# ---------------------------------------------------------------------------- errors


def test_bad_config_values_are_named():
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        resolve_train_config({"lr": 0})
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        resolve_train_config({"batch_size": 0})


def test_nan_loss_raises_with_epoch_and_step(tmp_path):
    def loss(model, batch, ctx):
        return toy_loss(model, batch, ctx) * (float("nan") if ctx.global_step == 2 else 1.0)

    with pytest.raises(MedtxError, match=r"training loss is NaN or Inf at global step 3 "):
        train(
            toy_model(),
            toy_data(),
            loss_fn=loss,
            out=tmp_path / "m.pt",
            config=BASE,
            log=lambda _: None,
        )


def test_cuda_requested_without_cuda_is_an_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run(tmp_path, "m.pt", device="cuda")


def test_a_volume_draws_the_same_whatever_its_batch_and_process():
    """Curves and masks come from generators seeded by (seed, epoch, dataset index):
    a volume draws the same in any batch, at any position, in any process."""

    def draws(indices, epoch=0, seed=7, rank=0, world=1):
        ctx = StepContext(
            epoch=epoch,
            step=0,
            global_step=0,
            indices=indices,
            volumes=len(indices) * world,
            seed=seed,
            device=torch.device("cpu"),
            group=Group(rank=rank, world=world),
        )
        numpy_draws = [rng.random() for rng in ctx.rngs()]
        torch_draws = [float(torch.rand(1, generator=g)) for g in ctx.generators()]
        return dict(zip(indices, zip(numpy_draws, torch_draws)))

    alone = draws([3, 5])
    assert draws([5, 9, 3], rank=1, world=2)[5] == alone[5]  # other batch, place, rank
    assert draws([3])[3] == alone[3]
    assert alone[3] != alone[5]  # volumes differ
    assert draws([5], epoch=1)[5] != alone[5] and draws([5], seed=8)[5] != alone[5]


def record_steps(fn):
    """Each optimizer step's learning rates (per group) and gradient norm, from a
    global step pre-hook, while ``fn`` trains."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    steps = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
        steps.append(([g["lr"] for g in optimizer.param_groups], float(norm)))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return steps


def test_the_cosine_schedule_warms_up_then_follows_timms_formula(tmp_path):
    # 10 volumes in batches of 4: 3 steps an epoch, 2 epochs: T = 6 steps, 1 warm-up step
    config = {**BASE, "epochs": 2, "lr_schedule": "cosine", "warmup_fraction": 0.25}
    config.update(lr_min=1e-4)
    steps = record_steps(lambda: run(tmp_path, "m.pt", config=config))
    lrs = [lr[0] for lr, _ in steps]
    lr, floor, total, warm = 1e-2, 1e-4 / 1e-2, 6, 1
    expected = [0.0] + [
        lr * (floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * (t - warm) / total)))
        for t in range(1, 6)
    ]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[1] == pytest.approx(lr) and lrs[-1] < lrs[1]


def test_grad_clip_bounds_the_gradient_norm_and_groups_scale_the_rate(tmp_path):
    free = record_steps(lambda: run(tmp_path, "a.pt", validate=None))
    assert max(norm for _, norm in free) > 0.05
    clipped = record_steps(lambda: run(tmp_path, "b.pt", config={**BASE, "grad_clip": 0.05}))
    assert all(norm <= 0.05 * (1 + 1e-5) for _, norm in clipped)
    net = toy_model()
    groups = [{"params": net[0].parameters()}, {"params": net[3].parameters(), "lr_scale": 10}]
    steps = record_steps(
        lambda: train(
            net, toy_data(), loss_fn=toy_loss, out=tmp_path / "c.pt", config=BASE, params=groups
        )
    )
    assert steps[0][0] == pytest.approx([1e-2, 1e-1])
    cosine = {**BASE, "epochs": 1, "lr_schedule": "cosine", "lr_min": 1e-3}
    net = toy_model()
    groups = [{"params": net[0].parameters()}, {"params": net[3].parameters(), "lr_scale": 10}]
    steps = record_steps(
        lambda: train(
            net, toy_data(), loss_fn=toy_loss, out=tmp_path / "d.pt", config=cosine, params=groups
        )
    )
    half = 1e-3 + 0.5 * (1 - 1e-3 / 1e-2) * (1 + math.cos(math.pi * 2 / 3)) * 1e-2
    # every group's cosine falls towards lr_min, not towards lr_min x lr_scale
    assert steps[2][0][0] == pytest.approx(half)
    assert steps[2][0][1] == pytest.approx(
        1e-3 + 0.5 * (1e-1 - 1e-3) * (1 + math.cos(math.pi * 2 / 3))
    )
    with pytest.raises(ConfigError, match="grad_clip must be a positive number or null"):
        resolve_train_config({"grad_clip": 0})
    with pytest.raises(ConfigError, match="lr_schedule 'linear' is not one of"):
        resolve_train_config({"lr_schedule": "linear"})


def test_weight_decay_spares_biases_norms_tokens_and_codebooks_as_pumits_authors_do():
    from medtx.models.pumit.model import build_model
    from medtx.models.pumit.tokenizer import TOKENIZER_SIZES, Tokenizer
    from medtx.train.loop import parameter_groups

    model = build_model("tiny", "classification")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, spared = parameter_groups(model.parameters(), 1e-3, model=model, weight_decay=0.05)
    assert decayed["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    decayed_names = {names[id(p)] for p in decayed["params"]}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert "vit.blocks.0.attn.q_proj.weight" in decayed_names and "head.weight" in decayed_names
    assert "vit.patch_embed.weight" in decayed_names
    for name in ("vit.cls_token", "vit.pos_embed", "vit.blocks.0.attn.q_bias", "head.bias"):
        assert name in spared_names, name
    assert "vit.blocks.0.norm1.weight" in spared_names
    tokenizer = Tokenizer(TOKENIZER_SIZES["tiny"])
    groups = parameter_groups(tokenizer.parameters(), 1e-3, model=tokenizer, weight_decay=0.05)
    codebook = tokenizer.quantizer.codebook.weight
    assert any(p is codebook for p in groups[1]["params"])  # an embedding: not decayed
    # no decay asked (Adam): one group, as before
    assert len(parameter_groups(model.parameters(), 1e-3, model=model)) == 1
