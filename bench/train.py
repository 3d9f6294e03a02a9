#!/usr/bin/env python
"""Training throughput: a fine-tuning step vs loading its volume, side by side.

At 96x114x96 (the paper's input) and, for the demo, 48x57x48, measures per
volume: forward+backward+optimizer step of the classification model (CPU, the
given threads; and CUDA with AMP when a GPU is present), and the loader
(``medtx.train.data.VolumeSet`` reading a memory-mapped float16 .npy cache). The
loader must be >= 10x faster than the step. Run it with the same threads the
training rules use; OMP_WAIT_POLICY=PASSIVE is set as the rules set it.

Then the pre-training remap: the three Bézier intensity remaps of one 96x114x96
volume (``plane_positives``' work per volume), the former numpy path (np.interp on
the host, with the device round trip on CUDA) against ``curve_lookup``, on one CPU
thread and on CUDA when present.

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

from medtx.models.pretext import curve_lookup, draw_intensity_curve  # noqa: E402
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


def remap_seconds(device: str, reps: int = 5) -> tuple[float, float]:
    """Median seconds per volume for three fresh curves: (numpy path, torch path)."""
    rng = np.random.default_rng(0)
    volume = torch.rand(1, 1, 96, 114, 96, generator=torch.Generator().manual_seed(0))
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
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            path(xs, ys)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        medians.append(float(np.median(times)))
    return medians[0], medians[1]


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
    torch.set_num_threads(1)
    print("\n# pretext Bézier remap, three planes of one 96x114x96 volume (1 CPU thread)")
    print(f"{'device':>7} {'numpy ms':>9} {'torch ms':>9} {'numpy/torch':>12}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        old, new = remap_seconds(device)
        print(f"{device:>7} {1e3 * old:>9.1f} {1e3 * new:>9.2f} {old / new:>11.1f}x")
    torch.set_num_threads(args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
