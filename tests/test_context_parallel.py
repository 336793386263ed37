"""Context parallelism (--context-parallel-size) in the local spec's attention.

One spawned 4-rank gloo world runs every multi-rank check in sequence: the CP attention against
plain SDPA / eager attention on the whole row (causal, packed segments, an explicit mask, a
Gemma-2 window with soft-capping), then one SimPO step at CP2 x TP2, CP2 x PP2 and CP2 x DP2
(distributed optimizer), causal and packed rows, shared-prompt rows packed at CP2 x TP2
(--share-prompt: a scored token's position may sit on either CP rank), DPO with its reference
model's pass at CP2 x TP2 (packed), and Gemma-3 (two RoPE tables) at CP2 x TP2 (packed). The
step's reference is tests/test_step.py's independent one-process Hugging Face computation
(which CP1 matches there).
"""

from unittest import mock

import pytest
import torch

from megatron_simpo.data.collate import TokenizedPair, collate_pairs
from tests.multiprocess import run_on_ranks
from tests.test_step import (LR, ADAM_EPS, BETA, GAMMA, _compare, _reference_step,
                             assert_mean_logits, gather_global, trl_mean_logits)
from tests.tiny import tiny_hf_config, tiny_hf_model

PAIRS, SEQ = 4, 24
# name: (tp, pp, cp, packed, distributed optimizer, shared-prompt rows)
LAYOUTS = {
    "cp2_tp2": (2, 1, 2, False, False, False),
    "cp2_tp2_packed": (2, 1, 2, True, False, False),
    "cp2_pp2": (1, 2, 2, False, False, False),
    "cp2_pp2_packed": (1, 2, 2, True, False, False),
    "cp2_dp2_distopt": (1, 1, 2, False, True, False),
    "cp2_tp2_shared_packed": (2, 1, 2, True, False, True),
}
# DPO: the frozen reference model's forward-only pass runs under CP too
DPO_LAYOUT = (2, 1, 2, True, False, False)
# Gemma-3: its second (local) RoPE table at the CP rank's positions
GEMMA3_LAYOUT = (2, 1, 2, True, False, False)


def _pairs(vocab: int, seed: int = 1) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(1, 4), ids(1, 8), ids(1, 8)) for _ in range(PAIRS)]


@pytest.mark.parametrize("cp, packed", [(2, False), (3, False), (4, False), (2, True),
                                        (3, True)])
def test_chunked_causal_attention_equals_whole_row_sdpa(cp, packed):
    """Causal rows under CP on the CPU, no row mask: every rank's two query chunks against the
    gathered keys (rank order, grouped-query: not repeated) equal the whole row's causal SDPA at
    those rows, output and q/k/v gradients (fp32, 1e-5); packed, with segments that end inside
    a chunk, span chunks, or fill one exactly (blocks with a mask, without, skipped)."""
    import torch.nn.functional as F

    from megatron_simpo.distributed.parallel import context_parallel_positions
    from megatron_simpo.model.context_parallel import chunked_causal_attention

    g = torch.Generator().manual_seed(cp)
    b, heads, groups, hn, s = 2, 6, 2, 16, 2 * cp * 5  # 3 query heads per key/value group
    whole = [torch.randn(b, n, s, hn, generator=g, requires_grad=True)
             for n in (heads, groups, groups)]
    upstream = torch.randn(b, heads, s, hn, generator=g)
    cu = torch.tensor([0, 3, 5, 5 + 2 * 5, s]) if packed else None  # chunks of 5 positions
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    if packed:
        segment = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
        allowed &= segment[:, None] == segment[None, :]
    expected = F.scaled_dot_product_attention(*whole, attn_mask=allowed, scale=0.3,
                                              enable_gqa=True)
    expected.backward(upstream)
    key_at = torch.cat([context_parallel_positions(s, r, cp) for r in range(cp)])
    keys = [t.detach()[:, :, key_at].requires_grad_() for t in whole[1:]]
    key_grads = torch.zeros(2, b, groups, s, hn)
    for rank in range(cp):
        at = context_parallel_positions(s, rank, cp)
        q = whole[0].detach()[:, :, at].requires_grad_()
        out = chunked_causal_attention(q, *keys, at, key_at, 0.3, cu)
        assert (out - expected.detach()[:, :, at]).abs().max().item() <= 1e-5, rank
        grads = torch.autograd.grad(out, [q, *keys], upstream[:, :, at])
        assert (grads[0] - whole[0].grad[:, :, at]).abs().max().item() <= 1e-5, rank
        key_grads[0, :, :, key_at] += grads[1]
        key_grads[1, :, :, key_at] += grads[2]
    for got, leaf in zip(key_grads, whole[1:]):  # summed over the ranks' queries
        assert (got - leaf.grad).abs().max().item() <= 1e-5


