"""Memory-lean vs plain log-probs: the log-prob stage alone, forward + backward.

From hidden states to d(hidden) and d(W), at one vocabulary: the plain path (full logits, then
Megatron's vocab-parallel log-probs), the memory-lean one (chunks of --chunk tokens), and the
lean one adding into a DDP ``main_grad`` buffer as under Megatron DDP. Each runs in a fresh
worker process; the inputs exist before the peak-memory baseline.

  python -m tools.bench logprobs --vocab 128256 --seq 2048 --hidden 2048 --chunk 1024
"""

from __future__ import annotations

from dataclasses import dataclass

from tools.bench.common import (Timing, command, device_name, median_seconds, peak_tracker,
                                print_table, report_header, write_report)


@dataclass(frozen=True)
class LogprobOptions:
    vocab: int = 128256
    """Vocabulary size."""
    seq: int = 2048
    """Tokens."""
    hidden: int = 512
    """Hidden size."""
    chunk: int = 256
    """Memory-lean chunk (tokens)."""


COMMAND = command("logprobs", __doc__, shape=LogprobOptions, timing=Timing)


def _logprob_stage(rank, variant, vocab, seq, hidden_size, chunk, steps, warmup):
    """Forward + backward of the log-prob stage alone, from hidden states to d(hidden), d(W)."""
    import torch

    from megatron_simpo.training.logprobs import fused_output_logprobs, vocab_parallel_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(seq, hidden_size, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=g) / 50
              ).requires_grad_()
    labels = torch.randint(0, vocab, (seq,), device=device, generator=g)
    if variant == "lean_main_grad":
        # As under Megatron DDP: the fp32 gradient buffer exists before the step, and the lean
        # path adds into it instead of building its own sum.
        weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=device)

    def run():
        if variant == "plain":
            logps = vocab_parallel_logprobs((hidden @ weight.t()).unsqueeze(0), labels.unsqueeze(0),
                                            vocab_size=vocab)
        else:
            logps = fused_output_logprobs(hidden, weight, labels, vocab_size=vocab, chunk_size=chunk)
        logps.sum().backward()
        hidden.grad = weight.grad = None
        if variant == "lean_main_grad":
            weight.main_grad.zero_()

    run()  # allocator warm-up before the baseline is taken
    start, peak = peak_tracker()
    base = start()
    return {"seconds": median_seconds(run, steps, warmup), "peak_bytes": peak(base)}


def logprob_report(shape: LogprobOptions, timing: Timing) -> dict:
    """The "logprobs" section of the report: the three variants and their ratios."""
    from megatron_simpo.distributed.launch import run_on_ranks

    args = (shape.vocab, shape.seq, shape.hidden, shape.chunk, timing.steps, timing.warmup)
    plain = run_on_ranks(1, _logprob_stage, "plain", *args)[0]
    lean = run_on_ranks(1, _logprob_stage, "lean", *args)[0]
    lean_ddp = run_on_ranks(1, _logprob_stage, "lean_main_grad", *args)[0]
    return {"vocab": shape.vocab, "seq": shape.seq, "hidden": shape.hidden, "chunk": shape.chunk,
            "plain": plain, "lean": lean, "lean_main_grad": lean_ddp,
            "peak_ratio": lean["peak_bytes"] / plain["peak_bytes"],
            "time_ratio": lean["seconds"] / plain["seconds"],
            "main_grad_peak_ratio": lean_ddp["peak_bytes"] / plain["peak_bytes"]}


def main(argv=None) -> None:
    options = COMMAND.parse(argv)
    report = report_header()
    report["logprobs"] = r = logprob_report(options["shape"], options["timing"])
    print_table(device_name(), [("log-prob stage, plain", r["plain"]),
                                ("log-prob stage, lean", r["lean"]),
                                ("log-prob stage, lean into main_grad", r["lean_main_grad"])])
    print(f"lean / plain log-probs: peak {r['peak_ratio']:.3f}x, time {r['time_ratio']:.3f}x; "
          f"adding into DDP's main_grad: peak {r['main_grad_peak_ratio']:.3f}x")
    write_report(options["timing"].output, report)

