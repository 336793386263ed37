"""Shared-prompt rows (--share-prompt) equal the unshared layout.

In one process: the rows' tokens, positions, mask and scored labels, fed to a Hugging Face model
(its own attention with a 4-D mask), give each sequence's log-prob sum of the unshared rows. On
two ranks (one TP2 world with sequence parallelism, one PP2 world, each running every case): Megatron's step on shared
rows gives the unshared step's loss, per-sequence log-probs and gradients, for SimPO and DPO
(reference model, and precomputed reference log-probs), unpacked and packed, memory-lean and
full logits.
"""

import pytest
import torch

from megatron_simpo.data.batching import BatchingConfig, PairLengths, plan_global_batch
from megatron_simpo.data.collate import TokenizedPair, collate_pairs, collate_shared
from tests.multiprocess import run_on_ranks
from tests.tiny import tiny_hf_config, tiny_hf_model

SEQ = 32


def _pairs(vocab: int, n: int = 6, seed: int = 7):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        count = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(0, vocab, (count,), generator=g).tolist()

    # single-token responses and prompts included: the edges of the scoring rule
    pairs = [TokenizedPair(ids(1, 10), ids(1, 12), ids(1, 12)) for _ in range(n - 1)]
    return pairs + [TokenizedPair(ids(1, 2), [3], [5])]


def _hf_sums(model, tokens, labels, mask, position_ids=None):
    """Per-token log p(label) [b, s] of a HF model; ``mask`` [b, 1, s, s] True: may NOT attend."""
    bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(mask, torch.finfo(torch.float32).min)
    logits = model(tokens, attention_mask=bias, position_ids=position_ids).logits
    return torch.log_softmax(logits.float(), -1)


def test_shared_rows_give_the_unshared_log_probs_in_a_hf_model():
    config = tiny_hf_config("llama3", attn_implementation="eager")
    model = tiny_hf_model(config, seed=1)
    pairs = _pairs(config["vocab_size"])
    plain = collate_pairs(pairs, SEQ)
    causal = ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril().expand(len(plain.tokens), 1, SEQ, SEQ)
    with torch.no_grad():
        logps = _hf_sums(model, plain.tokens, plain.labels, causal)
        token = logps.gather(-1, plain.labels.unsqueeze(-1)).squeeze(-1)
        expected = (token * plain.loss_mask).sum(-1)
        for packed, length in ((False, 2 * SEQ), (True, 160)):
            shared = collate_shared(pairs, length, packed=packed)
            rows, at, labels, sequences = shared.scored
            out = _hf_sums(model, shared.tokens, shared.labels, shared.attention_mask,
                           shared.position_ids)
            got = torch.zeros(2 * len(pairs)).index_add(0, sequences, out[rows, at, labels])
            counts = torch.zeros(2 * len(pairs)).index_add(0, sequences, torch.ones(len(rows)))
            assert torch.allclose(got, expected, atol=1e-5, rtol=0), (packed, got - expected)
            assert torch.equal(counts, plain.loss_mask.sum(-1))
            assert shared.loss_mask.sum() == plain.loss_mask.sum()


def test_a_short_pair_beside_a_long_shared_row_keeps_its_positions_below_seq_length():
    """A micro-batch's shared rows are as long as its longest (up to 2 x --seq-length): the
    short pair's padding tail was numbered on past --seq-length (and past the model's largest
    position: Megatron's RoPE table raised IndexError). The tail is at position 0 now; the
    log-probs stay the unshared ones."""
    config = tiny_hf_config("llama3", attn_implementation="eager")
    model = tiny_hf_model(config, seed=1)
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, config["vocab_size"], (n,), generator=g).tolist()

    seq_length = 48
    pairs = [TokenizedPair(ids(20), ids(24), ids(24)), TokenizedPair(ids(2), ids(1), ids(2))]
    plain = collate_pairs(pairs, seq_length)
    shared = collate_shared(pairs, 72)  # the long pair's shared row: 20 + 24 + 24 - 1 = 67
    assert int(shared.position_ids.max()) < seq_length
    causal = ~torch.ones(seq_length, seq_length, dtype=torch.bool).tril().expand(
        len(plain.tokens), 1, seq_length, seq_length)
    with torch.no_grad():
        token = _hf_sums(model, plain.tokens, plain.labels, causal).gather(
            -1, plain.labels.unsqueeze(-1)).squeeze(-1)
        expected = (token * plain.loss_mask).sum(-1)
        rows, at, labels, sequences = shared.scored
        out = _hf_sums(model, shared.tokens, shared.labels, shared.attention_mask,
                       shared.position_ids)
    got = torch.zeros(4).index_add(0, sequences, out[rows, at, labels])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-6), got - expected


