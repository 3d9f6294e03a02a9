"""A training loop that survives a cluster's walltime: checkpoints, exact resume, logs.

``train`` runs any model and loss the stages (``medtx.train.pretrain``, ``medtx.train.finetune``) hand it, the way a
long SLURM job should run:

- **Device**: ``cuda`` when available, else CPU (``device=`` overrides). On CUDA the
  step runs under ``torch.autocast`` (bfloat16 where supported, else float16 with a
  ``GradScaler``) when ``amp`` is on; on CPU it runs in float32 with
  ``torch.set_num_threads(threads)``.
- **Seeds**: python ``random``, numpy and torch are seeded from ``seed`` and recorded.
  The data order of epoch e is a permutation drawn from a ``torch.Generator`` seeded
  with (seed, e), and every step reseeds torch (dropout) and hands the loss its own
  numpy/torch generators seeded with (seed, global step), so a run that resumes
  mid-epoch continues exactly the sequence an uninterrupted run would have taken.
- **Optimization**: Adam (``lr``), ``ExponentialLR(lr_decay)`` stepped per epoch,
  at most ``epochs`` epochs, early stopping after ``patience`` epochs without a
  better validation metric (``mode`` max or min; without a validation function the
  epoch's mean training loss selects, mode min). The best state is kept apart from
  the last one.
- **Checkpoints**: every ``checkpoint_minutes`` and at the end of each epoch,
  atomically, to ``<out>.last.pt``: model, optimizer, scheduler, scaler, epoch,
  global step, step within the epoch, best metric and state, patience counter, RNG
  states, history. A rerun resumes from it when its config hash matches the run's
  (mid-epoch too: the batches already done are skipped), and starts afresh with a
  warning line when it does not: two configs are never mixed. Everything stored is a
  tensor or a primitive container, so ``torch.load(..., weights_only=True)`` reads it.
  At the end the best state and the caller's metadata go to ``<out>``.
- **Walltime**: SIGTERM/SIGUSR1 (SLURM's warning signals) and ``max_steps_this_run``
  (the tests' stand-in for a kill) checkpoint and return status ``"interrupted"``;
  the next run resumes.
- **Progress**: one line every ``log_every`` steps and one per epoch, with epoch,
  step, loss, volumes/s and elapsed time (stderr by default).

Example:
    result = train(model, dataset, loss_fn=lambda m, b, ctx: F.mse_loss(m(b["image"]), b["target"]),
                   validate=lambda m: -val_loss(m), mode="max", out="model.pt",
                   config={"lr": 1e-4, "epochs": 150, "seed": 42})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from medtx.errors import ConfigError, MedtxError
from medtx.io import atomic_path
from medtx.train.config import resolve_train_config

CHECKPOINT_FORMAT = "medtx-train-state"
MODEL_FORMAT = "medtx-model"
FORMAT_VERSION = 1

# Keys that change how a run executes, not what it computes: left out of the config
# hash, so a job resumed with more threads or another log interval still resumes.
RUNTIME_KEYS = frozenset({"checkpoint_minutes", "threads", "num_workers", "log_every"})
STATUSES = ("finished", "early_stopped", "interrupted")


# ---------------------------------------------------------------------------- helpers


def default_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def last_path(out: str | Path) -> Path:
    """Where the resumable state of the run that ends in ``out`` lives: ``<out>.last.pt``."""
    out = Path(out)
    return out.with_name(out.name + ".last.pt")


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


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, min_batch: int = 1
                  ) -> list[list[int]]:
    """The epoch's batches of indices; a last batch smaller than ``min_batch`` is dropped."""
    order = epoch_order(n, seed, epoch)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= min_batch]


def rng_state() -> dict[str, Any]:
    """python, numpy and torch RNG states as tensors and lists (weights_only-safe)."""
    py = random.getstate()
    key, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
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


