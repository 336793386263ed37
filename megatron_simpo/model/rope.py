"""RoPE applied with its cosines and sines made once per forward, not once per layer.

Megatron-Core's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``, used wherever its
fused kernel is off: the local spec on every device) computes, for the queries and again for the
keys of every layer,

    cos_ = (cos(freqs) * mscale).to(t.dtype);  sin_ = (sin(freqs) * mscale).to(t.dtype)
    out = cat((t * cos_ + rotate_half(t) * sin_, t[..., rot_dim:]))

from the one ``freqs`` [s, b, 1, d] tensor the model hands every layer. :func:`apply` makes
``cos_`` and ``sin_`` once per forward (``forward_cache``, keyed by that tensor) and, when RoPE
rotates the whole head (``t[..., rot_dim:]`` empty, every model here), leaves out the
concatenation, which only copied ``t``: the same values bit for bit, with ~10 fewer operators
per layer forward (and the copies of queries and keys) on the host's dispatch path, which
short micro-batches on a GPU wait on (docs/performance.md, 2026-11-29). Anything else (fused
RoPE, packed THD rows, interleaved or multi-latent rotary, partial rotation) goes to
Megatron-Core's own function. :func:`install` puts :func:`apply` where Megatron-Core's attention
looks it up.
"""

from __future__ import annotations

import torch

from megatron_simpo.model import forward_cache

_megatron_apply = None  # Megatron-Core's apply_rotary_pos_emb, once installed


def apply(t: torch.Tensor, freqs: torch.Tensor, config, cu_seqlens=None, mscale: float = 1.0,
          cp_group=None, **options) -> torch.Tensor:
    """``apply_rotary_pos_emb`` of Megatron-Core (same arguments): t [s, b, h, d] rotated by
    ``freqs`` [s, b or 1, 1, d]."""
    from megatron.core.models.common.embeddings.rope_utils import _rotate_half

    if (cu_seqlens is not None or config.apply_rope_fusion or config.rotary_interleaved
            or getattr(config, "multi_latent_attention", False) or any(options.values())
            or getattr(config, "mrope_section", None) is not None
            or freqs.shape[-1] != t.shape[-1]):
        return _megatron_apply(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale,
                               cp_group=cp_group, **options)
    # A view made anew in every layer (Gemma-3's layer picks its table of the model's stacked
    # two, [2, s, b, 1, d]) is keyed by the tensor it views and where it lies in it: one entry
    # per table and forward, not one per layer.
    base = freqs if freqs._base is None else freqs._base
    where = (freqs.storage_offset(), tuple(freqs.shape), freqs.stride(), freqs.dtype)
    cos_, sin_ = forward_cache.per_forward(base, ("rope", mscale, t.dtype, where), lambda: (
        (torch.cos(freqs) * mscale).to(t.dtype), (torch.sin(freqs) * mscale).to(t.dtype)))
    return (t * cos_) + (_rotate_half(t, False) * sin_)


def install() -> None:
    """Let Megatron-Core's attention apply RoPE through :func:`apply` (idempotent)."""
    global _megatron_apply
    from megatron.core.transformer import attention

    if attention.apply_rotary_pos_emb is not apply:
        _megatron_apply = attention.apply_rotary_pos_emb
        attention.apply_rotary_pos_emb = apply
