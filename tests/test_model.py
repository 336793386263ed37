"""Megatron GPTModel built from a Hugging Face config gives the Hugging Face logits."""

import json

import pytest
import torch

from megatron_simpo.model import ModelConfig
from tests.multiprocess import run_on_ranks
from tests.tiny import ARCHITECTURES, tiny_hf_config, tiny_hf_model

SEQ = 96  # long enough for rope-base and rope-scaling mistakes to exceed the tolerance


def _parity_worker(rank, tp, cases):
    from megatron.core import parallel_state

    from megatron_simpo import runtime
    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.model import build_model
    from megatron_simpo.parallel import ParallelConfig

    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    runtime.initialize(parallel, seed=1)
    outputs = {}
    for arch, hf_config, hf_state, tokens in cases:
        config = ModelConfig.from_hf_config(hf_config)
        model = build_model(config, parallel)
        full = hf_to_megatron(hf_state, config, config.padded_vocab_size(tp))
        load_rank_state(model, full, config, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                        tp_size=tp, pp_rank=0, pp_size=1)
        model.eval()
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            outputs[arch] = model(input_ids=tokens, position_ids=positions, attention_mask=None)
    return outputs


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_hugging_face(tp):
    cases, expected = [], {}
    for seed, arch in enumerate(sorted(ARCHITECTURES)):
        hf_config = tiny_hf_config(arch)
        model = tiny_hf_model(hf_config, seed=seed)
        tokens = torch.randint(0, hf_config["vocab_size"], (2, SEQ),
                               generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected[arch] = model(tokens).logits
        cases.append((arch, hf_config, model.state_dict(), tokens))
    results = run_on_ranks(tp, _parity_worker, tp, cases)
    for arch, hf_logits in expected.items():
        logits = torch.cat([r[arch] for r in results], dim=-1)  # [b, s, V_padded]
        vocab = hf_logits.shape[-1]
        assert logits.shape[-1] == ModelConfig.from_hf_config(tiny_hf_config(arch)).padded_vocab_size(tp)
        diff = (logits[..., :vocab] - hf_logits).abs().max().item()
        assert diff <= 1e-5, f"{arch} TP={tp}: max |logit diff| {diff}"


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


def test_spec_selection():
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_simpo.model import layer_spec

    config = ModelConfig.from_hf_config(tiny_hf_config("llama3"))
    assert isinstance(layer_spec(config, "local"), ModuleSpec)
    with pytest.raises(ValueError, match="--transformer-impl must be"):
        layer_spec(config, "apex")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs Transformer Engine, which is not installed"):
            layer_spec(config, "transformer_engine")


def test_memory_lean_logprobs_flag_is_validated():
    from megatron_simpo.model import enable_memory_lean_logprobs

    with pytest.raises(ValueError, match="--logprob-chunk-size must be >= 1"):
        enable_memory_lean_logprobs(object(), 0)
