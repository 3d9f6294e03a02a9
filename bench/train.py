#!/usr/bin/env python
"""Training throughput: the step, the loader that feeds it, and a GPU's share of runs.

Sections (``--sections``, a comma list; default all six, in this order):

step    At 96x114x96 (the paper's input) and, for the demo, 48x57x48, per volume:
        forward+backward+optimizer step of the classification model (CPU, the given
        threads; and CUDA with AMP at batch 1 when a GPU is present) against reading
        one volume the former way (``medtx.train.data.VolumeSet`` turning a
        memory-mapped float16 .npy cache into a float32 item, in the process). The
        loader must be >= 10x faster than the step.
loader  The trainer's loader at 96x114x96: 40 random float16 volumes in a temporary
        .npy cache (just written, so read from the page cache, not the disk), a
        ``stored=True`` VolumeSet, one DataLoader as ``Trainer.make_loader`` builds
        it (``collate``, batches of ``--batch``, persistent workers, prefetch_factor
        2, pinned memory on CUDA) with 0, 2 and 4 workers; each batch is moved to the
        device (CUDA when present, else the CPU) and through ``VolumeSet.prepare``.
        ``--epochs`` epochs, the first (it starts the workers) a warm-up left out.
        Volumes/s beside the model's step rate at the same size (CPU fp32 at batch
        1, as the step section; CUDA fp32 and bf16 at ``--batch``) and their
        ratios, and the former float32 item path's rate for comparison. Worker
        counts beyond the cores oversubscribe them: the figure is what was measured.
backbones  A classification step (forward, backward, Adam) at 96x114x96, batch 1,
        and the parameter count of each backbone side by side: the Medical
        Transformer (table3) and PUMIT's universal ViT (tiny, base; 1 mm
        isotropic, a linear head on the class token); CPU, and CUDA when present.
remap   The pre-training remap: the three Bézier intensity remaps of one 96x114x96
        volume (``plane_positives``' work per volume), the former numpy path
        (np.interp on the host, with the device round trip on CUDA) against
        ``curve_lookup``, on one CPU thread and on CUDA when present; for a volume
        as training reads it at full size (float16 cache values: a table over the
        float16 codes) and one off the float16 grid (downsampled: the bucket table).
flops   What a training run will cost, before it runs. For every backbone preset (the
        Medical Transformer's table3 and paper_text, PUMIT's tiny and base) and every
        stage a workflow rule trains (fine-tuning's classification, regression and
        segmentation, at 1, 1 and 4 input channels; MT exemplar and masked, PUMIT
        tokenizer (with its discriminator; no LPIPS term, as without
        ``lpips_weights``) and MIM pre-training), one training step as the stage runs it
        (its model, frozen parts, loss, optimizer, in the trainer's order) at
        96x114x96 and batch 10: FLOPs a volume of forward + backward
        (``FlopCounterMode``), the tensor memory of the step at its peak (float32;
        counted by a TorchDispatchMode on the meta device: every tensor the step
        allocates, exact for them, nothing computed, so even PUMIT base's
        segmentation at batch 10 costs no CPU time), parameters, the H100 volumes/s at
        35 % of 989 TFLOP/s (bf16 dense, SXM) and the GPU memory, runs per 80 GB GPU
        and CPU-run host memory the workflow plans (``medtx.train.resources``).
        Then a check: three steps computed on the CPU (a fresh process each, batch
        2), their tensors counted there against the meta count, and the process's
        resident peak against the planned host memory. ``--write-table`` rewrites
        ``medtx/train/step_cost.json`` (the same step at each downsample 1..4 and
        batches 2 and 64), which the workflow's training rules plan with; the section
        says whether the committed table matches.
cuda    Only with a GPU; without one a line says the rows were not run.
        (a) Steps at ``--batch`` 96x114x96 volumes in fp32 and bf16 autocast, with
        deterministic kernels (the trainer's default, ``deterministic: true``) and
        with cuDNN's benchmarked ones (``deterministic: false``): seconds, volumes/s
        and peak memory allocated. (b) Runs per GPU: k = 1, 2, 4, 8 processes (this
        script, hidden ``--worker-steps``), each training the model at ``--batch``
        as the trainer would (bf16, deterministic kernels; else the first row of (a)
        that ran) on GPU 0, warmed up, then started together (a file barrier): step
        seconds per run and volumes/s in all, first start to last end; a k whose
        memory would not fit (peak of (a) + 1 GiB a process) is skipped. (c) With 2
        GPUs or more: DDP over 1 and 2 GPUs (``torchrun --standalone``, NCCL,
        hidden ``--ddp-steps``) at the global batch ``--batch``, each rank its
        ``Group.shard``: volumes/s from rank 0 and the scaling ratio. (d) The flops
        section's step of each backbone's main stages at ``--batch``, fp32 and
        bf16: volumes/s, achieved TFLOP/s (counted FLOPs / time; the utilisation
        the flops section assumes), peak memory allocated against the counted
        fp32 step and the GPU memory the workflow plans for it.

On a GPU machine the process runs with the trainer's default CUDA kernels
(deterministic). Run it with the threads the training rules use;
OMP_WAIT_POLICY=PASSIVE is set as the rules set it. ``--quick`` times fewer steps,
epochs and repetitions (every section on 2 CPU cores in under a minute; flops counts
the full size only and checks one row, under a minute of its own; 3 min without).
Figures are printed, never asserted; ``--json PATH`` also writes every section's
figures to one JSON file (rewritten after each section, and when a ``timeout`` stops
the run).

    .venv/bin/python bench/train.py [--threads 1] [--steps 5] [--batch 10] [--epochs 6]
        [--quick] [--sections step,loader,backbones,remap,flops,cuda] [--json PATH]
        [--write-table]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

from medtx.models import pretext  # noqa: E402
from medtx.models.pretext import (  # noqa: E402
    curve_lookup,
    draw_intensity_curve,
    exemplar_loss,
    masked_encoding_loss,
)
from medtx.models.pumit import tokenizer as pumit_tokenizer  # noqa: E402
from medtx.models.pumit.mim import MimHead, soft_cross_entropy  # noqa: E402
from medtx.models.pumit.model import PRESETS as PUMIT_PRESETS  # noqa: E402
from medtx.models.pumit.model import pad_to_multiple  # noqa: E402
from medtx.models.pumit.sac import Grid  # noqa: E402
from medtx.models.pumit.tokenizer import Tokenizer, tokenizer_loss  # noqa: E402
from medtx.models.pumit.vit import PATCH, VIT_SIZES, UniversalViT, random_token_mask  # noqa: E402
from medtx.models.registry import REGISTRY, build  # noqa: E402
from medtx.models.slice_transformer import TASK_DEFAULTS, build_model  # noqa: E402
from medtx.train import resources  # noqa: E402
from medtx.train.config import DOWNSAMPLE_MAX, TRAIN_DEFAULTS  # noqa: E402
from medtx.train.config import defaults as stage_defaults  # noqa: E402
from medtx.train.data import VolumeSet, collate  # noqa: E402
from medtx.train.distributed import Group  # noqa: E402
from medtx.train.loop import set_cuda_determinism, to_device  # noqa: E402
from medtx.train.losses import cross_entropy, segmentation_loss  # noqa: E402

SECTIONS = ("step", "loader", "backbones", "remap", "flops", "cuda")
SIZE = (96, 114, 96)
LOADER_VOLUMES = 40
LOADER_WORKERS = (0, 2, 4)
PACKING = (1, 2, 4, 8)
DETERMINISTIC = bool(TRAIN_DEFAULTS["deterministic"])
KERNELS = {True: "deterministic", False: "benchmark"}  # as the trainer's key sets them
WARMUP = 3  # untimed steps of a packed run or a DDP rank (CUDA init, kernel choice)
RUN_TIMEOUT = 150  # seconds for one packing or DDP row, its processes' start included
CONTEXT = 2**30  # GPU memory a process takes besides its tensors (about; for skipping k)
GiB = 2**30
MiB = 2**20
GPU_USABLE = 0.9  # of a GPU's memory a row may plan for
# The flops section: the step-cost table's two batches (the exemplar loss needs 2; 64
# is beyond the batches the papers train with but PUMIT's pre-training, 48 and 84),
# and the peak an H100 SXM's bf16 tensor cores reach (dense), of which a run is taken
# to use UTILISATION.
COST_BATCHES = (2, 64)
DOWNSAMPLES = tuple(range(1, DOWNSAMPLE_MAX + 1))  # the table's sizes: 96x114x96 // each
PRETRAIN_STEPS = {"medical_transformer": ("exemplar", "masked"), "pumit": ("tokenizer", "mim")}
H100_BF16_FLOPS = 989e12
UTILISATION = 0.35
COST_TABLE = Path(__file__).resolve().parents[1] / "medtx/train" / resources.STEP_COST_TABLE


def make_step(
    device: str | torch.device,
    downsample: int,
    amp: bool,
    batch: int,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> Callable[[], None]:
    """One training step of the classification model on a fixed random batch (it does
    not wait for the device); ``wrap`` wraps the model (DDP)."""
    model = build_model("table3", "classification").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    net = wrap(model) if wrap is not None else model
    shape = tuple(s // downsample for s in SIZE)
    x = torch.rand(batch, 1, *shape, device=device)
    y = torch.ones(batch, dtype=torch.long, device=device)
    kind = torch.device(device).type

    def step() -> None:
        with torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(device: str, downsample: int, steps: int, amp: bool, batch: int = 1) -> float:
    """Median seconds of one step (the first, a warm-up, left out)."""
    step = make_step(device, downsample, amp, batch)
    times = []
    for i in range(steps + 1):  # the first step warms up
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


@functools.cache
def step_figures(
    device: str, downsample: int, steps: int, amp: bool, batch: int, deterministic: bool
) -> tuple[float, int]:
    """(median step seconds, peak CUDA bytes allocated; 0 on CPU), measured once a run
    (sections share them). ``deterministic``: the CUDA kernels, as the trainer's key."""
    if device != "cuda":
        return step_seconds(device, downsample, steps, amp, batch), 0
    set_cuda_determinism(deterministic)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        seconds = step_seconds(device, downsample, steps, amp, batch)
        return seconds, torch.cuda.max_memory_allocated()
    finally:
        set_cuda_determinism(DETERMINISTIC)
        gc.collect()
        torch.cuda.empty_cache()


