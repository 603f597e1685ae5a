"""binq: post-training binarization of causal language models, with honest bit accounting."""

from typing import Any

from binq.errors import BinqError
from binq.integration.hook import install as _install_transformers_hook

__version__ = "0.1.0"

__all__ = ["BinqError", "__version__", "evaluate", "load", "quantize"]

# After `import binq`, AutoModelForCausalLM.from_pretrained reads binq checkpoints (quant_method "binq").
_install_transformers_hook()


def load(folder: Any, **kwargs: Any) -> Any:
    """Load a binq checkpoint folder as a transformers model (see :func:`binq.checkpoint.load`)."""
    from binq.checkpoint.load import load as _load

    return _load(folder, **kwargs)


def quantize(model: Any, method: Any, config: Any = None, **kwargs: Any) -> Any:
    """Quantize, evaluate and optionally save a model (see :func:`binq.pipeline.quantize`)."""
    from binq.pipeline import quantize as _quantize

    return _quantize(model, method, config, **kwargs)


def evaluate(model: Any, evaluation: Any = None, **kwargs: Any) -> Any:
    """Perplexity of a model or checkpoint on evaluation sets (see :func:`binq.pipeline.evaluate`)."""
    from binq.pipeline import evaluate as _evaluate

    return _evaluate(model, evaluation, **kwargs)
