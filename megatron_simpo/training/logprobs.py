"""Per-token log-probabilities of the labels from vocab-parallel logits.

With tensor parallelism each rank holds the logits of a contiguous slice of the (padded)
vocabulary: ``logits[b, s, V_p/tp]``, rank r owning ids [r*V_p/tp, (r+1)*V_p/tp). The log-prob of
label y is ``z_y - m - log(sum_j exp(z_j - m))`` with m the max over the whole vocabulary. Only
three [b, s]-sized all-reduces are needed: the max (MAX), the sum of exponentials (SUM) and the
label's logit, which exactly one rank owns (SUM of zeros elsewhere). The full vocabulary is never
gathered; see docs/logprobs.md.

Entries beyond the true vocabulary (padding added so the embedding splits evenly) are excluded
from the softmax, so the result equals ``log_softmax`` over the unpadded vocabulary.

This module depends only on torch; the tensor-parallel group is passed in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_simpo.model.wgrad import add_product_
from megatron_simpo.training import logprob_kernels


def _group_rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _local_slice(group, local_vocab: int, vocab_size: int) -> tuple[int, int]:
    """(first id of this rank's vocabulary slice, how many of its entries are real)."""
    rank, _ = _group_rank_size(group)
    return rank * local_vocab, max(0, min(local_vocab, vocab_size - rank * local_vocab))


def vocab_slice_sums(logits: torch.Tensor, *, vocab_size: int, tp_group=None) -> torch.Tensor:
    """[..] fp32 sums of this rank's slice of ``logits`` [.., V_p/tp] over its real vocabulary
    entries (padding excluded; on a GPU half-precision logits are read, not copied); the sum of
    these over the tensor-parallel ranks is the sum over the true vocabulary (TRL's
    ``mean_logits`` times ``vocab_size``)."""
    _, valid_local = _local_slice(tp_group, logits.shape[-1], vocab_size)
    return logits[..., :valid_local].sum(dim=-1, dtype=torch.float32)


def _shifted_exponentials(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, group):
    """The forward terms on one rank's slice ``logits`` [.., V_p/tp] (consumed: it becomes
    exp(z - m)): (z_label - m [..], exp(z - m), sum of exp over the whole vocabulary [..],
    m = the max over the whole vocabulary [..], local labels, whether this rank owns them)."""
    _, world = _group_rank_size(group)
    local_vocab = logits.shape[-1]
    vocab_start, valid_local = _local_slice(group, local_vocab, vocab_size)
    if valid_local < local_vocab:
        logits[..., valid_local:] = float("-inf")  # padded vocabulary rows
    global_max = logits.max(dim=-1).values
    if world > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(global_max.unsqueeze(-1))

    local_labels = labels - vocab_start
    owned = (local_labels >= 0) & (local_labels < valid_local)
    safe_labels = torch.where(owned, local_labels, torch.zeros_like(local_labels))
    label_logit = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    label_logit = torch.where(owned, label_logit, torch.zeros_like(label_logit))

    exps = logits.exp_()
    sum_exp = exps.sum(dim=-1)
    if world > 1:
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(label_logit, op=dist.ReduceOp.SUM, group=group)
    return label_logit, exps, sum_exp, global_max, safe_labels, owned


def _label_logprobs_and_softmax(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward math on one rank's slice: (log p(label) [..], softmax [.., V_p/tp], labels, owned).

    ``logits`` is consumed (overwritten); pass a fresh fp32 tensor.
    """
    label_logit, exps, sum_exp, _, safe_labels, owned = _shifted_exponentials(
        logits, labels, vocab_size, group)
    return label_logit - sum_exp.log(), exps.div_(sum_exp.unsqueeze(-1)), safe_labels, owned


def _label_logprobs_and_lse(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                            group) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [..], log-sum-exp over the whole vocabulary [..]); ``logits`` consumed."""
    label_logit, _, sum_exp, global_max, _, _ = _shifted_exponentials(
        logits, labels, vocab_size, group)
    log_sum = sum_exp.log()
    return label_logit - log_sum, global_max + log_sum


def _grad_logits(softmax: torch.Tensor, safe_labels: torch.Tensor, owned: torch.Tensor,
                 grad_output: torch.Tensor) -> torch.Tensor:
    """d/d logits of sum(grad * log p(label)) = grad * (onehot(label) - softmax), in place."""
    grad_logits = softmax.mul_(-grad_output.unsqueeze(-1))
    grad_logits.scatter_add_(-1, safe_labels.unsqueeze(-1),
                             (grad_output * owned).unsqueeze(-1).to(grad_logits.dtype))
    return grad_logits


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(label) per token; backward is grad * (onehot(label) - softmax) on the local slice."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_size, group):
        # Always a fresh fp32 tensor: the caller's logits are never modified.
        work = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
        logprobs, softmax, safe_labels, owned = _label_logprobs_and_softmax(
            work, labels, vocab_size, group)
        ctx.save_for_backward(softmax, safe_labels, owned)
        ctx.logits_dtype = logits.dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad_output):
        softmax, safe_labels, owned = ctx.saved_tensors  # softmax is used up here (not reusable)
        return _grad_logits(softmax, safe_labels, owned, grad_output).to(ctx.logits_dtype), \
            None, None, None


def _chunk_forward(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, group
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [c], log-sum-exp [c]) of a chunk of logits [c, V_p/tp] in any dtype
    (consumed). Half precision on a GPU goes through the fused kernel, each rank's (max,
    sum-exp) pair then combined over tensor-parallel ranks on [c] tensors; else fp32 torch."""
    if not logprob_kernels.available(logits):
        return _label_logprobs_and_lse(logits.float(), labels, vocab_size, group)
    _, world = _group_rank_size(group)
    vocab_start, valid_local = _local_slice(group, logits.shape[-1], vocab_size)
    row_max, row_sum, label_logit = logprob_kernels.row_statistics(logits, labels, vocab_start,
                                                                   valid_local)
    if world > 1:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        row_sum = torch.where(row_max == float("-inf"), torch.zeros_like(row_sum),
                              row_sum * torch.exp(row_max - global_max))
        dist.all_reduce(row_sum, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(label_logit, op=dist.ReduceOp.SUM, group=group)
        row_max = global_max
    lse = row_max + row_sum.log()
    return label_logit - lse, lse


def _chunk_gradients(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                     grad_output: torch.Tensor, vocab_size: int, group,
                     dtype: torch.dtype) -> torch.Tensor:
    """d/d logits of sum(grad * log p(label)) for one chunk, ``grad * (onehot - exp(z - lse))``,
    in ``dtype``; ``logits`` [c, V_p/tp] is consumed."""
    vocab_start, valid_local = _local_slice(group, logits.shape[-1], vocab_size)
    if logprob_kernels.available(logits):
        return logprob_kernels.logit_gradients_(logits, labels, lse, grad_output, vocab_start,
                                                valid_local).to(dtype)
    softmax = logits.float().sub_(lse.unsqueeze(-1)).exp_()
    if valid_local < logits.shape[-1]:
        softmax[:, valid_local:] = 0.0  # padded vocabulary rows
    local_labels = labels - vocab_start
    owned = (local_labels >= 0) & (local_labels < valid_local)
    safe_labels = torch.where(owned, local_labels, torch.zeros_like(local_labels))
    return _grad_logits(softmax, safe_labels, owned, grad_output).to(dtype)


class _FusedOutputLogProbs(torch.autograd.Function):
    """log p(label) straight from hidden states and the vocab-parallel output weight.

    Logits exist only for ``chunk_size`` tokens at a time, in forward and again (recomputed) in
    backward; the [tokens, V_p/tp] logits of the whole micro-batch are never held. Forward keeps
    each token's log-sum-exp over the whole vocabulary ([n] fp32), so backward needs neither the
    max and sum passes again nor their tensor-parallel all-reduces:
    d log p(y) / d z_j = onehot(y)_j - exp(z_j - lse).

    With ``softcap`` c the logits are ``c * tanh(z / c)`` (in their dtype, as transformers caps
    Gemma-2's), and backward multiplies their gradient by ``1 - tanh(z / c)^2``.

    With ``with_sums`` the second output is each token's :func:`vocab_slice_sums` of its
    (capped) logits, read from the chunk while it exists (no gradient); else it is empty.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size, group, chunk_size, softcap=None,
                with_sums=False):
        def chunk(start, stop):
            logits = hidden[start:stop] @ weight.t()
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            if with_sums:  # before _chunk_forward consumes the chunk
                sums[start:stop] = vocab_slice_sums(logits, vocab_size=vocab_size,
                                                    tp_group=group)
            return _chunk_forward(logits, labels[start:stop], vocab_size, group)

        sums = torch.empty(hidden.shape[0] if with_sums else 0, dtype=torch.float32,
                           device=hidden.device)
        if 0 < hidden.shape[0] <= chunk_size:  # one chunk: its results are the outputs
            out, lse = chunk(0, hidden.shape[0])
        else:
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(out)
            for start in range(0, hidden.shape[0], chunk_size):
                stop = start + chunk_size
                out[start:stop], lse[start:stop] = chunk(start, stop)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.vocab_size, ctx.group, ctx.chunk_size = vocab_size, group, chunk_size
        ctx.softcap = softcap
        ctx.mark_non_differentiable(sums)
        return out, sums

    @staticmethod
    def backward(ctx, grad_output, _):
        hidden, weight, labels, lse = ctx.saved_tensors
        one_chunk = 0 < hidden.shape[0] <= ctx.chunk_size
        grad_hidden = None if one_chunk else torch.empty_like(hidden)
        # Under Megatron's DDP the weight carries its fp32 gradient buffer (main_grad): add the
        # chunks straight into it, as Megatron's fused weight-gradient GEMMs do, instead of
        # building a separate fp32 [V_p/tp, h] sum and a copy of it in the weight's dtype.
        main_grad = getattr(weight, "main_grad", None)
        into_main_grad = main_grad is not None and main_grad.dtype == torch.float32
        grad_weight = main_grad if into_main_grad else torch.zeros(
            weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            logits, tanh = hidden[start:stop] @ weight.t(), None
            if ctx.softcap is not None:
                tanh = torch.tanh(logits / ctx.softcap)
                logits = tanh * ctx.softcap
            grad_logits = _chunk_gradients(logits, labels[start:stop],
                                           lse[start:stop], grad_output[start:stop],
                                           ctx.vocab_size, ctx.group, weight.dtype)
            if tanh is not None:  # d(c tanh(z / c)) / dz = 1 - tanh(z / c)^2
                grad_logits = (grad_logits.float() * (1 - tanh.float().square())).to(weight.dtype)
            if one_chunk:
                grad_hidden = (grad_logits @ weight).to(hidden.dtype)
            else:
                grad_hidden[start:stop] = grad_logits @ weight
            # Accumulate in place: no [V_p/tp, h] temporary per chunk.
            add_product_(grad_weight, grad_logits.t(), hidden[start:stop])
        if into_main_grad:
            # Autograd still needs a gradient for the weight (DDP's hook runs when it arrives,
            # and a tied embedding adds its own to it): zeros, which the hook adds to main_grad.
            return grad_hidden, torch.zeros_like(weight), None, None, None, None, None, None
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None


def fused_output_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          vocab_size: int, tp_group=None, chunk_size: int = 1024,
                          softcap: float | None = None, with_sums: bool = False):
    """Memory-lean log-probs: the output layer and the log-softmax fused, chunked over tokens.

    Args:
        hidden: [n, h] final hidden states of the tokens to score (for TP, already through
            Megatron's copy-to-tensor-parallel-region so their gradient is all-reduced).
        weight: [V_p/tp, h] this rank's slice of the output (or tied embedding) weight.
        labels: [n] token ids in [0, vocab_size).
        chunk_size: tokens whose logits exist at once.
        softcap: final-logit soft-capping c (Gemma-2), or None: logits ``c * tanh(z / c)``.
        with_sums: also return each token's :func:`vocab_slice_sums` of those logits.

    Returns:
        [n] fp32 log p(labels), equal to ``vocab_parallel_logprobs(hidden @ weight.T, labels)``
        (of the soft-capped logits with ``softcap``), differentiable with respect to ``hidden``
        and ``weight``; with ``with_sums``, (that, [n] fp32 sums).
    """
    if hidden.shape[0] != labels.shape[0] or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
                         f"{tuple(labels.shape)} disagree")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logps, sums = _FusedOutputLogProbs.apply(hidden, weight, labels, vocab_size, tp_group,
                                             chunk_size, softcap, with_sums)
    return (logps, sums) if with_sums else logps


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int,
                            tp_group=None) -> torch.Tensor:
    """Log-probability of each label under the softmax over the (unpadded) vocabulary.

    Args:
        logits: [b, s, V_p/tp] this rank's vocabulary slice (any float dtype; math in fp32).
        labels: [b, s] token ids in [0, vocab_size) (every position; mask afterwards).
        vocab_size: true vocabulary size; logits of ids >= vocab_size (padding) are excluded.
        tp_group: the tensor-parallel process group; None for an unsplit vocabulary.

    Returns:
        [b, s] fp32 log p(labels), differentiable with respect to ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    return _VocabParallelLogProbs.apply(logits, labels, vocab_size, tp_group)


def sequence_logprobs(token_logprobs: torch.Tensor, loss_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the masked token log-probs per sequence and the number of tokens summed.

    Args:
        token_logprobs: [b, s] per-token log-probs.
        loss_mask: [b, s] 1 on response-label positions, 0 on prompt and padding.

    Returns:
        (sum [b], count [b]); the length-averaged log-prob is ``sum / count``.
    """
    mask = loss_mask.to(token_logprobs.dtype)
    return (token_logprobs * mask).sum(dim=-1), mask.sum(dim=-1)