def _attention_checks(hf_configs) -> dict:
    """This rank's CP attention (CP2 x DP2 world) against the whole row on one process: max
    differences of the output and of the query/key/value gradients, per mask."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig, context_parallel_positions
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model import flex
    from megatron_simpo.model.attention import SDPAttention
    from megatron_simpo.model.builder import transformer_config

    parallel = ParallelConfig(context_parallel_size=2)
    results = {}
    for arch, hf_config in hf_configs.items():
        config = ModelConfig.from_hf_config(hf_config)
        runtime.initialize(parallel, seed=0, model_config=config)
        tconfig = transformer_config(config, parallel)
        at = context_parallel_positions(16, ps.get_context_parallel_rank(), 2)
        s, hn = 16, config.kv_channels
        heads, groups = config.num_attention_heads, config.num_query_groups
        cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
        segment = torch.repeat_interleave(torch.arange(3), cu.diff().long())
        causal = torch.ones(s, s).tril().bool()
        packed_allowed = causal & (segment[:, None] == segment[None, :])
        g = torch.Generator().manual_seed(7)
        arbitrary = torch.rand(2, 1, s, s, generator=g) < 0.3
        arbitrary[..., torch.arange(s), torch.arange(s)] = False  # every query sees itself
        cases = {"causal": (1, None, None, ~causal), "packed": (1, None, cu, ~packed_allowed),
                 "explicit": (2, arbitrary, None, arbitrary)}
        if arch == "gemma2":  # layer 1: a window of 8, and soft-capping
            cases = {"causal": cases["causal"], "packed": cases["packed"]}
        for name, (b, mask, segments, whole_mask) in cases.items():
            g = torch.Generator().manual_seed(3)
            inputs = [torch.randn(s, b, n, hn, generator=g) for n in (heads, groups, groups)]
            upstream = torch.randn(s, b, heads * hn, generator=g)
            mask_type = AttnMaskType.causal if mask is None else AttnMaskType.arbitrary
            module = SDPAttention(tconfig, layer_number=1, attn_mask_type=mask_type,
                                  attention_type="self", softmax_scale=tconfig.softmax_scale,
                                  softcap=config.attn_logit_softcapping)
            leaves = [t[at].clone().requires_grad_(True) for t in inputs]
            packed = None if segments is None else PackedSeqParams(
                qkv_format="sbhd", cu_seqlens_q=segments, cu_seqlens_kv=segments,
                max_seqlen_q=7, max_seqlen_kv=7)
            out = module(*leaves, attention_mask=mask, packed_seq_params=packed)
            out.backward(upstream[at])
            if mask is None:  # the GPUs' path for these rows: FlexAttention, layout block masks
                with torch.no_grad(), mock.patch.object(flex, "used_for", return_value=True):
                    routed = module(*(t.detach() for t in leaves), attention_mask=None,
                                    packed_seq_params=packed)
                results[f"{arch}_{name}_flex"] = ((routed - out.detach()).abs().max().item(), 0.0)
            # the whole row in plain torch
            whole = [t.clone().requires_grad_(True) for t in inputs]
            q, k, v = (t.permute(1, 2, 0, 3) for t in whole)
            k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
            scale = tconfig.softmax_scale or hn ** -0.5
            if config.sliding_window is not None:
                distance = torch.arange(s)[:, None] - torch.arange(s)[None, :]
                whole_mask = whole_mask | (distance >= config.sliding_window)
            if config.attn_logit_softcapping is not None:
                cap = config.attn_logit_softcapping
                scores = torch.tanh(q @ k.transpose(-2, -1) * scale / cap) * cap
                scores = scores.masked_fill(whole_mask, float("-inf"))
                context = torch.softmax(scores, -1) @ v
            else:
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=~whole_mask,
                                                         scale=scale)
            expected = context.permute(2, 0, 1, 3).reshape(s, b, heads * hn)
            expected.backward(upstream)
            results[f"{arch}_{name}"] = (
                (out.detach() - expected.detach()[at]).abs().max().item(),
                max((leaf.grad - w.grad[at]).abs().max().item()
                    for leaf, w in zip(leaves, whole)))
        ps.destroy_model_parallel()
    return results


def _step(hf_config, hf_state, pairs, layout, ref_state=None):
    """One SimPO step at ``layout`` (DPO against ``ref_state`` when given): loss, grad norm,
    TP-merged gradients and parameters."""
    from megatron.core import parallel_state as ps

    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.data.collate import collate_packed, collate_shared
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components, release
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings, finish_param_sync
    from megatron_simpo.training.step import train_step

    tp, pp, cp, packed, distopt, shared = layout
    config = ModelConfig.from_hf_config(hf_config)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              context_parallel_size=cp)
    runtime.initialize(parallel, seed=0, model_config=config)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    state = hf_to_megatron(hf_state, config, config.padded_vocab_size(tp))
    settings = OptimizerSettings(lr=LR, adam_eps=ADAM_EPS, clip_grad=1e9,
                                 use_distributed_optimizer=distopt)
    def loader(weights):
        return lambda model: load_rank_state(model, weights, config, tp_rank=tp_rank, tp_size=tp,
                                             pp_rank=pp_rank, pp_size=pp)

    dpo = ref_state is not None
    reference = hf_to_megatron(ref_state, config, config.padded_vocab_size(tp)) if dpo else None
    parts = build_components(config, parallel, settings, logprob_chunk_size=7,
                             load_policy=loader(state), with_reference=dpo,
                             load_reference=loader(reference) if dpo else None)
    loss = LossConfig(algorithm="dpo", beta=0.1) if dpo else LossConfig(beta=BETA, gamma=GAMMA)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = pairs[dp_rank * PAIRS // dp_size:(dp_rank + 1) * PAIRS // dp_size]
    if shared:  # one packed row of shared-prompt rows (--share-prompt --pack-sequences)
        batch = collate_shared(mine, 2 * SEQ + 16, packed=True)
    else:
        batch = collate_packed(mine, 2 * SEQ) if packed else collate_pairs(mine, SEQ)
    result = train_step([parts.model], parts.optimizer, [batch], loss, head=parts.head,
                        reference_model=parts.reference)
    finish_param_sync([parts.model])

    def gather(tensors):
        return gather_global(tensors, config, tp, pp_rank, pp)

    named = list(parts.model.module.named_parameters())
    grads = None if distopt else gather((n, p.main_grad) for n, p in named)
    params = gather((n, p.detach()) for n, p in named)
    release(parts)
    ps.destroy_model_parallel()
    return dict(metrics=result.metrics, grad_norm=result.grad_norm, grads=grads, params=params,
                config=config)


def _world(rank, attention_configs, hf_config, hf_state, ref_state, gemma3, pairs):
    steps = {name: _step(hf_config, hf_state, pairs, layout) for name, layout in LAYOUTS.items()}
    steps["dpo_cp2_tp2_packed"] = _step(hf_config, hf_state, pairs, DPO_LAYOUT, ref_state)
    steps["gemma3_cp2_tp2_packed"] = _step(*gemma3, pairs, GEMMA3_LAYOUT)
    return dict(attention=_attention_checks(attention_configs), steps=steps)


@pytest.fixture(scope="module")
def cp_world():
    """Every rank's results of the one 4-rank world, and the one-process reference step."""
    hf_config = tiny_hf_config("llama3")
    hf_state = tiny_hf_model(hf_config).state_dict()
    pairs = _pairs(hf_config["vocab_size"])
    ref_state = tiny_hf_model(hf_config, seed=1).state_dict()
    attention_configs = {"llama3": hf_config, "gemma2": tiny_hf_config("gemma2")}
    gemma3_config = tiny_hf_config("gemma3")
    gemma3 = (gemma3_config, tiny_hf_model(gemma3_config).state_dict())
    results = run_on_ranks(4, _world, attention_configs, hf_config, hf_state, ref_state, gemma3,
                           pairs)
    batch = collate_pairs(pairs, SEQ)
    reference = {"simpo": (_reference_step(hf_config, hf_state, batch, "simpo"), hf_config),
                 "dpo": (_reference_step(hf_config, hf_state, batch, "dpo", ref_state), hf_config),
                 "gemma3": (_reference_step(*gemma3, batch, "simpo"), gemma3_config)}
    logits = {"simpo": trl_mean_logits(hf_config, hf_state, batch),
              "gemma3": trl_mean_logits(*gemma3, batch)}
    logits["dpo"] = logits["simpo"]  # the policy's
    return results, reference, logits


