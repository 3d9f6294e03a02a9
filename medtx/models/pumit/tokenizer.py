"""PUMIT's tokenizer as the authors built it: ``SimpleVQTokenizer`` and its VQGAN loss.

The official code (function2-llx/PUMIT at 67218a2: ``pumit/tokenizer/simple.py``,
``conf/tokenizer/simple/model.yaml``) builds, for the released tokenizer:

- encoder: a SAC convolution of kernel = stride = 4 to ``channels[0]``, then one of
  kernel = stride = 2 per further width (total stride 16: one token per ViT patch),
  each followed by a channel LayerNorm and GELU; then two SAC 3x3x3 convolutions
  (to the last width, then to the quantizer's input width), each followed by
  GroupNorm(8) and LeakyReLU;
- ``SoftQuantizer`` (``quantize``): a distribution over ``codes`` codes per
  position and its expected embedding;
- decoder: two SAC 3x3x3 convolutions (code width -> last width -> last width) with
  GroupNorm(8) and LeakyReLU; per width, from the last, a SAC transposed convolution
  halving the width and doubling the size, then a 3x3x3 convolution, GroupNorm(8),
  LeakyReLU (``AdaptiveTransposedConvUpsample``); a SAC transposed convolution of
  stride 4 back to the input channels.

``base`` is the official configuration: widths 128/256/512, 1,024 codes of 512
dimensions (``official_parameter_count`` counts it, ``in_channels`` 3 as the
authors trained it on RGB-replicated images, 1 here). The official second decoder
convolution is declared with the code width as its input; it gets the last width,
which equals it in every official configuration: ours declares the last width
(same parameters).

The official training maps [0, 1] images to [-1, 1] (``2 x - 1``) before the
tokenizer, in tokenizer training and in MIM alike: ``encode`` takes the study's
[0, 1] volumes and applies it, ``decode`` maps back; the losses are computed on the
signed scale, as the official ones (``signed``).

The loss (``conf/tokenizer/simple/loss.yaml``, ``pumit/tokenizer/loss.py``):
L1 + ``quant_weight`` (1) x Σ p̄ log p̄ + ``entropy_weight`` (0.2) x mean per-token
entropy (``tokenizer_loss``; our config keys ``diversity`` and ``sharpness``) +
LPIPS (weight 1, on at most 24 random axial slices per volume; only with the VGG
weights file, ``medtx.models.pumit.lpips``) + ``gan_weight`` (3e-3) x the
generator's adversarial term, switched on while the discriminator's loss is low
(``AdversarialTokenizer``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from medtx.models.pumit.discriminator import PatchDiscriminator, disc_loss, generator_adversarial
from medtx.models.pumit.quantize import SoftQuantizer, SoftTokens, prior_terms
from medtx.models.pumit.sac import Grid, SACConv3d, SACConvTranspose3d

PATCH = 16  # the tokenizer's total stride: the ViT's patch
GROUPS = 8  # the official tokenizer's GroupNorm(8, ·)


@dataclass(frozen=True)
class TokenizerSize:
    """The official ``SimpleVQTokenizer``'s widths (``downsample_layer_channels`` =
    ``upsample_layer_channels``), the codebook's size and width, the discriminator's
    ``layer_channels``, and the first layer's stride."""

    channels: tuple[int, ...]
    codes: int
    code_dim: int
    discriminator: tuple[int, ...]
    start_stride: int = 4


# base: the official tokenizer and discriminator; tiny: same structure, trains on a CPU.
TOKENIZER_SIZES = {
    "base": TokenizerSize((128, 256, 512), 1024, 512, (128, 256, 512)),
    "tiny": TokenizerSize((8, 16, 32), 64, 32, (16, 16, 32)),
}


