"""What a run reports: metrics.jsonl (and TensorBoard), and the per-step log line."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_simpo.distributed.files import write_text_atomically
from megatron_simpo.model.architecture import ModelConfig
from megatron_simpo.data.collate import TokenizedPair
from megatron_simpo.model.flops import step_flops
from megatron_simpo.training.guards import json_number
from megatron_simpo.checkpoint.metrics_file import (METRICS_FILE, MetricsFileError,
                                                    read_metrics_file, write_failed)
from megatron_simpo.training.step import StepResult

__all__ = ["METRICS_FILE", "LogWindow", "MetricsFileError", "MetricsWriter", "StepRecord",
           "at_interval", "log_line", "pair_flops", "read_metrics_file"]

TENSORBOARD_PACKAGE = "tensorboard"
"""What ``torch.utils.tensorboard`` needs installed for ``--tensorboard-dir``."""


def check_tensorboard(tensorboard_dir: str | None) -> None:
    """Refuse ``--tensorboard-dir`` before any work where its package is missing."""
    import importlib.util

    if tensorboard_dir and importlib.util.find_spec(TENSORBOARD_PACKAGE) is None:
        raise ValueError(f"--tensorboard-dir needs the {TENSORBOARD_PACKAGE} package "
                         f"(pip install {TENSORBOARD_PACKAGE})")


class MetricsWriter:
    """Rank 0 writes metrics.jsonl (and TensorBoard events when asked and installed).

    Every line is strict JSON (a non-finite value is written as null). A resumed run first drops
    the lines of iterations after the one it resumes from (written after that checkpoint by the
    interrupted run, and about to be written again), so no iteration appears twice, and a
    cut-off last line (:func:`read_metrics_file`).
    """

    def __init__(self, save: str | None, tensorboard_dir: str | None, rank: int,
                 resume_iteration: int | None):
        self.active = rank == 0
        self.path = Path(save) / METRICS_FILE if save and self.active else None
        self.tensorboard = None
        if tensorboard_dir and self.active:  # its package: check_tensorboard, at start-up
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(tensorboard_dir)
        self.warning = None
        """The cut-off last line a resumed run dropped (read_metrics_file), to print."""
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_iteration is not None and self.path.is_file():
                rows, self.warning = read_metrics_file(self.path)
                for line, row in rows:
                    is_eval = any(name.startswith("eval/") for name in row)
                    # The resumed run evaluates again at its first iteration.
                    if row["iteration"] < resume_iteration or (
                            row["iteration"] == resume_iteration and not is_eval):
                        kept.append(line + "\n")
            try:
                write_text_atomically(self.path, "".join(kept), suffix=".tmp")
            except OSError as error:
                raise write_failed(self.path, error) from None

    def write(self, iteration: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        if self.path:
            row = {"iteration": iteration, **{k: json_number(v) for k, v in values.items()}}
            try:
                with self.path.open("a") as handle:
                    handle.write(json.dumps(row, allow_nan=False) + "\n")
            except OSError as error:
                raise write_failed(self.path, error) from None
        if self.tensorboard:
            for name, value in values.items():
                if value is not None:
                    self.tensorboard.add_scalar(name, value, iteration)
            self.tensorboard.flush()


def _tflops(value: float) -> str:
    """Megatron-LM's one decimal, or three significant digits below 1 (a small model's
    throughput is not 0.0)."""
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.3g}"


def at_interval(iteration: int, interval: int | None, last: int) -> bool:
    """The cadence rule of logs, evaluations and saves: every ``interval`` iterations (none
    when it is None or 0) and at the ``last`` one."""
    return iteration == last or bool(interval and iteration % interval == 0)


def pair_flops(config: ModelConfig, pairs: Sequence[TokenizedPair], indices: Sequence[int], *,
               share_prompt: bool = False) -> int:
    """Model FLOPs of a training step over these pairs (padding excluded; see flops.py): two
    rows per pair, or one shared-prompt row (``--share-prompt``: the prompt computed once)."""
    rows = [len(pairs[i].prompt) + len(response) - 1
            for i in indices for response in (pairs[i].chosen, pairs[i].rejected)]
    scored = sum(len(pairs[i].chosen) + len(pairs[i].rejected) for i in indices)
    shared = ([(len(pairs[i].prompt), len(pairs[i].chosen), len(pairs[i].rejected))
               for i in indices] if share_prompt else None)
    return step_flops(config, rows, scored, shared_pairs=shared)


@dataclass(frozen=True)
class StepRecord:
    """What one training step leaves to be recorded (``train._Session.step`` returns it)."""

    result: StepResult
    indices: tuple[int, ...]
    """The global batch's pairs (training-set indices)."""
    learning_rate: float
    """The rate the optimizer used for this step."""
    real_tokens: int
    """Tokens of the global batch, padding excluded."""
    padding_efficiency: float
    """Real positions computed / positions computed (padding included), over the global
    batch."""
    prompt_tokens_saved: int = 0
    """Prompt positions not computed thanks to shared-prompt rows, over the global batch."""


