"""ModelConfig: Hugging Face config.json in (every supported spelling) and out again."""

import json

import pytest
import torch

from megatron_simpo.model.architecture import ModelConfig, hf_config_dict, hf_config_dtype
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
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(dict(tiny_hf_config("llama3"), **change))


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
