"""Self-supervised pre-training of the Medical Transformer (Jun et al. 2021).

Stage 1, exemplar network: each plane encoder learns that a volume and a non-linear
intensity remap of it (Models Genesis' Bézier transform, a separate curve per plane)
are the same brain, and another brain in the batch is not: L2 triplet loss on the
slice-averaged embeddings, margin 1.0, mean over planes. Each volume's curves are drawn
on the host from its own numpy generator (the training loop seeds one per volume, so a
volume gets the same curves in any number of processes); the lookup runs on the
volumes' device (``curve_lookup``), without copying them to the host. The negative of
a volume is the previous volume of the global batch (``gather``: under data
parallelism it is often on another process).

Stage 2, masked encoding-vector prediction: with the encoders frozen, int(0.1·N)
slices per plane (9/11/9 at 96/114/96) have their encoding replaced by a mask vector,
and the transformer predicts the true encodings there: MSE at the masked positions,
summed over planes. The mask vector is the encoder output of a constant slice
(default) or a learned token (``MaskToken``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtx.models.slice_transformer import (
    PLANES,
    MedicalTransformer,
    volume_to_slices,
)

# ---------------------------------------------------------------------------- stage 1

#: The CPU lookup splits [0, 1] into 2**15 equal buckets (``_table_lookup``): a power of
#: 2, so a float's bucket and its offset in it are exact. With ~1000 curve points at
#: most ~3% of the buckets hold one and need a search; more buckets cost more table
#: (built per curve, and read at random) than they save in searches.
_BUCKET_BITS = 15
#: Voxels per pass of the CPU lookup: its buffers stay in cache.
_CHUNK = 1 << 16


def bezier_curve(
    rng: np.random.Generator, *, n_points: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """A sampled cubic Bézier from (0, 0) to (1, 1) with control points P1, P2 ~ U[0,1]².

    Both coordinates are non-decreasing in t for any control points in the unit square,
    so the curve is the graph of an increasing map [0,1] -> [0,1]; returns (xs, ys).
    """
    p1, p2 = rng.random(2), rng.random(2)
    t = np.linspace(0.0, 1.0, n_points)[:, None]
    pts = 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3  # P0 = 0, P3 = 1
    # Guard np.interp against round-off making xs step back by an ulp.
    return np.maximum.accumulate(pts[:, 0]), np.maximum.accumulate(pts[:, 1])


def draw_intensity_curve(
    rng: np.random.Generator, *, flip_prob: float = 0.5, n_points: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """One remap curve (xs, ys): a Bézier curve, then the flip draw, in this order.

    Every caller draws through here, so the numpy and the torch paths consume the random
    stream alike: a run's numbers do not depend on which path remapped its volumes.
    """
    xs, ys = bezier_curve(rng, n_points=n_points)
    if rng.random() < flip_prob:
        ys = ys[::-1]
    return xs, ys


def _check_unit_range(low: float, high: float) -> None:
    """Raise unless [low, high] lies in [0, 1] (1e-6 slack for round-off)."""
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(
            f"bezier_intensity needs intensities in [0, 1], got [{low:.4g}, {high:.4g}]"
        )


def _unit_range_of(x: Tensor) -> None:
    """The range check of a tensor: one min/max reduction, one copy to the host."""
    if x.numel():
        values = x.detach() if x.is_floating_point() else x.detach().float()
        low, high = torch.stack(torch.aminmax(values)).tolist()
        _check_unit_range(low, high)


def bezier_intensity(
    x: np.ndarray | Tensor,
    rng: np.random.Generator,
    *,
    flip_prob: float = 0.5,
    n_points: int = 1000,
) -> np.ndarray | Tensor:
    """Models Genesis' non-linear intensity transform of a volume in [0, 1].

    Looks every intensity up on a random Bézier curve (``np.interp``); with probability
    ``flip_prob`` the curve is flipped into a decreasing map, as Models Genesis does by
    pairing ascending xs with descending ys. The output stays in [0, 1]. One call draws
    one curve: the caller draws a separate one per plane (``plane_positives``). A tensor
    is remapped on its own device (``curve_lookup``), without a copy to the host.

    Args:
        x: intensities in [0, 1] (numpy array or tensor; a tensor comes back as one).
        rng: the random generator that draws the curve and the flip.
        flip_prob: probability of a decreasing map.
        n_points: samples on the curve.
    """
    if isinstance(x, Tensor):
        _unit_range_of(x)
        xs, ys = draw_intensity_curve(rng, flip_prob=flip_prob, n_points=n_points)
        return curve_lookup(x[None], xs[None, None], ys[None, None])[0, 0]
    values = np.asarray(x)
    if values.size:
        _check_unit_range(values.min(), values.max())
    xs, ys = draw_intensity_curve(rng, flip_prob=flip_prob, n_points=n_points)
    return np.interp(values, xs, ys).astype(
        values.dtype if values.dtype.kind == "f" else np.float32
    )


def plane_positives(
    volumes: Tensor, rngs: np.random.Generator | Sequence[np.random.Generator]
) -> tuple[Tensor, ...]:
    """Per plane, every volume of the batch remapped with its own fresh Bézier curve.

    ``rngs``: one generator per volume (each draws its volume's curves, plane by plane,
    each a curve then its flip), or one generator for the whole batch (drawing plane
    by plane, volume by volume). One range check for the batch (a single reduction,
    one host sync); then one ``curve_lookup`` for the whole batch, on its device.
    """
    _unit_range_of(volumes)
    if isinstance(rngs, np.random.Generator):
        curves = [[draw_intensity_curve(rngs) for _ in range(volumes.shape[0])] for _ in PLANES]
    else:
        if len(rngs) != volumes.shape[0]:
            raise ValueError(f"{len(rngs)} generators for a batch of {volumes.shape[0]} volumes")
        per_volume = [[draw_intensity_curve(rng) for _ in PLANES] for rng in rngs]
        curves = [list(plane) for plane in zip(*per_volume)]
    xs = np.array([[curve[0] for curve in plane] for plane in curves])
    ys = np.array([[curve[1] for curve in plane] for plane in curves])
    return tuple(curve_lookup(volumes, xs, ys).unbind(0))


def curve_lookup(volumes: Tensor, xs: np.ndarray, ys: np.ndarray) -> Tensor:
    """``np.interp`` of each volume on each of its curves, on the volumes' own device.

    ``out[p, b] = np.interp(volumes[b], xs[p, b], ys[p, b])`` for volumes (B, ...) and
    curves xs, ys (P, B, n) with xs finite and non-decreasing along n; returns
    (P, B, ...) in the volumes' float dtype (float32 for others). np.interp's conventions
    hold: ys[0] left of xs[0], ys[-1] right of xs[-1], and at an x repeated in xs the last
    of its ys. The value is np.interp's float64 one to float64 round-off, rounded once to
    the output dtype: in practice bit for bit ``np.interp(...).astype(float32)``.
    No range check: callers check once per batch. On the CPU, a volume whose every
    voxel is a float16 value (one read from the float16 cache at full size) takes a
    table over the 65,536 float16 codes (``_half_lookup``), any other a bucket table
    (``_table_lookup``); elsewhere a binary search per voxel (``_search_lookup``).
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if xs.ndim != 3 or xs.shape != ys.shape or xs.shape[1] != volumes.shape[0] or not xs.size:
        raise ValueError(
            f"curves must be (P, B={volumes.shape[0]}, n >= 1) for volumes of shape "
            f"{tuple(volumes.shape)}, got xs {xs.shape} and ys {ys.shape}"
        )
    out_dtype = volumes.dtype if volumes.is_floating_point() else torch.float32
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    flat = volumes.detach().reshape(volumes.shape[0], -1).to(dtype)
    out = flat.new_empty(xs.shape[0], *flat.shape)
    if volumes.device.type == "cpu":
        for b in range(flat.shape[0]):
            codes = _half_codes(flat[b]) if dtype == torch.float32 else None
            if codes is not None:
                _half_lookup(codes, xs[:, b], ys[:, b], out[:, b])
            else:
                _table_lookup(flat[b], xs[:, b], ys[:, b], out[:, b])
    else:  # all the curves in one copy, which need not wait for the device
        host = torch.from_numpy(_segments(xs, ys))
        if volumes.device.type == "cuda":
            host = host.pin_memory()
        segments = host.to(volumes.device, non_blocking=True)
        for b in range(flat.shape[0]):
            out[:, b] = _search_lookup(flat[b], segments[:, b])
    return out.to(out_dtype).reshape(xs.shape[0], *volumes.shape)


