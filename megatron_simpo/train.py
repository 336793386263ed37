"""The training loop: data -> step -> log / evaluate / checkpoint, for SimPO or a baseline."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_simpo import checkpointing, runtime
from megatron_simpo.architecture import ModelConfig
from megatron_simpo.components import (TrainingComponents, build_components,
                                       build_reference, release)
from megatron_simpo.config import TrainConfig
from megatron_simpo.batching import BatchPlan, Microbatch, PairLengths, plan_global_batch
from megatron_simpo.data import (DataError, PairSampler, PreferenceBatch, TokenizedPair,
                                 collate_microbatch, length_statistics, load_tokenizer)
from megatron_simpo.data_cache import prepare_data
from megatron_simpo.flops import step_flops
from megatron_simpo.guards import StepHealth, finite_everywhere, json_number, parameters
from megatron_simpo.lifecycle import StopRequests, die_with_parent
from megatron_simpo.model import check_packed_attention, check_transformer_impl
from megatron_simpo.optimizer import finish_param_sync
from megatron_simpo.precision import check_fp8_support, padding_multiple
from megatron_simpo.reference_logps import ReferenceLogps, interleaved
from megatron_simpo.step import evaluate, sequence_logp_sums, train_step


METRICS_FILE = "metrics.jsonl"


class RunFailed(RuntimeError):
    """The run cannot go on for a reason the user must act on (one line, exit code 3)."""


@dataclass
class TrainSummary:
    """What a run did, on every rank (tests and the demo read it)."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    iteration: int = 0
    skipped_steps: int = 0
    stopped_early: str | None = None
    """Why the run saved and stopped before its last iteration (a signal, an exit option)."""


@dataclass(frozen=True)
class ModelSource:
    config: ModelConfig
    resume_from: Path | None
    weights_from: Path | None
    tokenizer_path: Path


def resolve_model_source(config: TrainConfig) -> ModelSource:
    """Which architecture, weights and tokenizer the run uses (before anything is built)."""
    resume = checkpointing.find_checkpoint(config.load, "--load") if config.load else None
    pretrained = (checkpointing.find_checkpoint(config.pretrained_checkpoint,
                                                "--pretrained-checkpoint")
                  if config.pretrained_checkpoint else None)
    if resume is not None:
        model_config = checkpointing.read_model_config(resume)
    elif pretrained is not None:
        model_config = checkpointing.read_model_config(pretrained)
    else:
        model_config = ModelConfig.from_hf_config(config.model_config_path)
    tokenizer = config.data.tokenizer_path
    if tokenizer is None:
        source = resume or pretrained
        tokenizer = checkpointing.checkpoint_assets(source).get("tokenizer")
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer saved with {source}; give --tokenizer")
    if config.data.seq_length > model_config.max_position_embeddings:
        raise ValueError(f"--seq-length ({config.data.seq_length}) exceeds the model's maximum "
                         f"sequence length ({model_config.max_position_embeddings})")
    return ModelSource(model_config, resume, pretrained, Path(tokenizer))


def _pair_flops(config: ModelConfig, pairs: list[TokenizedPair], indices: list[int]) -> int:
    """Model FLOPs of a training step over these pairs (padding excluded; see flops.py)."""
    rows = [len(pairs[i].prompt) + len(response) - 1
            for i in indices for response in (pairs[i].chosen, pairs[i].rejected)]
    scored = sum(len(pairs[i].chosen) + len(pairs[i].rejected) for i in indices)
    return step_flops(config, rows, scored)


