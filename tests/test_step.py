"""One SimPO/DPO step on Megatron-Core equals a one-process Hugging Face computation.

The reference is independent of the package: a Hugging Face model on one process, log_softmax +
gather, the paper's formula written out, torch autograd and torch's AdamW. The Megatron side runs
the real schedules, DDP, (distributed) optimizer and gradient finalisation on gloo ranks.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_simpo.data.collate import TokenizedPair, collate_pairs
from tests.multiprocess import run_on_ranks
from tests.tiny import tiny_hf_config, tiny_hf_model

PAIRS, SEQ = 8, 24
BETA, GAMMA = 2.5, 1.375
LR, ADAM_EPS = 1e-2, 1e-3  # a large eps makes Adam's first update proportional to the gradient


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    pairs = [TokenizedPair(ids(1, 6), ids(1, 12), ids(1, 12)) for _ in range(PAIRS)]
    return collate_pairs(pairs, SEQ)


def _sequence_logps(hf_model, batch):
    logits = hf_model(batch.tokens).logits
    token = torch.log_softmax(logits.float(), -1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    return (token * batch.loss_mask).sum(-1), batch.loss_mask.sum(-1)


def trl_mean_logits(hf_config, hf_state, batch) -> dict[str, float]:
    """TRL's logits/chosen and logits/rejected (DPOTrainer's): each scored response token's
    logits averaged over the (true) vocabulary, then over the batch's chosen (rejected) response
    tokens; from the one-process Hugging Face model (soft-capped logits where it caps them)."""
    model = tiny_hf_model(hf_config)
    model.load_state_dict(hf_state)
    with torch.no_grad():
        per_token = model(batch.tokens).logits.float().mean(-1) * batch.loss_mask
    return {f"logits/{side}": (per_token[k::2].sum() / batch.loss_mask[k::2].sum()).item()
            for k, side in ((0, "chosen"), (1, "rejected"))}


def assert_mean_logits(results, expected) -> None:
    for result in results:  # on every rank, pipeline stages included
        for name, value in expected.items():
            assert abs(result["metrics"][name] - value) <= 1e-5, (name, result["metrics"][name],
                                                                  value)


def _reference_step(hf_config, hf_state, batch, algorithm, ref_state=None, clip=1e9,
                    loss_options=None):
    """Loss, gradients (HF names), grad norm and AdamW-updated params, all on one process.

    SimPO and DPO write their formulas out here; the other algorithms' per-pair formulas are
    checked against the papers in test_losses.py, so here they take the package's per-pair
    loss on these independently computed log-probs (what is under test is the parallel step).
    """
    model = tiny_hf_model(hf_config)
    model.load_state_dict(hf_state)
    total, count = _sequence_logps(model, batch)
    ref_total = None
    if ref_state is not None:
        reference = tiny_hf_model(hf_config)
        reference.load_state_dict(ref_state)
        with torch.no_grad():
            ref_total, _ = _sequence_logps(reference, batch)
    if loss_options is not None:
        from megatron_simpo.training.losses import LossConfig, preference_loss

        config = LossConfig(**loss_options)
        refs = (ref_total[0::2], ref_total[1::2]) if config.needs_reference else (None, None)
        pair_losses, _ = preference_loss(total[0::2], count[0::2], total[1::2], count[1::2],
                                         config, *refs)
    elif algorithm == "simpo":
        score = total / count
        pair_losses = -F.logsigmoid(BETA * (score[0::2] - score[1::2]) - GAMMA)
    else:  # DPO with summed log-prob ratios against a frozen reference
        ratio = total - ref_total
        pair_losses = -F.logsigmoid(0.1 * (ratio[0::2] - ratio[1::2]))
    loss = pair_losses.mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.0).step()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return loss.item(), grads, grad_norm, params


def _megatron_step(rank, hf_config, hf_state, batch, tp, pp, num_microbatches, algorithm,
                   use_distributed_optimizer, ref_state, clip, chunk_size, model_overrides=None,
                   overlap_grad_reduce=False, sequence_parallel=False, overlap_param_gather=False,
                   loss_options=None, layout=None):
    """One step on this rank's share of ``batch``: a collated batch split into equal
    micro-batches, or, with ``layout`` (micro-batch size, BatchingConfig fields), a list of
    pairs laid out by megatron_simpo.data.batching as training does."""
    from megatron.core import parallel_state as ps

    from megatron_simpo.distributed import runtime
    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components, release
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings, finish_param_sync
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.training.step import train_step

    config = ModelConfig.from_hf_config(hf_config)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=sequence_parallel)
    runtime.initialize(parallel, seed=0, model_config=config)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    where = dict(tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp)

    def loader(state):
        return lambda model: load_rank_state(
            model, hf_to_megatron(state, config, config.padded_vocab_size(tp)), config, **where)

    settings = OptimizerSettings(lr=LR, adam_eps=ADAM_EPS, clip_grad=clip,
                                 use_distributed_optimizer=use_distributed_optimizer,
                                 overlap_grad_reduce=overlap_grad_reduce,
                                 overlap_param_gather=overlap_param_gather)
    if loss_options is not None:
        loss_config = LossConfig(**loss_options)
    elif algorithm == "dpo":
        loss_config = LossConfig(algorithm="dpo", beta=0.1)
    else:
        loss_config = LossConfig(beta=BETA, gamma=GAMMA)
    with_reference = loss_config.needs_reference
    parts = build_components(config, parallel, settings, transformer_overrides=model_overrides,
                             logprob_chunk_size=chunk_size or 0, load_policy=loader(hf_state),
                             with_reference=with_reference,
                             load_reference=loader(ref_state) if with_reference else None)
    model, optimizer, reference = parts.model, parts.optimizer, parts.reference

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if layout is None:
        rows = 2 * PAIRS // dp_size
        shard = batch.rows(dp_rank * rows, (dp_rank + 1) * rows)
        microbatches = shard.split(num_microbatches)
    else:
        microbatches = _laid_out(batch, layout, dp_size)[dp_rank]
    assert parts.head.chunk_size == (chunk_size or 0)
    result = train_step([model], optimizer, microbatches, loss_config, head=parts.head,
                        reference_model=reference)
    finish_param_sync([model])

    def gather(tensors):
        return gather_global(tensors, config, tp, pp_rank, pp)

    named = list(model.module.named_parameters())
    grads = None if use_distributed_optimizer else gather((n, p.main_grad) for n, p in named)
    params = gather((n, p.detach()) for n, p in named)
    release(parts)  # this rank is reused by the next test
    return dict(metrics=result.metrics, grad_norm=result.grad_norm, grads=grads, params=params,
                config=config)


def _laid_out(pairs, layout, dp_size):
    """Every rank's micro-batches of ``pairs`` under ``layout`` (micro-batch size, batching)."""
    from megatron_simpo.data.batching import BatchingConfig, PairLengths, plan_global_batch
    from megatron_simpo.data.collate import collate_microbatch

    micro_batch_size, batching = layout
    plan = plan_global_batch(list(range(len(pairs))), [PairLengths.of(p) for p in pairs],
                             dp_size=dp_size, micro_batch_size=micro_batch_size,
                             config=BatchingConfig(**batching), seq_length=SEQ)
    return [[collate_microbatch(pairs, mb) for mb in rank] for rank in plan.ranks]