def test_shared_mask_keeps_the_responses_apart():
    batch = collate_shared([TokenizedPair([1, 2, 3], [4, 5, 6], [7, 8])], 8)
    visible = ~batch.attention_mask[0, 0]
    # row: p0 p1 p2 c0 c1 r0 pad pad; positions 0 1 2 3 4 3 0 0 (the tail at 0)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 0, 0]
    assert visible[5].tolist() == [True, True, True, False, False, True, False, False]
    assert visible[4].tolist() == [True, True, True, True, True, False, False, False]
    assert visible[7].tolist() == [False] * 6 + [True, True]
    # r0 is predicted at the prompt's last position, as c0 is
    rows, at, labels, sequences = batch.scored
    assert at[sequences == 1].tolist() == [2, 5] and labels[sequences == 1].tolist() == [7, 8]
    assert at[sequences == 0].tolist() == [2, 3, 4] and labels[sequences == 0].tolist() == [4, 5, 6]


def test_planner_counts_shared_rows_and_saved_prompt_tokens():
    pairs = _pairs(100, n=8)
    lengths = [PairLengths.of(p) for p in pairs]
    prompts = sum(len(p.prompt) for p in pairs)
    for batching in (dict(), dict(max_tokens_per_microbatch=64),
                     dict(max_tokens_per_microbatch=64, pack_sequences=True)):
        plain = plan_global_batch(list(range(8)), lengths, dp_size=2, micro_batch_size=2,
                                  config=BatchingConfig(**batching), seq_length=SEQ)
        shared = plan_global_batch(list(range(8)), lengths, dp_size=2, micro_batch_size=2,
                                   config=BatchingConfig(share_prompt=True, **batching),
                                   seq_length=SEQ)
        assert shared.saved_tokens == prompts and plain.saved_tokens == 0
        assert shared.real_tokens == plain.real_tokens
        mbs = [mb for rank in shared.ranks for mb in rank]
        assert all(mb.shared and mb.rows == (1 if mb.packed else len(mb.pairs)) for mb in mbs)
        for mb in mbs:
            need = [lengths[i].shared for i in mb.pairs]
            assert (sum(need) if mb.packed else max(need)) <= mb.length
        real = sum(lengths[i].shared for mb in mbs for i in mb.pairs)
        assert shared.padding_efficiency == pytest.approx(real / shared.processed_tokens)
        assert shared.processed_tokens < plain.processed_tokens


def test_step_record_reports_the_saved_prompt_tokens():
    from megatron_simpo.training.metrics import LogWindow, StepRecord
    from megatron_simpo.training.step import StepResult

    window = LogWindow()
    window.add(StepRecord(StepResult({"loss": 1.0}, 1.0, True), (0, 1), 1e-3, 100, 0.9, 37),
               1.0, 0)
    assert window.close(2, 1)["prompt_tokens_saved"] == 37


def test_share_prompt_is_refused_where_the_mask_cannot_go():
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.builder import check_shared_prompt_attention

    with pytest.raises(ValueError, match="--share-prompt.*transformer_engine"):
        check_shared_prompt_attention("transformer_engine", None)
    gemma = ModelConfig.from_hf_config(tiny_hf_config("gemma2"))
    with pytest.raises(ValueError, match="--share-prompt.*sliding"):
        check_shared_prompt_attention("local", gemma)
    check_shared_prompt_attention("local", ModelConfig.from_hf_config(tiny_hf_config("llama3")))


