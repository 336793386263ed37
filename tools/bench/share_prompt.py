"""Shared-prompt rows (--share-prompt) against the unshared layout: positions computed, step time.

Two synthetic data sets with lognormal lengths, times --length-scale: SimPO-like (prompts median
120, responses 350: megatron_simpo.data.synthetic) and long-prompt (prompts median 1,500 sigma
0.5, responses median 300 sigma 0.6; documents, multi-turn histories, RAG). Each set trains on
the same weights and global batches, sorted micro-batches and packed rows, with and without
shared prompts. The saving in real positions computed must be the data's sum P / sum (2P + C + R)
within 2 points (the -2 per pair is the labels-only last tokens).

  python -m tools.bench share --preset cpu-lengths --length-scale 0.125
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from tools.bench.common import Model, Timing, command, report_header, write_report
from tools.bench.trl_compare import save_random_hf_model, simpo_from_hf


@dataclass(frozen=True)
class ShareOptions:
    global_batch: int = 8
    """Pairs per optimizer step."""
    micro_batch: int = 2
    """Pairs per micro-batch (sorted layout)."""
    length_scale: float = 0.125
    """Every length times this (the long-prompt cap 4,096 x this)."""
    threads: int | None = None
    """CPU threads (default: all cores)."""


COMMAND = command("share", __doc__, model=Model, share=ShareOptions, timing=Timing)


def long_prompt_lengths(num_pairs: int, scale: float, seed: int = 0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) counts: prompts lognormal median 1,500 (sigma 0.5), responses
    median 300 (sigma 0.6), each at least 1, prompt + response at most 4,096, all times ``scale``."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def lognormal(median: float, sigma: float):
        normal = torch.randn(num_pairs, generator=g, dtype=torch.float64)
        return torch.exp(math.log(median * scale) + sigma * normal).round().clamp(min=1).long()

    limit = int(4096 * scale)
    prompts = lognormal(1500, 0.5).clamp(max=limit // 2)
    chosen, rejected = lognormal(300, 0.6), lognormal(300, 0.6)
    return [(p, max(1, min(c, limit - p)), max(1, min(r, limit - p)))
            for p, c, r in zip(prompts.tolist(), chosen.tolist(), rejected.tolist())]


def _run(rank, model_dir, pairs, global_batch, micro, batching, seq_length, chunk, threads):
    """Train over ``pairs`` laid out as ``batching`` says: per step its time, the positions
    computed (padding included) and the real positions among them, and the loss."""
    import torch

    torch.set_num_threads(threads)
    from megatron_simpo.data.batching import BatchingConfig, PairLengths, plan_global_batch
    from megatron_simpo.data.collate import TokenizedPair, collate_microbatch
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.step import train_step

    _, env, parts = simpo_from_hf(model_dir, 1e-6, chunk)
    tokenized = [TokenizedPair(*pair) for pair in pairs]
    config, loss = BatchingConfig(**batching), LossConfig(beta=2.5, gamma=1.375)
    steps = []
    for start in range(0, len(tokenized) - global_batch + 1, global_batch):
        began = time.perf_counter()
        indices = list(range(start, start + global_batch))
        plan = plan_global_batch(indices, [PairLengths.of(tokenized[i]) for i in indices],
                                 dp_size=1, micro_batch_size=micro, config=config,
                                 seq_length=seq_length)
        microbatches = [collate_microbatch(tokenized, mb).to(env.device) for mb in plan.ranks[0]]
        result = train_step([parts.model], parts.optimizer, microbatches, loss, head=parts.head)
        steps.append(dict(seconds=time.perf_counter() - began, processed=plan.processed_tokens,
                          computed=plan.real_tokens - plan.saved_tokens,
                          saved=plan.saved_tokens, loss=result.metrics["loss"]))
    return steps


def share_report(model: Model, options: ShareOptions, timing: Timing) -> dict:
    import tempfile

    from megatron_simpo.data.synthetic import preference_lengths
    from megatron_simpo.distributed.launch import run_on_ranks

    config = model.config()
    G, micro, scale = options.global_batch, options.micro_batch, options.length_scale
    threads = options.threads or os.cpu_count()
    n = (timing.warmup + timing.steps) * G
    sets = {"simpo-like": (preference_lengths(n, 0, scale), int(2048 * scale)),
            "long-prompt": (long_prompt_lengths(n, scale), int(4096 * scale))}
    report = {"model": config.to_dict(), "global_batch": G, "micro_batch": micro,
              "length_scale": scale, "warmup": timing.warmup, "steps": timing.steps,
              "threads": threads, "sets": {}}
    timed = slice(timing.warmup, timing.warmup + timing.steps)
    with tempfile.TemporaryDirectory() as tmp:
        save_random_hf_model(config, tmp)
        for name, (lengths, seq_length) in sets.items():
            import torch

            g = torch.Generator().manual_seed(1)
            pairs = [tuple(torch.randint(3, config.vocab_size, (k,), generator=g).tolist()
                           for k in lens) for lens in lengths]
            used = lengths[timed.start * G:timed.stop * G]
            data = {"prompt_fraction": sum(p for p, _, _ in used) /
                    sum(2 * p + c + r for p, c, r in used),
                    "median_prompt": sorted(p for p, _, _ in used)[len(used) // 2],
                    "median_response": sorted(c for _, c, _ in used)[len(used) // 2]}
            budget = 2 * micro * seq_length
            layouts = {"sorted": dict(), f"packed {budget}": dict(max_tokens_per_microbatch=budget,
                                                                  pack_sequences=True)}
            rows = {}
            for layout, batching in layouts.items():
                for share in (False, True):
                    steps = run_on_ranks(1, _run, tmp, pairs, G, micro,
                                         dict(batching, share_prompt=share), seq_length,
                                         model.chunk, threads)[0][timed]
                    rows[f"{layout}{' + share-prompt' if share else ''}"] = {
                        key: sum(step[key] for step in steps)
                        for key in ("seconds", "processed", "computed", "saved")} | {
                        "first_loss": steps[0]["loss"]}
            for layout in layouts:
                plain, shared = rows[layout], rows[f"{layout} + share-prompt"]
                shared["real_saving"] = 1 - shared["computed"] / plain["computed"]
                shared["processed_saving"] = 1 - shared["processed"] / plain["processed"]
                shared["speedup"] = plain["seconds"] / shared["seconds"]
                assert abs(shared["real_saving"] - data["prompt_fraction"]) <= 0.02, (name, layout)
                assert abs(shared["first_loss"] - plain["first_loss"]) <= 1e-4, (name, layout)
            report["sets"][name] = {"data": data, "seq_length": seq_length, "layouts": rows}
    return report


def main(argv=None) -> None:
    options = COMMAND.parse(argv)
    report = report_header()
    report["share_prompt"] = r = share_report(options["model"], options["share"],
                                              options["timing"])
    print(f"device: {report['device']}; {r['steps']} steps of {r['global_batch']} pairs, lengths "
          f"x{r['length_scale']}, {r['threads']} threads")
    for name, entry in r["sets"].items():
        data = entry["data"]
        print(f"\n{name}: median prompt {data['median_prompt']}, response "
              f"{data['median_response']}; P/(2P+C+R) = {data['prompt_fraction']:.3f}")
        print(f"{'layout':<32}{'positions':>11}{'real':>9}{'saved':>8}{'real -%':>9}"
              f"{'all -%':>8}{'s/step':>8}{'speedup':>9}")
        for layout, row in entry["layouts"].items():
            print(f"{layout:<32}{row['processed']:>11}{row['computed']:>9}{row['saved']:>8}"
                  f"{100 * row.get('real_saving', 0):>9.1f}"
                  f"{100 * row.get('processed_saving', 0):>8.1f}"
                  f"{row['seconds'] / r['steps']:>8.2f}{row.get('speedup', 1.0):>9.2f}")
    write_report(options["timing"].output, report)
