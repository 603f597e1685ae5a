"""Calibration and evaluation text: built-in public-domain corpora plus the GPTQ-family Hub sets.

``calibration_windows`` gives the random windows a quantizer calibrates on; ``evaluation_tokens`` gives
the token stream a perplexity is measured on. Both follow the GPTQ reference code call for call, so a
seed and a set name reproduce published protocols; the built-in texts make everything work offline.
"""

from binq.data.calibration import calibration_windows
from binq.data.corpora import available_texts, load_text
from binq.data.evaluation import describe_eval, evaluation_tokens

__all__ = ["available_texts", "calibration_windows", "describe_eval", "evaluation_tokens", "load_text"]
