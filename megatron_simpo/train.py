"""The training loop: data -> step -> log / evaluate / checkpoint, for SimPO or DPO."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_simpo import checkpointing, runtime
from megatron_simpo.architecture import ModelConfig
from megatron_simpo.components import TrainingComponents, build_components
from megatron_simpo.config import TrainConfig
from megatron_simpo.data import (PairSampler, PreferenceBatch, TokenizedPair, collate_pairs,
                                 load_datasets, load_tokenizer, padded_length)
from megatron_simpo.flops import step_flops
from megatron_simpo.model import check_transformer_impl
from megatron_simpo.optimizer import finish_param_sync
from megatron_simpo.precision import check_fp8_support, padding_multiple
from megatron_simpo.step import evaluate, train_step


@dataclass
class TrainSummary:
    """What a run did, on every rank (tests and the demo read it)."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    iteration: int = 0


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
        tokenizer = source.parent / "tokenizer"
        if not tokenizer.is_dir():
            raise FileNotFoundError(f"no tokenizer next to {source}; give --tokenizer")
    if config.data.seq_length > model_config.max_position_embeddings:
        raise ValueError(f"--seq-length ({config.data.seq_length}) exceeds the model's maximum "
                         f"sequence length ({model_config.max_position_embeddings})")
    return ModelSource(model_config, resume, pretrained, Path(tokenizer))


def _pair_tokens(pairs: list[TokenizedPair], indices: list[int]) -> int:
    return sum(2 * len(pairs[i].prompt) + len(pairs[i].chosen) + len(pairs[i].rejected) - 2
               for i in indices)


def _pair_flops(config: ModelConfig, pairs: list[TokenizedPair], indices: list[int]) -> int:
    """Model FLOPs of a training step over these pairs (padding excluded; see flops.py)."""
    rows = [len(pairs[i].prompt) + len(response) - 1
            for i in indices for response in (pairs[i].chosen, pairs[i].rejected)]
    scored = sum(len(pairs[i].chosen) + len(pairs[i].rejected) for i in indices)
    return step_flops(config, rows, scored)


class MetricsWriter:
    """Rank 0 writes metrics.jsonl (and TensorBoard events when asked and installed)."""

    def __init__(self, config: TrainConfig, rank: int, resuming: bool):
        self.active = rank == 0
        self.path = Path(config.save) / "metrics.jsonl" if config.save and self.active else None
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
            if not resuming:  # a fresh run starts a fresh file; a resumed one appends
                self.path.write_text("")

    def write(self, iteration: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        if self.path:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"iteration": iteration, **values}) + "\n")
        if self.tensorboard:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, iteration)
            self.tensorboard.flush()


def _log_line(iteration: int, total: int, consumed: int, lr: float, metrics: dict,
              grad_norm, elapsed: float, tokens: int, tflops_per_gpu: float) -> str:
    norm = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
    return (f" iteration {iteration:8d}/{total:8d} | consumed samples: {consumed:12d} | "
            f"elapsed time per iteration (ms): {1000 * elapsed:.1f} | "
            f"throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.1f} | learning rate: {lr:.3E} | "
            f"loss: {metrics['loss']:.6E} | reward accuracy: {metrics['rewards/accuracies']:.3f} | "
            f"reward margin: {metrics['rewards/margins']:.4f} | grad norm: {norm} | "
            f"tokens/s: {tokens / max(elapsed, 1e-9):.0f} |")


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
    if config.fp8 is not None:
        check_fp8_support(config.fp8)
    return source, config.check_world(world_size)


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


def build_from_config(config: TrainConfig, source: ModelSource, total_iters: int
                      ) -> TrainingComponents:
    """The run's model, optimizer, schedule and (DPO) reference, weights from the checkpoint
    the source names (a resumed run's weights are loaded later, with the optimizer state)."""

    def load_pretrained(model):
        checkpointing.load_checkpoint(source.weights_from, model, model_config=source.config)

    return build_components(
        source.config, config.parallel, config.optimizer,
        params_dtype=torch.bfloat16 if config.bf16 else torch.float32,
        transformer_impl=config.transformer_impl,
        transformer_overrides=config.transformer_overrides(),
        # Same precision as the policy (FP8 included); nothing to recompute without gradients.
        reference_overrides=config.fp8.transformer_overrides() if config.fp8 else None,
        logprob_chunk_size=config.logprob_chunk_size,
        load_policy=load_pretrained if source.resume_from is None and source.weights_from else None,
        with_reference=config.loss.needs_reference, load_reference=load_pretrained,
        total_iters=total_iters)


