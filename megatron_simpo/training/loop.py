"""The training loop: data -> step -> log / evaluate / checkpoint, for SimPO or a baseline.

The parts it drives: run_setup (model source, early checks, the build), training_data (pairs,
order, micro-batches), step (one optimisation step), metrics (metrics.jsonl, the log line),
evaluator (held-out metrics and --eval-dump), checkpointer (resume and saves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

from megatron_simpo.distributed import runtime
from megatron_simpo.training.checkpointer import Checkpointer, RunFailed
from megatron_simpo.training.components import release
from megatron_simpo.training.config import TrainConfig
from megatron_simpo.training.eval_dump import drop_dumps_from
from megatron_simpo.training.evaluator import Evaluator
from megatron_simpo.training.guards import StepHealth
from megatron_simpo.distributed.lifecycle import StopRequests
from megatron_simpo.training.metrics import (LogWindow, MetricsWriter, StepRecord, at_interval,
                                             log_line, pair_flops)
from megatron_simpo.training.reference_logps import ReferenceLogps
from megatron_simpo.training.run_setup import ModelSource, build_from_config, prepare
from megatron_simpo.training.step import train_step
from megatron_simpo.training.training_data import TrainingData


@dataclass
class TrainSummary:
    """What a run did, on every rank (tests and the demo read it)."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    iteration: int = 0
    skipped_steps: int = 0
    stopped_early: str | None = None
    """Why the run saved and stopped before its last iteration (a signal, an exit option)."""


def load_data(config: TrainConfig, source: ModelSource) -> TrainingData:
    """The run's pairs, with the reference log-probs of --reference-logps attached."""
    data = TrainingData.load(config, source)
    path = config.reference_logps
    if not path:
        return data
    table = ReferenceLogps.load(path)
    table.check_reference(source.weights_from, path)
    return dataclasses.replace(
        data, train_reference=table.lookup(data.train_pairs, "training", path),
        valid_reference=table.lookup(data.valid_pairs, "validation", path))


def run(config: TrainConfig, prepared: tuple[ModelSource, int] | None = None,
        stop_requests: StopRequests | None = None) -> TrainSummary:
    """Train as configured; call on every rank (under torchrun or spawned).

    Args:
        stop_requests: the command's, already active (``before_training``: setup ends at once
            on a stop signal); default: stop signals are noted from the first step on.
    """
    source, num_microbatches = prepared or prepare(config)
    env = runtime.initialize(config.parallel, seed=config.seed, model_config=source.config)
    data = load_data(config, source)
    total_iters = config.train_iters or config.train_epochs * data.sampler.batches_per_epoch
    session = _Session(config, source, env, data, total_iters, num_microbatches)
    try:
        return _train_loop(config, session, data, total_iters, stop_requests)
    finally:
        release(session.parts)


def _train_loop(config: TrainConfig, session: _Session, data: TrainingData,
                total_iters: int, stop_requests: StopRequests | None) -> TrainSummary:
    iteration, consumed = session.start()
    if iteration >= total_iters:  # a finished run's command again (--load SAVE --save SAVE)
        session.say(f"> the run is complete: iteration {iteration} of {total_iters} is saved; "
                    "nothing to train (to train further: a larger --train-iters or "
                    "--train-epochs with --override-opt-param-scheduler, the learning-rate "
                    "schedule stretched to the new length)")
    health = StepHealth(config.max_skipped_steps)
    if stop_requests is None:
        stop_requests = StopRequests(config.exit_duration_in_mins, config.exit_interval)
        active = stop_requests
    else:
        active = contextlib.nullcontext()  # the command's, entered before setup
    with active:
        stop_requests.training_begins()
        while iteration < total_iters:
            start = time.perf_counter()
            record = session.step(data.sampler.global_batch(consumed))
            iteration, consumed = iteration + 1, consumed + config.global_batch_size
            session.record(iteration, consumed, record, time.perf_counter() - start)
            stop_run, warning = health.record(iteration, record.result.skipped_non_finite,
                                              record.result.grad_norm)
            session.say(warning)
            if stop_run:
                raise RunFailed(f"{stop_run}, {session.checkpointer.resume_hint()}")
            if session.evaluator.due(iteration):
                session.evaluate(iteration)
            stop = stop_requests.reason(iteration) if iteration < total_iters else None
            if session.checkpointer.due(iteration, stopping=bool(stop)):
                session.log(iteration, consumed)
                session.checkpointer.save(iteration, consumed, session.updated)
            if stop:
                session.log(iteration, consumed)  # the steps since the last row (no save)
                session.summary.stopped_early = stop
                session.say(f"> stopped at iteration {iteration}: {stop}")
                break
        stop_requests.training_ended()
    return session.finish(health)


