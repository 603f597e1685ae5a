"""Evaluation under one documented protocol: perplexity (GPTQ) and KL from the original model."""

from binq.evaluation.perplexity import EvalResult, Protocol, WeightSwap, evaluate_perplexity

__all__ = ["EvalResult", "Protocol", "WeightSwap", "evaluate_perplexity"]
