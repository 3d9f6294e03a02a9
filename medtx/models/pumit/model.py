"""PUMIT's fine-tuning model: the universal ViT with a task head, built by preset.

Fine-tuning loads a pre-trained ``UniversalViT`` (state-dict prefix ``vit.``) and
adds a fresh head, as the paper does for classification and segmentation (Luo et
al., "Building Universal Foundation Models for Medical Image Analysis with
Spatially Adaptive Networks"): a linear head on the class token (or the mean of
the patch tokens), or, for segmentation, EVA-02's way of making the ViT's single
1/16 map hierarchical (transposed convolutions to 1/4 and 1/8, the map itself at
1/16, a max-pool to 1/32) followed by a plain U-Net decoder. Ours adds a small
conv stem on the input at full size and 1/2 as the two finest skips (UNETR-like),
so the logits have detail finer than a patch.

Every layer that keeps or changes resolution is a SAC layer, so one set of weights
takes any spacing; ``forward`` takes the input's ``Grid`` (default ``Grid(0)``:
this study's inputs are isotropic template-space volumes). Inputs of any size work:
they are zero-padded at the end of each axis to a multiple of the patch, and
segmentation logits are cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtx.errors import ConfigError
from medtx.models.pumit.sac import Grid, SACConv3d, SACConvTranspose3d
from medtx.models.pumit.tokenizer import TOKENIZER_SIZES, TokenizerSize
from medtx.models.pumit.vit import (
    PATCH,
    VIT_SIZES,
    UniversalViT,
    VitSize,
    official_vit_parameters,
    vit_parameter_count,
)
from medtx.models.slice_transformer import TASK_DEFAULTS, count_parameters

TASKS = tuple(TASK_DEFAULTS)  # classification, regression, segmentation
POOLINGS = ("cls", "mean")
LEVELS = 6  # segmentation maps at 1, 1/2, 1/4, 1/8, 1/16 and 1/32 of the in-plane size


@dataclass(frozen=True)
class PumitPreset:
    """A named size: the ViT, the tokenizer that pre-trains it, and the U-Net
    decoder's channel widths at full size, 1/2, 1/4, 1/8 and 1/16 (finest first;
    the 1/32 map keeps the 1/16 width, as a max-pool does)."""

    vit: VitSize
    tokenizer: TokenizerSize
    decoder: tuple[int, ...]


PRESETS: dict[str, PumitPreset] = {
    # ViT-B, as the paper. The decoder widths are ours (the paper's appendix gives
    # none): nnU-Net's 3D full-resolution widths, 32 doubling to a cap of 320.
    "base": PumitPreset(VIT_SIZES["base"], TOKENIZER_SIZES["base"], (32, 64, 128, 256, 320)),
    # CPU-sized (demo, tests). The decoder is 16 wide at full size: at 4 (and 8) it
    # learned no tumour core in 100 steps on the planted cohort (medtx.train.learnability)
    "tiny": PumitPreset(VIT_SIZES["tiny"], TOKENIZER_SIZES["tiny"], (16, 16, 32, 32, 64)),
}
assert set(PRESETS) == set(VIT_SIZES) == set(TOKENIZER_SIZES)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: batch statistics are useless at the batch sizes of 3D fine-tuning."""
    return nn.GroupNorm(min(8, channels), channels)


