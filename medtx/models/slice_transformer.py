"""The Medical Transformer: three per-plane slice encoders and one slice transformer.

The module is long because encoders, transformer, heads and presets are one model,
whose parameter counts are checked against the paper's Table 3 as a whole.

Jun, Jeong, Heo and Suk, "Medical Transformer: Universal Brain Encoder for 3D MRI
Analysis", arXiv:2104.13633 (2021); IEEE TNNLS (2023). A 3D volume is read as three
sequences of 2D slices (sagittal, coronal, axial). Each plane has its own 2D conv
encoder that turns a slice into a d-vector; one transformer, shared by the planes,
lets the slice vectors see each other; light heads read the result out.

Origin of the design: the paper (Jun et al. 2021) gives the overall shape; what it
leaves open follows the authors' public pre-training code:
a ResNet-18 of BasicBlocks with widths 16/32/64/128 and InstanceNorm without affine;
an Annotated-Transformer/BERT-style encoder (input·√d + sinusoidal position + a
3-entry segment embedding, pre-LN sublayers, a final LayerNorm) whose 4 attention
heads are 256 wide each, not d/4. Our own readings, which do not change any count:
"InstanceNorm over the whole slice stack" = statistics per volume and channel over all
slices of a plane (``SliceStackNorm``); the planes' sequences are concatenated into one
token sequence (``SliceTransformer``); the feed-forward uses GELU.

The d = 64 vs d = 16 discrepancy: the paper's text says d_emb = 16 and d_ff = 64, but
its Table 3 counts (2.402M / 2.401M / 2.410M) are reproduced exactly only with
d = 64 and d_ff = 128. ``PRESETS["table3"]`` is the default; ``PRESETS["paper_text"]``
is the text's reading, whose count 2,104,083 also needs the usual d/heads attention
split (4 heads of width 4) — with 256-wide heads it would be 2,171,619.

Parameter arithmetic (no conv biases, no norm parameters in the encoders):

    encoder convs   stem 7·7·C·16 + layer1 9,216 + layer2 32,768 + layer3 131,072
                    + layer4 524,288 = 697,344 + 784·C
    encoder fc      128·d + d                                   (d = 64: 8,256)
    transformer     q/k/v 3·(d·1024 + 1024) + out (1024·d + d) + ff (d·128 + 128)
                    + (128·d + d) + 3 LayerNorms·2d + plane embedding 3·d
                    = 199,680 + 65,600 + 8,320 + 8,256 + 384 + 192 = 282,432
    trunk (C = 1)   3·706,384 + 282,432 = 2,401,584
    heads           classification 192·3 + 3 = 579      -> 2,402,163
                    regression     192·1 + 1 = 193      -> 2,401,777
                    segmentation   C = 4 adds 3·3·784 = 7,056 to the stems,
                                   head 528·3 + 3 = 1,587 -> 2,410,227
    paper_text      3·(698,128 + 2,064) + 3,360 + 147 = 2,104,083 with a 16-wide
                    transformer: q/k/v/out 1,088, ff 2,128, LayerNorms 96, planes 48.

Axes: a volume is (B, C, X, Y, Z) with x sagittal, y coronal, z axial (96×114×96 on
the 2 mm MNI grid). A sagittal slice is the (Y, Z) image at one x, a coronal slice the
(X, Z) image at one y, an axial slice the (X, Y) image at one z.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtx.errors import ConfigError

Task = Literal["classification", "regression", "segmentation"]
PLANES = ("sagittal", "coronal", "axial")
ENCODER_WIDTHS = (16, 32, 64, 128)
SEG_MAP_CHANNELS = sum(ENCODER_WIDTHS[:3])  # layer1-3: 16 + 32 + 64 = 112 per plane

# Hyperparameters by name; ``build_model`` applies them. See the module docstring.
PRESETS: dict[str, dict[str, float | int]] = {
    "table3": {
        "d_model": 64,
        "d_ff": 128,
        "n_heads": 4,
        "head_dim": 256,
        "n_layers": 1,
        "dropout": 0.1,
    },
    "paper_text": {
        "d_model": 16,
        "d_ff": 64,
        "n_heads": 4,
        "head_dim": 4,
        "n_layers": 1,
        "dropout": 0.1,
    },
}
# Per task: (num_outputs, in_channels) of the paper's experiments.
TASK_DEFAULTS: dict[str, tuple[int, int]] = {
    "classification": (3, 1),  # AD / MCI / CN from T1
    "regression": (1, 1),  # brain age from T1
    "segmentation": (3, 4),  # WT / TC / ET from T1, T1ce, T2, FLAIR
}
# The paper's Table 3 as printed, for ``params_table``.
TABLE3_PRINTED = {"classification": "2.402M", "regression": "2.401M", "segmentation": "2.410M"}


# ---------------------------------------------------------------------------- helpers


def volume_to_slices(volume: Tensor, plane: int) -> Tensor:
    """The slice stack of one plane: (B, C, X, Y, Z) -> (B, N, C, H, W).

    sagittal 'b c x y z -> b x c y z', coronal '-> b y c x z', axial '-> b z c x y'.
    """
    order = ((0, 2, 1, 3, 4), (0, 3, 1, 2, 4), (0, 4, 1, 2, 3))[plane]
    return volume.permute(*order)


def slices_to_volume(slices: Tensor, plane: int) -> Tensor:
    """Inverse of ``volume_to_slices``: (B, N, C, H, W) -> (B, C, X, Y, Z)."""
    order = ((0, 2, 1, 3, 4), (0, 2, 3, 1, 4), (0, 2, 3, 4, 1))[plane]
    return slices.permute(*order)


def sinusoidal_position(n: int, d: int, *, device=None, dtype=None) -> Tensor:
    """Vaswani et al.'s fixed position code, (n, d): sin on even, cos on odd channels."""
    position = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    freq = torch.exp(
        torch.arange(0, d, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / d)
    )
    code = torch.zeros(n, d, device=device, dtype=torch.float64)
    code[:, 0::2] = torch.sin(position * freq)
    code[:, 1::2] = torch.cos(position * freq)
    return code.to(dtype or torch.get_default_dtype())