def _compare(expected, results, hf_config, what, atol):
    from megatron_simpo.convert.llama import hf_to_megatron

    config = results[0]["config"]
    for result in results:
        if result[what] is None:
            continue
        for name, value in result[what].items():
            padded = value.shape[0] if "word_embeddings" in name or "output_layer" in name else None
            reference = hf_to_megatron(expected, config, padded or config.padded_vocab_size(1))
            if name == "output_layer.weight" and config.tie_word_embeddings:
                name = "embedding.word_embeddings.weight"
            diff = (value - reference[name]).abs().max().item()
            assert diff <= atol, f"{what} of {name}: max diff {diff}"


# name: (world, tp, pp, micro-batches, distributed optimizer, architecture, log-prob chunk size)
# A chunk size selects the memory-lean log-probs (7 tokens: several chunks per micro-batch);
# None the plain path through full logits.
CASES = {
    "tp1": (1, 1, 1, 1, False, "llama3", 7),
    "tp1_plain_logits": (1, 1, 1, 1, False, "llama3", None),
    "tp2": (2, 2, 1, 1, False, "llama3", 7),
    "tp2_plain_logits": (2, 2, 1, 1, False, "llama3", None),
    "pp2": (2, 1, 2, 1, False, "llama3", 7),
    "tp2_pp2": (4, 2, 2, 1, False, "llama3", 7),
    "dp2": (2, 1, 1, 1, False, "llama3", 7),
    "microbatches2": (1, 1, 1, 2, False, "llama3", 7),
    "pp2_microbatches4_plain_logits": (2, 1, 2, 4, False, "llama3", None),
    "tied_pp2_dp2": (4, 1, 2, 2, False, "llama3.2", 7),
    "tied_tp2": (2, 2, 1, 1, False, "llama3.2", 7),
    "qwen2_tp2_dp2_distopt_clip": (4, 2, 1, 2, True, "qwen2", 7),
    # per-head q/k norms: replicated over TP, their gradients summed over the TP ranks' heads
    "qwen3_tp2": (2, 2, 1, 1, False, "qwen3", 7),
    "qwen3_pp2_plain_logits": (2, 1, 2, 1, False, "qwen3", None),
    # soft-capped attention and logits (memory-lean and full), windows, post-norms, GeGLU
    "gemma2_tp2": (2, 2, 1, 1, False, "gemma2", 7),
    "gemma2_pp2_plain_logits": (2, 1, 2, 1, False, "gemma2", None),
    # q/k norms and the two RoPE tables, each layer taking its own (any PP split)
    "gemma3_tp2": (2, 2, 1, 1, False, "gemma3", 7),
    "gemma3_pp2_plain_logits": (2, 1, 2, 1, False, "gemma3", None),
}
# Activation recomputation changes memory, never the result.
RECOMPUTE = {
    "tp2_full_recompute_uniform": dict(recompute_granularity="full", recompute_method="uniform",
                                       recompute_num_layers=1),
    "pp2_full_recompute_block": dict(recompute_granularity="full", recompute_method="block",
                                     recompute_num_layers=1),
    "tp2_selective_recompute": dict(recompute_granularity="selective"),
}
# Overlapping the gradient reduction with backward changes timing, never the result.
OVERLAP = {"dp2_overlap_grad_reduce", "pp2_dp2_distopt_overlap_grad_reduce"}
CASES["dp2_overlap_grad_reduce"] = (2, 1, 1, 2, False, "llama3", 7)
CASES["pp2_dp2_distopt_overlap_grad_reduce"] = (4, 1, 2, 2, True, "llama3", 7)
# ... and gathering the updated parameter shards during the next forward neither.
OVERLAP_PARAM_GATHER = {"dp2_distopt_overlap_param_gather", "tp2_dp2_distopt_overlap_param_gather",
                        "pp2_dp2_distopt_overlap_param_gather"}
