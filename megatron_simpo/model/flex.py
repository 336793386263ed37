"""FlexAttention for the masks that SDPA can only take as a dense tensor (on GPUs).

``scaled_dot_product_attention`` with an explicit [s, s] mask cannot use the flash kernels: it
falls back to the memory-efficient kernel with a bias, or to the math path, and soft-capped
scores (Gemma-2) are computed here explicitly as a [b, np, sq, sk] tensor. PyTorch's
FlexAttention (``torch.nn.attention.flex_attention``) compiles one fused kernel from a
``mask_mod`` and a ``score_mod`` and skips the blocks the mask rules out entirely (a packed row's
off-diagonal blocks, a sliding window's far blocks, the chosen response's blocks for the
rejected one in a shared-prompt row):

- the mask: True where a query may NOT attend (Megatron's convention), [b or 1, 1, sq, sk], from
  whichever layout made it (causal, packed block-diagonal, shared-prompt rows, windows), read by
  the ``mask_mod`` as a lookup, so every mask this project makes goes through the same path;
- soft-capping as a ``score_mod``: ``c * tanh(s / c)`` on the already scaled score, as
  transformers' eager Gemma-2 attention; FlexAttention's softmax runs in fp32.

On CUDA the kernel is compiled (once per shape signature; ``dynamic=True`` keeps new lengths
from recompiling); elsewhere FlexAttention runs its unfused reference path, which the CPU tests
compare with SDPA and the explicit soft-capped attention. Rows of a query that may attend to
nothing (padding) come out as zeros, as SDPA's do not: callers never read them.
"""

from __future__ import annotations

import functools
import os

import torch

from megatron_simpo.model.context_parallel import segment_ids

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # PyTorch < 2.5
    create_block_mask = flex_attention = None

BLOCK = 128
"""FlexAttention's block size (queries and keys): the granularity at which masked blocks are
skipped."""


def available() -> bool:
    """Whether this PyTorch has FlexAttention."""
    return flex_attention is not None


def enabled() -> bool:
    """``MEGATRON_SIMPO_FLEX_ATTENTION`` (default 1); ValueError naming it unless 0 or 1."""
    value = os.environ.get("MEGATRON_SIMPO_FLEX_ATTENTION", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MEGATRON_SIMPO_FLEX_ATTENTION must be 0 or 1, got {value!r}")
    return value == "1"


def used_for(query: torch.Tensor) -> bool:
    """Whether an explicit mask or soft-capping on this query goes through FlexAttention: on
    CUDA, where it compiles; on CPUs SDPA's fused kernels take a dense mask well.
    ``MEGATRON_SIMPO_FLEX_ATTENTION=0`` in the environment keeps such layers on SDPA / explicit
    scores (docs/gpu.md: for a GPU stack whose torch.compile cannot build the kernel)."""
    return available() and query.is_cuda and enabled()


@functools.cache
def _compiled():
    return torch.compile(flex_attention, dynamic=True)


def block_mask(masked_out: torch.Tensor):
    """FlexAttention's block mask of a bool mask [b or 1, 1, sq, sk] (True: may NOT attend)."""
    allowed = ~masked_out[:, 0]
    batch = allowed.shape[0]

    def mask_mod(b, h, q, kv):
        return allowed[b if batch > 1 else 0, q, kv]

    sq, sk = allowed.shape[-2:]
    return create_block_mask(mask_mod, batch if batch > 1 else None, None, sq, sk,
                             device=masked_out.device, BLOCK_SIZE=BLOCK,
                             _compile=masked_out.is_cuda)


def layout_block_mask(query_at: torch.Tensor, key_at: torch.Tensor,
                      cu_seqlens: torch.Tensor | None = None, window: int | None = None):
    """FlexAttention's block mask of a row layout, with no dense mask at all: query i may see
    key j when ``key_at[j] <= query_at[i]`` (causal), both lie in the same segment of a packed
    row (``cu_seqlens``: its segment starts and end) and ``query_at[i] - key_at[j] <= window``.
    ``query_at`` [sq] / ``key_at`` [sk]: the row positions of the queries and keys (a context-
    parallel rank's chunks, the gathered keys; else the last sq of 0..sk-1 and 0..sk-1)."""
    query_segment = key_segment = None
    if cu_seqlens is not None:  # key_at spans the whole row
        segment = segment_ids(cu_seqlens, key_at.shape[0], key_at.device)
        query_segment, key_segment = segment[query_at], segment[key_at]

    def mask_mod(b, h, q, kv):
        allowed = key_at[kv] <= query_at[q]
        if query_segment is not None:
            allowed = allowed & (query_segment[q] == key_segment[kv])
        if window is not None:
            allowed = allowed & (query_at[q] - key_at[kv] <= window)
        return allowed

    return create_block_mask(mask_mod, None, None, query_at.shape[0], key_at.shape[0],
                             device=key_at.device, BLOCK_SIZE=BLOCK, _compile=key_at.is_cuda)


def flex_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 masked_out: torch.Tensor | None,
                 scale: float, softcap: float | None = None, *, mask=None) -> torch.Tensor:
    """Attention through FlexAttention.

    q [b, np, sq, hn]; k and v [b, ng, sk, hn] (ng query groups: GQA without repeating them);
    ``masked_out`` [b or 1, 1, sq, sk] True where a query may not attend (None with ``mask``).
    Returns [b, np, sq, hn] = ``softmax_fp32(cap(q k^T * scale) + mask) v`` with ``cap`` the soft-cap
    ``c * tanh(s / c)`` when ``softcap`` is given, else the identity. ``mask``: the block mask
    if already made (of ``masked_out``, or of the row's layout; ``forward_cache`` shares it).
    """
    if not available():
        raise RuntimeError("FlexAttention needs PyTorch >= 2.5")
    def capped(score, b, h, q_index, kv_index):
        return torch.tanh(score / softcap) * softcap

    run = _compiled() if q.is_cuda else flex_attention
    return run(q, k, v, score_mod=None if softcap is None else capped, block_mask=mask if mask is not None else block_mask(masked_out), scale=scale,
               enable_gqa=q.shape[1] != k.shape[1])
