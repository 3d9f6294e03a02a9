"""Training steps run no op that CUDA refuses under torch.use_deterministic_algorithms(True).

Each step (forward, loss, backward) is recorded on the CPU with ``OpRecorder`` and
checked against ``CUDA_THROWS``: a GPU run would otherwise find such an op only when
it raises, on the cluster. Tiny models and volumes: the ops, not the sizes, matter.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medtx.models import pretext
from medtx.models import slice_transformer as st
from medtx.models.pumit import model as pumit
from medtx.models.pumit import vit as pumit_vit
from medtx.models.pumit.mim import MimHead, soft_cross_entropy
from medtx.models.pumit.sac import Grid
from medtx.models.pumit.tokenizer import TOKENIZER_SIZES, Tokenizer, tokenizer_loss
from medtx.models.pumit.vit import VIT_SIZES, UniversalViT, random_token_mask, resample_pos_embed
from medtx.train.determinism import (
    CPU_STANDS_FOR,
    CUDA_THROWS,
    OpRecorder,
    cuda_determinism_problems,
    record_ops,
)
from medtx.train.losses import cross_entropy, segmentation_loss

pytestmark = pytest.mark.distributed

MT_SHAPE = (12, 14, 10)  # three different sizes; the real volume is 96 x 114 x 96
# padded to 32 x 48 x 32 for the ViT: a 2 x 3 x 2 token grid, not the 4^3 position grid
PUMIT_SHAPE = (20, 33, 17)
ISOTROPIC = Grid(0)


def finetune_loss(task: str, out: torch.Tensor) -> torch.Tensor:
    """The fine-tuning losses of ``medtx.train.finetune`` for a batch of two."""
    if task == "classification":
        return cross_entropy(out, torch.tensor([0, 2]))
    if task == "regression":
        return F.l1_loss(out[:, 0], torch.tensor([-0.5, 0.5]))
    return segmentation_loss(out, (torch.rand_like(out) > 0.5).float())


def finetune_step(backbone: str, task: str):
    if backbone == "mt":
        model = st.build_model("table3", task)
        x = torch.rand(2, model.in_channels, *MT_SHAPE)
    else:
        model = pumit.build_model("tiny", task)
        x = torch.rand(2, model.in_channels, *PUMIT_SHAPE)
    return lambda: finetune_loss(task, model(x)).backward()


def exemplar_step():
    """Stage 1, and the lookup ``curve_lookup`` runs off the CPU (``_search_lookup``)."""
    model = st.build_model("table3", "classification")
    volumes = torch.rand(2, 1, *MT_SHAPE)
    rng = np.random.default_rng(0)
    xs, ys = (np.stack(c)[None] for c in zip(*(pretext.draw_intensity_curve(rng) for _ in "ab")))
    segments = torch.from_numpy(pretext._segments(xs, ys))

    def step():
        pretext.exemplar_loss(model, volumes, rng).backward()
        pretext._search_lookup(volumes[0].flatten(), segments[:, 0])

    return step


def masked_step():
    """Stage 2, and the masked MSE it takes off the CPU (``weighted_masked_mse``)."""
    model = st.build_model("table3", "classification")
    volumes = torch.rand(2, 1, *MT_SHAPE)
    pred = torch.randn(2, 5, 4, requires_grad=True)
    flags = torch.tensor([[True, False, False, True, False]] * 2)

    def step():
        gen = torch.Generator().manual_seed(0)
        pretext.masked_encoding_loss(model, volumes, generator=gen).backward()
        pretext.weighted_masked_mse(pred, torch.randn(2, 5, 4), flags).backward()

    return step


def tokenizer_step():
    tokenizer = Tokenizer(TOKENIZER_SIZES["tiny"])
    x = pumit.pad_to_multiple(torch.rand(2, 1, *PUMIT_SHAPE), ISOTROPIC, 16)

    def step():
        recon, soft = tokenizer(x, ISOTROPIC)
        tokenizer_loss(x, recon, soft).backward()

    return step


def mim_step():
    """``medtx.train.mim``'s stage 2: the frozen tokenizer's targets, the ViT masked."""
    tokenizer = Tokenizer(TOKENIZER_SIZES["tiny"]).requires_grad_(False)
    model = pumit.build_model("tiny", "classification")
    head = MimHead(model.vit.size.dim, TOKENIZER_SIZES["tiny"].codes)
    x = pumit.pad_to_multiple(torch.rand(2, 1, *PUMIT_SHAPE), ISOTROPIC, 16)

    def step():
        with torch.no_grad():
            soft, _ = tokenizer.encode(x, ISOTROPIC)
        target = soft.probs.flatten(1, 3).float()
        mask = random_token_mask(len(x), target.shape[1], 0.55, torch.Generator().manual_seed(0))
        out, _ = model.vit(x, ISOTROPIC, mask=mask)
        soft_cross_entropy(head(out[:, 1:]), target, mask).backward()

    return step


STEPS = {
    **{
        f"{backbone}-{task}": (lambda b=backbone, t=task: finetune_step(b, t))
        for backbone in ("mt", "pumit")
        for task in ("classification", "regression", "segmentation")
    },
    "mt-exemplar": exemplar_step,
    "mt-masked-encoding": masked_step,
    "pumit-tokenizer": tokenizer_step,
    "pumit-mim": mim_step,
}


@pytest.mark.parametrize("name", list(STEPS))
def test_a_training_step_runs_no_op_cuda_refuses(name):
    torch.manual_seed(0)
    ops = record_ops(STEPS[name]())
    assert "convolution_backward" in ops or "mm" in ops  # the backward was recorded
    assert cuda_determinism_problems(ops) == []


# ---------------------------------------------------------------------------- the check


def test_every_listed_name_is_an_aten_op():
    names = set(CUDA_THROWS) | set(CPU_STANDS_FOR)
    names |= {n for cuda in CPU_STANDS_FOR.values() for n in cuda}
    assert [n for n in sorted(names) if not hasattr(torch.ops.aten, n)] == []


TRILINEAR_PROBLEM = f"upsample_trilinear3d_backward: {CUDA_THROWS['upsample_trilinear3d_backward']}"


class Upsampler(torch.nn.Module):
    """A 1x1x1 convolution, then a trilinear upsampling to twice the size."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2, mode="trilinear")


