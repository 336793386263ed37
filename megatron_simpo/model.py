"""Llama-family model description and the Megatron-Core ``GPTModel`` built from it.

:class:`ModelConfig` is the one description of the architecture. It reads a Hugging Face
``config.json``, is written into every checkpoint (so later commands need no architecture flags)
and maps onto Megatron-Core's ``TransformerConfig`` + ``GPTModel``: grouped-query attention,
RMSNorm, SwiGLU, RoPE with its base and Llama-3.1 scaling, tied embeddings, QKV bias (Qwen2) and
vocabulary padding so the embedding splits evenly across tensor-parallel ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from megatron_simpo.parallel import ParallelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# Megatron-Core applies Llama-3.1 rope scaling with these constants hard-coded
# (RotaryEmbedding._apply_scaling); a checkpoint that asks for others cannot be reproduced.
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}

TransformerImpl = Literal["local", "transformer_engine"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2)."""

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
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the TP size (Megatron-LM's rule)."""
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
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
        architectures = hf.get("architectures") or []
        architecture = architectures[0] if architectures else {
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}.get(hf.get("model_type"), hf.get("model_type"))
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: unsupported architecture {architecture!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported (need silu)")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                             else None)
        rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_scaling_factor = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ValueError(f"{source}: rope scaling type {kind!r} unsupported (only 'llama3')")
            for key, expected in _MEGATRON_LLAMA3_ROPE.items():
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
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{source}: sliding-window attention is unsupported")
        heads = int(hf["num_attention_heads"])
        return cls(
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
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            init_method_std=float(hf.get("initializer_range", 0.02)),
        )

    # ---- Megatron-Core --------------------------------------------------------------------
    def to_transformer_config(self, parallel: ParallelConfig, *,
                              params_dtype: torch.dtype = torch.float32,
                              use_cpu_initialization: bool | None = None,
                              **overrides: Any):
        """The ``TransformerConfig`` of this architecture at the given parallel layout.

        Dropout is 0 (Llama has none). ``calculate_per_token_loss`` is on because the training
        step normalises by the global number of pairs itself (see ``megatron_simpo.step``).
        Kernel fusions are enabled only where a GPU is present.
        """
        from megatron.core.transformer import TransformerConfig

        on_gpu = torch.cuda.is_available()
        if use_cpu_initialization is None:
            use_cpu_initialization = not on_gpu
        values = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            sequence_parallel=parallel.sequence_parallel,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            use_cpu_initialization=use_cpu_initialization,
            calculate_per_token_loss=True,
            bias_activation_fusion=on_gpu,
            masked_softmax_fusion=on_gpu,
            bias_dropout_fusion=on_gpu,
            gradient_accumulation_fusion=False,
            persist_layer_norm=on_gpu,
            apply_rope_fusion=False,
        )
        values.update(overrides)
        return TransformerConfig(**values)


class RMSNorm(torch.nn.RMSNorm):
    """The local spec's RMSNorm: torch's, built like Megatron-Core's norms and SP-aware.

    Megatron-Core's own local choice (``WrappedTorchNorm``) refuses sequence parallelism and
    keeps an fp32 weight under bf16 (which knocks torch off its fused kernel). This one takes
    ``params_dtype`` like Transformer Engine's norms, and marks its weight ``sequence_parallel``
    so the gradient finalisation sums the partial weight gradients of the TP ranks' sequence
    slices, as it does for Transformer Engine's and Apex's norms.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("RMSNorm is plain RMSNorm: got normalization="
                             f"{config.normalization!r}, zero-centred gamma="
                             f"{config.layernorm_zero_centered_gamma}")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(config: ModelConfig, transformer_impl: TransformerImpl = "local"):
    """The per-layer ``ModuleSpec``: local torch modules, or Transformer Engine's (GPU, FP8)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_impl == "local":
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        return spec
    check_transformer_impl(transformer_impl)
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()


def check_transformer_impl(transformer_impl: str) -> None:
    """Refuse an unknown ``--transformer-impl``, or Transformer Engine's where it is missing."""
    if transformer_impl not in ("local", "transformer_engine"):
        raise ValueError(f"--transformer-impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")
    if transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                "--transformer-impl transformer_engine needs Transformer Engine, which is not "
                "installed (it ships in NGC PyTorch containers); use --transformer-impl local"
            ) from error


def block_spec(config: ModelConfig, transformer_config, transformer_impl: TransformerImpl = "local"):
    """What ``GPTModel`` builds its decoder from: this stage's layers and the final norm.

    Transformer Engine's layer spec is enough (the block picks TE's norm for the final one);
    the local spec is spelled out as a block so the final norm is :class:`RMSNorm` too.
    """
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    spec = layer_spec(config, transformer_impl)
    if transformer_impl != "local":
        return spec
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(transformer_config), layer_norm=RMSNorm)


def build_model(config: ModelConfig, parallel: ParallelConfig, *,
                transformer_impl: TransformerImpl = "local",
                params_dtype: torch.dtype = torch.float32,
                pre_process: bool | None = None, post_process: bool | None = None,
                **transformer_overrides: Any):
    """Build this rank's ``GPTModel`` (its TP shard of its pipeline stage).

    Needs ``parallel_state`` initialised with the same TP/PP sizes. The output layer returns
    vocab-parallel logits (``parallel_output=True``): [b, s, V_padded/tp] when no labels are given.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    parallel.check_model(config)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    transformer_config = config.to_transformer_config(parallel, params_dtype=params_dtype,
                                                      **transformer_overrides)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=block_spec(config, transformer_config, transformer_impl),
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
    )
    if not torch.cuda.is_available():
        return model
    return model.cuda(torch.cuda.current_device())


def enable_memory_lean_logprobs(model, chunk_size: int) -> None:
    """Make the last stage return final hidden states [b, s, h] instead of logits.

    The log-probs are then computed by ``logprobs.fused_output_logprobs`` from the hidden
    states (gathered along the sequence under sequence parallelism) and the output weight, ``chunk_size`` tokens at a time, so the micro-batch's full
    [b, s, V_p/tp] logits never exist. The output layer keeps its parameters (and checkpoint
    names); only its forward becomes a pass-through. ``logprob_chunk_size`` on the model tells
    the training step which path to take.
    """
    if chunk_size < 1:
        raise ValueError(f"--logprob-chunk-size must be >= 1 for memory-lean log-probs, got {chunk_size}")
    model.logprob_chunk_size = chunk_size
    if getattr(model, "post_process", False):
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        output_layer = model.output_layer

        def pass_through(hidden_states, weight=None, runtime_gather_output=None):
            if output_layer.sequence_parallel:
                # [s/tp, b, h] -> [s, b, h], as the output layer would gather its input. Backward
                # reduce-scatters: each TP rank's gradient is its vocabulary shard's share.
                hidden_states = gather_from_sequence_parallel_region(
                    hidden_states, tensor_parallel_output_grad=True)
            return hidden_states, None

        model.output_layer.forward = pass_through


def output_weight(model) -> torch.Tensor:
    """This rank's [V_p/tp, h] output-layer weight (the embedding's when they are tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
