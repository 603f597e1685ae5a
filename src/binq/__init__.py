"""binq: post-training binarization of causal language models, with honest bit accounting."""

from binq.errors import BinqError

__version__ = "0.1.0"

__all__ = ["BinqError", "__version__"]
