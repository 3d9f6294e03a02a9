"""Self-supervised pre-training of the Medical Transformer (Jun et al. 2021).

Stage 1, exemplar network: each plane encoder learns that a volume and a non-linear
intensity remap of it (Models Genesis' Bézier transform, a separate curve per plane)
are the same brain, and another brain in the batch is not: L2 triplet loss on the
slice-averaged embeddings, margin 1.0, mean over planes.

Stage 2, masked encoding-vector prediction: with the encoders frozen, int(0.1·N)
slices per plane (9/11/9 at 96/114/96) have their encoding replaced by a mask vector,
and the transformer predicts the true encodings there: MSE at the masked positions,
summed over planes. The mask vector is the encoder output of a constant slice
(default) or a learned token (``MaskToken``).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    one curve: the caller draws a separate one per plane (``plane_positives``).

    Args:
        x: intensities in [0, 1] (numpy array or tensor; a tensor comes back as one).
        rng: the random generator that draws the curve and the flip.
        flip_prob: probability of a decreasing map.
        n_points: samples on the curve.
    """
    values = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if values.size and (values.min() < -1e-6 or values.max() > 1 + 1e-6):
        raise ValueError(
            f"bezier_intensity needs intensities in [0, 1], got "
            f"[{values.min():.4g}, {values.max():.4g}]"
        )
    xs, ys = bezier_curve(rng, n_points=n_points)
    if rng.random() < flip_prob:
        ys = ys[::-1]
    out = np.interp(values, xs, ys).astype(values.dtype if values.dtype.kind == "f" else np.float32)
    return torch.from_numpy(out).to(x.device) if isinstance(x, Tensor) else out


def plane_positives(volumes: Tensor, rng: np.random.Generator) -> tuple[Tensor, ...]:
    """Per plane, every volume of the batch remapped with its own fresh Bézier curve."""
    return tuple(
        torch.stack([torch.as_tensor(bezier_intensity(v, rng)) for v in volumes]) for _ in PLANES
    )


def batch_negatives(x: Tensor) -> Tensor:
    """The negative for batch item i is item i - 1 (another volume of the batch)."""
    if x.shape[0] < 2:
        raise ValueError(
            f"exemplar training needs at least 2 volumes per batch for negatives, got {x.shape[0]}"
        )
    return x.roll(1, dims=0)


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
    model: MedicalTransformer, volumes: Tensor, rng: np.random.Generator, *, margin: float = 1.0
) -> Tensor:
    """Stage-1 loss for a batch (B >= 2) of volumes in [0, 1], encoders only."""
    model.check_input(volumes)
    positives = plane_positives(volumes, rng)
    anchors, pos, neg = [], [], []
    for p in range(len(PLANES)):
        a = model.encode_plane(volumes, p)[0]
        anchors.append(a)
        pos.append(model.encode_plane(positives[p], p)[0])
        neg.append(batch_negatives(a))
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
    """
    total = pred[0].new_zeros(())
    for p, t, m in zip(pred, target, mask, strict=True):
        flags = as_bool_mask(m, p.shape[0], p.shape[1])
        if not flags.any():
            raise ValueError("a plane has no masked slices: nothing to predict")
        total = total + F.mse_loss(p[flags], t[flags])
    return total


def masked_encoding_loss(
    model: MedicalTransformer,
    volumes: Tensor,
    *,
    ratio: float = 0.1,
    generator: torch.Generator | None = None,
    mask_token: MaskToken | None = None,
) -> Tensor:
    """Stage-2 loss: frozen encoders, a fresh mask per volume and plane, transformer predicts.

    The replacement is ``mask_token(plane)`` if given, else the encoder output of a
    constant slice. Gradients reach the transformer (and the mask token) only.
    """
    if model.transformer is None:
        raise ValueError("masked encoding prediction needs a model with use_transformer=True")
    model.check_input(volumes)
    with torch.no_grad():
        targets = model.encode(volumes).embeddings
    inputs, masks = [], []
    for p, t in enumerate(targets):
        b, n, _ = t.shape
        flags = torch.zeros(b, n, dtype=torch.bool, device=t.device)
        for i in range(b):
            flags[i, mask_slices(n, ratio, generator)] = True
        if mask_token is not None:
            replacement = mask_token(p)
        else:
            slice_shape = tuple(volume_to_slices(volumes, p).shape[2:])
            replacement = constant_slice_embedding(model.encoders[p], slice_shape)
        inputs.append(apply_mask(t, flags, replacement))
        masks.append(flags)
    return masked_prediction_loss(model.contextualize(tuple(inputs)), targets, masks)
