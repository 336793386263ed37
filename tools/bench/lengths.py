"""Micro-batch layouts on SimPO-like lengths, and TRL's CPOTrainer, on the same weights and pairs.

Pairs with SimPO's length distribution (megatron_simpo.data.synthetic) scaled by --length-scale,
global batches of --global-batch pairs in the same order: TRL's CPOTrainer (micro-batches of
--micro-batch pairs, each padded to its longest row), then this trainer laid out global-max (as
before length-aware batching), in order (TRL's layout), sorted (the default), by a token budget
and packed. Reports padding efficiency and real tokens/s against global-max and TRL. Needs TRL.

  python -m tools.bench lengths --preset cpu-lengths --global-batch 16 --micro-batch 2
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tools.bench.common import Model, Timing, command, report_header, write_report
from tools.bench.trl_compare import (cpo_classes, letters, require_trl, save_random_hf_model,
                                     simpo_from_hf, step_timer, trl_precision, trl_token_ids)


@dataclass(frozen=True)
class LengthsOptions:
    global_batch: int = 16
    """Pairs per optimizer step."""
    micro_batch: int = 2
    """Pairs per micro-batch (TRL and the fixed layouts)."""
    length_scale: float = 0.25
    """SimPO's lengths times this (cap 2048 x this)."""
    max_tokens: int | None = None
    """Token budget / packed row (default: a micro-batch of --micro-batch pairs at the length
    cap)."""
    threads: int | None = None
    """CPU threads of each side (default: all cores)."""


COMMAND = command("lengths", __doc__, model=Model, lengths=LengthsOptions, timing=Timing)


def _length_rows(num_pairs: int, scale: float, max_length: int) -> list[dict]:
    """Plain-text pairs with SimPO-like lengths (megatron_simpo.data.synthetic) for the char-level
    tiny tokenizer (one token per letter; TRL adds BOS to the prompt and EOS to responses)."""
    import random

    from megatron_simpo.data.synthetic import preference_lengths

    rng = random.Random(0)
    rows = []
    for prompt, chosen, rejected in preference_lengths(num_pairs, 0, scale, max_length):
        rows.append({"prompt": letters(rng, max(1, prompt - 1)),
                     "chosen": letters(rng, max(1, chosen - 1)),
                     "rejected": letters(rng, max(1, rejected - 1))})
    return rows


def _trl_length_run(rank, model_dir, rows, global_batch, micro, warmup, beta, gamma, lr, out_dir,
                    threads):
    """TRL's CPOTrainer (SimPO, cpo_alpha=0) over ``rows`` in order: global batches of
    ``global_batch`` pairs by gradient accumulation over micro-batches of ``micro`` pairs, each
    padded to its own longest row (TRL's collator). Returns the step times and TRL's token ids."""
    import torch
    import transformers
    from datasets import Dataset

    CPOConfig, CPOTrainer = cpo_classes()

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    times, losses = [], []
    config = CPOConfig(output_dir=out_dir, per_device_train_batch_size=micro,
                       gradient_accumulation_steps=global_batch // micro,
                       max_steps=len(rows) // global_batch, learning_rate=lr,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                       seed=0, dataloader_num_workers=0, loss_type="simpo",
                       cpo_alpha=0.0, beta=beta, simpo_gamma=gamma, max_length=1 << 16,
                       disable_dropout=True, train_sampling_strategy="sequential",
                       **trl_precision())
    trainer = CPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[step_timer(times, losses)])
    torch.set_num_threads(threads)  # after the Trainer: accelerate sets its own count
    trainer.train()
    pairs = trl_token_ids(trainer)
    return {"step_seconds": times, "losses": losses, "pairs": pairs,
            "threads": torch.get_num_threads()}


def _layout_run(rank, model_dir, pairs, global_batch, micro, batching, seq_length, chunk, lr,
                threads):
    """This trainer over the same pairs, global batches in the same order, laid out as
    ``batching`` says: per-step times (planning and collation included), real and processed
    tokens."""
    import torch

    torch.set_num_threads(threads)
    from megatron_simpo.data.batching import BatchingConfig, PairLengths, plan_global_batch
    from megatron_simpo.data.collate import TokenizedPair, collate_microbatch
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.step import train_step

    config, env, parts = simpo_from_hf(model_dir, lr, chunk)
    tokenized = [TokenizedPair(*pair) for pair in pairs]
    batching = BatchingConfig(**batching)
    loss = LossConfig(beta=2.5, gamma=1.375)
    times, real, processed, losses = [], [], [], []
    for start in range(0, len(tokenized) - global_batch + 1, global_batch):
        began = time.perf_counter()
        indices = list(range(start, start + global_batch))
        plan = plan_global_batch(indices, [PairLengths.of(tokenized[i]) for i in indices],
                                 dp_size=1, micro_batch_size=micro, config=batching,
                                 seq_length=seq_length)
        microbatches = [collate_microbatch(tokenized, mb).to(env.device) for mb in plan.ranks[0]]
        result = train_step([parts.model], parts.optimizer, microbatches, loss,
                            head=parts.head)
        times.append(time.perf_counter() - began)
        real.append(plan.real_tokens)
        processed.append(plan.processed_tokens)
        losses.append(result.metrics["loss"])
    return {"step_seconds": times, "real_tokens": real, "processed_tokens": processed,
            "losses": losses}