def test_a_trilinear_interpolate_fails_the_check():
    model = Upsampler()
    ops = record_ops(lambda: model(torch.rand(1, 1, 3, 4, 5)).sum().backward())
    assert cuda_determinism_problems(ops) == [TRILINEAR_PROBLEM]


def test_attention_on_the_cpu_stands_for_cudas_kernels_none_of_which_raise():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    ops = record_ops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    assert set(CPU_STANDS_FOR) <= ops
    assert cuda_determinism_problems(ops) == []
    assert cuda_determinism_problems({"_scaled_dot_product_flash_attention_for_cpu"}) == []


def test_the_recorder_leaves_results_alone():
    x = torch.randn(4, 3)
    with OpRecorder() as recorder:
        y = x.softmax(dim=1)
    assert torch.equal(y, x.softmax(dim=1)) and "_softmax" in recorder.ops


def old_resample_pos_embed(pos, grid):
    """PUMIT's position embedding resampling before this change, verbatim."""
    return F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)


def vit_step(vit: UniversalViT, x: torch.Tensor, upstream: torch.Tensor):
    vit.zero_grad()
    out, _ = vit(x, ISOTROPIC)
    (out * upstream).sum().backward()
    return out.detach(), vit.pos_embed.grad.clone()


def test_the_old_pos_embed_resampling_fails_the_check_and_the_new_one_passes(monkeypatch):
    torch.manual_seed(0)
    vit = UniversalViT(VIT_SIZES["tiny"])
    x = torch.rand(2, 1, 32, 48, 32)  # tokens 2 x 3 x 2, position grid 4 x 4 x 4
    upstream = torch.randn(2, 1 + 12, 64)
    new_ops = record_ops(vit_step, vit, x, upstream)
    new_out, new_grad = vit_step(vit, x, upstream)
    monkeypatch.setattr(pumit_vit, "resample_pos_embed", old_resample_pos_embed)
    old_ops = record_ops(vit_step, vit, x, upstream)
    old_out, old_grad = vit_step(vit, x, upstream)
    assert cuda_determinism_problems(old_ops) == [TRILINEAR_PROBLEM]
    assert cuda_determinism_problems(new_ops) == []
    torch.testing.assert_close(new_out, old_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(new_grad, old_grad, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- numerics


@pytest.mark.parametrize(
    "grid",
    [(4, 4, 4), (2, 3, 2), (1, 1, 1), (3, 4, 5), (6, 7, 6), (8, 5, 2)],
    ids=["identity", "down", "single", "mixed", "up", "up-down"],
)
def test_pos_embed_resampling_is_interpolates(grid):
    g = torch.Generator().manual_seed(sum(grid))
    pos = torch.randn(1, 8, 4, 4, 4, generator=g)
    upstream = torch.randn(1, 8, *grid, generator=g)
    results = []
    for f in (resample_pos_embed, old_resample_pos_embed):
        leaf = pos.clone().requires_grad_(True)
        out = f(leaf, grid)
        (out * upstream).sum().backward()
        results.append((out.detach(), leaf.grad))
    (new, new_grad), (old, old_grad) = results
    assert new.shape == (1, 8, *grid)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_grad, old_grad, rtol=0, atol=1e-5)
    if grid == (4, 4, 4):
        assert resample_pos_embed(pos, grid) is pos and torch.equal(old, pos)


def test_pos_embed_resampling_stays_float32_under_autocast():
    pos = torch.randn(1, 8, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = resample_pos_embed(pos, (3, 5, 2))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, resample_pos_embed(pos, (3, 5, 2)), rtol=0, atol=0)
