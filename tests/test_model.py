"""Megatron GPTModel built from a Hugging Face config gives the Hugging Face logits."""

import pytest
import torch

from megatron_simpo.architecture import ModelConfig
from tests.multiprocess import run_on_ranks
from tests.tiny import ARCHITECTURES, tiny_hf_config, tiny_hf_model

SEQ = 96  # long enough for rope-base and rope-scaling mistakes to exceed the tolerance


def _parity_worker(rank, tp, cases):
    from megatron.core import parallel_state

    from megatron_simpo import runtime
    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.model import build_model, check_output_mode, enable_memory_lean_logprobs
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
    # The step's log-prob path must match what the model returns: logits here ...
    outputs["mode_errors"] = []
    for build_lean, chunk in ((False, 8), (True, 0)):
        if build_lean:  # ... and hidden states once memory-lean log-probs are on.
            enable_memory_lean_logprobs(model)
        try:
            check_output_mode(model, chunk)
        except ValueError as error:
            outputs["mode_errors"].append(str(error))
    check_output_mode(model, 8)  # the matching chunk size passes
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
    for result in results:
        assert [e.split(" but ")[1][:25] for e in result["mode_errors"]] == [
            "the model returns logits:", "the model returns hidden "]
    for arch, hf_logits in expected.items():
        logits = torch.cat([r[arch] for r in results], dim=-1)  # [b, s, V_padded]
        vocab = hf_logits.shape[-1]
        assert logits.shape[-1] == ModelConfig.from_hf_config(tiny_hf_config(arch)).padded_vocab_size(tp)
        diff = (logits[..., :vocab] - hf_logits).abs().max().item()
        assert diff <= 1e-5, f"{arch} TP={tp}: max |logit diff| {diff}"


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
    from megatron_simpo.model import check_output_mode

    with pytest.raises(ValueError, match="--logprob-chunk-size must be an integer >= 0"):
        check_output_mode(object(), -1)
