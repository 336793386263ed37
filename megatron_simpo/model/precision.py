"""FP8 training through Transformer Engine: formats, scaling recipes, which layers stay in bf16.

Megatron-Core does the FP8 work itself once its ``TransformerConfig`` asks for it: every
Transformer Engine layer of the decoder runs its GEMMs in FP8 inside ``fp8_autocast``, with the
recipe's scaling, and the amax is reduced over the model-parallel group. What this module adds is
the user's side of that: typed settings with Megatron-LM's flag names, refusal of combinations
that cannot work (before a model is built, naming the flag), a check that the installed Transformer
Engine and the GPU support the recipe, and the sequence alignment FP8 GEMMs need.

The output layer and the log-probs stay in bf16/fp32 (they are not Transformer Engine layers),
which is where SimPO's numerics are decided.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Literal, get_args

Fp8Format = Literal["e4m3", "hybrid"]
Fp8Recipe = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]
FP8_FORMATS = get_args(Fp8Format)
FP8_RECIPES = get_args(Fp8Recipe)

# Recipe -> (Transformer Engine support check, oldest TE version Megatron-Core builds it with).
_RECIPE_SUPPORT = {
    "delayed": ("check_fp8_support", "1.0"),
    "tensorwise": ("check_fp8_support", "2.2.0.dev0"),
    "blockwise": ("check_fp8_block_scaling_support", "2.3.0.dev0"),
    "mxfp8": ("check_mxfp8_support", "2.1.0"),
}


@dataclass(frozen=True, kw_only=True)
class Fp8Config:
    """FP8 settings (``--fp8-format`` and friends); absent from a run means bf16 GEMMs."""

    format: Fp8Format
    """FP8 GEMMs in the decoder layers: e4m3 everywhere, or hybrid (e4m3 forward, e5m2
    gradients); needs the Transformer Engine layers and bf16."""
    recipe: Fp8Recipe = "delayed"
    """Scaling: per-tensor from an amax history (delayed), per-tensor current (tensorwise),
    1x128/128x128 blocks (blockwise, Hopper), 1x32 microscaling (mxfp8, Blackwell)."""
    amax_history_len: int | None = None
    """Delayed scaling only: amax history window (None: Megatron's default, 1)."""
    amax_compute_algo: Literal["most_recent", "max"] | None = None
    """Delayed scaling only: how the history gives the amax (None: Megatron's default,
    most_recent)."""
    margin: int = 0
    """Delayed scaling only: scale down by 2**margin for headroom."""
    first_last_layers_bf16: bool = False
    """Keep the first and last decoder layers in bf16 (not with the delayed recipe)."""
    num_layers_at_start_in_bf16: int = 1
    """With first_last_layers_bf16: how many layers at the start stay in bf16."""
    num_layers_at_end_in_bf16: int = 1
    """With first_last_layers_bf16: how many layers at the end stay in bf16."""

    def __post_init__(self) -> None:
        if self.format not in FP8_FORMATS:
            raise ValueError(f"--fp8-format must be one of {', '.join(FP8_FORMATS)}, got {self.format!r}")
        if self.recipe not in FP8_RECIPES:
            raise ValueError(f"--fp8-recipe must be one of {', '.join(FP8_RECIPES)}, got {self.recipe!r}")
        if self.amax_history_len is not None and self.amax_history_len < 1:
            raise ValueError(f"--fp8-amax-history-len must be >= 1, got {self.amax_history_len}")
        if self.amax_compute_algo not in (None, "most_recent", "max"):
            raise ValueError("--fp8-amax-compute-algo must be most_recent or max, got "
                             f"{self.amax_compute_algo!r}")
        if self.margin < 0:
            raise ValueError(f"--fp8-margin must be >= 0, got {self.margin}")
        if self.recipe != "delayed":
            delayed_only = [flag for flag, value in (
                ("--fp8-amax-history-len", self.amax_history_len),
                ("--fp8-amax-compute-algo", self.amax_compute_algo),
                ("--fp8-margin", self.margin or None)) if value is not None]
            if delayed_only:
                raise ValueError(f"{', '.join(delayed_only)} only apply to --fp8-recipe delayed "
                                 f"(the {self.recipe} recipe computes its scales from the "
                                 "current tensor)")
        if self.first_last_layers_bf16 and self.recipe == "delayed":
            # Entering and leaving fp8_autocast per layer breaks delayed scaling's amax reduction.
            raise ValueError("--first-last-layers-bf16 needs --fp8-recipe tensorwise, blockwise "
                             "or mxfp8 (delayed scaling cannot leave layers out)")
        for flag, value in (("--num-layers-at-start-in-bf16", self.num_layers_at_start_in_bf16),
                            ("--num-layers-at-end-in-bf16", self.num_layers_at_end_in_bf16)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")

    @property
    def alignment(self) -> int:
        """FP8 GEMMs need the token dimension a multiple of this (Megatron's fp8 align size)."""
        return 32 if self.recipe == "mxfp8" else 16

    def check_model(self, num_layers: int, pipeline_model_parallel_size: int) -> None:
        """Refuse more bf16 layers at either end than a pipeline stage holds (Megatron's rule)."""
        if not self.first_last_layers_bf16:
            return
        per_stage = num_layers // pipeline_model_parallel_size
        for flag, value in (("--num-layers-at-start-in-bf16", self.num_layers_at_start_in_bf16),
                            ("--num-layers-at-end-in-bf16", self.num_layers_at_end_in_bf16)):
            if value > per_stage:
                raise ValueError(f"{flag} ({value}) exceeds the layers of a pipeline stage "
                                 f"({num_layers} layers / PP {pipeline_model_parallel_size})")

    def transformer_overrides(self) -> dict:
        """The ``TransformerConfig`` fields that switch Megatron-Core's FP8 on."""
        values = dict(fp8=self.format, fp8_recipe=self.recipe, fp8_margin=self.margin,
                      first_last_layers_bf16=self.first_last_layers_bf16,
                      num_layers_at_start_in_bf16=self.num_layers_at_start_in_bf16,
                      num_layers_at_end_in_bf16=self.num_layers_at_end_in_bf16)
        if self.amax_history_len is not None:
            values["fp8_amax_history_len"] = self.amax_history_len
        if self.amax_compute_algo is not None:
            values["fp8_amax_compute_algo"] = self.amax_compute_algo
        return values


def check_fp8_support(fp8: Fp8Config) -> None:
    """Raise RuntimeError unless Transformer Engine, the GPU and its version can run the recipe."""
    import torch

    try:
        import transformer_engine  # noqa: F401
    except ImportError as error:
        raise RuntimeError("--fp8-format needs Transformer Engine, which is not installed (it "
                           "ships in NGC PyTorch containers)") from error
    if not torch.cuda.is_available():
        raise RuntimeError("--fp8-format needs a CUDA GPU (Ada, Hopper or newer); none is visible")
    from megatron.core.utils import get_te_version, is_te_min_version

    check_name, min_version = _RECIPE_SUPPORT[fp8.recipe]
    if not is_te_min_version(min_version):
        raise RuntimeError(f"--fp8-recipe {fp8.recipe} needs Transformer Engine >= {min_version}; "
                           f"installed: {get_te_version()}")
    for module_name in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            check = getattr(importlib.import_module(module_name), check_name, None)
        except ImportError:
            continue
        if check is not None:
            supported, reason = check()
            if not supported:
                name = torch.cuda.get_device_name()
                raise RuntimeError(f"--fp8-recipe {fp8.recipe} is not supported on this GPU "
                                   f"({name}): {reason}")
            return
    raise RuntimeError(f"Transformer Engine {get_te_version()} has no {check_name}(): cannot "
                       f"tell whether this GPU runs --fp8-recipe {fp8.recipe}")


def sequence_alignment(fp8: Fp8Config | None, sequence_parallel_size: int) -> int:
    """Model input lengths must be a multiple of this.

    Under sequence parallelism each TP rank holds s / TP positions, and an FP8 GEMM's token
    dimension must be a multiple of the recipe's alignment on every rank.
    """
    return sequence_parallel_size * (fp8.alignment if fp8 is not None else 1)


def padding_multiple(alignment: int) -> int:
    """What batches are padded to: the alignment, and at least a multiple of 8 (tensor cores)."""
    return math.lcm(8, alignment)
