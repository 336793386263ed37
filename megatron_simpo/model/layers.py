"""The local spec's own layers: RMSNorm (plain, or Gemma's ``(1 + weight)``), the Gemma layers'
post-norms, GeGLU's tanh GELU and soft-capping.

Gemma-2 computes, per decoder layer (transformers' ``Gemma2DecoderLayer``)::

    h = h + post_attention_norm(attention(input_norm(h)))
    h = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))

Megatron-Core's ``TransformerLayer`` has the two pre-norms; the post-norms ride on the linear
layer that ends each branch (:func:`post_norm_row_parallel_linear`: ``linear_proj`` and
``linear_fc2``, after their tensor-parallel reduction), named ``*.post_layernorm.weight`` as
Megatron-Bridge names them. Importing this module does not import Megatron-Core.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.RMSNorm):
    """The local spec's RMSNorm: torch's, built like Megatron-Core's norms and SP-aware.

    Megatron-Core's own local choice (``WrappedTorchNorm``) refuses sequence parallelism and
    keeps an fp32 weight under bf16 (which knocks torch off its fused kernel). This one takes
    ``params_dtype`` like Transformer Engine's norms, and marks its weight ``sequence_parallel``
    so the gradient finalisation sums the partial weight gradients of the TP ranks' sequence
    slices, as it does for Transformer Engine's and Apex's norms.

    With ``layernorm_zero_centered_gamma`` (Gemma) the scale is ``1 + weight`` (weight initialised
    to 0) and the whole norm runs in fp32, cast back to the input's dtype at the end, as
    transformers' ``Gemma2RMSNorm``: ``(x * rsqrt(mean(x^2) + eps) * (1 + w)).type_as(x)``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm is RMSNorm: got normalization={config.normalization!r}")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        if self.zero_centered_gamma:
            with torch.no_grad():
                self.weight.zero_()
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centered_gamma:
            return super().forward(x)
        return F.rms_norm(x.float(), self.normalized_shape, weight=1.0 + self.weight.float(),
                          eps=self.eps).type_as(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (transformers' ``gelu_pytorch_tanh``): Gemma's GeGLU."""
    return F.gelu(x, approximate="tanh")


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Soft-capping ``cap * tanh(x / cap)`` in ``x``'s dtype (transformers' order of operations)."""
    return torch.tanh(x / cap) * cap


@functools.cache
def post_norm_row_parallel_linear():
    """Megatron-Core's ``RowParallelLinear`` followed by an :class:`RMSNorm` of its (reduced)
    output: a Gemma layer's ``linear_proj`` (post-attention norm) and ``linear_fc2``
    (post-feed-forward norm). Made on first use (it imports Megatron-Core)."""
    from megatron.core.tensor_parallel import RowParallelLinear

    class PostNormRowParallelLinear(RowParallelLinear):
        """Y = norm(X A): the norm runs on the full hidden size after the all-reduce (or on the
        sequence slice after the reduce-scatter under sequence parallelism, where its weight's
        gradient is summed over TP ranks like every norm's)."""

        def __init__(self, input_size: int, output_size: int, *args, config, **kwargs):
            super().__init__(input_size, output_size, *args, config=config, **kwargs)
            self.post_layernorm = RMSNorm(config, output_size, eps=config.layernorm_epsilon)

        def forward(self, *args, **kwargs):
            output, bias = super().forward(*args, **kwargs)
            if bias is not None:
                raise ValueError("a post-norm linear layer takes no bias")
            return self.post_layernorm(output), None

    return PostNormRowParallelLinear


@functools.cache
def dual_rope_self_attention():
    """Megatron-Core's ``SelfAttention`` on a model with two RoPE tables (Gemma-3: a local base on
    the sliding-window layers, the global base with its scaling on the others). The model hands
    every layer both tables stacked, [2, s, b, 1, d] (global first); each layer takes its own by
    its window (Megatron-Core's ``is_layer_window_attention``, global layer numbers, so any
    pipeline split). Made on first use (it imports Megatron-Core)."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.utils import is_layer_window_attention

    class DualRopeSelfAttention(SelfAttention):
        """SelfAttention that picks its RoPE table (see ``dual_rope_self_attention``)."""

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.rope_table = int(bool(is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, self.layer_number)))

        def forward(self, *args, rotary_pos_emb=None, **kwargs):
            if rotary_pos_emb is not None:
                if isinstance(rotary_pos_emb, tuple) or rotary_pos_emb.dim() != 5:
                    raise ValueError("a two-table RoPE layer needs the stacked [2, s, b, 1, d] "
                                     "tables of its model (builder.PositionedGPTModel)")
                rotary_pos_emb = rotary_pos_emb[self.rope_table]
            return super().forward(*args, rotary_pos_emb=rotary_pos_emb, **kwargs)

    return DualRopeSelfAttention
