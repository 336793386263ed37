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


def _group_rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(label) per token; backward is grad * (onehot(label) - softmax) on the local slice."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_size, group):
        rank, world = _group_rank_size(group)
        local_vocab = logits.shape[-1]
        vocab_start = rank * local_vocab
        valid_local = max(0, min(local_vocab, vocab_size - vocab_start))

        # Always a fresh fp32 tensor: the caller's logits are never modified.
        shifted = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
        if valid_local < local_vocab:
            shifted[..., valid_local:] = float("-inf")  # padded vocabulary rows
        global_max = shifted.max(dim=-1).values  # [b, s]
        if world > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        shifted.sub_(global_max.unsqueeze(-1))

        local_labels = labels - vocab_start
        owned = (local_labels >= 0) & (local_labels < valid_local)  # [b, s]
        safe_labels = torch.where(owned, local_labels, torch.zeros_like(local_labels))
        label_logit = shifted.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        label_logit = torch.where(owned, label_logit, torch.zeros_like(label_logit))

        softmax = shifted.exp_()  # in place: shifted is no longer needed
        sum_exp = softmax.sum(dim=-1)
        if world > 1:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(label_logit, op=dist.ReduceOp.SUM, group=group)
        softmax.div_(sum_exp.unsqueeze(-1))

        ctx.save_for_backward(softmax, safe_labels, owned)
        ctx.logits_dtype = logits.dtype
        return label_logit - sum_exp.log()

    @staticmethod
    def backward(ctx, grad_output):
        softmax, safe_labels, owned = ctx.saved_tensors
        grad_logits = softmax.mul_(-grad_output.unsqueeze(-1))  # saved tensor is not reused
        grad_logits.scatter_add_(-1, safe_labels.unsqueeze(-1),
                                 (grad_output * owned).unsqueeze(-1).to(grad_logits.dtype))
        return grad_logits.to(ctx.logits_dtype), None, None, None


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
