"""Models: the supported architectures (as data), loading, and what a model's parameters are."""

from binq.models.accounting import ParameterRecord, ParameterRole, numel_by_role, parameter_inventory
from binq.models.architectures import (
    ARCHITECTURES,
    Architecture,
    ModelHead,
    architecture_for_model_type,
    block_linears,
    get_architecture,
    get_blocks,
    get_module,
    module_name,
    named_linears,
)
from binq.models.embedded import EMBEDDED_MODELS, EmbeddedGGUF, ensure_embedded, ensure_smollm2
from binq.models.loading import LoadedModel, check_finite, load_model

__all__ = [
    "ARCHITECTURES",
    "EMBEDDED_MODELS",
    "Architecture",
    "EmbeddedGGUF",
    "LoadedModel",
    "ModelHead",
    "ParameterRecord",
    "ParameterRole",
    "architecture_for_model_type",
    "block_linears",
    "check_finite",
    "ensure_embedded",
    "ensure_smollm2",
    "get_architecture",
    "get_blocks",
    "get_module",
    "load_model",
    "module_name",
    "named_linears",
    "numel_by_role",
    "parameter_inventory",
]