def test_context_parallel_attention_equals_whole_row_attention(cp_world):
    results, _, _ = cp_world
    for rank, result in enumerate(results):
        assert set(result["attention"]) == {
            "llama3_causal", "llama3_packed", "llama3_explicit", "gemma2_causal", "gemma2_packed",
            "llama3_causal_flex", "llama3_packed_flex", "gemma2_causal_flex", "gemma2_packed_flex"}
        for name, (out_diff, grad_diff) in result["attention"].items():
            assert out_diff <= 1e-5 and grad_diff <= 1e-5, (rank, name, out_diff, grad_diff)


@pytest.mark.parametrize("name", [*sorted(LAYOUTS), "dpo_cp2_tp2_packed", "gemma3_cp2_tp2_packed"])
def test_context_parallel_step_matches_single_process_reference(cp_world, name):
    results, reference, logits = cp_world
    model = name.split("_")[0] if name.startswith(("dpo", "gemma3")) else "simpo"
    (loss, grads, grad_norm, params), hf_config = reference[model]
    steps = [result["steps"][name] for result in results]
    for step in steps:
        assert abs(step["metrics"]["loss"] - loss) <= 1e-5, (step["metrics"]["loss"], loss)
        assert abs(step["grad_norm"] - grad_norm) <= 1e-5 * max(1.0, grad_norm)
    assert_mean_logits(steps, logits[model])
    _compare(grads, steps, hf_config, "grads", 1e-5)
    _compare(params, steps, hf_config, "params", 1e-5)


