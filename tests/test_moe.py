"""Mixture of experts (Mixtral, Qwen3-MoE): architecture, conversion and logits at EP/TP/PP
against transformers, round trip from an expert-parallel checkpoint, refused layouts.

The multi-rank checks run in the suite's reused 4-rank world (tests/multiprocess.py)."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from megatron_simpo.cli import convert as cli
from megatron_simpo.distributed.parallel import ParallelConfig
from megatron_simpo.model.architecture import ModelConfig, hf_config_dict
from tests.multiprocess import run_on_ranks
from tests.tiny import MOE_ARCHITECTURES, tiny_hf_config, tiny_hf_model

SEQ = 16
WORLD = 4


def _moe_config(arch: str) -> dict:
    return tiny_hf_config(arch, num_hidden_layers=2)


@pytest.fixture(scope="module")
def hf_moe_models(tmp_path_factory):
    from megatron_simpo.model.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("hf_moe")
    models = {}
    for seed, arch in enumerate(sorted(MOE_ARCHITECTURES)):
        # routers with larger weights than the default 0.02 make clear top-2 choices
        model = tiny_hf_model(_moe_config(arch), seed=seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".gate.weight"):
                    param.normal_(0.0, 0.5)
        model.save_pretrained(root / arch)
        build_tokenizer().save_pretrained(root / arch)
        models[arch] = (model, root / arch)
    return models


# ---- in-process: architecture ----------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
def test_architecture_reads_and_writes_the_moe_fields(arch):
    hf = _moe_config(arch)
    config = ModelConfig.from_hf_config(hf)
    assert config.num_experts == 4 and config.moe_router_topk == 2
    if arch == "mixtral":
        assert config.moe_ffn_hidden_size == 64 and config.moe_norm_topk_prob
        assert config.moe_layer_pattern == [True, True]
    else:
        assert config.moe_ffn_hidden_size == 48 and config.ffn_hidden_size == 64
        assert config.moe_norm_topk_prob == hf["norm_topk_prob"] and config.qk_layernorm
        assert config.moe_layer_pattern == [True, not hf["mlp_only_layers"]]
    out = hf_config_dict(config, None, torch.float32)
    assert ModelConfig.from_hf_config(out) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_qwen3_moe_decoder_sparse_step_and_refusals():
    hf = tiny_hf_config("qwen3_moe", num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2)
    assert ModelConfig.from_hf_config(hf).moe_layer_pattern == [False, True, False, True]
    with pytest.raises(ValueError, match="router_jitter_noise"):
        ModelConfig.from_hf_config(tiny_hf_config("mixtral", router_jitter_noise=0.1))
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf_config(tiny_hf_config("mixtral", sliding_window=4096))


def test_parallel_check_names_the_expert_flags():
    moe = ModelConfig.from_hf_config(_moe_config("mixtral"))
    dense = ModelConfig.from_hf_config(tiny_hf_config("llama3"))
    cases = [
        (dict(expert_model_parallel_size=3), moe, "--expert-model-parallel-size \\(3\\) must "
                                                  "divide the number of experts \\(4\\)"),
        (dict(expert_model_parallel_size=2), dense, "--expert-model-parallel-size \\(2\\) needs "
                                                    "a mixture-of-experts model"),
        (dict(tensor_model_parallel_size=2, expert_model_parallel_size=2), moe,
         "needs --sequence-parallel"),
        (dict(expert_tensor_parallel_size=3), moe, "--expert-tensor-parallel-size \\(3\\) must "
                                                   "divide the expert hidden size"),
    ]
    for sizes, model, message in cases:
        with pytest.raises(ValueError, match=message):
            ParallelConfig(**sizes).check_model(model)
    with pytest.raises(ValueError, match="--expert-model-parallel-size \\(4\\) x "
                                         "--expert-tensor-parallel-size \\(1\\) x "
                                         "--pipeline-model-parallel-size \\(2\\) = 8 does not "
                                         "divide the world size \\(4\\)"):
        ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=4
                       ).check_world_size(4)


# ---- 4 ranks: conversion and logits ----------------------------------------------------------
def _logits(model, tokens):
    """Forward through Megatron's schedule (PP); [b, s, V_p/tp] on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, m):
        batch = next(data_iterator)
        output = m(input_ids=batch, position_ids=torch.arange(batch.shape[1]).expand_as(batch),
                   attention_mask=None)
        return output, lambda out: (out.sum() * 0, torch.tensor(0, dtype=torch.int), out.detach())

    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True)
    return outputs[0] if outputs else None