def signed(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1], the official tokenizer's input scale."""
    return 2 * x - 1


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, ...) (the official ``LayerNormNd``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class SACSequential(nn.ModuleList):
    """Layers in order; SAC layers (and nested ``SACSequential``) take and give the
    grid, the others the tensor only."""

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
        for layer in self:
            if isinstance(layer, (SACConv3d, SACConvTranspose3d, SACSequential)):
                x, grid = layer(x, grid)
            else:
                x = layer(x)
        return x, grid


def _conv_block(a: int, b: int) -> list[nn.Module]:
    """SAC 3x3x3 convolution, GroupNorm(8), LeakyReLU."""
    return [SACConv3d(a, b, 3), nn.GroupNorm(GROUPS, b), nn.LeakyReLU()]


class Tokenizer(nn.Module):
    """The official ``SimpleVQTokenizer``: (B, C, D, H, W) in [0, 1], any spacing ->
    soft tokens on the ViT's patch grid, and back."""

    def __init__(self, size: TokenizerSize, in_channels: int = 1):
        super().__init__()
        ch = size.channels
        stride = size.start_stride << (len(ch) - 1)
        if stride != PATCH or size.start_stride < 2:
            raise ValueError(f"a tokenizer's stride must be {PATCH}, not {stride} ({size})")
        if any(c % GROUPS for c in (*ch, size.code_dim)):
            raise ValueError(f"tokenizer widths must be multiples of {GROUPS}: {size}")
        self.size = size
        enc: list[nn.Module] = []
        for i, (a, b) in enumerate(zip((in_channels, *ch), ch)):
            s = size.start_stride if i == 0 else 2
            enc += [SACConv3d(a, b, s, stride=s), ChannelLayerNorm(b), nn.GELU()]
        enc += _conv_block(ch[-1], ch[-1]) + _conv_block(ch[-1], size.code_dim)
        self.encoder = SACSequential(enc)
        self.quantizer = SoftQuantizer(size.code_dim, size.codes, size.code_dim)
        dec: list[nn.Module] = _conv_block(size.code_dim, ch[-1]) + _conv_block(ch[-1], ch[-1])
        for i in reversed(range(len(ch) - 1)):
            dec.append(
                SACSequential([SACConvTranspose3d(ch[i + 1], ch[i], 2), *_conv_block(ch[i], ch[i])])
            )
        dec.append(SACConvTranspose3d(ch[0], in_channels, size.start_stride))
        self.decoder = SACSequential(dec)

    def encode(self, x: Tensor, grid: Grid) -> tuple[SoftTokens, Grid]:
        """``x`` in [0, 1] -> its soft tokens and their grid."""
        z, g = self.encoder(signed(x), grid)
        return self.quantizer(z), g

    def decode(self, tokens: Tensor, grid: Grid) -> Tensor:
        """Token embeddings (B, code_dim, *grid) -> the volume, in [0, 1]'s scale."""
        out, _ = self.decoder(tokens, grid)
        return (out + 1) / 2

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, SoftTokens]:
        """(reconstruction, soft tokens)."""
        soft, g = self.encode(x, grid)
        return self.decode(soft.tokens, g), soft


def official_parameter_count(size: TokenizerSize, in_channels: int) -> dict[str, int]:
    """Parameters of the official ``SimpleVQTokenizer`` (``tokenizer``, with its
    quantizer) and ``SimplePatchDiscriminator`` (``discriminator``) of these widths,
    counted layer by layer from the official code (a conv: c_in x c_out x k^3 + c_out;
    LayerNorm, GroupNorm: 2 c)."""

    def conv(a: int, b: int, k: int, bias: bool = True) -> int:
        return a * b * k**3 + (b if bias else 0)

    ch, s0, e = size.channels, size.start_stride, size.code_dim
    tok = 0
    for i, (a, b) in enumerate(zip((in_channels, *ch), ch)):
        tok += conv(a, b, s0 if i == 0 else 2) + 2 * b  # conv, LayerNormNd
    tok += conv(ch[-1], ch[-1], 3) + 2 * ch[-1] + conv(ch[-1], e, 3) + 2 * e
    tok += e * size.codes + size.codes + size.codes * e  # proj (Linear), embedding
    tok += conv(e, ch[-1], 3) + 2 * ch[-1] + conv(ch[-1], ch[-1], 3) + 2 * ch[-1]
    for i in range(len(ch) - 1):  # AdaptiveTransposedConvUpsample
        tok += conv(ch[i + 1], ch[i], 2) + conv(ch[i], ch[i], 3) + 2 * ch[i]
    tok += conv(ch[0], in_channels, s0)
    d = size.discriminator
    disc = 0
    for a, b in zip((in_channels, *d), d):
        disc += conv(a, b, 3) + 2 * b
    disc += conv(d[-1], d[-1], 3) + 2 * d[-1] + conv(d[-1], 1, 3)
    return {"tokenizer": tok, "discriminator": disc}


