"""Soft tokens: the expectation of the codebook, and the prior terms by hand, with
the official weights (conf/tokenizer/simple/loss.yaml at function2-llx/PUMIT 67218a2)."""

import math

import pytest
import torch

from medtx.models.pumit.quantize import SoftQuantizer, SoftTokens, prior_terms
from medtx.models.pumit.tokenizer import tokenizer_loss
from medtx.train.config import defaults


def test_a_soft_token_is_its_probabilities_times_the_codebook():
    torch.manual_seed(0)
    quantizer = SoftQuantizer(in_channels=6, num_codes=11, code_dim=5)
    z = torch.randn(2, 6, 3, 4, 2)
    out = quantizer(z)
    assert out.tokens.shape == (2, 5, 3, 4, 2) and out.probs.shape == (2, 3, 4, 2, 11)
    want = torch.einsum("bdhwk,kc->bcdhw", out.probs, quantizer.codebook.weight)
    torch.testing.assert_close(out.tokens, want)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(2, 3, 4, 2))
    out.tokens.sum().backward()  # differentiable without straight-through
    assert quantizer.proj.weight.grad is not None and quantizer.proj.weight.grad.abs().sum() > 0


def test_prior_terms_match_a_hand_computed_example():
    # two positions: logits (0, 0) -> (1/2, 1/2); (ln 3, 0) -> (3/4, 1/4)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    diversity, sharpness = prior_terms(logits.softmax(-1), logits)
    mean = (5 / 8, 3 / 8)  # the distribution of the code at a random position
    assert float(diversity) == pytest.approx(sum(p * math.log(p) for p in mean), rel=1e-12)
    entropy = (math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert float(sharpness) == pytest.approx(sum(entropy) / 2, rel=1e-12)


def test_even_sure_codes_minimise_both_terms():
    """Each position certain of its code, all codes used equally: diversity -ln K,
    sharpness 0, the two terms' minima."""
    k = 4
    logits = 50.0 * torch.eye(k, dtype=torch.float64)
    diversity, sharpness = prior_terms(logits.softmax(-1), logits)
    assert float(diversity) == pytest.approx(-math.log(k), rel=1e-12)
    assert float(sharpness) == pytest.approx(0.0, abs=1e-12)


def test_the_tokenizer_loss_is_the_official_vq_loss_on_a_hand_computed_example():
    """loss.yaml's quant_weight 1 on Σ p̄ log p̄ (negative entropy of the mean) and
    entropy_weight 0.2 on the mean per-token entropy, both added, plus the L1 of the
    volumes on the official [-1, 1] scale (twice the [0, 1] one)."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    probs = logits.softmax(-1)
    soft = SoftTokens(probs.T[None], probs, logits, *prior_terms(probs, logits))
    x = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    recon = torch.tensor([0.25, 0.5, 0.5], dtype=torch.float64)
    l1 = 2 * (0.25 + 0.0 + 0.5) / 3
    neg_entropy_of_mean = 5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8)
    mean_entropy = (math.log(2) - (0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 2
    want = l1 + 1.0 * neg_entropy_of_mean + 0.2 * mean_entropy
    assert float(tokenizer_loss(x, recon, soft)) == pytest.approx(want, rel=1e-12)
    # the config's defaults are the same official weights
    assert defaults("pumit")["diversity"] == 1.0 and defaults("pumit")["sharpness"] == 0.2
    got = tokenizer_loss(x, recon, soft, diversity=0.0, sharpness=0.0)
    assert float(got) == pytest.approx(l1, rel=1e-12)


def test_the_diversity_over_processes_is_the_one_of_the_whole_batch():
    """``all_sum`` (here: two identical processes) makes p̄ the global mean."""
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    probs = logits.softmax(-1)
    alone = prior_terms(torch.cat([probs, probs]), torch.cat([logits, logits]))
    twice = prior_terms(probs, logits, all_sum=lambda t: 2 * t)
    torch.testing.assert_close(twice[0], alone[0])
    torch.testing.assert_close(twice[1], alone[1])
