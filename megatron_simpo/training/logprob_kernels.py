"""Fused Triton kernels for the memory-lean log-probs on GPUs: one read of each logits chunk.

The torch path of ``logprobs._FusedOutputLogProbs`` upcasts a chunk's bf16 logits
[c, V_p/tp] to fp32 and makes about eight passes over it (max, shift, exp, sum; in backward
shift, exp, scale, downcast). These kernels do the same arithmetic in fp32 registers:

- :func:`row_statistics` reads each row once with an online max/sum-exp (Milakov &
  Gimelshein's online softmax): the row max m, sum_j exp(z_j - m) over the valid vocabulary,
  and the label's logit where this rank owns it. The tensor-parallel combination of the
  per-rank (m, sum) pairs is done by the caller on [c]-sized tensors.
- :func:`logit_gradients_` turns a chunk of logits into d/dz of sum_t g_t log p(y_t),
  ``g_t * (onehot(y_t) - exp(z - lse_t))``, zero on padded vocabulary rows, written over the
  logits in their own dtype (one read, one write).

Used only where Triton and a CUDA device are present (``available``); tests/test_gpu.py compares
them with the CPU-exact torch path. Importing this module never needs Triton.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch ship without Triton
    triton = None

BLOCK = 4096
"""Vocabulary entries a program handles at a time."""


def available(logits: torch.Tensor) -> bool:
    """Whether the fused kernels can run on this chunk (Triton, CUDA, half precision)."""
    return (triton is not None and logits.is_cuda and logits.dtype in (torch.bfloat16,
                                                                       torch.float16))


if triton is not None:
    @triton.jit
    def _row_statistics_kernel(logits_ptr, labels_ptr, max_ptr, sum_ptr, label_ptr, stride,
                               vocab_start, valid_local, BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        offsets = tl.arange(0, BLOCK_SIZE)
        running_max = tl.full([BLOCK_SIZE], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_SIZE], tl.float32)
        for start in range(0, valid_local, BLOCK_SIZE):
            columns = start + offsets
            x = tl.load(base + columns, mask=columns < valid_local,
                        other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, x)
            # Lanes still at -inf (no valid entry yet) keep a zero sum.
            scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
            term = tl.where(new_max == float("-inf"), 0.0, tl.exp(x - new_max))
            running_sum = running_sum * scale + term
            running_max = new_max
        row_max = tl.max(running_max, axis=0)
        total = tl.sum(tl.where(running_max == float("-inf"), 0.0,
                                running_sum * tl.exp(running_max - row_max)), axis=0)
        tl.store(max_ptr + row, row_max)
        tl.store(sum_ptr + row, total)
        label = tl.load(labels_ptr + row) - vocab_start
        owned = (label >= 0) & (label < valid_local)
        safe = tl.where(owned, label, 0)
        label_logit = tl.load(base + safe).to(tl.float32)
        tl.store(label_ptr + row, tl.where(owned, label_logit, 0.0))

    @triton.jit
    def _gradients_kernel(logits_ptr, labels_ptr, lse_ptr, grad_ptr, stride, vocab_start,
                          valid_local, local_vocab, BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        base = logits_ptr + row.to(tl.int64) * stride
        columns = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        inside = columns < local_vocab
        x = tl.load(base + columns, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + row)
        lse = tl.load(lse_ptr + row)
        label = tl.load(labels_ptr + row) - vocab_start
        grad = -g * tl.exp(x - lse) + tl.where(columns == label, g, 0.0)
        grad = tl.where(columns < valid_local, grad, 0.0)
        tl.store(base + columns, grad.to(logits_ptr.dtype.element_ty), mask=inside)


def row_statistics(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                   valid_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [c, V_p/tp] (this rank's slice, first ``valid_local`` entries real):
    (max [c], sum of exp(z - max) [c], the label's logit where owned else 0 [c]), fp32.

    ``labels`` [c] are global ids; this rank owns [vocab_start, vocab_start + valid_local).
    A rank with no valid entry reports max -inf and sum 0.
    """
    rows = logits.shape[0]
    row_max, row_sum, label_logit = (torch.empty(rows, dtype=torch.float32,
                                                 device=logits.device) for _ in range(3))
    if rows:
        _row_statistics_kernel[(rows,)](logits, labels, row_max, row_sum, label_logit,
                                        logits.stride(0), vocab_start, valid_local,
                                        BLOCK_SIZE=BLOCK, num_warps=8)
    return row_max, row_sum, label_logit


def logit_gradients_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                     grad_output: torch.Tensor, vocab_start: int, valid_local: int
                     ) -> torch.Tensor:
    """Overwrite ``logits`` [c, V_p/tp] with ``g * (onehot(label) - exp(z - lse))`` (zero on
    padded entries) and return it: the gradient of sum_t g_t log p(y_t) on this rank's slice.

    ``lse`` [c] is the log-sum-exp over the whole vocabulary, ``grad_output`` [c] the g_t.
    """
    rows, local_vocab = logits.shape
    if rows:
        grid = (rows, triton.cdiv(local_vocab, BLOCK))
        _gradients_kernel[grid](logits, labels, lse, grad_output.float().contiguous(),
                                logits.stride(0), vocab_start, valid_local, local_vocab,
                                BLOCK_SIZE=BLOCK, num_warps=8)
    return logits
