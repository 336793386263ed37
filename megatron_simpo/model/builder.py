"""The Megatron-Core ``GPTModel`` of a Llama-family architecture: layer specs and the builder.

The architecture itself is :class:`megatron_simpo.architecture.ModelConfig`; this module maps it
onto Megatron-Core's ``TransformerConfig`` + ``GPTModel``: grouped-query attention, RMSNorm,
SwiGLU, RoPE with its base and Llama-3.1 scaling, tied embeddings, QKV bias (Qwen2), per-head
query/key RMSNorm (Qwen3, Gemma-3, Qwen3-MoE: Megatron-Core's ``qk_layernorm``), Gemma-2/3's
layers (see ``layers``; Gemma-3's two RoPE tables: ``PositionedGPTModel``), mixture-of-experts
layers (Mixtral, Qwen3-MoE: Megatron-Core's ``MoELayer`` with its ``SequentialMLP`` experts and
the all-to-all token dispatcher; docs/moe.md) and vocabulary padding so the embedding splits
evenly across tensor-parallel ranks.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from megatron_simpo.model.architecture import ModelConfig
from megatron_simpo.model.gpt_model import MODEL_OUTPUTS, ModelOutput, gpt_model_class
from megatron_simpo.model.layers import (RMSNorm, dual_rope_self_attention, gelu_tanh,
                                         post_norm_row_parallel_linear)
from megatron_simpo.model import rope, wgrad
from megatron_simpo.model.moe import experts_apart, moe_transformer_fields, router_gemm_without_te
from megatron_simpo.distributed.parallel import ParallelConfig

TransformerImpl = Literal["local", "transformer_engine"]
TRANSFORMER_IMPLS = get_args(TransformerImpl)


def transformer_config(config: ModelConfig, parallel: ParallelConfig, *,
                       params_dtype: torch.dtype = torch.float32,
                       use_cpu_initialization: bool | None = None, **overrides: Any):
    """The ``TransformerConfig`` of an architecture at the given parallel layout.

    Dropout is 0 (Llama has none). ``calculate_per_token_loss`` is on because the training
    step normalises by the global number of pairs itself (see ``megatron_simpo.training.step``).
    Kernel fusions are enabled only where a GPU is present.
    """
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    if use_cpu_initialization is None:
        use_cpu_initialization = not on_gpu
    values = dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=config.norm_eps,
        gated_linear_unit=True,
        activation_func=gelu_tanh if config.is_gemma else F.silu,
        layernorm_zero_centered_gamma=config.is_gemma,
        add_bias_linear=False,
        add_qkv_bias=config.qkv_bias,
        qk_layernorm=config.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=config.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        # Micro-batches are padded to their own longest row (megatron_simpo.data.batching): stages
        # exchange each one's shape before its activations.
        variable_seq_lengths=parallel.pipeline_model_parallel_size > 1,
        # (Megatron-Core refuses that beside its allgather MoE dispatcher; alltoall also runs
        # the expert-parallel exchange over gloo: all_to_all_single with uneven splits.)
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        calculate_per_token_loss=True,
        bias_activation_fusion=on_gpu and not config.is_gemma,  # fuses SwiGLU, not GeGLU-tanh
        masked_softmax_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=on_gpu,
        apply_rope_fusion=False,
    )
    if config.is_moe:
        values.update(moe_transformer_fields(config))
    if config.query_pre_attn_scalar is not None:
        values["softmax_scale"] = config.query_pre_attn_scalar ** -0.5
    if config.sliding_window is not None:  # Megatron-Core's convention: (left, right) keys
        values["window_size"] = (config.sliding_window - 1, 0)
        values["window_attn_skip_freq"] = [int(s) for s in config.sliding_layers]
    values.update(overrides)
    if values["gradient_accumulation_fusion"]:
        # weight gradients straight into DDP's main_grad (model/wgrad.py): only for a model
        # that Megatron's DDP wraps before its first backward (training/components.py)
        wgrad.install()
    return TransformerConfig(**values)


def layer_spec(config: ModelConfig, transformer_impl: TransformerImpl = "local",
               moe: bool = False):
    """The per-layer ``ModuleSpec``: local torch modules (core attention on torch's SDPA), or
    Transformer Engine's (GPU, FP8); ``moe``: its feed-forward block is Megatron-Core's MoE
    layer (local spec: ``SequentialMLP`` experts)."""
    from megatron.core.models.gpt import gpt_layer_specs

    experts = config.num_experts if moe else None
    if transformer_impl == "local":
        from megatron_simpo.model.attention import SDPAttention

        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm",
                                                        qk_layernorm=config.qk_layernorm,
                                                        num_experts=experts,
                                                        moe_grouped_gemm=False)
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        attention = spec.submodules.self_attention.submodules
        # torch's fused SDPA in place of the unfused baddbmm-softmax-bmm: same results (fp32,
        # 1e-5), 2.5-4x faster on CPU (docs/performance.md); it also soft-caps (Gemma-2)
        attention.core_attention = SDPAttention
        if config.attn_logit_softcapping is not None:
            attention.core_attention = functools.partial(
                SDPAttention, softcap=config.attn_logit_softcapping)
        if config.qk_layernorm:  # per head: built with hidden_size = kv_channels
            attention.q_layernorm = attention.k_layernorm = RMSNorm
        if config.dual_rope:  # Gemma-3: each layer takes its RoPE table by its window
            spec.submodules.self_attention.module = dual_rope_self_attention()
        if config.is_gemma:  # post-attention and post-feed-forward norms
            attention.linear_proj = post_norm_row_parallel_linear()
            _mlp_submodules(spec.submodules.mlp).linear_fc2 = post_norm_row_parallel_linear()
        return spec
    check_transformer_impl(transformer_impl)
    if config.is_gemma:
        raise ValueError(f"{config.architecture} needs --transformer-impl local (soft-capping, "
                         "sliding windows and post-norms live in the local spec's layers)")
    if config.sliding_window is not None:  # (one no sequence outgrows is left out: for_rows)
        raise ValueError(f"{config.architecture}'s sliding window ({config.sliding_window} "
                         "keys, fewer than --seq-length) needs --transformer-impl local")
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
        qk_layernorm=config.qk_layernorm, num_experts=experts, moe_grouped_gemm=False)


def _mlp_submodules(mlp):
    """The ``MLPSubmodules`` of a layer spec's MLP: a ``ModuleSpec``'s ``submodules`` up to
    megatron-core 0.16, a ``functools.partial`` of ``MLP.as_mlp_submodule`` from 0.19."""
    if isinstance(mlp, functools.partial):
        return mlp.keywords["submodules"]
    return mlp.submodules


def check_packed_attention(transformer_impl: str) -> None:
    """Refuse --pack-sequences where the attention cannot keep packed sequences apart: on
    Transformer Engine it needs THD segments (TE >= 1.7, fused or flash attention on a GPU of
    compute capability 8.0 or newer). The local spec's SDPA attention takes the explicit
    block-diagonal mask anywhere."""
    if transformer_impl != "transformer_engine":
        return
    from megatron.core.utils import is_te_min_version

    if not is_te_min_version("1.7.0"):
        raise RuntimeError("--pack-sequences with --transformer-impl transformer_engine needs "
                           "Transformer Engine 1.7 or newer (THD packed attention)")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        raise RuntimeError("--pack-sequences with --transformer-impl transformer_engine needs "
                           "fused or flash attention with THD segments (compute capability "
                           "8.0+); use --transformer-impl local")


def check_shared_prompt_attention(transformer_impl: str, config) -> None:
    """Refuse --share-prompt where attention cannot take its explicit mask: Transformer
    Engine's (no arbitrary [b, 1, s, s] mask on its fused paths), and sliding-window layers
    (their window counts row indices, which shared rows shift for the rejected response)."""
    if transformer_impl == "transformer_engine":
        raise ValueError("--share-prompt needs --transformer-impl local (its shared-prompt mask "
                         "is an explicit [b, 1, s, s] tensor, which transformer_engine's fused "
                         "attention does not take)")
    if config is not None and any(config.sliding_layers):
        raise ValueError(f"--share-prompt: the model's sliding-window layers "
                         f"({config.sliding_window} keys) measure windows in row indices, which "
                         "shared-prompt rows shift for the rejected response; leave it off, or keep "
                         "--seq-length within the window")


def check_transformer_impl(transformer_impl: str) -> None:
    """Refuse an unknown ``--transformer-impl``, or Transformer Engine's where it is missing."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)}, "
                         f"got {transformer_impl!r}")
    if transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                "--transformer-impl transformer_engine needs Transformer Engine, which is not "
                "installed (it ships in NGC PyTorch containers); use --transformer-impl local"
            ) from error


