"""A training loop that survives a cluster's walltime: checkpoints, exact resume, logs.

The module is long because the loop's state, its checkpoint layout, resuming and
signal handling must change together: a resumed run continues exactly the run
that was stopped.

``train`` runs any model and loss the stages (``medtx.train.pretrain``,
``medtx.train.finetune``) hand it, the way a long SLURM job should run. It builds a
``Trainer`` (the model, optimizer, scheduler, scaler and this run's bookkeeping) whose
counters live in a ``TrainState`` (the loop's part of ``<out>.last.pt``) and runs it:

- **Device**: ``cuda`` when available, else CPU (``device=`` overrides). On CUDA the
  step runs under ``torch.autocast`` (bfloat16 where supported, else float16 with a
  ``GradScaler``) when ``amp`` is on; on CPU it runs in float32 with
  ``torch.set_num_threads(threads)``.
- **Seeds**: python ``random``, numpy and torch are seeded from ``seed`` and recorded.
  The data order of epoch e is a permutation drawn from a ``torch.Generator`` seeded
  with (seed, e). Every random draw of a loss (Bézier curves, slice and token masks)
  comes from the volume's own generators (``StepContext.rngs``/``generators``),
  seeded with (seed, epoch, the volume's dataset index): a volume draws the same
  whichever process holds it, so N processes train the run one process trains, and a
  run that resumes mid-epoch continues exactly the sequence an uninterrupted run would
  have taken. Every step reseeds torch's global stream (dropout) with (seed, global
  step, rank): ranks drop out differently, as one process's volumes would.
- **Optimization**: Adam (``lr``; AdamW when the config has a ``weight_decay`` > 0,
  as PUMIT's; parameter groups may scale the rate, ``lr_scale``), the gradients'
  global norm clipped to ``grad_clip`` when set, ``lr_schedule`` exponential
  (``ExponentialLR(lr_decay)`` stepped per epoch) or cosine (per step: a linear
  warm-up over ``warmup_fraction`` of the run's steps, then a cosine towards
  ``lr_min``, as timm's ``CosineLRScheduler(warmup_prefix=True)``),
  at most ``epochs`` epochs, early stopping after ``patience`` epochs without a
  better validation metric (``mode`` max or min; without a validation function the
  epoch's mean training loss selects, mode min). The best state is kept apart from
  the last one.
- **Checkpoints**: every ``checkpoint_minutes`` and at the end of each epoch,
  atomically, to ``<out>.last.pt``: model, optimizer, scheduler, scaler, epoch,
  global step, step within the epoch, best metric and state, patience counter, RNG
  states, history; the state it replaces is kept as ``<out>.prev.pt``, the fallback
  when the newest cannot be read (``medtx.train.checkpoints``). A rerun resumes when
  the config hash matches the run's (mid-epoch too: the batches already done are
  skipped), and starts afresh with a warning line when it does not: two configs are
  never mixed. Everything stored is a tensor or a primitive container, so
  ``torch.load(..., weights_only=True)`` reads it.
  At the end the best state and the caller's metadata go to ``<out>``.
- **GPU throughput**: DataLoader workers (``num_workers``, persistent across
  epochs, ``prefetch_factor`` batches ahead each) load what the dataset stores (a
  float16 cache), pinned; ``prepare`` converts the batch on the device. The loss is
  summed and checked for NaN/Inf on the device, and read by the host only every
  ``log_every`` steps and at checkpoints, so loading and compute overlap.
  ``deterministic`` (CUDA) picks deterministic kernels (exact resume, slower);
  false lets cuDNN benchmark its fastest kernels (not bit-exact on GPU).
- **Processes**: under torchrun the model is wrapped in DistributedDataParallel
  (``find_unused_parameters=False``: stages freeze what they do not train) and each
  rank trains its stride of every global batch (``medtx.train.distributed``); losses
  that look across the batch see the global one, so N processes compute one
  process's gradients (``tests/distributed``). Each rank validates its stride of the
  validation set and every rank computes the metric from all of them. Rank 0
  writes. A run resumes with another number of processes.
- **Walltime**: SIGTERM/SIGUSR1 (SLURM's warning signals) and ``max_steps_this_run``
  (the tests' stand-in for a kill) checkpoint and return status ``"interrupted"``;
  the next run resumes.
- **Progress**: one line every ``log_every`` steps and one per epoch, with epoch,
  step, loss, volumes/s and elapsed time (stderr by default).

Example:
    result = train(model, dataset, loss_fn=lambda m, b, ctx: F.mse_loss(m(b["image"]), b["target"]),
                   validate=lambda m, group: -val_loss(m), mode="max", out="model.pt",
                   config={"lr": 1e-4, "epochs": 150, "seed": 42})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn

from medtx.errors import ConfigError, MedtxError
from medtx.io import atomic_path
from medtx.train.checkpoints import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    MODEL_FORMAT,
    last_path,
    load_resumable,
    save_resumable,
)
from medtx.train.config import resolve_train_config
from medtx.train.distributed import Group

# Keys that change how a run executes, not what it computes: left out of the config
# hash, so a job resumed with more threads or another log interval still resumes.
# The number of processes (torchrun) is not a key: it only shards each global batch.
RUNTIME_KEYS = frozenset(
    {
        "checkpoint_minutes",
        "threads",
        "num_workers",
        "prefetch_factor",
        "log_every",
        "deterministic",
    }
)
STATUSES = ("finished", "early_stopped", "interrupted")


# ---------------------------------------------------------------------------- helpers


def default_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def to_primitive(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays, paths and tuples turned into what
    ``torch.load(weights_only=True)`` accepts (tensors are kept as they are)."""
    if isinstance(obj, Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_primitive(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_primitive(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint: {obj!r}")


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of the config without ``RUNTIME_KEYS``, keys sorted."""
    kept = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else ``cuda`` when available, else ``cpu``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for, but CUDA is not available")
    return dev


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (numpy SeedSequence: well mixed)."""
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def seed_everything(seed: int) -> dict[str, int]:
    """Seed python ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return {"python": int(seed), "numpy": int(seed % 2**32), "torch": int(seed)}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of ``epoch``: a permutation of range(n) fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, 0, epoch))
    return torch.randperm(n, generator=generator).tolist()


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, min_batch: int = 1
) -> list[list[int]]:
    """The epoch's batches of indices; a last batch smaller than ``min_batch`` is dropped."""
    order = epoch_order(n, seed, epoch)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= min_batch]


def rng_state() -> dict[str, Any]:
    """python, numpy and torch RNG states as tensors and lists (weights_only-safe)."""
    py = random.getstate()
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    key, keys, pos, has_gauss, gauss = legacy
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "key": key,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["key"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the model's state (the best state, kept apart)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in a (nested) dict/list/tuple moved to ``device``; the rest as is."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def format_metric(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------- the loop


class MapDataset(Protocol):
    """What the loop needs of a dataset: its length and an item by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclass
class StepContext:
    """What a loss function gets besides the model and the batch.

    Randomness is per volume: ``rngs()`` and ``generators()`` give each volume of this
    process's batch its own generators, seeded with (seed, epoch, its dataset index),
    so a volume draws the same curves and masks in any number of processes and in a
    resumed run. ``gather_rows`` and ``all_sum`` let a loss that looks across the
    batch see the global one (``Group``); in one process they return their argument.
    """

    epoch: int
    step: int  # batches done in this epoch before this one
    global_step: int  # optimizer steps done before this one
    indices: list[int]  # dataset indices of this process's volumes, in batch order
    volumes: int  # volumes in the global batch (all processes)
    seed: int
    device: torch.device
    group: Group = field(default_factory=Group)

    def rngs(self) -> list[np.random.Generator]:
        """A numpy generator per volume of the batch, in batch order."""
        return [np.random.default_rng([self.seed, 3, self.epoch, i]) for i in self.indices]

    def generators(self) -> list[torch.Generator]:
        """A CPU torch generator per volume of the batch, in batch order."""
        return [
            torch.Generator().manual_seed(derived_seed(self.seed, 3, self.epoch, i))
            for i in self.indices
        ]

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Rows of this process's volumes -> rows of the global batch (differentiable)."""
        return self.group.gather_rows(rows, self.volumes)

    def all_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes (differentiable)."""
        return self.group.all_sum(tensor)


@dataclass
class TrainResult:
    """What ``train`` returns.

    status: "finished" (ran ``epochs``), "early_stopped" (patience ran out) or
        "interrupted" (a signal or ``max_steps_this_run``; ``<out>`` not written).
    epochs_done: completed epochs; global_step: optimizer steps in all runs.
    best_metric / best_epoch: the selection metric of the kept state (None / -1 if none).
    history: one dict per completed epoch (epoch, train_loss, val_metric, lr, steps,
        seconds, improved).
    out: the final checkpoint, or None when interrupted.
    resumed_from: (epoch, step within it) the run resumed at, or None for a fresh start.
    rank, world_size: this process's rank under torchrun (0 alone writes outputs)
        and the number of processes.
    """

    status: str
    epochs_done: int
    global_step: int
    best_metric: float | None
    best_epoch: int
    history: list[dict[str, Any]]
    out: Path | None
    resumed_from: tuple[int, int] | None = None
    steps_this_run: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainState:
    """The loop's counters: everything besides the model, optimizer, scheduler, scaler
    and RNG states that a resumed run needs to continue exactly where a run stopped.

    Its fields, in this order and under these names, are top-level keys of
    ``<out>.last.pt`` (``to_checkpoint``/``from_checkpoint``): renaming one breaks the
    resume of every saved run.
    """

    epoch: int = 0  # completed epochs (the running epoch's index)
    step_in_epoch: int = 0  # batches done in the running epoch
    global_step: int = 0  # optimizer steps in all runs
    epoch_loss_sum: float = 0.0  # the running epoch's loss, summed over volumes
    epoch_volumes: int = 0
    epoch_steps: int = 0
    epoch_seconds: float = 0.0  # step time only (not checkpoints, not validation)
    best_metric: float | None = None
    best_epoch: int = -1
    best_state: dict[str, Tensor] | None = None  # a CPU copy, kept apart from the model
    patience_counter: int = 0  # epochs since the last improvement
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0  # wall time of all runs, up to the last save
    status: str = "running"  # then "finished" or "early_stopped"
    best_tiebreak: float | None = None  # the kept state's second selection value, if any

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields as weights_only-safe checkpoint entries, in field order."""
        return {f.name: to_primitive(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any]) -> TrainState:
        """The state stored in a ``<out>.last.pt`` dict (its other keys are ignored; a
        field added since it was saved takes its default)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def next_epoch(self) -> None:
        """Move to the next epoch: its per-epoch counters start at zero."""
        self.epoch += 1
        self.step_in_epoch, self.epoch_steps, self.epoch_volumes = 0, 0, 0
        self.epoch_loss_sum, self.epoch_seconds = 0.0, 0.0


@dataclass
class _EpochClock:
    """Wall-clock marks of the running epoch; not saved (a resumed run restarts them)."""

    last_save: float  # checkpoint_minutes count from here
    last_log: float  # a progress line's vol/s counts from here
    step_start: float  # step time (epoch_seconds) counts from here
    logged_volumes: int = 0  # volumes since last_log


class _StopFlag:
    """Set by SIGTERM/SIGUSR1 while the loop runs (main thread only)."""

    def __init__(self, enabled: bool, log: Callable[[str], None]):
        self.signal: int | None = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.log = log
        self.previous: dict[int, Any] = {}  # the handlers to put back

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        self.log(
            f"[train] received signal {signal.Signals(signum).name}: checkpointing "
            "after this step and stopping"
        )

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _Batches(torch.utils.data.Sampler):
    """The running epoch's batches of indices: the run's one loader reads them anew
    at every epoch, so its workers can persist."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class _LossModule(nn.Module):
    """The model and its loss as one module: DistributedDataParallel must run the
    forward that produces the loss, and stage losses call parts of the model."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any, StepContext], Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any, ctx: StepContext) -> Tensor:
        return self.loss_fn(self.model, batch, ctx)


def set_cuda_determinism(deterministic: bool) -> None:
    """Deterministic CUDA kernels (exact resume) or cuDNN's benchmarked fastest ones.

    Process-wide, as torch's flags are; a training process runs one stage.
    """
    if deterministic:  # cuBLAS needs a fixed workspace to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)


def parameter_groups(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    lr: float,
    *,
    model: nn.Module | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The optimizer's groups from parameters, or from groups ``{"params": [...],
    "lr_scale": s}`` (lr x s; a discriminator's faster rate); only parameters that
    require a gradient, empty groups dropped. With ``weight_decay`` each group is
    split as the PUMIT authors split theirs (minGPT's rule): the weights of linear
    and convolution layers decay; biases, norms, embeddings (a codebook) and free
    parameters (class and mask tokens, position embedding, q/v biases) do not."""
    given: list[Any] = list(params)
    if not given or not isinstance(given[0], dict):
        given = [{"params": given}]
    decays = decayed_parameters(model) if weight_decay and model is not None else None
    groups = []
    for group in given:
        trained = [p for p in group["params"] if p.requires_grad]
        rate = lr * float(group.get("lr_scale", 1.0))
        parts: list[tuple[list[nn.Parameter], float | None]]
        if decays is None:
            parts = [(trained, None)]
        else:
            parts = [
                ([p for p in trained if id(p) in decays], weight_decay),
                ([p for p in trained if id(p) not in decays], 0.0),
            ]
        for part, decay in parts:
            if part:
                groups.append({"params": part, "lr": rate})
                if decay is not None:
                    groups[-1]["weight_decay"] = decay
    return groups


def decayed_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters weight decay applies to: ``weight`` of linear and
    convolution layers (``parameter_groups``)."""
    layers = (nn.Linear, nn.modules.conv._ConvNd)
    return {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, layers) and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


def _better(metric: float, best: float | None, mode: str) -> bool:
    if best is None:
        return not math.isnan(metric)
    return metric > best if mode == "max" else metric < best


@dataclass
class TrainSettings:
    """One call of ``train``: what to train, on what, and how.

    Args:
        model: the network (moved to the device here).
        dataset: indexable items (``len`` and ``[i]``), batched by ``collate``.
        loss_fn: (model, batch on the device, StepContext) -> scalar loss.
        out: the final checkpoint path; the resumable state is ``<out>.last.pt``.
        config: ``TRAIN_DEFAULTS`` keys, plus anything else that defines the run (all of
            it except ``RUNTIME_KEYS`` enters the hash that decides whether a saved
            state may be resumed).
        validate: (model, group) -> selection metric, or (metric, tie-break): an
            epoch that equals the best metric is kept when its tie-break is better in the
            same ``mode`` (a small validation set's mAUC is often 1.0 from the first
            epoch on). Run after every epoch on every process with the model in eval
            mode under no_grad; under torchrun it predicts its ``group.shard`` of the
            validation set and gathers the rest
            (``group.gather_parts``). None selects by the epoch's mean training loss.
        mode: "max" or "min" for the validation metric (forced to "min" without one).
        params: the parameters to optimize (default: all with requires_grad), or groups
            ``{"params": [...], "lr_scale": s}`` trained at ``lr`` x s.
        collate: list of items -> batch (default ``torch.utils.data.default_collate``).
        prepare: batch on the device -> model input (e.g. ``VolumeSet.prepare``: float16
            to float32, downsampling), so the loader moves what the cache stores.
        metadata: stored with the final checkpoint (preset, task, subjects, sidecars);
            tensors and primitive containers only.
        device: "cpu", "cuda", ...; default cuda when available.
        max_steps_this_run: stop after this many optimizer steps in this call,
            checkpointing first (a simulated walltime kill); status "interrupted".
        min_batch: drop an epoch's last batch when smaller (2 for triplet negatives).
        log: receives progress lines (default: stderr).
        handle_signals: SIGTERM/SIGUSR1 checkpoint and stop (main thread only).
    """

    model: nn.Module
    dataset: MapDataset
    loss_fn: Callable[[Any, Any, StepContext], Tensor]
    out: str | Path
    config: Mapping[str, Any] | None = None
    validate: Callable[[Any, Group], float | tuple[float, float]] | None = None
    mode: Literal["max", "min"] = "max"
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None
    collate: Callable[[list[Any]], Any] | None = None
    prepare: Callable[[Any], Any] | None = None
    metadata: Mapping[str, Any] | None = None
    device: str | torch.device | None = None
    max_steps_this_run: int | None = None
    min_batch: int = 1
    log: Callable[[str], None] | None = None
    handle_signals: bool = True


class Trainer:
    """One call of ``train``: the model, its optimizer, scheduler and scaler, a
    ``TrainState``, and this run's own bookkeeping (steps run, why it stopped).

    Construction checks the settings and sets up (threads, seeds, device, AMP);
    ``run`` resumes from ``<out>.last.pt`` when it may, trains and writes ``<out>``.
    A Trainer runs once: its optimizer and state belong to that run.
    """

    def __init__(self, settings: TrainSettings):
        """The setup order is part of the behaviour: the device and threads first,
        then the RNGs are seeded before anything else may draw from them, then the
        model moves and its optimizer is built."""
        s = settings
        self.cfg = cfg = resolve_train_config(s.config)
        self.group = Group.from_env()
        self.log = (s.log or default_log) if self.group.is_main else (lambda _line: None)
        self.mode = s.mode if s.validate is not None else "min"
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', not {self.mode!r}")
        if len(s.dataset) == 0:
            raise MedtxError("no training data: the dataset is empty")
        self.model, self.dataset, self.loss_fn = s.model, s.dataset, s.loss_fn
        self.validate_fn = s.validate
        self.out = Path(s.out)
        self.last = last_path(self.out)
        self.device = self._place(s.device, s.min_batch)
        self.seed = int(cfg["seed"])
        self.config_hash = config_hash(cfg)
        self.seeds = seed_everything(self.seed)
        self._optimize(s.params)
        self.collate = s.collate or torch.utils.data.default_collate
        self.prepare = s.prepare
        self.metadata = s.metadata
        self.max_steps_this_run = s.max_steps_this_run
        self.handle_signals = s.handle_signals
        minutes = cfg["checkpoint_minutes"]
        self.interval = minutes * 60.0 if minutes and minutes > 0 else math.inf
        self._start_bookkeeping()

    def _place(self, device: str | torch.device | None, min_batch: int) -> torch.device:
        """The device (threads or deterministic kernels set for it) and the least batch."""
        cfg = self.cfg
        dev = pick_device(self.group.device(device))
        if dev.type == "cpu":
            torch.set_num_threads(cfg["threads"])
        else:
            set_cuda_determinism(bool(cfg["deterministic"]))
        # every rank needs a volume of every batch; losses that need more see the
        # global batch (StepContext.gather_rows), so the least batch is a global one
        self.min_batch = max(min_batch, self.group.world)
        if cfg["batch_size"] < self.min_batch:
            raise ConfigError(
                f"batch_size {cfg['batch_size']} is too small for {self.group.world} "
                f"processes: each needs a volume of every batch, and a batch at least "
                f"{min_batch}"
            )
        return dev

    def _optimize(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None) -> None:
        """AMP, the model on the device, its optimizer, scheduler and gradient scaler."""
        cfg, dev, model = self.cfg, self.device, self.model
        self.use_amp = bool(cfg["amp"]) and dev.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        model.to(dev)
        lr, decay = float(cfg["lr"]), float(cfg.get("weight_decay") or 0.0)
        groups = parameter_groups(
            model.parameters() if params is None else params, lr, model=model, weight_decay=decay
        )
        self.trained = [p for g in groups for p in g["params"]]
        if not self.trained:
            raise MedtxError("nothing to train: no parameter requires a gradient")
        self.optimizer = (
            torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
            if decay
            else torch.optim.Adam(groups, lr=lr)
        )
        self.per_step = cfg["lr_schedule"] == "cosine"
        self.scheduler: torch.optim.lr_scheduler.LRScheduler = (
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.cosine_factors())
            if self.per_step
            else torch.optim.lr_scheduler.ExponentialLR(
                self.optimizer, gamma=float(cfg["lr_decay"])
            )
        )
        self.scaler = torch.amp.GradScaler(
            dev.type, enabled=self.use_amp and self.amp_dtype == torch.float16
        )

    def _start_bookkeeping(self) -> None:
        """A fresh ``TrainState`` and this run's own counters, flags and device sums."""
        dev = self.device
        self.state = TrainState()
        self.resumed_from: tuple[int, int] | None = None
        self.keep_previous = False  # a save keeps the state it replaces once that is ours
        self.steps_run = 0  # optimizer steps in this run (max_steps_this_run counts these)
        self.stop_reason: str | None = None  # set when a signal or max_steps_this_run stops
        self.elapsed_mark = time.monotonic()  # state.elapsed_s counts up to here
        self.stop_flag: _StopFlag | None = None  # installed while run() trains
        # Running sums on the device, read by the host only at sync points (sync_loss):
        # the epoch's loss x volumes, the last step's mean loss, and the first global
        # step whose loss was NaN/Inf (-1: none yet).
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.last_loss = torch.zeros((), dtype=torch.float64, device=dev)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        self.batches = _Batches()
        self.loader: torch.utils.data.DataLoader | None = None
        self.ddp: nn.Module | None = None  # the loss, wrapped for data parallelism

    # -- the run

    def run(self) -> TrainResult:
        """Resume or start afresh, train epoch by epoch until finished, early-stopped or
        asked to stop, then finish."""
        self.resume()
        self.loss_sum.fill_(self.state.epoch_loss_sum)
        self.elapsed_mark = time.monotonic()
        if self.resumed_from is None:
            amp_note = f" amp {str(self.amp_dtype).split('.')[-1]}" if self.use_amp else ""
            procs = f" x {self.group.world} processes" if self.group.world > 1 else ""
            self.log(
                f"[train] start: device {self.device}{procs}{amp_note}, {len(self.dataset)} "
                f"volumes, batch {self.cfg['batch_size']}, up to {self.cfg['epochs']} "
                f"epochs, seed {self.seed}, config {self.config_hash}, checkpoint "
                f"{self.last}"
            )
        if self.group.world > 1:  # after resume: every rank loaded the same state
            # every trained parameter must get a gradient at every step (stages freeze
            # what they do not train): no unused-parameter search, as on a cluster
            self.ddp = nn.parallel.DistributedDataParallel(
                _LossModule(self.model, self.loss_fn),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
            )
        self.loader = self.make_loader()
        failed = True
        try:
            with _StopFlag(self.handle_signals, self.log) as self.stop_flag:
                while self.state.status == "running":
                    self.stop_reason = self.agreed(self.should_stop())
                    # before any step: max_steps_this_run=0, or a signal during validation
                    if self.stop_reason:
                        self.save_last()
                        break
                    if not self.run_epoch():
                        break
                    self.end_epoch()
            result = self.finish()
            failed = False
            return result
        finally:
            self.loader = None  # its persistent workers end with it
            self.group.close(failed=failed)

    def make_loader(self) -> torch.utils.data.DataLoader:
        """One loader for the whole run, reading the batches ``self.batches`` holds
        when an epoch starts; its workers persist across epochs."""
        workers = self.cfg["num_workers"]
        return torch.utils.data.DataLoader(
            self.dataset,  # type: ignore[arg-type]  # any indexable sequence works
            batch_sampler=self.batches,
            collate_fn=self.collate,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=self.cfg["prefetch_factor"] if workers > 0 else None,
        )

    def resume(self) -> None:
        """Load the newest readable saved state (``<out>.last.pt``, else ``<out>.prev.pt``:
        ``medtx.train.checkpoints.load_resumable``) into the model, optimizer, scheduler,
        scaler, RNGs and state when it was written for this config; otherwise keep the
        fresh start, with a warning line when the file was written for another config."""
        found = load_resumable(self.out, self.log)
        if found is None:
            return
        saved, path = found
        if saved.get("format") != CHECKPOINT_FORMAT or saved.get("config_hash") != self.config_hash:
            changed = _changed_keys(saved.get("config") or {}, self.cfg)
            why = (
                f"{path} was written for another config (hash "
                f"{saved.get('config_hash')} != {self.config_hash}; changed: {changed})"
            )
            if path != self.last:  # the newest is damaged: not a config change
                raise MedtxError(f"{self.last} cannot be read and {why}")
            self.log(f"[train] WARNING: {why}; starting fresh")
            return
        self.keep_previous = path == self.last
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        st = self.state = TrainState.from_checkpoint(saved)
        self.resumed_from = (st.epoch, st.step_in_epoch)
        self.log(
            f"[train] resuming from {path}: epoch {st.epoch + 1}, step "
            f"{st.step_in_epoch} in it, global step {st.global_step}"
        )

    def should_stop(self) -> str | None:
        """Why to checkpoint and stop now (a signal, ``max_steps_this_run``), or None."""
        if self.stop_flag is not None and self.stop_flag.signal is not None:
            return f"signal {signal.Signals(self.stop_flag.signal).name}"
        if self.max_steps_this_run is not None and self.steps_run >= self.max_steps_this_run:
            return f"max_steps_this_run={self.max_steps_this_run}"
        return None

    # -- an epoch

    def run_epoch(self) -> bool:
        """Train the epoch's batches not done yet (all but the first ``step_in_epoch``:
        a mid-epoch resume skips those), checkpointing every ``checkpoint_minutes``.
        False when a stop request ended it early (the state is saved then)."""
        st = self.state
        batches = epoch_batches(
            len(self.dataset), self.cfg["batch_size"], self.seed, st.epoch, self.min_batch
        )
        if not batches:
            raise MedtxError(
                f"no training batch: {len(self.dataset)} volume(s) and batches "
                f"need at least {self.min_batch}"
            )
        self.model.train()
        started = time.monotonic()
        todo = batches[st.step_in_epoch :]
        self.batches.batches = [self.group.shard(b) for b in todo]
        loader: Iterable[Any] = self.loader if todo and self.loader is not None else []
        clock = _EpochClock(last_save=started, last_log=started, step_start=time.monotonic())
        for indices, batch in zip(todo, loader):
            self.step(batch, indices)
            now = time.monotonic()
            self.count_step(len(indices), len(batches), now, clock)
            self.stop_reason, save = self.decide(now, clock)
            if self.stop_reason or save:
                self.save_last()
                clock.last_save = time.monotonic()
                clock.step_start += clock.last_save - now  # checkpoint time is not step time
            if self.stop_reason:
                return False
        return True

    def decide(self, now: float, clock: _EpochClock) -> tuple[str | None, bool]:
        """After a step: why to stop (or None) and whether a checkpoint is due.

        Processes of one run agree every ``log_every`` steps (a host sync), so a
        signal or the checkpoint clock of one rank stops or saves them all at the
        same step; ``max_steps_this_run`` is the same on every rank.
        """
        reason = self.should_stop()
        due = now - clock.last_save >= self.interval
        if self.group.world == 1:
            return reason, due
        if self.state.step_in_epoch % self.cfg["log_every"]:
            steps = reason is not None and reason.startswith("max_steps")
            return (reason if steps else None), False
        (due,) = self.group.any(due, device=self.device)
        return self.agreed(reason), due

    def agreed(self, reason: str | None) -> str | None:
        """This rank's reason to stop, or another rank's: every rank stops together
        (a collective under torchrun; the reason itself for a single process)."""
        if self.group.world == 1:
            return reason
        (stop,) = self.group.any(reason is not None, device=self.device)
        return reason or ("a signal to another process" if stop else None)

    def step(self, batch: Any, indices: list[int]) -> None:
        """One optimizer step on ``batch``, this rank's part (``Group.shard``) of the
        global batch ``indices``. The loss draws from each volume's own generators
        (``StepContext``); torch's global stream (dropout) is reseeded by the global
        step and the rank, so a resumed run redraws the same. Nothing here waits for
        the device."""
        st = self.state
        rank = self.group.rank  # rank 0 keeps the seed a single process always used
        torch.manual_seed(derived_seed(self.seed, 1, st.global_step, *([rank] if rank else [])))
        volumes = len(indices)
        ctx = StepContext(
            epoch=st.epoch,
            step=st.step_in_epoch,
            global_step=st.global_step,
            indices=self.group.shard(indices),
            volumes=volumes,
            seed=self.seed,
            device=self.device,
            group=self.group,
        )
        batch = to_device(batch, self.device)
        if self.prepare is not None:
            batch = self.prepare(batch)
        local = len(range(self.group.rank, volumes, self.group.world))  # this rank's share
        with self.autocast():
            if self.ddp is None:
                loss = self.loss_fn(self.model, batch, ctx)
            else:  # DDP averages gradients over ranks: weigh each by its share
                loss = self.ddp(batch, ctx)
        weight = local * self.group.world / volumes
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * weight if weight != 1 else loss).backward()
        if self.cfg["grad_clip"] is not None:  # on the all-reduced, unscaled gradients
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trained, float(self.cfg["grad_clip"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.per_step:
            self.scheduler.step()
        total = self.group.sum(loss.detach().double() * local)  # the global batch's sum
        self.loss_sum += total
        self.last_loss = total / volumes
        bad = (self.first_bad < 0) & ~torch.isfinite(total)
        self.first_bad = torch.where(bad, st.global_step, self.first_bad)

    def sync_loss(self) -> None:
        """Read the device's loss sums into the state; a NaN/Inf loss since the last
        sync stops the run here, before a checkpoint could keep its weights."""
        bad = int(self.first_bad)
        if bad >= 0:
            raise MedtxError(
                f"training loss is NaN or Inf at global step {bad + 1} (seen at epoch "
                f"{self.state.epoch + 1}, step {self.state.step_in_epoch}; no checkpoint "
                f"keeps its weights); lower lr (now {self.scheduler.get_last_lr()[0]:.3g}) "
                "or check the data"
            )
        self.state.epoch_loss_sum = float(self.loss_sum)

    def count_step(self, volumes: int, n_batches: int, now: float, clock: _EpochClock) -> None:
        """Count a finished step in the state; a progress line every ``log_every``
        (the host reads the loss then: ``sync_loss``)."""
        st = self.state
        st.epoch_seconds += now - clock.step_start
        clock.step_start = now
        st.step_in_epoch += 1
        st.global_step += 1
        st.epoch_volumes += volumes
        st.epoch_steps += 1
        self.steps_run += 1
        clock.logged_volumes += volumes
        if st.step_in_epoch % self.cfg["log_every"] == 0:
            self.sync_loss()
            elapsed = st.elapsed_s + now - self.elapsed_mark
            self.log(
                f"[train] epoch {st.epoch + 1}/{self.cfg['epochs']} step "
                f"{st.step_in_epoch}/{n_batches} global {st.global_step} "
                f"loss {float(self.last_loss):.4f} "
                f"(avg {st.epoch_loss_sum / st.epoch_volumes:.4f}) "
                f"{clock.logged_volumes / max(now - clock.last_log, 1e-9):.2f} vol/s "
                f"elapsed {format_seconds(elapsed)}"
            )
            clock.last_log, clock.logged_volumes = now, 0

    def end_epoch(self) -> None:
        """After an epoch's last step: select, decay the learning rate, record, decide
        whether to go on (patience, ``epochs``) and checkpoint."""
        st, cfg = self.state, self.cfg
        self.sync_loss()
        train_loss = st.epoch_loss_sum / max(st.epoch_volumes, 1)
        t_val = time.monotonic()
        metric, tiebreak = self.validate(train_loss)
        improved = self.keep_if_better(metric, tiebreak)
        lr = self.scheduler.get_last_lr()[0]
        if not self.per_step:
            with warnings.catch_warnings():  # a resume at an epoch's end has no optimizer step
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
                self.scheduler.step()
        seconds = st.epoch_seconds + time.monotonic() - t_val
        st.history.append(
            {
                "epoch": st.epoch,
                "train_loss": train_loss,
                "val_metric": metric if self.validate_fn is not None else None,
                "val_tiebreak": tiebreak,
                "lr": lr,
                "steps": st.epoch_steps,
                "seconds": seconds,
                "improved": improved,
            }
        )
        what = "val" if self.validate_fn is not None else "train loss (selects)"
        self.log(
            f"[train] epoch {st.epoch + 1}/{cfg['epochs']} done: train loss "
            f"{train_loss:.4f}, {what} {metric:.4f} (best {format_metric(st.best_metric)} "
            f"at epoch {st.best_epoch + 1}, patience {st.patience_counter}/"
            f"{cfg['patience']}), lr {lr:.3g}, {seconds:.1f} s, "
            f"{st.epoch_volumes / max(st.epoch_seconds, 1e-9):.2f} vol/s"
        )
        st.next_epoch()
        self.loss_sum.zero_()
        if st.patience_counter >= cfg["patience"]:
            st.status = "early_stopped"
            self.log(f"[train] early stop: {cfg['patience']} epoch(s) without improvement")
        elif st.epoch >= cfg["epochs"]:
            st.status = "finished"
        self.save_last()

    def validate(self, train_loss: float) -> tuple[float, float | None]:
        """The epoch's selection metric and tie-break: ``validate(model, group)`` (eval
        mode, no_grad, autocast) on every rank, or the epoch's mean training loss without
        one. A
        validation function shards its set over the ranks (``Group.shard``) and
        gathers the predictions (``Group.gather_parts``), so every GPU works and
        every rank computes the same metric, and so the same early-stopping decision."""
        if self.validate_fn is None:
            return train_loss, None
        self.model.eval()
        with torch.no_grad(), self.autocast():
            value = self.validate_fn(self.model, self.group)
        self.model.train()
        if isinstance(value, tuple):
            return float(value[0]), float(value[1])
        return float(value), None

    def keep_if_better(self, metric: float, tiebreak: float | None = None) -> bool:
        """Keep a copy of the model when ``metric`` beats the best so far, or equals it
        with a better ``tiebreak`` (patience restarts), else count an epoch without
        improvement. True when it did."""
        st = self.state
        tie = (
            metric == st.best_metric
            and tiebreak is not None
            and _better(tiebreak, st.best_tiebreak, self.mode)
        )
        if not (_better(metric, st.best_metric, self.mode) or tie):
            st.patience_counter += 1
            return False
        st.best_metric, st.best_tiebreak, st.best_epoch = metric, tiebreak, st.epoch
        st.best_state = state_copy(self.model)
        st.patience_counter = 0
        return True

    def cosine_factors(self) -> list[Callable[[int], float]]:
        """Per parameter group, the cosine schedule's factor of its rate at step t:
        timm's CosineLRScheduler (warmup_prefix, warm-up from 0, ``t_initial`` the
        run's steps, every group towards ``lr_min``) over this run's ``epochs`` x
        batches per epoch."""
        cfg = self.cfg
        n, size = len(self.dataset), int(cfg["batch_size"])
        per_epoch = n // size + (n % size >= self.min_batch)
        total = max(int(cfg["epochs"]) * per_epoch, 1)
        warm = int(float(cfg["warmup_fraction"]) * total)

        def schedule(floor: float) -> Callable[[int], float]:
            def factor(t: int) -> float:
                if t < warm:
                    return t / warm
                cosine = 1 + math.cos(math.pi * (t - warm) / total)
                return floor + 0.5 * (1 - floor) * cosine

            return factor

        lr_min = float(cfg["lr_min"])
        return [schedule(min(lr_min / g["lr"], 1.0)) for g in self.optimizer.param_groups]

    def autocast(self) -> torch.autocast:
        """Mixed precision on CUDA when ``amp`` is on; a no-op context otherwise."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    # -- checkpoints and the end

    def checkpoint(self) -> dict[str, Any]:
        """The resumable state, as ``<out>.last.pt`` stores it."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "config_hash": self.config_hash,
            "config": to_primitive(self.cfg),
            "seed": self.seed,
            "seeds": self.seeds,
            "mode": self.mode,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "world_size": self.group.world,
            **self.state.to_checkpoint(),
        }

    def save_last(self) -> None:
        """Add the time since the last save to ``elapsed_s``; write ``<out>.last.pt``
        atomically (a kill mid-write leaves the previous one)."""
        self.sync_loss()
        now = time.monotonic()
        self.state.elapsed_s += now - self.elapsed_mark
        self.elapsed_mark = now
        if self.group.is_main:
            save_resumable(self.checkpoint(), self.out, keep_previous=self.keep_previous)
        self.keep_previous = True

    def final_checkpoint(self) -> dict[str, Any]:
        """What ``<out>`` holds: the best state (the last one if none was better than
        nothing), the config, the caller's metadata and the run's record."""
        st = self.state
        return {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSION,
            "model": st.best_state if st.best_state is not None else state_copy(self.model),
            "config": to_primitive(self.cfg),
            "config_hash": self.config_hash,
            "seed": self.seed,
            "seeds": self.seeds,
            "metadata": to_primitive(dict(self.metadata or {})),
            "mode": self.mode,
            "selected_by": "validation" if self.validate_fn is not None else "training loss",
            "best_metric": st.best_metric,
            "best_epoch": st.best_epoch,
            "epochs_done": st.epoch,
            "global_step": st.global_step,
            "status": st.status,
            "history": to_primitive(st.history),
            "elapsed_s": st.elapsed_s,
            "device": str(self.device),
            "world_size": self.group.world,
            "deterministic": self.device.type == "cuda" and bool(self.cfg["deterministic"]),
            "amp": str(self.amp_dtype).split(".")[-1] if self.use_amp else None,
            "torch_version": str(torch.__version__),
        }

    def finish(self) -> TrainResult:
        """The run's result; after "finished" or "early_stopped" ``<out>`` is written
        first (an interrupted run leaves only ``<out>.last.pt``)."""
        st = self.state
        common: dict[str, Any] = {
            "epochs_done": st.epoch,
            "global_step": st.global_step,
            "best_metric": st.best_metric,
            "best_epoch": st.best_epoch,
            "history": st.history,
            "resumed_from": self.resumed_from,
            "steps_this_run": self.steps_run,
            "seconds": st.elapsed_s,
            "device": str(self.device),
            "rank": self.group.rank,
            "world_size": self.group.world,
        }
        if self.stop_reason:
            self.log(
                f"[train] interrupted ({self.stop_reason}) at epoch {st.epoch + 1}, step "
                f"{st.step_in_epoch}, global step {st.global_step}; state saved to "
                f"{self.last}"
            )
            return TrainResult(status="interrupted", out=None, **common)
        if self.group.is_main:
            with atomic_path(self.out) as tmp:
                torch.save(self.final_checkpoint(), tmp)
        self.log(
            f"[train] {st.status} after {st.epoch} epoch(s), {st.global_step} steps, "
            f"{format_seconds(st.elapsed_s)}; best {format_metric(st.best_metric)} at "
            f"epoch {st.best_epoch + 1}; wrote {self.out}"
        )
        return TrainResult(status=st.status, out=self.out, **common)


def train(model: nn.Module, dataset: MapDataset, **settings: Any) -> TrainResult:
    """Train ``model`` on ``dataset``; checkpoint, resume, select by validation.

    ``settings`` are ``TrainSettings``'s keywords (``loss_fn`` and ``out`` required).

    Returns:
        TrainResult. After "finished" or "early_stopped" ``<out>`` holds
        {"format", "model" (best state), "config", "config_hash", "metadata", "seed",
        "best_metric", "best_epoch", "mode", "history", "status", ...}.
    """
    return Trainer(TrainSettings(model, dataset, **settings)).run()


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(
        k
        for k in set(old) | set(new)
        if k not in RUNTIME_KEYS
        and json.dumps(old.get(k), sort_keys=True, default=str)
        != json.dumps(new.get(k), sort_keys=True, default=str)
    )
    return ", ".join(keys) or "(format)"
