"""The binq checkpoint format: bit-packed safetensors plus a ``quantization_config`` (docs/FORMAT.md)."""

from binq.checkpoint.files import checkpoint_entries, open_tensors, weight_files
from binq.checkpoint.format import (
    FORMAT_VERSION,
    INDEX_FILE,
    QUANT_METHOD,
    WEIGHTS_FILE,
    check_quantization_config,
    packed_key,
)
from binq.checkpoint.header import read_header
from binq.checkpoint.load import is_checkpoint, load, read_quantization_config
from binq.checkpoint.save import save_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "INDEX_FILE",
    "QUANT_METHOD",
    "WEIGHTS_FILE",
    "check_quantization_config",
    "checkpoint_entries",
    "is_checkpoint",
    "load",
    "open_tensors",
    "packed_key",
    "read_header",
    "read_quantization_config",
    "save_checkpoint",
    "weight_files",
]