def _refused(argv, capsys, message):
    from megatron_simpo.cli.arguments import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_resume_with_context_parallelism_is_exact_and_loads_at_cp1(tmp_path, capsys):
    """A CP2 run saved at iteration 2 resumes exactly at CP2, and its checkpoint (CP ranks hold
    replicas) loads at CP1 (there DP2) and trains the same steps, within 1e-5. Lengths that do
    not split into 2*CP chunks are refused in one line naming the flags."""
    from megatron_simpo.model.tiny import write_default
    from tests.test_train import _argv, _train

    tiny = write_default(tmp_path / "tiny", train_pairs=64, valid_pairs=8, seed=7)
    cp2 = dict(context_parallel_size=2)
    _refused(_argv(tiny, train_iters=1, seq_length=62, **cp2), capsys,
             "--seq-length (62) must be a multiple of 4: --context-parallel-size 2 cuts every "
             "row into 4 equal chunks")
    _refused(_argv(tiny, train_iters=1, pack_sequences=True, max_tokens_per_microbatch=66,
                   **cp2), capsys, "--max-tokens-per-microbatch (66) must be a multiple of 4")
    _refused(_argv(tiny, train_iters=1, context_parallel_size=0), capsys,
             "--context-parallel-size must be a positive integer, got 0")
    straight, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=4, save=tmp_path / "a",
                                                save_interval=2, **cp2))[0]
    (tmp_path / "a" / "latest_checkpointed_iteration.txt").write_text("2\n")
    resumed, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=4, load=tmp_path / "a",
                                               save=tmp_path / "b", **cp2))[0]
    assert len(straight) == 4 and resumed == straight[2:], (resumed, straight)
    at_cp1, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=4, load=tmp_path / "a",
                                              save=tmp_path / "c"))[0]
    assert len(at_cp1) == 2
    for got, want in zip(at_cp1, straight[2:]):
        assert abs(got - want) <= 1e-5, (at_cp1, straight)


def test_split_is_megatrons_and_lengths_align(monkeypatch):
    """Each CP rank's positions are those Megatron-Core's get_pos_emb_on_this_cp_rank cuts out
    of RoPE's table (its pinned-memory index tensor made plain for the CPU); lengths align to
    2*CP chunks (times TP under sequence parallelism)."""
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    from megatron_simpo.distributed.parallel import ParallelConfig, context_parallel_positions

    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor",
                        lambda *args, pin_memory=False, **kwargs: real_tensor(*args, **kwargs))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)

    class Group:
        def __init__(self, rank, size):
            self.rank, self.size = (lambda: rank), (lambda: size)

    for size in (2, 4):
        table = torch.arange(48).view(48, 1, 1, 1)
        for rank in range(size):
            theirs = get_pos_emb_on_this_cp_rank(table, 0, Group(rank, size)).flatten()
            assert torch.equal(context_parallel_positions(48, rank, size), theirs)
    assert ParallelConfig(context_parallel_size=2).sequence_multiple == 4
    assert ParallelConfig(context_parallel_size=2, tensor_model_parallel_size=2,
                          sequence_parallel=True).sequence_multiple == 8
    with pytest.raises(ValueError, match="does not split into 2 x --context-parallel-size"):
        context_parallel_positions(10, 0, 4)
    with pytest.raises(ValueError, match=r"--pipeline-model-parallel-size \(1\) x "
                       r"--context-parallel-size \(3\) = 6 does not divide the world size \(4\)"):
        ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=3).check_world_size(4)
