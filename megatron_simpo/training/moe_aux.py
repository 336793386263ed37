"""The load-balancing loss of a mixture-of-experts step: its weight and its logged value.

Megatron-Core's router attaches ``coeff * aux * n`` to its output (n: the tokens the router
saw on this rank; ``MoEAuxLossAutoScaler``; from megatron-core 0.19 ``coeff * aux * n * tp *
cp``) because under ``calculate_per_token_loss`` the gradients are divided by the global token
count. Here they are divided by the global PAIR count P (``megatron_simpo.training.step``), so
for a step the router gets

    coeff' = coeff * tp * cp * P / T,     T = tokens of the global batch (padding included),

(``coeff * P / T`` where the router applies the factor tp * cp itself)

and the gradient is that of ``coeff * sum_layers aux``, averaged over the micro-batches of the
global batch weighted by their tokens. (Each tensor- and context-parallel rank's router sees
1/(TP CP) of a micro-batch's tokens, or a duplicate of them without sequence parallelism, and
Megatron-Core attaches the loss share of each, its own tokens' router probabilities against
the counts of the whole TP x CP group; their gradients add up to the micro-batch's full loss
times its tokens / (TP CP), hence the factor tp * cp.)

The logged ``aux_loss`` is the load-balancing loss summed over the layers, averaged over the
micro-batches of the global batch (Megatron-LM's logging), without the coefficient: each
rank's tracker holds its share, summed over the TP, CP, PP and DP groups.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Sequence

import torch
import torch.distributed as dist

_TRACKED = "load_balancing_loss"  # Megatron-Core's tracker entry


def _config(model_chunks):
    return getattr(model_chunks[0], "module", model_chunks[0]).config


def aux_loss_enabled(model_chunks) -> bool:
    config = _config(model_chunks)
    return config.num_moe_experts is not None and config.moe_aux_loss_coeff > 0


def _tracked_metrics() -> dict:
    """Megatron-Core's live per-layer MoE metrics, name -> entry holding ``values`` [layers]:
    ``get_moe_metrics_tracker().metrics`` (megatron-core 0.19), else the tracker dict of
    ``get_moe_layer_wise_logging_tracker`` (0.16; in 0.19 it returns a copy)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return get_moe_layer_wise_logging_tracker()
    return get_moe_metrics_tracker().metrics


@functools.cache
def router_scales_by_tp_cp() -> bool:
    """Whether Megatron-Core's router multiplies the attached load-balancing loss by the TP x CP
    size itself under ``calculate_per_token_loss`` (megatron-core 0.19's
    ``attach_and_log_load_balancing_loss``; not 0.16's)."""
    from megatron.core.transformer.moe.router import TopKRouter

    try:
        source = inspect.getsource(TopKRouter.attach_and_log_load_balancing_loss)
    except (AttributeError, OSError, TypeError):  # no such method, or no source: the version
        from megatron.core import __version__
        from packaging.version import Version

        return Version(__version__) >= Version("0.19")
    return "tp_cp_group.size()" in source


@contextlib.contextmanager
def weighted_aux_loss(model_chunks, num_pairs: int, num_tokens: int):
    """Within: the router's coefficient is ``coeff * tp * cp * P / T`` (the module docstring) and
    Megatron's aux-loss tracker starts from zero. ``num_pairs`` / ``num_tokens``: P and T of
    the global batch."""
    from megatron.core import parallel_state

    config = _config(model_chunks)
    base = config.moe_aux_loss_coeff  # the run's; restored on the way out
    tp_cp = (1 if router_scales_by_tp_cp()
             else parallel_state.get_tensor_and_context_parallel_world_size())
    # dropped, not zeroed: it is sized by the layers of the model that created it
    _tracked_metrics().pop(_TRACKED, None)
    config.moe_aux_loss_coeff = base * tp_cp * num_pairs / num_tokens
    try:
        yield
    finally:
        config.moe_aux_loss_coeff = base


def global_counts(microbatches: Sequence) -> tuple[int, int, int]:
    """(pairs, tokens, micro-batches) of the global batch: this rank's summed over the
    data-parallel ranks."""
    from megatron.core import parallel_state

    counts = torch.tensor([[sum(b.num_pairs for b in microbatches),
                            sum(b.tokens.numel() for b in microbatches), len(microbatches)]],
                          dtype=torch.int64, device=microbatches[0].tokens.device)
    dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    pairs, tokens, steps = counts[0].tolist()
    return pairs, tokens, steps


def logged_aux_loss(num_microbatches: int) -> float:
    """The step's ``aux_loss`` (see the module docstring), on every rank; call after the
    schedule, within :func:`weighted_aux_loss`'s step."""
    from megatron.core import parallel_state

    entry = _tracked_metrics().get(_TRACKED)
    total = torch.zeros(1, dtype=torch.float64)
    if entry is not None:
        values = entry["values"] if isinstance(entry, dict) else entry.values
        total += values.sum().double().cpu()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = total.to(device)
    for group in (parallel_state.get_tensor_model_parallel_group(),
                  parallel_state.get_context_parallel_group(),
                  parallel_state.get_pipeline_model_parallel_group(),
                  parallel_state.get_data_parallel_group()):
        dist.all_reduce(total, group=group)
    return float(total.item()) / num_microbatches
