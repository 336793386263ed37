"""One optimisation step over a global batch, through Megatron-Core's pipeline schedules.

Normalisation is decided once, here: every micro-batch's loss function returns the SUM of its
pair losses and its number of pairs (``calculate_per_token_loss=True``). The schedule adds the
counts, ``finalize_model_grads`` all-reduces them over data-parallel ranks and scales the
gradients by 1 / (pairs in the global batch). The gradient is therefore that of the exact mean
over all pairs, whatever the split into micro-batches, pipeline stages and data-parallel ranks.

Context parallelism: each CP rank runs its share of every row's positions
(``PreferenceBatch.context_parallel_share``) and scores only its own tokens, so its
per-sequence log-prob sums and token counts are partial; they are summed over the CP group
(forward) and every CP rank computes the same loss from the totals. The backward of that sum is
the identity: rank r's gradient is the loss's gradient through r's tokens, and Megatron's DDP
sums gradients over DP x CP, which adds the ranks' parts into the whole. The pair count is
reported by CP rank 0 alone (``finalize_model_grads`` sums the counts over DP x CP).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_simpo.data.collate import PreferenceBatch, scored_tokens
from megatron_simpo.training.guards import finite_everywhere, gradient_buffers
from megatron_simpo.training.logprob_head import LogprobHead
from megatron_simpo.training.logprobs import sequence_logprobs
from megatron_simpo.training.losses import WITH_REFERENCE, LossConfig, preference_loss
from megatron_simpo.training.moe_aux import (aux_loss_enabled, global_counts, logged_aux_loss,
                                             weighted_aux_loss)


@dataclass(frozen=True)
class StepResult:
    """Global-batch means of the metrics (TRL names) plus the optimizer's report, on every rank."""

    metrics: dict[str, float]
    grad_norm: float | None
    update_successful: bool
    """False when the optimizer did not update the weights (a skipped step)."""
    skipped_non_finite: bool = False
    """The loss or a gradient was NaN/inf on some rank: every rank skipped the update."""


def _unwrap(model):
    return getattr(model, "module", model)


class _SumOverContextParallel(torch.autograd.Function):
    """All-reduce (sum) over the CP group; backward the identity (see the module doc)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _context_parallel() -> tuple[int, int, object]:
    """(rank, size, group) of this rank's context-parallel group."""
    from megatron.core import parallel_state

    size = parallel_state.get_context_parallel_world_size()
    if size == 1:
        return 0, 1, None
    return (parallel_state.get_context_parallel_rank(), size,
            parallel_state.get_context_parallel_group())


def _local_share(batch: PreferenceBatch) -> PreferenceBatch:
    """The part of a micro-batch this CP rank runs (the whole batch without CP)."""
    rank, size, _ = _context_parallel()
    return batch.context_parallel_share(rank, size)


def _policy_logp_sums(batch: PreferenceBatch, output: torch.Tensor, model, head: LogprobHead,
                      mean_logits: bool = False):
    """[2n] summed response log-probs and [2n] response lengths of this CP rank's share of the
    batch, summed over the CP group (the whole sequences' on every CP rank); with
    ``mean_logits``, third, [2n] sums of the scored positions' mean logits (detached; this TP
    rank's share, ``LogprobHead.logps``), else None."""
    logp_sum, count, logits = _local_logp_sums(batch, output, model, head, mean_logits)
    _, size, group = _context_parallel()
    if size == 1:
        return logp_sum, count, logits
    parts = [logp_sum, count.to(logp_sum.dtype)] + ([] if logits is None else [logits])
    summed = _SumOverContextParallel.apply(torch.stack(parts), group)
    return (summed[0], summed[1].detach().to(count.dtype),
            None if logits is None else summed[2].detach())