def lengths_report(model: Model, options: LengthsOptions, timing: Timing) -> dict:
    """Layouts on SimPO-like lengths, and TRL's CPOTrainer, on the same weights and pairs."""
    import tempfile

    from megatron_simpo.distributed.launch import run_on_ranks

    config = model.config()
    beta, gamma, lr = 2.5, 1.375, 1e-6
    warmup, steps = timing.warmup, timing.steps
    G, micro = options.global_batch, options.micro_batch
    seq_length = int(2048 * options.length_scale)
    budget = options.max_tokens or 2 * micro * seq_length
    threads = options.threads or os.cpu_count()
    variants = {
        "global-max (before)": dict(batch_layout="global-max"),
        "in-order (TRL's layout)": dict(batch_layout="in-order"),
        "sorted (default)": dict(batch_layout="sorted"),
        f"token budget {budget}": dict(max_tokens_per_microbatch=budget),
        f"packed {budget}": dict(max_tokens_per_microbatch=budget, pack_sequences=True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_random_hf_model(config, tmp)
        # TRL adds BOS and EOS: leave it room under the length cap.
        rows = _length_rows((warmup + steps) * G, options.length_scale, seq_length - 2)
        trl = run_on_ranks(1, _trl_length_run, tmp, rows, G, micro, warmup, beta, gamma, lr,
                           f"{tmp}/trl", threads)[0]
        pairs = trl.pop("pairs")
        ours = {name: run_on_ranks(1, _layout_run, tmp, pairs, G, micro, batching, seq_length,
                                   model.chunk, lr, threads)[0]
                for name, batching in variants.items()}

    def real_tokens(first, last):
        return sum(2 * len(p) + len(c) + len(r) - 2 for p, c, r in pairs[first * G:last * G])

    timed = slice(warmup, warmup + steps)
    report = {"model": config.to_dict(), "global_batch": G, "micro_batch": micro,
              "length_scale": options.length_scale, "seq_length": seq_length, "budget": budget,
              "warmup": warmup, "steps": steps, "threads": threads, "variants": {}}
    trl_seconds = sum(trl["step_seconds"][timed])
    trl_real = real_tokens(warmup, warmup + steps)
    report["trl"] = {"seconds": trl_seconds, "real_tokens_per_second": trl_real / trl_seconds,
                     "first_loss": trl["losses"][0] if trl["losses"] else None}
    for name, run in ours.items():
        seconds = sum(run["step_seconds"][timed])
        real, processed = sum(run["real_tokens"][timed]), sum(run["processed_tokens"][timed])
        assert real == trl_real, (name, real, trl_real)  # the very same tokens
        report["variants"][name] = {"seconds": seconds, "padding_efficiency": real / processed,
                                    "real_tokens_per_second": real / seconds,
                                    "first_loss": run["losses"][0]}
    base = report["variants"]["global-max (before)"]["real_tokens_per_second"]
    for row in report["variants"].values():
        row["speedup_vs_global_max"] = row["real_tokens_per_second"] / base
        row["speedup_vs_trl"] = row["real_tokens_per_second"] / report["trl"]["real_tokens_per_second"]
    return report


def main(argv=None) -> None:
    options = COMMAND.parse(argv)
    require_trl(COMMAND.prog)
    report = report_header()
    device = report["device"]
    report["lengths"] = r = lengths_report(options["model"], options["lengths"], options["timing"])
    print(f"device: {device}; {r['steps']} steps of {r['global_batch']} pairs (micro-batches "
          f"of {r['micro_batch']}), lengths x{r['length_scale']} (cap {r['seq_length']})")
    print(f"{'layout':<28}{'padding eff.':>13}{'real tok/s':>12}{'vs before':>11}"
          f"{'vs TRL':>8}")
    trl_rate = r["trl"]["real_tokens_per_second"]
    print(f"{'TRL CPOTrainer (simpo)':<28}{'':>13}{trl_rate:>12.0f}{'':>11}{1.0:>8.2f}")
    print(f"first-step loss: TRL {r['trl']['first_loss']}, ours "
          f"{[round(row['first_loss'], 6) for row in r['variants'].values()]}")
    for name, row in r["variants"].items():
        print(f"{name:<28}{row['padding_efficiency']:>13.3f}"
              f"{row['real_tokens_per_second']:>12.0f}{row['speedup_vs_global_max']:>11.2f}"
              f"{row['speedup_vs_trl']:>8.2f}")
    write_report(options["timing"].output, report)
