"""Data-parallel training across processes: who this process is, and what it shares.

``torchrun --standalone --nproc-per-node N python -m medtx ...`` starts N copies of a
stage, each with RANK, LOCAL_RANK and WORLD_SIZE in its environment; ``Group.from_env``
joins them (NCCL between GPUs, gloo on CPUs). Every rank walks the same global
batches of the epoch's order and trains on its stride of each (``shard``), so the
data order, and with it resume, does not depend on the number of processes: a run
saved with N processes resumes with M. Rank 0 alone writes checkpoints and outputs.

Losses that look across the batch (the exemplar stage's negatives, the tokenizer's
mean code distribution) see the whole global batch through ``gather_rows`` and
``all_sum``, whose gradients flow back to the rank that computed each row: N
processes then compute the gradients one process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
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
    owned: bool = False  # this Group joined the process group, so it leaves it

    @property
    def is_main(self) -> bool:
        """True for the process that writes checkpoints, logs and outputs."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Group:
        """The group torchrun describes in the environment, joined; a single process
        without WORLD_SIZE (or with WORLD_SIZE=1) is rank 0 of 1 and joins nothing.
        A process group the caller already started is used as it is, and left to it."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK are not integers: {err}") from err
        if world <= 1:
            return cls()
        if dist.is_initialized():
            return cls(rank=rank, world=world, local_rank=local)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
        return cls(rank=rank, world=world, local_rank=local, owned=True)

    def device(self, asked: str | torch.device | None) -> str | torch.device | None:
        """This rank's GPU when the run is distributed over CUDA, else ``asked``."""
        if self.world > 1 and asked is None and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return asked

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's part of a global batch: every world-th index from its rank."""
        return indices[self.rank :: self.world]

    def positions(self, volumes: int) -> list[int]:
        """Where this rank's part of a global batch of ``volumes`` sits in it."""
        return list(range(self.rank, volumes, self.world))

    def gather_rows(self, rows: Tensor, volumes: int) -> Tensor:
        """This rank's rows (one per volume of its part) -> the global batch's rows, in
        the global batch's order; differentiable: each row's gradient returns to the
        rank that computed it, summed over the ranks whose losses used it."""
        if self.world == 1:
            return rows
        return _GatherRows.apply(rows, self, volumes)

    def all_sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks; differentiable (the gradient of each
        rank's copy is the sum of the ranks' gradients of the result)."""
        if self.world == 1:
            return tensor
        return _AllSum.apply(tensor)

    def gather_parts(self, part: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Arrays computed on this rank's ``shard`` of range(n) -> the arrays over all
        n items in order, on every rank (validation: every rank computes the same
        metric from them)."""
        if self.world == 1:
            return part
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, part)
        order = [i for r in range(self.world) for i in range(r, n, self.world)]
        merged = {k: np.concatenate([p[k] for p in parts]) for k in part}
        where = np.empty(n, dtype=np.int64)
        where[order] = np.arange(n)
        return {k: v[where] for k, v in merged.items()}

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

    def close(self, *, failed: bool = False) -> None:
        """Leave the group; after a clean run, wait for every rank first. A rank
        that failed leaves at once (its exception ends the process and torchrun
        stops the others) instead of waiting at a barrier they never reach. A group
        the caller started stays up for the caller."""
        if self.world > 1 and dist.is_initialized():
            if not failed:
                dist.barrier()
            if self.owned:
                dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    """all_gather of per-volume rows into the global batch's order (``Group.shard``
    hands rank r the volumes r, r + world, ...); backward sums the ranks' gradients
    of the whole batch (one all_reduce) and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, rows: Tensor, group: Group, volumes: int) -> Tensor:
        longest = -(-volumes // group.world)
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: len(rows)] = rows.detach()
        parts = [torch.empty_like(padded) for _ in range(group.world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.group, ctx.volumes = group, volumes
        # row j of rank r is position j * world + r: interleave, drop the padding
        return torch.stack(parts, dim=1).flatten(0, 1)[:volumes]

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.group.positions(ctx.volumes)], None, None


class _AllSum(torch.autograd.Function):
    """all_reduce (sum) whose backward is the all_reduce (sum) of the gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad
