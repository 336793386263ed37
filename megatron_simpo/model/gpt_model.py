"""The ``GPTModel`` subclass every model of this project is: Megatron-Core's, with RoPE taken at
the rows' own positions (packed rows restart theirs; context-parallel ranks hold their chunks;
Gemma-3's local and global tables), the Gemma embedding scale and final-logit soft-capping, and
the last stage returning logits or final hidden states (``build_model(output_mode=...)``).
Made on first use (it imports Megatron-Core)."""

from __future__ import annotations

import functools
from typing import Literal, get_args

import torch

from megatron_simpo.model.layers import softcap

ModelOutput = Literal["logits", "hidden_states"]
"""What the last pipeline stage returns: [b, s, V_p/tp] logits, or [b, s, h] final hidden states
(memory-lean log-probs: ``megatron_simpo.logprob_head``)."""
MODEL_OUTPUTS = get_args(ModelOutput)

def _rotary_at_positions(model, rotary_pos_emb: torch.Tensor, position_ids: torch.Tensor,
                         rope=None) -> torch.Tensor:
    """RoPE angles at each row's own positions: [s, b, 1, d] for position_ids [b, s].

    Megatron-Core's GPTModel takes RoPE angles for 0..s-1, shared by all rows ([s, 1, 1, d]),
    and ignores ``position_ids``; packed rows restart their positions at every sequence.
    ``rope``: the ``RotaryEmbedding`` the angles come from (the model's own when None).
    """
    if position_ids is None or rotary_pos_emb is None:
        return rotary_pos_emb
    s = position_ids.shape[-1]
    # The usual case, nothing to change (bit for bit): Megatron's angles are those of 0..s-1.
    # Packed rows' angles are sized by their longest segment, which under CP can be longer than
    # a rank's s tokens even where the rank's positions are 0..s-1.
    if rotary_pos_emb.shape[0] == s and torch.equal(
            position_ids, torch.arange(s, device=position_ids.device).expand_as(position_ids)):
        return rotary_pos_emb
    table = (rope or model.rotary_pos_emb)(model.max_sequence_length)  # [L, 1, 1, d]
    return table[position_ids.t()].squeeze(2)


def _context_parallel_positions(model, input_ids, position_ids):
    """[b, s/CP] the row positions of this CP rank's tokens: ``position_ids`` as given (the
    rank's share of a packed row's restarting positions), else the rank's chunks of 0..s-1.
    On a later pipeline stage (no input ids) these only feed RoPE's angles."""
    if position_ids is not None:
        return position_ids
    from megatron.core import parallel_state

    from megatron_simpo.distributed.parallel import context_parallel_positions

    cp = model.config.context_parallel_size
    if input_ids is not None:
        rows, local = input_ids.shape
        device = input_ids.device
    else:  # later stages: the decoder's input tensor [s/CP(/TP), b, h]
        local = model.decoder.input_tensor.shape[0]
        if model.config.sequence_parallel:
            local *= model.config.tensor_model_parallel_size
        rows, device = model.decoder.input_tensor.shape[1], model.decoder.input_tensor.device
    at = context_parallel_positions(local * cp, parallel_state.get_context_parallel_rank(), cp,
                                    device=device)
    return at.unsqueeze(0).expand(rows, -1)


