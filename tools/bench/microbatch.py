"""Time per micro-batch against its size: is there a fixed cost per micro-batch of new shape?

One rank, one model (random weights, bf16 on a GPU), SimPO steps of ``--microbatches`` micro-
batches of ``--pairs`` pairs each. For every size in ``--tokens`` (tokens per micro-batch) two
kinds of step are timed:

- ``new``: every micro-batch has a row length no earlier micro-batch had (what length-aware
  batching produces: each micro-batch padded to its own longest row);
- ``repeat``: every micro-batch has the one row length the warm-up steps already used.

Time per micro-batch = step time / micro-batches (the optimizer step included, as in training).
The report gives model TFLOP/s (megatron_simpo.model.flops) and, against the largest size's ``repeat``
rate, how much slower than its FLOPs each kind runs: 1.0 means no fixed cost at all.

  python -m tools.bench microbatch --preset llama3.2-1b --tokens 1024 4096 --profile OUT

``--profile DIR`` also records one ``new`` step of the smallest size with torch.profiler
(DIR/microbatch_profile.txt: operators by host and device time, syncs, allocator calls,
torch.compile's compile times, and per micro-batch the operators the host dispatches and its
reads of device values). ``--preset cpu-host`` (a model that computes next to nothing) measures
the host's work alone, on any machine:

  python -m tools.bench microbatch --preset cpu-host --tokens 96 --microbatches 16 --profile OUT
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

from tools.bench.common import PRESETS, device_name, sync, write_report


def _microbatch(vocab: int, pairs: int, row: int, seed: int):
    """``pairs`` pairs whose rows are exactly ``row`` tokens (half prompt, half response)."""
    import torch

    from megatron_simpo.data.collate import TokenizedPair, collate_pairs

    g = torch.Generator().manual_seed(seed)
    half = row // 2

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return collate_pairs([TokenizedPair(ids(row - half), ids(half + 1), ids(half + 1))
                          for _ in range(pairs)], row)


SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero")
"""Operators that read a device value on the host (on a GPU: the host waits for the device)."""


def op_counts(events, microbatches: int) -> list[str]:
    """Per micro-batch: torch operators issued at the top level (not inside another operator:
    what the host dispatches), all of them, and each host read of a device value."""
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    lines = [f"== per micro-batch ({microbatches} in the step, optimizer step included)",
             f"top-level operators {len(top) / microbatches:.1f}, all {len(aten) / microbatches:.1f}"]
    for name in SYNCS:
        found = sum(e.name == name for e in aten)
        lines.append(f"{name:<50}{found / microbatches:>8.2f}")
    return lines


def _profile_report(profiler, path: Path, microbatches: int) -> None:
    averages = profiler.key_averages()
    lines = ["== by self host time", averages.table(sort_by="self_cpu_time_total", row_limit=30),
             "== by device time", averages.table(sort_by="self_device_time_total", row_limit=20)]
    watched = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMalloc",
               "cudaFree", "aten::item", "aten::_local_scalar_dense", "aten::nonzero",
               "Torch-Compiled Region", "TorchDynamo Cache Lookup", "cudaLaunchKernel")
    lines.append("== watched calls: count, host ms")
    for event in averages:
        if any(event.key.startswith(name) for name in watched):
            lines.append(f"{event.key:<50}{event.count:>8}{event.cpu_time_total / 1e3:>12.2f}")
    lines += op_counts(profiler.events(), microbatches)
    try:
        from torch._dynamo.utils import compile_times

        lines += ["== torch.compile", str(compile_times(repr="str", aggregate=True))]
    except Exception as error:  # a private helper: report its absence, do not fail the bench
        lines.append(f"== torch.compile: compile_times unavailable ({error})")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-18:]))


def _run(rank, model_dict, tokens, pairs, microbatches, steps, warmup, chunk, overrides,
         profile_dir):
    import torch

    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components
    from megatron_simpo.model.flops import step_flops
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.training.step import train_step

    config, parallel = ModelConfig.from_dict(model_dict), ParallelConfig()
    env = runtime.initialize(parallel, seed=0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    parts = build_components(config, parallel,
                             OptimizerSettings(lr=1e-6, use_distributed_optimizer=True),
                             params_dtype=dtype, logprob_chunk_size=chunk,
                             transformer_overrides=overrides)
    loss = LossConfig(beta=2.5, gamma=1.375)
    fresh = itertools.count(1)  # row-length offsets never used before (multiples of 8)
    seeds = itertools.count()

    def batches(size, kind):
        base = size // (2 * pairs)
        rows = [base if kind == "repeat" else base + 8 * next(fresh) for _ in range(microbatches)]
        return [_microbatch(config.vocab_size, pairs, row, next(seeds)).to(env.device)
                for row in rows]

    def step(mbs):
        sync()
        began = time.perf_counter()
        train_step([parts.model], parts.optimizer, mbs, loss, head=parts.head)
        sync()
        return time.perf_counter() - began

    results = {}
    for size in tokens:
        for kind in ("repeat", "new"):
            for _ in range(warmup):
                step(batches(size, "repeat"))
            times, flops = [], []
            for _ in range(steps):
                mbs = batches(size, kind)
                times.append(step(mbs))
                rows = [int(n) for mb in mbs for n in (mb.loss_mask.shape[1],) * mb.tokens.shape[0]]
                flops.append(step_flops(config, rows, int(sum(mb.loss_mask.sum() for mb in mbs))))
            seconds = statistics.median(times) / microbatches
            results[f"{kind} {size}"] = {
                "tokens": size, "kind": kind, "seconds_per_microbatch": seconds,
                "tflops": statistics.median(flops) / microbatches / seconds / 1e12}
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if torch.cuda.is_available() else [])
        mbs = batches(min(tokens), "new")
        with profile(activities=activities) as profiler:
            step(mbs)
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        _profile_report(profiler, Path(profile_dir) / "microbatch_profile.txt", len(mbs))
    return results


def main(argv=None) -> None:
    from megatron_simpo.distributed.launch import run_on_ranks

    # Plain argparse: --tokens takes several values, which the flag generator does not offer.
    parser = argparse.ArgumentParser(prog="python -m tools.bench microbatch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048],
                        help="tokens per micro-batch (the largest is the reference rate)")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024, help="--logprob-chunk-size")
    parser.add_argument("--no-fusions", action="store_true",
                        help="Megatron-Core's torch.compile'd fusions off (bias-activation, "
                             "bias-dropout-add, persistent layer norm)")
    parser.add_argument("--profile", help="folder for microbatch_profile.txt")
    parser.add_argument("--output", help="JSON report")
    args = parser.parse_args(argv)
    overrides = (dict(bias_activation_fusion=False, bias_dropout_fusion=False,
                      persist_layer_norm=False) if args.no_fusions else None)
    tokens = sorted(args.tokens)
    results = run_on_ranks(1, _run, PRESETS[args.preset], tokens, args.pairs, args.microbatches,
                           args.steps, args.warmup, args.chunk, overrides, args.profile)[0]
    reference = results[f"repeat {tokens[-1]}"]["tflops"]
    device = device_name()
    print(f"device: {device}; preset {args.preset}; {args.microbatches} micro-batches of "
          f"{args.pairs} pairs per step; fusions {'off' if args.no_fusions else 'on'}")
    print(f"{'micro-batches':<16}{'s / micro-batch':>16}{'TFLOP/s':>9}{'x FLOP time':>13}")
    for name, row in results.items():
        row["slowdown_vs_largest"] = reference / row["tflops"]
        print(f"{name:<16}{row['seconds_per_microbatch']:>16.4f}{row['tflops']:>9.1f}"
              f"{row['slowdown_vs_largest']:>13.2f}")
    write_report(args.output, {"device": device, "date": time.strftime("%Y-%m-%d"),
                               "preset": args.preset, "no_fusions": args.no_fusions,
                               "results": results})
