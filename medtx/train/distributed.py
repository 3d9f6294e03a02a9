"""Data-parallel training across processes: who this process is, and what it shares.

``torchrun --standalone --nproc-per-node N python -m medtx ...`` starts N copies of a
stage, each with RANK, LOCAL_RANK and WORLD_SIZE in its environment; ``Group.from_env``
joins them (NCCL between GPUs, gloo on CPUs). Every rank walks the same global
batches of the epoch's order and trains on its stride of each (``shard``), so the
data order, and with it resume, does not depend on the number of processes: a run
saved with N processes resumes with M. Rank 0 alone writes checkpoints and outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from medtx.errors import ConfigError


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank of world (1 process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True for the process that writes checkpoints, logs and outputs."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Group:
        """The group torchrun describes in the environment, joined; a single process
        without WORLD_SIZE (or with WORLD_SIZE=1) is rank 0 of 1 and joins nothing."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK are not integers: {err}") from err
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        return cls(rank=rank, world=world, local_rank=local)

    def device(self, asked: str | torch.device | None) -> str | torch.device | None:
        """This rank's GPU when the run is distributed over CUDA, else ``asked``."""
        if self.world > 1 and asked is None and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return asked

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's part of a global batch: every world-th index from its rank."""
        return indices[self.rank :: self.world]

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks (in place; no host sync on NCCL)."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, *flags: bool, device: torch.device) -> list[bool]:
        """Each flag or-ed over the ranks (a host sync: call it every few steps)."""
        if self.world == 1:
            return list(flags)
        values = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (e.g. the validation metric it computed)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, *, failed: bool = False) -> None:
        """Leave the group; after a clean run, wait for every rank first. A rank
        that failed leaves at once (its exception ends the process and torchrun
        stops the others) instead of waiting at a barrier they never reach."""
        if self.world > 1 and dist.is_initialized():
            if not failed:
                dist.barrier()
            dist.destroy_process_group()
