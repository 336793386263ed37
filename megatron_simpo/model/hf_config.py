"""Reading a Hugging Face ``config.json`` into the fields of ``ModelConfig``
(``architecture.ModelConfig.from_hf_config``), and the architectures it knows.

Imports nothing from this package: ``architecture`` builds on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                           "MixtralForCausalLM", "Qwen3MoeForCausalLM")
# Mixture-of-experts feed-forward layers (docs/moe.md): a softmax router picks top-k experts.
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
# Gemma's layout: (1 + weight) RMSNorms, post-attention and post-feed-forward norms, GeGLU with
# the tanh GELU, embeddings multiplied by sqrt(hidden), tied embeddings.
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# A multimodal Gemma-3 checkpoint: its text model is a Gemma3ForCausalLM (config.json's
# ``text_config``; weights under ``language_model.model.*`` or ``model.language_model.*``).
GEMMA3_MULTIMODAL = "Gemma3ForConditionalGeneration"
LAYER_TYPES = ("full_attention", "sliding_attention")

# Megatron-Core applies Llama-3.1 rope scaling with these constants hard-coded
# (RotaryEmbedding._apply_scaling); a checkpoint that asks for others cannot be reproduced.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}
# Hugging Face ``model_type`` of each supported class (config.json carries both).
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
                "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
# transformers' Gemma3TextConfig defaults: the text_config of a multimodal Gemma-3 file names
# only what differs from them.
_GEMMA3_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, hidden_activation="gelu_pytorch_tanh",
                        max_position_embeddings=131072, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, query_pre_attn_scalar=256,
                        sliding_window=4096, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, initializer_range=0.02)

# transformers' defaults for what a config.json may leave out, where this reader's generic
# fallback would differ (RoPE bases: _ROPE_THETA, read beside rope_parameters)
# (Llama's num_key_value_heads defaults to the heads, as this reader's fallback does.)
_DEFAULTS = {
    "LlamaForCausalLM": dict(rms_norm_eps=1e-6),
    "MistralForCausalLM": dict(rms_norm_eps=1e-6, sliding_window=4096, num_key_value_heads=8),
    "Qwen2ForCausalLM": dict(rms_norm_eps=1e-6, num_key_value_heads=32),
    "Qwen3ForCausalLM": dict(rms_norm_eps=1e-6, num_key_value_heads=32, head_dim=128),
    "Qwen3MoeForCausalLM": dict(rms_norm_eps=1e-6, num_key_value_heads=4),
    "MixtralForCausalLM": dict(rms_norm_eps=1e-5, num_key_value_heads=8),
    "Gemma2ForCausalLM": dict(rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                              sliding_window=4096, query_pre_attn_scalar=256,
                              num_key_value_heads=4, head_dim=256),
}
_ROPE_THETA = {"MixtralForCausalLM": 1_000_000.0}
# Experts per layer where a file names none, in either spelling (num_local_experts, num_experts:
# transformers reads each as the other)
_EXPERTS = {"MixtralForCausalLM": 8, "Qwen3MoeForCausalLM": 128}


def fields_from_hf(hf: dict[str, Any] | str | Path) -> dict[str, Any]:
    """``ModelConfig``'s fields from a Hugging Face ``config.json`` (a dict, the file, or its
    folder); ValueError naming the file and the setting for what is unsupported, missing or
    not a number.

    Understands both spellings of RoPE settings: ``rope_theta`` + ``rope_scaling`` (the
    released Llama files) and ``rope_parameters`` (transformers >= 5).
    """
    source = "config"
    if not isinstance(hf, dict):
        path = Path(hf)
        if path.is_dir():
            path = path / "config.json"
        source = str(path)
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read Hugging Face config {source}: {error}") from error
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: not a Hugging Face config (a JSON object), but a JSON "
                         f"{type(hf).__name__}")
    try:
        return _fields(hf, source)
    except KeyError as error:
        raise ValueError(f"{source}: missing setting {error.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as error:
        if str(error).startswith(source):  # already names the file and the setting
            raise
        raise ValueError(f"{source}: a setting has the wrong type or value ({error})") from None


def _fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    architectures = hf.get("architectures") or []
    by_type = {model_type: name for name, model_type in MODEL_TYPES.items()}
    by_type["gemma3"] = GEMMA3_MULTIMODAL
    architecture = architectures[0] if architectures else by_type.get(
        hf.get("model_type"), hf.get("model_type"))
    model_type = {v: k for k, v in by_type.items()}.get(architecture)
    if architectures and model_type and hf.get("model_type", model_type) != model_type:
        # transformers' Auto classes build the model of model_type, whatever architectures says
        raise ValueError(f"{source}: architectures names {architecture} but model_type is "
                         f"{hf['model_type']!r} (transformers would build that model; "
                         f"{architecture}'s is {model_type!r})")
    if hf.get("quantization_config"):  # its weights are not the model's without their scales
        method = dict(hf["quantization_config"]).get("quant_method", "unnamed")
        raise ValueError(f"{source}: quantized weights (quantization_config, quant_method "
                         f"{method!r}) are unsupported; convert a bf16/fp16/fp32 checkpoint")
    if architecture == GEMMA3_MULTIMODAL:  # its text model; the vision tower is not read
        architecture, hf = "Gemma3ForCausalLM", dict(hf.get("text_config") or {})
    if architecture == "Gemma3ForCausalLM":
        hf = {**_GEMMA3_DEFAULTS, **hf}
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{source}: use_bidirectional_attention=True (an embedding "
                             "model) is unsupported")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: unsupported architecture {architecture!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    in_file = set(hf)
    hf = {**_DEFAULTS.get(architecture, {}), **hf}
    gemma = architecture in GEMMA_ARCHITECTURES
    if gemma:
        activation = hf.get("hidden_activation") or hf.get("hidden_act")
        if activation != "gelu_pytorch_tanh":
            raise ValueError(f"{source}: hidden_activation {activation!r} unsupported (need "
                             "gelu_pytorch_tanh)")
    elif hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported (need silu)")
    rope = dict(hf.get("rope_parameters") or {})
    gemma3 = {}
    if architecture == "Gemma3ForCausalLM":
        gemma3, rope, hf = _gemma3_rope(hf, rope, source)
    elif hf.get("rope_theta") is not None and not hf.get("rope_scaling") and \
            float(rope.get("rope_theta", hf["rope_theta"])) != float(hf["rope_theta"]):
        # transformers 5 takes rope_parameters' base, transformers 4 the top-level one
        raise ValueError(f"{source}: rope_theta={hf['rope_theta']} contradicts "
                         f"rope_parameters' rope_theta={rope['rope_theta']}")
    scaling = None  # plain RoPE where neither spelling names a scaling ({"rope_type": "default"})
    for given in (hf.get("rope_scaling") or {}, rope):
        if given.get("rope_type", given.get("type", "default")) != "default":
            scaling = given
            break
    rope_theta = float(hf.get("rope_theta", rope.get(
        "rope_theta", _ROPE_THETA.get(architecture, 10000.0))))
    rope_scaling_factor = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ValueError(f"{source}: rope scaling type {kind!r} unsupported (only 'llama3')")
        for key, expected in MEGATRON_LLAMA3_ROPE.items():
            if float(scaling.get(key, expected)) != expected:
                raise ValueError(
                    f"{source}: rope_scaling {key}={scaling[key]} unsupported; Megatron-Core "
                    f"implements llama3 scaling with {key}={expected}"
                )
        rope_scaling_factor = float(scaling["factor"])
    if architecture != "Qwen2ForCausalLM" and hf.get("attention_bias", False):
        raise ValueError(f"{source}: attention_bias=True is only supported for Qwen2")
    if hf.get("mlp_bias", False):
        raise ValueError(f"{source}: mlp_bias=True is unsupported")
    if hf.get("use_sliding_window", False) or (
            architecture == "MixtralForCausalLM" and hf.get("sliding_window") is not None):
        what = ("use_sliding_window=True" if hf.get("use_sliding_window", False) else
                f"sliding_window={hf['sliding_window']}" if "sliding_window" in in_file else
                f"no sliding_window (transformers' default: {hf['sliding_window']})")
        raise ValueError(f"{source}: sliding-window attention is unsupported ({what})")
    if architecture == "Gemma3ForCausalLM" and hf.get("attn_logit_softcapping") is not None:
        raise ValueError(f"{source}: attn_logit_softcapping={hf['attn_logit_softcapping']} is "
                         "unsupported for Gemma-3 (transformers' Gemma-3 attention ignores it)")
    heads = int(hf["num_attention_heads"])
    gemma_fields = {}
    if gemma:
        layers = int(hf["num_hidden_layers"])
        gemma_fields = dict(
            attn_logit_softcapping=_optional_float(hf.get("attn_logit_softcapping")),
            final_logit_softcapping=_optional_float(hf.get("final_logit_softcapping")),
            sliding_window=hf.get("sliding_window"),
            # transformers' default for Gemma-2 files without the list: even layers slide
            # Gemma-3 files without the list: every sliding_window_pattern-th layer is full
            layer_types=tuple(hf.get("layer_types") or (
                "sliding_attention" if (i + 1) % int(hf.get("sliding_window_pattern") or (
                    6 if architecture == "Gemma3ForCausalLM" else 2)) else "full_attention"
                for i in range(layers))),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256))
    if architecture == "MistralForCausalLM" and hf.get("sliding_window") is not None:
        # Mistral v0.1 (and its fine-tunes, e.g. zephyr-7b): every layer slides
        gemma_fields = dict(sliding_window=int(hf["sliding_window"]),
                            layer_types=("sliding_attention",) * int(hf["num_hidden_layers"]))
    return dict(
        architecture=architecture,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        rope_theta=rope_theta,
        rope_scaling_factor=rope_scaling_factor,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=architecture == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        qk_layernorm=architecture in ("Qwen3ForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM"),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        **gemma_fields, **gemma3,
        **_moe_fields(hf, architecture, source),
    )


def _gemma3_rope(hf: dict, rope: dict, source: str) -> tuple[dict, dict, dict]:
    """Gemma-3's two RoPE settings, in either spelling: ``rope_theta`` (full-attention layers,
    with ``rope_scaling``) and ``rope_local_base_freq`` (sliding layers), or transformers 5's
    ``rope_parameters`` per layer type. Returns (the ModelConfig fields, the full-attention
    layers' rope parameters, ``hf`` without the legacy scaling) for the common reading, which
    then sees no scaling: Gemma-3's is linear, on the full-attention layers only."""
    if "full_attention" in rope or "sliding_attention" in rope:
        full, local = dict(rope.get("full_attention") or {}), rope.get("sliding_attention") or {}
        full.setdefault("rope_theta", hf["rope_theta"])
        local_base = float(local.get("rope_theta", hf["rope_local_base_freq"]))
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope scaling on the sliding layers "
                             f"({local['rope_type']!r}) is unsupported")
    else:
        full = dict(rope, rope_theta=float(rope.get("rope_theta", hf["rope_theta"])))
        full.update(hf.get("rope_scaling") or {})
        local_base = float(hf["rope_local_base_freq"])
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"{source}: rope scaling type {kind!r} unsupported for Gemma-3 (only "
                         "'linear')")
    fields = dict(rope_local_base_freq=local_base,
                  rope_linear_factor=float(full["factor"]) if kind == "linear" else None)
    hf = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    return fields, {"rope_theta": full["rope_theta"]}, hf


