"""RoPE with its cosines and sines made once per forward (model/rope.py) equals Megatron-Core's
own unfused RoPE bit for bit, forward and backward; what it does not take goes to Megatron's."""

import types

import pytest
import torch

from megatron_simpo.model import forward_cache, rope


def _config(**changes):
    return types.SimpleNamespace(**{"apply_rope_fusion": False, "rotary_interleaved": False,
                                    "multi_latent_attention": False, "mrope_section": None,
                                    **changes})


def _megatron(t, freqs, config, **kw):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    return apply_rotary_pos_emb(t, freqs, config, **{"cp_group": object(), **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mscale", [1.0, 1.3])
def test_rope_once_per_forward_equals_megatrons_bit_for_bit(dtype, mscale, monkeypatch):
    rope.install()
    monkeypatch.setattr(rope, "_megatron_apply", None)  # rope.apply must not hand it on
    g = torch.Generator().manual_seed(0)
    s, b, d = 12, 2, 16
    freqs = torch.randn(s, b, 1, d, generator=g) * 3
    outs, grads = [], []
    for apply in (_megatron, rope.apply):
        forward_cache.clear()
        q = torch.randn(s, b, 4, d, generator=torch.Generator().manual_seed(1)).to(dtype)
        k = torch.randn(s, b, 2, d, generator=torch.Generator().manual_seed(2)).to(dtype)
        q.requires_grad_(), k.requires_grad_()
        rq, rk = (apply(x, freqs, _config(), mscale=mscale, cp_group=object()) for x in (q, k))
        (rq.float().square().sum() + rk.float().sin().sum()).backward()
        outs.append((rq.detach(), rk.detach()))
        grads.append((q.grad, k.grad))
    for a, b_ in zip(outs[0] + grads[0], outs[1] + grads[1]):
        assert a.dtype == b_.dtype and torch.equal(a, b_)


def test_the_cosines_are_made_once_per_forward_and_anew_for_the_next(monkeypatch):
    rope.install()
    forward_cache.clear()
    calls = []
    real = torch.cos
    monkeypatch.setattr(torch, "cos", lambda x: calls.append(x) or real(x))
    t = torch.randn(5, 1, 2, 8)
    freqs = torch.randn(5, 1, 1, 8)
    for _ in range(3):  # three layers of one forward: one table
        rope.apply(t, freqs, _config())
    assert len(calls) == 1
    rope.apply(t, freqs.clone(), _config())  # the next forward's table
    assert len(calls) == 2


@pytest.mark.parametrize("case", ["interleaved", "partial", "thd"])
def test_what_it_does_not_take_goes_to_megatrons_rope(case):
    rope.install()
    t = torch.randn(6, 1, 2, 8)
    freqs = torch.randn(6, 1, 1, 4 if case == "partial" else 8)
    config = _config(rotary_interleaved=case == "interleaved")
    seen = []
    real = rope._megatron_apply
    rope._megatron_apply = lambda *a, **kw: seen.append(a) or real(*a, **kw)
    try:
        if case == "thd":
            with pytest.raises(Exception):  # Megatron's THD path (no group here): not ours
                rope.apply(t[:, 0], freqs, config, cu_seqlens=torch.tensor([0, 6]))
        else:
            assert torch.equal(rope.apply(t, freqs, config, cp_group=object()),
                               _megatron(t, freqs, config))
    finally:
        rope._megatron_apply = real
    assert len(seen) == 1


def test_a_layers_view_of_stacked_tables_is_made_once_per_table_and_keeps_the_masks(monkeypatch):
    """Gemma-3: every layer takes its table as a new view of the model's stacked two
    ([2, s, b, 1, d]); one entry per table and forward, and no layer's view pushes the forward's
    masks out of the cache (it did: a block mask rebuilt every few layers)."""
    rope.install()
    forward_cache.clear()
    calls, builds = [], []
    real = torch.cos
    monkeypatch.setattr(torch, "cos", lambda x: calls.append(x) or real(x))
    t = torch.randn(5, 1, 2, 8)
    stacked = torch.randn(2, 5, 1, 1, 8)
    for layer in range(12):
        out = rope.apply(t, stacked[int(layer % 6 == 5)], _config())
        assert torch.equal(out, _megatron(t, stacked[int(layer % 6 == 5)].clone(), _config()))
        forward_cache.per_forward(forward_cache.CAUSAL, ("mask",),
                                  lambda: builds.append(1) or object())
    assert len(calls) == 2 + 12 and len(builds) == 1  # 12: Megatron's own, for the comparison