OVERLAP |= OVERLAP_PARAM_GATHER
CASES["dp2_distopt_overlap_param_gather"] = (2, 1, 1, 2, True, "llama3", 7)
CASES["tp2_dp2_distopt_overlap_param_gather"] = (4, 2, 1, 1, True, "llama3", 7)
CASES["pp2_dp2_distopt_overlap_param_gather"] = (4, 1, 2, 2, True, "llama3.2", 7)
CASES.update({name: (2, 1 if name.startswith("pp2") else 2, 2 if name.startswith("pp2") else 1,
                     2, False, "llama3", 7) for name in RECOMPUTE})
# Sequence parallelism moves activations between ranks differently, never changes the result
# (the norms' gradients are summed over TP ranks by the gradient finalisation).
SEQUENCE_PARALLEL = {
    "tp2_sequence_parallel": (2, 2, 1, 2, False, "llama3", 7),
    "tp2_sequence_parallel_plain_logits": (2, 2, 1, 1, False, "llama3", None),
    "tied_tp2_pp2_sequence_parallel": (4, 2, 2, 2, False, "llama3.2", 7),
    # Gemma-2's post-norms run on each rank's sequence slice after the reduce-scatter
    "gemma2_tp2_sequence_parallel": (2, 2, 1, 1, False, "gemma2", 7),
}
CASES.update(SEQUENCE_PARALLEL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_simpo_step_matches_single_process_reference(case):
    world, tp, pp, micro, distributed_optimizer, arch, chunk_size = CASES[case]
    hf_config = tiny_hf_config(arch)
    hf_state = tiny_hf_model(hf_config, seed=3).state_dict()
    batch = _batch(hf_config["vocab_size"])
    clip = 0.05 if distributed_optimizer else 1e9
    loss, grads, grad_norm, params = _reference_step(hf_config, hf_state, batch, "simpo", clip=clip)
    results = run_on_ranks(world, _megatron_step, hf_config, hf_state, batch, tp, pp, micro,
                           "simpo", distributed_optimizer, None, clip, chunk_size,
                           RECOMPUTE.get(case), case in OVERLAP, case in SEQUENCE_PARALLEL,
                           case in OVERLAP_PARAM_GATHER)
    for result in results:  # metrics are shared by every rank, pipeline stages included
        assert abs(result["metrics"]["loss"] - loss) <= 1e-5
        assert abs(result["grad_norm"] - grad_norm) <= 1e-5 * max(1.0, grad_norm)
    assert grad_norm > clip or not distributed_optimizer  # the clipping case really clips
    assert_mean_logits(results, trl_mean_logits(hf_config, hf_state, batch))
    _compare(grads, results, hf_config, "grads", atol=1e-5)
    _compare(params, results, hf_config, "params", atol=1e-5)


@pytest.mark.parametrize("world, tp, pp, chunk_size, sequence_parallel",
                         [(1, 1, 1, None, False), (4, 2, 2, 7, False), (2, 2, 1, 7, True)])
def test_dpo_step_with_reference_model_matches(world, tp, pp, chunk_size, sequence_parallel):
    hf_config = tiny_hf_config("llama3")
    hf_state = tiny_hf_model(hf_config, seed=3).state_dict()
    ref_state = tiny_hf_model(hf_config, seed=4).state_dict()
    batch = _batch(hf_config["vocab_size"])
    loss, grads, _, _ = _reference_step(hf_config, hf_state, batch, "dpo", ref_state)
    results = run_on_ranks(world, _megatron_step, hf_config, hf_state, batch, tp, pp, 2, "dpo",
                           False, ref_state, 1e9, chunk_size, None, False, sequence_parallel)
    for result in results:
        assert abs(result["metrics"]["loss"] - loss) <= 1e-5
    _compare(grads, results, hf_config, "grads", atol=1e-5)


# The baselines through the same parallel step, each on a 4-rank layout combining two of TP2,
# PP2 and DP2 (every pair of dimensions is covered twice), with micro-batches where DP allows.
# name: (loss options, world, tp, pp, micro-batches)
BASELINES = {
    "ipo_tp2_pp2": (dict(algorithm="ipo", beta=0.5), 4, 2, 2, 2),
    "cpo_pp2_dp2": (dict(algorithm="cpo", beta=0.5), 4, 1, 2, 2),
    "orpo_tp2_dp2": (dict(algorithm="orpo", orpo_lambda=0.5), 4, 2, 1, 2),
    "rdpo_pp2_dp2": (dict(algorithm="rdpo", rdpo_alpha=0.1), 4, 1, 2, 2),
    "rrhf_tp2_pp2": (dict(algorithm="rrhf"), 4, 2, 2, 2),
    "slic_tp2_dp2": (dict(algorithm="slic", slic_delta=5.0), 4, 2, 1, 2),
}


@pytest.mark.parametrize("case", sorted(BASELINES))
def test_baseline_step_matches_single_process_reference(case):
    options, world, tp, pp, micro = BASELINES[case]
    hf_config = tiny_hf_config("llama3")
    hf_state = tiny_hf_model(hf_config, seed=3).state_dict()
    ref_state = tiny_hf_model(hf_config, seed=4).state_dict()
    batch = _batch(hf_config["vocab_size"])
    loss, grads, grad_norm, _ = _reference_step(hf_config, hf_state, batch, None, ref_state,
                                                loss_options=options)
    results = run_on_ranks(world, _megatron_step, hf_config, hf_state, batch, tp, pp, micro,
                           None, False, ref_state, 1e9, 7, None, False, False, False, options)
    for result in results:
        assert abs(result["metrics"]["loss"] - loss) <= 1e-5
        assert abs(result["grad_norm"] - grad_norm) <= 1e-5 * max(1.0, grad_norm)
    if options["algorithm"] in ("rrhf", "slic"):  # the hinge is active on some pairs
        assert results[0]["metrics"]["loss"] > results[0]["metrics"]["nll_loss"] + 1e-3
    _compare(grads, results, hf_config, "grads", atol=1e-5)


# Micro-batch layouts (megatron_simpo.data.batching) on pairs of very different lengths: each
# micro-batch padded to its own longest row (sorted, balanced over ranks), a token budget
# (pairs per micro-batch and micro-batches per rank vary) and packing (several sequences in
# one row, block-diagonal mask, restarting positions) give the loss, gradients and update of
# the whole batch padded to its longest pair, computed by Hugging Face on one process.
# name: (world, tp, pp, micro-batch size, batching, distributed optimizer, chunk, algorithm
#        [, architecture: llama3 when not given])
LAYOUT_PAIRS = 12
SORTED = dict(batch_layout="sorted")
BUDGET = dict(max_tokens_per_microbatch=64)
PACKED = dict(max_tokens_per_microbatch=48, pack_sequences=True)
LAYOUTS = {
    "sorted_dp2": (2, 1, 1, 2, SORTED, False, 7, "simpo"),
    "sorted_pp2": (2, 1, 2, 2, SORTED, False, 7, "simpo"),
    "in_order_tp2": (2, 2, 1, 3, dict(batch_layout="in-order"), False, 7, "simpo"),
    "budget_dp2": (2, 1, 1, None, BUDGET, False, 7, "simpo"),
    "budget_pp2_plain_logits": (2, 1, 2, None, BUDGET, False, None, "simpo"),
    "budget_tp2_sequence_parallel": (2, 2, 1, None, BUDGET, False, 7, "simpo"),
    "packed_dp2_distopt": (2, 1, 1, None, PACKED, True, 7, "simpo"),
    "packed_pp2": (2, 1, 2, None, PACKED, False, 7, "simpo"),
    "packed_tp2_sequence_parallel_plain_logits": (2, 2, 1, None, PACKED, False, None, "simpo"),
    "packed_pp2_dpo": (2, 1, 2, None, PACKED, False, 7, "dpo"),
    "qwen3_packed_tp2": (2, 2, 1, None, PACKED, False, 7, "simpo", "qwen3"),
    "qwen3_packed_pp2": (2, 1, 2, None, PACKED, False, None, "simpo", "qwen3"),
    # the block-diagonal mask combined with sliding windows and soft-capping
    "gemma2_packed_tp2": (2, 2, 1, None, PACKED, False, 7, "simpo", "gemma2"),
    "gemma2_packed_pp2_plain_logits": (2, 1, 2, None, PACKED, False, None, "simpo", "gemma2"),
    # ... and both RoPE tables at the packed sequences' restarting positions
    "gemma3_packed_tp2": (2, 2, 1, None, PACKED, False, 7, "simpo", "gemma3"),
    "gemma3_packed_pp2_plain_logits": (2, 1, 2, None, PACKED, False, None, "simpo", "gemma3"),
    "gemma3_packed_tp2_dpo": (2, 2, 1, None, PACKED, False, 7, "dpo", "gemma3"),  # + reference
}


def _varied_pairs(vocab: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(1, 9), ids(1, 17), ids(1, 17)) for _ in range(LAYOUT_PAIRS)]