def cache_volumes(directory: Path, n: int) -> list[dict[str, str]]:
    """``n`` random float16 (1, 96, 114, 96) .npy caches in ``directory``, as items."""
    items = []
    for i in range(n):
        path = directory / f"v{i}.npy"
        volume = np.random.default_rng(i).random((1, *SIZE), dtype=np.float32)
        np.save(path, volume.astype(np.float16))
        items.append({"scan": f"v{i}", "image": str(path), "label": "1"})
    return items


def load_seconds(items: list[dict[str, str]], downsample: int) -> float:
    """Seconds a volume on the former path: a float32 item, read in the process."""
    data = VolumeSet(items, task="classification", downsample=downsample)
    t0 = time.perf_counter()
    for i in range(len(items)):
        data[i]["image"].sum()
    return (time.perf_counter() - t0) / len(items)


def loader_rate(
    items: list[dict[str, str]], workers: int, batch: int, epochs: int, device: torch.device
) -> float:
    """Volumes/s of the trainer's loader (``Trainer.make_loader``) over stored items,
    the first epoch left out. On CUDA each batch is moved and prepared (float32,
    on the device) as training does; on a CPU the figure is the batches delivered
    to the training process, since converting them is the GPU's work in training."""
    data = VolumeSet(items, task="classification", stored=True)
    n = len(items)
    batches = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    with warnings.catch_warnings():  # more workers than cores: the header says so
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = torch.utils.data.DataLoader(
            data,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=TRAIN_DEFAULTS["prefetch_factor"] if workers > 0 else None,
        )
        seconds = 0.0
        for epoch in range(epochs):  # the first starts the workers
            sync(device)
            t0 = time.perf_counter()
            for loaded in loader:
                if device.type == "cuda":
                    data.prepare(to_device(loaded, device))
            sync(device)
            if epoch:
                seconds += time.perf_counter() - t0
    del loader  # its persistent workers end with it
    return n * (epochs - 1) / seconds


def remap_seconds(device: str, reps: int = 5, cached: bool = True) -> tuple[float, float]:
    """Median seconds per volume for three fresh curves: (numpy path, torch path).

    ``cached``: the volume as training reads it at full size, every voxel a float16
    value from the cache; else values off the float16 grid (a downsampled volume).
    """
    rng = np.random.default_rng(0)
    volume = torch.rand(1, 1, *SIZE, generator=torch.Generator().manual_seed(0))
    if cached:
        volume = volume.half().float()
    volume = volume.to(device)

    def numpy_path(xs: np.ndarray, ys: np.ndarray) -> None:  # the former per-plane copy
        for p in range(3):
            values = volume[0].detach().cpu().numpy()
            torch.from_numpy(np.interp(values, xs[p, 0], ys[p, 0]).astype(np.float32)).to(device)

    def torch_path(xs: np.ndarray, ys: np.ndarray) -> None:
        curve_lookup(volume, xs, ys)

    medians = []
    for path in (numpy_path, torch_path):
        times = []
        for i in range(reps + 1):  # the first call warms up
            curves = [draw_intensity_curve(rng) for _ in range(3)]
            xs, ys = (np.array([[c[j]] for c in curves]) for j in (0, 1))
            sync(device)
            t0 = time.perf_counter()
            path(xs, ys)
            sync(device)
            if i:
                times.append(time.perf_counter() - t0)
        medians.append(float(np.median(times)))
    return medians[0], medians[1]


RESULTS: dict[str, Any] = {}  # section -> its figures, for --json


def record(section: str, **row: Any) -> None:
    """One row of figures for ``--json`` (sections that print tables)."""
    RESULTS.setdefault(section, {}).setdefault("rows", []).append(row)


