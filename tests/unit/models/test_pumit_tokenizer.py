"""The tokenizer, its discriminator and masked image modelling: the official layout
(function2-llx/PUMIT at 67218a2) and parameter count, shapes for any spacing, the
GAN's gradients and switch, the perceptual term, the soft cross-entropy by hand, and
both objectives falling on crops of a real head."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medtx.data.demo import template
from medtx.errors import MedtxError
from medtx.models.pumit import lpips as lpips_module
from medtx.models.pumit.discriminator import SACStridedConv3d
from medtx.models.pumit.lpips import LIN_CHANNELS, LPIPS, lin_digest, load_lpips
from medtx.models.pumit.mim import MimHead, soft_cross_entropy
from medtx.models.pumit.sac import Grid, SACConv3d, SACConvTranspose3d
from medtx.models.pumit.tokenizer import (
    TOKENIZER_SIZES,
    AdversarialTokenizer,
    GanSettings,
    Tokenizer,
    official_parameter_count,
    perceptual_loss,
    tokenizer_loss,
)
from medtx.models.pumit.vit import VIT_SIZES, UniversalViT, random_token_mask

# Parameters of the official SimpleVQTokenizer and SimplePatchDiscriminator built from
# conf/tokenizer/simple/{model,loss}.yaml (in_channels 3, as the authors trained them),
# counted by instantiating the official classes.
OFFICIAL_BASE_RGB = {"tokenizer": 34_253_955, "discriminator": 11_529_985}


def crops(n, size=32, seed=0):
    """n random size^3 crops of the ICBM head (1 mm), scaled to [0, 1]."""
    t1 = template().t1
    t1 = (t1 - t1.min()) / (np.percentile(t1, 99.5) - t1.min())
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        corner = [rng.integers(20, s - size - 20) for s in t1.shape]
        out.append(t1[tuple(slice(c, c + size) for c in corner)])
    return torch.from_numpy(np.clip(np.stack(out), 0, 1)[:, None]).float()


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_base_is_the_official_tokenizer_and_discriminator():
    size = TOKENIZER_SIZES["base"]
    assert (size.channels, size.codes, size.code_dim) == ((128, 256, 512), 1024, 512)
    assert size.discriminator == (128, 256, 512) and size.start_stride == 4
    assert official_parameter_count(size, 3) == OFFICIAL_BASE_RGB
    for channels in (3, 1):  # the authors' RGB-replicated input; ours
        model = AdversarialTokenizer.build(size, channels)
        want = official_parameter_count(size, channels)
        assert count(model.tokenizer) == want["tokenizer"]
        assert count(model.discriminator) == want["discriminator"]
    tok = model.tokenizer
    # encoder: stride 4, then 2 and 2 (total 16); LayerNorm + GELU after each
    convs = [m for m in tok.encoder if isinstance(m, SACConv3d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (1, 128, 4),
        (128, 256, 2),
        (256, 512, 2),
        (512, 512, 1),
        (512, 512, 1),
    ]
    assert [type(m).__name__ for m in tok.encoder][:3] == ["SACConv3d", "ChannelLayerNorm", "GELU"]
    assert [type(m).__name__ for m in tok.encoder][-3:] == ["SACConv3d", "GroupNorm", "LeakyReLU"]
    assert tok.quantizer.proj.weight.shape == (1024, 512)
    assert tok.quantizer.codebook.weight.shape == (1024, 512)
    ups = [m for m in tok.decoder.modules() if isinstance(m, SACConvTranspose3d)]
    assert [(u.in_channels, u.out_channels, u.stride[0]) for u in ups] == [
        (512, 256, 2),
        (256, 128, 2),
        (128, 1, 4),
    ]
    strided = [m for m in model.discriminator.layers if isinstance(m, SACStridedConv3d)]
    assert [(c.in_channels, c.out_channels) for c in strided] == [(1, 128), (128, 256), (256, 512)]


def test_tiny_has_the_same_structure():
    tiny = TOKENIZER_SIZES["tiny"]
    model = AdversarialTokenizer.build(tiny)
    assert count(model.tokenizer) == official_parameter_count(tiny, 1)["tokenizer"]
    assert count(model.discriminator) == official_parameter_count(tiny, 1)["discriminator"]
    base = AdversarialTokenizer.build(TOKENIZER_SIZES["base"])
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]


@pytest.mark.parametrize(
    "spacing,shape",
    [
        ((1.0, 1.0, 1.0), (32, 32, 32)),
        ((3.0, 1.0, 1.0), (16, 32, 32)),
        ((1.0, 1.0, 1.0), (1, 32, 32)),
    ],
)
def test_the_tokenizer_reconstructs_any_spacing_on_the_vits_patch_grid(spacing, shape):
    torch.manual_seed(0)
    model = AdversarialTokenizer.build(TOKENIZER_SIZES["tiny"])
    vit = UniversalViT(VIT_SIZES["tiny"])
    x = torch.rand(2, 1, *shape)
    grid = Grid.of(spacing, shape[0])
    recon, soft = model.tokenizer(x, grid)
    assert recon.shape == x.shape
    _, tokens_grid = vit(x, grid)
    assert tuple(soft.probs.shape[1:4]) == tokens_grid  # one soft token per ViT patch
    assert soft.probs.shape[-1] == 64
    scores = model.discriminator(2 * x - 1, grid)
    assert scores.shape[:2] == (2, 1) and scores.shape[3:] == (4, 4)


def test_a_strided_discriminator_conv_on_thick_slices_convolves_each_slice():
    """Owed in-plane halvings: no depth stride, the kernel summed over depth."""
    torch.manual_seed(0)
    conv = SACStridedConv3d(2, 3)
    x = torch.randn(1, 2, 4, 8, 8)
    y, grid = conv(x, Grid(2))
    assert y.shape == (1, 3, 4, 4, 4) and grid == Grid(2, 1)
    w2d = conv.weight.sum(dim=2)
    for d in range(4):
        torch.testing.assert_close(y[:, :, d], F.conv2d(x[:, :, d], w2d, conv.bias, 2, 1))
    y, grid = conv(x, Grid(0))  # isotropic: a plain 3D convolution of stride 2
    torch.testing.assert_close(y, F.conv3d(x, conv.weight, conv.bias, 2, 1))


def grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_each_player_gets_the_gradient_of_its_own_loss_only():
    """One backward of generator + discriminator loss: the tokenizer's gradient is the
    generator loss's (the adversarial term through a frozen discriminator), the
    discriminator's is its hinge loss's (on a detached reconstruction)."""
    torch.manual_seed(0)
    model = AdversarialTokenizer.build(TOKENIZER_SIZES["tiny"])
    model.disc_loss_ema.fill_(0.0)
    model.disc_loss_last.fill_(0.0)  # the GAN term on
    x = torch.rand(2, 1, 32, 32, 32)

    def backward(which):
        model.zero_grad(set_to_none=True)
        gen, disc, parts = model.losses(x, Grid(0), update=False)
        assert float(parts["gan_term"].detach()) == pytest.approx(
            3e-3 * float(parts["gan"].detach())
        )
        {"gen": gen, "disc": disc, "both": gen + disc}[which].backward()
        return grads(model.tokenizer), grads(model.discriminator)

    tok_gen, disc_gen = backward("gen")
    tok_disc, disc_disc = backward("disc")
    tok_both, disc_both = backward("both")
    assert all(g is None for g in disc_gen)  # the adversarial term leaves D alone
    assert all(g is None for g in tok_disc)  # D's loss leaves the tokenizer alone
    assert all(g is not None and g.abs().sum() > 0 for g in disc_disc)
    assert all(g is not None for g in tok_gen)
    for a, b in zip(tok_both, tok_gen):
        torch.testing.assert_close(a, b)
    for a, b in zip(disc_both, disc_disc):
        torch.testing.assert_close(a, b)


def test_the_adversarial_term_moves_the_tokenizer_as_the_official_one():
    """Its gradient is the official -mean D(recon) one, D frozen, times gan_weight."""
    torch.manual_seed(0)
    model = AdversarialTokenizer.build(TOKENIZER_SIZES["tiny"])
    model.disc_loss_ema.fill_(0.0)
    model.disc_loss_last.fill_(0.0)
    x = torch.rand(1, 1, 32, 32, 32)
    _, _, parts = model.losses(x, Grid(0), update=False)
    (g_ours,) = torch.autograd.grad(parts["gan_term"], model.tokenizer.quantizer.codebook.weight)
    model.discriminator.requires_grad_(False)  # the official generator step
    recon, _ = model.tokenizer(x, Grid(0))
    official = -model.discriminator(2 * recon - 1, Grid(0)).mean() * 3e-3
    (g_official,) = torch.autograd.grad(official, model.tokenizer.quantizer.codebook.weight)
    torch.testing.assert_close(g_ours, g_official)


def official_switch(disc_losses, th=0.025, momentum=0.9, ema=0.1):
    """scripts/tokenizer/main.py's loop: use_gan per step, from the steps before."""
    item, used = math.inf, []
    for loss in disc_losses:
        used.append(max(ema, item) <= th)
        item = loss
        ema = ema * momentum + item * (1 - momentum)
    return used, ema


