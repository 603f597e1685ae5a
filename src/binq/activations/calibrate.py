"""Activation quantization settings and their calibration pass (smoothing folded in, clipping searched).

:func:`calibrate_activations` runs the full-precision model block by block on the calibration samples
(the engine's block walker), takes a random subset of each linear group's input tokens, and per group:

1. with ``smooth="channel"``, searches the smoothing strength and folds the factors into the group's
   producer (the architecture's ``smoothing_sources``), so the full-precision model is unchanged;
2. with ``clip="search"``, picks the clipping ratio of smallest output error for the (smoothed) input.

It must run before the weights are quantized (the weights are quantized in their smoothed form) and
before the originals are kept for KL (the smoothed fp model is the same function).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from binq.activations.int4 import ActivationQuantizer, activation_storage_bits
from binq.activations.smoothing import (
    CLIP_RATIOS,
    fold_smoothing,
    search_clip_ratio,
    search_smoothing,
    two_group_proxy,
)
from binq.engine.walker import walk_blocks
from binq.errors import BinqError
from binq.methods.registry import check_choice, check_range
from binq.models.architectures import Architecture, get_module, named_linears

log = logging.getLogger(__name__)

SMOOTH_KINDS = ("auto", "none", "channel", "token")
PROXY_KINDS = ("w11", "none")


@dataclass
class ActivationConfig:
    """How the block linears' inputs are quantized (``bits`` 16 = not at all).

    - ``bits``: integer bits per activation (4 for A(1x4)); ``sym``: symmetric instead of asymmetric.
    - ``clip``: ``search`` (a ratio per linear group, on calibration data) or a fixed ratio such as ``1.0``.
    - ``smooth``: ``channel`` (per-input-channel factors, strength searched, folded into the norm or
      linear before: the primary reading of the paper), ``token`` (each token's scale shrunk to its
      error-minimising clip ratio at run time: the other reading), ``none``, or ``auto`` (the default:
      ``channel`` where the architecture declares a producer to fold into, else ``none``; measured:
      it lowers W(1+1)A(1x4)'s perplexity on SmolLM2 2.6x, docs/W11.md).
    - ``smooth_proxy``: the weight quantizer the channel search assumes: ``w11`` (a cheap two-group
      fit) or ``none`` (full-precision weights).
    - ``calib_tokens``: input tokens per linear group used by the searches.
    """

    bits: int = 16
    sym: bool = False
    clip: str = "search"
    smooth: str = "auto"
    smooth_proxy: str = "w11"
    calib_tokens: int = 2048

    def __post_init__(self) -> None:
        check_range("--act-bits", self.bits, 2, 16)
        check_choice("--smooth", self.smooth, SMOOTH_KINDS)
        check_choice("--smooth-proxy", self.smooth_proxy, PROXY_KINDS)
        check_range("--act-calib-tokens", self.calib_tokens, 16, 1 << 30)
        if self.clip != "search":
            try:
                ratio = float(self.clip)
            except ValueError:
                raise BinqError(f"--act-clip must be 'search' or a ratio in (0, 1], got '{self.clip}'") from None
            check_range("--act-clip", ratio, 1e-3, 1.0)

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def needs_calibration(self) -> bool:
        return self.enabled and (self.clip == "search" or self.smooth in ("channel", "auto"))

    def quantizer(self, clip_ratio: float) -> ActivationQuantizer:
        """The quantizer of one linear's input (called: the simulated ``x^``)."""
        candidates = CLIP_RATIOS if self.smooth == "token" else None
        return ActivationQuantizer(self.bits, self.sym, clip_ratio, candidates)


@dataclass
class ActivationPlan:
    """What calibration decided: a clip ratio per linear, the smoothing strength per group."""

    config: ActivationConfig
    clip_ratios: dict[str, float] = field(default_factory=dict)  # "block.name" -> ratio
    smoothing_alphas: dict[str, float | None] = field(default_factory=dict)  # "block.first name" -> alpha
    smoothing_error_ratio: list[float] = field(default_factory=list)  # searched error / unsmoothed error
    smoothed_producers: list[str] = field(default_factory=list)  # full names of the modules factors were folded into

    def clip_ratio(self, key: str) -> float:
        default = 1.0 if self.config.clip == "search" else float(self.config.clip)
        return self.clip_ratios.get(key, default)

    def module_quantizers(self, model: nn.Module, arch: Architecture) -> dict[str, ActivationQuantizer]:
        """The input quantizer of every block linear, by full module name (what the hooks install, and save)."""
        if not self.config.enabled:
            return {}
        names = [item.full_name for item in named_linears(model, arch)]
        return {name: self.config.quantizer(self.clip_ratio(name)) for name in names}

    def summary(self, features: int) -> dict:
        """For report.json: the settings, the storage of one activation of ``features`` inputs, the choices."""
        alphas = [a for a in self.smoothing_alphas.values() if a is not None]
        ratios = list(self.clip_ratios.values())
        return {
            "config": asdict(self.config),
            "storage_bits": activation_storage_bits(features, self.config.bits, self.config.sym),
            "clip_ratio_mean": sum(ratios) / len(ratios) if ratios else None,
            "smoothed_groups": len(alphas),
            "smoothing_alpha_mean": sum(alphas) / len(alphas) if alphas else None,
            "smoothing_error_ratio_mean": (
                sum(self.smoothing_error_ratio) / len(self.smoothing_error_ratio)
                if self.smoothing_error_ratio
                else None
            ),
        }


def _sample_tokens(chunks: list[torch.Tensor], count: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).float()
    if tokens.shape[0] > count:
        tokens = tokens[torch.randperm(tokens.shape[0], generator=generator)[:count]]
    return tokens


@torch.no_grad()
def calibrate_activations(
    model: nn.Module,
    arch: Architecture,
    calibration: torch.Tensor,
    config: ActivationConfig,
    seed: int = 0,
    progress: bool = True,
) -> ActivationPlan:
    """Fold the smoothing into ``model`` (in place, on the CPU) and search the clip ratios."""
    if config.smooth == "auto":
        config = replace(config, smooth="channel" if arch.smoothing_sources else "none")
    plan = ActivationPlan(config)
    if not config.needs_calibration:
        return plan
    if config.smooth == "channel" and not arch.smoothing_sources:
        raise BinqError(f"--smooth channel is not supported for {arch.name} (no foldable norm declared)")
    generator = torch.Generator().manual_seed(seed)
    proxy = two_group_proxy if config.smooth_proxy == "w11" else None
    firsts = [group[0] for group in arch.linear_groups]
    for step in walk_blocks(model, arch, calibration, progress=progress, desc="activations"):
        # The block runs once, before any folding: its outputs are the next block's inputs.
        captured, step.outputs = step.capture_inputs(firsts)
        for g, group in enumerate(arch.linear_groups):
            x = _sample_tokens(captured[group[0]], config.calib_tokens, generator)
            weights = [step.linears[name].weight.float() for name in group]
            key = step.full_name(group[0])
            source = arch.smoothing_sources[g] if g < len(arch.smoothing_sources) else None
            if config.smooth == "channel" and source is not None:
                choice = search_smoothing(x, weights, config.quantizer(1.0), proxy)
                plan.smoothing_alphas[key] = choice.alpha
                plan.smoothing_error_ratio.append(choice.error / max(choice.error_unsmoothed, 1e-30))
                if choice.factors is not None:
                    fold_smoothing(get_module(step.block, source), [step.linears[n] for n in group], choice.factors)
                    plan.smoothed_producers.append(step.full_name(source))
                    x = x / choice.factors
                    weights = [step.linears[name].weight.float() for name in group]
            if config.clip == "search":
                ratio = search_clip_ratio(x, weights, lambda t, r: config.quantizer(r)(t))
            else:
                ratio = float(config.clip)
            for name in group:
                plan.clip_ratios[step.full_name(name)] = ratio
    summary = plan.summary(1)
    log.info(
        "activation calibration: mean clip ratio %s, %d groups smoothed (mean alpha %s)",
        summary["clip_ratio_mean"],
        summary["smoothed_groups"],
        summary["smoothing_alpha_mean"],
    )
    return plan