class MetricsWriter:
    """Rank 0 writes metrics.jsonl (and TensorBoard events when asked and installed).

    Every line is strict JSON (a non-finite value is written as null). A resumed run first drops
    the lines of iterations after the one it resumes from (written after that checkpoint by the
    interrupted run, and about to be written again), so no iteration appears twice.
    """

    def __init__(self, config: TrainConfig, rank: int, resume_iteration: int | None):
        self.active = rank == 0
        self.path = Path(config.save) / METRICS_FILE if config.save and self.active else None
        self.tensorboard = None
        if config.tensorboard_dir and self.active:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError("--tensorboard-dir needs the tensorboard package "
                                   "(pip install tensorboard)") from error
            self.tensorboard = SummaryWriter(config.tensorboard_dir)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_iteration is not None and self.path.is_file():
                for line in self.path.read_text().splitlines():
                    row = json.loads(line)
                    is_eval = any(name.startswith("eval/") for name in row)
                    # The resumed run evaluates again at its first iteration.
                    if row["iteration"] < resume_iteration or (
                            row["iteration"] == resume_iteration and not is_eval):
                        kept.append(line + "\n")
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text("".join(kept))
            os.replace(temporary, self.path)

    def write(self, iteration: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        if self.path:
            row = {"iteration": iteration, **{k: json_number(v) for k, v in values.items()}}
            with self.path.open("a") as handle:
                handle.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tensorboard:
            for name, value in values.items():
                if value is not None:
                    self.tensorboard.add_scalar(name, value, iteration)
            self.tensorboard.flush()


def _log_line(iteration: int, total: int, consumed: int, lr: float, metrics: dict,
              grad_norm, elapsed: float, tokens: int, tflops_per_gpu: float,
              padding_efficiency: float, skipped: bool = False) -> str:
    norm = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
    return (f" iteration {iteration:8d}/{total:8d} | consumed samples: {consumed:12d} | "
            f"elapsed time per iteration (ms): {1000 * elapsed:.1f} | "
            f"throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.1f} | learning rate: {lr:.3E} | "
            f"loss: {metrics['loss']:.6E} | reward accuracy: {metrics['rewards/accuracies']:.3f} | "
            f"reward margin: {metrics['rewards/margins']:.4f} | grad norm: {norm} | "
            f"tokens/s: {tokens / max(elapsed, 1e-9):.0f} | "
            f"padding efficiency: {padding_efficiency:.3f} |" +
            (" skipped: non-finite loss or gradient |" if skipped else ""))


def prepare(config: TrainConfig) -> tuple[ModelSource, int]:
    """Every check that can fail before training: model source, world layout, batch sizes.

    Returns the model source and the number of micro-batches per step and rank.
    """
    source = resolve_model_source(config)
    _, world_size, _ = runtime.read_world()
    config.parallel.validate(world_size, source.config)
    if config.fp8 is not None:
        config.fp8.check_model(source.config.num_layers,
                               config.parallel.pipeline_model_parallel_size)
    check_transformer_impl(config.transformer_impl)  # then what the machine has
    if config.batching.pack_sequences:
        check_packed_attention(config.transformer_impl)
    if config.fp8 is not None:
        check_fp8_support(config.fp8)
    if config.save:
        check_save_folder(config, source)
    return source, config.check_world(world_size)


def check_save_folder(config: TrainConfig, source: ModelSource) -> None:
    """Refuse to write over another run: a new run needs an empty --save (or --overwrite),
    and a resumed one must not find iterations there beyond the one it resumes from."""
    save = Path(config.save)
    saved = checkpointing.saved_iterations(save)
    resumed = checkpointing.read_train_iteration(source.resume_from) if source.resume_from else None
    if resumed is None:
        found = [str(save / name) for name in (checkpointing.TRACKER_FILE, METRICS_FILE)
                 if (save / name).exists()]
        found += [str(checkpointing.iteration_dir(save, i)) for i in saved]
        if found and not config.overwrite:
            raise ValueError(f"--save {save} already holds a run ({', '.join(found[:3])}"
                             f"{', ...' if len(found) > 3 else ''}): resume it with --load "
                             f"{save}, or give --overwrite to replace it")
        return
    later = [i for i in saved if i > resumed]
    if later and not config.overwrite:
        raise ValueError(f"--save {save} holds iterations after the resumed one ({resumed}): "
                         f"{', '.join(map(str, later))}; resuming would overwrite them. Save "
                         "elsewhere, or give --overwrite")


@dataclass(frozen=True)
class Cadence:
    """When the loop logs, evaluates and saves: the one place that decides it."""

    total_iters: int
    log_interval: int
    eval_interval: int | None
    save_interval: int | None
    saving: bool

    @classmethod
    def of(cls, config: TrainConfig, total_iters: int) -> "Cadence":
        return cls(total_iters, config.log_interval, config.eval_interval, config.save_interval,
                   saving=bool(config.save))

    def _every(self, interval: int | None, iteration: int) -> bool:
        return iteration == self.total_iters or bool(interval and iteration % interval == 0)

    def log(self, iteration: int) -> bool:
        return self._every(self.log_interval, iteration)

    def evaluate(self, iteration: int) -> bool:
        """At the interval and at the end (and, outside this, at the start of every run)."""
        return self._every(self.eval_interval, iteration)

    def save(self, iteration: int) -> bool:
        return self.saving and self._every(self.save_interval, iteration)


def _load_pretrained(source: ModelSource):
    def load(model):
        checkpointing.load_checkpoint(source.weights_from, model, model_config=source.config)
    return load


def _model_settings(config: TrainConfig) -> dict:
    """What the policy and the reference share: precision, layers, log-prob path."""
    return dict(params_dtype=torch.bfloat16 if config.bf16 else torch.float32,
                transformer_impl=config.transformer_impl,
                logprob_chunk_size=config.logprob_chunk_size)


def _reference_overrides(config: TrainConfig) -> dict | None:
    # Same precision as the policy (FP8 included); nothing to recompute without gradients.
    return config.fp8.transformer_overrides() if config.fp8 else None


def build_from_config(config: TrainConfig, source: ModelSource, total_iters: int
                      ) -> TrainingComponents:
    """The run's model, optimizer, schedule and (dpo, ipo, rdpo) reference, weights from the
    checkpoint the source names (a resumed run's weights are loaded later, with the optimizer
    state)."""
    load_pretrained = _load_pretrained(source)
    return build_components(
        source.config, config.parallel, config.optimizer, **_model_settings(config),
        transformer_overrides=config.transformer_overrides(),
        reference_overrides=_reference_overrides(config),
        load_policy=load_pretrained if source.resume_from is None and source.weights_from else None,
        with_reference=config.needs_reference_model, load_reference=load_pretrained,
        total_iters=total_iters)


def build_reference_from_config(config: TrainConfig, source: ModelSource):
    """The run's frozen reference model alone (megatron-simpo-reference-logps)."""
    return build_reference(source.config, config.parallel, **_model_settings(config),
                           overrides=_reference_overrides(config),
                           load=_load_pretrained(source))


def run(config: TrainConfig, prepared: tuple[ModelSource, int] | None = None) -> TrainSummary:
    """Train as configured; call on every rank (under torchrun or spawned)."""
    source, num_microbatches = prepared or prepare(config)
    env = runtime.initialize(config.parallel, seed=config.seed, model_config=source.config)
    data = TrainingData.load(config, source)
    total_iters = config.train_iters or config.train_epochs * data.sampler.batches_per_epoch
    session = _Session(config, source, env, data, total_iters, num_microbatches)
    try:
        return _train_loop(config, session, data, total_iters)
    finally:
        release(session.parts)


def _train_loop(config: TrainConfig, session: _Session, data: TrainingData,
                total_iters: int) -> TrainSummary:
    iteration, consumed = session.start()
    cadence = Cadence.of(config, total_iters)
    health = StepHealth(config.max_skipped_steps)
    with StopRequests(config.exit_duration_in_mins, config.exit_interval) as stop_requests:
        while iteration < total_iters:
            start = time.perf_counter()
            indices = data.sampler.global_batch(consumed)
            result = session.step(indices)
            iteration, consumed = iteration + 1, consumed + config.global_batch_size
            session.record(iteration, consumed, indices, result, time.perf_counter() - start,
                           log=cadence.log(iteration))
            stop_run, warning = health.record(iteration, result.skipped_non_finite,
                                              result.grad_norm)
            session.say(warning)
            if stop_run:
                raise RunFailed(stop_run)
            if cadence.evaluate(iteration):
                session.evaluate(iteration)
            stop = stop_requests.reason(iteration) if iteration < total_iters else None
            if cadence.save(iteration) or (stop and config.save):
                session.save(iteration, consumed)
            if stop:
                session.summary.stopped_early = stop
                session.say(f"> stopped at iteration {iteration}: {stop}")
                break
    return session.finish(health)


class _Session:
    """A run's state and its actions (step, log, evaluate, save), so the loop above reads
    as the order of events."""

    def __init__(self, config: TrainConfig, source: ModelSource, env, data: "TrainingData",
                 total_iters: int, num_microbatches: int):
        from megatron.core import parallel_state as ps

        self.config, self.source, self.env, self.data = config, source, env, data
        self.total_iters, self.num_microbatches = total_iters, num_microbatches
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), env.data_parallel_size
        layout = (f"micro-batches of up to {config.batching.max_tokens_per_microbatch} tokens"
                  f"{' (packed)' if config.batching.pack_sequences else ''}"
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
        self.step_options = dict(vocab_size=source.config.vocab_size,
                                 reference_model=self.parts.reference,
                                 logprob_chunk_size=self.parts.logprob_chunk_size)
        self.eval_batches, self.eval_pairs = data.eval_microbatches(config, self.dp_rank,
                                                                    self.dp_size, env.device)

    def say(self, message: str | None) -> None:
        if message and self.env.rank == 0:
            print(message, flush=True)

    def start(self) -> tuple[int, int]:
        """Load the resumed state (or clear what --overwrite replaces); evaluate; returns
        (iteration, consumed samples)."""
        state = checkpointing.TrainState(0, 0)
        if self.source.resume_from is not None:
            self._check_data(checkpointing.read_train_state(self.source.resume_from))
            state = checkpointing.load_checkpoint(
                self.source.resume_from, self.parts.model.module, self.parts.optimizer,
                self.parts.scheduler, model_config=self.source.config)
            self.say(f"> resumed from {self.source.resume_from} at iteration {state.iteration}")
        if self.config.save and self.config.overwrite and self.env.rank == 0:
            checkpointing.remove_iterations_after(self.config.save, state.iteration)
        dist.barrier()
        self.writer = MetricsWriter(self.config, self.env.rank,
                                    state.iteration if self.source.resume_from else None)
        self.summary = TrainSummary(iteration=state.iteration)
        # Whether the optimizer has state to save: not before its first update of a new run.
        self.updated = self.source.resume_from is not None
        self.evaluate(state.iteration)
        return state.iteration, state.consumed_samples

    def _check_data(self, saved: checkpointing.TrainState | None) -> None:
        """Refuse to resume on other data than the checkpoint's, unless --override-data."""
        if saved is None or saved.data_fingerprint in (None, self.data.fingerprint):
            return
        if not self.config.override_data:
            raise DataError(f"--load {self.source.resume_from} was trained on other data "
                            f"(fingerprint {saved.data_fingerprint}, now {self.data.fingerprint}:"
                            " the data's content, its split or columns, the tokenizer, "
                            "--seq-length, --max-prompt-length or the held-out split changed); "
                            "give --override-data to go on from its position "
                            f"({saved.consumed_samples} samples) in the new data")
        self.say(f"warning: --override-data: resuming {self.source.resume_from} on other data "
                 f"than it was trained on (fingerprint {saved.data_fingerprint}, now "
                 f"{self.data.fingerprint})")

    def step(self, indices: list[int]):
        microbatches, self.plan = self.data.train_microbatches(
            indices, self.config, self.dp_rank, self.dp_size, self.env.device)
        self.lr = self.parts.optimizer.param_groups[0]["lr"]
        result = train_step([self.parts.model], self.parts.optimizer, microbatches,
                            self.config.loss, **self.step_options)
        if not result.skipped_non_finite:  # a skipped step leaves the schedule where it was
            self.parts.scheduler.step(increment=1)
            self.updated = True
        return result

    def record(self, iteration: int, consumed: int, indices: list[int], result, elapsed: float,
               *, log: bool) -> None:
        self.summary.losses.append(result.metrics["loss"])
        self.summary.iteration = iteration
        self.summary.skipped_steps += int(result.skipped_non_finite)
        if not log and not result.skipped_non_finite:
            return
        pairs = self.data.train_pairs
        tokens = self.plan.real_tokens
        # Model FLOPs of SimPO's work (a reference model's pass not counted) per rank.
        tflops = _pair_flops(self.source.config, pairs, indices) / elapsed / 1e12 / self.env.world_size
        self.writer.write(iteration, {**result.metrics, "learning_rate": self.lr,
                                      "grad_norm": result.grad_norm, "consumed_samples": consumed,
                                      "iteration_time_s": elapsed,
                                      "tokens_per_second": tokens / elapsed,
                                      "padding_efficiency": self.plan.padding_efficiency,
                                      "tflops_per_gpu": tflops,
                                      "skipped": int(result.skipped_non_finite)})
        self.say(_log_line(iteration, self.total_iters, consumed, self.lr, result.metrics,
                           result.grad_norm, elapsed, tokens, tflops, self.plan.padding_efficiency,
                           result.skipped_non_finite))

    def evaluate(self, at: int) -> None:
        if not self.eval_batches:
            return
        metrics = evaluate([self.parts.model], self.eval_batches, self.config.loss,
                           **self.step_options)
        metrics = {f"eval/{name}": value for name, value in metrics.items()}
        self.summary.evals.append((at, metrics))
        self.writer.write(at, metrics)
        if self.config.eval_dump:
            self.dump_eval(at)
        self.say(f" validation at iteration {at:8d} | " +
                 " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()) + " |")

    def dump_eval(self, at: int) -> None:
        """<save>/eval_dump/iter_NNNNNNN.jsonl: one line per held-out pair (its index in the
        validation set): summed and average log-probs, response lengths, rewards and margin
        under the run's objective. A forward pass of its own, after evaluate()."""
        from megatron.core import parallel_state as ps

        from megatron_simpo.losses import preference_loss

        options = dict(vocab_size=self.source.config.vocab_size,
                       logprob_chunk_size=self.parts.logprob_chunk_size)
        sums = sequence_logp_sums(self.parts.model, self.eval_batches, **options)
        references = [batch.reference_logp_sum for batch in self.eval_batches]
        if self.parts.reference is not None:
            references = sequence_logp_sums(self.parts.reference, self.eval_batches, **options)
        rows = []
        if sums and ps.get_tensor_model_parallel_rank() == 0:  # the last stage holds them
            pairs = self.data.valid_pairs
            for indices, logps, reference in zip(self.eval_pairs, sums, references):
                logps = logps.double().cpu().view(-1, 2)
                counts = torch.tensor([[len(pairs[i].chosen), len(pairs[i].rejected)]
                                       for i in indices], dtype=torch.float64)
                ref = None if reference is None else reference.double().cpu().view(-1, 2)
                _, metrics = preference_loss(
                    logps[:, 0], counts[:, 0], logps[:, 1], counts[:, 1], self.config.loss,
                    None if ref is None else ref[:, 0], None if ref is None else ref[:, 1])
                for k, index in enumerate(indices):
                    rows.append({"pair": index,
                                 "chosen_logp_sum": logps[k, 0].item(),
                                 "rejected_logp_sum": logps[k, 1].item(),
                                 "chosen_tokens": int(counts[k, 0]),
                                 "rejected_tokens": int(counts[k, 1]),
                                 "chosen_logp_mean": (logps[k, 0] / counts[k, 0]).item(),
                                 "rejected_logp_mean": (logps[k, 1] / counts[k, 1]).item(),
                                 "reward_chosen": metrics["rewards/chosen"][k].item(),
                                 "reward_rejected": metrics["rewards/rejected"][k].item(),
                                 "reward_margin": metrics["rewards/margins"][k].item(),
                                 **({} if ref is None else {
                                     "reference_chosen_logp_sum": ref[k, 0].item(),
                                     "reference_rejected_logp_sum": ref[k, 1].item()})})
        gathered = [None] * self.env.world_size if self.env.rank == 0 else None
        dist.gather_object(rows, gathered, dst=0)
        if self.env.rank == 0:
            folder = Path(self.config.save) / "eval_dump"
            folder.mkdir(parents=True, exist_ok=True)
            ordered = sorted((row for part in gathered for row in part), key=lambda r: r["pair"])
            path = folder / f"iter_{at:07d}.jsonl"
            partial = path.with_name(path.name + ".partial")
            partial.write_text("".join(json.dumps(row) + "\n" for row in ordered))
            os.replace(partial, path)

    def save(self, iteration: int, consumed: int) -> None:
        parts, source = self.parts, self.source
        if not self.updated:  # every step so far was skipped: the start point is all there is
            self.say(f"> no checkpoint at iteration {iteration}: no step has updated the "
                     "weights yet")
            return
        finish_param_sync([parts.model])
        if not finite_everywhere(parameters([parts.model])):
            raise RunFailed(f"refusing to save iteration {iteration}: the weights hold NaN/inf "
                            f"values; the last checkpoint in {self.config.save} stays the latest")
        source_dir = source.weights_from or source.resume_from
        source_assets = checkpointing.checkpoint_assets(source_dir) if source_dir else {}
        path = checkpointing.save_checkpoint(
            self.config.save, checkpointing.TrainState(iteration, consumed, self.data.fingerprint),
            parts.model.module,
            parts.optimizer, parts.scheduler, source.config,
            assets={**source_assets, "tokenizer": source.tokenizer_path})
        self.say(f"> saved checkpoint {path}")

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


@dataclass
class TrainingData:
    """The tokenized pairs, their order, and how a global batch becomes this rank's batches."""

    train_pairs: Sequence[TokenizedPair]
    """A data_cache.PairTable: memory-mapped, read pair by pair."""
    valid_pairs: Sequence[TokenizedPair]
    pad_id: int
    sampler: PairSampler
    padding_multiple: int
    dropped: list[str] = field(default_factory=list)
    """Rows left out because their two responses are the same tokens (file:line)."""
    cut: dict[str, int] = field(default_factory=lambda: {"prompts": 0, "responses": 0})
    """Prompts cut on the left (--max-prompt-length), responses on the right (--seq-length)."""
    train_reference: torch.Tensor | None = None
    """[n_train, 2] precomputed reference log-prob sums (chosen, rejected), --reference-logps."""
    valid_reference: torch.Tensor | None = None
    """[n_valid, 2] the same for the validation pairs."""
    fingerprint: str | None = None
    """Identity of the training data (saved in checkpoints, checked on resume)."""
    messages: list[str] = field(default_factory=list)
    """How the data was prepared (tokenized now, or the cache reused)."""

    @classmethod
    def load(cls, config: TrainConfig, source: ModelSource) -> "TrainingData":
        tokenizer = load_tokenizer(source.tokenizer_path)
        if len(tokenizer) > source.config.vocab_size:
            raise ValueError(f"tokenizer {source.tokenizer_path} has {len(tokenizer)} tokens, "
                             f"more than the model's vocabulary ({source.config.vocab_size})")
        prepared = prepare_data(config.data, tokenizer, source.tokenizer_path, config.seed)
        train_pairs, valid_pairs = prepared.train, prepared.valid
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        references = [None, None]
        if config.reference_logps:
            table = ReferenceLogps.load(config.reference_logps)
            table.check_reference(source.weights_from, config.reference_logps)
            references = [table.lookup(pairs, what, config.reference_logps)
                          for pairs, what in ((train_pairs, "training"),
                                              (valid_pairs, "validation"))]
        return cls(train_pairs, valid_pairs, pad_id,
                   PairSampler(len(train_pairs), config.global_batch_size, config.seed),
                   padding_multiple(config.sequence_alignment), prepared.dropped, prepared.cut,
                   *references, fingerprint=prepared.fingerprint, messages=prepared.messages)

    def warnings(self, config: TrainConfig, dp_size: int) -> list[str]:
        """What the user should know about the data before training starts."""
        found = [f"> training data: {len(self.train_pairs)} pairs, "
                 f"{length_statistics(self.train_pairs)}; {self.cut['prompts']} prompt(s) cut on "
                 f"the left (--max-prompt-length), {self.cut['responses']} response(s) on the "
                 f"right (--seq-length); {len(self.dropped)} pair(s) dropped"]
        if self.dropped:
            found.append(f"warning: {len(self.dropped)} pair(s) dropped: chosen and rejected are "
                         f"the same tokens (first: {', '.join(self.dropped[:3])}); "
                         "--identical-pairs refuse stops on them instead")
        usable = self.usable_valid_pairs(config, dp_size)
        per_step = (config.micro_batch_size or 1) * dp_size
        if self.valid_pairs and usable == 0:
            found.append(f"warning: the validation set has {len(self.valid_pairs)} pair(s), fewer "
                         f"than one micro-batch per data-parallel rank ({per_step}): no "
                         "evaluation")
        elif usable < len(self.valid_pairs):
            found.append(f"warning: {len(self.valid_pairs) - usable} of "
                         f"{len(self.valid_pairs)} validation pairs are left out of evaluation "
                         f"(it uses whole micro-batches of {per_step} across the ranks)")
        return found

    def plan(self, pairs: list[TokenizedPair], indices: list[int], config: TrainConfig,
             dp_size: int) -> BatchPlan:
        """How these pairs run on the data-parallel ranks (megatron_simpo.batching)."""
        return plan_global_batch(indices, [PairLengths.of(pairs[i]) for i in indices], dp_size=dp_size,
                                 micro_batch_size=config.micro_batch_size or 1,
                                 config=config.batching, seq_length=config.data.seq_length,
                                 multiple=self.padding_multiple)

    def collate(self, pairs: list[TokenizedPair], microbatch: Microbatch, config: TrainConfig,
                device, reference: torch.Tensor | None) -> PreferenceBatch:
        """One micro-batch as tensors on ``device``; packed rows carry a block-diagonal mask
        for the local layer spec and THD segments for Transformer Engine."""
        batch = collate_microbatch(pairs, microbatch, self.pad_id,
                                   attention_mask=config.transformer_impl == "local")
        if reference is not None:  # fp32, as the reference pass computes them
            batch = batch.with_reference(interleaved(reference[list(microbatch.pairs)]).float())
        return batch.to(device)

    def train_microbatches(self, indices: list[int], config: TrainConfig, dp_rank: int,
                           dp_size: int, device) -> tuple[list[PreferenceBatch], BatchPlan]:
        """This rank's micro-batches of a global batch, and the plan of the whole batch."""
        plan = self.plan(self.train_pairs, indices, config, dp_size)
        return [self.collate(self.train_pairs, mb, config, device, self.train_reference)
                for mb in plan.ranks[dp_rank]], plan

    def usable_valid_pairs(self, config: TrainConfig, dp_size: int) -> int:
        """Validation pairs evaluated: all under a token budget, else whole micro-batches
        on every rank."""
        if config.batching.token_budget:
            return len(self.valid_pairs) if len(self.valid_pairs) >= dp_size else 0
        chunk = config.micro_batch_size * dp_size
        return len(self.valid_pairs) // chunk * chunk

    def eval_microbatches(self, config: TrainConfig, dp_rank: int, dp_size: int, device
                          ) -> tuple[list[PreferenceBatch], list[tuple[int, ...]]]:
        """This rank's share of the validation pairs, laid out as the training batches are,
        and the validation indices of each micro-batch's pairs."""
        usable = self.usable_valid_pairs(config, dp_size)
        if usable == 0:
            return [], []
        plan = self.plan(self.valid_pairs, list(range(usable)), config, dp_size)
        mine = plan.ranks[dp_rank]
        return ([self.collate(self.valid_pairs, mb, config, device, self.valid_reference)
                 for mb in mine], [tuple(mb.pairs) for mb in mine])


def main(argv=None) -> None:
    """CLI entry point. A user's mistake (flags, data, checkpoints, disk) ends in one
    ``train_simpo: error: ...`` line from rank 0 and exit code 2; a run that cannot go on
    (non-finite steps, unsavable weights) in one such line and exit code 3."""
    from megatron_simpo.arguments import PROG, parse_args
    from megatron_simpo.flags import run_command

    config = parse_args(argv)
    prepared = run_command(PROG, lambda: prepare(config),
                           errors={(ValueError, FileNotFoundError, RuntimeError): 2})
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun: never outlive its agent
        die_with_parent()
    run_command(PROG, lambda: run(config, prepared), distributed=True,
                errors={RunFailed: 3, (checkpointing.CheckpointError, DataError): 2})


if __name__ == "__main__":  # the guard matters: dist checkpointing spawns helper processes
    main()
