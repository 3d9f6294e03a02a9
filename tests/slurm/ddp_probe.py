"""One process of a torchrun job (tests/slurm/probe.smk, rule ddp): join the group
as training does (medtx.train.distributed.Group), sum the ranks, say who it is."""

import os

import torch

from medtx.train.distributed import Group

group = Group.from_env()
total = group.sum(torch.tensor([float(group.rank)]))
line = f"rank {group.rank}/{group.world} sum {int(total.item())} pid {os.getpid()}\n"
os.write(1, line.encode())  # one write: the ranks share the job's log
group.close()
