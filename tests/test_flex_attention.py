"""FlexAttention (model/flex.py) equals SDPA and the explicit soft-capped attention on every mask
this project makes: causal, packed block-diagonal, sliding windows, with GQA and soft-capping.
CPU: the forward (FlexAttention has no CPU backward); gpu-marked: forward and gradients of the
compiled kernel in fp32 and bf16."""

import pytest
import torch
import torch.nn.functional as F

from megatron_simpo.model import flex, forward_cache
from megatron_simpo.model.attention import segment_causal_mask, softcapped_attention

pytestmark = pytest.mark.skipif(not flex.available(), reason="PyTorch without FlexAttention")
B, HEADS, GROUPS, HN = 2, 4, 2, 16


def _masks(s: int, device) -> dict[str, torch.Tensor]:
    """True where a query may NOT attend, [b or 1, 1, s, s]: the layouts of the batches."""
    causal = torch.ones(s, s, dtype=torch.bool, device=device).triu(1).view(1, 1, s, s)
    cu = torch.tensor([0, s // 3, s // 3 + 7, s], device=device)  # one segment shorter than a block
    distance = torch.arange(s, device=device)[:, None] - torch.arange(s, device=device)[None, :]
    # per-row masks: the second row is padded after 2s/3 (its padding attends to itself only)
    padded = causal.expand(B, 1, s, s).clone()
    tail = 2 * s // 3
    padded[1, 0, tail:, :tail] = True
    return {"causal": causal, "packed": segment_causal_mask(cu, s),
            "window": causal | (distance > 40).view(1, 1, s, s), "per-row": padded}


def _reference(q, k, v, masked_out, scale, softcap):
    repeat = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(repeat, dim=1) for t in (k, v))
    if softcap is not None:
        return softcapped_attention(q, k, v, masked_out, scale, softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked_out, scale=scale)


def _inputs(s, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, n, s, HN, generator=g, device=device, dtype=dtype)
            for n in (HEADS, GROUPS, GROUPS)]


@pytest.mark.parametrize("softcap", [None, 0.5])
def test_flex_equals_sdpa_on_every_mask(softcap):
    s = 300  # not a multiple of FlexAttention's block
    q, k, v = _inputs(s, "cpu", torch.float32)
    for name, mask in _masks(s, "cpu").items():
        out = flex.flex_context(q, k, v, mask, 0.3, softcap)
        expected = _reference(q, k, v, mask, 0.3, softcap)
        assert out.shape == expected.shape == (B, HEADS, s, HN)
        assert (out - expected).abs().max().item() <= 1e-5, name


def test_the_block_mask_skips_what_the_mask_rules_out():
    # A packed row of two 256-token sequences: the off-diagonal 128-blocks are never computed.
    s = 512
    mask = segment_causal_mask(torch.tensor([0, 256, 512]), s)
    blocks = flex.block_mask(mask).to_dense()[0, 0]  # [s/128, s/128] 1 where computed
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    assert torch.equal(blocks.cpu().int(), expected.int())