def _moe_fields(hf: dict[str, Any], architecture: str, source: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral / Qwen3-MoE config.json (none otherwise).

    Qwen3-MoE layer i is sparse unless it is in ``mlp_only_layers`` or (i + 1) is not a
    multiple of ``decoder_sparse_step`` (transformers' rule).
    """
    if architecture not in MOE_ARCHITECTURES:
        return {}
    if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
        raise ValueError(f"{source}: router_jitter_noise={hf['router_jitter_noise']} unsupported "
                         "(needs 0)")
    experts = int(hf.get("num_local_experts") or hf.get("num_experts") or _EXPERTS[architecture])
    renormalised = architecture == "MixtralForCausalLM" or bool(hf.get("norm_topk_prob", False))
    if renormalised and int(hf.get("num_experts_per_tok", 2 if architecture ==
                                   "MixtralForCausalLM" else 8)) == 1:
        raise ValueError(f"{source}: num_experts_per_tok=1 with renormalised top-k "
                         "probabilities is unsupported (Megatron-Core refuses it)")
    if architecture == "MixtralForCausalLM":
        return dict(num_experts=experts, moe_ffn_hidden_size=int(hf["intermediate_size"]),
                    moe_router_topk=int(hf.get("num_experts_per_tok", 2)))
    if int(hf.get("shared_expert_intermediate_size") or 0):
        raise ValueError(f"{source}: shared experts are unsupported")
    layers, step = int(hf["num_hidden_layers"]), int(hf.get("decoder_sparse_step") or 1)
    dense = set(hf.get("mlp_only_layers") or ())
    pattern = tuple(int(i not in dense and (i + 1) % step == 0) for i in range(layers))
    return dict(num_experts=experts, moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
                moe_router_topk=int(hf.get("num_experts_per_tok", 8)),
                moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                moe_layers=None if all(pattern) else pattern)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