def _local_logp_sums(batch: PreferenceBatch, output: torch.Tensor, model, head: LogprobHead,
                     mean_logits: bool = False):
    """[2n] summed response log-probs, [2n] response lengths and (``mean_logits``) [2n] sums of
    the positions' mean logits, else None, from the last stage's output.

    ``output`` is what ``head`` scores: [b, s, V_p/tp] logits, or [b, s, h] hidden states
    (memory-lean: only the response positions are scored). Unpacked, sequence j is row j
    (b = 2n); packed (b = 1), ``batch.sequence_ids`` says which sequence a position scores;
    shared-prompt rows list their scored tokens (``batch.scored``: a position may score two).
    """
    if batch.shared:
        rows, positions, labels, sequences = batch.scored
    elif head.full_logits and not batch.packed:
        scored = head.logps(output, batch.labels, model, mean_logits=mean_logits)
        logps, logits = scored if mean_logits else (scored, None)
        logp_sum, count = sequence_logprobs(logps, batch.loss_mask)
        return logp_sum, count, (None if logits is None else
                                 sequence_logprobs(logits, batch.loss_mask)[0])
    else:
        # Found on the host by the collate (no device read-back); for a batch cut or re-laid
        # on the device, from its loss mask here (a nonzero: a device sync on a GPU).
        rows, positions, labels, sequences = (
            batch.scored_tokens if batch.scored_tokens is not None else
            scored_tokens(batch.labels, batch.loss_mask,
                          batch.sequence_ids if batch.packed else None))
        if head.full_logits:  # full logits score every position, then pick (labels [b, s])
            labels = batch.labels
    scored = head.logps(output, labels, model, at=(rows, positions), mean_logits=mean_logits)
    logps, logits = scored if mean_logits else (scored, None)
    # The loss mask is exactly 1 at every scored position: each one counts once.
    zeros = torch.zeros(batch.num_sequences, dtype=logps.dtype, device=logps.device)
    return (zeros.index_add(0, sequences, logps),
            zeros.index_add(0, sequences, torch.ones_like(logps)),
            None if logits is None else zeros.index_add(0, sequences, logits))


@dataclass(frozen=True)
class _StepSpec:
    """What every micro-batch's forward step needs besides its batch and model."""

    loss: LossConfig
    head: LogprobHead


@dataclass(frozen=True)
class _Report:
    """What the loss function reports of one micro-batch (the schedule collects it)."""

    metric_sums: torch.Tensor
    """[n_metrics] sums over the micro-batch's pairs, in ``LossConfig.metric_names`` order."""
    logp_sums: torch.Tensor
    """[2n] the policy's summed response log-probs (chosen, rejected, ...), detached."""
    logit_totals: torch.Tensor
    """[4] over the micro-batch's chosen, then rejected responses: the scored positions' mean
    logits summed (this TP rank's share), then the scored tokens."""


def _loss_func(batch: PreferenceBatch, spec: _StepSpec, model, output: torch.Tensor):
    """Megatron schedule loss function: (sum of pair losses, pair count, ``_Report``)."""
    logp_sum, count, logits = _policy_logp_sums(batch, output, model, spec.head, True)
    reference = batch.reference_logp_sum
    loss, metrics = preference_loss(
        logp_sum[0::2], count[0::2], logp_sum[1::2], count[1::2], spec.loss,
        None if reference is None else reference[0::2],
        None if reference is None else reference[1::2])
    metric_sums = torch.stack([metrics[name] for name in spec.loss.metric_names]).sum(dim=1)
    # Counted once over the CP group (finalize_model_grads sums counts over DP x CP). A host
    # tensor: the schedule adds it to its device total as a scalar (a device tensor made from
    # a Python int here would be a blocking host-to-device copy, a sync, per micro-batch).
    pairs = batch.num_pairs if _context_parallel()[0] == 0 else 0
    num_pairs = torch.tensor(pairs, dtype=torch.int)
    tokens = count.to(logits.dtype)
    logit_totals = torch.stack([logits[0::2].sum(), logits[1::2].sum(), tokens[0::2].sum(),
                                tokens[1::2].sum()])
    return loss.sum(), num_pairs, _Report(metric_sums, logp_sum.detach(), logit_totals)


def _forward(batch: PreferenceBatch, model) -> torch.Tensor:
    """The model on one micro-batch. Unpacked rows are right-padded, so the causal mask alone
    keeps real tokens from seeing padding (no mask tensor), and their positions are the model's
    default 0..s-1 (no position ids: the model need not compare them with that default on every
    forward). Packed rows carry their restarting positions and their segments (``cu_seqlens``):
    to the local spec's attention in sbhd layout, to Transformer Engine as THD. The last stage returns
    [b, s, V_p/tp] logits, or [b, s, h] hidden states with memory-lean log-probs. Shared-prompt
    rows carry their positions and their explicit mask (``data.shared_rows``), which
    variable-length attention cannot express."""
    if batch.shared:
        return model(input_ids=batch.tokens, position_ids=batch.position_ids,
                     attention_mask=batch.attention_mask)
    if not batch.packed:
        return model(input_ids=batch.tokens, position_ids=None, attention_mask=None)
    from megatron.core.packed_seq_params import PackedSeqParams

    # A THD row is for Transformer Engine; the local spec's attention takes the segments in
    # sbhd layout (variable-length flash attention or FlexAttention on GPUs, else their mask).
    packed_seq_params = PackedSeqParams(
        qkv_format="thd" if batch.thd else "sbhd",
        cu_seqlens_q=batch.cu_seqlens, cu_seqlens_kv=batch.cu_seqlens,
        max_seqlen_q=batch.longest_segment, max_seqlen_kv=batch.longest_segment)
    return model(input_ids=batch.tokens, position_ids=batch.position_ids, attention_mask=None,
                 packed_seq_params=packed_seq_params)