def run(config: TrainConfig, prepared: tuple[ModelSource, int] | None = None) -> TrainSummary:
    """Train as configured; call on every rank (under torchrun or spawned)."""
    source, num_microbatches = prepared or prepare(config)
    rank, _, _ = runtime.read_world()
    env = runtime.initialize(config.parallel, seed=config.seed, model_config=source.config)
    from megatron.core import parallel_state as ps

    say = print if rank == 0 else (lambda *a, **k: None)
    data = TrainingData.load(config, source)
    total_iters = config.train_iters or config.train_epochs * data.sampler.batches_per_epoch
    say(f"> {len(data.train_pairs)} training pairs, {len(data.valid_pairs)} validation pairs, "
        f"{total_iters} iterations of {config.global_batch_size} pairs "
        f"({num_microbatches} micro-batches of {config.micro_batch_size} per rank, "
        f"DP={env.data_parallel_size})")
    parts = build_from_config(config, source, total_iters)
    state = checkpointing.TrainState(0, 0)
    if source.resume_from is not None:
        state = checkpointing.load_checkpoint(source.resume_from, parts.model.module,
                                              parts.optimizer, parts.scheduler,
                                              model_config=source.config)
        say(f"> resumed from {source.resume_from} at iteration {state.iteration}")
    iteration, consumed = state.iteration, state.consumed_samples
    dp_rank, dp_size = ps.get_data_parallel_rank(), env.data_parallel_size
    cadence = Cadence.of(config, total_iters)
    writer = MetricsWriter(config, rank, resuming=source.resume_from is not None)
    summary = TrainSummary(iteration=iteration)
    vocab = source.config.vocab_size
    eval_batches = data.eval_microbatches(config, dp_rank, dp_size, env.device)
    step_options = dict(vocab_size=vocab, reference_model=parts.reference,
                        logprob_chunk_size=parts.logprob_chunk_size)

    def run_eval(at: int) -> None:
        if not eval_batches:
            return
        metrics = evaluate([parts.model], eval_batches, config.loss, **step_options)
        metrics = {f"eval/{name}": value for name, value in metrics.items()}
        summary.evals.append((at, metrics))
        writer.write(at, metrics)
        say(f" validation at iteration {at:8d} | " +
            " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()) + " |")

    run_eval(iteration)
    while iteration < total_iters:
        start = time.perf_counter()
        indices = data.sampler.global_batch(consumed)
        microbatches = data.train_microbatches(indices, config, dp_rank, dp_size,
                                               num_microbatches, env.device)
        lr = parts.optimizer.param_groups[0]["lr"]
        result = train_step([parts.model], parts.optimizer, microbatches, config.loss,
                            **step_options)
        parts.scheduler.step(increment=1)
        iteration, consumed = iteration + 1, consumed + config.global_batch_size
        elapsed = time.perf_counter() - start
        summary.losses.append(result.metrics["loss"])
        summary.iteration = iteration
        if cadence.log(iteration):
            tokens = _pair_tokens(data.train_pairs, indices)
            # Model FLOPs of SimPO's work (DPO's reference pass not counted) per rank.
            tflops = (_pair_flops(source.config, data.train_pairs, indices)
                      / elapsed / 1e12 / env.world_size)
            writer.write(iteration, {**result.metrics, "learning_rate": lr,
                                     "grad_norm": result.grad_norm, "consumed_samples": consumed,
                                     "iteration_time_s": elapsed,
                                     "tokens_per_second": tokens / elapsed,
                                     "tflops_per_gpu": tflops})
            say(_log_line(iteration, total_iters, consumed, lr, result.metrics, result.grad_norm,
                          elapsed, tokens, tflops))
        if cadence.evaluate(iteration):
            run_eval(iteration)
        if cadence.save(iteration):
            _save(config, checkpointing.TrainState(iteration, consumed), parts, source)
    if len(summary.evals) > 1:
        (first_at, first), (last_at, last) = summary.evals[0], summary.evals[-1]
        key = "eval/rewards/accuracies"
        say(f"> held-out reward accuracy: {first[key]:.3f} at iteration {first_at} -> "
            f"{last[key]:.3f} at iteration {last_at}")
    return summary


def _save(config: TrainConfig, state: checkpointing.TrainState, parts: TrainingComponents,
          source: ModelSource) -> None:
    finish_param_sync([parts.model])
    source_dir = source.weights_from or source.resume_from
    source_assets = checkpointing.checkpoint_assets(source_dir) if source_dir else {}
    path = checkpointing.save_checkpoint(
        config.save, state, parts.model.module, parts.optimizer, parts.scheduler, source.config,
        assets={**source_assets, "tokenizer": source.tokenizer_path})
    if dist.get_rank() == 0:
        print(f"> saved checkpoint {path}")


@dataclass
class TrainingData:
    """The tokenized pairs, their order, and how a global batch becomes this rank's batches."""

    train_pairs: list[TokenizedPair]
    valid_pairs: list[TokenizedPair]
    pad_id: int
    sampler: PairSampler
    padding_multiple: int

    @classmethod
    def load(cls, config: TrainConfig, source: ModelSource) -> "TrainingData":
        tokenizer = load_tokenizer(source.tokenizer_path)
        if len(tokenizer) > source.config.vocab_size:
            raise ValueError(f"tokenizer {source.tokenizer_path} has {len(tokenizer)} tokens, "
                             f"more than the model's vocabulary ({source.config.vocab_size})")
        train_pairs, valid_pairs = load_datasets(config.data, tokenizer, config.seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(train_pairs, valid_pairs, pad_id,
                   PairSampler(len(train_pairs), config.global_batch_size, config.seed),
                   padding_multiple(config.sequence_alignment))

    def _collate(self, pairs: list[TokenizedPair], indices: list[int], length: int,
                 device) -> PreferenceBatch:
        return collate_pairs([pairs[i] for i in indices], length, self.pad_id).to(device)

    def train_microbatches(self, indices: list[int], config: TrainConfig, dp_rank: int,
                           dp_size: int, num_microbatches: int, device) -> list[PreferenceBatch]:
        """This rank's shard of a global batch, padded to the global batch's longest pair."""
        length = padded_length([self.train_pairs[i] for i in indices], config.data.seq_length,
                               self.padding_multiple)
        shard = PairSampler.shard(indices, dp_rank, dp_size)
        return self._collate(self.train_pairs, shard, length, device).split(num_microbatches)

    def eval_microbatches(self, config: TrainConfig, dp_rank: int, dp_size: int, device
                          ) -> list[PreferenceBatch]:
        """This rank's share of the validation pairs as equal micro-batches (remainder dropped)."""
        chunk = config.micro_batch_size * dp_size
        usable = len(self.valid_pairs) // chunk * chunk
        if usable == 0:
            return []
        length = padded_length(self.valid_pairs[:usable], config.data.seq_length,
                               self.padding_multiple)
        indices = PairSampler.shard(list(range(usable)), dp_rank, dp_size)
        batch = self._collate(self.valid_pairs, indices, length, device)
        return batch.split(len(indices) // config.micro_batch_size)


def main(argv=None) -> None:
    """CLI entry point: a user's mistake (flags, data, checkpoints) ends in one
    ``train_simpo: error: ...`` line from rank 0 and exit code 2."""
    from megatron_simpo.arguments import parse_args, user_error

    config = parse_args(argv)
    try:
        prepared = prepare(config)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        user_error(str(error))
    try:
        run(config, prepared)
    finally:
        runtime.shutdown()


if __name__ == "__main__":  # the guard matters: dist checkpointing spawns helper processes
    main()
