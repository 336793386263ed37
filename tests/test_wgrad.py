"""Weight gradients added straight into DDP's main_grad (model/wgrad.py): what training builds
uses Megatron-Core's gradient-accumulation fusion, and it gives the unfused path's gradients."""

import torch

from tests.multiprocess import run_on_ranks
from tests.tiny import tiny_hf_config, tiny_hf_model


def _main_grads(rank, hf_config, hf_state, pairs):
    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.data.collate import collate_pairs
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components, release
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings
    from megatron_simpo.training.step import train_step

    config, parallel = ModelConfig.from_hf_config(hf_config), ParallelConfig()
    runtime.initialize(parallel, seed=0, model_config=config)
    state = hf_to_megatron(hf_state, config, config.padded_vocab_size(1))
    out = {}
    for name, overrides in (("fused", None), ("unfused", {"gradient_accumulation_fusion": False})):
        parts = build_components(
            config, parallel, OptimizerSettings(lr=1e-3), transformer_overrides=overrides,
            load_policy=lambda m: load_rank_state(m, state, config, tp_rank=0, tp_size=1,
                                                  pp_rank=0, pp_size=1))
        train_step([parts.model], parts.optimizer, [collate_pairs(pairs, 24)],
                   LossConfig(beta=2.5, gamma=1.375), head=parts.head)
        named = list(parts.model.module.named_parameters())
        out[name] = dict(
            fusion=parts.model.module.config.gradient_accumulation_fusion,
            added=sorted(n for n, p in named if getattr(p, "grad_added_to_main_grad", False)),
            grads={n: p.main_grad.clone() for n, p in named})
        release(parts)
    return out


def test_training_adds_weight_gradients_into_main_grad_as_the_unfused_path_does():
    from megatron_simpo.data.collate import TokenizedPair

    hf_config = tiny_hf_config("llama3")
    g = torch.Generator().manual_seed(0)
    pairs = [TokenizedPair(*(torch.randint(0, 100, (n,), generator=g).tolist()
                             for n in (5, 9, 7))) for _ in range(4)]
    result = run_on_ranks(1, _main_grads, hf_config, tiny_hf_model(hf_config).state_dict(),
                          pairs)[0]
    fused, unfused = result["fused"], result["unfused"]
    assert fused["fusion"] and not unfused["fusion"] and not unfused["added"]
    # every linear weight of every layer took the fused path (the output layer: the lean head)
    assert len(fused["added"]) == 4 * hf_config["num_hidden_layers"], fused["added"]
    assert all(n.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                           "linear_fc2.weight")) for n in fused["added"])
    for name, grad in unfused["grads"].items():
        assert grad.abs().max() > 0, name
        assert (fused["grads"][name] - grad).abs().max().item() <= 1e-6, name