class LogWindow:
    """The steps since the last logged row; the row reports them all, as means.

    TRL averages its stored metrics over the logging window and Megatron-LM its losses over
    the log interval; so does a row here: the step metrics (``loss``, ``rewards/*``,
    ``logps/*``, ``nll_loss``, ...) are the mean over the window's steps that were not skipped
    (a skipped step's are non-finite; ``skipped`` counts those; with none left, null);
    ``iteration_time_s``, ``padding_efficiency`` and ``prompt_tokens_saved`` are the mean over
    all its steps, ``tokens_per_second`` and ``tflops_per_gpu`` its totals over its time.
    ``learning_rate``, ``grad_norm`` and ``consumed_samples`` are the last step's (Megatron-LM
    and TRL log the current step's grad norm; null when that step was skipped).
    """

    def __init__(self):
        self._steps: list[tuple[StepRecord, float, int]] = []

    def __bool__(self) -> bool:
        return bool(self._steps)

    def add(self, record: StepRecord, elapsed: float, flops: int) -> None:
        """A step, its wall-clock seconds and its model FLOPs (:func:`pair_flops`)."""
        self._steps.append((record, elapsed, flops))

    def close(self, consumed: int, world_size: int) -> dict[str, float]:
        """The metrics.jsonl row of the window's steps (without its iteration); the window is
        empty again."""
        steps, self._steps = self._steps, []
        last = steps[-1][0]
        good = [record.result.metrics for record, _, _ in steps
                if not record.result.skipped_non_finite]
        seconds = sum(elapsed for _, elapsed, _ in steps)
        n = len(steps)
        return {**{name: (sum(m[name] for m in good) / len(good) if good else math.nan)
                   for name in last.result.metrics},
                "learning_rate": last.learning_rate, "grad_norm": last.result.grad_norm,
                "consumed_samples": consumed, "iteration_time_s": seconds / n,
                "tokens_per_second": sum(r.real_tokens for r, _, _ in steps) / seconds,
                "padding_efficiency": sum(r.padding_efficiency for r, _, _ in steps) / n,
                "prompt_tokens_saved": sum(r.prompt_tokens_saved for r, _, _ in steps) / n,
                "tflops_per_gpu": sum(f for _, _, f in steps) / seconds / 1e12 / world_size,
                "skipped": sum(r.result.skipped_non_finite for r, _, _ in steps)}


def log_line(iteration: int, total: int, row: dict[str, float]) -> str:
    """The printed line of a :class:`LogWindow` row (Megatron-LM's: per-iteration time and
    throughput, and the losses, as the window's means)."""
    norm = "n/a" if row["grad_norm"] is None else f"{row['grad_norm']:.3f}"
    skipped = row["skipped"]
    return (f" iteration {iteration:8d}/{total:8d} | "
            f"consumed samples: {row['consumed_samples']:12d} | "
            f"elapsed time per iteration (ms): {1000 * row['iteration_time_s']:.1f} | "
            f"throughput per GPU (TFLOP/s/GPU): {_tflops(row['tflops_per_gpu'])} | "
            f"learning rate: {row['learning_rate']:.3E} | "
            f"loss: {row['loss']:.6E} | "
            f"reward accuracy: {row['rewards/accuracies']:.3f} | "
            f"reward margin: {row['rewards/margins']:.4f} | grad norm: {norm} | "
            f"tokens/s: {row['tokens_per_second']:.0f} | "
            f"padding efficiency: {row['padding_efficiency']:.3f} |" +
            (f" skipped: {skipped} (non-finite loss or gradient) |" if skipped else ""))