def tokenizer_loss(
    x: Tensor,
    recon: Tensor,
    soft: SoftTokens,
    *,
    diversity: float = 1.0,
    sharpness: float = 0.2,
    all_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The official ``vq_loss`` without its perceptual term: L1 of the signed volumes
    + ``diversity`` (official ``quant_weight``, 1) x Σ p̄ log p̄ + ``sharpness``
    (official ``entropy_weight``, 0.2) x the mean per-token entropy.

    ``all_sum``: under data parallelism, the diversity's p̄ over every process's
    positions (``quantize.prior_terms``)."""
    div, sharp = (
        (soft.diversity, soft.sharpness)
        if all_sum is None
        else prior_terms(soft.probs, soft.logits, all_sum)
    )
    return (signed(recon) - signed(x)).abs().mean() + diversity * div + sharpness * sharp


def perceptual_loss(
    lpips: nn.Module,
    x: Tensor,
    recon: Tensor,
    generators: Sequence[torch.Generator] | None,
    max_slices: int = 24,
) -> Tensor:
    """The official perceptual term: LPIPS over axial slices, at most ``max_slices``
    per volume drawn without replacement (one generator per volume, as the official
    ``multinomial`` of ones; all slices when ``generators`` is None, the official
    eval), the channel replicated to RGB as the official data are."""
    depth = x.shape[2]
    if generators is not None and depth > max_slices:
        picks = torch.stack([torch.randperm(depth, generator=g)[:max_slices] for g in generators])
        index = picks.to(x.device)[:, None, :, None, None].expand(
            -1, x.shape[1], -1, x.shape[3], x.shape[4]
        )
        x, recon = x.gather(2, index), recon.gather(2, index)

    def planes(t: Tensor) -> Tensor:
        t = signed(t).movedim(2, 1).flatten(0, 1)  # (B·D, C, H, W)
        return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t

    return lpips(planes(x), planes(recon))


@dataclass(frozen=True)
class GanSettings:
    """The official adversarial settings: ``gan_weight`` (loss.yaml, 3e-3, not
    adaptive), the switch ``use_gan_th`` (0.025) on the discriminator loss's EMA
    (``disc_loss_momentum`` 0.9, from ``disc_loss_ema_init`` 0.1), main.yaml."""

    weight: float = 3e-3
    threshold: float = 0.025
    momentum: float = 0.9
    ema_init: float = 0.1


class AdversarialTokenizer(nn.Module):
    """The tokenizer stage's model: ``tokenizer``, ``discriminator`` and the GAN
    switch's state, as buffers (in the state dict, so a resumed run continues it):
    ``disc_loss_ema``, ``disc_loss_last`` (the last step's discriminator loss, +inf
    before the first) and ``gan_on`` (whether the last step used the GAN term).

    ``losses`` computes the official generator and discriminator steps of one batch
    in one graph. The official loop (scripts/tokenizer/main.py) computes the
    generator loss with the discriminator frozen, steps the generator, then computes
    the discriminator loss on the same batch's detached reconstruction (made before
    the generator's step) and steps the discriminator: both gradients are taken at
    the parameters before either step. Here the adversarial term calls the
    discriminator with detached parameters (``torch.func.functional_call``), so its
    gradient reaches the tokenizer alone, and the discriminator's loss sees detached
    volumes, so its gradient reaches the discriminator alone: one backward of their
    sum gives each the gradient of its official step, and one optimizer step (the
    discriminator's group at 10x the rate: 1e-3 vs 1e-4) takes both.

    The switch is the official one: the GAN term is on in a step when
    max(EMA, last loss) <= ``threshold``, both from the steps before; after it
    last = the discriminator's loss averaged over the processes (``all_sum``) and
    EMA = momentum x EMA + (1 - momentum) x last. The discriminator trains at every
    step, as in the official loop.
    """

    disc_loss_ema: Tensor
    disc_loss_last: Tensor
    gan_on: Tensor

    def __init__(
        self,
        tokenizer: Tokenizer,
        discriminator: PatchDiscriminator,
        gan: GanSettings = GanSettings(),
    ):
        super().__init__()
        self.tokenizer, self.discriminator, self.gan = tokenizer, discriminator, gan
        self.register_buffer("disc_loss_ema", torch.tensor(gan.ema_init, dtype=torch.float64))
        self.register_buffer("disc_loss_last", torch.tensor(float("inf"), dtype=torch.float64))
        self.register_buffer("gan_on", torch.tensor(False))

    @classmethod
    def build(
        cls, size: TokenizerSize, in_channels: int = 1, gan: GanSettings = GanSettings()
    ) -> AdversarialTokenizer:
        return cls(
            Tokenizer(size, in_channels), PatchDiscriminator(in_channels, size.discriminator), gan
        )

    def switch(self) -> Tensor:
        """Whether the next step uses the GAN term (a bool tensor; no host sync)."""
        return torch.maximum(self.disc_loss_ema, self.disc_loss_last) <= self.gan.threshold

    def losses(
        self,
        x: Tensor,
        grid: Grid,
        *,
        diversity: float = 1.0,
        sharpness: float = 0.2,
        all_sum: Callable[[Tensor], Tensor] | None = None,
        share: tuple[int, int] | None = None,
        lpips: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        generators: Sequence[torch.Generator] | None = None,
        update: bool = True,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(generator loss, discriminator loss, their parts) of a batch ``x`` in [0, 1];
        parts: ``rec``, ``diversity``, ``sharpness``, ``perceptual`` (with ``lpips``),
        ``vq`` (their weighted sum, the official ``vq_loss``), ``gan`` (the generator's
        adversarial term), ``gan_term`` (weighted and switched), ``disc``.

        ``all_sum``/``share`` (this process's volumes, the global batch's): under data
        parallelism the diversity's p̄ and the discriminator loss that drives the
        switch are the global batch's. ``lpips``: the perceptual term, on slices drawn
        from ``generators`` (one per volume). ``update``: advance the switch's state
        (the EMA) with this batch's discriminator loss."""
        recon, soft = self.tokenizer(x, grid)
        xs, rs = signed(x), signed(recon)
        parts: dict[str, Tensor] = {}
        parts["rec"] = (rs - xs).abs().mean()
        div, sharp = (
            (soft.diversity, soft.sharpness)
            if all_sum is None
            else prior_terms(soft.probs, soft.logits, all_sum)
        )
        parts["diversity"], parts["sharpness"] = div, sharp
        gen = parts["rec"] + diversity * div + sharpness * sharp
        if lpips is not None:
            parts["perceptual"] = perceptual_loss(lpips, x, recon, generators)
            gen = gen + perceptual_weight * parts["perceptual"]
        parts["vq"] = gen  # the official vq_loss
        on = self.switch()
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        parts["gan"] = generator_adversarial(
            functional_call(self.discriminator, frozen, (rs, grid))
        )
        # always computed (as the official, which logs it): its weight is 0 while off
        parts["gan_term"] = self.gan.weight * on.to(parts["gan"].dtype) * parts["gan"]
        disc = disc_loss(self.discriminator(xs, grid), self.discriminator(rs.detach(), grid))
        parts["disc"] = disc
        if update:
            self.advance(disc.detach(), on, all_sum, share)
        return gen + parts["gan_term"], disc, parts

    @torch.no_grad()
    def advance(
        self,
        disc: Tensor,
        on: Tensor,
        all_sum: Callable[[Tensor], Tensor] | None = None,
        share: tuple[int, int] | None = None,
    ) -> None:
        """After a step whose discriminator loss was ``disc`` (this process's mean)
        and whose switch was ``on``: the official all-reduced mean and EMA."""
        value = disc.to(torch.float64)
        if all_sum is not None:
            if share is None:
                raise ValueError("all_sum needs share: (this process's volumes, the batch's)")
            local, volumes = share
            value = all_sum((value * local).reshape(1))[0] / volumes
        m = self.gan.momentum
        self.disc_loss_last.copy_(value)
        self.disc_loss_ema.mul_(m).add_((1 - m) * value)
        self.gan_on.copy_(on)
