"""What a training job asks of the cluster, from the training config and the
measured cost of its step.

A training process needs ``threads`` CPUs for torch plus one per DataLoader worker,
and memory for the model, its batches and each worker's prefetched batches. A job
of ``gpus`` processes (torchrun, one per GPU) needs that ``gpus`` times, in ONE
SLURM task: the SLURM executor plugin gives a GPU job one task per GPU unless told
otherwise (``tasks_per_gpu: 0``), and every task would start the script again.

Memory comes from ``step_cost.json`` beside this module, written by
``bench/train.py --sections flops --write-table``: per backbone, preset, stage and
task, the tensor bytes of one training step (forward, backward, optimizer step, in
the trainer's order, float32) at 96x114x96 and each ``downsample`` of it, counted
on the meta device, as ``fixed_bytes + batch * volume_bytes``. ``step_cost`` takes
the run's input size (``downsample``) and scales by its batch (per process) and
input channels at plan time; nothing here builds a model or imports torch.
``docs/slurm.md`` ("What a run asks for, and why") explains the figures.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources as package_files
from typing import Any

from medtx.errors import ConfigError
from medtx.train.config import TRAIN_DEFAULTS, defaults

# A worker process: torch imported (~400 MB) plus prefetch_factor batches of
# float16 volumes; a BraTS volume (4 x 240 x 240 x 155) is 71 MB, a T1 one 2 MB.
WORKER_MB = 1000
MB = 2**20  # Snakemake's mem_mb becomes sbatch --mem in SLURM's MB (MiB)
STEP_COST_TABLE = "step_cost.json"  # beside this module; bench/train.py --write-table
# A training process besides its step's tensors: Python with torch and medtx
# imported and the loader's batch in hand; with CUDA initialised its libraries
# (cuBLAS, cuDNN) take about 2 GB more of host memory.
PROCESS_MB = 1000
CUDA_PROCESS_MB = 3000
# GPU memory a process takes besides its tensors: the CUDA context, cuBLAS/cuDNN
# workspaces (bench/train.py's CONTEXT, which skips packing rows that would not fit).
CUDA_CONTEXT_MB = 1024
# Counted tensors -> memory. On a GPU: the caching allocator's rounding and free
# blocks, cuDNN's workspaces (attention: the meta device counts the math path,
# flash/memory-efficient attention keep less); bench/train.py's cuda section (d)
# measures it. On a CPU: oneDNN's buffers and the heap's free blocks; a process's
# resident growth was 1.20-1.39x the counted tensors (2 cores, batches 2-10, MT
# table3 and PUMIT tiny, bench/train.py --cost-check).
GPU_MARGIN = 1.25
HOST_MARGIN = 1.5
# Host copies of the weights a run makes besides its model: the best state
# (state_copy) and a checkpoint being written (weights and Adam's two moments).
STATE_COPIES = 4
GPU_MB = 80 * 1024  # an 80 GB H100: runs_per_gpu's default
GPU_USABLE = 0.9  # of a GPU's memory, for packing (as bench/train.py's packing rows)
# The trainer prepares a stored batch on the device: the float16 cache at full
# size, its float32 copy (images: 2 + 4 bytes a voxel), and uint8 region masks
# made float32 (1 + 4), before downsampling them.
LOAD_IMAGE_BYTES = 6
LOAD_TARGET_BYTES = 5


@dataclass(frozen=True)
class StepCost:
    """One training process's step at a run's settings; bytes are float32 tensors."""

    backbone: str
    preset: str
    step: str
    task: str | None
    batch: int  # volumes a step in this process (the global batch over its gpus)
    size: tuple[int, ...]  # the model's input, reference size // downsample
    in_channels: int
    parameters: int
    param_bytes: int
    step_bytes: int  # every tensor alive at the step's peak: weights, gradients,
    # Adam's moments, the batch, activations
    flops: float  # forward + backward of this process's batch (matmul/conv/attention)

    def host_mb(self, gpu: bool) -> int:
        """Host memory of the process, its loader workers left out: on a GPU the
        process and the copies of its weights; on a CPU the step's tensors too."""
        copies = STATE_COPIES * self.param_bytes / MB
        if gpu:
            return math.ceil(CUDA_PROCESS_MB + copies)
        return math.ceil(PROCESS_MB + copies + HOST_MARGIN * self.step_bytes / MB)

    def gpu_mem_mb(self) -> int:
        """GPU memory of the process: the step's tensors with a margin, and CUDA's own."""
        return math.ceil(CUDA_CONTEXT_MB + GPU_MARGIN * self.step_bytes / MB)

    def runs_per_gpu(self, gpu_mb: int = GPU_MB) -> int:
        """How many such runs one GPU of ``gpu_mb`` holds side by side (memory only:
        they share its compute; bench/train.py's packing rows measure that)."""
        return int(GPU_USABLE * gpu_mb // self.gpu_mem_mb())


@functools.cache
def step_cost_table() -> dict[str, Any]:
    """The committed table (``STEP_COST_TABLE``), read once."""
    text = package_files.files("medtx.train").joinpath(STEP_COST_TABLE).read_text()
    table: dict[str, Any] = json.loads(text)
    return table


def cost_row(
    backbone: str,
    preset: str,
    step: str,
    task: str | None = None,
    table: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The table's row of a backbone, preset, stage (``step``) and fine-tuning task."""
    rows = (table or step_cost_table())["rows"]
    for row in rows:
        if (row["backbone"], row["preset"], row["step"], row["task"]) == (
            backbone,
            preset,
            step,
            task,
        ):
            return dict(row)
    presets = sorted({row["preset"] for row in rows if row["backbone"] == backbone})
    if preset not in presets:
        raise ConfigError(f"backbone {backbone} has no preset {preset!r}: one of {presets}")
    raise ConfigError(
        f"no step cost for backbone {backbone}, preset {preset}, stage {step}"
        + (f", task {task}" if task else "")
        + f" in medtx/train/{STEP_COST_TABLE}; rerun"
        " `python bench/train.py --sections flops --write-table`"
    )


def step_cost(
    stage: Mapping[str, Any],
    *,
    step: str,
    task: str | None = None,
    gpus: int = 1,
    in_channels: int | None = None,
    table: Mapping[str, Any] | None = None,
) -> StepCost:
    """The cost of one process's step for a stage config (``stage_config``: its
    ``backbone`` and the keys set; the rest are the backbone's defaults).

    ``step``: exemplar, masked (the Medical Transformer's pre-training), tokenizer,
    mim (PUMIT's) or finetune, with ``task``. The row's figures at the run's
    ``downsample`` (measured at each) give the step as ``fixed + batch * volume``,
    the batch being the global ``batch_size`` over ``gpus`` (rounded up); each
    input channel beyond the row's adds ``channel_bytes`` a volume, scaled by the
    voxels. The peak is the larger of that step and the batch being prepared at
    full size (``LOAD_*_BYTES``); several processes add DDP's gradient buckets (one
    more copy of the weights). ``table``: another table than the committed one.
    """
    table = table or step_cost_table()
    cfg = {**defaults(stage.get("backbone", "medical_transformer")), **stage}
    ds = int(cfg["downsample"])
    row = cost_row(
        cfg["backbone"], cfg["preset"], step, task if step == "finetune" else None, table
    )
    if ds not in row["downsamples"]:
        raise ConfigError(f"no step cost at downsample {ds}: measured at {row['downsamples']}")
    at = row["downsamples"].index(ds)
    reference = tuple(table["reference"]["size"])
    batch = -(-int(cfg["batch_size"]) // gpus)
    size = tuple(n // ds for n in reference)
    channels = row["in_channels"] if in_channels is None else int(in_channels)
    extra = channels - row["in_channels"]
    if extra and row["channel_bytes"] is None:
        raise ConfigError(
            f"the {step} stage's cost is measured for {row['in_channels']} input"
            f" channel(s) only, not {channels}"
        )
    fixed = row["fixed_bytes"][at]
    volume = row["volume_bytes"][at]
    volume += extra * (row["channel_bytes"] or 0) * math.prod(size) / math.prod(reference)
    load = math.prod(reference) * (
        LOAD_IMAGE_BYTES * channels + LOAD_TARGET_BYTES * row["target_channels"]
    )
    peak = max(fixed + batch * volume, fixed + batch * load)
    if gpus > 1:
        peak += row["param_bytes"]
    return StepCost(
        backbone=cfg["backbone"],
        preset=cfg["preset"],
        step=step,
        task=row["task"],
        batch=batch,
        size=size,
        in_channels=channels,
        parameters=row["parameters"],
        param_bytes=row["param_bytes"],
        step_bytes=math.ceil(peak),
        flops=row["flops_per_volume"][at] * batch,
    )


def process_cpus(stage: Mapping[str, Any]) -> int:
    """CPUs of one training process: torch threads plus its loader workers."""
    cfg = {**TRAIN_DEFAULTS, **stage}
    return int(cfg["threads"]) + int(cfg["num_workers"])


def training_threads(stage: Mapping[str, Any], gpus: int) -> int:
    """The rule's ``threads:``: every process's CPUs (Snakemake's local scheduling,
    and ``--cpus-per-task`` on a CPU cluster)."""
    return gpus * process_cpus(stage)


def training_resources(
    stage: Mapping[str, Any],
    *,
    gpu: bool,
    gpus: int,
    runtime: int,
    step: str | None = None,
    task: str | None = None,
    mem_mb: int | None = None,
) -> dict[str, Any]:
    """The rule's ``resources:`` for a stage config (``stage_config``).

    Memory of one process comes from its ``step_cost`` (``step``, and ``task`` when
    fine-tuning): on a CPU the host holds the step; on a GPU (``gpu``) the host
    holds the process and ``gpu_mem_mb`` is what each GPU must hold. An explicit
    ``mem_mb`` (one process without workers) replaces the host figure and asks for
    no GPU memory. The job asks for that plus ``WORKER_MB`` per worker, for each of
    its ``gpus`` processes.
    """
    workers = int({**TRAIN_DEFAULTS, **stage}["num_workers"])
    cost = None
    if mem_mb is None:
        if step is None:
            raise ConfigError("training_resources needs the stage's step or an explicit mem_mb")
        cost = step_cost(stage, step=step, task=task, gpus=gpus)
        mem_mb = cost.host_mb(gpu)
    res: dict[str, Any] = {"mem_mb": gpus * (mem_mb + workers * WORKER_MB), "runtime": runtime}
    if gpu:
        res.update(gpu=gpus, cpus_per_gpu=process_cpus(stage), tasks_per_gpu=0)
        if cost is not None:
            res["gpu_mem_mb"] = cost.gpu_mem_mb()
    return res


def launcher(gpus: int) -> str:
    """The command that starts a training stage: ``python`` for one process, torchrun
    for ``gpus`` > 1 (one process per GPU, all in this job: ``--standalone``)."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ConfigError(f"train/gpus must be an integer >= 1, not {gpus!r}")
    if gpus == 1:
        return "python"
    return f"torchrun --standalone --nproc-per-node {gpus}"