def load_state(path: str | Path) -> dict[str, Any]:
    """A medtx checkpoint (``<out>`` or ``<out>.last.pt``), read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise MedtxError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors have no common base
        raise MedtxError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------- the loop


@dataclass
class StepContext:
    """What a loss function gets besides the model and the batch.

    rng and generator are seeded with (seed, global_step): a pretext transform drawn
    from them is the same in a resumed run as in an uninterrupted one.
    """

    epoch: int
    step: int  # batches done in this epoch before this one
    global_step: int  # optimizer steps done before this one
    rng: np.random.Generator
    generator: torch.Generator  # a CPU generator
    device: torch.device


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
    extra: dict[str, Any] = field(default_factory=dict)


class _StopFlag:
    """Set by SIGTERM/SIGUSR1 while the loop runs (main thread only)."""

    def __init__(self, enabled: bool, log: Callable[[str], None]):
        self.signal: int | None = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.log, self.previous = log, {}

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        self.log(f"[train] received signal {signal.Signals(signum).name}: checkpointing "
                 "after this step and stopping")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _better(metric: float, best: float | None, mode: str) -> bool:
    if best is None:
        return not math.isnan(metric)
    return metric > best if mode == "max" else metric < best


def train(model: nn.Module, dataset: Sequence[Any], *,
          loss_fn: Callable[[nn.Module, Any, StepContext], Tensor],
          out: str | Path,
          config: Mapping[str, Any] | None = None,
          validate: Callable[[nn.Module], float] | None = None,
          mode: Literal["max", "min"] = "max",
          params: Iterable[nn.Parameter] | None = None,
          collate: Callable[[list[Any]], Any] | None = None,
          metadata: Mapping[str, Any] | None = None,
          device: str | torch.device | None = None,
          max_steps_this_run: int | None = None,
          min_batch: int = 1,
          log: Callable[[str], None] | None = None,
          handle_signals: bool = True) -> TrainResult:
    """Train ``model`` on ``dataset``; checkpoint, resume, select by validation.

    Args:
        model: the network (moved to the device here).
        dataset: indexable items (``len`` and ``[i]``), batched by ``collate``.
        loss_fn: (model, batch on the device, StepContext) -> scalar loss.
        out: the final checkpoint path; the resumable state is ``<out>.last.pt``.
        config: ``TRAIN_DEFAULTS`` keys, plus anything else that defines the run (all of
            it except ``RUNTIME_KEYS`` enters the hash that decides whether a saved
            state may be resumed).
        validate: model -> selection metric, run after every epoch with the model in
            eval mode under no_grad. None selects by the epoch's mean training loss.
        mode: "max" or "min" for the validation metric (forced to "min" without one).
        params: the parameters to optimize (default: all with requires_grad).
        collate: list of items -> batch (default ``torch.utils.data.default_collate``).
        metadata: stored with the final checkpoint (preset, task, subjects, sidecars);
            tensors and primitive containers only.
        device: "cpu", "cuda", ...; default cuda when available.
        max_steps_this_run: stop after this many optimizer steps in this call,
            checkpointing first (a simulated walltime kill); status "interrupted".
        min_batch: drop an epoch's last batch when smaller (2 for triplet negatives).
        log: receives progress lines (default: stderr).
        handle_signals: SIGTERM/SIGUSR1 checkpoint and stop (main thread only).

    Returns:
        TrainResult. After "finished" or "early_stopped" ``<out>`` holds
        {"format", "model" (best state), "config", "config_hash", "metadata", "seed",
        "best_metric", "best_epoch", "mode", "history", "status", ...}.
    """
    log = log or default_log
    cfg = resolve_train_config(config)
    mode = mode if validate is not None else "min"
    if mode not in ("max", "min"):
        raise ConfigError(f"mode must be 'max' or 'min', not {mode!r}")
    if len(dataset) == 0:
        raise MedtxError("no training data: the dataset is empty")
    out = Path(out)
    last = last_path(out)
    dev = pick_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    seed = int(cfg["seed"])
    chash = config_hash(cfg)
    seeds = seed_everything(seed)

    use_amp = bool(cfg["amp"]) and dev.type == "cuda"
    amp_dtype = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported()
                 else torch.float16)
    model.to(dev)
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise MedtxError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.Adam(params, lr=float(cfg["lr"]))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=float(cfg["lr_decay"]))
    scaler = torch.amp.GradScaler(dev.type, enabled=use_amp and amp_dtype == torch.float16)

    st: dict[str, Any] = {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "epoch_loss_sum": 0.0,
        "epoch_volumes": 0, "epoch_steps": 0, "epoch_seconds": 0.0, "best_metric": None,
        "best_epoch": -1, "best_state": None, "patience_counter": 0, "history": [],
        "elapsed_s": 0.0, "status": "running",
    }
    resumed_from = None
    if last.exists():
        saved = _try_load(last, log)
        if saved is None:
            pass
        elif saved.get("format") != CHECKPOINT_FORMAT or saved.get("config_hash") != chash:
            changed = _changed_keys(saved.get("config") or {}, cfg)
            log(f"[train] WARNING: {last} was written for another config (hash "
                f"{saved.get('config_hash')} != {chash}; changed: {changed}); starting fresh")
        else:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            set_rng_state(saved["rng"])
            for key in st:
                st[key] = saved[key]
            resumed_from = (st["epoch"], st["step_in_epoch"])
            log(f"[train] resuming from {last}: epoch {st['epoch'] + 1}, step "
                f"{st['step_in_epoch']} in it, global step {st['global_step']}")

    def checkpoint() -> None:
        state = {
            "format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "config_hash": chash,
            "config": to_primitive(cfg), "seed": seed, "seeds": seeds, "mode": mode,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state(), **{k: to_primitive(v) for k, v in st.items()},
        }
        with atomic_path(last) as tmp:
            torch.save(state, tmp)

    def stop_requested() -> str | None:
        if stop.signal is not None:
            return f"signal {signal.Signals(stop.signal).name}"
        if max_steps_this_run is not None and steps_run >= max_steps_this_run:
            return f"max_steps_this_run={max_steps_this_run}"
        return None

    def save() -> None:
        nonlocal run_start
        now = time.monotonic()
        st["elapsed_s"] += now - run_start
        run_start = now
        checkpoint()

    collate = collate or torch.utils.data.default_collate
    log_every, minutes = cfg["log_every"], cfg["checkpoint_minutes"]
    interval = minutes * 60.0 if minutes and minutes > 0 else math.inf
    run_start = time.monotonic()
    steps_run = 0
    stop_reason = None
    if resumed_from is None:
        amp_note = f" amp {str(amp_dtype).split('.')[-1]}" if use_amp else ""
        log(f"[train] start: device {dev}{amp_note}, {len(dataset)} volumes, batch "
            f"{cfg['batch_size']}, up to {cfg['epochs']} epochs, seed {seed}, config {chash}, "
            f"checkpoint {last}")

    with _StopFlag(handle_signals, log) as stop:
        while st["status"] == "running":
            stop_reason = stop_requested()
            if stop_reason:  # before any step: max_steps_this_run=0, or a signal in validation
                save()
                break
            epoch = st["epoch"]
            batches = epoch_batches(len(dataset), cfg["batch_size"], seed, epoch, min_batch)
            if not batches:
                raise MedtxError(f"no training batch: {len(dataset)} volume(s) and batches "
                                 f"need at least {min_batch}")
            model.train()
            last_save = last_log = time.monotonic()
            logged_volumes = 0
            todo = batches[st["step_in_epoch"]:]
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=todo, collate_fn=collate,
                num_workers=cfg["num_workers"], pin_memory=dev.type == "cuda") if todo else []
            t_step = time.monotonic()
            for indices, batch in zip(todo, loader):
                step_seed = derived_seed(seed, 1, st["global_step"])
                torch.manual_seed(step_seed)
                ctx = StepContext(epoch=epoch, step=st["step_in_epoch"],
                                  global_step=st["global_step"],
                                  rng=np.random.default_rng([seed, 2, st["global_step"]]),
                                  generator=torch.Generator().manual_seed(step_seed),
                                  device=dev)
                batch = to_device(batch, dev)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                    loss = loss_fn(model, batch, ctx)
                if not torch.isfinite(loss.detach()).all():
                    raise MedtxError(
                        f"training loss is {loss.item()} at epoch {epoch + 1}, step "
                        f"{st['step_in_epoch'] + 1} (global {st['global_step'] + 1}); lower lr "
                        f"(now {scheduler.get_last_lr()[0]:.3g}) or check the data")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                now = time.monotonic()
                st["epoch_seconds"] += now - t_step
                t_step = now
                st["step_in_epoch"] += 1
                st["global_step"] += 1
                st["epoch_loss_sum"] += float(loss.detach()) * len(indices)
                st["epoch_volumes"] += len(indices)
                st["epoch_steps"] += 1
                steps_run += 1
                logged_volumes += len(indices)
                if st["step_in_epoch"] % log_every == 0:
                    elapsed = st["elapsed_s"] + now - run_start
                    log(f"[train] epoch {epoch + 1}/{cfg['epochs']} step "
                        f"{st['step_in_epoch']}/{len(batches)} global {st['global_step']} "
                        f"loss {float(loss.detach()):.4f} (avg "
                        f"{st['epoch_loss_sum'] / st['epoch_volumes']:.4f}) "
                        f"{logged_volumes / max(now - last_log, 1e-9):.2f} vol/s "
                        f"elapsed {format_seconds(elapsed)}")
                    last_log, logged_volumes = now, 0
                stop_reason = stop_requested()
                if stop_reason or now - last_save >= interval:
                    save()
                    last_save = time.monotonic()
                    t_step += last_save - now  # checkpoint time is not step time
                if stop_reason:
                    break
            if stop_reason:
                break

            # end of epoch: select, decay, record, checkpoint
            train_loss = st["epoch_loss_sum"] / max(st["epoch_volumes"], 1)
            t_val = time.monotonic()
            if validate is not None:
                model.eval()
                with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                    metric = float(validate(model))
                model.train()
            else:
                metric = train_loss
            improved = _better(metric, st["best_metric"], mode)
            if improved:
                st["best_metric"], st["best_epoch"] = metric, epoch
                st["best_state"] = state_copy(model)
                st["patience_counter"] = 0
            else:
                st["patience_counter"] += 1
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # a resume at an epoch's end has no optimizer step
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
                scheduler.step()
            seconds = st["epoch_seconds"] + time.monotonic() - t_val
            st["history"].append({"epoch": epoch, "train_loss": train_loss,
                                  "val_metric": metric if validate is not None else None,
                                  "lr": lr, "steps": st["epoch_steps"], "seconds": seconds,
                                  "improved": improved})
            what = "val" if validate is not None else "train loss (selects)"
            log(f"[train] epoch {epoch + 1}/{cfg['epochs']} done: train loss {train_loss:.4f}, "
                f"{what} {metric:.4f} (best {format_metric(st['best_metric'])} at epoch "
                f"{st['best_epoch'] + 1}, patience {st['patience_counter']}/{cfg['patience']}), "
                f"lr {lr:.3g}, {seconds:.1f} s, "
                f"{st['epoch_volumes'] / max(st['epoch_seconds'], 1e-9):.2f} vol/s")
            st.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_volumes=0,
                      epoch_steps=0, epoch_seconds=0.0)
            if st["patience_counter"] >= cfg["patience"]:
                st["status"] = "early_stopped"
                log(f"[train] early stop: {cfg['patience']} epoch(s) without improvement")
            elif st["epoch"] >= cfg["epochs"]:
                st["status"] = "finished"
            save()

    common = dict(epochs_done=st["epoch"], global_step=st["global_step"],
                  best_metric=st["best_metric"], best_epoch=st["best_epoch"],
                  history=st["history"], resumed_from=resumed_from, steps_this_run=steps_run,
                  seconds=st["elapsed_s"], device=str(dev))
    if stop_reason:
        log(f"[train] interrupted ({stop_reason}) at epoch {st['epoch'] + 1}, step "
            f"{st['step_in_epoch']}, global step {st['global_step']}; state saved to {last}")
        return TrainResult(status="interrupted", out=None, **common)

    final = {
        "format": MODEL_FORMAT, "version": FORMAT_VERSION,
        "model": st["best_state"] if st["best_state"] is not None else state_copy(model),
        "config": to_primitive(cfg), "config_hash": chash, "seed": seed, "seeds": seeds,
        "metadata": to_primitive(dict(metadata or {})), "mode": mode,
        "selected_by": "validation" if validate is not None else "training loss",
        "best_metric": st["best_metric"], "best_epoch": st["best_epoch"],
        "epochs_done": st["epoch"], "global_step": st["global_step"],
        "status": st["status"], "history": to_primitive(st["history"]),
        "elapsed_s": st["elapsed_s"], "device": str(dev),
        "amp": str(amp_dtype).split(".")[-1] if use_amp else None,
        "torch_version": str(torch.__version__),
    }
    with atomic_path(out) as tmp:
        torch.save(final, tmp)
    log(f"[train] {st['status']} after {st['epoch']} epoch(s), {st['global_step']} steps, "
        f"{format_seconds(st['elapsed_s'])}; best {format_metric(st['best_metric'])} at epoch "
        f"{st['best_epoch'] + 1}; wrote {out}")
    return TrainResult(status=st["status"], out=out, **common)


def _try_load(path: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    try:
        return load_state(path)
    except MedtxError as err:
        log(f"[train] WARNING: {err}; starting fresh")
        return None


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if k not in RUNTIME_KEYS
                  and json.dumps(old.get(k), sort_keys=True, default=str)
                  != json.dumps(new.get(k), sort_keys=True, default=str))
    return ", ".join(keys) or "(format)"