def _forward_step(spec: _StepSpec, data_iterator, model):
    batch = _local_share(next(data_iterator))
    return _forward(batch, model), partial(_loss_func, batch, spec, model)


def _logp_sums_forward_step(head: LogprobHead, data_iterator, model):
    batch = _local_share(next(data_iterator))

    def collect(output):
        logp_sum, _, _ = _policy_logp_sums(batch, output, model, head)
        return logp_sum.sum(), torch.tensor(0, dtype=torch.int), logp_sum

    return _forward(batch, model), collect


def _run_schedule(forward_step_func, microbatches: Sequence[PreferenceBatch], model_chunks,
                  forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iter(microbatches),
        model=model_chunks,
        num_microbatches=len(microbatches),
        # Pipeline stages exchange each micro-batch's own shape (variable_seq_lengths, set in
        # model.transformer_config): these are only the largest (whole rows: Megatron divides
        # by the CP size).
        seq_length=max(batch.seq_length for batch in microbatches),
        micro_batch_size=max(batch.tokens.shape[0] for batch in microbatches),
        forward_only=forward_only,
    )


def attach_reference_logps(reference_model, microbatches: Sequence[PreferenceBatch],
                           head: LogprobHead) -> list[PreferenceBatch]:
    """The extra pass of DPO, IPO and R-DPO: the frozen reference model's summed log-probs,
    attached to each batch.

    A forward-only pipeline pass; the sums exist on the last stage, which is the only place the
    loss reads them, so other stages get their batches back unchanged.
    """
    sums = sequence_logp_sums(reference_model, microbatches, head)
    if not sums:  # not the last pipeline stage
        return list(microbatches)
    return [batch.with_reference(logp_sum) for batch, logp_sum in zip(microbatches, sums)]


def sequence_logp_sums(model, microbatches: Sequence[PreferenceBatch], head: LogprobHead
                       ) -> list[torch.Tensor]:
    """A forward-only pipeline pass of ``model`` (built for ``head``): each micro-batch's [2n]
    summed response log-probs (chosen, rejected, ... as the batch's sequences), fp32. On the
    last pipeline stage; an empty list on the others."""
    head.check(model)
    was_training = _unwrap(model).training
    model.eval()
    try:
        with torch.no_grad():
            return _run_schedule(partial(_logp_sums_forward_step, head), microbatches, [model],
                                 forward_only=True)
    finally:
        model.train(was_training)


LOGIT_METRICS = ("logits/chosen", "logits/rejected")
"""TRL's (DPOTrainer's): the mean over the batch's chosen (rejected) response tokens of the
scoring position's mean logit over the true vocabulary."""


def _global_metric_means(per_microbatch: list[_Report],
                         microbatches: Sequence[PreferenceBatch],
                         names: Sequence[str]) -> dict[str, float]:
    """Sum metric sums over micro-batches and DP ranks, divide by pairs, share across stages;
    ``LOGIT_METRICS`` are per token, their vocabulary slices' shares summed over TP ranks."""
    from megatron.core import parallel_state

    # [metric sums, logit sums (chosen, rejected), tokens (chosen, rejected), pairs]: one
    # all-reduce moves them all over DP; one more, of the logit sums, over TP.
    n = len(names)
    totals = torch.zeros(n + 5, dtype=torch.float64, device=microbatches[0].tokens.device)
    for report in per_microbatch:
        totals[:n] += report.metric_sums.to(torch.float64)
        totals[n:n + 4] += report.logit_totals.to(torch.float64)
    if per_microbatch:  # the last pipeline stage
        totals[-1] = sum(batch.num_pairs for batch in microbatches)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logit_sums = totals[n:n + 2].clone()
            dist.all_reduce(logit_sums, group=parallel_state.get_tensor_model_parallel_group())
            totals[n:n + 2] = logit_sums
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    means = torch.cat([totals[:n] / totals[-1], totals[n:n + 2] / totals[n + 2:n + 4].clamp(min=1)])
    return dict(zip([*names, *LOGIT_METRICS], means.tolist()))


