"""The binq checkpoint format: bit-packed safetensors plus a ``quantization_config`` (docs/FORMAT.md)."""

from binq.checkpoint.format import FORMAT_VERSION, QUANT_METHOD, WEIGHTS_FILE, check_quantization_config, packed_key
from binq.checkpoint.header import read_header
from binq.checkpoint.load import is_checkpoint, load, read_quantization_config
from binq.checkpoint.save import save_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "WEIGHTS_FILE",
    "check_quantization_config",
    "is_checkpoint",
    "load",
    "packed_key",
    "read_header",
    "read_quantization_config",
    "save_checkpoint",
]
