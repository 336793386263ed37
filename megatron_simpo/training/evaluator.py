"""Held-out evaluation during a run: when it happens, its metrics, and --eval-dump."""

from __future__ import annotations

from megatron_simpo.training.components import TrainingComponents
from megatron_simpo.training.config import TrainConfig
from megatron_simpo.training.eval_dump import write_eval_dump
from megatron_simpo.training.metrics import at_interval
from megatron_simpo.training.step import evaluate
from megatron_simpo.training.training_data import TrainingData


class Evaluator:
    """Evaluates the policy on this rank's share of the validation pairs (laid out as the
    training batches are): at the start of every run, every --eval-interval iterations and at
    the last one. With --eval-dump each pair's values go to <save>/eval_dump/, from the same
    forward pass."""

    def __init__(self, config: TrainConfig, data: TrainingData, parts: TrainingComponents,
                 total_iters: int, dp_rank: int, dp_size: int, device):
        self.config, self.parts, self.total_iters = config, parts, total_iters
        self.valid_pairs = data.valid_pairs
        self.options = dict(head=parts.head, reference_model=parts.reference)
        self.batches, self.batch_pairs = data.eval_microbatches(config, dp_rank, dp_size,
                                                                device)

    def due(self, iteration: int) -> bool:
        """At the interval and at the end (the start of a run is the loop's call)."""
        return at_interval(iteration, self.config.eval_interval, self.total_iters)

    def __call__(self, at: int) -> dict[str, float] | None:
        """The ``eval/...`` metrics at iteration ``at`` (every rank), None without validation
        pairs; writes the dump when asked."""
        if not self.batches:
            return None
        evaluation = evaluate([self.parts.model], self.batches, self.config.loss,
                              **self.options)
        if self.config.eval_dump:
            write_eval_dump(self.config.save, at, evaluation, self.batch_pairs,
                            self.valid_pairs, self.config.loss)
        return {f"eval/{name}": value for name, value in evaluation.metrics.items()}