def _prepare(model_chunks: list, microbatches: Sequence[PreferenceBatch], loss_config: LossConfig,
             head: LogprobHead, reference_model):
    """Check the models against the step's settings; the reference log-probs attached."""
    precomputed = all(batch.reference_logp_sum is not None for batch in microbatches)
    if reference_model is not None and not loss_config.needs_reference:
        raise ValueError("a reference model is for --algorithm "
                         f"{', '.join(WITH_REFERENCE)} only")
    if loss_config.needs_reference and reference_model is None and not precomputed:
        raise ValueError(f"--algorithm {loss_config.algorithm} needs a reference model or "
                         "precomputed reference log-probs on every batch")
    for chunk in model_chunks:
        head.check(chunk)
    if reference_model is not None:
        microbatches = attach_reference_logps(reference_model, microbatches, head)
    return microbatches, _StepSpec(loss_config, head)


def train_step(model_chunks: list, optimizer, microbatches: Sequence[PreferenceBatch],
               loss_config: LossConfig, *, head: LogprobHead, reference_model=None
               ) -> StepResult:
    """Forward/backward every micro-batch of this DP rank's share of the global batch, then step.

    Args:
        model_chunks: [DDP-wrapped GPTModel] (one chunk; built by ``optimizer.wrap_with_ddp``).
        optimizer: from ``optimizer.build_optimizer`` (installs the gradient finalisation hooks).
        microbatches: this data-parallel rank's micro-batches (shapes may differ; so may their
            number across data-parallel ranks: the loss is normalised by the global pair count).
        head: how the models' output is scored (full logits or memory-lean, the true
            vocabulary size); the models must have been built for it (``build_components``).
        reference_model: the frozen reference ``GPTModel`` (dpo, ipo, rdpo only).
    """
    microbatches, spec = _prepare(model_chunks, microbatches, loss_config, head,
                                  reference_model)
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    aux_loss = aux_loss_enabled(model_chunks)  # MoE: the load-balancing loss (moe_aux.py)
    scope = contextlib.nullcontext()
    if aux_loss:
        pairs, tokens, steps = global_counts(microbatches)
        scope = weighted_aux_loss(model_chunks, pairs, tokens)
    with scope:
        per_microbatch = _run_schedule(partial(_forward_step, spec), microbatches, model_chunks,
                                       forward_only=False)
    metrics = _global_metric_means(per_microbatch, microbatches, spec.loss.metric_names)
    if aux_loss:
        metrics["aux_loss"] = logged_aux_loss(steps)
    # Checked before the optimizer reads the gradients (in bf16/fp32 nothing else would stop a
    # NaN from reaching the weights); every rank gets the same verdict.
    if not (math.isfinite(metrics["loss"]) and
            finite_everywhere(gradient_buffers(model_chunks))):
        return StepResult(metrics=metrics, grad_norm=None, update_successful=False,
                          skipped_non_finite=True)
    update_successful, grad_norm, _ = optimizer.step()
    return StepResult(metrics=metrics, grad_norm=grad_norm, update_successful=update_successful)


@dataclass(frozen=True)
class Evaluation:
    """Held-out metrics, and the per-pair log-probs of the same forward pass (--eval-dump)."""

    metrics: dict[str, float]
    """Global means of the step's metrics (TRL names), on every rank."""
    logp_sums: list[torch.Tensor]
    """Per micro-batch, [2n] fp32 summed response log-probs of the policy (chosen, rejected,
    ...): on the last pipeline stage; an empty list on the others."""
    reference_logp_sums: list[torch.Tensor | None]
    """Per micro-batch, [2n] the reference's sums the loss used (a resident reference model's
    pass, or --reference-logps), None without a reference; on the last stage as above."""


def evaluate(model_chunks: list, microbatches: Sequence[PreferenceBatch], loss_config: LossConfig,
             *, head: LogprobHead, reference_model=None) -> Evaluation:
    """Forward-only pass over held-out micro-batches: global means of the same metrics, and
    each pair's log-prob sums from that pass (no second pass for per-pair values)."""
    microbatches, spec = _prepare(model_chunks, microbatches, loss_config, head,
                                  reference_model)
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            per_microbatch = _run_schedule(partial(_forward_step, spec), microbatches,
                                           model_chunks, forward_only=True)
    finally:
        for chunk in model_chunks:
            chunk.train()
    metrics = _global_metric_means(per_microbatch, microbatches, spec.loss.metric_names)
    if not per_microbatch:  # not the last pipeline stage
        return Evaluation(metrics, [], [])
    return Evaluation(metrics, [report.logp_sums for report in per_microbatch],
                      [batch.reference_logp_sum for batch in microbatches])