def test_the_gan_switch_follows_the_official_ema_threshold():
    model = AdversarialTokenizer.build(TOKENIZER_SIZES["tiny"])
    losses = [0.5, 0.02, 0.01, 0.0, 0.0, 0.03] + [0.0] * 20 + [0.04, 0.0]
    used = []
    for loss in losses:
        on = model.switch()
        used.append(bool(on))
        model.advance(torch.tensor(loss, dtype=torch.float64), on)
        assert bool(model.gan_on) == used[-1]
        assert float(model.disc_loss_last) == loss
    want, ema = official_switch(losses)
    assert used == want and any(want) and not all(want)
    assert float(model.disc_loss_ema) == pytest.approx(ema, rel=1e-12)


def test_the_switch_sees_the_discriminator_loss_of_the_whole_batch():
    """Two processes (all_sum doubling a rank's weighted loss) give one's EMA."""
    alone = AdversarialTokenizer.build(TOKENIZER_SIZES["tiny"])
    two = AdversarialTokenizer.build(TOKENIZER_SIZES["tiny"])
    loss = torch.tensor(0.3, dtype=torch.float64)
    alone.advance(loss, torch.tensor(False))
    # rank shares 2 + 1 of 3 volumes: losses 0.3 on both (the all_sum of 2 x 0.3 + 1 x 0.3)
    two.advance(loss, torch.tensor(False), lambda t: t * 1.5, share=(2, 3))
    assert float(two.disc_loss_ema) == pytest.approx(float(alone.disc_loss_ema), rel=1e-12)
    assert float(alone.disc_loss_ema) == pytest.approx(0.9 * 0.1 + 0.1 * 0.3, rel=1e-12)
    with pytest.raises(ValueError, match="share"):
        two.advance(torch.tensor(0.3), torch.tensor(False), lambda t: t)