def bilinear_matrix(n_out: int, n_in: int, *, device=None, dtype=None) -> Tensor:
    """The (n_out, n_in) matrix of 1D linear interpolation, as PyTorch's bilinear resize.

    align_corners=False: source coordinate (i + 0.5)·n_in/n_out - 0.5, clamped below at 0;
    neighbours i0 = floor(src) and i1 = min(i0 + 1, n_in - 1), weights 1 - λ and λ = src - i0.
    Built in float64 for float64 ``dtype``, else in float32, then cast to ``dtype``.
    """
    dtype = dtype or torch.get_default_dtype()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    src = (torch.arange(n_out, device=device, dtype=work) + 0.5) * (n_in / n_out) - 0.5
    src = src.clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam = (src - i0.to(work))[:, None]
    cols = torch.arange(n_in, device=device)[None, :]
    matrix = (1.0 - lam) * (cols == i0[:, None]) + lam * (cols == i1[:, None])
    return matrix.to(dtype)


def bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of the last two dims to ``size`` as A_h @ x @ A_w^T.

    Same values as ``F.interpolate(x, size, mode="bilinear", align_corners=False)``
    (up- or downscaling, same edge clamping), but its CUDA backward is two matrix
    products, which is deterministic: F.interpolate's bilinear backward uses atomicAdd
    and raises under ``torch.use_deterministic_algorithms(True)``.
    """
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], size
    a_h = bilinear_matrix(h_out, h_in, device=x.device, dtype=x.dtype)
    a_w = bilinear_matrix(w_out, w_in, device=x.device, dtype=x.dtype)
    return a_h @ x @ a_w.T


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def inflate_stem(weight: Tensor, in_channels: int) -> Tensor:
    """A 1-channel stem kernel (out, 1, k, k) repeated over ``in_channels`` inputs.

    Used to start a 4-modality BraTS encoder from T1 pre-training (as the authors' code does).
    No 1/C rescaling: the InstanceNorm after the stem is scale-invariant.
    """
    if weight.ndim != 4 or weight.shape[1] != 1:
        raise ValueError(f"stem weight must be (out, 1, k, k), not {tuple(weight.shape)}")
    return weight.repeat(1, in_channels, 1, 1).clone()


def inflate_state_dict(state: dict[str, Tensor], in_channels: int) -> dict[str, Tensor]:
    """A pre-trained 1-channel model's state with every encoder stem inflated."""
    out = dict(state)
    for key, value in state.items():
        if key.endswith("stem.weight") and value.ndim == 4 and value.shape[1] == 1:
            out[key] = inflate_stem(value, in_channels)
    return out


# ---------------------------------------------------------------------------- encoder


class SliceStackNorm(nn.Module):
    """InstanceNorm without affine, over the whole slice stack of one plane.

    Statistics are taken per volume and channel over all N slices at once
    (dims N, H, W of a (B, N, C, H, W) stack), not per slice: a slice outside the brain
    keeps its low signal instead of being stretched to unit variance, and all slices of
    a plane share one intensity scale. Computed as ``F.group_norm`` with one group per
    channel on the stack rearranged '(b n) c h w -> b c (n h w)' (3x faster forward +
    backward on CPU than explicit mean/var). No parameters.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor, n_slices: int) -> Tensor:
        bn, c, h, w = x.shape
        if n_slices * h * w == 1:  # one value per channel (a lone 1x1 map): it is its mean
            return x - x
        stack = x.reshape(bn // n_slices, n_slices, c, h * w).transpose(1, 2)  # b c n (h w)
        normed = F.group_norm(stack.reshape(bn // n_slices, c, -1), c, eps=self.eps)
        return normed.view(-1, c, n_slices, h, w).transpose(1, 2).reshape(bn, c, h, w)


class BasicBlock(nn.Module):
    """ResNet BasicBlock (two 3×3 convs, no biases) with slice-stack norms."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm = SliceStackNorm()
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: Tensor, n: int) -> Tensor:
        out = F.relu(self.norm(self.conv1(x), n))
        out = self.norm(self.conv2(out), n)
        skip = x if self.shortcut is None else self.norm(self.shortcut(x), n)
        return F.relu(out + skip)


