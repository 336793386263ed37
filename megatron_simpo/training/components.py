"""What a training step needs, built in the one order Megatron-Core requires.

The policy ``GPTModel`` is built and its weights filled before it is wrapped (DDP copies
parameters into its contiguous buffers at wrap time), returning what its log-prob head scores
(``logprob_head``: logits, or hidden states for memory-lean log-probs); the optimizer is built
over the wrapped model and installs the gradient finalisation hooks; the schedule wraps the
optimizer. The frozen reference model (dpo, ipo, rdpo) gets the same layers, precision and head
but no recomputation, no DDP and no gradients. The training loop, the benchmark and the tests
all build through :func:`build_components`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from megatron_simpo.model.architecture import ModelConfig
from megatron_simpo.training.logprob_head import LogprobHead
from megatron_simpo.model.builder import TransformerImpl, build_model
from megatron_simpo.model.moe import freeze_routers
from megatron_simpo.training.optimizer import (OptimizerSettings, build_optimizer, build_scheduler,
                                      remove_schedule_hooks, wrap_with_ddp)
from megatron_simpo.distributed.parallel import ParallelConfig

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
    """The frozen reference ``GPTModel`` (dpo, ipo, rdpo; None otherwise)."""
    head: LogprobHead
    """How the step scores the models' output: the policy and the reference were built for it."""


def build_components(model_config: ModelConfig, parallel: ParallelConfig,
                     optimizer: OptimizerSettings, *,
                     params_dtype: torch.dtype = torch.float32,
                     transformer_impl: TransformerImpl = "local",
                     transformer_overrides: dict[str, Any] | None = None,
                     reference_overrides: dict[str, Any] | None = None,
                     logprob_chunk_size: int = 1024,
                     freeze_router: bool = False,
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
        logprob_chunk_size: > 0 builds both models for memory-lean log-probs (the head's
            chunk size; 0 = full logits).
        total_iters: run length in optimizer steps; builds the learning-rate schedule.
        freeze_router: mixture of experts: the routers get no gradient and no update.
    """
    head = LogprobHead.for_model(logprob_chunk_size, model_config)
    settings = dict(params_dtype=params_dtype, transformer_impl=transformer_impl, head=head)
    # Megatron's DDP gives every trained weight an fp32 main_grad: the linear layers add their
    # weight gradients into it (model/wgrad.py) instead of making them apart for DDP to add.
    policy = _build(model_config, parallel, load=load_policy, **settings,
                    overrides={"gradient_accumulation_fusion": True,
                               **(transformer_overrides or {})})
    if freeze_router:
        freeze_routers(policy)
    model = wrap_with_ddp(policy, optimizer)
    megatron_optimizer = build_optimizer([model], optimizer,
                                         bf16=params_dtype == torch.bfloat16)
    scheduler = (build_scheduler(megatron_optimizer, optimizer, total_iters)
                 if total_iters is not None else None)
    reference = None
    if with_reference:
        reference = build_reference(model_config, parallel, overrides=reference_overrides,
                                    load=load_reference, **settings)
    return TrainingComponents(model=model, optimizer=megatron_optimizer, scheduler=scheduler,
                              reference=reference, head=head)


def _build(model_config: ModelConfig, parallel: ParallelConfig, *, params_dtype: torch.dtype,
           transformer_impl: TransformerImpl, overrides: dict[str, Any] | None,
           load: LoadWeights | None, head: LogprobHead):
    """This rank's ``GPTModel`` returning what ``head`` scores, weights from ``load`` (else
    random)."""
    model = build_model(model_config, parallel, transformer_impl=transformer_impl,
                        params_dtype=params_dtype, output_mode=head.model_output,
                        **(overrides or {}))
    if load is not None:
        load(model)
    return model


def build_reference(model_config: ModelConfig, parallel: ParallelConfig, *, head: LogprobHead,
                    params_dtype: torch.dtype = torch.float32,
                    transformer_impl: TransformerImpl = "local",
                    overrides: dict[str, Any] | None = None, load: LoadWeights | None = None):
    """A frozen reference ``GPTModel`` (eval mode, no gradients) returning what ``head``
    scores, as :func:`build_components` builds it beside the policy; also used alone to
    precompute its log-probs."""
    model = _build(model_config, parallel, params_dtype=params_dtype,
                   transformer_impl=transformer_impl, overrides=overrides, load=load, head=head)
    return model.eval().requires_grad_(False)


def release(parts: TrainingComponents) -> None:
    """Let a finished run's model, optimizer and process groups be freed in a process that
    goes on (a sweep, a notebook, the tests' reused ranks).

    Megatron-Core's DDP is kept alive past the run by links the garbage collector cannot undo:
    the model's config holds the optimizer (``grad_scale_func``, installed by
    ``optimizer.build_optimizer``), whose shards are views of the parameters with autograd
    edges to their accumulator nodes, and those nodes (C++, kept by the DDP) hold the DDP's
    gradient hooks, which hold the DDP; with ``--overlap-param-gather`` every submodule holds a
    forward pre-hook on the DDP. Without cutting these, the run's buffers and its gloo/NCCL
    groups (and their threads) stay alive for the rest of the process. (Megatron's rotary
    embedding cache, which holds the groups too, is emptied by ``runtime.shutdown``.)
    """
    remove_schedule_hooks([parts.model])
    getattr(parts.model, "grad_accs", []).clear()
    handles = getattr(parts.model, "remove_forward_pre_hook_handles", {})
    for handle in handles.values():
        handle.remove()
    handles.clear()