class _Session:
    """A run's state and its actions (step, record, evaluate), so the loop above reads as the
    order of events."""

    def __init__(self, config: TrainConfig, source: ModelSource, env, data: TrainingData,
                 total_iters: int, num_microbatches: int):
        from megatron.core import parallel_state as ps

        self.config, self.source, self.env, self.data = config, source, env, data
        self.total_iters = total_iters
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), env.data_parallel_size
        layout = (f"micro-batches of up to {config.batching.max_tokens_per_microbatch} tokens"
                  f"{' (packed)' if config.batching.pack_sequences else ''}"
                  f"{' (shared prompts)' if config.batching.share_prompt else ''}"
                  if num_microbatches is None else
                  f"{num_microbatches} micro-batches of {config.micro_batch_size} per rank, "
                  f"{config.batching.batch_layout}")
        for message in data.messages:  # tokenized now, or the cache reused
            self.say(message)
        self.say(f"> {len(data.train_pairs)} training pairs, {len(data.valid_pairs)} validation "
                 f"pairs, {total_iters} iterations of {config.global_batch_size} pairs "
                 f"({layout}, DP={env.data_parallel_size})")
        for warning in data.warnings(config, self.dp_size):
            self.say(warning)
        self.parts = build_from_config(config, source, total_iters)
        self.evaluator = Evaluator(config, data, self.parts, total_iters, self.dp_rank,
                                   self.dp_size, env.device)
        self.checkpointer = Checkpointer(config, source, self.parts, data, total_iters,
                                         env.rank, self.say)

    def say(self, message: str | None) -> None:
        if message and self.env.rank == 0:
            print(message, flush=True)

    def start(self) -> tuple[int, int]:
        """Load the resumed state (or clear what --overwrite replaces); evaluate; returns
        (iteration, consumed samples)."""
        state = self.checkpointer.resume()
        resumed = self.source.resume_from is not None
        # metrics and dumps go on in --save where the run resumes its own checkpoint there
        goes_on = state.iteration if self.checkpointer.continues_in_save else None
        self.writer = MetricsWriter(self.config.save, self.config.tensorboard_dir, self.env.rank,
                                    goes_on)
        self.say(self.writer.warning)
        if self.config.save and self.env.rank == 0:
            drop_dumps_from(self.config.save, goes_on or 0)
        self.summary = TrainSummary(iteration=state.iteration)
        self.window = LogWindow()
        # Whether the optimizer has state to save: not before its first update of a new run.
        self.updated = resumed
        self.evaluate(state.iteration)
        return state.iteration, state.consumed_samples

    def step(self, indices: list[int]) -> StepRecord:
        """One optimisation step over the global batch ``indices``."""
        microbatches, plan = self.data.train_microbatches(
            indices, self.config, self.dp_rank, self.dp_size, self.env.device)
        learning_rate = self.parts.optimizer.param_groups[0]["lr"]
        result = train_step([self.parts.model], self.parts.optimizer, microbatches,
                            self.config.loss, head=self.parts.head,
                            reference_model=self.parts.reference)
        if not result.skipped_non_finite:  # a skipped step leaves the schedule where it was
            self.parts.scheduler.step(increment=1)
            self.updated = True
        return StepRecord(result, tuple(indices), learning_rate, plan.real_tokens,
                          plan.padding_efficiency, plan.saved_tokens)

    def record(self, iteration: int, consumed: int, record: StepRecord, elapsed: float) -> None:
        """Into the summary and the logging window; the window's row (its steps' means,
        metrics.LogWindow) to the metrics and the log every --log-interval iterations, at the
        last one, and at every skipped step."""
        result = record.result
        self.summary.losses.append(result.metrics["loss"])
        self.summary.iteration = iteration
        self.summary.skipped_steps += int(result.skipped_non_finite)
        # Model FLOPs of SimPO's work (a reference model's pass not counted).
        # The model as built (ModelConfig.for_rows): a window no row outgrows is left out.
        self.window.add(record, elapsed, pair_flops(
            self.source.config.for_rows(self.config.data.seq_length), self.data.train_pairs,
            record.indices, share_prompt=self.config.batching.share_prompt))
        if (at_interval(iteration, self.config.log_interval, self.total_iters)
                or result.skipped_non_finite):
            self.log(iteration, consumed)

    def log(self, iteration: int, consumed: int) -> None:
        """The row of the steps since the last one, if any (also before a save: a run resumed
        from it logs every step once, metrics.jsonl having dropped the rows after it)."""
        if not self.window:
            return
        values = self.window.close(consumed, self.env.world_size)
        self.writer.write(iteration, values)
        self.say(log_line(iteration, self.total_iters, values))

    def evaluate(self, at: int) -> None:
        metrics = self.evaluator(at)
        if metrics is None:
            return
        self.summary.evals.append((at, metrics))
        self.writer.write(at, metrics)
        self.say(f" validation at iteration {at:8d} | " +
                 " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()) + " |")

    def finish(self, health: StepHealth) -> TrainSummary:
        evals = self.summary.evals
        if len(evals) > 1:
            (first_at, first), (last_at, last) = evals[0], evals[-1]
            key = "eval/rewards/accuracies"
            self.say(f"> held-out reward accuracy: {first[key]:.3f} at iteration {first_at} -> "
                     f"{last[key]:.3f} at iteration {last_at}")
        if health.skipped_total:
            self.say(f"> {health.skipped_total} step(s) skipped for non-finite values")
        return self.summary
