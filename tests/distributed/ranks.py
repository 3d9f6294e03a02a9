"""One process of the torchrun job the DDP matrix test starts (``test_ddp_matrix``).

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/distributed/ranks.py ROOT STEPS

Joins the gloo group once, then trains every configuration of ``matrix.CONFIGS`` for
STEPS optimizer steps (``max_steps_this_run``: the run checkpoints and stops, as a
walltime kill would) into ROOT/<config>/ddp.pt, without dropout; rank 0 saves the
first step's gradients, as DDP averaged them, to ROOT/<config>/grads-2.pt.
"""

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed import matrix  # noqa: E402


def main(root: Path, steps: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with matrix.no_dropout():
        for cid in matrix.CONFIGS:
            folder = root / cid
            grads = folder / ("grads-2.pt" if rank == 0 else f"grads-2.rank{rank}.pt")
            with matrix.first_step_gradients(grads):
                matrix.run(cid, root, folder / "ddp.pt", max_steps=steps)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
