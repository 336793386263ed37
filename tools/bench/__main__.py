"""The benchmarks' one entry point: ``python -m tools.bench BENCHMARK [options]``.

Each benchmark is a module of this package with a ``main(argv)``; ``BENCHMARK --help`` lists its
options.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

if not __package__:  # run as a file: the repository root, not this folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[2])

BENCHMARKS = {
    "steps": ("steps", "SimPO vs DPO optimizer steps: time, peak memory, TFLOP/s"),
    "logprobs": ("logprobs", "memory-lean vs plain log-probs (the log-prob stage alone)"),
    "fp8": ("fp8", "FP8 vs bf16 SimPO steps (GPU + Transformer Engine)"),
    "trl": ("trl_compare", "this trainer vs TRL's CPOTrainer on the same weights and tokens"),
    "lengths": ("lengths", "micro-batch layouts on SimPO-like lengths vs TRL"),
    "microbatch": ("microbatch", "time per micro-batch against its size"),
    "attention": ("attention", "Megatron-Core's local attention core vs torch SDPA"),
    "convert": ("convert", "HF <-> Megatron conversion: time, peak memory"),
    "data": ("data", "data preparation: the memory-mapped cache vs in memory"),
    "context_parallel": ("context_parallel", "peak memory per rank of a step: CP1 vs CP2"),
    "cache_check": ("cache_check", "checking a data cache entry on open: checksums, token ids"),
    "checkpoint_check": ("checkpoint_check", "a checkpoint's checksums against its save and load"),
    "share": ("share_prompt", "shared-prompt rows vs unshared: positions computed, step time"),
    "moe": ("moe", "a tiny mixture of experts at EP 1 vs EP 2: tokens/s, peak memory per rank"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        wants_help = argv[:1] in (["-h"], ["--help"])
        unknown = "" if not argv or wants_help else f"unknown benchmark {argv[0]!r}\n"
        print(f"{unknown}usage: python -m tools.bench BENCHMARK [--help | options]\n\nbenchmarks:",
              *(f"  {name:<{max(map(len, BENCHMARKS)) + 2}}{about}"
                for name, (_, about) in BENCHMARKS.items()), sep="\n",
              file=sys.stdout if wants_help else sys.stderr)
        raise SystemExit(0 if wants_help else 2)
    importlib.import_module(f"tools.bench.{BENCHMARKS[argv[0]][0]}").main(argv[1:])


if __name__ == "__main__":  # the guard matters: the benchmarks spawn worker processes
    main()