def write_results(path: str | None, argv: list[str]) -> None:
    """Everything recorded so far as one JSON file (rewritten after each section, so a
    run cut short keeps what it measured)."""
    if not path:
        return
    import record  # bench/record.py: the commit and machine, as of this run's start

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    gpus = torch.cuda.device_count() if cuda else 0
    notes = [f"torch {torch.__version__}; device {device}; {gpus} GPU(s)"]
    record.write_record("train", RESULTS, path, notes=notes, argv=["bench/train.py", *argv])


def failure(err: BaseException | str) -> str:
    """One short line for a row that failed: an exception or a process's output."""
    if isinstance(err, BaseException):
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {(lines or [''])[0][:160]}"
    lines = [line.strip() for line in err.splitlines() if any(c.isalnum() for c in line)]
    errors = [
        line
        for line in lines
        if ("Error:" in line or "Exception:" in line) and "ChildFailedError" not in line
    ]  # a rank's own error, not torchrun's summary after it
    return (errors or lines or ["(no output)"])[-1][:160]


# ------------------------------------------------------------- hidden modes: processes


def packing_worker(args: argparse.Namespace) -> int:
    """``--worker-steps N``: one of k runs sharing a GPU. Warms up, touches
    ``ready<index>`` in ``--worker-dir``, waits for ``go`` there, times N steps and
    prints one ``BENCH {json}`` line (wall-clock start and end, for the total)."""
    directory = Path(args.worker_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if device == "cuda":
            set_cuda_determinism(args.kernels == KERNELS[True])
        step = make_step(device, 1, args.precision == "bf16", args.batch)
        for _ in range(WARMUP):
            step()
        sync(device)
    finally:  # a run that failed must not hold the others at the start
        (directory / f"ready{args.worker_index}").touch()
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (directory / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    t0 = time.time()
    for _ in range(args.worker_steps):
        step()
    sync(device)
    t1 = time.time()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    record = {"t0": t0, "t1": t1, "steps": args.worker_steps, "batch": args.batch, "peak": peak}
    print("BENCH " + json.dumps(record), flush=True)
    return 0


def ddp_worker(args: argparse.Namespace) -> int:
    """``--ddp-steps N``: one rank under torchrun. DDP training at the global batch
    ``--batch`` (this rank its ``Group.shard``; one process trains without DDP, as the
    trainer does); rank 0 prints one ``BENCH {json}`` line."""
    group = Group.from_env()
    device = torch.device(group.device(None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        set_cuda_determinism(args.kernels == KERNELS[True])
    wrap = None
    if group.world > 1:
        ids = [device.index] if device.type == "cuda" else None

        def wrap(model: nn.Module) -> nn.Module:
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    local = len(group.shard(list(range(args.batch))))
    step = make_step(device, 1, args.precision == "bf16", local, wrap)
    for _ in range(WARMUP):
        step()
    sync(device)
    if group.world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(args.ddp_steps):
        step()
    sync(device)
    if group.world > 1:
        torch.distributed.barrier()
    seconds = time.perf_counter() - t0
    if group.is_main:
        record = {"world": group.world, "seconds": seconds, "steps": args.ddp_steps}
        print("BENCH " + json.dumps({**record, "batch": args.batch}), flush=True)
    group.close()
    return 0


def bench_record(text: str) -> dict | None:
    lines = [line for line in text.splitlines() if line.startswith("BENCH ")]
    return json.loads(lines[-1][len("BENCH ") :]) if lines else None


def packing_run(
    k: int, batch: int, steps: int, precision: str, kernels: str
) -> tuple[float, float] | str:
    """k concurrent runs of ``packing_worker``: (mean step seconds a run, volumes/s of
    all from the first start to the last end), or why it failed."""
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        procs = []
        for i in range(k):
            with (directory / f"out{i}.txt").open("w") as out:
                command = [sys.executable, script, "--threads", "1", "--batch", str(batch)]
                command += ["--precision", precision, "--kernels", kernels]
                command += ["--worker-steps", str(steps)]
                command += ["--worker-dir", tmp, "--worker-index", str(i)]
                procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + RUN_TIMEOUT

        def waiting() -> bool:
            return any(
                p.poll() is None and not (directory / f"ready{i}").exists()
                for i, p in enumerate(procs)
            )

        while waiting() and time.monotonic() < deadline:
            time.sleep(0.05)
        (directory / "go").touch()
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                p.kill()
                p.wait()
        if timed_out:
            return f"timed out after {RUN_TIMEOUT} s"
        records = []
        for i, p in enumerate(procs):
            text = (directory / f"out{i}.txt").read_text(errors="replace")
            record = bench_record(text)
            if p.returncode or record is None:
                return f"run {i + 1} of {k}: exit {p.returncode}, {failure(text)}"
            records.append(record)
    span = max(r["t1"] for r in records) - min(r["t0"] for r in records)
    per_run = float(np.mean([(r["t1"] - r["t0"]) / r["steps"] for r in records]))
    return per_run, sum(r["steps"] * r["batch"] for r in records) / span


def ddp_run(nproc: int, batch: int, steps: int, precision: str, kernels: str) -> float | str:
    """Volumes/s of ``ddp_worker`` under ``torchrun --standalone --nproc-per-node``,
    or why it failed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", str(Path(__file__).resolve()), "--threads", "1"]
    command += ["--batch", str(batch), "--precision", precision, "--kernels", kernels]
    command += ["--ddp-steps", str(steps)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
        proc.communicate()
        return f"timed out after {RUN_TIMEOUT} s"
    record = bench_record(out)
    if proc.returncode or record is None:
        return f"exit {proc.returncode}, {failure(err or out)}"
    return record["steps"] * record["batch"] / record["seconds"]


# ------------------------------------------------------------- step cost (flops section)


class CostCase(NamedTuple):
    """One training step a workflow rule runs: a backbone's preset, its stage (``step``:
    exemplar, masked, tokenizer, mim or finetune) and the fine-tuning task."""

    backbone: str
    preset: str
    step: str
    task: str | None

    @property
    def label(self) -> str:
        name = "MT" if self.backbone == "medical_transformer" else "PUMIT"
        return f"{name} {self.preset} {self.task or self.step}"


def cost_cases(only: dict[str, tuple[str, ...]] | None = None) -> list[CostCase]:
    """Every (backbone, preset, stage, task) of the registry, or of ``only``'s
    backbones and presets: fine-tuning's tasks, then the pre-training stages."""
    cases = []
    for name, spec in REGISTRY.items():
        for preset in tuple(spec.presets) if only is None else only.get(name, ()):
            cases += [CostCase(name, preset, "finetune", task) for task in TASK_DEFAULTS]
            cases += [CostCase(name, preset, step, None) for step in PRETRAIN_STEPS[name]]
    return cases


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, while active: every op's outputs
    count until their storage is freed (a weak reference's callback), as do the
    tensors given to ``track`` (weights and the batch, made before). On the meta
    device these are the step's own allocations with nothing computed. Not counted:
    the allocator's rounding and caching, kernels' internal buffers (oneDNN, cuDNN
    workspaces), CUDA's context."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.refs: list[weakref.ref] = []
        self.current = self.peak = 0

    def track(self, *tensors: Any) -> None:
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self.sizes:
                continue
            n = storage.nbytes()
            self.sizes[storage] = n
            self.refs.append(weakref.ref(storage, functools.partial(self._free, n)))
            self.current += n
            self.peak = max(self.peak, self.current)

    def _free(self, n: int, _ref: weakref.ref) -> None:
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*tree_flatten(out)[0])
        return out


def _random_positives(volumes: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """``plane_positives``' three remapped volumes, as random ones: its host-side
    curves have no meta kernel, and its memory is the three volumes."""
    return tuple(torch.rand_like(volumes) for _ in range(3))


def cost_step(
    case: CostCase,
    device: str,
    batch: int,
    size: tuple[int, ...] = SIZE,
    channels: int | None = None,
    amp: bool = False,
) -> tuple[Callable[[], None], nn.Module, list[torch.Tensor]]:
    """One training step of ``case`` as its stage trains it, on a fixed random batch:
    the stage's model, frozen parts and loss (medtx.train.pretrain, .mim, .finetune),
    the trainer's optimizer (AdamW with PUMIT's weight decay, else Adam; foreach, as
    on CUDA) and order (loss, under bf16 autocast with ``amp``; zero_grad, backward,
    the stage's gradient clipping, step). Returns (step, the model with every part
    it holds, the batch)."""
    cfg = stage_defaults(case.backbone)
    task = case.task or "classification"
    outputs, task_channels = TASK_DEFAULTS[task]
    c = channels or (task_channels if case.step == "finetune" else 1)
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    iso = Grid(0)
    with torch.device(device):
        x = torch.rand(batch, c, *size)
        tensors = [x]
        adversarial = getattr(pumit_tokenizer, "AdversarialTokenizer", None)
        if case.step == "tokenizer" and adversarial is not None:  # with its discriminator
            gan = pumit_tokenizer.GanSettings(weight=float(cfg["gan_weight"]))
            model: nn.Module = adversarial.build(PUMIT_PRESETS[case.preset].tokenizer, c, gan)
        elif case.step == "tokenizer":
            model = Tokenizer(PUMIT_PRESETS[case.preset].tokenizer, in_channels=c)
        else:
            kwargs = {"backbone": case.backbone, "preset": case.preset, "task": task}
            model = build({**kwargs, "in_channels": c})
        if case.step == "finetune":
            if task == "segmentation":
                y = torch.rand(batch, outputs, *size)  # region masks, float32 once prepared
            elif task == "regression":
                y = torch.rand(batch)  # standardized ages
            else:
                y = torch.zeros(batch, dtype=torch.long)
            tensors.append(y)

            def loss_fn() -> torch.Tensor:
                logits = model(x)
                if task == "classification":
                    return cross_entropy(logits, y)
                if task == "regression":
                    return F.l1_loss(logits[:, 0].float(), y)
                return segmentation_loss(logits, y)

        elif case.step == "exemplar":
            model.requires_grad_(False)
            model.encoders.requires_grad_(True)

            def loss_fn() -> torch.Tensor:
                with mock.patch.object(pretext, "plane_positives", _random_positives):
                    return exemplar_loss(model, x, rng, margin=float(cfg["margin"]))

        elif case.step == "masked":
            model.requires_grad_(False)
            model.transformer.requires_grad_(True)

            def loss_fn() -> torch.Tensor:
                ratio = float(cfg["mask_ratio"])
                return masked_encoding_loss(model, x, ratio=ratio, generator=generator)

        elif case.step == "tokenizer":
            lam1, lam2 = float(cfg["diversity"]), float(cfg["sharpness"])

            def loss_fn() -> torch.Tensor:  # without the perceptual term (lpips_weights)
                xp = pad_to_multiple(x, iso, PATCH)
                if adversarial is None:
                    recon, soft = model(xp, iso)
                    return tokenizer_loss(xp, recon, soft, diversity=lam1, sharpness=lam2)
                _, _, parts = model.losses(xp, iso, diversity=lam1, sharpness=lam2)
                both = parts["gan_term"] + parts["disc"]
                return parts["vq"] + (both - both.detach())  # as pretrain_tokenizer's

        elif case.step == "mim":
            tokenizer = Tokenizer(PUMIT_PRESETS[case.preset].tokenizer).requires_grad_(False)
            model.requires_grad_(False)
            model.vit.requires_grad_(True)
            codes = tokenizer.quantizer.codebook.num_embeddings
            head = model.mim_head = MimHead(model.vit.size.dim, codes)
            model.tokenizer = tokenizer.eval()

            def loss_fn() -> torch.Tensor:
                xp = pad_to_multiple(x, iso, PATCH)
                with torch.no_grad():
                    soft, _ = tokenizer.encode(xp, iso)
                target = soft.probs.flatten(1, 3).float()
                mask = random_token_mask(len(xp), target.shape[1], float(cfg["mask_ratio"]))
                out, _ = model.vit(xp, iso, mask=mask.to(xp.device))
                return soft_cross_entropy(head(out[:, 1:]), target, mask.to(xp.device))

        else:
            raise ValueError(f"unknown stage {case.step!r}")
    trained = [p for p in model.parameters() if p.requires_grad]
    lr, decay = float(cfg["lr"]), float(cfg.get("weight_decay") or 0.0)
    opt: torch.optim.Optimizer = (
        torch.optim.AdamW(trained, lr=lr, weight_decay=decay, foreach=True)
        if decay
        else torch.optim.Adam(trained, lr=lr, foreach=True)
    )

    kind = torch.device(device).type
    clip = cfg.get("grad_clip")

    def step() -> None:
        with torch.autocast(kind, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:  # PUMIT's grad_clip
            torch.nn.utils.clip_grad_norm_(trained, float(clip))
        opt.step()

    return step, model, tensors


def step_cost_figures(
    case: CostCase,
    device: str,
    batch: int,
    size: tuple[int, ...] = SIZE,
    channels: int | None = None,
) -> tuple[int, float]:
    """(peak bytes alive during a step, FLOPs of its forward + backward), the step
    after a first one (so Adam's moments and the last step's gradients are alive,
    as in every step of a run)."""
    step, model, tensors = cost_step(case, device, batch, size, channels)
    tracker = LiveBytes()
    tracker.track(*model.parameters(), *model.buffers(), *tensors)
    with tracker:
        step()
    tracker.peak = tracker.current
    counter = FlopCounterMode(display=False)
    with tracker, counter:
        step()
    return tracker.peak, float(counter.get_total_flops())


def cost_row(
    case: CostCase, device: str = "meta", downsamples: tuple[int, ...] = DOWNSAMPLES
) -> dict[str, Any]:
    """A row of the step-cost table (``medtx/train/step_cost.json``). For each
    ``downsample`` 1..4 (96x114x96 floor-divided; or those of ``downsamples``), the
    peak bytes of a step as ``fixed_bytes + batch * volume_bytes`` and the FLOPs a
    volume (forward + backward); at full size ``channel_bytes`` per input channel
    more (fine-tuning); the parameters.

    The line runs through the peaks at two batches (``COST_BATCHES``). The peak is
    convex in the batch (the larger of the activations' line and a flat optimizer
    step's, where the weights are large and the volumes small), so the line is at
    or above it between them, and exact where the activations dominate."""
    low, high = COST_BATCHES
    fixed, volume, flops = [], [], []
    peak = 0
    for ds in downsamples:
        size = tuple(n // ds for n in SIZE)
        peak_low, _ = step_cost_figures(case, device, low, size)
        peak_high, counted = step_cost_figures(case, device, high, size)
        per_volume = (peak_high - peak_low) / (high - low)
        fixed.append(round(peak_high - high * per_volume))
        volume.append(round(per_volume))
        flops.append(counted / high)
        peak = peak or peak_high
    _, model, _ = cost_step(case, "meta", 1)
    params = list(model.parameters())
    outputs, channels = TASK_DEFAULTS[case.task or "classification"]
    finetune = case.step == "finetune"
    channel_bytes = None
    if finetune:
        more, _ = step_cost_figures(case, device, high, channels=channels + 1)
        channel_bytes = round((more - peak) / high)
    return {
        "backbone": case.backbone,
        "preset": case.preset,
        "step": case.step,
        "task": case.task,
        "in_channels": channels if finetune else 1,
        "target_channels": outputs if case.task == "segmentation" else 0,
        "downsamples": list(downsamples),
        "parameters": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "fixed_bytes": fixed,
        "volume_bytes": volume,
        "channel_bytes": channel_bytes,
        "flops_per_volume": flops,
    }


def cost_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The step-cost table the workflow plans with (``medtx.train.resources``)."""
    return {
        "about": (
            "Tensor bytes of one training step (forward, backward, optimizer step;"
            " float32, the trainer's order), counted on the meta device by"
            " bench/train.py --sections flops --write-table. Lists are per downsample"
            " 1..4 of the reference size; a step's peak is fixed_bytes + batch *"
            " volume_bytes (+ channel_bytes per extra input channel, at full size)."
            " medtx.train.resources plans with it; docs/slurm.md explains."
        ),
        "reference": {
            "size": list(SIZE),
            "batches": list(COST_BATCHES),
            "dtype": "float32",
            "device": "meta",
            "torch": torch.__version__.split("+")[0],
        },
        "rows": rows,
    }


def cost_check(spec: str) -> int:
    """``--cost-check BACKBONE:PRESET:STEP:TASK:BATCH``: in a process of its own, two
    steps of a case at 96x114x96 on the CPU, computed, with ``LiveBytes`` (what
    ``step_cost_figures`` counts on the meta device), and the process's resident
    memory before the model is built and at its peak; one ``BENCH {json}`` line."""
    backbone, preset, step_name, task, batch = spec.split(":")
    case = CostCase(backbone, preset, step_name, task or None)
    statm = Path("/proc/self/statm")
    before = int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.exists() else 0
    t0 = time.perf_counter()
    peak, _ = step_cost_figures(case, "cpu", int(batch))
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    record = {"tracked": peak, "rss_before": before, "rss_peak": rss, "seconds": seconds}
    print("BENCH " + json.dumps(record), flush=True)
    return 0


def cost_check_run(case: CostCase, batch: int, threads: int) -> dict[str, Any] | str:
    """``cost_check`` in a fresh process (its resident peak is the step's alone)."""
    spec = f"{case.backbone}:{case.preset}:{case.step}:{case.task or ''}:{batch}"
    command = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads)]
    try:
        proc = subprocess.run(
            [*command, "--cost-check", spec], capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {RUN_TIMEOUT} s"
    record = bench_record(proc.stdout)
    if proc.returncode or record is None:
        return f"exit {proc.returncode}, {failure(proc.stderr or proc.stdout)}"
    return record


# ------------------------------------------------------------------------- sections


def step_section(steps: int, threads: int) -> None:
    print(
        f"# training step vs loader ({os.cpu_count()} cores, {threads} torch threads,"
        f" torch {torch.__version__})"
    )
    print(f"{'input':>12} {'device':>7} {'step s/vol':>11} {'load s/vol':>11} {'step/load':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        items = cache_volumes(Path(tmp), 20)
        for downsample in (1, 2):
            shape = "x".join(str(s // downsample) for s in SIZE)
            load = load_seconds(items, downsample)
            runs = [("cpu", False)] + ([("cuda", True)] if torch.cuda.is_available() else [])
            for device, amp in runs:
                head = f"{shape:>12} {device + ('+amp' if amp else ''):>7}"
                try:
                    step = step_figures(device, downsample, steps, amp, 1, DETERMINISTIC)[0]
                except Exception as err:  # a CUDA row that fails must not end the run
                    print(f"{head} failed: {failure(err)}")
                    continue
                print(f"{head} {step:>11.3f} {load:>11.4f} {step / load:>9.0f}x")
                record("step", input=shape, device=device, amp=amp, step_s=step, load_s=load)


def loader_section(args: argparse.Namespace, steps: int, cuda_steps: int) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    timed = args.epochs - 1
    print(
        f"\n# loader vs step at 96x114x96 ({os.cpu_count()} cores): {LOADER_VOLUMES} float16"
        f" volumes in a temporary cache, batches of {args.batch} "
        + ("moved to cuda and prepared" if cuda else "delivered to the training process")
        + f", {timed} timed epoch(s) after a warm-up"
        + (
            f"; {max(LOADER_WORKERS)} workers oversubscribe the cores"
            if max(LOADER_WORKERS) > (os.cpu_count() or 1)
            else ""
        )
    )
    rates: list[tuple[str, int, float]] = []  # (step, batch, volumes/s)
    cpu_step = step_figures("cpu", 1, steps, False, 1, DETERMINISTIC)[0]
    rates.append(("cpu fp32", 1, 1 / cpu_step))
    failed = []
    for precision in ("fp32", "bf16") if cuda else ():
        try:
            seconds = step_figures(
                "cuda", 1, cuda_steps, precision == "bf16", args.batch, DETERMINISTIC
            )[0]
            rates.append((f"cuda {precision}", args.batch, args.batch / seconds))
        except Exception as err:  # a row that fails on a lent GPU must not end the run
            failed.append(f"cuda {precision} step failed: {failure(err)}")
    print(f"{'step rate':>28} {'batch':>6} {'vol/s':>9}")
    for name, batch, rate in rates:
        record("loader", step=name, batch=batch, volumes_per_s=rate)
    for name, batch, rate in rates:
        threads = f" ({args.threads} thread{'s' if args.threads > 1 else ''})"
        label = name + (threads if name.startswith("cpu") else "")
        print(f"{label:>28} {batch:>6} {rate:>9.2f}")
    for line in failed:
        print(f"{'':>28} {line}")
    print()
    print(f"{'loader':>28} {'vol/s':>9}" + "".join(f" {'/' + r[0]:>11}" for r in rates))
    with tempfile.TemporaryDirectory() as tmp:
        items = cache_volumes(Path(tmp), LOADER_VOLUMES)
        old = 1 / load_seconds(items, 1)  # the former path, for comparison
        print(f"{'float32 items, in process':>28} {old:>9.1f}" + ratios(old, rates))
        record("loader", loader="float32 items, in process", workers=0, volumes_per_s=old)
        for workers in LOADER_WORKERS:
            rate = loader_rate(items, workers, args.batch, args.epochs, device)
            print(f"{f'float16 batches, {workers} workers':>28} {rate:>9.1f}" + ratios(rate, rates))
            record("loader", loader="float16 batches", workers=workers, volumes_per_s=rate)
    print("target: >= 200 vol/s with 2 workers (about one H100's step rate)")


def ratios(rate: float, rates: list[tuple[str, int, float]]) -> str:
    return "".join(f" {rate / r[2]:>10.1f}x" for r in rates)


class _PumitClassifier(torch.nn.Module):
    """PUMIT's ViT with a linear head on the class token (three classes)."""

    def __init__(self, size: str):
        super().__init__()
        self.vit = UniversalViT(VIT_SIZES[size])
        self.head = torch.nn.Linear(VIT_SIZES[size].dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(x, Grid(0))[0][:, 0])


def backbone_step(model: torch.nn.Module, device: str, steps: int) -> float:
    """Median seconds of a classification step at 96x114x96, batch 1."""
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.rand(1, 1, *SIZE, device=device), torch.tensor([1], device=device)
    times = []
    for i in range(steps + 1):  # the first warms up
        sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def backbones_section(steps: int) -> None:
    print("\n# backbones at 96x114x96, batch 1: a classification step and the parameters")
    print(f"{'backbone':>26} {'device':>7} {'parameters':>12} {'step s':>8}")
    models = {
        "Medical Transformer table3": lambda: build_model("table3", "classification"),
        "PUMIT tiny": lambda: _PumitClassifier("tiny"),
        "PUMIT base": lambda: _PumitClassifier("base"),
    }
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name, make in models.items():
            torch.manual_seed(0)
            model = make()
            n = sum(p.numel() for p in model.parameters())
            try:
                seconds = backbone_step(model, device, steps)
            except Exception as err:  # a CUDA row that fails must not end the run
                print(f"{name:>26} {device:>7} {n:>12,} failed: {failure(err)}")
                continue
            print(f"{name:>26} {device:>7} {n:>12,} {seconds:>8.3f}")
            record("backbones", backbone=name, device=device, parameters=n, step_s=seconds)


def remap_section(reps: int) -> None:
    torch.set_num_threads(1)
    print("\n# pretext Bézier remap, three planes of one 96x114x96 volume (1 CPU thread)")
    print(f"{'device':>7} {'volume':>22} {'numpy ms':>9} {'torch ms':>9} {'numpy/torch':>12}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for cached, what in ((True, "float16 cache (full)"), (False, "off the float16 grid")):
            try:
                old, new = remap_seconds(device, reps, cached)
            except Exception as err:  # a CUDA row that fails must not end the run
                print(f"{device:>7} {what:>22} failed: {failure(err)}")
                continue
            print(f"{device:>7} {what:>22} {1e3 * old:>9.1f} {1e3 * new:>9.2f} {old / new:>11.1f}x")
            record("remap", device=device, volume=what, numpy_s=old, torch_s=new)


def cuda_section(args: argparse.Namespace, cuda_steps: int) -> None:
    if not torch.cuda.is_available():
        print(
            "\n# CUDA: no GPU is present (torch.cuda.is_available() is False): the CUDA rows"
            " (fp32/bf16 steps, peak memory, runs-per-GPU packing, DDP scaling, the planned"
            " memory against the measured) were not run"
        )
        RESULTS["cuda"] = {"not_run": "no GPU: torch.cuda.is_available() is False"}
        return
    props = torch.cuda.get_device_properties(0)
    total, batch = props.total_memory, args.batch
    print(
        f"\n# CUDA: {torch.cuda.device_count()} x {props.name} ({total / GiB:.0f} GiB),"
        f" torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    print(f"(a) one run, batch {batch} at 96x114x96, median of {cuda_steps} steps after a warm-up")
    print(f"{'precision':>9} {'kernels':>13} {'step s':>8} {'vol/s':>8} {'peak GiB':>9}")
    bf16 = torch.cuda.is_bf16_supported()
    peaks: dict[tuple[str, bool], int] = {}
    for precision in ("fp32", "bf16"):
        for deterministic in (True, False):
            kernels = KERNELS[deterministic]
            head = f"{precision:>9} {kernels:>13}"
            if precision == "bf16" and not bf16:
                print(f"{head} bf16 not supported on this GPU")
                continue
            try:
                seconds, peak = step_figures(
                    "cuda", 1, cuda_steps, precision == "bf16", batch, deterministic
                )
            except Exception as err:  # a row that fails on a lent GPU must not end the run
                print(f"{head} failed: {failure(err)}")
                continue
            peaks[precision, deterministic] = peak
            print(f"{head} {seconds:>8.4f} {batch / seconds:>8.1f} {peak / GiB:>9.2f}")
            record(
                "cuda",
                part="a",
                precision=precision,
                kernels=kernels,
                batch=batch,
                step_s=seconds,
                volumes_per_s=batch / seconds,
                peak_bytes=peak,
            )
    print(
        f"kernels: deterministic as the trainer's deterministic: true, benchmark as false"
        f" (default {KERNELS[DETERMINISTIC]}); fp32 convolutions in TF32:"
        f" {torch.backends.cudnn.allow_tf32}"
    )
    gc.collect()
    torch.cuda.empty_cache()

    # (b) and (c) train as the trainer does by default, or as the first row of (a) that ran
    wanted = "bf16" if TRAIN_DEFAULTS["amp"] and bf16 else "fp32"
    choices = [
        (p, d) for p in dict.fromkeys((wanted, "fp32")) for d in (DETERMINISTIC, not DETERMINISTIC)
    ]
    precision, deterministic = next((c for c in choices if c in peaks), choices[0])
    kernels, used = KERNELS[deterministic], peaks.get((precision, deterministic))
    fallback = (
        "; the trainer's default failed in (a)" if (precision, deterministic) != choices[0] else ""
    )
    print(
        f"\n(b) runs per GPU: k processes on GPU 0, each training batch {batch} ({precision},"
        f" {kernels} kernels{fallback}) for {cuda_steps} steps after {WARMUP} warm-up steps,"
        " started together"
    )
    print(f"{'k':>3} {'step s/run':>11} {'vol/s/run':>10} {'vol/s all':>10} {'all/k=1':>8}")
    alone = None
    for k in PACKING:
        if used is not None and k * (used + CONTEXT) > 0.9 * total:
            print(
                f"{k:>3} skipped: {k} x ({used / GiB:.1f} GiB peak + 1 GiB a process)"
                f" > 90% of {total / GiB:.0f} GiB"
            )
            continue
        result = packing_run(k, batch, cuda_steps, precision, kernels)
        if isinstance(result, str):
            print(f"{k:>3} failed: {result}")
            continue
        per_run, rate = result
        record("cuda", part="b", runs=k, batch=batch, step_s_per_run=per_run, volumes_per_s=rate)
        alone = alone or rate
        print(
            f"{k:>3} {per_run:>11.4f} {batch / per_run:>10.1f} {rate:>10.1f} {rate / alone:>7.2f}x"
        )

    ddp_part(batch, cuda_steps, precision, kernels)
    cost_part(batch, 3 if cuda_steps <= 10 else 5, total)


def ddp_part(batch: int, cuda_steps: int, precision: str, kernels: str) -> None:
    """(c) of the cuda section: DDP over 1 and 2 GPUs, with 2 or more."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"\n(c) DDP scaling: {gpus} GPU visible, it needs 2: not run")
        return
    print(
        f"\n(c) DDP over GPUs (torchrun --standalone, NCCL), global batch {batch} sharded"
        f" over the ranks, {precision}, {kernels} kernels, {cuda_steps} steps after {WARMUP}"
        " warm-up steps"
    )
    print(f"{'GPUs':>4} {'batch/GPU':>10} {'vol/s':>8} {'vs 1 GPU':>9}")
    one = None
    for nproc in (1, 2):
        got = ddp_run(nproc, batch, cuda_steps, precision, kernels)
        share = len(range(batch)[::nproc])  # rank 0's Group.shard
        if isinstance(got, str):
            print(f"{nproc:>4} {share:>10} failed: {got}")
            continue
        one = one or (got if nproc == 1 else None)
        scaling = f"{got / one:>8.2f}x" if one else f"{'-':>9}"
        print(f"{nproc:>4} {share:>10} {got:>8.1f} {scaling}")
        record("cuda", part="c", gpus=nproc, batch=batch, volumes_per_s=got)


# (d) of the cuda section: each stage's step against what the workflow plans for it
COST_CUDA_CASES = (
    CostCase("medical_transformer", "table3", "finetune", "classification"),
    CostCase("medical_transformer", "table3", "finetune", "segmentation"),
    CostCase("medical_transformer", "table3", "exemplar", None),
    CostCase("medical_transformer", "table3", "masked", None),
    CostCase("pumit", "tiny", "finetune", "segmentation"),
    CostCase("pumit", "base", "finetune", "classification"),
    CostCase("pumit", "base", "finetune", "segmentation"),
    CostCase("pumit", "base", "tokenizer", None),
    CostCase("pumit", "base", "mim", None),
)


def cuda_cost_figures(case: CostCase, batch: int, amp: bool, steps: int) -> tuple[float, int]:
    """(median step seconds, peak bytes allocated) of ``cost_step`` on CUDA, the first
    step (Adam's moments, kernel choice) left out of both."""
    gc.collect()
    torch.cuda.empty_cache()
    try:
        step, _, _ = cost_step(case, "cuda", batch, amp=amp)
        step()
        sync("cuda")
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync("cuda")
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), torch.cuda.max_memory_allocated()
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def cost_part(batch: int, steps: int, total: int) -> None:
    """(d) of the cuda section: the planning figures (medtx/train/step_cost.json)
    against the GPU, stage by stage."""
    print(
        f"\n(d) the workflow's figures against the GPU: each stage's step (as the flops"
        f" section counts it) at batch {batch}, 96x114x96, {KERNELS[DETERMINISTIC]} kernels,"
        f" median of {steps} after one; TFLOP/s from the counted FLOPs, as a share of"
        f" {H100_BF16_FLOPS / 1e12:.0f} (the flops section assumes {UTILISATION:.0%});"
        " peak allocated against the counted fp32 step and the planned GPU memory"
    )
    print(
        f"{'case':>28} {'prec':>5} {'step s':>7} {'vol/s':>7} {'TFLOP/s':>8} {'share':>6}"
        f" {'peak MB':>8} {'counted':>8} {'planned':>8} {'plan/peak':>9}"
    )
    for case in COST_CUDA_CASES:
        stage = {"backbone": case.backbone, "preset": case.preset, "batch_size": batch}
        try:
            plan = resources.step_cost(stage, step=case.step, task=case.task)
        except Exception as err:  # a table without the row: say so, go on
            print(f"{case.label:>28} no plan: {failure(err)}")
            continue
        for precision in ("fp32", "bf16"):
            head = f"{case.label:>28} {precision:>5}"
            if plan.gpu_mem_mb() * MiB > GPU_USABLE * total:
                print(f"{head} skipped: plans {plan.gpu_mem_mb()} MB, over 90% of the GPU")
                continue
            try:
                seconds, peak = cuda_cost_figures(case, batch, precision == "bf16", steps)
            except Exception as err:  # a row that fails on a lent GPU must not end the run
                print(f"{head} failed: {failure(err)}")
                record("cuda", part="d", case=case.label, precision=precision, error=failure(err))
                continue
            tflops = plan.flops / seconds / 1e12
            planned = plan.gpu_mem_mb()
            print(
                f"{head} {seconds:>7.3f} {batch / seconds:>7.1f} {tflops:>8.1f}"
                f" {tflops * 1e12 / H100_BF16_FLOPS:>6.1%} {peak / MiB:>8.0f}"
                f" {plan.step_bytes / MiB:>8.0f} {planned:>8} {planned * MiB / peak:>8.2f}x"
            )
            record(
                "cuda",
                part="d",
                case=case.label,
                precision=precision,
                batch=batch,
                step_s=seconds,
                volumes_per_s=batch / seconds,
                tflops=tflops,
                peak_bytes=peak,
                counted_bytes=plan.step_bytes,
                planned_gpu_mem_mb=planned,
            )


def same_rows(committed: list[dict[str, Any]], rows: list[dict[str, Any]]) -> bool:
    """Whether the committed table's rows hold these (the lists at these rows'
    downsamples: a quick run measures the full size only)."""
    if len(committed) != len(rows):
        return False
    for old, new in zip(committed, rows):
        measured = old.get("downsamples") or []
        if not set(new["downsamples"]) <= set(measured):
            return False
        at = [measured.index(d) for d in new["downsamples"]]
        for key, value in new.items():
            have = old.get(key)
            if key != "downsamples" and isinstance(value, list) and isinstance(have, list):
                have = [have[i] for i in at]
            if key != "downsamples" and have != value:
                return False
    return True


def flops_section(args: argparse.Namespace) -> None:
    batch = TRAIN_DEFAULTS["batch_size"]
    rate = H100_BF16_FLOPS * UTILISATION
    print(
        f"\n# step cost at 96x114x96, batch {batch}: FLOPs of forward + backward a volume"
        " (FlopCounterMode: matmuls, convolutions, attention; elementwise ops not counted),"
        " the tensor memory of one step (float32, forward, backward and the optimizer step"
        " in the trainer's order, with the last step's gradients and Adam's moments;"
        " counted on the meta device: every tensor the step allocates, nothing computed,"
        " so PUMIT base at batch 10 costs no CPU time; allocator and kernel workspaces"
        " not counted) as a line through the peaks at batches"
        f" {' and '.join(map(str, COST_BATCHES))}: act MB a volume, fixed MB, and the"
        f" peak MB at batch {batch} on it; parameters (all / trained in that stage)"
    )
    print(
        f"H100 vol/s: {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s (H100 SXM bf16 dense; TF32"
        f" 495, fp32 67) at {UTILISATION:.0%} utilisation; GPU MB and runs per 80 GB: as"
        f" the workflow plans them (medtx.train.resources, fp32 x {resources.GPU_MARGIN}"
        f" + {resources.CUDA_CONTEXT_MB} MB CUDA context); host MB: a CPU run's"
    )
    header = (
        f"{'case':>28} {'params':>11} {'trained':>11} {'GFLOP/vol':>10} {'act MB/vol':>11}"
        f" {'fixed MB':>9} {'peak MB':>9} {'H100 vol/s':>11} {'GPU MB':>8} {'runs/80GB':>9}"
        f" {'host MB':>8}"
    )
    print(header)
    rows = []
    t0 = time.perf_counter()
    downsamples = DOWNSAMPLES[:1] if args.quick else DOWNSAMPLES  # quick: full size only
    for case in cost_cases():
        row = cost_row(case, downsamples=downsamples)
        rows.append(row)
        table = cost_table([row])
        stage = {"backbone": case.backbone, "preset": case.preset, "batch_size": batch}
        plan = resources.step_cost(stage, step=case.step, task=case.task, table=table)
        flops = row["flops_per_volume"][0]
        figures = {
            "case": case.label,
            **row,
            "h100_volumes_per_s": rate / flops,
            "gpu_mem_mb": plan.gpu_mem_mb(),
            "runs_per_80gb": plan.runs_per_gpu(),
            "host_mb_cpu": plan.host_mb(gpu=False),
        }
        RESULTS.setdefault("flops", {}).setdefault("rows", []).append(figures)
        print(
            f"{case.label:>28} {row['parameters']:>11,} {row['trainable']:>11,}"
            f" {flops / 1e9:>10.1f} {row['volume_bytes'][0] / MiB:>11.1f}"
            f" {row['fixed_bytes'][0] / MiB:>9.1f} {plan.step_bytes / MiB:>9.0f}"
            f" {rate / flops:>11.0f} {figures['gpu_mem_mb']:>8} {figures['runs_per_80gb']:>9}"
            f" {figures['host_mb_cpu']:>8}"
        )
    print(f"({len(rows)} rows in {time.perf_counter() - t0:.0f} s)")
    RESULTS["flops"].update(
        reference=cost_table([])["reference"],
        h100_peak_flops=H100_BF16_FLOPS,
        utilisation=UTILISATION,
        batch=batch,
    )

    committed = json.loads(COST_TABLE.read_text()) if COST_TABLE.exists() else None
    if args.write_table:
        COST_TABLE.write_text(json.dumps(cost_table(rows), indent=1) + "\n")
        print(f"wrote {COST_TABLE.relative_to(COST_TABLE.parents[2])}")
    elif committed is None or not same_rows(committed["rows"], rows):
        print(
            f"{COST_TABLE.name} differs from these rows (or is missing): the workflow plans"
            " with the committed one; --write-table rewrites it"
        )
    else:
        what = "at full size " if args.quick else ""
        print(f"{COST_TABLE.name} (what the workflow plans with) matches these rows {what}")

    checks = [
        (CostCase("medical_transformer", "table3", "finetune", "classification"), 2),
        (CostCase("pumit", "tiny", "finetune", "segmentation"), 2),
        (CostCase("pumit", "base", "finetune", "classification"), 2),
    ][: 1 if args.quick else None]
    print(
        f"\ncheck: the same step computed on the CPU ({args.threads} thread(s), a fresh"
        " process each, 96x114x96): tensors counted there against the meta count, and the"
        " process's resident peak against the host memory a CPU run of it plans"
    )
    print(
        f"{'case':>28} {'batch':>5} {'meta MB':>8} {'cpu MB':>8} {'cpu/meta':>8}"
        f" {'RSS MB':>7} {'planned':>8} {'2 steps s':>9}"
    )
    for case, b in checks:
        meta, _ = step_cost_figures(case, "meta", b)
        got = cost_check_run(case, b, args.threads)
        head = f"{case.label:>28} {b:>5} {meta / MiB:>8.0f}"
        if isinstance(got, str):
            print(f"{head} failed: {got}")
            continue
        table = cost_table([r for r in rows if r["step"] == case.step and r["task"] == case.task])
        stage = {"backbone": case.backbone, "preset": case.preset, "batch_size": b}
        planned = resources.step_cost(stage, step=case.step, task=case.task, table=table)
        host = planned.host_mb(gpu=False)
        record(
            "flops_check", case=case.label, batch=b, meta_bytes=meta, **got, planned_host_mb=host
        )
        print(
            f"{head} {got['tracked'] / MiB:>8.0f} {got['tracked'] / meta:>8.3f}"
            f" {got['rss_peak'] / MiB:>7.0f} {host:>8} {got['seconds']:>9.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, help="CPU steps timed a row (5; --quick 2)")
    parser.add_argument("--batch", type=int, default=TRAIN_DEFAULTS["batch_size"])
    parser.add_argument("--epochs", type=int, help="loader epochs, 1 warm-up (6; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, epochs, reps")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma list")
    parser.add_argument("--json", metavar="PATH", help="write every section's figures here")
    parser.add_argument(
        "--write-table",
        action="store_true",
        help=f"flops: rewrite medtx/train/{resources.STEP_COST_TABLE} from its rows",
    )
    hidden = argparse.SUPPRESS  # modes the cuda section starts in other processes
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help=hidden)
    kernels = list(KERNELS.values())
    parser.add_argument("--kernels", choices=kernels, default=KERNELS[DETERMINISTIC], help=hidden)
    parser.add_argument("--worker-steps", type=int, default=0, help=hidden)
    parser.add_argument("--worker-dir", help=hidden)
    parser.add_argument("--worker-index", type=int, default=0, help=hidden)
    parser.add_argument("--ddp-steps", type=int, default=0, help=hidden)
    parser.add_argument("--cost-check", help=hidden)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker_steps:
        return packing_worker(args)
    if args.ddp_steps:
        return ddp_worker(args)
    if args.cost_check:
        return cost_check(args.cost_check)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    steps = args.steps or (2 if args.quick else 5)
    args.epochs = args.epochs or (3 if args.quick else 6)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first is a warm-up)")
    cuda_steps = 10 if args.quick else 30
    if args.write_table and ("flops" not in sections or args.quick):
        parser.error("--write-table writes the flops section's rows: add it, without --quick")
    if torch.cuda.is_available():
        set_cuda_determinism(DETERMINISTIC)  # the trainer's default kernels
    if args.json:  # a run stopped by `timeout` still writes what it measured
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        import record  # noqa: F401  (its AT_START: the commit and machine at this start)
    runs: dict[str, Callable[[], None]] = {
        "step": lambda: step_section(steps, args.threads),
        "loader": lambda: loader_section(args, steps, cuda_steps),
        "backbones": lambda: backbones_section(2 if args.quick else 3),
        "remap": lambda: remap_section(3 if args.quick else 5),
        "flops": lambda: flops_section(args),
        "cuda": lambda: cuda_section(args, cuda_steps),
    }
    try:
        for name in SECTIONS:
            if name in sections:
                runs[name]()
                torch.set_num_threads(args.threads)  # remap runs on one thread
                write_results(args.json, sys.argv[1:])
    finally:
        write_results(args.json, sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
