"""Tests for binq.evaluation: GPTQ-protocol perplexity, KL from the original model, WeightSwap."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binq.errors import BinqError
from binq.evaluation import EvalResult, Protocol, WeightSwap, evaluate_perplexity
from binq.models import block_linears, get_architecture, get_blocks

SEQLEN = 16


def protocol() -> Protocol:
    return Protocol("words", "random words", "tiny", SEQLEN, 0, 0, 0)


@torch.no_grad()
def window_nll(model: nn.Module, window: torch.Tensor) -> float:
    """Mean next-token cross-entropy of one [1, L] window, computed independently of binq."""
    logits = model(window).logits[0]
    return float(F.cross_entropy(logits[:-1].double(), window[0, 1:]))


@torch.no_grad()
def window_kl(reference: nn.Module, model: nn.Module, window: torch.Tensor) -> float:
    """Mean KL(P_reference || P_model) over the predicted positions of one window."""
    p = F.log_softmax(reference(window).logits[0, :-1].double(), -1)
    q = F.log_softmax(model(window).logits[0, :-1].double(), -1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


def linears_of(model: nn.Module) -> list[nn.Linear]:
    arch = get_architecture(model)
    return [lin for block in get_blocks(model, arch) for lin in block_linears(block, arch).values()]


@pytest.fixture
def model(make_tiny_model: Callable[..., nn.Module]) -> nn.Module:
    return make_tiny_model("llama")


@pytest.fixture
def tokens(make_ids: Callable[..., torch.Tensor]) -> torch.Tensor:
    return make_ids(1, 5 * SEQLEN + 7, seed=11)  # five whole windows and a tail


def test_perplexity_is_exp_of_mean_window_nll_tail_dropped(model: nn.Module, tokens: torch.Tensor) -> None:
    result = evaluate_perplexity(model, tokens, SEQLEN, protocol(), progress=False)
    nlls = [window_nll(model, tokens[:, i * SEQLEN : (i + 1) * SEQLEN]) for i in range(5)]
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / 5), rel=1e-5)
    assert result.ppl_original is None and result.kl is None
    assert (result.protocol.windows, result.protocol.windows_available, result.protocol.tokens) == (
        5,
        5,
        5 * SEQLEN + 7,
    )
    # the tail is dropped: changing it changes nothing; changing a window does
    tail_changed = tokens.clone()
    tail_changed[0, -7:] = (tail_changed[0, -7:] + 1) % model.config.vocab_size
    assert evaluate_perplexity(model, tail_changed, SEQLEN, protocol(), progress=False).ppl == result.ppl
    window_changed = tokens.clone()
    window_changed[0, 3 * SEQLEN + 5] = (window_changed[0, 3 * SEQLEN + 5] + 1) % model.config.vocab_size
    assert evaluate_perplexity(model, window_changed, SEQLEN, protocol(), progress=False).ppl != result.ppl
    # HF's own shifted loss agrees on a window
    with torch.no_grad():
        window = tokens[:, :SEQLEN]
        assert model(window, labels=window).loss.item() == pytest.approx(nlls[0], rel=1e-5)


def test_max_windows_takes_the_first_windows(model: nn.Module, tokens: torch.Tensor) -> None:
    result = evaluate_perplexity(model, tokens, SEQLEN, protocol(), max_windows=2, progress=False)
    nlls = [window_nll(model, tokens[:, i * SEQLEN : (i + 1) * SEQLEN]) for i in range(2)]
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / 2), rel=1e-5)
    assert (result.protocol.windows, result.protocol.windows_available) == (2, 5)
    # more windows than there are: all of them
    every = evaluate_perplexity(model, tokens, SEQLEN, protocol(), max_windows=50, progress=False)
    assert every.protocol.windows == 5
    assert every.ppl == evaluate_perplexity(model, tokens, SEQLEN, protocol(), progress=False).ppl


def test_fewer_tokens_than_one_window_is_an_error(model: nn.Module, tokens: torch.Tensor) -> None:
    with pytest.raises(BinqError, match=r"words: 15 tokens, fewer than one window of 16"):
        evaluate_perplexity(model, tokens[:, : SEQLEN - 1], SEQLEN, protocol(), progress=False)


def test_kl_is_zero_with_the_same_weights(model: nn.Module, tokens: torch.Tensor) -> None:
    swap = WeightSwap({lin: lin.weight.data.clone() for lin in linears_of(model)})
    result = evaluate_perplexity(model, tokens, SEQLEN, protocol(), max_windows=3, swap=swap, progress=False)
    assert result.kl == pytest.approx(0.0, abs=1e-9)
    assert result.ppl_original == pytest.approx(result.ppl, rel=1e-9)


def test_kl_and_original_perplexity_after_perturbing(
    model: nn.Module, tokens: torch.Tensor, make_tiny_model: Callable[..., nn.Module]
) -> None:
    reference = make_tiny_model("llama")  # same seed: the original weights
    linears = linears_of(model)
    originals = {lin: lin.weight.data for lin in linears}
    generator = torch.Generator().manual_seed(0)
    for lin in linears:  # as the engine does: a new tensor, the original kept aside
        lin.weight.data = lin.weight.data + 0.05 * torch.randn(lin.weight.shape, generator=generator)
    perturbed = {lin: lin.weight.data_ptr() for lin in linears}

    result = evaluate_perplexity(
        model, tokens, SEQLEN, protocol(), max_windows=3, swap=WeightSwap(originals), progress=False
    )

    windows = [tokens[:, i * SEQLEN : (i + 1) * SEQLEN] for i in range(3)]
    expected_kl = sum(window_kl(reference, model, w) for w in windows) / 3
    assert result.kl is not None and result.kl > 1e-4
    assert result.kl == pytest.approx(expected_kl, rel=1e-4)
    original_ppl = math.exp(sum(window_nll(reference, w) for w in windows) / 3)
    assert result.ppl_original == pytest.approx(original_ppl, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(window_nll(model, w) for w in windows) / 3), rel=1e-5)
    assert result.ppl != result.ppl_original
    # the perturbed weights are back in place
    assert all(lin.weight.data_ptr() == perturbed[lin] for lin in linears)
    as_dict = result.to_dict()
    assert isinstance(result, EvalResult)
    assert as_dict["kl"] == result.kl and as_dict["protocol"]["windows"] == 3


def test_weight_swap_restores_the_weights(model: nn.Module) -> None:
    linears = linears_of(model)[:3]
    current = {lin: (lin.weight.data_ptr(), lin.weight.detach().clone()) for lin in linears}
    originals = {lin: torch.full_like(lin.weight, 0.5, dtype=torch.float64) for lin in linears}
    swap = WeightSwap(originals)
    with swap.original():
        for lin in linears:
            assert lin.weight.dtype == torch.float32  # cast to the module's dtype
            assert torch.equal(lin.weight.data, torch.full_like(lin.weight, 0.5))
    for lin in linears:
        assert lin.weight.data_ptr() == current[lin][0] and torch.equal(lin.weight, current[lin][1])

    with pytest.raises(ValueError, match="boom"), swap.original():
        assert torch.equal(linears[0].weight.data, torch.full_like(linears[0].weight, 0.5))
        raise ValueError("boom")
    for lin in linears:
        assert lin.weight.data_ptr() == current[lin][0] and torch.equal(lin.weight, current[lin][1])
    # the stored originals themselves are never written to
    assert all(torch.equal(w, torch.full_like(w, 0.5)) for w in originals.values())
