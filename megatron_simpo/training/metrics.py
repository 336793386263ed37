"""What a run reports: metrics.jsonl (and TensorBoard), and the per-step log line."""

from __future__ import annotations

import json
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

__all__ = ["METRICS_FILE", "MetricsFileError", "MetricsWriter", "StepRecord", "at_interval",
           "pair_flops", "read_metrics_file"]

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

    def values(self, consumed: int, elapsed: float, tflops_per_gpu: float) -> dict[str, float]:
        """The metrics.jsonl row of the step (without its iteration)."""
        result = self.result
        return {**result.metrics, "learning_rate": self.learning_rate,
                "grad_norm": result.grad_norm, "consumed_samples": consumed,
                "iteration_time_s": elapsed,
                "tokens_per_second": self.real_tokens / elapsed,
                "padding_efficiency": self.padding_efficiency,
                "prompt_tokens_saved": self.prompt_tokens_saved,
                "tflops_per_gpu": tflops_per_gpu,
                "skipped": int(result.skipped_non_finite)}

    def log_line(self, iteration: int, total: int, consumed: int, elapsed: float,
                 tflops_per_gpu: float) -> str:
        """The printed line of the step."""
        result = self.result
        metrics, grad_norm = result.metrics, result.grad_norm
        norm = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
        return (f" iteration {iteration:8d}/{total:8d} | consumed samples: {consumed:12d} | "
                f"elapsed time per iteration (ms): {1000 * elapsed:.1f} | "
                f"throughput per GPU (TFLOP/s/GPU): {_tflops(tflops_per_gpu)} | "
                f"learning rate: {self.learning_rate:.3E} | "
                f"loss: {metrics['loss']:.6E} | "
                f"reward accuracy: {metrics['rewards/accuracies']:.3f} | "
                f"reward margin: {metrics['rewards/margins']:.4f} | grad norm: {norm} | "
                f"tokens/s: {self.real_tokens / max(elapsed, 1e-9):.0f} | "
                f"padding efficiency: {self.padding_efficiency:.3f} |" +
                (" skipped: non-finite loss or gradient |" if result.skipped_non_finite else ""))