def test_layouts_under_test_really_vary():
    """The cases above exercise what they claim: short micro-batches, varying counts, packing."""
    pairs = _varied_pairs(tiny_hf_config("llama3")["vocab_size"])
    sorted_ranks = _laid_out(pairs, (2, SORTED), 2)
    assert len({mb.seq_length for rank in sorted_ranks for mb in rank}) > 1
    budget = _laid_out(pairs, (None, BUDGET), 2)
    assert len({len(rank) for rank in budget}) > 1 or len({mb.num_pairs for r in budget for mb in r}) > 1
    assert all(mb.tokens.numel() <= 64 or mb.num_pairs == 1 for rank in budget for mb in rank)
    packed = _laid_out(pairs, (None, PACKED), 2)
    assert max(mb.num_pairs for rank in packed for mb in rank) > 1
    assert all(mb.tokens.shape[0] == 1 for rank in packed for mb in rank)


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_microbatch_layouts_match_single_process_reference(case):
    world, tp, pp, micro, batching, distopt, chunk_size, algorithm, *arch = LAYOUTS[case]
    hf_config = tiny_hf_config(*arch or ["llama3"])
    hf_state = tiny_hf_model(hf_config, seed=3).state_dict()
    ref_state = tiny_hf_model(hf_config, seed=4).state_dict() if algorithm == "dpo" else None
    pairs = _varied_pairs(hf_config["vocab_size"])
    clip = 0.05 if distopt else 1e9
    loss, grads, grad_norm, params = _reference_step(hf_config, hf_state, collate_pairs(pairs, SEQ),
                                                     algorithm, ref_state, clip=clip)
    results = run_on_ranks(world, _megatron_step, hf_config, hf_state, pairs, tp, pp, None,
                           algorithm, distopt, ref_state, clip, chunk_size, None, False,
                           "sequence_parallel" in case, False, None, (micro, batching))
    for result in results:
        assert abs(result["metrics"]["loss"] - loss) <= 1e-5
        assert abs(result["grad_norm"] - grad_norm) <= 1e-5 * max(1.0, grad_norm)
    assert_mean_logits(results, trl_mean_logits(hf_config, hf_state, collate_pairs(pairs, SEQ)))
    _compare(grads, results, hf_config, "grads", atol=1e-5)
    _compare(params, results, hf_config, "params", atol=1e-5)


