#!/usr/bin/env python
"""Training throughput: a fine-tuning step vs loading its volume, side by side.

At 96x114x96 (the paper's input) and, for the demo, 48x57x48, measures per
volume: forward+backward+optimizer step of the classification model (CPU, the
given threads; and CUDA with AMP when a GPU is present), and the loader
(``medtx.train.data.VolumeSet`` reading a memory-mapped float16 .npy cache). The
loader must be >= 10x faster than the step. Run it with the same threads the
training rules use; OMP_WAIT_POLICY=PASSIVE is set as the rules set it.

    .venv/bin/python bench/train.py [--threads 1] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medtx.models.slice_transformer import build_model  # noqa: E402
from medtx.train.data import VolumeSet  # noqa: E402


def step_seconds(device: str, downsample: int, steps: int, amp: bool) -> float:
    model = build_model("table3", "classification").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    shape = tuple(s // downsample for s in (96, 114, 96))
    x = torch.rand(1, 1, *shape, device=device)
    y = torch.tensor([1], device=device)
    times = []
    for i in range(steps + 1):  # the first step warms up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def load_seconds(downsample: int, n: int = 20) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(n):
            path = Path(tmp) / f"v{i}.npy"
            np.save(
                path,
                np.random.default_rng(i)
                .random((1, 96, 114, 96), dtype=np.float32)
                .astype(np.float16),
            )
            items.append({"scan": f"v{i}", "image": str(path), "label": "1"})
        data = VolumeSet(items, task="classification", downsample=downsample)
        t0 = time.perf_counter()
        for i in range(n):
            data[i]["image"].sum()
        return (time.perf_counter() - t0) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# training step vs loader ({os.cpu_count()} cores, {args.threads} torch threads,"
        f" torch {torch.__version__})"
    )
    print(f"{'input':>12} {'device':>7} {'step s/vol':>11} {'load s/vol':>11} {'step/load':>10}")
    for downsample in (1, 2):
        shape = "x".join(str(s // downsample) for s in (96, 114, 96))
        load = load_seconds(downsample)
        runs = [("cpu", False)] + ([("cuda", True)] if torch.cuda.is_available() else [])
        for device, amp in runs:
            step = step_seconds(device, downsample, args.steps, amp)
            print(
                f"{shape:>12} {device + ('+amp' if amp else ''):>7} {step:>11.3f} {load:>11.4f}"
                f" {step / load:>9.0f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