def test_the_switch_state_is_in_the_state_dict():
    model = AdversarialTokenizer.build(TOKENIZER_SIZES["tiny"], gan=GanSettings(threshold=1.0))
    state = model.state_dict()
    assert float(state["disc_loss_ema"]) == 0.1 and state["disc_loss_last"].isinf()
    assert not bool(state["gan_on"]) and not bool(model.switch())
    model.advance(torch.tensor(0.5), model.switch())
    other = AdversarialTokenizer.build(TOKENIZER_SIZES["tiny"], gan=GanSettings(threshold=1.0))
    other.load_state_dict(model.state_dict())
    assert bool(other.switch())  # max(0.14, 0.5) <= 1
    assert float(other.disc_loss_ema) == float(model.disc_loss_ema)


def random_lpips_file(path, digest_ok=True):
    torch.manual_seed(0)
    net = LPIPS()
    state = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's other keys: ignored
    for i, c in enumerate(LIN_CHANNELS):
        state[f"lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1) / c
    torch.save(state, path)
    lins = [state[f"lin{i}.model.1.weight"] for i in range(len(LIN_CHANNELS))]
    return lin_digest(lins)


def test_lpips_weights_are_checked_and_refused_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(MedtxError, match=r"lpips_weights .*no such file$"):
        load_lpips(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedtxError, match="cannot read it") as err:
        load_lpips(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "partial.pt")
    with pytest.raises(MedtxError, match="not VGG-16 features"):
        load_lpips(tmp_path / "partial.pt")
    digest = random_lpips_file(tmp_path / "lpips.pt")
    with pytest.raises(MedtxError, match="not the official vgg.pth"):
        load_lpips(tmp_path / "lpips.pt")
    monkeypatch.setattr(lpips_module, "LIN_SHA256", digest)
    net, sha = load_lpips(tmp_path / "lpips.pt")
    assert len(sha) == 64 and not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert float(net(x, x)) == 0.0 and float(net(x, -x)) > 0


def test_the_perceptual_term_takes_at_most_24_slices_per_volume(tmp_path, monkeypatch):
    monkeypatch.setattr(lpips_module, "LIN_SHA256", random_lpips_file(tmp_path / "w.pt"))
    net, _ = load_lpips(tmp_path / "w.pt")
    seen = []

    def spy(a, b):
        seen.append((a.shape, b.shape))
        return net(a, b)

    x, recon = torch.rand(2, 1, 30, 16, 16), torch.rand(2, 1, 30, 16, 16)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    first = perceptual_loss(spy, x, recon, gens)
    assert seen[-1][0] == (48, 3, 16, 16)  # 24 slices x 2 volumes, grey -> RGB
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    torch.testing.assert_close(perceptual_loss(spy, x, recon, gens), first)  # per volume
    perceptual_loss(spy, x, recon, None)  # no generators (evaluation): every slice
    assert seen[-1][0] == (60, 3, 16, 16)


def test_soft_cross_entropy_is_the_hard_one_for_one_hot_targets_and_masks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    hard = F.cross_entropy(logits[mask], labels[mask])
    soft = soft_cross_entropy(logits, F.one_hot(labels, 7).float(), mask)
    torch.testing.assert_close(soft, hard)


@pytest.mark.slow
def test_tokenizer_and_mim_objectives_fall_on_crops_of_a_real_head():
    torch.manual_seed(0)
    data = crops(8)
    grid = Grid(0)
    tokenizer = Tokenizer(TOKENIZER_SIZES["tiny"])
    opt = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)

    def l1() -> float:  # over all 8 crops
        with torch.no_grad():
            return float((tokenizer(data, grid)[0] - data).abs().mean())

    first = l1()
    for step in range(40):
        batch = data[step % 2 * 4 : step % 2 * 4 + 4]
        recon, soft = tokenizer(batch, grid)
        loss = tokenizer_loss(batch, recon, soft)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = l1()
    assert last < 0.75 * first, (first, last)  # 0.269 -> 0.182 when written

    tokenizer.eval().requires_grad_(False)
    vit = UniversalViT(VIT_SIZES["tiny"])
    head = MimHead(64, 64)
    opt = torch.optim.Adam([*vit.parameters(), *head.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    halves = [data[:4], data[4:]]
    with torch.no_grad():  # the frozen tokenizer's targets, once per batch
        targets = [tokenizer.encode(half, grid)[0].probs.flatten(1, 3) for half in halves]
    entropies = [-(t * t.log()).sum(-1) for t in targets]
    gaps = []  # the soft cross-entropy above its floor, the targets' entropy: a KL
    for step in range(200):
        batch, target = halves[step % 2], targets[step % 2]
        mask = random_token_mask(4, target.shape[1], 0.55, gen)
        out, _ = vit(batch, grid, mask)
        loss = soft_cross_entropy(head(out[:, 1:]), target, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gaps.append(float(loss.detach()) - float(entropies[step % 2][mask].mean()))
    early, late = np.mean(gaps[:20]), np.mean(gaps[-20:])
    print(f"tokenizer L1 {first:.3f} -> {last:.3f}; MIM KL {early:.3f} -> {late:.3f}")
    assert late < 0.5 * early, (early, late)
