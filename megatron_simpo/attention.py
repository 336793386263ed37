"""Core attention for the local layer spec on PyTorch's ``scaled_dot_product_attention``.

Megatron-Core's local ``DotProductAttention`` computes attention unfused: a baddbmm of Q and K
into a [b, np, s, s] score buffer, a masked softmax, a bmm with V. ``SDPAttention`` is the same
module (it inherits the partition sizes, softmax scale and checks) with its forward on
``torch.nn.functional.scaled_dot_product_attention``, which PyTorch runs with fused kernels on
CPUs and on GPUs without Transformer Engine. Inputs and output keep Megatron's layout:
query [sq, b, np, hn], key and value [sk, b, ng, hn] (ng query groups, GQA), output [sq, b, hp].
It equals ``DotProductAttention`` within 1e-5 in fp32 (tests/test_attention.py). What it does
not do (attention dropout, learnable softmax offsets, sliding windows, packed sequences,
attention bias) is refused, not ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` through ``scaled_dot_product_attention`` (see the module doc)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        refused = [what for what, present in (
            (f"attention dropout {dropout}", dropout > 0),
            (f"softmax type {getattr(config, 'softmax_type', 'vanilla')}",
             getattr(config, "softmax_type", "vanilla") != "vanilla"),
            ("sliding-window attention", getattr(config, "window_size", None) is not None),
        ) if present]
        if refused:
            raise ValueError(f"the local layer spec's SDPA attention does not do "
                             f"{', '.join(refused)}: use --transformer-impl transformer_engine")
        # DotProductAttention divides its scale by the layer number when scaling query-key
        # products per layer and multiplies it back inside its softmax: the product is this.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if
                                                config.apply_query_key_layer_scaling else 1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None
                ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn]; ``attention_mask`` True where a
        query may NOT attend (Megatron's convention), or None with a causal mask type.
        Returns [sq, b, np * hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("the local layer spec's SDPA attention takes no packed sequences or "
                             "attention bias: use --transformer-impl transformer_engine")
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if attention_mask is not None:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask,
                                                     scale=self.sdpa_scale)
        elif mask_type == AttnMaskType.causal:
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                     scale=self.sdpa_scale)
        else:
            raise ValueError(f"SDPA attention: no mask given for mask type {mask_type.name}")
        sq, b = query.shape[0], query.shape[1]
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
