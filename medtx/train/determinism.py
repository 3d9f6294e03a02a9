"""Which aten ops a training step runs, and which of them CUDA refuses in deterministic mode.

Training on CUDA calls ``torch.use_deterministic_algorithms(True)`` without
``warn_only`` (``loop.set_cuda_determinism``): an op that has only a
nondeterministic CUDA kernel then raises a RuntimeError, mid-run, on a GPU node.
``OpRecorder`` records the ops of a step on the CPU, so a test without a GPU can
check a model against ``CUDA_THROWS`` before it ever meets one.

The list is PyTorch's, from https://pytorch.org/docs/stable/generated/torch.use_deterministic_algorithms.html
as torch 2.13.0 ships it (the docstring of ``torch.use_deterministic_algorithms``),
under the aten names of the ops that raise (``alertNotDeterministic`` in ATen's CUDA
source), each name checked by recording the op on the CPU. Two ops raise in the
source but are not on the page: ``kthvalue`` and ``index_reduce``. The page says
NLLLoss raises on CUDA; the source alerts only in its (N, C, d1, ...) form,
``nll_loss2d_forward``: ``nll_loss_forward`` is listed as the page says. Left out:
``Tensor.resize_``, which raises only for quantized tensors (resizing plain tensors
is everywhere). Not listed because torch 2.13 makes them deterministic:
max_pool3d's backward, replication padding's backward, ``index_add``,
``index_copy``, ``scatter_add_``, ``index_put`` with accumulation, ``gather``'s and
``index_select``'s backward, ``repeat_interleave``'s backward.

A few entries raise only for some arguments (the wording says which: ``cumsum`` of
floats, ``bincount`` with weights, ``median`` with indices, ``scatter_reduce`` with
"prod", EmbeddingBag's backward in "max" mode, ``nll_loss2d`` with a reduction). The
recorder keeps names only, so such an op is reported whatever its arguments: a
report to read, not always a failure on CUDA.

The CPU record is what CUDA runs, name for name, with one exception: which kernel
``scaled_dot_product_attention`` picks is the device's choice. The CPU runs
``_scaled_dot_product_flash_attention_for_cpu``; CUDA runs flash attention (half
precision), memory-efficient attention (float32) or the math composite, and never
cuDNN attention in deterministic mode (``sdp_utils.cpp``: cuDNN's is not
deterministic, so it is not selected). None of them raises: in deterministic mode
without ``warn_only``, flash attention's backward runs its deterministic variant
and memory-efficient attention's backward keeps one key split
(``attention_backward.cu``); with ``warn_only=True`` both only warn and stay
nondeterministic. ``CPU_STANDS_FOR`` maps the CPU names to the CUDA ones, and
``cuda_determinism_problems`` checks those too. Python that branches on the device
(``pretext.curve_lookup``, ``pretext.masked_prediction_loss``) runs other ops on
CUDA than on the CPU: record its CUDA branch by calling it, as the tests do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# aten overload packet -> the documented operation; raises on CUDA under
# torch.use_deterministic_algorithms(True).
CUDA_THROWS: dict[str, str] = {
    "avg_pool3d_backward": "torch.nn.AvgPool3d when attempting to differentiate a CUDA tensor",
    "_adaptive_avg_pool2d_backward": (
        "torch.nn.AdaptiveAvgPool2d when attempting to differentiate a CUDA tensor"
    ),
    "_adaptive_avg_pool3d_backward": (
        "torch.nn.AdaptiveAvgPool3d when attempting to differentiate a CUDA tensor"
    ),
    "adaptive_max_pool2d_backward": (
        "torch.nn.AdaptiveMaxPool2d when attempting to differentiate a CUDA tensor"
    ),
    "fractional_max_pool2d_backward": (
        "torch.nn.FractionalMaxPool2d when attempting to differentiate a CUDA tensor"
    ),
    "fractional_max_pool3d_backward": (
        "torch.nn.FractionalMaxPool3d when attempting to differentiate a CUDA tensor"
    ),
    "max_unpool2d": "torch.nn.MaxUnpool1d, torch.nn.MaxUnpool2d",
    "max_unpool3d": "torch.nn.MaxUnpool3d",
    "upsample_linear1d_backward": (
        "torch.nn.functional.interpolate when attempting to differentiate a CUDA tensor "
        "and mode 'linear' is used"
    ),
    "upsample_bilinear2d_backward": (
        "torch.nn.functional.interpolate when attempting to differentiate a CUDA tensor "
        "and mode 'bilinear' is used"
    ),
    "upsample_bicubic2d_backward": (
        "torch.nn.functional.interpolate when attempting to differentiate a CUDA tensor "
        "and mode 'bicubic' is used"
    ),
    "upsample_trilinear3d_backward": (
        "torch.nn.functional.interpolate when attempting to differentiate a CUDA tensor "
        "and mode 'trilinear' is used"
    ),
    "_upsample_bilinear2d_aa_backward": (
        "torch.nn.functional.interpolate when attempting to differentiate a CUDA tensor "
        "and mode 'bilinear' is used (antialias=True)"
    ),
    "_upsample_bicubic2d_aa_backward": (
        "torch.nn.functional.interpolate when attempting to differentiate a CUDA tensor "
        "and mode 'bicubic' is used (antialias=True)"
    ),
    "reflection_pad1d_backward": (
        "torch.nn.ReflectionPad1d when attempting to differentiate a CUDA tensor"
    ),
    "reflection_pad2d_backward": (
        "torch.nn.ReflectionPad2d when attempting to differentiate a CUDA tensor"
    ),
    "reflection_pad3d_backward": (
        "torch.nn.ReflectionPad3d when attempting to differentiate a CUDA tensor"
    ),
    "nll_loss_forward": "torch.nn.NLLLoss when called on a CUDA tensor",
    "nll_loss2d_forward": (
        "torch.nn.NLLLoss when called on a CUDA tensor (with 'mean' or 'sum' reduction)"
    ),
    "_ctc_loss_backward": "torch.nn.CTCLoss when attempting to differentiate a CUDA tensor",
    "_embedding_bag_backward": (
        "torch.nn.EmbeddingBag when attempting to differentiate a CUDA tensor when mode='max'"
    ),
    "put_": "torch.Tensor.put_ (accumulate=False; accumulate=True on a CUDA tensor)",
    "put": "torch.Tensor.put_ (accumulate=False; accumulate=True on a CUDA tensor)",
    "histc": "torch.histc when called on a CUDA tensor",
    "bincount": "torch.bincount when called on a CUDA tensor and weights tensor is given",
    "median": "torch.median with indices output when called on a CUDA tensor",
    "kthvalue": "torch.kthvalue when called on a CUDA tensor (ATen source, not on the page)",
    "grid_sampler_2d_backward": (
        "torch.nn.functional.grid_sample when attempting to differentiate a CUDA tensor"
    ),
    "grid_sampler_3d_backward": (
        "torch.nn.functional.grid_sample when attempting to differentiate a CUDA tensor"
    ),
    "cumsum": "torch.cumsum when called on a CUDA tensor when dtype is floating point or complex",
    "scatter_reduce": "torch.Tensor.scatter_reduce when reduce='prod' and called on CUDA tensor",
    "index_reduce": "torch.Tensor.index_reduce when called on a CUDA tensor (ATen source)",
}

# CPU-only op -> the CUDA ops it stands for (the device picks one).
CPU_STANDS_FOR: dict[str, tuple[str, ...]] = {
    "_scaled_dot_product_flash_attention_for_cpu": (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
    ),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention_backward",
    ),
}


class OpRecorder(TorchDispatchMode):
    """Records the aten overload-packet name of every op dispatched while active,
    backward ops included (``ops``). Ops run as they would without it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def cuda_determinism_problems(ops: Iterable[str]) -> list[str]:
    """Sorted "op: documented operation" lines for the recorded ``ops`` (CPU names
    translated by ``CPU_STANDS_FOR``) that raise on CUDA in deterministic mode."""
    names = set(ops)
    for op in list(names):
        names.update(CPU_STANDS_FOR.get(op, ()))
    return sorted(f"{op}: {CUDA_THROWS[op]}" for op in names if op in CUDA_THROWS)


def record_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> set[str]:
    """The ops ``fn(*args, **kwargs)`` dispatches; call ``backward`` inside ``fn`` to
    record the backward pass too."""
    with OpRecorder() as recorder:
        fn(*args, **kwargs)
    return recorder.ops
