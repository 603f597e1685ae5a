"""What a model's parameters are, for whole-model storage accounting.

A "1-bit" model is never 1 bit per parameter: embeddings, the LM head, norms and biases stay in
full precision. To report honest whole-model bits, every stored tensor must be counted exactly once,
including tied ones (SmolLM2 ties ``lm_head.weight`` to ``model.embed_tokens.weight``: one tensor,
stored once), and labelled with what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from binq.models.architectures import Architecture, get_module, named_linears

ParameterRole = Literal["block_linear_weight", "block_linear_bias", "embedding", "lm_head", "other"]
_ROLE_ORDER: tuple[ParameterRole, ...] = (
    "block_linear_weight",
    "block_linear_bias",
    "embedding",
    "lm_head",
    "other",
)


@dataclass(frozen=True)
class ParameterRecord:
    """One unique stored tensor. ``aliases`` are the other names tied to the same tensor."""

    name: str
    numel: int
    dtype_bits: int
    role: ParameterRole
    aliases: tuple[str, ...] = ()

    @property
    def quantizable(self) -> bool:
        """Only the weights of declared block linears are binarized; everything else stays as is."""
        return self.role == "block_linear_weight"

    @property
    def storage_bits(self) -> int:
        """Bits this tensor takes if left in its current dtype."""
        return self.numel * self.dtype_bits


def _roles_by_name(model: nn.Module, arch: Architecture) -> dict[str, ParameterRole]:
    """Map exact parameter names to roles; built from the declared layout, not guessed from names."""
    roles: dict[str, ParameterRole] = {}
    for item in named_linears(model, arch):
        roles[f"{item.full_name}.weight"] = "block_linear_weight"
        if item.linear.bias is not None:
            roles[f"{item.full_name}.bias"] = "block_linear_bias"
    for path in arch.embeddings:
        for pname, _ in get_module(model, path).named_parameters():
            roles[f"{path}.{pname}"] = "embedding"
    for pname, _ in get_module(model, arch.lm_head).named_parameters():
        roles[f"{arch.lm_head}.{pname}"] = "lm_head"
    return roles


def parameter_inventory(model: nn.Module, arch: Architecture) -> list[ParameterRecord]:
    """Every unique parameter tensor of ``model``, in ``named_parameters`` order, with its role.

    Tied tensors appear once, under the first name PyTorch reports, with the other names in
    ``aliases``; a tensor is quantizable only if one of its names is a declared block linear weight.
    """
    roles = _roles_by_name(model, arch)
    names_by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(param), []).append(name)
        tensors[id(param)] = param
    records = []
    for key, names in names_by_tensor.items():
        param = tensors[key]
        # A tied tensor takes the first role in _ROLE_ORDER among its names: a tied LM head is an embedding.
        role = min((roles.get(n, "other") for n in names), key=_ROLE_ORDER.index)
        records.append(
            ParameterRecord(
                name=names[0],
                numel=param.numel(),
                dtype_bits=param.element_size() * 8,
                role=role,
                aliases=tuple(names[1:]),
            )
        )
    return records


def numel_by_role(records: list[ParameterRecord]) -> dict[ParameterRole, int]:
    """Parameter counts per role (every role present, zero if absent), for reports."""
    totals: dict[ParameterRole, int] = dict.fromkeys(_ROLE_ORDER, 0)
    for record in records:
        totals[record.role] += record.numel
    return totals
