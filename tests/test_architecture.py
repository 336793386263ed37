"""ModelConfig: Hugging Face config.json in (every supported spelling) and out again."""

import json

import pytest
import torch

from megatron_simpo.model.architecture import (SUPPORTED_ARCHITECTURES, ModelConfig,
                                               hf_config_dict, hf_config_dtype)
from tests.tiny import ARCHITECTURES, tiny_hf_config


def test_config_reads_both_rope_spellings():
    released = tiny_hf_config("llama3.1")  # rope_theta + rope_scaling, as in the released files
    config = ModelConfig.from_hf_config(released)
    assert config.rope_theta == 500000.0 and config.rope_scaling_factor == 8.0
    modern = {k: v for k, v in released.items() if k not in ("rope_theta", "rope_scaling")}
    modern["rope_parameters"] = dict(released["rope_scaling"], rope_theta=500000.0)
    assert ModelConfig.from_hf_config(modern) == config
    plain = ModelConfig.from_hf_config(
        dict(tiny_hf_config("llama3"), rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert plain.rope_scaling_factor is None
    # a legacy rope_scaling that names the default type is plain RoPE, as transformers reads it
    assert ModelConfig.from_hf_config(
        dict(tiny_hf_config("llama3"), rope_scaling={"rope_type": "default"})) == plain
    assert ModelConfig.from_hf_config(dict(modern, rope_scaling={"type": "default"})) == config


def test_config_from_file_and_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("qwen2")))
    config = ModelConfig.from_hf_config(tmp_path)
    assert config.qkv_bias and config.architecture == "Qwen2ForCausalLM"
    config.save(tmp_path / "model_config.json")
    assert ModelConfig.load(tmp_path / "model_config.json") == config


def test_vocab_padding_rule():
    config = ModelConfig.from_hf_config(tiny_hf_config("llama3", vocab_size=128256))
    assert config.padded_vocab_size(1) == 128256
    assert config.padded_vocab_size(8) == 129024  # next multiple of 128 * 8
    assert ModelConfig.from_hf_config(tiny_hf_config("llama3")).padded_vocab_size(2) == 256


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture 'GPT2LMHeadModel'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}), "low_freq_factor"),
    (dict(num_key_value_heads=3), "multiple of num_query_groups"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message) as error:
        ModelConfig.from_hf_config(dict(tiny_hf_config("llama3"), **change))
    assert len(str(error.value).splitlines()) == 1
    if "architecture" in message:  # the line names the supported set
        assert str(error.value).endswith("supported: " + ", ".join(SUPPORTED_ARCHITECTURES))


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), "type 'yarn' unsupported for Gemma-3"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "rope scaling on the sliding layers"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
])
def test_unsupported_gemma3_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(dict(tiny_hf_config("gemma3"), **change))


def test_gemma3_configs_in_every_spelling():
    """Gemma-3's two RoPE settings read from the released spelling (rope_theta,
    rope_local_base_freq, rope_scaling), transformers 5's per-layer-type rope_parameters and
    the text_config of a multimodal file, whose missing fields take transformers' defaults."""
    import transformers

    released = tiny_hf_config("gemma3")
    config = ModelConfig.from_hf_config(released)
    assert (config.rope_theta, config.rope_local_base_freq, config.rope_linear_factor) == (
        10000.0, 100.0, 8.0)
    assert config.qk_layernorm and config.is_gemma and config.dual_rope
    saved = transformers.AutoConfig.for_model(**released).to_dict()
    assert "full_attention" in saved["rope_parameters"] and "rope_local_base_freq" not in saved
    assert ModelConfig.from_hf_config(dict(saved, architectures=["Gemma3ForCausalLM"])) == config
    # gemma-3-4b-it's config.json, as released: the text_config names only what differs
    multimodal = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                  "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                                  "model_type": "gemma3_text", "num_hidden_layers": 34,
                                  "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                  "sliding_window": 1024}}
    text = transformers.Gemma3TextConfig(**multimodal["text_config"])
    read = ModelConfig.from_hf_config(multimodal)
    assert read.architecture == "Gemma3ForCausalLM"
    assert (read.num_attention_heads, read.num_query_groups, read.kv_channels, read.vocab_size) == (
        text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.vocab_size)
    assert list(read.layer_types) == text.layer_types and read.sliding_window == 1024
    assert (read.rope_theta, read.rope_local_base_freq, read.rope_linear_factor) == (
        text.rope_parameters["full_attention"]["rope_theta"],
        text.rope_parameters["sliding_attention"]["rope_theta"], 8.0)
    assert read.query_pre_attn_scalar == text.query_pre_attn_scalar
    exported = hf_config_dict(read, multimodal, torch.bfloat16)
    assert exported["architectures"] == ["Gemma3ForCausalLM"] and "text_config" not in exported
    assert ModelConfig.from_hf_config(exported) == read


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_hf_config_dict_is_the_inverse(arch):
    config = ModelConfig.from_hf_config(tiny_hf_config(arch))
    written = hf_config_dict(config, None, torch.bfloat16)
    assert ModelConfig.from_hf_config(written) == config
    assert hf_config_dtype(written) == torch.bfloat16


def test_hf_config_dtype_reads_both_spellings():
    assert hf_config_dtype({"torch_dtype": "bfloat16"}) == torch.bfloat16  # transformers < 5
    assert hf_config_dtype({"dtype": "float32", "torch_dtype": "bfloat16"}) == torch.float32
    assert hf_config_dtype({}) is None
    with pytest.raises(ValueError, match="x/config.json: dtype 'int8' unsupported"):
        hf_config_dtype({"dtype": "int8"}, "x/config.json")