def test_layout_block_masks_equal_their_dense_masks():
    """Block masks made from a row's layout (positions, segments, window; no dense mask) give
    the attention of the dense mask, also at a context-parallel rank's positions (chunks 1 and
    2 of 4 against the gathered keys in rank order)."""
    from megatron_simpo.distributed.parallel import context_parallel_positions

    s = 300
    cu = torch.tensor([0, s // 3, s // 3 + 7, s])
    segment = torch.repeat_interleave(torch.arange(3), cu.diff())
    whole = torch.arange(s)
    cp_keys = torch.cat([context_parallel_positions(s, r, 2) for r in range(2)])
    for name, query_at, key_at, packed, window in (
            ("causal", whole, whole, False, None), ("packed", whole, whole, True, None),
            ("window", whole, whole, False, 40), ("packed window", whole, whole, True, 40),
            ("cp rank 1", context_parallel_positions(s, 1, 2), cp_keys, True, 40)):
        masked = key_at[None, :] > query_at[:, None]  # independent: True = may not attend
        if packed:
            masked |= segment[query_at][:, None] != segment[key_at][None, :]
        if window is not None:
            masked |= (query_at[:, None] - key_at[None, :]) > window
        q, k, v = _inputs(s, "cpu", torch.float32)
        q = q[:, :, :query_at.shape[0]]
        mask = flex.layout_block_mask(query_at, key_at, cu if packed else None, window)
        out = flex.flex_context(q, k, v, None, 0.3, mask=mask)
        expected = _reference(q, k, v, masked.view(1, 1, *masked.shape), 0.3, None)
        assert (out - expected).abs().max().item() <= 1e-5, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_compiled_flex_equals_sdpa_with_gradients_on_gpu(dtype, tolerance):
    s = 1000
    for softcap in (None, 0.5):
        for name, mask in _masks(s, "cuda").items():
            leaves = [t.requires_grad_(True) for t in _inputs(s, "cuda", dtype)]
            out = flex.flex_context(*leaves, mask, 0.25, softcap)
            upstream = torch.randn_like(out)
            grads = torch.autograd.grad(out, leaves, upstream)
            ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
            expected = _reference(*ref_leaves, mask, 0.25, softcap)
            ref_grads = torch.autograd.grad(expected, ref_leaves, upstream.float())
            assert (out.float() - expected).abs().max().item() <= tolerance, (name, softcap)
            for got, want in zip(grads, ref_grads):
                assert (got.float() - want).abs().max().item() <= tolerance * 10, (name, softcap)


def _dispatch(rank, hf_configs):
    """SDPAttention with FlexAttention forced on (as on CUDA) against its SDPA / explicit-score
    path: packed segments, an explicit per-row mask, Gemma-2 windows and soft-capping; and one
    block mask per forward source shared by the layers."""
    from unittest import mock

    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.attention import SDPAttention
    from megatron_simpo.model.builder import transformer_config

    from megatron.core import parallel_state

    results = {}
    for arch, hf_config in hf_configs.items():
        config = ModelConfig.from_hf_config(hf_config)
        parallel_state.destroy_model_parallel()
        runtime.initialize(ParallelConfig(), seed=0, model_config=config)
        tconfig = transformer_config(config, ParallelConfig())
        s, hn = 40, config.kv_channels
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(s, 1, n, hn, generator=g) for n in (
            config.num_attention_heads, config.num_query_groups, config.num_query_groups)]
        cu = torch.tensor([0, 17, 40], dtype=torch.int32)
        packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=23, max_seqlen_kv=23)
        explicit = torch.ones(s, s, dtype=torch.bool).triu(1)
        explicit[30:, 5:12] = True  # some keys a later query may not see
        cases = {"causal": dict(attention_mask=None), "packed": dict(
            attention_mask=None, packed_seq_params=packed), "explicit": dict(
            attention_mask=explicit.view(1, 1, s, s), attn_mask_type=AttnMaskType.arbitrary)}
        for layer in (1, 2):  # Gemma-2's test config: layer 1 slides, layer 2 is global
            module = SDPAttention(tconfig, layer_number=layer, attn_mask_type=AttnMaskType.causal,
                                  attention_type="self", softcap=config.attn_logit_softcapping)
            for name, kwargs in cases.items():
                if arch == "llama3" and name == "causal":
                    continue  # plain causal rows stay on SDPA: nothing to compare
                with torch.no_grad():
                    expected = module(*inputs, **kwargs)
                    forward_cache.clear()
                    with mock.patch.object(flex, "used_for", return_value=True):
                        actual = module(*inputs, **kwargs)
                        again = forward_cache._cache[-1][2]
                        module(*inputs, **kwargs)  # the same source: the block mask is reused
                        reused = (forward_cache._cache[-1][2] is again
                                  and len(forward_cache._cache) == 1)
                results[f"{arch}_{name}_{layer}"] = ((actual - expected).abs().max().item(), reused)
    return results


def test_sdpa_attention_routes_explicit_masks_and_soft_capping_through_flex():
    from tests.multiprocess import run_on_ranks
    from tests.tiny import tiny_hf_config

    configs = {"llama3": tiny_hf_config("llama3"), "gemma2": tiny_hf_config("gemma2")}
    (results,) = run_on_ranks(1, _dispatch, configs)
    assert len(results) == 10
    for name, (diff, reused) in results.items():
        assert diff <= 1e-5 and reused, (name, diff, reused)


def test_flex_can_be_switched_off_and_a_bad_switch_is_refused(monkeypatch):
    query = torch.zeros(1)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert flex.used_for(query)
    monkeypatch.setenv("MEGATRON_SIMPO_FLEX_ATTENTION", "0")
    assert not flex.used_for(query)
    monkeypatch.setenv("MEGATRON_SIMPO_FLEX_ATTENTION", "no")
    with pytest.raises(ValueError, match="MEGATRON_SIMPO_FLEX_ATTENTION must be 0 or 1, got 'no'"):
        flex.used_for(query)
