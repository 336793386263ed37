#!/usr/bin/env python
"""Benchmarks: SimPO vs DPO steps, and memory-lean vs plain log-probs.

Each variant runs in a fresh worker process of this one run, on the same model and batch, so
that peak memory is its own (CPU: the process's peak RSS above its resident size before the
measured work; GPU: torch.cuda.max_memory_allocated above the allocation before it). For the
log-prob stage the inputs (hidden states, output weight) exist before the measurement; for
steps the measurement starts before the models are built, so weights, gradients, optimizer
state and DPO's reference model all count. Times are
medians over --steps after --warmup. Prints a table of values and ratios; --output writes JSON.

  python tools/bench_simpo.py                 # both benchmarks, CPU-sized defaults
  python tools/bench_simpo.py --only logprobs --vocab 128256 --seq 2048 --hidden 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_tracker():
    """(start(), peak_bytes()) for the current device."""
    import psutil
    import torch

    if torch.cuda.is_available():
        def start():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def peak(base):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
    else:
        def start():
            return psutil.Process().memory_info().rss

        def peak(base):  # ru_maxrss is in KiB on Linux
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return start, peak


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_seconds(run, steps: int, warmup: int) -> float:
    """Median wall time of ``run()`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        _sync()
        began = time.perf_counter()
        run()
        _sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _logprob_stage(rank, variant, vocab, seq, hidden_size, chunk, steps, warmup):
    """Forward + backward of the log-prob stage alone, from hidden states to d(hidden), d(W)."""
    import torch

    from megatron_simpo.logprobs import fused_output_logprobs, vocab_parallel_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(seq, hidden_size, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=g) / 50
              ).requires_grad_()
    labels = torch.randint(0, vocab, (seq,), device=device, generator=g)

    def run():
        if variant == "plain":
            logps = vocab_parallel_logprobs((hidden @ weight.t()).unsqueeze(0), labels.unsqueeze(0),
                                            vocab_size=vocab)
        else:
            logps = fused_output_logprobs(hidden, weight, labels, vocab_size=vocab, chunk_size=chunk)
        logps.sum().backward()
        hidden.grad = weight.grad = None

    run()  # allocator warm-up before the baseline is taken
    start, peak = _peak_tracker()
    base = start()
    return {"seconds": _median_seconds(run, steps, warmup), "peak_bytes": peak(base)}


def _preference_step(rank, algorithm, model_dict, pairs, seq, steps, warmup, chunk):
    """Median time and peak memory of full optimizer steps (the DPO reference pass included)."""
    import torch

    from megatron_simpo import runtime
    from megatron_simpo.data import TokenizedPair, collate_pairs
    from megatron_simpo.losses import LossConfig
    from megatron_simpo.model import ModelConfig, build_model, enable_memory_lean_logprobs
    from megatron_simpo.optimizer import OptimizerSettings, build_optimizer, wrap_with_ddp
    from megatron_simpo.parallel import ParallelConfig
    from megatron_simpo.step import train_step

    config, parallel = ModelConfig.from_dict(model_dict), ParallelConfig()
    env = runtime.initialize(parallel, seed=0)
    # Peak from before the models exist: DPO's reference weights count against it.
    start, peak = _peak_tracker()
    base = start()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    settings = OptimizerSettings(lr=1e-6, use_distributed_optimizer=True)
    model = build_model(config, parallel, params_dtype=dtype)
    reference = None
    if algorithm == "dpo":
        reference = build_model(config, parallel, params_dtype=dtype).eval().requires_grad_(False)
    for m in (model, reference):
        if m is not None and chunk:
            enable_memory_lean_logprobs(m, chunk)
    model = wrap_with_ddp(model, settings)
    optimizer = build_optimizer([model], settings, bf16=dtype == torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    half = seq // 2
    batch_pairs = [TokenizedPair(torch.randint(0, config.vocab_size, (half,), generator=g).tolist(),
                                 torch.randint(0, config.vocab_size, (half,), generator=g).tolist(),
                                 torch.randint(0, config.vocab_size, (half,), generator=g).tolist())
                   for _ in range(pairs)]
    batch = collate_pairs(batch_pairs, seq).to(env.device)
    loss = LossConfig(algorithm=algorithm, beta=2.5 if algorithm == "simpo" else 0.1,
                      gamma=1.375 if algorithm == "simpo" else None)

    def run():
        train_step([model], optimizer, batch.split(1), loss, vocab_size=config.vocab_size,
                   reference_model=reference)

    seconds = _median_seconds(run, steps, warmup)
    return {"seconds": seconds, "peak_bytes": peak(base),
            "tokens_per_second": 2 * pairs * seq / seconds}


def main() -> None:
    from megatron_simpo.launch import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["steps", "logprobs"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128256, help="log-prob benchmark vocabulary")
    parser.add_argument("--seq", type=int, default=2048, help="log-prob benchmark tokens")
    parser.add_argument("--hidden", type=int, default=512, help="log-prob benchmark hidden size")
    parser.add_argument("--chunk", type=int, default=256, help="memory-lean chunk (tokens)")
    parser.add_argument("--model-config", help="HF config.json for the step benchmark "
                                               "(default: a 4-layer, 512-wide Llama-3 shape)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--step-seq", type=int, default=256)
    parser.add_argument("--output")
    args = parser.parse_args()
    import torch

    from megatron_simpo.model import ModelConfig

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    rows = []
    if args.only in (None, "logprobs"):
        shape = (args.vocab, args.seq, args.hidden, args.chunk, args.steps, args.warmup)
        plain = run_on_ranks(1, _logprob_stage, "plain", *shape)[0]
        lean = run_on_ranks(1, _logprob_stage, "lean", *shape)[0]
        report["logprobs"] = {"vocab": args.vocab, "seq": args.seq, "hidden": args.hidden,
                              "chunk": args.chunk, "plain": plain, "lean": lean,
                              "peak_ratio": lean["peak_bytes"] / plain["peak_bytes"],
                              "time_ratio": lean["seconds"] / plain["seconds"]}
        rows += [("log-prob stage, plain", plain), ("log-prob stage, lean", lean)]
    if args.only in (None, "steps"):
        if args.model_config:
            config = ModelConfig.from_hf_config(args.model_config)
        else:
            config = ModelConfig(num_layers=4, hidden_size=512, ffn_hidden_size=1536,
                                 num_attention_heads=8, num_query_groups=2, vocab_size=32000,
                                 max_position_embeddings=4096, rope_theta=500000.0)
        common = (config.to_dict(), args.pairs, args.step_seq, args.steps, args.warmup, args.chunk)
        simpo = run_on_ranks(1, _preference_step, "simpo", *common)[0]
        dpo = run_on_ranks(1, _preference_step, "dpo", *common)[0]
        report["steps"] = {"model": config.to_dict(), "pairs": args.pairs, "seq": args.step_seq,
                           "simpo": simpo, "dpo": dpo,
                           "time_ratio": simpo["seconds"] / dpo["seconds"],
                           "peak_ratio": simpo["peak_bytes"] / dpo["peak_bytes"]}
        rows += [("step, SimPO", simpo), ("step, DPO (+ reference)", dpo)]
    print(f"device: {device}")
    print(f"{'what':<28}{'median s':>10}{'peak MB':>10}")
    for name, row in rows:
        print(f"{name:<28}{row['seconds']:>10.4f}{row['peak_bytes'] / 2**20:>10.1f}")
    if "logprobs" in report:
        r = report["logprobs"]
        print(f"lean / plain log-probs: peak {r['peak_ratio']:.3f}x, time {r['time_ratio']:.3f}x")
    if "steps" in report:
        r = report["steps"]
        print(f"SimPO / DPO step: time {r['time_ratio']:.3f}x, peak {r['peak_ratio']:.3f}x")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