def _search_lookup(x: Tensor, segments: Tensor) -> Tensor:
    """(P, N) float64: np.interp of x (N,) on each of P curves (``_segments``, (P, 4, n + 1)).

    One float64 binary search per voxel: slow on a CPU (~70 ns a voxel), cheap and free
    of host syncs on a GPU. float64, as where a curve is steep its points lie closer than
    a float32 ulp and the piece must still be the one np.interp picks.
    """
    x64 = x.to(torch.float64)
    return torch.stack(
        [_segment_value(s, torch.searchsorted(s[3, :-1], x64, right=True), x64) for s in segments]
    )


def _segments(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(..., 4, n + 1) for curves (..., n): start x, start y and slope of the piece
    np.interp uses for x when i = #{xs <= x} points lie at or left of x (the constant
    ys[0] for i = 0, the line from point i - 1 to point i, the constant ys[-1] for
    i = n), and xs itself (then one pad) to find i. numpy's own float64 formula,
    slope·(x - x0) + y0, then gives np.interp exactly (``_segment_value``).
    """
    n = xs.shape[-1]
    seg = np.empty((*xs.shape[:-1], 4, n + 1))
    seg[..., 0, 0], seg[..., 0, 1:] = xs[..., 0], xs
    seg[..., 1, 0], seg[..., 1, 1:] = ys[..., 0], ys
    with np.errstate(divide="ignore", invalid="ignore"):  # repeated xs: a piece never used
        seg[..., 2, 1:n] = np.diff(ys) / np.diff(xs)
    seg[..., 2, 0] = seg[..., 2, n] = 0.0
    seg[..., 3, :n], seg[..., 3, n] = xs, np.inf
    return seg


def _segment_value(seg: Tensor, i: Tensor, x: Tensor) -> Tensor:
    """np.interp at float64 x from its piece i (``_segments``).

    ±inf, only ever on the constant end pieces, is clamped to a finite x there so that
    0·(x - x0) stays 0; NaN stays NaN.
    """
    x0, y0, slope = (seg[r].index_select(0, i) for r in range(3))
    big = torch.finfo(torch.float64).max
    return torch.addcmul(y0, slope, x.clamp(-big, big) - x0)


@functools.cache
def _half_values() -> np.ndarray:
    """The value of every float16 code, in the order of the codes as int16 + 32768."""
    codes = np.arange(-(1 << 15), 1 << 15, dtype=np.int32).astype(np.int16)
    return codes.view(np.float16).astype(np.float64)


def _half_codes(x: Tensor) -> Tensor | None:
    """Each voxel's float16 code (int16 + 32768, as int32) when every voxel of the
    float32 volume x is a float16 value; None otherwise (or for NaN, never equal)."""
    half = x.to(torch.float16)
    if not torch.equal(half.to(x.dtype), x):
        return None
    return half.view(torch.int16).to(torch.int32).add_(1 << 15)


def _half_lookup(codes: Tensor, xs: np.ndarray, ys: np.ndarray, out: Tensor) -> None:
    """out[p] = np.interp(x, xs[p], ys[p]) for voxels given by their float16 codes.

    A volume read from the float16 cache holds at most 65,536 distinct values, so
    np.interp itself runs once on each of them and every voxel reads its value: the
    same float64 value rounded once, at one table read per voxel and curve.
    """
    values = _half_values()
    for p in range(xs.shape[0]):
        with np.errstate(invalid="ignore"):  # the NaN codes stay NaN
            table = np.interp(values, xs[p], ys[p]).astype(np.float32)
        torch.index_select(torch.from_numpy(table), 0, codes, out=out[p])


@functools.cache
def _bucket_edges() -> np.ndarray:
    """k / m for k = 0 .. m + 1, m = 2**_BUCKET_BITS: the bucket ends."""
    return np.arange((1 << _BUCKET_BITS) + 2) / (1 << _BUCKET_BITS)


def _table_lookup(x: Tensor, xs: np.ndarray, ys: np.ndarray, out: Tensor) -> None:
    """out[p] = np.interp(x, xs[p], ys[p]) for a CPU volume x (N,) and curves (P, n).

    A binary search per voxel costs as much as np.interp itself (~70 ns). Instead [0, 1]
    is cut into m = 2**15 buckets [k/m, (k+1)/m): x·m gives a voxel's bucket k and offset
    x·m - k exactly (m is a power of 2), and where no curve point lies in (k/m, (k+1)/m]
    the curve is one line there, so np.interp(x) = v[k] + (v[k+1] - v[k])·offset with v
    np.interp at the bucket ends: one table read per voxel and curve. The voxels of the
    other buckets (a curve point inside; x < 0, x >= 1 + 1/m, NaN) are searched, among
    the points of their bucket: ~3% of the voxels per random curve, more for curves
    steep near 0 or 1.

    The table and the arithmetic are float64, rounded once on output: float32 tables are
    ~1.4x faster but differ from np.interp by an ulp in a quarter of the voxels, and
    Adam turns that into different weights (~1e-3 apart after three steps): CPU runs
    would no longer repeat the numbers they gave with np.interp.
    """
    if not x.numel():
        return
    m = 1 << _BUCKET_BITS
    n_curves, n = xs.shape
    edges = _bucket_edges()
    # Row r is bucket r - 1 for r = 1..m+1 (the last one holds x in [1, 1 + 1/m)); rows
    # 0 and m + 2 hold x < 0 and x >= 1 + 1/m (and NaN), always searched.
    table = np.zeros((n_curves, m + 3), np.complex128)
    search = np.zeros((n_curves, m + 3), dtype=bool)
    search[:, [0, -1]] = True
    np.put_along_axis(search, np.clip(np.ceil(xs * m), 0, m + 2).astype(np.intp), True, 1)
    for p in range(n_curves):
        v = np.interp(edges, xs[p], ys[p])
        table[p, 1:-1].real, table[p, 1:-1].imag = v[:-1], np.diff(v)
    value = torch.from_numpy(table)

    # In chunks that stay in cache: each voxel is read once and its row found once for
    # all curves.
    any_search = torch.from_numpy(search.any(0))
    size = min(x.shape[0], _CHUNK)
    offset, rows_f = torch.empty(size, dtype=x.dtype), torch.empty(size, dtype=x.dtype)
    rows, pair = torch.empty(size, dtype=torch.int32), torch.empty(size, dtype=value.dtype)
    offset64, value64 = torch.empty((2, size), dtype=torch.float64)
    todo_parts, rows_parts = [], []
    for start in range(0, x.shape[0], size):
        stop = min(start + size, x.shape[0])
        length = stop - start
        off, fl, r, pr = offset[:length], rows_f[:length], rows[:length], pair[:length]
        torch.mul(x[start:stop], m, out=off)  # exact
        torch.floor(off, out=fl)
        off.sub_(fl)  # exact; x·m - k in [0, 1) for x >= 0
        r.copy_(fl.clamp_(-1, m + 1).nan_to_num_(m + 1).add_(1))
        off64, val64 = offset64[:length].copy_(off), value64[:length]  # off is exact
        for p in range(n_curves):
            torch.index_select(value[p], 0, r, out=pr)
            parts = torch.view_as_real(pr)
            torch.addcmul(parts[:, 0], parts[:, 1], off64, out=val64)
            out[p, start:stop].copy_(val64)  # the one rounding
        hits = any_search.index_select(0, r).nonzero().squeeze(1)
        if hits.numel():
            todo_parts.append(hits + start)
            rows_parts.append(r.index_select(0, hits))
    if not todo_parts:
        return
    todo, rows_todo = torch.cat(todo_parts), torch.cat(rows_parts)
    x_todo = x.index_select(0, todo).to(torch.float64)
    for p in range(n_curves):
        here = torch.from_numpy(search[p]).index_select(0, rows_todo).nonzero().squeeze(1)
        if not here.numel():
            continue
        xp, rp = x_todo.index_select(0, here), rows_todo.index_select(0, here)
        # Over bucket k the piece i runs from #{xs <= k/m} to #{xs < (k+1)/m}; the
        # out-of-range rows search them all.
        first, last = np.empty((2, m + 3), dtype=np.int64)  # read at searched rows only
        bucket_rows = np.flatnonzero(search[p])[1:-1]
        first[bucket_rows] = np.searchsorted(xs[p], edges[bucket_rows - 1], "right")
        last[bucket_rows] = np.searchsorted(xs[p], edges[bucket_rows], "left")
        first[[0, -1]], last[[0, -1]] = 0, n
        lo = torch.from_numpy(first).index_select(0, rp)
        hi = torch.from_numpy(last).index_select(0, rp)
        seg = torch.from_numpy(_segments(xs[p], ys[p]))
        for _ in range(int((hi - lo).max()).bit_length()):  # xs[lo - 1] <= x throughout
            mid = (lo + hi + 1) >> 1
            le = seg[0].index_select(0, mid) <= xp
            lo, hi = torch.where(le, mid, lo), torch.where(le, hi, mid - 1)
        value_here = _segment_value(seg, lo, xp).to(out.dtype)
        out[p].index_copy_(0, todo.index_select(0, here), value_here)


def batch_negatives(x: Tensor) -> Tensor:
    """The negative for batch item i is item i - 1 (another volume of the batch)."""
    if x.shape[0] < 2:
        raise ValueError(
            f"exemplar training needs at least 2 volumes per batch for negatives, got {x.shape[0]}"
        )
    return x.roll(1, dims=0)


def global_negatives(
    x: Tensor, gather: Callable[[Tensor], Tensor], positions: Sequence[int]
) -> Tensor:
    """``batch_negatives`` of the global batch for this process's rows ``x``:
    ``gather`` makes the global batch's rows (differentiable), ``positions`` are this
    process's rows in it."""
    everything = batch_negatives(gather(x))
    return everything[list(positions)]


