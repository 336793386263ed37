"""Model FLOPs of a preference step: what TFLOP/s and MFU are measured against.

Counts the matrix multiplications a Llama-family decoder needs (2 FLOPs per multiply-add):
the attention projections, the attention itself (causal: only the keys at or before each query;
on sliding-window layers only the window's),
the SwiGLU MLP (of a mixture-of-experts layer: the router and the k experts each token is sent
to, i.e. the *active* parameters), and the output layer for the tokens whose log-probs are needed. Element-wise work
(norms, RoPE, softmax) is left out, as is any recomputation: these are *model* FLOPs, so the
same run reports the same figure with or without activation recomputation.

A training step is forward + backward = 3x the forward FLOPs; DPO's reference forward is extra
work that SimPO does not need, so it is reported separately by the benchmark.
"""

from __future__ import annotations

from typing import Iterable

from megatron_simpo.model.architecture import ModelConfig


def _layer_costs(config: ModelConfig) -> tuple[list[int], int]:
    """Forward FLOPs per token of each layer (projections and its MLP: dense SwiGLU, or the
    router plus the k experts a token uses on an MoE layer) and per attended (query, key) pair
    (scores Q K^T and the weighted sum of values: 2 * q FLOPs each)."""
    h, f = config.hidden_size, config.ffn_hidden_size
    q = config.num_attention_heads * config.kv_channels
    kv = config.num_query_groups * config.kv_channels
    attention = 2 * h * (q + 2 * kv) + 2 * q * h
    dense_mlp = 2 * 3 * h * f
    moe_mlp = (2 * h * config.num_experts + config.moe_router_topk * 2 * 3 * h *
               config.moe_ffn_hidden_size) if config.is_moe else 0
    return ([attention + (moe_mlp if moe else dense_mlp) for moe in config.moe_layer_pattern],
            2 * 2 * q)


def decoder_forward_flops(config: ModelConfig, row_lengths: Iterable[int], *,
                          causal: bool = True) -> int:
    """Forward FLOPs of the decoder layers (no output layer) over rows of the given lengths."""
    per_token, per_pair = _layer_costs(config)
    rows = list(row_lengths)
    total = 0
    for sliding, layer in zip(config.sliding_layers, per_token):
        window = config.sliding_window if sliding and causal else None
        for s in rows:
            total += layer * s + per_pair * attended_pairs(s, causal=causal, window=window)
    return total


def shared_prompt_forward_flops(config: ModelConfig, pairs: Iterable[tuple[int, int, int]]) -> int:
    """Forward FLOPs of the decoder layers over shared-prompt rows (data/shared_rows.py): per
    pair of P prompt, C chosen and R rejected tokens, one row of P + (C - 1) + (R - 1) tokens
    where the prompt attends causally to itself and each response to the prompt and causally to
    itself: P(P+1)/2 + sum over n in (C - 1, R - 1) of n P + n(n+1)/2 attended pairs. (Shared
    rows are refused on sliding-window layers, so no window enters.)"""
    if any(config.sliding_layers):
        raise ValueError("shared-prompt rows are not counted on sliding-window layers")
    per_token, per_pair = _layer_costs(config)
    tokens = attended = 0
    for p, c, r in pairs:
        responses = (c - 1, r - 1)
        tokens += p + sum(responses)
        attended += p * (p + 1) // 2 + sum(n * p + n * (n + 1) // 2 for n in responses)
    return sum(per_token) * tokens + config.num_layers * per_pair * attended


def attended_pairs(s: int, *, causal: bool = True, window: int | None = None) -> int:
    """(query, key) pairs of a row of ``s`` tokens: all of them, the causal ones, or the causal
    ones within a sliding ``window`` (a query sees itself and the ``window - 1`` keys before)."""
    if not causal:
        return s * s
    if window is None or s <= window:
        return s * (s + 1) // 2
    return window * (window + 1) // 2 + (s - window) * window


def output_layer_flops(config: ModelConfig, scored_tokens: int) -> int:
    """Forward FLOPs of the output layer for the tokens that get log-probs (true vocabulary)."""
    return 2 * config.hidden_size * config.vocab_size * scored_tokens


def step_flops(config: ModelConfig, row_lengths: list[int], scored_tokens: int, *,
               shared_pairs: list[tuple[int, int, int]] | None = None) -> int:
    """Model FLOPs of one training step (forward + backward) over these rows, or over these
    pairs' shared-prompt rows ((P, C, R) each; ``row_lengths`` then unused)."""
    decoder = (decoder_forward_flops(config, row_lengths) if shared_pairs is None
               else shared_prompt_forward_flops(config, shared_pairs))
    return 3 * (decoder + output_layer_flops(config, scored_tokens))


# Dense bf16 tensor-core peaks (FLOP/s) of the GPUs this project targets, from NVIDIA's data
# sheets (SXM parts); MFU is reported against these, for FP8 runs as well.
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}


def bf16_peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a device from its name, or None when it is not in the table."""
    if "H100" in device_name and "PCIe" in device_name:
        return 756e12
    for key, value in BF16_PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None
