"""What every benchmark shares: model presets, timing, peak memory, options, tables, the report.

Peak memory is measured from a baseline taken just before the measured work: on CPU the
process's peak RSS above its resident size then, on a GPU ``torch.cuda.max_memory_allocated``
above the allocation then. Times are medians over ``--steps`` calls after ``--warmup``
untimed ones, with the device synchronised around each.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from megatron_simpo.cli.flags import Command, Section

Preset = Literal["cpu-small", "cpu-lengths", "cpu-host", "llama3.2-1b", "llama3-8b", "gemma2-2b"]

# Model shapes by name (ModelConfig fields, head_dim spelled out as a converted config has it);
# the default CPU shape is small enough for 2 cores.
PRESETS = {
    "cpu-small": dict(num_layers=4, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                      num_query_groups=2, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                      rope_theta=500000.0),
    # The same with a 4k vocabulary: per token, the output layer then costs about what it does
    # in Llama-3-8B relative to the decoder (~15%), so padding costs what it costs there.
    "cpu-lengths": dict(num_layers=4, hidden_size=512, ffn_hidden_size=1536,
                        num_attention_heads=8, num_query_groups=2, head_dim=64, vocab_size=4096,
                        max_position_embeddings=4096, rope_theta=500000.0),
    # Compute next to nothing: a step's time is the host's work (Python, op dispatch), which a
    # GPU step of short micro-batches also pays (docs/performance.md, issue 26).
    "cpu-host": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, head_dim=16, vocab_size=256,
                     max_position_embeddings=4096, rope_theta=500000.0,
                     rope_scaling_factor=32.0, tie_word_embeddings=True),
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
                        num_attention_heads=32, num_query_groups=8, head_dim=64,
                        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling_factor=32.0, tie_word_embeddings=True),
    "llama3-8b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                      num_attention_heads=32, num_query_groups=8, head_dim=128, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
    # google/gemma-2-2b's shape (2.61 B parameters): soft-capping, alternating 4k windows (the
    # first layer slides), a 256k vocabulary, head_dim 256.
    "gemma2-2b": dict(architecture="Gemma2ForCausalLM", num_layers=26, hidden_size=2304,
                      ffn_hidden_size=9216, num_attention_heads=8, num_query_groups=4,
                      head_dim=256, vocab_size=256000, max_position_embeddings=8192,
                      rope_theta=10000.0, norm_eps=1e-6, tie_word_embeddings=True,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      sliding_window=4096, query_pre_attn_scalar=256,
                      layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(26))),
}
assert set(typing.get_args(Preset)) == set(PRESETS), "Preset must name every PRESETS entry"


@dataclass(frozen=True)
class Timing:
    """How long a benchmark measures, and where its report goes."""

    steps: int = 5
    """Timed calls; the median is reported."""
    warmup: int = 2
    """Untimed calls before them."""
    output: str | None = None
    """Write the JSON report here."""


@dataclass(frozen=True)
class Model:
    """The model the step benchmarks train."""

    preset: Preset = "cpu-small"
    """Model shape."""
    model_config: str | None = None
    """An HF config.json instead of --preset."""
    chunk: int = 256
    """Memory-lean log-prob chunk (tokens)."""

    def config(self):
        """The ModelConfig these options name."""
        from megatron_simpo.model.architecture import ModelConfig

        if self.model_config:
            return ModelConfig.from_hf_config(self.model_config)
        return ModelConfig(**PRESETS[self.preset])


def command(name: str, doc: str, **sections: type) -> Command:
    """A benchmark's command line: one help group per options dataclass (every field a flag).

    ``doc`` is the benchmark module's docstring (its first paragraph is the description);
    parsing returns ``{key: dataclass}`` for the ``key=Dataclass`` given here.
    """
    return Command(f"python -m tools.bench {name}", doc.split("\n\n")[0].replace("\n", " "),
                   tuple(Section(key, cls, key=key, fields=tuple(f.name for f in fields(cls)))
                         for key, cls in sections.items()))


def peak_tracker():
    """(start(), peak(base)) for the current device: start() synchronises and returns the
    baseline, peak(base) the peak memory above it in bytes."""
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


def sync() -> None:
    """Wait for the GPU (if any): a timer read after it includes the queued work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(run, steps: int, warmup: int) -> float:
    """Median wall time of ``run()`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        sync()
        began = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def report_header() -> dict:
    """The report's first keys: device, date, torch version."""
    import torch

    return {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}


def write_report(path: str | None, report: dict, indent: int = 2) -> None:
    """The JSON report, where ``--output`` says (nothing without it)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=indent) + "\n")


def print_table(device: str, rows: list) -> None:
    """One line per measured variant: median seconds, peak MB, and what else it reports."""
    print(f"device: {device}")
    print(f"{'what':<34}{'median s':>10}{'peak MB':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}")
    for name, row in rows:
        tokens = row.get("tokens_per_second")
        tflops = row.get("model_tflops_per_second")
        mfu = row.get("mfu_vs_bf16_peak")
        print(f"{name:<34}{row['seconds']:>10.4f}{row['peak_bytes'] / 2**20:>10.1f}"
              f"{'' if tokens is None else f'{tokens:.0f}':>11}"
              f"{'' if tflops is None else f'{tflops:.2f}':>9}"
              f"{'' if mfu is None else f'{100 * mfu:.1f}%':>7}")
