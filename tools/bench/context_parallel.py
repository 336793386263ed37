"""Context parallelism: peak memory per rank of one SimPO step, CP1 (one rank) vs CP2 (two).

One pair per step, both rows of ``tokens / 2`` positions (half prompt, half response), or with
``--packed`` one packed row of both (two segments), on a tiny model; each measurement in fresh worker processes (peak RSS on CPU is per process). The
peak is taken above the resident size after the model, gradients and optimizer state exist, so
it is what the step's activations, masks and gathered keys/values cost. Then, for each CP
size, the longest measured pair whose per-rank peak fits the budget of CP1 at ``--budget-at``.

  python -m tools.bench context_parallel --lengths 4096 8192 16384 [--packed]
"""

from __future__ import annotations

from dataclasses import dataclass

from tools.bench.common import command, device_name, peak_tracker, report_header, write_report

TINY = dict(num_layers=2, hidden_size=256, ffn_hidden_size=768, num_attention_heads=4,
            num_query_groups=2, head_dim=64, vocab_size=4096, max_position_embeddings=65536,
            rope_theta=500000.0)


@dataclass(frozen=True)
class Options:
    lengths: tuple[int, ...] = (4096, 8192, 16384)
    """Tokens per pair (chosen + rejected rows), each a multiple of 8."""
    extra_cp2_lengths: tuple[int, ...] = (32768,)
    """Longer pairs measured at CP2 only (how far the same memory reaches)."""
    budget_at: int = 16384
    """The memory budget: CP1's peak at this many tokens per pair."""
    chunk: int = 256
    """Memory-lean log-prob chunk (tokens)."""
    packed: bool = False
    """Lay the pair out as one packed row (--pack-sequences: two segments, restarting
    positions) instead of two padded rows."""
    output: str | None = None
    """Write the JSON report here."""


COMMAND = command("context_parallel", __doc__, options=Options)


def one_step(rank, cp: int, tokens: int, chunk: int, packed: bool = False) -> dict:
    """Peak memory of one SimPO step on this rank above the built model's resident size."""
    import torch

    from megatron_simpo.data.collate import TokenizedPair, collate_packed, collate_pairs
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings
    from megatron_simpo.training.step import train_step

    config, parallel = ModelConfig(**TINY), ParallelConfig(context_parallel_size=cp)
    env = runtime.initialize(parallel, seed=0, model_config=config)
    parts = build_components(config, parallel, OptimizerSettings(lr=1e-5),
                             logprob_chunk_size=chunk)
    row = tokens // 2
    g = torch.Generator().manual_seed(0)
    half = row // 2
    pair = TokenizedPair(*(torch.randint(0, config.vocab_size, (n,), generator=g).tolist()
                           for n in (half, row - half + 1, row - half + 1)))
    batch = (collate_packed([pair], 2 * row) if packed else collate_pairs([pair], row)
             ).to(env.device)
    start, peak = peak_tracker()
    base = start()
    result = train_step([parts.model], parts.optimizer, [batch], LossConfig(), head=parts.head)
    return {"peak_bytes": peak(base), "loss": result.metrics["loss"]}


def main(argv=None) -> None:
    from megatron_simpo.distributed.launch import run_on_ranks

    options = COMMAND.parse(argv)["options"]
    rows = {}
    for cp, lengths in ((1, options.lengths), (2, (*options.lengths, *options.extra_cp2_lengths))):
        for tokens in lengths:
            per_rank = run_on_ranks(cp, one_step, cp, tokens, options.chunk, options.packed,
                                    timeout=3600)
            rows[(cp, tokens)] = {"peak_bytes": max(r["peak_bytes"] for r in per_rank),
                                  "loss": per_rank[0]["loss"]}
            print(f"CP{cp} {tokens:>6} tokens/pair: peak per rank "
                  f"{rows[(cp, tokens)]['peak_bytes'] / 2**20:8.1f} MiB, "
                  f"loss {rows[(cp, tokens)]['loss']:.6f}", flush=True)
    budget = rows[(1, options.budget_at)]["peak_bytes"]
    longest = {cp: max((t for (c, t), r in rows.items() if c == cp and r["peak_bytes"] <= budget),
                       default=None) for cp in (1, 2)}
    print(f"budget {budget / 2**20:.1f} MiB (CP1 at {options.budget_at}): longest measured pair "
          f"that fits: CP1 {longest[1]}, CP2 {longest[2]} tokens")
    report = report_header()
    report["context_parallel"] = {
        "device": device_name(), "model": TINY, "packed": options.packed,
        "steps": [{"cp": cp, "tokens_per_pair": t, **r} for (cp, t), r in rows.items()],
        "budget_bytes": budget, "longest_fitting": {f"cp{cp}": v for cp, v in longest.items()}}
    write_report(options.output, report)