def triplet_loss(
    anchor: Sequence[Tensor],
    positive: Sequence[Tensor],
    negative: Sequence[Tensor],
    margin: float = 1.0,
) -> Tensor:
    """L2 triplet loss on slice-averaged embeddings, mean over planes.

    Each argument holds per plane the slice embeddings (B, N_p, d); a single tensor
    counts as one plane. Per plane: mean over the batch of
    max(0, |a - p| - |a - n| + margin) with a, p, n averaged over slices.
    """
    planes = (
        [(anchor, positive, negative)]
        if isinstance(anchor, Tensor)
        else list(zip(anchor, positive, negative, strict=True))
    )
    losses = [
        F.triplet_margin_loss(a.mean(dim=1), p.mean(dim=1), n.mean(dim=1), margin=margin, p=2.0)
        for a, p, n in planes
    ]
    return torch.stack(losses).mean()


def exemplar_loss(
    model: MedicalTransformer,
    volumes: Tensor,
    rngs: np.random.Generator | Sequence[np.random.Generator],
    *,
    margin: float = 1.0,
    gather: Callable[[Tensor], Tensor] | None = None,
    positions: Sequence[int] | None = None,
) -> Tensor:
    """Stage-1 loss for a batch of volumes in [0, 1], encoders only.

    ``rngs`` as ``plane_positives``. Alone, the batch needs B >= 2 volumes (the
    negatives); with ``gather`` (rows of this process's volumes -> rows of the global
    batch) and ``positions`` (where they sit in it) the negatives come from the global
    batch, which needs >= 2.
    """
    model.check_input(volumes)
    positives = plane_positives(volumes, rngs)
    anchors, pos, neg = [], [], []
    for p in range(len(PLANES)):
        a = model.encode_plane(volumes, p)[0]
        anchors.append(a)
        pos.append(model.encode_plane(positives[p], p)[0])
        if gather is None:
            neg.append(batch_negatives(a))
        else:
            where = range(len(a)) if positions is None else positions
            neg.append(global_negatives(a.mean(dim=1), gather, where)[:, None])
    return triplet_loss(anchors, pos, neg, margin=margin)


