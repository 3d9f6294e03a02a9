"""Data-parallel training on CPUs: 2 gloo processes against 1 with the same global batch.

Each test starts real processes (torch.multiprocessing, the environment torchrun
sets: RANK, WORLD_SIZE, MASTER_ADDR/PORT) and compares what they train with one
process: the loss trajectory and the weights, within float tolerance.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from medtx.errors import ConfigError
from medtx.train.checkpoints import last_path, load_state
from medtx.train.distributed import Group
from medtx.train.loop import train
from medtx.train.resources import launcher, training_resources, training_threads

# batch 5 of 10 volumes: two processes get 3 and 2 of each batch (unequal shares)
CONFIG = {"lr": 1e-2, "lr_decay": 0.9, "epochs": 3, "patience": 10, "batch_size": 5}
CONFIG.update(seed=7, log_every=1, threads=1, num_workers=0)


def data(n=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return [{"x": x[i], "y": x[i, :2].sum(dim=0, keepdim=True)} for i in range(n)]


def model():
    torch.manual_seed(0)  # no dropout: its masks depend on how a batch is split
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def mse(m, batch, ctx):
    return F.mse_loss(m(batch["x"]), batch["y"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_rank(rank, world, port):
    """The environment torchrun gives rank ``rank`` of ``world`` on one machine."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )


def run_one(out, max_steps=None, log=lambda _: None):
    """``train`` in this process (under torchrun's environment: one of the ranks)."""
    return train(
        model(),
        data(),
        loss_fn=mse,
        out=out,
        config=CONFIG,
        max_steps_this_run=max_steps,
        log=log,
        handle_signals=False,
    )


def _rank(rank, world, port, out, max_steps, lines_file):
    as_torchrun_rank(rank, world, port)
    lines: list[str] = []
    run_one(out, max_steps, log=lines.append)
    with open(f"{lines_file}.{rank}", "w") as fh:
        json.dump(lines, fh)


def run_ranks(world, out, max_steps=None):
    """``train`` in ``world`` gloo processes; the log lines each rank wrote."""
    mp.spawn(_rank, args=(world, free_port(), str(out), max_steps, str(out)), nprocs=world)
    return [json.load(open(f"{out}.{r}")) for r in range(world)]


def assert_same_weights(a, b, tol=1e-5):
    for key in a:
        assert torch.allclose(a[key], b[key], atol=tol), key


def test_two_processes_train_what_one_trains(tmp_path):
    one = run_one(tmp_path / "one.pt")
    lines = run_ranks(2, tmp_path / "two.pt")
    two = load_state(tmp_path / "two.pt")
    ours = [h["train_loss"] for h in two["history"]]
    theirs = [h["train_loss"] for h in one.history]
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours[-1] < ours[0]  # it learned: the comparison is not of two idle runs
    assert_same_weights(two["model"], load_state(tmp_path / "one.pt")["model"])
    assert two["world_size"] == 2 and load_state(tmp_path / "one.pt")["world_size"] == 1
    assert lines[0] and any("x 2 processes" in line for line in lines[0])
    assert lines[1] == []  # rank 1 trains silently; rank 0 logs and writes


def test_a_run_saved_by_two_processes_resumes_in_one(tmp_path):
    run_one(tmp_path / "whole.pt")
    run_ranks(2, tmp_path / "split.pt", max_steps=3)  # stopped mid-epoch 2
    saved = load_state(last_path(tmp_path / "split.pt"))
    assert saved["world_size"] == 2 and saved["global_step"] == 3
    assert not (tmp_path / "split.pt").exists()
    result = run_one(tmp_path / "split.pt")
    assert result.status == "finished" and result.resumed_from == (1, 1)
    assert_same_weights(
        load_state(tmp_path / "split.pt")["model"], load_state(tmp_path / "whole.pt")["model"]
    )


