"""What a training step needs, built in the one order Megatron-Core requires.

The policy ``GPTModel`` is built and its weights filled before it is wrapped (DDP copies
parameters into its contiguous buffers at wrap time); memory-lean log-probs are switched on
before wrapping too; the optimizer is built over the wrapped model and installs the gradient
finalisation hooks; the schedule wraps the optimizer. DPO's frozen reference model gets the
same layers and precision but no recomputation, no DDP and no gradients. The training loop,
the benchmark and the tests all build through :func:`build_components`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from megatron_simpo.architecture import ModelConfig
from megatron_simpo.model import (TransformerImpl, build_model, check_chunk_size,
                                  enable_memory_lean_logprobs)
from megatron_simpo.optimizer import (OptimizerSettings, build_optimizer, build_scheduler,
                                      wrap_with_ddp)
from megatron_simpo.parallel import ParallelConfig

LoadWeights = Callable[[torch.nn.Module], None]


@dataclass
class TrainingComponents:
    """This rank's share of the training state."""

    model: Any
    """The policy: Megatron ``DistributedDataParallel`` around this rank's ``GPTModel``."""
    optimizer: Any
    """Megatron-Core's (distributed) Adam over ``model``."""
    scheduler: Any | None
    """Megatron-Core's ``OptimizerParamScheduler`` (None when no run length was given)."""
    reference: Any | None
    """DPO's frozen reference ``GPTModel`` (None for SimPO)."""
    logprob_chunk_size: int
    """What the step passes on: tokens scored at a time (memory-lean), or 0 for full logits."""


def build_components(model_config: ModelConfig, parallel: ParallelConfig,
                     optimizer: OptimizerSettings, *,
                     params_dtype: torch.dtype = torch.float32,
                     transformer_impl: TransformerImpl = "local",
                     transformer_overrides: dict[str, Any] | None = None,
                     reference_overrides: dict[str, Any] | None = None,
                     logprob_chunk_size: int = 1024,
                     load_policy: LoadWeights | None = None,
                     with_reference: bool = False,
                     load_reference: LoadWeights | None = None,
                     total_iters: int | None = None) -> TrainingComponents:
    """Build the policy (weights from ``load_policy``, else random), its DDP wrapper, optimizer
    and schedule, and with ``with_reference`` the frozen reference (weights from
    ``load_reference``). Needs ``runtime.initialize`` with the same parallel layout.

    Args:
        transformer_overrides: ``TransformerConfig`` fields of the policy beyond the
            architecture (recomputation, FP8).
        reference_overrides: the same for the reference (FP8 only: nothing to recompute).
        logprob_chunk_size: > 0 switches both models to memory-lean log-probs.
        total_iters: run length in optimizer steps; builds the learning-rate schedule.
    """
    check_chunk_size(logprob_chunk_size)

    def build(overrides: dict[str, Any] | None, load: LoadWeights | None):
        model = build_model(model_config, parallel, transformer_impl=transformer_impl,
                            params_dtype=params_dtype, **(overrides or {}))
        if load is not None:
            load(model)
        if logprob_chunk_size:
            enable_memory_lean_logprobs(model)
        return model

    model = wrap_with_ddp(build(transformer_overrides, load_policy), optimizer)
    megatron_optimizer = build_optimizer([model], optimizer,
                                         bf16=params_dtype == torch.bfloat16)
    scheduler = (build_scheduler(megatron_optimizer, optimizer, total_iters)
                 if total_iters is not None else None)
    reference = None
    if with_reference:
        reference = build(reference_overrides, load_reference)
        reference.eval().requires_grad_(False)
    return TrainingComponents(model=model, optimizer=megatron_optimizer, scheduler=scheduler,
                              reference=reference, logprob_chunk_size=logprob_chunk_size)
