#!/usr/bin/env python
"""Training throughput: the step, the loader that feeds it, and a GPU's share of runs.

Sections (``--sections``, a comma list; default all four, in this order):

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
        ``Group.shard``: volumes/s from rank 0 and the scaling ratio.

On a GPU machine the process runs with the trainer's default CUDA kernels
(deterministic). Run it with the threads the training rules use;
OMP_WAIT_POLICY=PASSIVE is set as the rules set it. ``--quick`` times fewer steps,
epochs and repetitions (every section on 2 CPU cores in under a minute). Figures
are printed, never asserted.

    .venv/bin/python bench/train.py [--threads 1] [--steps 5] [--batch 10] [--epochs 6]
        [--quick] [--sections step,backbones,loader,remap,cuda]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from medtx.models.pretext import curve_lookup, draw_intensity_curve  # noqa: E402
from medtx.models.pumit.sac import Grid  # noqa: E402
from medtx.models.pumit.vit import VIT_SIZES, UniversalViT  # noqa: E402
from medtx.models.slice_transformer import build_model  # noqa: E402
from medtx.train.config import TRAIN_DEFAULTS  # noqa: E402
from medtx.train.data import VolumeSet, collate  # noqa: E402
from medtx.train.distributed import Group  # noqa: E402
from medtx.train.loop import set_cuda_determinism, to_device  # noqa: E402

SECTIONS = ("step", "backbones", "loader", "remap", "cuda")
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
        for workers in LOADER_WORKERS:
            rate = loader_rate(items, workers, args.batch, args.epochs, device)
            print(f"{f'float16 batches, {workers} workers':>28} {rate:>9.1f}" + ratios(rate, rates))
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


def cuda_section(args: argparse.Namespace, cuda_steps: int) -> None:
    if not torch.cuda.is_available():
        print(
            "\n# CUDA: no GPU is present (torch.cuda.is_available() is False): the CUDA rows"
            " (fp32/bf16 steps, peak memory, runs-per-GPU packing, DDP scaling) were not run"
        )
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
        alone = alone or rate
        print(
            f"{k:>3} {per_run:>11.4f} {batch / per_run:>10.1f} {rate:>10.1f} {rate / alone:>7.2f}x"
        )

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


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, help="CPU steps timed a row (5; --quick 2)")
    parser.add_argument("--batch", type=int, default=TRAIN_DEFAULTS["batch_size"])
    parser.add_argument("--epochs", type=int, help="loader epochs, 1 warm-up (6; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, epochs, reps")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma list")
    hidden = argparse.SUPPRESS  # modes the cuda section starts in other processes
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help=hidden)
    kernels = list(KERNELS.values())
    parser.add_argument("--kernels", choices=kernels, default=KERNELS[DETERMINISTIC], help=hidden)
    parser.add_argument("--worker-steps", type=int, default=0, help=hidden)
    parser.add_argument("--worker-dir", help=hidden)
    parser.add_argument("--worker-index", type=int, default=0, help=hidden)
    parser.add_argument("--ddp-steps", type=int, default=0, help=hidden)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker_steps:
        return packing_worker(args)
    if args.ddp_steps:
        return ddp_worker(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    steps = args.steps or (2 if args.quick else 5)
    args.epochs = args.epochs or (3 if args.quick else 6)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first is a warm-up)")
    cuda_steps = 10 if args.quick else 30
    if torch.cuda.is_available():
        set_cuda_determinism(DETERMINISTIC)  # the trainer's default kernels
    if "step" in sections:
        step_section(steps, args.threads)
    if "loader" in sections:
        loader_section(args, steps, cuda_steps)
    if "backbones" in sections:
        backbones_section(2 if args.quick else 3)
    if "remap" in sections:
        remap_section(3 if args.quick else 5)
        torch.set_num_threads(args.threads)
    if "cuda" in sections:
        cuda_section(args, cuda_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