def gather_global(tensors, config, tp: int, pp_rank: int, pp: int) -> dict:
    """(local name, TP shard) pairs -> unsplit (TP-merged) tensors under global names."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_simpo.convert.llama import merge_tensors, to_global_name

    out = {}
    for name, tensor in tensors:
        shards = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(shards, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
        out[to_global_name(name, config, pp_rank, pp)] = merge_tensors(name, shards)
    return out


# ---- several steps: the schedule, weight decay and clipping of a ported TRL recipe ------------
# 5 steps with a warm-up of 0.3 (Hugging Face: ceil(1.5) = 2 steps), weight decay and a clip
# that bites every step, on 2 micro-batches per data-parallel rank with the distributed
# optimizer; Qwen3 for its per-head q/k norms (no decay) and tied embeddings (decayed once).
STEPS, WARMUP_FRACTION, WEIGHT_DECAY, STEPS_CLIP = 5, 0.3, 0.1, 0.3


def _step_batches(vocab: int) -> list:
    return [_batch(vocab, seed=10 + step) for step in range(STEPS)]


def _hugging_face_steps(hf_config, hf_state, batches):
    """What Hugging Face's Trainer does with the same settings, on one process: the mean SimPO
    loss, ``clip_grad_norm_``, torch's AdamW with weight decay on every weight but biases and
    norms, ``get_cosine_schedule_with_warmup`` over ``ceil(steps x warmup ratio)`` warm-up steps
    (``TrainingArguments.get_warmup_steps``), stepped after the optimizer. Returns per step
    (learning rate, loss, grad norm), and the final parameters."""
    import math

    from transformers import get_cosine_schedule_with_warmup

    model = tiny_hf_model(hf_config)
    model.load_state_dict(hf_state)
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if "norm" in n or n.endswith("bias")]
    assert any("q_norm" in n for n, _ in named) and no_decay
    optimizer = torch.optim.AdamW(
        [dict(params=[p for n, p in named if not any(p is q for q in no_decay)],
              weight_decay=WEIGHT_DECAY), dict(params=no_decay, weight_decay=0.0)],
        lr=LR, eps=ADAM_EPS)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(STEPS * WARMUP_FRACTION),
                                               STEPS)
    trace = []
    for batch in batches:
        total, count = _sequence_logps(model, batch)
        score = total / count
        loss = -F.logsigmoid(BETA * (score[0::2] - score[1::2]) - GAMMA).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), STEPS_CLIP).item()
        trace.append((optimizer.param_groups[0]["lr"], loss.item(), norm))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return trace, {name: p.detach().clone() for name, p in model.named_parameters()}


def _megatron_steps(rank, hf_config, hf_state, batches):
    """The same steps through build_components (schedule included) and train_step, as the
    training loop takes them: the rate read before the step, the schedule stepped after it."""
    from megatron.core import parallel_state as ps

    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components, release
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings, finish_param_sync
    from megatron_simpo.training.step import train_step

    config = ModelConfig.from_hf_config(hf_config)
    runtime.initialize(ParallelConfig(), seed=0, model_config=config)
    full = hf_to_megatron(hf_state, config, config.padded_vocab_size(1))
    settings = OptimizerSettings(lr=LR, adam_eps=ADAM_EPS, clip_grad=STEPS_CLIP,
                                 weight_decay=WEIGHT_DECAY, lr_warmup_fraction=WARMUP_FRACTION,
                                 use_distributed_optimizer=True)
    parts = build_components(
        config, ParallelConfig(), settings, logprob_chunk_size=7, total_iters=STEPS,
        load_policy=lambda model: load_rank_state(model, full, config, tp_rank=0, tp_size=1,
                                                  pp_rank=0, pp_size=1))
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rows = 2 * PAIRS // dp_size
    trace = []
    for batch in batches:
        learning_rate = parts.optimizer.param_groups[0]["lr"]
        result = train_step([parts.model], parts.optimizer,
                            batch.rows(dp_rank * rows, (dp_rank + 1) * rows).split(2),
                            LossConfig(beta=BETA, gamma=GAMMA), head=parts.head)
        parts.scheduler.step(increment=1)
        trace.append((learning_rate, result.metrics["loss"], result.grad_norm))
    finish_param_sync([parts.model])
    params = gather_global(((n, p.detach()) for n, p in parts.model.module.named_parameters()),
                           config, 1, 0, 1)
    release(parts)
    return dict(trace=trace, params=params, config=config)


def test_steps_follow_the_hugging_face_schedule_weight_decay_and_clipping():
    """Five steps on DP 2: every step's learning rate, loss and grad norm, and the final
    weights, are Hugging Face's (1e-5): the warm-up rounded up as its Trainer rounds
    ``warmup_ratio``, the first step at rate 0, no decay on norms (q/k norms included)."""
    hf_config = tiny_hf_config("qwen3")
    hf_state = tiny_hf_model(hf_config, seed=3).state_dict()
    batches = _step_batches(hf_config["vocab_size"])
    expected, params = _hugging_face_steps(hf_config, hf_state, batches)
    assert [lr for lr, _, _ in expected[:3]] == [0.0, LR / 2, LR]  # 2 warm-up steps
    assert all(norm > STEPS_CLIP for _, _, norm in expected)  # the clip bites every step
    results = run_on_ranks(2, _megatron_steps, hf_config, hf_state, batches)
    for result in results:
        for step, ((lr, loss, norm), (got_lr, got_loss, got_norm)) in enumerate(
                zip(expected, result["trace"])):
            assert got_lr == pytest.approx(lr, rel=1e-12, abs=0), (step, got_lr, lr)
            assert abs(got_loss - loss) <= 1e-5, (step, got_loss, loss)
            assert abs(got_norm - norm) <= 1e-5 * norm, (step, got_norm, norm)
    _compare(params, results, hf_config, "params", atol=1e-5)
