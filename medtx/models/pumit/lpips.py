"""LPIPS, the perceptual term of PUMIT's tokenizer loss, as the official code computes it.

The official ``LPIPS`` (``pumit/tokenizer/lpips.py``, function2-llx/PUMIT at
67218a2; taming-transformers' re-implemented): ImageNet VGG-16 features (torchvision
``VGG16_Weights.IMAGENET1K_V1``) cut after relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3; at each cut the channel-normalised features of the two images are
subtracted, squared, weighted by LPIPS' learned 1x1 convolution (``vgg.pth``, in the
official repository) and averaged; the five are summed and doubled. Inputs are in
[-1, 1] and are mapped by the official ``InputNormLayer`` (``(x - (1 - 2 mean)) /
(2 std)`` with ImageNet's mean and std; kept as the official code has it, although
LPIPS' own ScalingLayer subtracts ``2 mean - 1``).

Neither weight file can be downloaded at run time here: ``load_lpips`` takes one
file holding both, a ``torch.save``d state dict with torchvision's VGG-16 keys
(``features.<i>.weight/bias``; others ignored) and vgg.pth's
(``lin<i>.model.1.weight``). ``merge_lpips_weights`` writes it from the two
originals. The linear layers must be the official vgg.pth's (``LIN_SHA256``, the
digest of its five tensors); the file's own sha256 is returned for the checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medtx.errors import MedtxError
from medtx.io import sha256
from medtx.models.weights import read_state_file

# torchvision's vgg16().features: numbers are 3x3 convolutions (+ ReLU), M max-pools
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
CUTS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # relu1_2 ... relu5_3
LIN_CHANNELS = (64, 128, 256, 512, 512)
# sha256 of the official vgg.pth's five weights (float32, little-endian, lin0..lin4);
# the file itself (md5 d507d7349b931f0638a25a48a722f98a, taming-transformers'
# "vgg_lpips") has sha256 a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868
LIN_SHA256 = "9153a2043dccf3b525d4f13db916e93ef040548ea923b6f2100de5ebac141a78"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3 (indices 0..29, same keys)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers)


def lin_digest(weights: list[Tensor]) -> str:
    h = hashlib.sha256()
    for w in weights:
        h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


class LPIPS(nn.Module):
    """The official LPIPS on (N, 3, H, W) images in [-1, 1]; frozen, no dropout
    (the official one runs in eval mode)."""

    mean: Tensor
    std: Tensor

    def __init__(self) -> None:
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("mean", (1 - 2 * mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", (2 * std).view(3, 1, 1), persistent=False)
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LIN_CHANNELS)
        self.requires_grad_(False).eval()

    def load_official(self, state: Mapping[str, Any]) -> None:
        """Load torchvision VGG-16 (``features.*``) and vgg.pth (``lin<i>.model.1.weight``)
        keys; raises KeyError/RuntimeError on a missing key or a wrong shape."""
        self.features.load_state_dict(
            {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        )
        for i, lin in enumerate(self.lins):
            lin.load_state_dict({"weight": state[f"lin{i}.model.1.weight"]})

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always as the official: eval

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = (x - self.mean) / self.std, (y - self.mean) / self.std
        total = x.new_zeros(())
        for (start, stop), lin in zip(CUTS, self.lins):
            block = self.features[start:stop]
            x, y = block(x), block(y)
            diff = (_unit(x) - _unit(y)) ** 2
            total = total + lin(diff).mean()
        return 2 * total


def _unit(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.norm(dim=1, keepdim=True) + eps)


def load_lpips(path: str | Path) -> tuple[LPIPS, str]:
    """The official LPIPS from ``path`` (see the module's docstring) and the file's
    sha256; a missing, unreadable or wrong file is a one-line MedtxError."""
    path = Path(path)
    where = f"pumit lpips_weights {path}"
    state, digest = read_state_file(path, where)
    model = LPIPS()
    try:
        model.load_official(state)
    except (KeyError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise MedtxError(
            f"{where}: not VGG-16 features + LPIPS lin layers ({type(err).__name__}: {first})"
        ) from err
    got = lin_digest([p for lin in model.lins for p in lin.parameters()])
    if got != LIN_SHA256:
        raise MedtxError(
            f"{where}: its lin layers are not the official vgg.pth's "
            f"(sha256 {got[:12]}..., expected {LIN_SHA256[:12]}...)"
        )
    return model, digest


def merge_lpips_weights(vgg16: str | Path, lin: str | Path, out: str | Path) -> str:
    """Write the file ``load_lpips`` takes from torchvision's ``vgg16-397923af.pth``
    and LPIPS' ``vgg.pth``; returns its sha256 (record it in the config's notes)."""
    state = {
        k: v
        for k, v in torch.load(vgg16, map_location="cpu", weights_only=True).items()
        if k.startswith("features.")
    }
    state.update(torch.load(lin, map_location="cpu", weights_only=True))
    torch.save(state, out)
    return sha256(out)