@functools.cache
def gpt_model_class():
    """Megatron-Core's ``GPTModel`` with RoPE that follows ``position_ids`` (packed rows); made
    on first use so that importing this module does not import Megatron-Core."""
    from megatron.core.models.gpt import GPTModel

    class PositionedGPTModel(GPTModel):
        """GPTModel whose rotary embedding is taken at ``position_ids`` (restarting per packed
        sequence) instead of 0..s-1; THD-packed batches (Transformer Engine) keep
        Megatron-Core's own per-segment RoPE (packed rows of the local spec, sbhd, do not).

        ``output_mode`` "hidden_states": the last stage returns its final hidden states
        [b, s, h] in place of the logits (the output layer keeps its parameters, unused here;
        the log-prob head reads its weight).

        ``embedding_scale`` (Gemma: sqrt(hidden)) multiplies the embedding's output, in its
        dtype as transformers does; ``final_logit_softcapping`` caps the output layer's logits
        (``c * tanh(z / c)``: what every consumer of the logits, loss included, sees; the
        memory-lean head caps its own chunks).

        ``local_rope_base`` (Gemma-3's ``rope_local_base_freq``): a second RoPE table, of this
        base and unscaled, for the sliding-window layers; every layer then gets both tables
        stacked, [2, s, b, 1, d] (GPTModel's own first), each at the rows' positions, and
        picks its own (``layers.dual_rope_self_attention``)."""

        def __init__(self, *args, output_mode: ModelOutput = "logits",
                     embedding_scale: float | None = None,
                     final_logit_softcapping: float | None = None,
                     local_rope_base: float | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.local_rotary_pos_emb = None
            if local_rope_base is not None:
                from megatron.core.models.common.embeddings.rotary_pos_embedding import (
                    RotaryEmbedding)

                self.local_rotary_pos_emb = RotaryEmbedding(
                    kv_channels=self.config.kv_channels, rotary_percent=1.0,
                    rotary_interleaved=self.config.rotary_interleaved,
                    rotary_base=local_rope_base,
                    use_cpu_initialization=self.config.use_cpu_initialization)
            self.output_mode = output_mode
            self.embedding_scale = embedding_scale
            self.final_logit_softcapping = final_logit_softcapping
            if embedding_scale is not None and self.pre_process:
                self.embedding.register_forward_hook(
                    functools.partial(_scale_embedding, embedding_scale))
            if self.config.context_parallel_size > 1:
                # Megatron would cut the rank's chunks out of 0..s-1 itself (through pinned
                # memory, which a CPU lacks): the angles are taken at the rank's positions
                # instead (_context_parallel_positions), the same ones. Gemma-3's local table too.
                for rope in (getattr(self, "rotary_pos_emb", None), self.local_rotary_pos_emb):
                    if rope is not None:
                        rope.cp_group = None
            if final_logit_softcapping is not None and self.post_process:
                self.output_layer.register_forward_hook(
                    functools.partial(_softcap_logits, final_logit_softcapping))

        def _preprocess(self, input_ids, position_ids, *args, **kwargs):
            packed = kwargs.get("packed_seq_params")
            thd = packed is not None and packed.qkv_format == "thd"
            cp = self.config.context_parallel_size
            if cp > 1 and not thd:
                position_ids = _context_parallel_positions(self, input_ids, position_ids)
            output = super()._preprocess(input_ids, position_ids, *args, **kwargs)
            if thd:
                return output
            rotary = _rotary_at_positions(self, output[1], position_ids)
            if self.local_rotary_pos_emb is not None and rotary is not None:
                local = _rotary_at_positions(self, self.local_rotary_pos_emb(output[1].shape[0]),
                                             position_ids, self.local_rotary_pos_emb)
                rotary = torch.stack([rotary, local.expand_as(rotary)])
            return (output[0], rotary, *output[2:])

        def _postprocess(self, hidden_states, **kwargs):
            if self.output_mode == "logits" or not self.post_process:
                return super()._postprocess(hidden_states, **kwargs)
            return _final_hidden_states(self, hidden_states, kwargs.get("labels"))

    return PositionedGPTModel


def _scale_embedding(scale: float, embedding, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the embedding: its [s, b, h] output times ``scale``, a scalar of the
    output's dtype (so bf16 rounds sqrt(hidden) as transformers does)."""
    return output * _scalar(scale, output.dtype, output.device)


@functools.lru_cache(maxsize=8)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-dim tensor on ``device``, made once: a new one per forward would be a
    blocking host-to-device copy (a device sync on a GPU) per micro-batch."""
    return torch.tensor(value, dtype=dtype, device=device)


def _softcap_logits(cap: float, output_layer, args, output):
    """Forward hook of the output layer: (logits, bias) with the logits soft-capped."""
    logits, bias = output
    return softcap(logits, cap), bias


def _final_hidden_states(model, hidden_states: torch.Tensor, labels) -> torch.Tensor:
    """The last stage's output with ``output_mode`` "hidden_states": [b, s, h] from the final
    norm's [s, b, h] ([s/tp, b, h] under sequence parallelism, gathered as the output layer
    would gather its input; backward reduce-scatters, so each TP rank's gradient is its
    vocabulary shard's share)."""
    if labels is not None:
        raise ValueError("a model built with output_mode='hidden_states' computes no "
                         "language-model loss: give no labels")
    # The output layer is not called: run its forward pre-hooks as a call would (Megatron
    # DDP's wait for its weight's all-gather under --overlap-param-gather is one).
    _run_forward_pre_hooks(model.output_layer, hidden_states)
    if model.output_layer.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden_states = gather_from_sequence_parallel_region(  # [s/tp, b, h] -> [s, b, h]
            hidden_states, tensor_parallel_output_grad=True)
    return hidden_states.transpose(0, 1).contiguous()  # [s b h] => [b s h]


def _run_forward_pre_hooks(module: torch.nn.Module, *args) -> None:
    """What ``module(*args)`` runs before its forward: the global and the module's own
    forward pre-hooks (their results, which would replace the arguments, are not needed)."""
    from torch.nn.modules.module import _global_forward_pre_hooks

    for hooks in (_global_forward_pre_hooks, module._forward_pre_hooks):
        for hook_id, hook in hooks.items():
            if hook_id in module._forward_pre_hooks_with_kwargs:
                hook(module, args, {})
            else:
                hook(module, args)
