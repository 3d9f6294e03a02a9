"""EVA-02's ImageNet ViT weights as a start for PUMIT's MIM stage.

The authors' MIM may start from EVA-02 B (``conf/model/eva02-b-ckpt.yaml``:
``eva02_B_pt_in21k_p14.pt``, its state dict under ``module``), loaded by their
``ViT._load_from_state_dict`` (``pumit/model/vit.py:251-282`` at commit 67218a2).
``eva02_to_vit`` does the same conversion, once, into our ``UniversalViT``'s names
and shapes:

- The RoPE buffers (``rope.freqs_cos``/``freqs_sin``, also under each block) are
  dropped (ours computes its 3D RoPE), and so are the prediction heads
  (``lm_head.*`` of the MIM checkpoint, ``head.*`` of a fine-tuned one).
- The 2D patch kernel (dim, 3, p, p) (p = 14) is resized to 16 x 16 (bicubic, as
  theirs) and spread over depth, each of the 16 slices 1/16 of it.
- Theirs then sees a grey volume copied to 3 channels and normalised by ImageNet's
  mean and std (``transforms.py:80-85``, ``mim.py:63-74,85-86``); ours sees the
  1-channel volume in [0, 1]. The two are the same function when the 3 channels
  fold into one: weight Σ_c W_c / σ_c, bias b − Σ_c (μ_c / σ_c) · ΣW_c (the sum over
  the whole kernel; exact for any input, zero padding included, as a patch
  embedding has kernel = stride and no padding of its own, and for the SAC's
  depth-pooled kernels, which keep the kernel's sum).
- The (1, 1 + h·w, dim) position embedding: its class entry goes into the class
  token (ours has no class position), the h x w grid is repeated over our grid's
  depth and resampled to it as the authors' ``sac.resample`` (area-averaged where
  smaller, then trilinear: ``shrink_pos_embed``, ``resample_pos_embed``).
- Every other parameter (blocks, final norm, mask token) has EVA-02's name and
  shape in ours, as theirs (sub-LN, SwiGLU, q/v biases).

One difference: their line 273 adds ``pos_embed[:, 1]``, the first *patch*'s
position, to the class token, while EVA-02 adds ``pos_embed[:, 0]`` to its class
token (``x = cat(cls, patches) + pos_embed``). Ours adds entry 0, so the class
token's input is EVA-02's (``docs/pumit-parity.md``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medtx.errors import MedtxError
from medtx.models.pumit.vit import UniversalViT, resample_pos_embed, shrink_pos_embed
from medtx.models.weights import read_state_file

# timm's IMAGENET_DEFAULT_MEAN / _STD, the authors' input normalisation (mim.py:63-74)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# keys the conversion drops: RoPE tables (any prefix) and the prediction heads
_DROPPED = re.compile(r"(^|\.)rope\.freqs_(cos|sin)$|^(lm_head|head)\.")


def _listed(keys: list[str], most: int = 6) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def eva02_state(ckpt: Mapping[str, Any]) -> dict[str, Tensor]:
    """The model state in an EVA-02 checkpoint: under ``module`` (DeepSpeed's, the
    authors' ``state_dict_key``), ``model`` or at the top level; a ``module.`` key
    prefix is removed (timm's ``clean_state_dict``, as their ``load_ckpt``)."""
    state: Any = ckpt
    for key in ("module", "model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    out = {}
    for k, v in state.items():
        if isinstance(v, Tensor):
            out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def inflate_patch_kernel(weight: Tensor, patch: int) -> Tensor:
    """EVA-02's (dim, C, p, p) kernel -> the authors' (dim, C, patch, patch, patch):
    bicubic to patch x patch, then each depth slice 1/patch of it (vit.py:257-260)."""
    resized = F.interpolate(weight, (patch, patch), mode="bicubic")
    return (resized / patch).unsqueeze(2).expand(-1, -1, patch, -1, -1).contiguous()


def fold_input_norm(
    weight: Tensor,
    bias: Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[Tensor, Tensor]:
    """A conv (weight (dim, C, ...), bias) on (x − μ_c) / σ_c of a 1-channel x copied
    to C channels -> the 1-channel conv on x with the same output."""
    m = weight.new_tensor(mean).view(1, -1, *([1] * (weight.ndim - 2)))
    s = weight.new_tensor(std).view(1, -1, *([1] * (weight.ndim - 2)))
    folded = (weight / s).sum(1, keepdim=True)
    shift = (weight * (m / s)).flatten(1).sum(1)
    return folded, bias - shift


def eva02_to_vit(state: Mapping[str, Tensor], vit: UniversalViT) -> dict[str, Tensor]:
    """An EVA-02 ViT state dict (keys under ``module`` or at the top level) -> a state
    dict ``vit.load_state_dict(..., strict=True)`` takes (see the module docstring).

    A key this conversion does not know, one it needs and does not find, or a shape
    not ``vit``'s (another model size) is a one-line MedtxError."""
    src = eva02_state(state)
    target = vit.state_dict()
    dim = vit.size.dim
    kept = {k: v for k, v in src.items() if not _DROPPED.search(k)}
    special = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token"}
    plain = set(target) - {"patch_embed.weight", "patch_embed.bias", "pos_embed", "cls_token"}
    unknown = sorted(set(kept) - special - plain)
    missing = sorted((special | plain) - set(kept))
    if unknown or missing:
        parts = ([f"unknown keys {_listed(unknown)}"] if unknown else []) + (
            [f"missing keys {_listed(missing)}"] if missing else []
        )
        raise MedtxError(
            f"not an EVA-02 state dict for this ViT (dim {dim}, depth {vit.size.depth}): "
            + "; ".join(parts)
        )
    weight, pos = kept["patch_embed.proj.weight"], kept["pos_embed"]
    wrong = [
        f"{k} {tuple(kept[k].shape)} (ours {tuple(target[_ours(k)].shape)})"
        for k in ["cls_token", "patch_embed.proj.bias", *sorted(plain)]
        if tuple(kept[k].shape) != tuple(target[_ours(k)].shape)
    ]
    if weight.ndim != 4 or weight.shape[:2] != (dim, len(IMAGENET_MEAN)):
        wrong.append(f"patch_embed.proj.weight {tuple(weight.shape)} (EVA-02: ({dim}, 3, p, p))")
    n = pos.shape[1] - 1 if pos.ndim == 3 else 0
    side = math.isqrt(n)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != dim or n < 1 or side * side != n:
        wrong.append(f"pos_embed {tuple(pos.shape)} (EVA-02: (1, 1 + h·w, {dim}), h = w)")
    if target["patch_embed.weight"].shape[1] != 1:
        wrong.append(f"our patch embedding has {target['patch_embed.weight'].shape[1]} channels")
    if wrong:
        raise MedtxError(
            f"not an EVA-02 state dict for this ViT (dim {dim}, depth {vit.size.depth}): "
            + _listed(wrong, 3)
        )

    out: dict[str, Tensor] = {}
    for k in plain:
        out[k] = kept[k].detach().to(dtype=target[k].dtype, device="cpu").clone()
    work = torch.float64
    patch = int(target["patch_embed.weight"].shape[-1])
    w3d = inflate_patch_kernel(weight.detach().to("cpu", work), patch)
    w1, b1 = fold_input_norm(w3d, kept["patch_embed.proj.bias"].detach().to("cpu", work))
    out["patch_embed.weight"] = w1.to(target["patch_embed.weight"].dtype)
    out["patch_embed.bias"] = b1.to(target["patch_embed.bias"].dtype)
    pos = pos.detach().to("cpu", work)
    cls = kept["cls_token"].detach().to("cpu", work) + pos[:, :1]
    out["cls_token"] = cls.to(target["cls_token"].dtype)
    depth, height, width = (int(g) for g in target["pos_embed"].shape[2:])
    grid = (depth, height, width)
    planar = pos[0, 1:].T.reshape(1, dim, 1, side, side)  # row-major h then w, as theirs
    pos3d = planar.expand(-1, -1, depth, -1, -1).contiguous()
    pos3d = resample_pos_embed(shrink_pos_embed(pos3d, grid), grid)
    out["pos_embed"] = pos3d.to(target["pos_embed"].dtype).contiguous()
    return out


def _ours(key: str) -> str:
    return {"patch_embed.proj.bias": "patch_embed.bias"}.get(key, key)


def load_eva02(path: str | Path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """The state dict in an EVA-02 checkpoint file and the file's sha256. A missing
    or unreadable file, or one whose sha256 is not ``expected_sha256``, is a one-line
    MedtxError naming it; the hash is checked before the file is unpickled."""
    path = Path(path)
    ckpt, digest = read_state_file(path, f"pumit eva02_weights {path}", expected_sha256)
    return eva02_state(ckpt), digest
