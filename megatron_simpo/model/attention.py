"""Core attention for the local layer spec on PyTorch's ``scaled_dot_product_attention``.

Megatron-Core's local ``DotProductAttention`` computes attention unfused: a baddbmm of Q and K
into a [b, np, s, s] score buffer, a masked softmax, a bmm with V. ``SDPAttention`` is the same
module (it inherits the partition sizes, softmax scale and checks) with its forward on
``torch.nn.functional.scaled_dot_product_attention``, which PyTorch runs with fused kernels on
CPUs and on GPUs without Transformer Engine. Inputs and output keep Megatron's layout:
query [sq, b, np, hn], key and value [sk, b, ng, hn] (ng query groups, GQA), output [sq, b, hp].
It equals ``DotProductAttention`` within 1e-5 in fp32 (tests/test_attention.py). What it does
not do (attention dropout, learnable softmax offsets, attention bias) is refused, not ignored.

Gemma-2's attention is here too, combined with whatever mask the batch needs (causal, or the
block-diagonal mask of packed rows):
- sliding windows: on the layers Megatron-Core's ``window_size`` / ``window_attn_skip_freq``
  select (``is_layer_window_attention``, global layer numbers), a query at position i sees the
  keys j with ``i - window_size[0] <= j <= i`` (transformers: ``i - j < sliding_window``);
- attention-logit soft-capping (``softcap``, from the layer spec): scores
  ``c * tanh(q.k * scale / c)`` before the mask and an fp32 softmax, as transformers' eager
  attention; SDPA cannot cap, so these layers compute the [b, np, sq, sk] scores explicitly.

On GPUs:
- SDPA's backends are tried in the order flash, memory-efficient, cuDNN, math. PyTorch's own
  order puts cuDNN first on Hopper, and cuDNN builds an execution plan for every new shape
  (~4-5 ms of host time per layer and direction on an H200): with micro-batches padded to their
  own longest row, nearly every micro-batch has a new shape (docs/performance.md, 2026-11-28).
- Packed rows (several sequences back to back in one row, ``PackedSeqParams`` with
  ``qkv_format="sbhd"`` and ``cu_seqlens``) go through PyTorch's variable-length flash attention
  (``torch.nn.attention.varlen``) in bf16/fp16: each sequence attends causally to itself, with
  no [s, s] mask. Elsewhere (CPUs, fp32, an older PyTorch) the same segments become the
  block-diagonal causal mask.
- Every other mask (packed rows in fp32 or with soft-capping, shared-prompt rows, sliding
  windows, context parallelism) and every soft-capped layer goes through FlexAttention
  (:mod:`megatron_simpo.model.flex`: one compiled kernel that skips the blocks the mask rules
  out, soft-capping as a score modifier; its block mask is made once per forward and shared by
  the layers), not through SDPA with a dense mask. Causal and packed rows, windows and CP
  included, get their block mask from the row's layout (positions, segments, the window) with
  no dense mask at all; only an explicit mask (shared-prompt rows) is read as a tensor. Plain
  causal rows stay on SDPA's flash kernel.

Context parallelism (``context_parallel_size`` > 1): each rank attends its own queries to the
keys and values of the whole row, all-gathered over the CP group, under the whole row's mask
taken at its query rows (any mask: causal, packed segments, an explicit [b, 1, s, s] one, with
windows and soft-capping): :mod:`megatron_simpo.model.context_parallel`. Causal and packed rows
on the CPU need no row mask there: each of the rank's two query chunks attends the key chunks
at or before it through the CPU flash kernel, block by block (a [C, C] mask only where a packed
row's segment ends inside the block), the blocks merged by their log-sum-exp.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_simpo.model import flex, forward_cache
from megatron_simpo.model.context_parallel import (chunked_causal_attention,
                                                    chunked_causal_available,
                                                    context_parallel_group, context_parallel_mask,
                                                    gather_keys_values, shared_mask)

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # PyTorch < 2.10
    varlen_attn = None

CUDA_SDPA_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)
_VARLEN_ARGS = set(inspect.signature(varlen_attn).parameters) if varlen_attn else set()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``scaled_dot_product_attention``, on CUDA with the backend order of the module doc."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(CUDA_SDPA_ORDER, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def grouped_sdpa(q: torch.Tensor) -> bool:
    """Whether causal SDPA takes the key/value groups as they are (``enable_gqa``, PyTorch >=
    2.5) instead of copies repeated to every head: on CPUs, and where CUDA's flash kernel takes
    them (bf16/fp16, Ampere or newer, head dim <= 256). Elsewhere no fused CUDA kernel takes
    ``enable_gqa`` (the memory-efficient one, fp32's, does not) and SDPA would fall back to
    its math kernel, which holds the [s, s] scores."""
    if not _SDPA_GQA:
        return False
    if not q.is_cuda:
        return True
    return (q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def segment_causal_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, 1, s, s] bool, True where a query may NOT attend (Megatron's convention): each
    segment [cu[i], cu[i+1]) attends causally to itself only."""
    positions = torch.arange(length, device=cu_seqlens.device)
    return context_parallel_mask(None, cu_seqlens, positions, positions)


def _row_positions(sq: int, sk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row positions of sq queries and sk keys without context parallelism: the queries are
    the last sq of the sk keys' 0 .. sk-1."""
    return torch.arange(sk - sq, sk, device=device), torch.arange(sk, device=device)


def uses_varlen(query: torch.Tensor) -> bool:
    """Whether packed rows of this query go through variable-length flash attention."""
    return (varlen_attn is not None and query.is_cuda
            and query.dtype in (torch.bfloat16, torch.float16))


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` through ``scaled_dot_product_attention`` (see the module doc)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None, softcap: float | None = None):
        self_config = config
        if config.context_parallel_size > 1:
            # Megatron's DotProductAttention refuses CP (it is TE's there); this module does it.
            config = copy.copy(config)
            config.context_parallel_size = 1
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        refused = [what for what, present in (
            (f"attention dropout {dropout}", dropout > 0),
            (f"softmax type {getattr(config, 'softmax_type', 'vanilla')}",
             getattr(config, "softmax_type", "vanilla") != "vanilla"),
            (f"a window {config.window_size} that looks ahead", config.window_size is not None
             and tuple(config.window_size)[1] != 0),
        ) if present]
        if refused:
            raise ValueError(f"the local layer spec's SDPA attention does not do "
                             f"{', '.join(refused)}: use --transformer-impl transformer_engine")
        # DotProductAttention divides its scale by the layer number when scaling query-key
        # products per layer and multiplies it back inside its softmax: the product is this.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if
                                                config.apply_query_key_layer_scaling else 1)
        self.softcap = softcap
        self.window = (config.window_size[0] if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)
        self.cp_group = (context_parallel_group(pg_collection)
                         if self_config.context_parallel_size > 1 else None)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None
                ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn]; ``attention_mask`` True where a
        query may NOT attend (Megatron's convention), or None with a causal mask type.
        Under context parallelism sq and sk are this rank's positions and ``attention_mask`` is
        the whole row's [b, 1, s, s]. Returns [sq, b, np * hn]."""
        if attention_bias is not None:
            raise ValueError("the local layer spec's SDPA attention takes no attention bias: use "
                             "--transformer-impl transformer_engine")
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "sbhd" or query.shape[1] != 1:
                raise ValueError("the local layer spec's SDPA attention takes packed sequences as "
                                 "one row in sbhd layout (THD is Transformer Engine's), got "
                                 f"{packed_seq_params.qkv_format} with {query.shape[1]} rows")
        mask_type = attn_mask_type or self.attn_mask_type
        positions = None
        # What the mask of this forward is made from (flex's block masks are shared by layers).
        source = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else attention_mask
        if self.cp_group is not None:
            key, value, *positions = gather_keys_values(key, value, self.cp_group)
            if attention_mask is None and packed_seq_params is None and \
                    mask_type != AttnMaskType.causal:
                raise ValueError(f"SDPA attention: no mask given for mask type {mask_type.name}")
            if attention_mask is None and mask_type == AttnMaskType.causal \
                    and self.window is None and self.softcap is None \
                    and chunked_causal_available(query):
                return self._chunked_causal(query, key, value, positions, packed_seq_params)
        elif packed_seq_params is not None and uses_varlen(query) and self.softcap is None and (
                self.window is None or "window_size" in _VARLEN_ARGS):
            return self._varlen(query, key, value, packed_seq_params)
        if attention_mask is None and mask_type == AttnMaskType.causal and flex.used_for(query) \
                and (positions is not None or packed_seq_params is not None
                     or self.window is not None or self.softcap is not None):
            return self._flex_layout(query, key, value, packed_seq_params, positions)
        if self.cp_group is not None:
            # SDPA takes it additive; FlexAttention and the explicit scores as a bool mask
            plain = self.window is None and self.softcap is None and not flex.used_for(query)
            attention_mask = shared_mask(
                attention_mask, None if packed_seq_params is None else
                packed_seq_params.cu_seqlens_q, *positions, dtype=query.dtype if plain else None,
                rank=torch.distributed.get_rank(self.cp_group))
        elif packed_seq_params is not None:
            attention_mask = segment_causal_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.window is not None or self.softcap is not None:
            attention_mask = self._full_mask(attention_mask, mask_type, q.shape[2], k.shape[2],
                                             q.device, positions)
        if attention_mask is not None and flex.used_for(q):
            if attention_mask.dtype != torch.bool:
                raise ValueError("FlexAttention takes a bool mask (True: may not attend)")
            block = forward_cache.per_forward(
                forward_cache.CAUSAL if source is None else source,
                (self.window, tuple(attention_mask.shape), attention_mask.device),
                functools.partial(flex.block_mask, attention_mask))
            context = flex.flex_context(q, k, v, attention_mask, self.sdpa_scale, self.softcap,
                                        mask=block)
            return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1],
                                                       self.hidden_size_per_partition)
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if attention_mask is None and self.softcap is None and grouped_sdpa(q):
            if mask_type != AttnMaskType.causal:
                raise ValueError(f"SDPA attention: no mask given for mask type {mask_type.name}")
            context = sdpa(q, k, v, is_causal=True, scale=self.sdpa_scale, enable_gqa=repeat > 1)
            return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1],
                                                       self.hidden_size_per_partition)
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if self.softcap is not None:
            context = softcapped_attention(q, k, v, attention_mask, self.sdpa_scale, self.softcap)
        elif attention_mask is not None and attention_mask.dtype != torch.bool:  # additive
            context = sdpa(q, k, v, attn_mask=attention_mask, scale=self.sdpa_scale)
        elif attention_mask is not None:
            context = sdpa(q, k, v, attn_mask=~attention_mask, scale=self.sdpa_scale)
        elif mask_type == AttnMaskType.causal:
            context = sdpa(q, k, v, is_causal=True, scale=self.sdpa_scale)
        else:
            raise ValueError(f"SDPA attention: no mask given for mask type {mask_type.name}")
        sq, b = query.shape[0], query.shape[1]
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _flex_layout(self, query, key, value, packed_seq_params, positions) -> torch.Tensor:
        """Causal or packed rows (no explicit mask) on FlexAttention, its block mask made from
        the row's layout (``flex.layout_block_mask``: positions, segments, this layer's window)
        with no dense mask; under context parallelism at the rank's query positions and the
        gathered keys'. query [sq, b, np, hn], key/value [sk, b, ng, hn]; [sq, b, hp]."""
        sq, sk, device = query.shape[0], key.shape[0], query.device
        query_at, key_at = positions or _row_positions(sq, sk, device)
        cu = None if packed_seq_params is None else packed_seq_params.cu_seqlens_q
        block = forward_cache.per_forward(
            forward_cache.CAUSAL if cu is None else cu, ("layout", self.window, sq, sk, device),
            lambda: flex.layout_block_mask(query_at, key_at, cu, self.window))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = flex.flex_context(q, k, v, None, self.sdpa_scale, self.softcap, mask=block)
        return context.permute(2, 0, 1, 3).reshape(sq, query.shape[1],
                                                   self.hidden_size_per_partition)

    def _chunked_causal(self, query, key, value, positions, packed_seq_params) -> torch.Tensor:
        """Causal and packed rows under context parallelism on the CPU: no [s/CP, s] mask
        (``context_parallel.chunked_causal_attention``). key/value: gathered [s, b, ng, hn]."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = chunked_causal_attention(
            q, k, v, *positions, self.sdpa_scale,
            None if packed_seq_params is None else packed_seq_params.cu_seqlens_q)
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1],
                                                   self.hidden_size_per_partition)

    def _full_mask(self, attention_mask, mask_type, sq: int, sk: int, device,
                   positions=None) -> torch.Tensor:
        """The mask as a bool tensor (True: may NOT attend), with this layer's window;
        ``positions`` (query_at [sq], key_at [sk]): the row positions of queries and keys
        (context parallelism), else the last sq of 0..sk-1 and 0..sk-1."""
        if attention_mask is None:
            if mask_type != AttnMaskType.causal:
                raise ValueError(f"SDPA attention: no mask given for mask type {mask_type.name}")
            attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(
                sk - sq + 1).view(1, 1, sq, sk)
        if self.window is None:
            return attention_mask
        query_at, key_at = positions or _row_positions(sq, sk, device)
        distance = query_at.unsqueeze(1) - key_at.unsqueeze(0)
        return attention_mask | (distance > self.window).view(1, 1, sq, sk)

    def _varlen(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """Packed row [t, 1, heads, hn] through variable-length flash attention: [t, 1, hp]."""
        # [t, 1, heads, hn] -> [t, heads, hn]
        q, k, v = (t[:, 0].contiguous() for t in (query, key, value))
        options = {"scale": self.sdpa_scale}
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if "enable_gqa" in _VARLEN_ARGS:
            options["enable_gqa"] = repeat > 1
        elif repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if "window_size" in _VARLEN_ARGS:
            options["window_size"] = (-1 if self.window is None else self.window, 0)  # causal
        else:
            options["is_causal"] = True
        cu, longest = packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q
        context = varlen_attn(q, k, v, cu, cu, longest, longest, **options)
        # [t, np, hn] -> [t, 1, np * hn]
        return context.reshape(query.shape[0], 1, self.hidden_size_per_partition)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         masked_out: torch.Tensor, scale: float, cap: float) -> torch.Tensor:
    """Attention with soft-capped scores, transformers' eager Gemma-2 attention:
    ``softmax_fp32(c * tanh(q k^T * scale / c) + mask) v``.

    q [b, np, sq, hn], k and v [b, np, sk, hn] (groups already repeated), ``masked_out``
    [.., sq, sk] True where a query may not attend. Returns [b, np, sq, hn].
    """
    scores = torch.tanh(torch.matmul(q, k.transpose(-2, -1)) * scale / cap) * cap
    scores = scores.masked_fill(masked_out, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
