"""What a training job asks of the cluster, from the training config.

A training process needs ``threads`` CPUs for torch plus one per DataLoader worker,
and memory for the model, its batches and each worker's prefetched batches. A job
of ``gpus`` processes (torchrun, one per GPU) needs that ``gpus`` times, in ONE
SLURM task: the SLURM executor plugin gives a GPU job one task per GPU unless told
otherwise (``tasks_per_gpu: 0``), and every task would start the script again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medtx.errors import ConfigError
from medtx.train.config import TRAIN_DEFAULTS

# A worker process: torch imported (~400 MB) plus prefetch_factor batches of
# float16 volumes; a BraTS volume (4 x 240 x 240 x 155) is 71 MB, a T1 one 2 MB.
WORKER_MB = 1000


def process_cpus(stage: Mapping[str, Any]) -> int:
    """CPUs of one training process: torch threads plus its loader workers."""
    cfg = {**TRAIN_DEFAULTS, **stage}
    return int(cfg["threads"]) + int(cfg["num_workers"])


def training_threads(stage: Mapping[str, Any], gpus: int) -> int:
    """The rule's ``threads:``: every process's CPUs (Snakemake's local scheduling,
    and ``--cpus-per-task`` on a CPU cluster)."""
    return gpus * process_cpus(stage)


def training_resources(
    stage: Mapping[str, Any], *, gpu: bool, gpus: int, mem_mb: int, runtime: int
) -> dict[str, Any]:
    """The rule's ``resources:`` for a stage config (``stage_config``).

    ``mem_mb`` is one process without workers; the job asks for it plus
    ``WORKER_MB`` per worker, for each of its ``gpus`` processes.
    """
    workers = int({**TRAIN_DEFAULTS, **stage}["num_workers"])
    res: dict[str, Any] = {"mem_mb": gpus * (mem_mb + workers * WORKER_MB), "runtime": runtime}
    if gpu:
        res.update(gpu=gpus, cpus_per_gpu=process_cpus(stage), tasks_per_gpu=0)
    return res


def launcher(gpus: int) -> str:
    """The command that starts a training stage: ``python`` for one process, torchrun
    for ``gpus`` > 1 (one process per GPU, all in this job: ``--standalone``)."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ConfigError(f"train/gpus must be an integer >= 1, not {gpus!r}")
    if gpus == 1:
        return "python"
    return f"torchrun --standalone --nproc-per-node {gpus}"