def fit_to(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Crop or zero-pad the end of each spatial axis of (B, C, *spatial) to ``size``."""
    pad: list[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(size)):
        pad += [0, want - have]  # negative: F.pad crops
    return F.pad(x, pad) if any(pad) else x


def pad_to_multiple(x: Tensor, grid: Grid, stride: int) -> Tensor:
    """x zero-padded at the end of each spatial axis to a multiple of what a SAC layer
    of this in-plane ``stride`` takes on ``grid``: ``stride`` in-plane, in depth
    ``stride >> grid.pending`` (at least 1)."""
    multiple = (max(stride >> grid.pending, 1), stride, stride)
    return fit_to(x, tuple(-(-n // m) * m for n, m in zip(x.shape[2:], multiple)))


class ConvBlock(nn.Module):
    """(SAC 3x3x3, GroupNorm, LeakyReLU) twice: a plain U-Net stage."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = SACConv3d(in_channels, out_channels, 3, bias=False)
        self.conv2 = SACConv3d(out_channels, out_channels, 3, bias=False)
        self.norm1, self.norm2 = _norm(out_channels), _norm(out_channels)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        x, _ = self.conv1(x, grid)
        x = F.leaky_relu(self.norm1(x), 0.01)
        x, _ = self.conv2(x, grid)
        return F.leaky_relu(self.norm2(x), 0.01)


class SegmentationAdapter(nn.Module):
    """The maps a U-Net decoder needs, finest first: a conv stem on the input at
    full size and 1/2; from the ViT's 1/16 token map, two transposed convolutions
    to 1/4, one to 1/8, a 1x1x1 projection at 1/16 and its max-pool to 1/32."""

    def __init__(self, in_channels: int, dim: int, widths: tuple[int, ...]):
        super().__init__()
        c = widths
        self.stem = SACConv3d(in_channels, c[0], 3, bias=False)
        self.stem_norm = _norm(c[0])
        self.stem_down = SACConv3d(c[0], c[1], 2, stride=2, bias=False)
        self.stem_down_norm = _norm(c[1])
        self.up4_a = SACConvTranspose3d(dim, c[2], 2)
        self.up4_norm = _norm(c[2])
        self.up4_b = SACConvTranspose3d(c[2], c[2], 2)
        self.up8 = SACConvTranspose3d(dim, c[3], 2)
        self.proj16 = nn.Conv3d(dim, c[4], 1)

    def forward(
        self, x: Tensor, grid: Grid, tokens: Tensor, tokens_grid: Grid
    ) -> list[tuple[Tensor, Grid]]:
        """x (B, C, D, H, W) on ``grid``; tokens (B, dim, D', H', W') on ``tokens_grid``."""
        full, _ = self.stem(x, grid)
        full = F.leaky_relu(self.stem_norm(full), 0.01)
        half, g2 = self.stem_down(full, grid)
        half = F.leaky_relu(self.stem_down_norm(half), 0.01)
        q, g4 = self.up4_a(tokens, tokens_grid)
        q, g4 = self.up4_b(F.gelu(self.up4_norm(q)), g4)
        e, g8 = self.up8(tokens, tokens_grid)
        s = self.proj16(tokens)
        # in depth only once the 1/16 map is isotropic, as a SAC layer would
        depth = 1 if tokens_grid.pending else 2
        t = F.max_pool3d(s, (depth, 2, 2), ceil_mode=True)
        g32 = replace(tokens_grid, downsamples=tokens_grid.downsamples + 1)
        return [(full, grid), (half, g2), (q, g4), (e, g8), (s, tokens_grid), (t, g32)]


class UNetDecoder(nn.Module):
    """A plain U-Net decoder: a stage at 1/32, then per finer level a SAC transposed
    convolution up, the skip concatenated, a stage; a 1x1x1 conv to the logits."""

    def __init__(self, widths: tuple[int, ...], num_outputs: int):
        super().__init__()
        c = (*widths, widths[-1])  # the 1/32 map keeps the 1/16 width
        self.bottleneck = ConvBlock(c[-1], c[-1])
        self.ups = nn.ModuleList(
            SACConvTranspose3d(c[i + 1], c[i], 2) for i in reversed(range(LEVELS - 1))
        )
        self.stages = nn.ModuleList(ConvBlock(2 * c[i], c[i]) for i in reversed(range(LEVELS - 1)))
        self.out = nn.Conv3d(c[0], num_outputs, 1)

    def forward(self, maps: list[tuple[Tensor, Grid]]) -> Tensor:
        x, grid = maps[-1]
        x = self.bottleneck(x, grid)
        for up, stage, (skip, skip_grid) in zip(self.ups, self.stages, reversed(maps[:-1])):
            x, grid = up(x, grid)
            x = torch.cat([fit_to(x, skip.shape[2:]), skip], dim=1)  # odd sizes: off by one
            x = stage(x, skip_grid)
        return self.out(x)


class PumitModel(nn.Module):
    """PUMIT's universal ViT (``self.vit``, loaded from pre-training) and a task head.

    Args:
        preset: a key of ``PRESETS``.
        task: "classification", "regression" or "segmentation".
        num_outputs: classes, regression targets, or segmentation channels.
        in_channels: input channels (1 for T1, 4 for the BraTS modalities).
        pooling: classification/regression from the class token ("cls") or the mean
            of the patch tokens ("mean"); unused for segmentation.

    ``forward(x, grid)``: x (B, C, D, H, W) of any size; grid the input's spacing
    (default ``Grid(0)``, isotropic). Returns (B, num_outputs) for classification and
    regression, (B, num_outputs, D, H, W) logits for segmentation.

    Example:
        >>> model = PumitModel("tiny", "classification", 3)
        >>> model(torch.rand(2, 1, 48, 57, 48)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        preset: str,
        task: str,
        num_outputs: int,
        in_channels: int = 1,
        pooling: str = "cls",
    ):
        super().__init__()
        check_choices(preset=preset, task=task, pooling=pooling)
        for name, value in (("num_outputs", num_outputs), ("in_channels", in_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"PUMIT {name} must be a positive integer, not {value!r}")
        size = PRESETS[preset]
        self.preset, self.task, self.pooling = preset, task, pooling
        self.in_channels, self.num_outputs = in_channels, num_outputs
        self.vit = UniversalViT(size.vit, in_channels)
        if task == "segmentation":
            self.adapter = SegmentationAdapter(in_channels, size.vit.dim, size.decoder)
            self.decoder = UNetDecoder(size.decoder, num_outputs)
        else:
            self.head = nn.Linear(size.vit.dim, num_outputs)

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PUMIT input must be (B, {self.in_channels}, D, H, W), not {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, grid: Grid | None = None) -> Tensor:
        self.check_input(x)
        grid = Grid(0) if grid is None else grid
        size = tuple(x.shape[2:])
        tokens, tokens_grid = self.vit(pad_to_multiple(x, grid, PATCH), grid)
        if self.task != "segmentation":
            pooled = tokens[:, 0] if self.pooling == "cls" else tokens[:, 1:].mean(dim=1)
            return self.head(pooled)
        token_map = tokens[:, 1:].transpose(1, 2).unflatten(2, tokens_grid)  # (B, dim, D', H', W')
        g16 = replace(grid, downsamples=grid.downsamples + 4)
        # the stems need no more than an even size: full-size work stays near the input's
        maps = self.adapter(pad_to_multiple(x, grid, 2), grid, token_map, g16)
        return fit_to(self.decoder(maps), size)


def check_choices(*, preset: str, task: str, pooling: str) -> None:
    for name, value, allowed in (
        ("preset", preset, tuple(PRESETS)),
        ("task", task, TASKS),
        ("pooling", pooling, POOLINGS),
    ):
        if value not in allowed:
            raise ConfigError(f"PUMIT {name} {value!r} is not one of {list(allowed)}")


def build_model(
    preset: str = "tiny",
    task: str = "classification",
    *,
    num_outputs: int | None = None,
    in_channels: int | None = None,
    pooling: str = "cls",
) -> PumitModel:
    """A model from a named preset; outputs and channels default to the study's task
    (``slice_transformer.TASK_DEFAULTS``: 3 classes, 1 age, 3 regions from 4 channels)."""
    check_choices(preset=preset, task=task, pooling=pooling)
    outputs, channels = TASK_DEFAULTS[task]
    return PumitModel(
        preset,
        task,
        outputs if num_outputs is None else num_outputs,
        channels if in_channels is None else in_channels,
        pooling,
    )


def params_table() -> list[dict[str, object]]:
    """Trainable parameters per preset and task, with ``slice_transformer.params_table``'s
    keys so one table shows both. The paper prints no per-task counts ("paper" is empty);
    base is ViT-B's ~85 M blocks plus the 16^3 patch embedding, the [5, 10, 10]
    position embedding and the head (``vit_params_rows``: the ViT against the
    authors' code)."""
    rows: list[dict[str, object]] = []
    for preset in PRESETS:
        for task, (outputs, channels) in TASK_DEFAULTS.items():
            rows.append(
                {
                    "task": task,
                    "preset": preset,
                    "in_channels": channels,
                    "num_outputs": outputs,
                    "parameters": count_parameters(build_model(preset, task), trainable_only=True),
                    "paper": "",
                }
            )
    return rows


def vit_params_rows(preset: str = "base") -> list[dict[str, object]]:
    """PUMIT's ViT alone (patch embedding included; task heads and the MIM mask token
    left out), with ``params_table``'s keys: "parameters" is ours, "paper" the count
    of the authors' ``ViT`` (``pumit/model/vit.py`` at 67218a2, ``sub_ln=True,
    qkv_bias=True``, ``pos_embed_shape`` [5, 10, 10]) at the same input channels, by
    ``official_vit_parameters`` (their code, instantiated, gave the same). A row for
    1 input channel (ours) and one for 3 (theirs as trained: grey images repeated
    to RGB); the task column is "vit_only", the outputs 0."""
    size = PRESETS[preset].vit
    rows: list[dict[str, object]] = []
    for channels in (1, 3):
        with torch.device("meta"):  # counted, not allocated
            vit = UniversalViT(size, channels)
        rows.append(
            {
                "task": "vit_only",
                "preset": preset,
                "in_channels": channels,
                "num_outputs": 0,
                "parameters": vit_parameter_count(vit),
                "paper": f"{official_vit_parameters(size, channels):,}",
            }
        )
    return rows


def inflate_state_dict(state: dict[str, Tensor], in_channels: int) -> dict[str, Tensor]:
    """A pre-trained 1-channel state whose patch embedding (``...patch_embed.weight``,
    (dim, 1, 16, 16, 16)) takes ``in_channels`` inputs: repeated and divided by
    ``in_channels``, so a volume repeated on every channel embeds as the volume did."""
    out = dict(state)
    for key, value in state.items():
        if key.endswith("patch_embed.weight") and value.ndim == 5 and value.shape[1] == 1:
            out[key] = value.repeat(1, in_channels, 1, 1, 1) / in_channels
    return out