def test_export_config_replaces_a_stale_dtype():
    config = ModelConfig.from_hf_config(tiny_hf_config("llama3"))
    base = dict(tiny_hf_config("llama3"), dtype="bfloat16")
    assert hf_config_dtype(hf_config_dict(config, base, torch.float32)) == torch.float32


def test_architecture_imports_no_megatron():
    import subprocess
    import sys

    code = ("import sys, megatron_simpo.model.architecture, megatron_simpo.model.flops; "
            "print(sorted(m for m in sys.modules if m.startswith('megatron.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _without(config: dict, *keys: str) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


@pytest.mark.parametrize("config, message", [
    (tiny_hf_config("mixtral", sliding_window=4096), r"\(sliding_window=4096\)"),
    # transformers' Gemma-3 attention never soft-caps, whatever the config says
    (tiny_hf_config("gemma3", attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    # transformers 5 reads rope_parameters' base, transformers 4 the top-level one
    (tiny_hf_config("llama3", rope_theta=10000.0,
                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
     "rope_theta=10000.0 contradicts rope_parameters' rope_theta=500000.0"),
    # Megatron-Core refuses renormalised top-1 routing at build time, after conversion began
    (tiny_hf_config("mixtral", num_experts_per_tok=1), "num_experts_per_tok=1"),
    (tiny_hf_config("qwen3_moe_norm", num_experts_per_tok=1), "num_experts_per_tok=1"),
    # transformers builds the model_type's class (a Llama here: no QKV bias), whatever
    # architectures says
    (tiny_hf_config("qwen2", model_type="llama"),
     "architectures names Qwen2ForCausalLM but model_type is 'llama'"),
    # quantized weights are not the model's without their scales (an fp8 file converted as is)
    (tiny_hf_config("llama3", quantization_config={"quant_method": "fp8"}),
     r"quantized weights \(quantization_config, quant_method 'fp8'\) are unsupported"),
])
def test_settings_megatron_does_not_reproduce_are_refused(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as error:
        ModelConfig.from_hf_config(tmp_path)
    assert len(str(error.value).splitlines()) == 1
    assert str(error.value).startswith(str(tmp_path / "config.json") + ": ")


# (32 heads: a model whose key/value heads default to 32, 8 or 4 is one transformers can build)
_HEADS = dict(num_attention_heads=32, hidden_size=64)


@pytest.mark.parametrize("arch, missing, given", [
    ("llama3", ("rms_norm_eps", "num_key_value_heads"), {}),
    ("qwen2", ("rms_norm_eps", "num_key_value_heads"), _HEADS),
    ("mistral", ("num_key_value_heads",), _HEADS),
    ("qwen3", ("num_key_value_heads", "head_dim"), _HEADS),
    ("mixtral", ("rope_theta", "rms_norm_eps", "num_key_value_heads", "num_local_experts"),
     _HEADS),
    ("qwen3_moe", ("num_key_value_heads", "num_experts"), _HEADS),
    ("mixtral", ("num_local_experts",), dict(num_experts=2)),  # Qwen3-MoE's spelling
    ("qwen3_moe", ("num_experts",), dict(num_local_experts=2)),  # transformers 5's
    ("gemma2", ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
                "query_pre_attn_scalar", "rms_norm_eps", "num_key_value_heads", "head_dim"), {}),
])
def test_settings_a_file_leaves_out_take_the_transformers_defaults(arch, missing, given):
    import transformers

    full = tiny_hf_config(arch, **given)
    partial = _without(full, *missing)
    hf = transformers.AutoConfig.for_model(**partial)
    read = ModelConfig.from_hf_config(partial)
    rope = hf.rope_parameters
    assert read.rope_theta == rope["rope_theta"] and read.norm_eps == hf.rms_norm_eps
    assert read.num_query_groups == hf.num_key_value_heads
    assert read.kv_channels == (getattr(hf, "head_dim", None)
                                or hf.hidden_size // hf.num_attention_heads)
    if read.is_moe:
        assert read.num_experts == hf.num_local_experts
    if arch == "gemma2":
        assert (read.attn_logit_softcapping, read.final_logit_softcapping, read.sliding_window,
                read.query_pre_attn_scalar) == (hf.attn_logit_softcapping,
                                                hf.final_logit_softcapping, hf.sliding_window,
                                                hf.query_pre_attn_scalar)


@pytest.mark.parametrize("window", [None, 8])
def test_a_mistral_export_without_its_original_config_keeps_its_window(window):
    """transformers reads a Mistral config without the key as a window of 4096: an export
    writes the model's own (none, or Mistral v0.1's)."""
    import transformers

    config = ModelConfig.from_hf_config(tiny_hf_config("mistral", sliding_window=window))
    written = hf_config_dict(config, None, torch.float32)
    assert transformers.AutoConfig.for_model(**written).sliding_window == window


def test_a_mistral_file_without_a_window_gets_transformers_4096():
    config = ModelConfig.from_hf_config(_without(tiny_hf_config("mistral"), "sliding_window"))
    assert config.sliding_window == 4096 and all(config.sliding_layers)


def test_a_window_no_sequence_outgrows_is_left_out_of_the_built_model():
    mistral = ModelConfig.from_hf_config(tiny_hf_config("mistral0.1"))  # a window of 8
    assert mistral.for_rows(9) is mistral
    assert mistral.for_rows(8) == ModelConfig.from_hf_config(tiny_hf_config("mistral0.1",
                                                                            sliding_window=None))
    gemma3 = ModelConfig.from_hf_config(tiny_hf_config("gemma3"))  # its window picks RoPE tables
    assert gemma3.for_rows(4) is gemma3
