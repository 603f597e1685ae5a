"""The one registry of quantization methods.

A method is a pure function ``quantize(weight, hessian, config) -> QuantizedWeight`` plus a typed
config dataclass (a :class:`MethodConfig` whose fields declare their valid values with :func:`option`).
It never touches hooks, devices or files: the engine hands it a float32 weight ``(out_features,
in_features)`` and the undamped calibration Hessian ``(in_features, in_features)``.
Adding a method is one new module that calls :func:`register` and one import line in ``__init__``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from binq.errors import BinqError
from binq.quant.structured import QuantizedWeight

QuantizeFn = Callable[[torch.Tensor, torch.Tensor, Any], QuantizedWeight]


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    quantize: QuantizeFn
    summary: str
    calibration_free: bool = False  # the hessian argument is None: no calibration, no engine pass

    def make_config(self, **options: Any) -> Any:
        """Build the config from keyword options; unknown names are a user error."""
        known = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BinqError(
                f"method '{self.name}' has no option {', '.join(unknown)} (options: {', '.join(sorted(known))})"
            )
        return self.config_class(**options)


_METHODS: dict[str, Method] = {}


def register(
    name: str, config_class: type, summary: str, calibration_free: bool = False
) -> Callable[[QuantizeFn], QuantizeFn]:
    """Decorator: register ``fn`` as method ``name`` configured by ``config_class``.

    A ``calibration_free`` method is called with ``hessian=None`` on every linear independently.
    """

    def wrap(fn: QuantizeFn) -> QuantizeFn:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = Method(name, config_class, fn, summary, calibration_free)
        return fn

    return wrap


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise BinqError(f"unknown method '{name}' (available: {', '.join(sorted(_METHODS))})") from None


def available_methods() -> list[Method]:
    return [_METHODS[name] for name in sorted(_METHODS)]


# What an integer option's range stops at unless it says otherwise: larger values are certainly mistakes.
MAX_OPTION = 1 << 30


def option(
    default: Any, low: float | None = None, high: float = MAX_OPTION, choices: tuple[str, ...] | None = None
) -> Any:
    """A config field with its valid values next to it: ``[low, high]`` for a number, ``choices`` for a
    string. :class:`MethodConfig` checks them when a config is made."""
    return dataclasses.field(default=default, metadata={"low": low, "high": high, "choices": choices})


class MethodConfig:
    """Base of every method's config dataclass: checks the fields declared with :func:`option`.

    The error names the command-line option (``block_size`` is ``--block-size``). A config with a rule
    across fields overrides ``__post_init__``, calls this one first, then checks its rule.
    """

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            name, limits = "--" + field.name.replace("_", "-"), field.metadata
            if limits.get("choices") is not None:
                check_choice(name, getattr(self, field.name), limits["choices"])
            elif limits.get("low") is not None:
                check_range(name, getattr(self, field.name), limits["low"], limits["high"])


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Config validation helper: a clear error for a value outside ``choices``."""
    if value not in choices:
        raise BinqError(f"{option} must be one of {', '.join(choices)}, got '{value}'")


def check_range(option: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise BinqError(f"{option} must be in [{low}, {high}], got {value}")