def test_a_batch_too_small_to_split_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(Group, "from_env", classmethod(lambda cls: cls(rank=0, world=8)))
    with pytest.raises(ConfigError, match="batch_size 5 is too small for 8 processes"):
        train(
            model(),
            data(),
            loss_fn=mse,
            out=tmp_path / "m.pt",
            config=CONFIG,
            min_batch=2,
            log=lambda _: None,
        )


def test_shards_cover_a_batch_once():
    batch = [7, 3, 9, 1, 4]
    parts = [Group(rank=r, world=2).shard(batch) for r in range(2)]
    assert parts == [[7, 9, 4], [3, 1]]


def test_a_multi_gpu_job_is_one_task_with_every_process_cpus():
    stage = {"threads": 2, "num_workers": 3}
    res = training_resources(stage, gpu=True, gpus=2, mem_mb=8000, runtime=60)
    # the SLURM plugin's default (one task per GPU) would start the script twice
    assert res["tasks_per_gpu"] == 0 and res["gpu"] == 2
    assert res["cpus_per_gpu"] == 5 and training_threads(stage, 2) == 10
    assert res["mem_mb"] == 2 * (8000 + 3 * 1000)
    assert "gpu" not in training_resources(stage, gpu=False, gpus=1, mem_mb=100, runtime=1)
    assert launcher(1) == "python"
    assert launcher(2) == "torchrun --standalone --nproc-per-node 2"
    with pytest.raises(ConfigError, match="train/gpus must be an integer >= 1"):
        launcher(0)


def _finetune_rank(rank, world, port, root):
    from medtx.train.finetune import finetune
    from tests.unit.train.test_stages import FAST, write_items

    as_torchrun_rank(rank, world, port)
    sets = [
        write_items(root / f"data{rank}", n, task="segmentation", seed=s, prefix=p)
        for n, s, p in ((4, 0, "tr"), (2, 1, "va"), (2, 2, "te"))
    ]
    finetune(
        "segmentation",
        *sets,
        out=root / "m.pt",
        predictions_out=root / "pred.tsv",
        config={**FAST, "epochs": 1, "downsample": 2, "num_workers": 1},
        log=lambda _: None,
    )


def test_a_stage_trains_in_two_processes_and_rank_zero_writes(tmp_path):
    """The real model, stored float16 volumes and uint8 masks prepared on the device,
    one loader worker per process: rank 0 alone predicts and writes."""
    mp.spawn(_finetune_rank, args=(2, free_port(), tmp_path), nprocs=2)
    ckpt = load_state(tmp_path / "m.pt")
    assert ckpt["world_size"] == 2 and ckpt["status"] == "finished"
    metrics = json.loads((tmp_path / "pred.json").read_text())
    assert metrics["status"] == "finished" and 0 <= metrics["dice_mean"] <= 1
    assert metrics["world_size"] == 2 and metrics["device"] == "cpu"


def _dropout_rank(rank, world, port, out):
    as_torchrun_rank(rank, world, port)
    draws: list[list[float]] = []

    def loss(m, batch, ctx):  # torch's global stream, as dropout draws from it
        draws.append(torch.rand(len(ctx.indices)).tolist())
        return mse(m, batch, ctx)

    cfg = {**CONFIG, "epochs": 1}
    train(model(), data(), loss_fn=loss, out=out, config=cfg, log=lambda _: None)
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(draws, fh)


def test_dropout_draws_differ_between_ranks_and_rank_zero_draws_as_one_process(
    tmp_path, monkeypatch
):
    mp.spawn(_dropout_rank, args=(2, free_port(), str(tmp_path / "two.pt")), nprocs=2)
    ranks = [json.load(open(tmp_path / f"two.pt.{r}")) for r in range(2)]
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)  # put back after this process's run
    _dropout_rank(0, 1, free_port(), str(tmp_path / "one.pt"))
    alone = json.load(open(tmp_path / "one.pt.0"))
    for step, (first, second) in enumerate(zip(*ranks)):
        assert first[: len(second)] != second, f"step {step}: both ranks drew the same"
        assert first == alone[step][: len(first)]  # rank 0 keeps one process's seed