LAYOUTS = {"ep2": dict(expert_model_parallel_size=2),
           "tp2xep2": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                           expert_model_parallel_size=2, expert_tensor_parallel_size=1),
           "pp2xep2": dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2)}


def _convert_and_run(rank, layouts, cases, out_dir):
    from megatron.core import parallel_state as ps

    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.convert.hf_to_megatron import convert_rank
    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.builder import build_model

    results = {}
    for layout in layouts:
        parallel = ParallelConfig(**LAYOUTS[layout])
        runtime.initialize(parallel, seed=0)
        for arch, hf_dir, tokens in cases:
            config = ModelConfig.from_hf_config(hf_dir)
            save = Path(out_dir) / f"{arch}-{layout}"
            convert_rank(hf_dir, save, config, parallel, torch.float32)
            model = build_model(config, parallel)  # random weights, replaced by the load
            checkpointing.load_checkpoint(checkpointing.find_checkpoint(save), model,
                                          model_config=config)
            logits = _logits(model, tokens)
            if ps.is_pipeline_last_stage() and ps.get_data_parallel_rank() == 0:
                results[layout, arch, ps.get_tensor_model_parallel_rank()] = logits
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    return results


def test_converted_moe_gives_hugging_face_logits_at_ep_tp_pp(hf_moe_models, tmp_path):
    tokens = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    cases = [(arch, str(path), tokens) for arch, (_, path) in hf_moe_models.items()]
    results = {}
    for rank_results in run_on_ranks(WORLD, _convert_and_run, list(LAYOUTS), cases,
                                     str(tmp_path)):
        results.update(rank_results)
    for arch, (model, _) in hf_moe_models.items():
        with torch.no_grad():
            expected = model(tokens).logits
        for layout in LAYOUTS:
            shards = [results[layout, arch, r] for r in range(2) if (layout, arch, r) in results]
            logits = torch.cat(shards, dim=-1)[..., :expected.shape[-1]]
            diff = (logits - expected).abs().max().item()
            assert diff <= 1e-5, f"{arch} {layout}: max |logit diff| {diff}"


def test_round_trip_from_an_ep2_checkpoint_is_bit_exact(hf_moe_models, tmp_path, capsys):
    import transformers
    from safetensors.torch import load_file

    for arch in ("mixtral", "qwen3_moe"):
        model, hf_dir = hf_moe_models[arch]
        cli.hf_to_megatron_main(["--hf-path", str(hf_dir), "--save", str(tmp_path / arch / "mg"),
                                 "--expert-model-parallel-size", "2", "--dtype", "fp32"],
                                run_on_ranks=run_on_ranks)
        assert "EP=2" in capsys.readouterr().out
        cli.megatron_to_hf_main(["--load", str(tmp_path / arch / "mg"),
                                 "--save", str(tmp_path / arch / "hf")],
                                run_on_ranks=run_on_ranks)
        original = load_file(hf_dir / "model.safetensors")
        exported = load_file(tmp_path / arch / "hf" / "model.safetensors")
        assert set(original) == set(exported)
        assert any(".experts.3." in name for name in exported)
        for name, tensor in original.items():
            assert torch.equal(tensor, exported[name]), name
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch / "hf")
        tokens = torch.randint(0, 100, (2, SEQ))
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(tokens).logits, model(tokens).logits)