def block_spec(config: ModelConfig, megatron_config, transformer_impl: TransformerImpl = "local"):
    """What ``GPTModel`` builds its decoder from: this stage's layers and the final norm.

    Transformer Engine's layer spec is enough (the block picks TE's norm for the final one);
    the local spec is spelled out as a block so the final norm is :class:`RMSNorm` too.
    """
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    spec = layer_spec(config, transformer_impl)
    if transformer_impl != "local" and not config.is_moe:
        return spec
    first = get_transformer_layer_offset(megatron_config)
    pattern = config.moe_layer_pattern[first:first + get_num_layers_to_build(megatron_config)]
    specs = {moe: layer_spec(config, transformer_impl, moe) for moe in set(pattern)}
    norm = RMSNorm
    if transformer_impl != "local":
        from megatron.core.extensions.transformer_engine import TENorm as norm
    return TransformerBlockSubmodules(layer_specs=[specs[moe] for moe in pattern],
                                      layer_norm=norm)


def build_model(config: ModelConfig, parallel: ParallelConfig, *,
                transformer_impl: TransformerImpl = "local",
                params_dtype: torch.dtype = torch.float32,
                pre_process: bool | None = None, post_process: bool | None = None,
                output_mode: ModelOutput = "logits", **transformer_overrides: Any):
    """Build this rank's ``GPTModel`` (its TP shard of its pipeline stage).

    Needs ``parallel_state`` initialised with the same TP/PP sizes. With ``output_mode``
    "logits" the last stage returns vocab-parallel logits (``parallel_output=True``):
    [b, s, V_padded/tp] when no labels are given; with "hidden_states" its final hidden states
    [b, s, h] (the output layer is built all the same: same parameters, same checkpoint names).
    """
    from megatron.core import parallel_state

    if output_mode not in MODEL_OUTPUTS:
        raise ValueError(f"output_mode must be one of {', '.join(MODEL_OUTPUTS)}, got "
                         f"{output_mode!r}")
    parallel.check_model(config)
    rope.install()  # its cosines and sines once per forward (exact: model/rope.py)
    if config.is_moe:
        router_gemm_without_te()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    megatron_config = transformer_config(config, parallel, params_dtype=params_dtype,
                                         **transformer_overrides)
    model = gpt_model_class()(
        config=megatron_config,
        transformer_layer_spec=block_spec(config, megatron_config, transformer_impl),
        vocab_size=config.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        # GPTModel's RotaryEmbedding takes the base from here, not from the TransformerConfig.
        rotary_base=config.rope_theta,
        rope_scaling=config.rope_scaling_factor is not None,
        rope_scaling_factor=config.rope_scaling_factor or 8.0,
        # Linear scaling: positions / factor (Gemma-3's full-attention layers)
        seq_len_interpolation_factor=config.rope_linear_factor,
        local_rope_base=config.rope_local_base_freq,
        output_mode=output_mode,
        embedding_scale=config.hidden_size ** 0.5 if config.is_gemma else None,
        final_logit_softcapping=config.final_logit_softcapping,
    )
    if config.is_moe:
        experts_apart(model)
    if not torch.cuda.is_available():
        return model
    return model.cuda(torch.cuda.current_device())


def output_weight(model) -> torch.Tensor:
    """This rank's [V_p/tp, h] output-layer weight (the embedding's when they are tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