# ---------------------------------------------------------------------------- stage 2


def mask_slices(
    n_slices: int, ratio: float = 0.1, generator: torch.Generator | None = None
) -> Tensor:
    """Sorted indices of int(ratio·N) distinct slices to mask (9/11/9 at 96/114/96).

    At least one slice is masked, so sequences shorter than 1/ratio (tiny test volumes)
    still give a loss.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), not {ratio!r}")
    if n_slices < 2:
        raise ValueError(f"need at least 2 slices to mask some, got {n_slices}")
    count = max(1, int(ratio * n_slices + 1e-9))
    return torch.randperm(n_slices, generator=generator)[:count].sort().values


def as_bool_mask(mask: Tensor, batch: int, n_slices: int) -> Tensor:
    """Indices (M,), or a bool mask (N,) or (B, N), as a bool mask (B, N)."""
    if mask.dtype != torch.bool:
        flags = torch.zeros(n_slices, dtype=torch.bool, device=mask.device)
        flags[mask] = True
        mask = flags
    return mask.expand(batch, n_slices)


def apply_mask(embeddings: Tensor, mask: Tensor, replacement: Tensor) -> Tensor:
    """(B, N, d) embeddings with the masked slices replaced by ``replacement`` (d,)."""
    b, n, _ = embeddings.shape
    flags = as_bool_mask(mask, b, n)[..., None]
    return torch.where(flags, replacement.to(embeddings.dtype), embeddings)


@torch.no_grad()
def constant_slice_embedding(
    encoder: nn.Module, slice_shape: tuple[int, ...], value: float = 0.0
) -> Tensor:
    """The encoder's output (d,) for a constant slice of shape (C, H, W).

    The slice is encoded as a stack of its own, so the volume's statistics do not leak
    in. For the default ``value`` 0 every conv output is zero and this is exactly the
    encoder's final bias: a vector that carries no image content.
    """
    weight = next(encoder.parameters())
    slices = torch.full(
        (1, 1, *slice_shape), float(value), dtype=weight.dtype, device=weight.device
    )
    return encoder(slices)[0][0, 0]


class MaskToken(nn.Module):
    """A learned mask vector per plane, the alternative to the constant-slice encoding."""

    def __init__(self, *, d_model: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(len(PLANES), d_model) * 0.02)

    def forward(self, plane: int) -> Tensor:
        return self.tokens[plane]


def masked_prediction_loss(
    pred: Sequence[Tensor], target: Sequence[Tensor], mask: Sequence[Tensor]
) -> Tensor:
    """MSE between predicted and true encodings at the masked slices, summed over planes.

    Per plane: pred and target (B, N_p, d); mask as indices (M,) or bool (N_p,)/(B, N_p).
    On the CPU the masked slices are picked out (the numbers CPU runs always gave); on
    a GPU the same mean is a weighted sum, which needs no host sync, and a mask there
    is not checked for being empty (its loss would be NaN, which training catches).
    """
    total = pred[0].new_zeros(())
    for p, t, m in zip(pred, target, mask, strict=True):
        flags = as_bool_mask(m, p.shape[0], p.shape[1])
        if flags.device.type != "cpu":
            total = total + weighted_masked_mse(p, t, flags)
            continue
        if not flags.any():
            raise ValueError("a plane has no masked slices: nothing to predict")
        total = total + F.mse_loss(p[flags], t[flags])
    return total


def weighted_masked_mse(pred: Tensor, target: Tensor, flags: Tensor) -> Tensor:
    """``F.mse_loss(pred[flags], target[flags])`` in float32, as a weighted sum: no
    boolean indexing, so no host sync on a GPU. pred, target (B, N, d); flags (B, N)."""
    weight = flags.unsqueeze(-1).to(torch.float32)
    squared = (pred.float() - target.float()).square() * weight
    return squared.sum() / (weight.sum() * pred.shape[-1])


def masked_encoding_loss(
    model: MedicalTransformer,
    volumes: Tensor,
    *,
    ratio: float = 0.1,
    generator: torch.Generator | None = None,
    mask_token: MaskToken | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Stage-2 loss: frozen encoders, a fresh mask per volume and plane, transformer predicts.

    The masks come from ``generators``, one per volume (each draws its volume's
    masks, plane by plane), else from ``generator`` (plane by plane, volume by volume).
    The replacement is ``mask_token(plane)`` if given, else the encoder output of a
    constant slice. Gradients reach the transformer (and the mask token) only.
    """
    if model.transformer is None:
        raise ValueError("masked encoding prediction needs a model with use_transformer=True")
    model.check_input(volumes)
    with torch.no_grad():
        targets = model.encode(volumes).embeddings
    if generators is not None and len(generators) != volumes.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {volumes.shape[0]} volumes")
    drawn = (  # per volume, per plane: the masked slices
        [[mask_slices(t.shape[1], ratio, g) for t in targets] for g in generators]
        if generators is not None
        else None
    )
    inputs, masks = [], []
    for p, t in enumerate(targets):
        b, n, _ = t.shape
        flags = torch.zeros(b, n, dtype=torch.bool)  # drawn on the host, moved once
        for i in range(b):
            flags[i, drawn[i][p] if drawn is not None else mask_slices(n, ratio, generator)] = True
        if t.device.type == "cuda":
            flags = flags.pin_memory().to(t.device, non_blocking=True)
        else:
            flags = flags.to(t.device)
        if mask_token is not None:
            replacement = mask_token(p)
        else:
            slice_shape = tuple(volume_to_slices(volumes, p).shape[2:])
            replacement = constant_slice_embedding(model.encoders[p], slice_shape)
        inputs.append(apply_mask(t, flags, replacement))
        masks.append(flags)
    return masked_prediction_loss(model.contextualize(tuple(inputs)), targets, masks)