def test_share_prompt_flag_parses_and_refuses_transformer_engine(tmp_path, capsys):
    from megatron_simpo.cli.arguments import parse_args

    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "config.json").write_text("{}")
    base = ["--train-data-path", str(tmp_path / "train.jsonl"), "--model-config",
            str(tmp_path / "config.json"), "--tokenizer", str(tmp_path), "--train-iters", "5",
            "--share-prompt"]
    assert parse_args(base).batching.share_prompt
    with pytest.raises(SystemExit) as exit_:
        parse_args(base + ["--transformer-impl", "transformer_engine"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--share-prompt needs --transformer-impl local" in err[0]


# name: (algorithm, log-prob chunk size (None: full logits), BatchingConfig fields)
CASES = {
    "simpo_lean": ("simpo", 5, dict(batch_layout="sorted")),
    "simpo_packed_logits": ("simpo", None, dict(max_tokens_per_microbatch=96,
                                                pack_sequences=True)),
    "dpo_reference_model_logits": ("dpo", None, dict(max_tokens_per_microbatch=96)),
    "dpo_precomputed_packed_lean": ("dpo-precomputed", 5,
                                    dict(max_tokens_per_microbatch=96, pack_sequences=True)),
}


def _both_layouts(rank, hf_config, hf_state, ref_state, pairs, tp, pp):
    """Every case twice on this rank, unshared then shared: metrics, the policy's per-sequence
    log-prob sums (last stage) and the TP-gathered gradients, per case and layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_simpo.convert.llama import (hf_to_megatron, load_rank_state, merge_tensors,
                                              to_global_name)
    from megatron_simpo.data.collate import collate_microbatch
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components, release
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings
    from megatron_simpo.training.step import sequence_logp_sums, train_step

    config = ModelConfig.from_hf_config(hf_config)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=tp > 1)
    runtime.initialize(parallel, seed=0, model_config=config)
    where = dict(tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp,
                 pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=pp)

    def loader(state):
        return lambda model: load_rank_state(
            model, hf_to_megatron(state, config, config.padded_vocab_size(tp)), config, **where)

    reference_sums = torch.linspace(-30.0, -10.0, 2 * len(pairs))  # "--reference-logps"
    results = {}
    for case, (algorithm, chunk, batching) in CASES.items():
        for share in (False, True):
            loss = LossConfig(algorithm="dpo", beta=0.1) if algorithm.startswith("dpo") \
                else LossConfig(beta=2.5, gamma=1.375)
            with_model = algorithm == "dpo"
            parts = build_components(config, parallel, OptimizerSettings(lr=1e-2),
                                     logprob_chunk_size=chunk or 0, load_policy=loader(hf_state),
                                     with_reference=with_model,
                                     load_reference=loader(ref_state) if with_model else None)
            plan = plan_global_batch(list(range(len(pairs))), [PairLengths.of(p) for p in pairs],
                                     dp_size=1, micro_batch_size=2, seq_length=SEQ,
                                     config=BatchingConfig(share_prompt=share, **batching))
            batches = [collate_microbatch(pairs, mb) for mb in plan.ranks[0]]
            assert all(b.shared == share for b in batches)
            if algorithm == "dpo-precomputed":
                batches = [b.with_reference(reference_sums.view(-1, 2)[list(mb.pairs)].reshape(-1))
                           for b, mb in zip(batches, plan.ranks[0])]
            sums = sequence_logp_sums(parts.model, batches, parts.head)
            order = [i for mb in plan.ranks[0] for i in mb.pairs]
            by_pair = (torch.cat(sums).view(-1, 2)[torch.tensor(order).argsort()]
                       if sums else None)
            step = train_step([parts.model], parts.optimizer, batches, loss, head=parts.head,
                              reference_model=parts.reference)
            grads = {}
            for name, p in parts.model.module.named_parameters():
                shards = [torch.empty_like(p.main_grad) for _ in range(tp)]
                dist.all_gather(shards, p.main_grad.contiguous(),
                                group=ps.get_tensor_model_parallel_group())
                grads[to_global_name(name, config, where["pp_rank"], pp)] = \
                    merge_tensors(name, shards)
            release(parts)
            results[case, share] = dict(metrics=step.metrics, sums=by_pair, grads=grads)
    return results


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2_sequence_parallel", "pp2"])
def test_shared_rows_step_equals_the_unshared_step(tp, pp):
    hf_config = tiny_hf_config("llama3")
    hf_state = tiny_hf_model(hf_config, seed=3).state_dict()
    ref_state = tiny_hf_model(hf_config, seed=4).state_dict()
    pairs = _pairs(hf_config["vocab_size"])
    results = run_on_ranks(2, _both_layouts, hf_config, hf_state, ref_state, pairs, tp, pp)
    for result in results:
        for case in CASES:
            plain, shared = result[case, False], result[case, True]
            for name, value in plain["metrics"].items():
                assert abs(shared["metrics"][name] - value) <= 1e-5, (case, name)
            if plain["sums"] is not None:
                assert torch.allclose(shared["sums"], plain["sums"], atol=1e-5, rtol=0), case
            for name, grad in plain["grads"].items():
                diff = (shared["grads"][name] - grad).abs().max().item()
                assert diff <= 1e-5, (case, name, diff)
            assert max(g.abs().max().item() for g in plain["grads"].values()) > 1e-4
    assert sum(r[case, False]["sums"] is not None for r in results for case in CASES) > 0


def _train_losses(rank, argv):
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.loop import run

    return run(parse_args(argv)).losses


def test_share_prompt_trains_a_model_whose_window_no_row_outgrows(tmp_path):
    """Mistral v0.1's window (every layer slides) at a --seq-length within it masks nothing:
    the model is built without it (ModelConfig.for_rows), --share-prompt is taken, its FLOPs
    are counted, and the losses are those of the same weights without a window."""
    import json
    from pathlib import Path

    from megatron_simpo.model.tiny import write_default

    tiny = write_default(tmp_path / "tiny", train_pairs=64, valid_pairs=8, seed=7)
    losses = []
    for window in (64, None):
        config = json.loads(Path(tiny["config"]).read_text())
        config.update(architectures=["MistralForCausalLM"], model_type="mistral",
                      sliding_window=window)
        path = tmp_path / f"config-{window}.json"
        path.write_text(json.dumps(config))
        argv = ["--model-config", str(path), "--tokenizer", str(tiny["tokenizer"]),
                "--train-data-path", str(tiny["train"]), "--seq-length", "64",
                "--max-prompt-length", "48", "--max-tokens-per-microbatch", "160",
                "--pack-sequences", "--share-prompt", "--global-batch-size", "8", "--lr", "1e-3",
                "--train-iters", "2", "--log-interval", "1", "--seed", "3",
                "--data-cache-dir", str(tmp_path / "cache")]
        losses.append(run_on_ranks(1, _train_losses, argv)[0])
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def _transformer_engine_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.parametrize("arch, flags, message", [
    ("mistral0.1", ["--share-prompt"], "--share-prompt: the model's sliding-window layers"),
    pytest.param("llama3", ["--transformer-impl", "transformer_engine"],
                 "--transformer-impl transformer_engine needs Transformer Engine",
                 marks=pytest.mark.skipif(_transformer_engine_installed(),
                                          reason="Transformer Engine is installed")),
], ids=["share_prompt_sliding_window", "missing_transformer_engine"])
def test_reference_logps_command_refuses_what_training_refuses(tmp_path, capsys, monkeypatch,
                                                               arch, flags, message):
    """megatron-simpo-reference-logps takes the training command line and must refuse what
    training refuses: it took --share-prompt on a model whose sliding-window layers the rows
    outgrow and wrote reference log-probs of shifted windows (0.83 off on a tiny Mistral v0.1,
    window 12, --seq-length 64), which a run without --share-prompt then used silently; a
    missing Transformer Engine ended in a traceback. One line, exit code 2, before any process
    group or model exists."""
    from megatron_simpo.cli.reference_logps import main
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training import run_setup

    model = ModelConfig.from_hf_config(tiny_hf_config(arch))  # mistral0.1: every layer slides
    monkeypatch.setattr(run_setup, "resolve_model_source", lambda config: run_setup.ModelSource(
        model, None, tmp_path, tmp_path))
    (tmp_path / "train.jsonl").write_text("")
    argv = ["--pretrained-checkpoint", str(tmp_path), "--tokenizer", str(tmp_path),
            "--train-data-path", str(tmp_path / "train.jsonl"), "--train-iters", "1",
            "--algorithm", "dpo", "--seq-length", "64", "--max-prompt-length", "48",
            "--output", str(tmp_path / "reference.pt"), *flags]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "reference.pt").exists()
