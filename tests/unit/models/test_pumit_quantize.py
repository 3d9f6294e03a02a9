"""Soft tokens: the expectation of the codebook, and the prior terms by hand."""

import math

import pytest
import torch

from medtx.models.pumit.quantize import SoftQuantizer, prior_terms


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
