"""Context parallelism (CP) for the local spec's attention: keys and values gathered over the
CP group, queries kept local, masks taken at the rank's query rows.

Each CP rank holds ``context_parallel_positions(s, r, CP)`` of every row of s positions
(chunks r and 2*CP-1-r of 2*CP, Megatron-Core's load-balanced split). Attention is then

    out_r = softmax(q_r K^T * scale + mask[rows(r), cols]) V,  K = [k_0; k_1; ...; k_{CP-1}]

with K and V the concatenation, in rank order, of every rank's keys and values (one
all-gather of [s/CP, b, ng, 2*hn]: grouped-query attention keeps it small), and ``cols`` the
row positions of that concatenation. The key order does not matter to attention as long as the
mask's columns follow it. The backward of the all-gather is a reduce-scatter: rank r's key and
value gradients are the sums over every rank's queries of their gradients at r's positions.

Masks: causal (``key_at <= query_at``), a packed row's segments (the same segment and causal),
or any explicit [b, 1, s, s] bool mask of the whole row (True: may NOT attend, Megatron's
convention), taken at [query rows, gathered key columns]; sliding windows are added from the
same positions (``SDPAttention._full_mask``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_simpo.distributed.parallel import context_parallel_positions
from megatron_simpo.model import forward_cache


def context_parallel_group(pg_collection=None):
    """The CP process group of this rank, or None without context parallelism."""
    group = getattr(pg_collection, "cp", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group(check_initialized=False)
    if group is None or dist.get_world_size(group) == 1:
        return None
    return group


class _GatherSequence(torch.autograd.Function):
    """[s, ...] per rank -> [size * s, ...] in rank order; backward: the sum over ranks of the
    gradient, each rank keeping its own slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        local = grad.shape[0] // size
        if dist.get_backend(group) == "nccl":
            out = torch.empty((local, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        dist.all_reduce(grad, group=group)  # gloo has no reduce-scatter
        return grad[rank * local:(rank + 1) * local].clone(), None


def gather_sequence(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every CP rank's [s, ...] along dim 0, in rank order (differentiable, see the class)."""
    return _GatherSequence.apply(tensor, group)


def gather_keys_values(key: torch.Tensor, value: torch.Tensor, group
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """key, value [s/CP, b, ng, hn] of this rank -> (key, value [s, b, ng, hn] of all ranks in
    rank order, query_at [s/CP] this rank's row positions, key_at [s] the gathered keys')."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    local, hn = key.shape[0], key.shape[-1]
    both = gather_sequence(torch.cat([key, value], dim=-1), group)
    length = local * size
    query_at = context_parallel_positions(length, rank, size, device=key.device)
    key_at = torch.cat([context_parallel_positions(length, r, size, device=key.device)
                        for r in range(size)])
    return both[..., :hn], both[..., hn:], query_at, key_at


def shared_mask(attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                query_at: torch.Tensor, key_at: torch.Tensor, dtype: torch.dtype | None = None,
                *, rank: int) -> torch.Tensor:
    """``context_parallel_mask``, made once per forward (``forward_cache``: every layer gets
    the same mask object while its source, the whole row's mask or the segment starts, is the
    same; causal rows by the CP ``rank`` and the lengths, which fix their positions: no value
    is read from the device); with ``dtype`` as SDPA's additive mask (0 where a
    query may attend, -inf where not), which SDPA uses as it is (a bool mask it would convert
    anew in every layer)."""
    source = attention_mask if attention_mask is not None else cu_seqlens
    source = forward_cache.CAUSAL if source is None else source
    key = ("context parallel", rank, query_at.shape[0], key_at.shape[0], query_at.device)
    masked = forward_cache.per_forward(source, key, lambda: context_parallel_mask(
        attention_mask, cu_seqlens, query_at, key_at))
    if dtype is None:
        return masked
    return forward_cache.per_forward(source, (*key, dtype), lambda: torch.zeros(
        masked.shape, dtype=dtype, device=masked.device).masked_fill(masked, float("-inf")))


def segment_ids(cu_seqlens: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """[length] the segment of each position of a packed row whose segment starts and end are
    ``cu_seqlens`` (0 for the first segment, 1 for the next, ...)."""
    return torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=device),
                                   cu_seqlens.diff().long().to(device), output_size=length)


def context_parallel_mask(attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                          query_at: torch.Tensor, key_at: torch.Tensor) -> torch.Tensor:
    """[b or 1, 1, sq, sk] bool, True where a query may NOT attend: the whole row's mask at the
    row positions ``query_at`` of the queries and ``key_at`` of the keys (this CP rank's query
    rows and the gathered key columns; all positions for a whole row, as
    ``attention.segment_causal_mask`` takes it). ``attention_mask`` [b, 1, s, s] (any mask),
    else a packed row's segment starts ``cu_seqlens`` (block-diagonal causal), else causal."""
    length = key_at.shape[0]
    if attention_mask is not None:
        if attention_mask.shape[-2:] != (length, length):
            raise ValueError(f"context parallelism takes the whole row's [b, 1, {length}, "
                             f"{length}] mask, got {tuple(attention_mask.shape)}")
        return attention_mask[..., query_at, :][..., key_at]
    masked = key_at.unsqueeze(0) > query_at.unsqueeze(1)
    if cu_seqlens is not None:
        segment = segment_ids(cu_seqlens, length, key_at.device)
        masked = masked | (segment[query_at].unsqueeze(1) != segment[key_at].unsqueeze(0))
    return masked.view(1, 1, *masked.shape)


# ---- causal and packed rows without a row mask (CPU) -------------------------------------------
# A causal row needs no [s/CP, s] mask. The row is 2*CP chunks of C positions; rank r's
# queries are chunks r and 2CP-1-r, the gathered keys hold every chunk once (in rank order).
# Query chunk c sees the key chunks before it fully and its own causally (the diagonal block),
# none after it. Each (query chunk, key chunk) block is one call of the CPU flash kernel, which
# also returns its log-sum-exp, and the blocks merge exactly:
#
#     lse = logaddexp(lse_1, lse_2),   out = e^(lse_1 - lse) out_1 + e^(lse_2 - lse) out_2.
#
# Backward: the kernel's backward of each block, given the MERGED output and log-sum-exp,
# computes P = exp(S - lse) and D = rowsum(dO * O) of the whole softmax, hence exactly the whole
# attention's gradients restricted to that block's keys (the merge of ring attention).
# Grouped-query attention without repeating keys and values: for a full block, the query heads
# of one key group are stacked along the sequence ([b, ng, rep * C, hn] against [b, ng, C, hn]);
# only the diagonal block, whose causal mask needs aligned rows, repeats its C keys per head.
# A packed row (several sequences) adds its segments: a block whose queries and keys lie in one
# segment needs nothing more, a block they share no segment of is skipped, and only a block
# across a segment boundary takes a [C, C] mask.
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_cpu_backward = getattr(torch.ops.aten,
                              "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def chunked_causal_available(query: torch.Tensor) -> bool:
    """Whether :func:`chunked_causal_attention` can run on ``query`` (CPU, this PyTorch)."""
    return query.device.type == "cpu" and _flash_cpu is not None and \
        _flash_cpu_backward is not None


def _blocks(query_chunk: int, key_chunks: tuple[int, ...]) -> list[tuple[int, bool]]:
    """(index of the key chunk in gathered order, diagonal?) for the chunks a query chunk sees,
    the diagonal first (every query sees itself there: the merged log-sum-exp is finite from
    the first block on)."""
    seen = [(j, chunk == query_chunk) for j, chunk in enumerate(key_chunks)
            if chunk <= query_chunk]
    return sorted(seen, key=lambda block: not block[1])


_SKIP = object()


def _block_mask(segment: torch.Tensor | None, query_chunk: int, key_chunk: int, size: int,
                diagonal: bool, dtype: torch.dtype):
    """A packed row's mask for one block: None when the kernel's own (causal on the diagonal,
    none elsewhere) is the block's, ``_SKIP`` when no query of the block sees any of its keys,
    else (additive [C, C] mask: 0 where a query may attend, -inf where not; [C] bool: the
    queries that see at least one key of the block)."""
    if segment is None:
        return None
    queries = segment[query_chunk * size:(query_chunk + 1) * size]
    keys = segment[key_chunk * size:(key_chunk + 1) * size]
    allowed = queries.unsqueeze(1) == keys.unsqueeze(0)
    if diagonal:
        causal = torch.ones(size, size, dtype=torch.bool, device=segment.device).tril()
        allowed &= causal
        if torch.equal(allowed, causal):
            return None
    elif bool(allowed.all()):
        return None
    if not bool(allowed.any()):
        return _SKIP
    mask = torch.zeros(size, size, dtype=dtype, device=segment.device)
    return mask.masked_fill(~allowed, float("-inf")), allowed.any(dim=1)


def _visible_blocks(query_chunk: int, key_chunks: tuple[int, ...], size: int,
                    segment: torch.Tensor | None, dtype: torch.dtype):
    """(key columns in gathered order, diagonal?, ``_block_mask``) of each block a query chunk
    attends, the diagonal first; blocks none of its queries see are left out."""
    for j, diagonal in _blocks(query_chunk, key_chunks):
        masking = _block_mask(segment, query_chunk, key_chunks[j], size, diagonal, dtype)
        if masking is not _SKIP:
            yield slice(j * size, (j + 1) * size), diagonal, masking


def _block(queries, keys, values, masking, diagonal: bool, rep: int, scale: float):
    """One block through the CPU flash kernel: (out [b, ng, rep * C, hn], lse [b, ng, rep * C])
    with ``lse`` -inf for queries that see none of its keys (the kernel reports 0 there)."""
    b, heads, size, hn = queries.shape
    groups = heads // rep
    mask, visible = (None, None) if masking is None else masking
    if diagonal:
        keys, values = (t.repeat_interleave(rep, dim=1) for t in (keys, values))
        out, lse = _flash_cpu(queries, keys, values, 0.0, mask is None, attn_mask=mask,
                              scale=scale)
        out, lse = out.reshape(b, groups, rep * size, hn), lse.reshape(b, groups, rep * size)
    else:
        out, lse = _flash_cpu(queries.reshape(b, groups, rep * size, hn), keys, values, 0.0,
                              False, attn_mask=None if mask is None else mask.repeat(rep, 1),
                              scale=scale)
    if visible is not None:
        lse = torch.where(visible.repeat(rep), lse, float("-inf"))
    return out, lse


def _block_backward(upstream, queries, keys, values, out, lse, masking, diagonal: bool,
                    rep: int, scale: float):
    """:func:`_block`'s backward, given the MERGED ``out`` [b, ng, rep * C, hn] and ``lse``
    [b, ng, rep * C] and their gradient ``upstream`` (same layout as ``out``): the block's
    query gradient [b, ng, rep * C, hn] and key/value gradients [b, ng, C, hn]."""
    b, heads, size, hn = queries.shape
    groups = heads // rep
    mask = None if masking is None else masking[0]
    if diagonal:
        keys, values = (t.repeat_interleave(rep, dim=1) for t in (keys, values))
        gq, gk, gv = _flash_cpu_backward(
            upstream.reshape(b, heads, size, hn), queries, keys, values,
            out.reshape(b, heads, size, hn), lse.reshape(b, heads, size), 0.0, mask is None,
            attn_mask=mask, scale=scale)
        return (gq.reshape(b, groups, rep * size, hn),
                *(t.reshape(b, groups, rep, size, hn).sum(2) for t in (gk, gv)))
    return _flash_cpu_backward(
        upstream, queries.reshape(b, groups, rep * size, hn), keys, values, out, lse, 0.0, False,
        attn_mask=None if mask is None else mask.repeat(rep, 1), scale=scale)


class _ChunkedCausal(torch.autograd.Function):
    """q [b, ng * rep, n * C, hn] (n query chunks of C positions), k and v [b, ng, m * C, hn]
    (m key chunks); ``query_chunks`` / ``key_chunks``: each chunk's index in the row;
    ``segment`` [m * C]: a packed row's segment id at each row position (None: one sequence).
    Returns [b, ng * rep, n * C, hn]."""

    @staticmethod
    def forward(ctx, q, k, v, query_chunks: tuple[int, ...], key_chunks: tuple[int, ...],
                scale: float, segment: torch.Tensor | None):
        b, heads, _, hn = q.shape
        groups, size = k.shape[1], k.shape[2] // len(key_chunks)
        rep = heads // groups
        outs, lses = [], []
        for i, chunk in enumerate(query_chunks):
            queries = q[:, :, i * size:(i + 1) * size]
            out = lse = None
            for cols, diagonal, masking in _visible_blocks(chunk, key_chunks, size, segment,
                                                           q.dtype):
                part, part_lse = _block(queries, k[:, :, cols], v[:, :, cols], masking,
                                        diagonal, rep, scale)
                if out is None:
                    out, lse = part.float(), part_lse
                    continue
                merged = torch.logaddexp(lse, part_lse)
                out = (torch.exp(lse - merged).unsqueeze(-1) * out
                       + torch.exp(part_lse - merged).unsqueeze(-1) * part.float())
                lse = merged
            outs.append(out.to(q.dtype).reshape(b, heads, size, hn))
            lses.append(lse.reshape(b, heads, size))
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse, segment)
        ctx.chunks, ctx.scale = (query_chunks, key_chunks), scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out_all, lse_all, segment = ctx.saved_tensors
        query_chunks, key_chunks = ctx.chunks
        b, heads, _, hn = q.shape
        groups, size = k.shape[1], k.shape[2] // len(key_chunks)
        rep = heads // groups
        # the blocks' gradients are summed in fp32 and rounded once to the inputs' dtype
        dq = torch.empty_like(q)
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))
        for i, chunk in enumerate(query_chunks):
            rows = slice(i * size, (i + 1) * size)
            queries = q[:, :, rows]
            out = out_all[:, :, rows].reshape(b, groups, rep * size, hn)
            lse = lse_all[:, :, rows].reshape(b, groups, rep * size)
            upstream = grad[:, :, rows].reshape(b, groups, rep * size, hn)
            grad_q = torch.zeros(b, groups, rep * size, hn, dtype=torch.float32,
                                 device=q.device)
            for cols, diagonal, masking in _visible_blocks(chunk, key_chunks, size, segment,
                                                           q.dtype):
                gq, gk, gv = _block_backward(upstream, queries, k[:, :, cols], v[:, :, cols],
                                             out, lse, masking, diagonal, rep, ctx.scale)
                grad_q += gq
                dk[:, :, cols] += gk
                dv[:, :, cols] += gv
            dq[:, :, rows] = grad_q.reshape(b, heads, size, hn)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             query_at: torch.Tensor, key_at: torch.Tensor, scale: float,
                             cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this CP rank's queries, with no [s/CP, s] mask (CPU).

    q [b, np, s/CP, hn] at row positions ``query_at`` (two chunks of Megatron's split); k, v
    [b, ng, s, hn] (ng query groups, np = ng * rep; not repeated) gathered in rank order, at row
    positions ``key_at``. ``cu_seqlens``: a packed row's segment starts and end (each query
    sees only its own segment: the blocks two segments share get a [C, C] mask, the others
    none or are skipped). Returns [b, np, s/CP, hn] = softmax(q k^T * scale, keys at or before
    each query) v.
    """
    size = q.shape[2] // 2
    query_chunks = tuple((query_at[::size] // size).tolist())
    key_chunks = tuple((key_at[::size] // size).tolist())
    segment = (None if cu_seqlens is None else
               segment_ids(cu_seqlens, key_at.shape[0], q.device))
    return _ChunkedCausal.apply(q, k, v, query_chunks, key_chunks, scale, segment)
