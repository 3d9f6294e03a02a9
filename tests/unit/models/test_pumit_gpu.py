"""PUMIT on CUDA (``pytest -m gpu``): each stage's training step (fine-tuning's three
tasks, the tokenizer, masked image modelling) runs under the trainer's deterministic
kernels, twice to the same weights, and under bf16 autocast its loss is finite and
near float32's. The PUMIT tiny preset at half the paper's size; skipped without a GPU.
"""

import copy
import os
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtx.models.pumit import tokenizer as pumit_tokenizer
from medtx.models.pumit.mim import MimHead, soft_cross_entropy
from medtx.models.pumit.model import build_model, pad_to_multiple
from medtx.models.pumit.sac import Grid
from medtx.models.pumit.tokenizer import TOKENIZER_SIZES, Tokenizer, tokenizer_loss
from medtx.models.pumit.vit import PATCH, random_token_mask
from medtx.models.slice_transformer import TASK_DEFAULTS
from medtx.train.losses import cross_entropy, segmentation_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPE = (48, 57, 48)  # half the paper's 96x114x96: padded to 48x64x48, 3x4x3 tokens
BATCH = 2
ISOTROPIC = Grid(0)
# bf16 keeps 8 bits of mantissa: a loss of order 1 to about a percent
BF16 = {"rtol": 0.05, "atol": 0.02}

Loss = Callable[[nn.Module], Tensor]


@pytest.fixture
def deterministic() -> Iterator[None]:
    """The trainer's CUDA mode (``loop.set_cuda_determinism(True)``: deterministic
    algorithms without warn_only, cuDNN deterministic, cuBLAS's fixed workspace),
    then every flag as it was."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def train_step(model: nn.Module, loss_fn: Loss, amp: bool) -> Tensor:
    """One step as ``Trainer.step`` takes it: the loss under autocast (bf16 with
    ``amp``), zero_grad, backward, PUMIT's gradient clipping (0.5), AdamW (weight
    decay 0.05). Returns the loss (float32, on the host)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss = loss_fn(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
    torch.cuda.synchronize()
    return loss.detach().float().cpu()


def check_stage(model: nn.Module, loss_fn: Loss) -> None:
    """fp32 twice from the same weights: no op refused, the same loss and weights
    bit for bit; bf16 from them too: a finite loss near fp32's."""
    model = model.cuda()
    runs = [copy.deepcopy(model) for _ in range(3)]
    first, again = (train_step(m, loss_fn, amp=False) for m in runs[:2])
    assert torch.isfinite(first) and torch.equal(first, again)
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), f"{name} differs between two deterministic steps"
    if not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 is not supported on this GPU")
    bf16 = train_step(runs[2], loss_fn, amp=True)
    assert torch.isfinite(bf16)
    torch.testing.assert_close(bf16, first, **BF16)


def volumes(channels: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, channels, *SHAPE, generator=g).cuda()


@pytest.mark.parametrize("task", list(TASK_DEFAULTS))
def test_a_finetuning_step_is_deterministic_and_bf16_close(deterministic, task):
    torch.manual_seed(0)
    model = build_model("tiny", task)
    x = volumes(model.in_channels)
    g = torch.Generator().manual_seed(1)
    if task == "classification":
        target = torch.randint(0, model.num_outputs, (BATCH,), generator=g).cuda()
    elif task == "regression":
        target = torch.randn(BATCH, generator=g).cuda()  # standardized ages
    else:
        target = (torch.rand(BATCH, model.num_outputs, *SHAPE, generator=g) > 0.7).float().cuda()

    def loss_fn(m: nn.Module) -> Tensor:  # medtx.train.finetune's
        logits = m(x)
        if task == "classification":
            return cross_entropy(logits, target)
        if task == "regression":
            return F.l1_loss(logits[:, 0].float(), target)
        return segmentation_loss(logits, target)

    check_stage(model, loss_fn)


def test_a_tokenizer_step_is_deterministic_and_bf16_close(deterministic):
    """With its patch discriminator where the stage trains one (the adversarial
    term's and the discriminator's gradients, the loss's value the tokenizer's)."""
    torch.manual_seed(0)
    adversarial = getattr(pumit_tokenizer, "AdversarialTokenizer", None)
    if adversarial is None:
        model: nn.Module = Tokenizer(TOKENIZER_SIZES["tiny"])
    else:
        model = adversarial.build(TOKENIZER_SIZES["tiny"], 1)
    x = pad_to_multiple(volumes(1), ISOTROPIC, PATCH)

    def loss_fn(m: nn.Module) -> Tensor:  # medtx.train.mim.pretrain_tokenizer's
        if adversarial is None:
            recon, soft = m(x, ISOTROPIC)
            return tokenizer_loss(x, recon, soft, diversity=1.0, sharpness=0.2)
        _, _, parts = m.losses(x, ISOTROPIC, diversity=1.0, sharpness=0.2)
        both = parts["gan_term"] + parts["disc"]
        return parts["vq"] + (both - both.detach())

    check_stage(model, loss_fn)


def test_a_mim_step_is_deterministic_and_bf16_close(deterministic):
    torch.manual_seed(0)
    tokenizer = Tokenizer(TOKENIZER_SIZES["tiny"]).requires_grad_(False).eval()
    model = build_model("tiny", "classification")
    model.requires_grad_(False)
    model.vit.requires_grad_(True)
    model.mim_head = MimHead(model.vit.size.dim, tokenizer.quantizer.codebook.num_embeddings)
    model.tokenizer = tokenizer
    x = pad_to_multiple(volumes(1), ISOTROPIC, PATCH)
    tokens = 1
    for n in x.shape[2:]:
        tokens *= n // PATCH
    g = torch.Generator().manual_seed(2)
    mask = random_token_mask(BATCH, tokens, 0.55, generator=g).cuda()

    def loss_fn(m: nn.Module) -> Tensor:  # medtx.train.mim.pretrain_mim's
        with torch.no_grad():
            soft, _ = m.tokenizer.encode(x, ISOTROPIC)
        target = soft.probs.flatten(1, 3).float()
        out, _ = m.vit(x, ISOTROPIC, mask=mask)
        return soft_cross_entropy(m.mim_head(out[:, 1:]), target, mask)

    check_stage(model, loss_fn)