class PlaneEncoder(nn.Module):
    """ResNet-18 (BasicBlocks [2, 2, 2, 2], widths 16/32/64/128) for one plane's slices.

    7×7 stride-2 stem + 3×3 stride-2 max-pool, four stages, global average pool,
    Linear(128 → d). Input (B, N, C, H, W); output (B, N, d) slice embeddings and,
    on request, the layer1-3 maps (B, N, 16|32|64, h, w) for segmentation.

    Args:
        in_channels: input channels (1 for T1, 4 for BraTS).
        d_model: embedding width d.
    """

    def __init__(self, *, in_channels: int = 1, d_model: int = 64):
        super().__init__()
        w = ENCODER_WIDTHS
        self.stem = nn.Conv2d(in_channels, w[0], 7, 2, 3, bias=False)
        self.norm = SliceStackNorm()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [BasicBlock(c_in, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)]
            )
            for i, (c_in, c_out) in enumerate(zip((w[0],) + w[:-1], w))
        )
        self.fc = nn.Linear(w[-1], d_model)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(
        self, slices: Tensor, *, return_maps: bool = False
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        b, n = slices.shape[:2]
        x = slices.flatten(0, 1)  # 'b n c h w -> (b n) c h w'
        x = F.max_pool2d(F.relu(self.norm(self.stem(x), n)), 3, 2, 1)
        maps = []
        for stage in self.layers:
            for block in stage:  # type: ignore[attr-defined]  # an nn.Sequential of blocks
                x = block(x, n)
            maps.append(x)
        emb = self.fc(x.mean(dim=(2, 3))).unflatten(0, (b, n))
        if not return_maps:
            return emb, None
        return emb, tuple(m.unflatten(0, (b, n)) for m in maps[:3])


# ---------------------------------------------------------------------------- transformer


class SelfAttention(nn.Module):
    """Multi-head self-attention with a free head width (q/k/v: d → heads·head_dim)."""

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = n_heads * head_dim
        self.n_heads, self.dropout = n_heads, dropout
        self.q, self.k, self.v = (nn.Linear(d_model, inner) for _ in range(3))
        self.out = nn.Linear(inner, d_model)

    def forward(self, x: Tensor) -> Tensor:
        # 'b n (h e) -> b h n e' for q, k and v
        q, k, v = (
            f(x).unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out(y.transpose(1, 2).flatten(2))  # 'b h n e -> b n (h e)'


class TransformerLayer(nn.Module):
    """Pre-LN layer: x + drop(attn(LN x)), then x + drop(ff(LN x)); GELU feed-forward."""

    def __init__(self, *, d_model: int, d_ff: int, n_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(
            d_model=d_model, n_heads=n_heads, head_dim=head_dim, dropout=dropout
        )
        self.ff = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ff(self.norm2(x)))


class SliceTransformer(nn.Module):
    """One transformer for the slice sequences of all three planes.

    Tokens: the three planes' slice embeddings concatenated (sagittal, coronal, axial:
    96 + 114 + 96 = 306 tokens), so every slice attends to every slice of every plane.
    Each token gets emb·√d + sinusoidal position of its slice index within its plane +
    the learned embedding of its plane (BERT's "segment"). ``joint=False`` runs the
    same weights on each plane's sequence alone.

    Args:
        d_model: token width d.
        d_ff: feed-forward width.
        n_heads: attention heads.
        head_dim: width of each head (256 in the table3 preset, not d / n_heads).
        n_layers: pre-LN layers.
        dropout: dropout on the embedded input, attention weights and sublayer outputs.
        joint: one 306-token sequence (True) or three per-plane sequences (False).
    """

    def __init__(
        self,
        *,
        d_model: int = 64,
        d_ff: int = 128,
        n_heads: int = 4,
        head_dim: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
        joint: bool = True,
    ):
        super().__init__()
        self.d_model, self.joint = d_model, joint
        self.plane_embedding = nn.Embedding(len(PLANES), d_model)
        nn.init.normal_(self.plane_embedding.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(
                d_model=d_model, d_ff=d_ff, n_heads=n_heads, head_dim=head_dim, dropout=dropout
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def embed(self, x: Tensor, plane: int) -> Tensor:
        """Input tokens of one plane: x·√d + position + plane embedding."""
        pos = sinusoidal_position(x.shape[1], self.d_model, device=x.device, dtype=x.dtype)
        return x * math.sqrt(self.d_model) + pos + self.plane_embedding.weight[plane]

    def encode(self, tokens: Tensor) -> Tensor:
        x = self.drop(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, planes: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """(B, N_p, d) per plane -> contextualised (B, N_p, d) per plane."""
        tokens = [self.embed(x, p) for p, x in enumerate(planes)]
        if not self.joint:
            return tuple(self.encode(t) for t in tokens)
        out = self.encode(torch.cat(tokens, dim=1))
        return tuple(out.split([x.shape[1] for x in planes], dim=1))


# ---------------------------------------------------------------------------- heads


class PooledHead(nn.Module):
    """Classification/regression: Linear(3d → K) of the per-plane slice means.

    This is exactly Linear on the 3D map F[x,y,z] = [E_sag[x]; E_cor[y]; E_ax[z]]
    followed by average pooling (``literal_pooled_logits``), since the mean of F over
    the volume is the concatenation of the per-plane means — without the 0.8 GB map.
    """

    def __init__(self, *, d_model: int, num_outputs: int):
        super().__init__()
        self.linear = nn.Linear(len(PLANES) * d_model, num_outputs)

    def forward(self, planes: tuple[Tensor, ...]) -> Tensor:
        return self.linear(torch.cat([x.mean(dim=1) for x in planes], dim=-1))


class SegmentationHead(nn.Module):
    """Per-voxel Linear(3d + 3·112 → K) on the 3D map plus the upsampled layer1-3 maps.

    Input channel order: F = [E_sag; E_cor; E_ax] (3d), then for each plane (sagittal,
    coronal, axial) its layer1, layer2, layer3 maps (16 + 32 + 64). Computed by
    projecting every piece to K channels first and then upsampling/broadcasting, which
    is exact because bilinear upsampling and broadcasting are linear
    (``literal_segmentation_logits`` is the 528-channel reference).
    """

    def __init__(self, *, d_model: int, num_outputs: int):
        super().__init__()
        self.d_model = d_model
        self.linear = nn.Linear(len(PLANES) * (d_model + SEG_MAP_CHANNELS), num_outputs)

    def weight_blocks(self) -> tuple[list[Tensor], list[list[Tensor]]]:
        """Columns of the linear weight: per-plane embedding blocks, per-plane map blocks."""
        d, w = self.d_model, self.linear.weight
        emb = list(w[:, : 3 * d].split(d, dim=1))
        maps = w[:, 3 * d :].split(SEG_MAP_CHANNELS, dim=1)
        return emb, [list(m.split(ENCODER_WIDTHS[:3], dim=1)) for m in maps]

    def forward(self, planes: tuple[Tensor, ...], maps: tuple[tuple[Tensor, ...], ...]) -> Tensor:
        (b, nx, _), ny, nz = planes[0].shape, planes[1].shape[1], planes[2].shape[1]
        w_emb, w_maps = self.weight_blocks()
        out = self.linear.bias.view(1, -1, 1, 1, 1)
        # E_sag[x] varies along x only, E_cor[y] along y, E_ax[z] along z: broadcast.
        along = ((b, -1, nx, 1, 1), (b, -1, 1, ny, 1), (b, -1, 1, 1, nz))
        for p, x in enumerate(planes):
            out = out + (x @ w_emb[p].T).transpose(1, 2).reshape(along[p])
        sizes = ((ny, nz), (nx, nz), (nx, ny))
        for p, plane_maps in enumerate(maps):
            proj: Tensor | float = 0.0
            for m, w in zip(plane_maps, w_maps[p]):
                k = torch.einsum("bnchw,kc->bnkhw", m, w).flatten(0, 1)
                proj = proj + bilinear_resize(k, sizes[p])
            out = out + slices_to_volume(torch.as_tensor(proj).unflatten(0, (b, -1)), p)
        return out


def upsample_maps(maps: tuple[Tensor, ...], size: tuple[int, int]) -> Tensor:
    """A plane's layer1-3 maps (B, N, C_k, h_k, w_k) upsampled and stacked: (B, N, 112, H, W)."""
    ups = [bilinear_resize(m.flatten(0, 1), size) for m in maps]
    return torch.cat(ups, dim=1).unflatten(0, maps[0].shape[:2])


def feature_map_3d(planes: tuple[Tensor, ...]) -> Tensor:
    """The literal 3D map F[x,y,z] = [E_sag[x]; E_cor[y]; E_ax[z]]: (B, 3d, X, Y, Z)."""
    sag, cor, ax = planes
    (b, nx, d), ny, nz = sag.shape, cor.shape[1], ax.shape[1]
    return torch.cat(
        [
            sag.transpose(1, 2)[:, :, :, None, None].expand(b, d, nx, ny, nz),
            cor.transpose(1, 2)[:, :, None, :, None].expand(b, d, nx, ny, nz),
            ax.transpose(1, 2)[:, :, None, None, :].expand(b, d, nx, ny, nz),
        ],
        dim=1,
    )


def literal_pooled_logits(head: PooledHead, planes: tuple[Tensor, ...]) -> Tensor:
    """Reference for tests: Linear on every voxel of the 3D map, then average pooling."""
    voxels = head.linear(feature_map_3d(planes).movedim(1, -1))  # (B, X, Y, Z, K)
    return voxels.mean(dim=(1, 2, 3))


def literal_segmentation_logits(
    head: SegmentationHead, planes: tuple[Tensor, ...], maps: tuple[tuple[Tensor, ...], ...]
) -> Tensor:
    """Reference for tests: the full 528-channel volume, then the per-voxel Linear."""
    nx, ny, nz = (x.shape[1] for x in planes)
    sizes = ((ny, nz), (nx, nz), (nx, ny))
    parts = [feature_map_3d(planes)]
    parts += [slices_to_volume(upsample_maps(m, sizes[p]), p) for p, m in enumerate(maps)]
    full = torch.cat(parts, dim=1)  # (B, 3d + 336, X, Y, Z)
    return head.linear(full.movedim(1, -1)).movedim(-1, 1)


# ---------------------------------------------------------------------------- model


class PlaneFeatures(NamedTuple):
    """What ``forward_features`` returns.

    embeddings: per plane (sagittal, coronal, axial) the slice vectors (B, N_p, d),
        after the transformer (or straight from the encoders without it).
    maps: per plane the layer1-3 maps (B, N_p, C_k, h_k, w_k); None unless segmenting.
    """

    embeddings: tuple[Tensor, Tensor, Tensor]
    maps: tuple[tuple[Tensor, ...], ...] | None


class MedicalTransformer(nn.Module):
    """Three plane encoders, one slice transformer, one task head.

    Args:
        task: "classification", "regression" or "segmentation".
        num_outputs: classes, regression targets, or segmentation channels (WT/TC/ET).
        in_channels: input channels (1 for T1, 4 for BraTS modalities).
        d_model: slice embedding width d (64 in Table 3; the paper's text says 16).
        d_ff: transformer feed-forward width.
        n_heads: attention heads.
        head_dim: width of each attention head.
        n_layers: transformer layers.
        dropout: transformer dropout.
        use_transformer: False gives the "w/o transformer" ablation (paper Table 5):
            encoder embeddings go straight to the head.
        joint_planes: one 306-token sequence over all planes (True) or per-plane
            sequences through the shared transformer (False).

    Example:
        >>> model = MedicalTransformer(task="classification", num_outputs=3)
        >>> model(torch.rand(2, 1, 96, 114, 96)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        *,
        task: Task,
        num_outputs: int,
        in_channels: int = 1,
        d_model: int = 64,
        d_ff: int = 128,
        n_heads: int = 4,
        head_dim: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
        use_transformer: bool = True,
        joint_planes: bool = True,
    ):
        super().__init__()
        check_hyperparameters(
            task=task,
            num_outputs=num_outputs,
            in_channels=in_channels,
            d_model=d_model,
            d_ff=d_ff,
            n_heads=n_heads,
            head_dim=head_dim,
            n_layers=n_layers,
            dropout=dropout,
        )
        self.task, self.in_channels, self.d_model = task, in_channels, d_model
        self.encoders = nn.ModuleList(
            PlaneEncoder(in_channels=in_channels, d_model=d_model) for _ in PLANES
        )
        self.transformer = (
            SliceTransformer(
                d_model=d_model,
                d_ff=d_ff,
                n_heads=n_heads,
                head_dim=head_dim,
                n_layers=n_layers,
                dropout=dropout,
                joint=joint_planes,
            )
            if use_transformer
            else None
        )
        head = SegmentationHead if task == "segmentation" else PooledHead
        self.head = head(d_model=d_model, num_outputs=num_outputs)

    def check_input(self, volume: Tensor) -> None:
        if volume.ndim != 5:
            raise ValueError(
                f"input must be 5D (B, C, X, Y, Z), but it is {volume.ndim}D "
                f"with shape {tuple(volume.shape)}"
            )
        if volume.shape[1] != self.in_channels:
            raise ValueError(
                f"input has {volume.shape[1]} channel(s), but the model was "
                f"built for in_channels={self.in_channels}"
            )

    def encode_plane(
        self, volume: Tensor, plane: int, *, return_maps: bool = False
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """One plane's encoder on a volume: (B, N_p, d) and optionally its maps."""
        return self.encoders[plane](volume_to_slices(volume, plane), return_maps=return_maps)

    def encode(self, volume: Tensor, *, return_maps: bool = False) -> PlaneFeatures:
        """Encoder outputs for all planes, before the transformer."""
        self.check_input(volume)
        out = [self.encode_plane(volume, p, return_maps=return_maps) for p in range(3)]
        maps = tuple(m for _, m in out if m is not None) if return_maps else None
        return PlaneFeatures(tuple(e for e, _ in out), maps)  # type: ignore[arg-type]

    def contextualize(self, embeddings: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The shared transformer over the planes' slice vectors (identity without it)."""
        return tuple(embeddings) if self.transformer is None else self.transformer(embeddings)

    def forward_features(self, volume: Tensor) -> PlaneFeatures:
        feats = self.encode(volume, return_maps=self.task == "segmentation")
        embeddings = self.contextualize(feats.embeddings)
        return PlaneFeatures(embeddings, feats.maps)  # type: ignore[arg-type]  # one per plane

    def forward_head(self, features: PlaneFeatures) -> Tensor:
        """(B, K) for classification/regression, (B, K, X, Y, Z) logits for segmentation."""
        if self.task == "segmentation":
            return self.head(features.embeddings, features.maps)
        return self.head(features.embeddings)

    def forward(self, volume: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(volume))


def check_hyperparameters(
    *,
    task: str,
    num_outputs: int,
    in_channels: int,
    d_model: int,
    d_ff: int,
    n_heads: int,
    head_dim: int,
    n_layers: int,
    dropout: float,
) -> None:
    """Raise one ConfigError listing every bad hyperparameter."""
    problems = []
    if task not in get_args(Task):
        problems.append(f"task {task!r} is not one of {get_args(Task)}")
    for name, value in (
        ("num_outputs", num_outputs),
        ("in_channels", in_channels),
        ("d_model", d_model),
        ("d_ff", d_ff),
        ("n_heads", n_heads),
        ("head_dim", head_dim),
        ("n_layers", n_layers),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive integer, not {value!r}")
    if isinstance(d_model, int) and d_model % 2:
        problems.append(f"d_model must be even for the sinusoidal position code, not {d_model}")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), not {dropout!r}")
    if problems:
        raise ConfigError("bad MedicalTransformer hyperparameters: " + "; ".join(problems))


def build_model(
    preset: str = "table3",
    task: Task = "classification",
    *,
    num_outputs: int | None = None,
    in_channels: int | None = None,
    **overrides,
) -> MedicalTransformer:
    """A model from a named preset; outputs and channels default to the paper's task.

    Args:
        preset: a key of ``PRESETS``.
        task: "classification", "regression" or "segmentation".
        num_outputs: defaults to 3 / 1 / 3 by task.
        in_channels: defaults to 1 (T1), or 4 for segmentation (BraTS).
        **overrides: any other ``MedicalTransformer`` keyword (e.g. use_transformer).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    if task not in TASK_DEFAULTS:
        raise ConfigError(f"unknown task {task!r}; choose one of {sorted(TASK_DEFAULTS)}")
    outputs, channels = TASK_DEFAULTS[task]
    kwargs = {**PRESETS[preset], **overrides}
    return MedicalTransformer(
        task=task,
        num_outputs=outputs if num_outputs is None else num_outputs,
        in_channels=channels if in_channels is None else in_channels,
        **kwargs,
    )


def params_table() -> list[dict[str, object]]:
    """Rows like the paper's Table 3: parameters per task and preset (for `medtx params`)."""
    rows = []
    for preset in PRESETS:
        for task, (outputs, channels) in TASK_DEFAULTS.items():
            model = build_model(preset, task)  # type: ignore[arg-type]  # a Task by construction
            rows.append(
                {
                    "task": task,
                    "preset": preset,
                    "in_channels": channels,
                    "num_outputs": outputs,
                    "parameters": count_parameters(model),
                    "paper": TABLE3_PRINTED[task] if preset == "table3" else "",
                }
            )
    return rows


def format_params_table(rows: list[dict[str, object]], fmt: str = "text") -> str:
    """``params_table`` rows (any backbone's: a ``backbone`` key adds a last column) as
    aligned text (with thousands separators) or TSV."""
    extra = bool(rows) and "backbone" in rows[0]
    if fmt == "tsv":
        lines = ["task\tpreset\tin_channels\toutputs\tparameters\tpaper" + "\tbackbone" * extra]
        lines += [
            f"{r['task']}\t{r['preset']}\t{r['in_channels']}\t{r['num_outputs']}\t"
            f"{r['parameters']}\t{r['paper']}" + (f"\t{r['backbone']}" if extra else "")
            for r in rows
        ]
        return "\n".join(lines)
    lines = [
        f"{'task':15} {'preset':11} {'in':>3} {'out':>4} {'parameters':>12} {'paper (Table 3)':>16}"
        + "  backbone" * extra
    ]
    lines += [
        f"{r['task']!s:15} {r['preset']!s:11} {r['in_channels']!s:>3} "
        f"{r['num_outputs']!s:>4} {r['parameters']:>12,} {r['paper'] or '-'!s:>16}"
        + (f"  {r['backbone']}" if extra else "")
        for r in rows
    ]
    return "\n".join(lines)
