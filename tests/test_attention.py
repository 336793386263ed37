"""SDPA core attention equals Megatron-Core's local DotProductAttention (fp32, 1e-5)."""

import pytest
import torch

from tests.multiprocess import run_on_ranks
from tests.tiny import tiny_hf_config


def _compare(rank, hf_config, tp, masked):
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.attention import SDPAttention
    from megatron_simpo.model.builder import transformer_config
    from megatron_simpo.distributed.parallel import ParallelConfig

    config = ModelConfig.from_hf_config(hf_config)
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    runtime.initialize(parallel, seed=0, model_config=config)
    tconfig = transformer_config(config, parallel)
    heads = config.num_attention_heads // tp
    groups = config.num_query_groups // tp
    s, b, hn = 12, 3, config.kv_channels
    g = torch.Generator().manual_seed(parallel_state.get_tensor_model_parallel_rank())
    inputs = [torch.randn(s, b, n, hn, generator=g) for n in (heads, groups, groups)]
    mask = None
    mask_type = AttnMaskType.causal
    if masked:  # packing: two sequences of 5 and 7 tokens, each attending causally to itself
        segment = torch.tensor([0] * 5 + [1] * 7)
        allowed = (segment[:, None] == segment[None, :]) & torch.ones(s, s).tril().bool()
        mask = (~allowed).expand(b, 1, s, s)
        mask_type = AttnMaskType.arbitrary
    upstream = torch.randn(s, b, heads * hn, generator=g)
    results = []
    for cls in (DotProductAttention, SDPAttention):
        module = cls(tconfig, layer_number=2, attn_mask_type=mask_type, attention_type="self")
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = module(*leaves, attention_mask=mask)
        out.backward(upstream)
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    (expected, expected_grads), (actual, grads) = results
    assert actual.shape == expected.shape == (s, b, heads * hn)
    return ((actual - expected).abs().max().item(),
            max((a - e).abs().max().item() for a, e in zip(grads, expected_grads)))


@pytest.mark.parametrize("tp, masked", [(1, False), (1, True), (2, False), (2, True)])
def test_sdpa_attention_equals_megatron_local_attention(tp, masked):
    hf_config = tiny_hf_config("llama3")  # grouped-query attention
    for out_diff, grad_diff in run_on_ranks(tp, _compare, hf_config, tp, masked):
        assert out_diff <= 1e-5 and grad_diff <= 1e-5, (out_diff, grad_diff)


def _refused(rank, hf_config):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.attention import SDPAttention
    from megatron_simpo.model.builder import transformer_config
    from megatron_simpo.distributed.parallel import ParallelConfig

    config = ModelConfig.from_hf_config(hf_config)
    runtime.initialize(ParallelConfig(), seed=0, model_config=config)
    tconfig = transformer_config(config, ParallelConfig())
    try:
        SDPAttention(tconfig, 1, AttnMaskType.causal, "self", attention_dropout=0.1)
    except ValueError as error:
        return str(error)


def test_sdpa_attention_refuses_dropout():
    [message] = run_on_ranks(1, _refused, tiny_hf_config("llama3"))
    assert "does not do attention dropout 0.1" in message
