"""Benchmark: what a checkpoint's checksums cost (megatron_simpo.checkpoint.checksums), against
the save and the load they belong to, in the same run.

A model of the preset's shape (random weights, ``--dtype``) is saved with ``save_model_only``
on one rank (which digests every file it wrote, then writes ``checksums.json``) and loaded with
``load_checkpoint`` (which checks them first). Each is timed ``--repeats`` times (median), and
so are the digest and the check alone on the same folder; the page cache is warm, as it is for
a digest right after its save.

  python -m tools.bench checkpoint_check                          # Llama-3.2-1B's shape, bf16
  python -m tools.bench checkpoint_check --preset cpu-small --repeats 2   # a quick look
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.bench.common import PRESETS, Preset, command, write_report


@dataclass(frozen=True)
class CheckpointCheckOptions:
    preset: Preset = "llama3.2-1b"
    """The model's shape (tools.bench.common.PRESETS)."""
    dtype: str = "bfloat16"
    """The weights' dtype (bfloat16 or float32)."""
    repeats: int = 3
    """Timings per step (the median is reported)."""
    workdir: str | None = None
    """Where the checkpoints are written; default a temporary folder, removed."""
    output: str | None = None
    """Also write the figures as JSON here."""


COMMAND = command("checkpoint_check", __doc__, options=CheckpointCheckOptions)


def _median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _run(rank, options: CheckpointCheckOptions, workdir: str) -> dict:
    import torch

    from megatron_simpo.checkpoint import checksums
    from megatron_simpo.checkpoint.checkpointing import load_checkpoint, save_model_only
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.builder import build_model

    config, parallel = ModelConfig.from_dict(PRESETS[options.preset]), ParallelConfig()
    runtime.initialize(parallel, seed=0, model_config=config)
    dtype = getattr(torch, options.dtype)
    model = build_model(config, parallel, params_dtype=dtype)
    root = Path(workdir) / "run"
    folder = save_model_only(root, 0, model, config)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    save_s = _median_seconds(lambda: save_model_only(root, 0, model, config), options.repeats)
    files = checksums.read_manifest(folder)  # the last save's (each save has its own .metadata)
    assert checksums.first_mismatch(folder, files, 0, 1) is None
    return {
        "bytes": size, "save_s": save_s,
        "digest_s": _median_seconds(lambda: checksums.digests(folder, 0), options.repeats),
        "load_s": _median_seconds(lambda: load_checkpoint(folder, model, model_config=config),
                                  options.repeats),
        "check_s": _median_seconds(lambda: checksums.first_mismatch(folder, files, 0, 1),
                                   options.repeats),
    }


def main(argv=None) -> None:
    from megatron_simpo.distributed.launch import run_on_ranks

    options = COMMAND.parse(argv)["options"]
    workdir = options.workdir or tempfile.mkdtemp(prefix="checkpoint-check-")
    try:
        row = run_on_ranks(1, _run, options, workdir)[0]
    finally:
        if options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    gb = row["bytes"] / 1e9
    print(f"{options.preset}, {options.dtype}: {gb:.2f} GB of files, one rank")
    print(f"{'step':<40}{'median s':>10}{'GB/s':>8}{'share':>8}")
    for name, seconds, whole in (("save (digest included)", row["save_s"], None),
                                 ("  the digest alone", row["digest_s"], row["save_s"]),
                                 ("load (check included)", row["load_s"], None),
                                 ("  the check alone", row["check_s"], row["load_s"])):
        share = f"{seconds / whole:.0%}" if whole else ""
        print(f"{name:<40}{seconds:>10.2f}{gb / seconds:>8.2f}{share:>8}")
    write_report(options.output, {"preset": options.preset, "dtype": options.dtype,
                                  "date": time.strftime("%Y-%m-%d"), **row})
