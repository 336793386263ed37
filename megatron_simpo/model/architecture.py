"""The architecture of a Llama-family decoder, and its Hugging Face ``config.json`` both ways.

:class:`ModelConfig` is the one description of the architecture. It reads a Hugging Face
``config.json`` (``from_hf_config``), is written into every checkpoint (so later commands need no
architecture flags) and turns back into a ``config.json`` for export (``hf_config_dict``). It
imports nothing from Megatron-Core: the builder (``megatron_simpo.model.builder``), the FLOP counter and
the converters all read it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_simpo.model.hf_config import (
    SUPPORTED_ARCHITECTURES, MOE_ARCHITECTURES, GEMMA_ARCHITECTURES,
    LAYER_TYPES, MEGATRON_LLAMA3_ROPE, MODEL_TYPES, fields_from_hf)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3) or of
    Gemma-2/3 (``is_gemma``: its norms, GeGLU and embedding scale; soft-capping, sliding windows;
    Gemma-3: q/k norms and a second RoPE base on the sliding layers)."""

    architecture: str = "LlamaForCausalLM"
    """Hugging Face class name; one of ``SUPPORTED_ARCHITECTURES``."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    """SwiGLU inner size (HF ``intermediate_size``)."""
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (HF ``num_key_value_heads``); equal to the heads means no GQA."""
    head_dim: int | None = None
    """Per-head size; ``hidden_size // num_attention_heads`` when None."""
    vocab_size: int
    """True vocabulary size of the tokenizer/embedding, before padding."""
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None
    """Llama-3.1 ("llama3") rope scaling factor, None for no scaling."""
    rope_local_base_freq: float | None = None
    """RoPE base of the sliding-window layers (Gemma-3's local layers); None: ``rope_theta`` on
    every layer. The other layers use ``rope_theta`` (and ``rope_linear_factor``)."""
    rope_linear_factor: float | None = None
    """Linear RoPE scaling of the full-attention layers (Gemma-3's ``rope_scaling`` of type
    "linear"): the angle of position p is ``p * inv_freq / factor``; None for no scaling."""
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3's ``q_norm`` / ``k_norm``)."""
    attn_logit_softcapping: float | None = None
    """Attention scores s become ``c * tanh(s / c)`` before the mask and softmax (Gemma-2: 50)."""
    final_logit_softcapping: float | None = None
    """Logits z become ``c * tanh(z / c)`` before every log-softmax (Gemma-2: 30)."""
    sliding_window: int | None = None
    """Keys a query sees on a sliding-window layer, itself included (HF ``sliding_window``)."""
    layer_types: tuple[str, ...] | None = None
    """Per layer "full_attention" or "sliding_attention" (HF ``layer_types``); None: all full."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` (else head_dim's)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the TP size (Megatron-LM's rule)."""
    init_method_std: float = 0.02
    num_experts: int | None = None
    """Experts per mixture-of-experts layer (HF ``num_local_experts`` / ``num_experts``); None:
    a dense model."""
    moe_ffn_hidden_size: int | None = None
    """SwiGLU inner size of each expert (Qwen3-MoE ``moe_intermediate_size``; Mixtral's
    ``intermediate_size``)."""
    moe_router_topk: int = 2
    """Experts each token is sent to (HF ``num_experts_per_tok``)."""
    moe_norm_topk_prob: bool = True
    """The k chosen softmax probabilities are renormalised to sum to 1 (Mixtral always; Qwen3-MoE
    ``norm_topk_prob``); else they are used as the softmax over all experts gives them."""
    moe_layers: tuple[int, ...] | None = None
    """Per layer 1 (mixture of experts) or 0 (dense MLP of ``ffn_hidden_size``: Qwen3-MoE
    ``mlp_only_layers`` / ``decoder_sparse_step``); None: every layer (Megatron's
    ``moe_layer_freq`` list)."""

    def __post_init__(self) -> None:
        for name in ("layer_types", "moe_layers"):  # JSON gives a list
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"model config: hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads}) and no head_dim is given"
            )

        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                     "sliding_window", "rope_local_base_freq", "rope_linear_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"model config: {name} must be positive or null, got {value!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(f"model config: layer_types must name {self.num_layers} layers, "
                                 f"each one of {', '.join(LAYER_TYPES)}: {list(self.layer_types)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("model config: sliding_attention layers need a sliding_window")
        if self.rope_linear_factor is not None and self.rope_scaling_factor is not None:
            raise ValueError("model config: rope_linear_factor and rope_scaling_factor (llama3) "
                             "exclude each other")

        self._check_moe()

    def _check_moe(self) -> None:
        moe = self.architecture in MOE_ARCHITECTURES
        if moe != (self.num_experts is not None):
            raise ValueError(f"model config: num_experts is given for, and only for, "
                             f"{', '.join(MOE_ARCHITECTURES)} ({self.architecture}: "
                             f"{self.num_experts!r})")
        if not moe:
            return
        for name in ("num_experts", "moe_ffn_hidden_size", "moe_router_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.moe_router_topk > self.num_experts:
            raise ValueError(f"model config: moe_router_topk ({self.moe_router_topk}) exceeds "
                             f"num_experts ({self.num_experts})")
        if self.architecture == "MixtralForCausalLM" and not self.moe_norm_topk_prob:
            raise ValueError("model config: Mixtral always renormalises its top-k probabilities")
        if self.moe_layers is not None and (len(self.moe_layers) != self.num_layers
                                            or set(self.moe_layers) - {0, 1}):
            raise ValueError(f"model config: moe_layers must give 0 or 1 for each of the "
                             f"{self.num_layers} layers: {list(self.moe_layers)}")

    @property
    def dual_rope(self) -> bool:
        """Whether the sliding and the full-attention layers take different RoPE tables."""
        return self.rope_local_base_freq is not None

    @property
    def is_gemma(self) -> bool:
        """Gemma's layout (see ``GEMMA_ARCHITECTURES``)."""
        return self.architecture in GEMMA_ARCHITECTURES

    def for_rows(self, seq_length: int) -> "ModelConfig":
        """The model as built for sequences of at most ``seq_length`` tokens: a sliding window
        that no such sequence outgrows masks nothing and is left out (the same function, with
        plain causal attention: its faster kernels, and Transformer Engine's spec), unless the
        window also picks the layers' RoPE tables (Gemma-3)."""
        if self.sliding_window is None or self.dual_rope or seq_length > self.sliding_window:
            return self
        return dataclasses.replace(self, sliding_window=None, layer_types=None)

    @property
    def sliding_layers(self) -> list[bool]:
        """Per layer: whether it attends through the sliding window."""
        return [kind == "sliding_attention" for kind in self.layer_types or
                ("full_attention",) * self.num_layers]

    @property
    def is_moe(self) -> bool:
        """Mixture-of-experts feed-forward layers (see ``MOE_ARCHITECTURES``)."""
        return self.num_experts is not None

    @property
    def moe_layer_pattern(self) -> list[bool]:
        """Per layer: whether its feed-forward block is a mixture of experts."""
        if not self.is_moe:
            return [False] * self.num_layers
        return [bool(x) for x in self.moe_layers or (1,) * self.num_layers]

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        """Vocabulary rows in the Megatron embedding: a multiple of divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, other: "ModelConfig") -> dict[str, tuple[Any, Any]]:
        """The settings ``other`` has otherwise, by name: (this one's, the other's)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {name: (value, theirs[name]) for name, value in mine.items()
                if theirs[name] != value}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config: unknown fields {unknown}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | Path) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` (a dict, the file, or its folder).

        Understands both spellings of RoPE settings: ``rope_theta`` + ``rope_scaling`` (the
        released Llama files) and ``rope_parameters`` (transformers >= 5).
        """
        return cls(**fields_from_hf(hf))


def hf_config_dict(config: ModelConfig, base: dict | None, dtype: torch.dtype) -> dict:
    """config.json for an exported model: the original one when known, updated from ``config``."""
    if base is not None and "text_config" in base:  # a multimodal Gemma-3's: its text model
        base = {**{k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if k in base}, **base["text_config"]}
    out = dict(base or {})
    out.update(
        architectures=[config.architecture], model_type=MODEL_TYPES[config.architecture],
        hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups, head_dim=config.kv_channels,
        vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu", initializer_range=config.init_method_std,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if config.is_gemma:
        out.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                   attn_logit_softcapping=config.attn_logit_softcapping,
                   final_logit_softcapping=config.final_logit_softcapping,
                   sliding_window=config.sliding_window, layer_types=list(config.layer_types),
                   # transformers' Gemma2Config types it int (224, 256)
                   query_pre_attn_scalar=int(config.query_pre_attn_scalar)
                   if float(config.query_pre_attn_scalar).is_integer()
                   else config.query_pre_attn_scalar)
    if config.architecture == "MistralForCausalLM":  # transformers' default is a 4096 window
        out["sliding_window"] = config.sliding_window
        out.pop("layer_types", None)
    if config.architecture == "MixtralForCausalLM":
        out.update(num_local_experts=config.num_experts, num_experts_per_tok=config.moe_router_topk,
                   intermediate_size=config.moe_ffn_hidden_size, sliding_window=None)
    elif config.architecture == "Qwen3MoeForCausalLM":
        out.update(num_experts=config.num_experts, num_experts_per_tok=config.moe_router_topk,
                   moe_intermediate_size=config.moe_ffn_hidden_size,
                   norm_topk_prob=config.moe_norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=[i for i, moe in enumerate(config.moe_layer_pattern) if not moe])
        out.pop("num_local_experts", None)  # transformers 5 writes both; either one is read
    if "dtype" in out:  # transformers >= 5 spells it so; a stale one would win on load
        out["dtype"] = out["torch_dtype"]
    if config.architecture != "Qwen2ForCausalLM":
        out["attention_bias"] = config.qkv_bias
    if config.architecture == "Gemma3ForCausalLM":  # the spelling transformers 4 and 5 read
        for key in ("rope_parameters", "rope_scaling", "sliding_window_pattern"):
            out.pop(key, None)
        out.update(rope_theta=config.rope_theta, rope_local_base_freq=config.rope_local_base_freq)
        if config.rope_linear_factor is not None:
            out["rope_scaling"] = dict(rope_type="linear", factor=config.rope_linear_factor)
    elif base is None:
        out["rope_theta"] = config.rope_theta
        if config.rope_scaling_factor is not None:
            out["rope_scaling"] = dict(rope_type="llama3", factor=config.rope_scaling_factor,
                                       **MEGATRON_LLAMA3_ROPE)
    differ = config.differences(ModelConfig.from_hf_config(out))
    if differ:  # e.g. the original's RoPE fields no longer hold
        raise ValueError(f"the exported config.json would not describe the checkpoint's model "
                         f"(field: (checkpoint, config.json)): {differ}")
    return out


def hf_config_dtype(hf: dict[str, Any], source: str = "config.json") -> torch.dtype | None:
    """The dtype a Hugging Face config says its weights are stored in, or None if it says none.

    transformers < 5 writes ``torch_dtype``, transformers >= 5 writes ``dtype``.
    """
    name = hf.get("dtype") or hf.get("torch_dtype")
    if name is None:
        return None
    name = str(name).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"{source}: dtype {name!r} unsupported (one of {', '.join(_DTYPES)})")
    return _DTYPES[name]
