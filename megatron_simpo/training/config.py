"""The typed configuration of a training run: the one place its defaults live (the CLI in
``arguments.py`` is generated from these dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from megatron_simpo.data.batching import BatchingConfig
from megatron_simpo.data.config import DataConfig
from megatron_simpo.training.losses import WITH_REFERENCE, LossConfig
from megatron_simpo.training.logprob_head import check_chunk_size
from megatron_simpo.model.builder import TRANSFORMER_IMPLS, TransformerImpl
from megatron_simpo.training.optimizer import OptimizerSettings
from megatron_simpo.distributed.parallel import ParallelConfig
from megatron_simpo.model.moe import MoESettings
from megatron_simpo.model.precision import Fp8Config, sequence_alignment


RecomputeGranularity = Literal["full", "selective"]
RecomputeMethod = Literal["uniform", "block"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. Validated on construction; ``check_world`` once the world size is known."""

    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    moe: MoESettings = field(default_factory=MoESettings)
    fp8: Fp8Config | None = None
    """FP8 GEMMs in the decoder layers through Transformer Engine; None = bf16 GEMMs."""
    micro_batch_size: int | None = None
    """Pairs per micro-batch (default 1); the model sees twice as many rows (chosen +
    rejected). With --max-tokens-per-microbatch the token budget sizes micro-batches instead."""
    global_batch_size: int = 128
    """Pairs per optimizer step, reached by gradient accumulation over micro-batches and
    data-parallel ranks."""
    train_iters: int | None = None
    """Run length in optimizer steps (give this or train_epochs)."""
    train_epochs: int | None = None
    """Run length in passes over the training pairs (give this or train_iters)."""
    bf16: bool = False
    """bf16 weights and compute, fp32 master weights and gradient reduction."""
    transformer_impl: TransformerImpl = "local"
    """Decoder layers from Megatron's local torch modules, or Transformer Engine's (fused
    attention and norms, FP8)."""
    recompute_granularity: RecomputeGranularity | None = None
    """Activation recomputation: whole layers (full), or only the attention core (selective)."""
    recompute_method: RecomputeMethod | None = None
    """With full recomputation: checkpoint groups of recompute_num_layers layers (uniform), or
    the first recompute_num_layers layers of each stage (block)."""
    recompute_num_layers: int | None = None
    """Layers per recomputation group (uniform) or per stage (block)."""
    logprob_chunk_size: int = 1024
    """Memory-lean log-probs: score response tokens this many at a time from the hidden
    states, never holding the full logits; 0 computes the micro-batch's full logits."""
    model_config_path: str | None = None
    """Hugging Face config.json of a randomly initialised model."""
    pretrained_checkpoint: str | None = None
    """Weights to start a new run from (converted by convert_hf_to_megatron, or trained); for
    dpo, ipo and rdpo also the frozen reference model."""
    reference_logps: str | None = None
    """dpo, ipo, rdpo: the reference model's log-probs precomputed from
    --pretrained-checkpoint by megatron-simpo-reference-logps; no reference model is loaded."""
    load: str | None = None
    """Resume exactly from this save folder (model, optimizer, schedule, data position, RNG).
    Naming the --save folder while it holds no checkpoint yet, the run starts from the
    beginning (one command line for every start of a requeued job)."""
    override_data: bool = False
    """Resume with --load although the training data changed since the checkpoint (another
    source, tokenizer, --seq-length or held-out split): training goes on from the saved
    position in the new data's order. Without it such a resume is refused."""
    save: str | None = None
    """Save folder: checkpoints (iter_NNNNNNN/) and metrics.jsonl."""
    save_interval: int | None = None
    """Save a checkpoint every this many iterations (and always at the end)."""
    eval_interval: int | None = None
    """Evaluate on the held-out pairs every this many iterations (and at the start and end)."""
    eval_dump: bool = False
    """At each evaluation also write every held-out pair's summed and average log-probs,
    response lengths and rewards to <save>/eval_dump/iter_NNNNNNN.jsonl (tools/analyze_run.py
    plots them); needs --save."""
    log_interval: int = 1
    """Print the log line and write metrics every this many iterations (and at the last one,
    a skipped step and a save), each row the mean of the steps since the previous one."""
    seed: int = 42
    """Seed of the initialisation, the data order and the held-out split."""
    max_skipped_steps: int = 3
    """A step whose loss or gradient is NaN/inf is skipped (no update); this many in a row end
    the run with an error."""
    overwrite: bool = False
    """Let this run replace what --save holds: a new run (no --load) all its checkpoints and
    metrics, a resumed run the iterations (and their metrics) after the one it resumes from."""
    exit_interval: int | None = None
    """Save and stop at the first iteration that is a multiple of this."""
    exit_duration_in_mins: float | None = None
    """Save and stop at the first step boundary after the command has run this long, setup
    included (a scheduler's time limit, less the time a save takes). SIGTERM/SIGINT always do
    the same."""
    tensorboard_dir: str | None = None
    """Also write the metrics as TensorBoard events here (needs the tensorboard package)."""

    def __post_init__(self) -> None:
        if self.batching.token_budget:
            if self.micro_batch_size is not None:
                raise ValueError("give --micro-batch-size or --max-tokens-per-microbatch, not "
                                 "both: the token budget decides how many pairs a micro-batch "
                                 "holds")
        elif self.micro_batch_size is None:
            object.__setattr__(self, "micro_batch_size", 1)
        for flag, value in (("--micro-batch-size", self.micro_batch_size),  # None: the budget
                            ("--global-batch-size", self.global_batch_size),
                            ("--log-interval", self.log_interval)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        for flag, value in (("--save-interval", self.save_interval),
                            ("--eval-interval", self.eval_interval),
                            ("--exit-interval", self.exit_interval),
                            ("--max-skipped-steps", self.max_skipped_steps),
                            ("--train-iters", self.train_iters),
                            ("--train-epochs", self.train_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ValueError(f"--exit-duration-in-mins must be > 0, got {self.exit_duration_in_mins}")
        if (self.train_iters is None) == (self.train_epochs is None):
            raise ValueError("give exactly one of --train-iters and --train-epochs")
        if self.recompute_granularity not in (None, *get_args(RecomputeGranularity)):
            raise ValueError(f"--recompute-granularity must be full or selective, got {self.recompute_granularity!r}")
        if self.recompute_granularity == "full":
            if self.recompute_method not in get_args(RecomputeMethod):
                raise ValueError("--recompute-granularity full needs --recompute-method uniform or block")
            if self.recompute_num_layers is None or self.recompute_num_layers < 1:
                raise ValueError("--recompute-granularity full needs --recompute-num-layers >= 1")
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            raise ValueError("--recompute-method and --recompute-num-layers go with "
                             "--recompute-granularity full")
        if self.fp8 is not None:
            if self.transformer_impl != "transformer_engine":
                raise ValueError("--fp8-format needs --transformer-impl transformer_engine (FP8 "
                                 "GEMMs are Transformer Engine's)")
            if not self.bf16:
                raise ValueError("--fp8-format needs --bf16 (FP8 GEMMs with bf16 weights and "
                                 "activations around them)")
        if self.data.seq_length % self.sequence_alignment != 0:
            reasons = []
            if self.parallel.context_parallel_size > 1:
                reasons.append(f"--context-parallel-size {self.parallel.context_parallel_size} "
                               f"cuts every row into {2 * self.parallel.context_parallel_size} "
                               "equal chunks")
            if self.parallel.sequence_parallel:
                tp = self.parallel.tensor_model_parallel_size
                reasons.append(f"--sequence-parallel splits it over {tp} TP ranks")
            if self.fp8 is not None:
                reasons.append(f"FP8 GEMMs ({self.fp8.recipe}) need multiples of "
                               f"{self.fp8.alignment} tokens")
            raise ValueError(f"--seq-length ({self.data.seq_length}) must be a multiple of "
                             f"{self.sequence_alignment}: {'; '.join(reasons)}")
        check_chunk_size(self.logprob_chunk_size)
        budget = self.batching.max_tokens_per_microbatch
        if self.batching.pack_sequences and budget % self.sequence_alignment:
            raise ValueError(f"--max-tokens-per-microbatch ({budget}) must be a multiple of "
                             f"{self.sequence_alignment} with --pack-sequences (a packed row is "
                             "split over context- and sequence-parallel ranks / fed to FP8 GEMMs)")
        if (self.parallel.context_parallel_size > 1 and self.batching.pack_sequences
                and self.transformer_impl == "transformer_engine"):
            raise ValueError("--context-parallel-size with --pack-sequences needs --transformer-impl "
                             "local (Transformer Engine's THD rows under CP need per-rank padded "
                             "segments, which this project does not lay out)")
        if self.batching.share_prompt and self.transformer_impl != "local":
            raise ValueError("--share-prompt needs --transformer-impl local (its shared-prompt "
                             "mask is an explicit [b, 1, s, s] tensor, which "
                             "transformer_engine's fused attention does not take)")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)}, "
                             f"got {self.transformer_impl!r}")
        sources = [flag for flag, value in (("--model-config", self.model_config_path),
                                            ("--pretrained-checkpoint", self.pretrained_checkpoint))
                   if value]
        if len(sources) > 1:
            raise ValueError("give one of --model-config (random init) and --pretrained-checkpoint")
        if not sources and not self.load:
            raise ValueError("no model: give --pretrained-checkpoint, --model-config or --load")
        if self.save_interval is not None and not self.save:
            raise ValueError("--save-interval needs --save")
        for flag, given in (("--override-opt-param-scheduler",
                             self.optimizer.override_opt_param_scheduler),
                            ("--use-checkpoint-opt-param-scheduler",
                             self.optimizer.use_checkpoint_opt_param_scheduler)):
            if given and not self.load:
                raise ValueError(f"{flag} applies to a resume: it needs --load")
        for flag, given, needed, what in (
                ("--override-data", self.override_data, self.load, "--load (it applies to a resume)"),
                ("--overwrite", self.overwrite, self.save, "--save (what it would replace)"),
                ("--exit-interval", self.exit_interval is not None, self.save,
                 "--save (it saves a checkpoint and stops)"),
                ("--exit-duration-in-mins", self.exit_duration_in_mins is not None, self.save,
                 "--save (it saves a checkpoint and stops)")):
            if given and not needed:
                raise ValueError(f"{flag} needs {what}")
        if not self.data.valid_data_path and self.data.valid_fraction == 0:
            for flag, given in (("--eval-interval", self.eval_interval is not None),
                                ("--eval-dump", self.eval_dump)):
                if given:
                    raise ValueError(f"{flag} needs validation pairs: give --valid-data-path or "
                                     "--valid-fraction")
        if self.eval_dump and not self.save:
            raise ValueError("--eval-dump needs --save (the dumps go to <save>/eval_dump/)")
        if self.data.tokenizer_path is None and self.pretrained_checkpoint is None and not self.load:
            raise ValueError("no tokenizer: give --tokenizer (a Hugging Face tokenizer folder)")
        from megatron_simpo.data.sources import FILE_KINDS, SourceError, kind_of

        kinds = []
        for flag, source, split_flag, split, default in (
                ("--train-data-path", self.data.train_data_path, "--train-split",
                 self.data.train_split, "train"),
                ("--valid-data-path", self.data.valid_data_path, "--valid-split",
                 self.data.valid_split, "test")):
            if not source:
                continue
            try:
                kinds.append(kind_of(source))  # a file, a save_to_disk folder or a Hub name
            except SourceError as error:
                raise FileNotFoundError(f"{flag}: {error}") from None
            if kinds[-1] in FILE_KINDS and split != default:
                raise ValueError(f"{split_flag} {split} applies to a Hub dataset or a "
                                 f"DatasetDict folder, not the file {flag} {source}")
        if self.data.dataset_config is not None and "hub" not in kinds:
            raise ValueError(f"--dataset-config {self.data.dataset_config} applies to a Hub "
                             "dataset (--train-data-path / --valid-data-path), and none is given")
        for flag, path in (("--model-config", self.model_config_path),
                           ("--tokenizer", self.data.tokenizer_path),
                           ("--reference-logps", self.reference_logps)):
            if path and not Path(path).exists():
                raise FileNotFoundError(f"{flag}: {path} does not exist")
        if self.reference_logps is not None and not self.loss.needs_reference:
            raise ValueError(f"--reference-logps applies to --algorithm "
                             f"{', '.join(WITH_REFERENCE)}, not {self.loss.algorithm}")
        if self.loss.needs_reference and self.pretrained_checkpoint is None:
            raise ValueError(f"--algorithm {self.loss.algorithm} needs the reference model's "
                             "weights: give --pretrained-checkpoint (also when resuming with "
                             "--load)")

    @property
    def needs_reference_model(self) -> bool:
        """A frozen reference model runs beside the policy (not when its log-probs are
        precomputed)."""
        return self.loss.needs_reference and self.reference_logps is None

    def check_world(self, world_size: int) -> int | None:
        """Validate the batch sizes against the data-parallel size; returns micro-batches per
        step and rank (None under a token budget: it varies)."""
        dp = self.parallel.data_parallel_size(world_size)
        if self.batching.token_budget:
            if self.global_batch_size < dp:
                raise ValueError(f"--global-batch-size ({self.global_batch_size}) must be at "
                                 f"least the data-parallel size ({dp})")
            if self.parallel.expert_model_parallel_size > 1 and self.global_batch_size % dp:
                raise ValueError(
                    f"--global-batch-size ({self.global_batch_size}) must be a multiple of the "
                    f"data-parallel size ({dp}) with --expert-model-parallel-size "
                    f"({self.parallel.expert_model_parallel_size}) under a token budget: each "
                    "micro-batch's expert all-to-all spans the data-parallel ranks, so every "
                    "rank runs as many micro-batches")
            return None
        if self.global_batch_size % (self.micro_batch_size * dp) != 0:
            raise ValueError(
                f"--global-batch-size ({self.global_batch_size}) must be divisible by "
                f"--micro-batch-size ({self.micro_batch_size}) x data-parallel size ({dp})")
        return self.global_batch_size // (self.micro_batch_size * dp)

    @property
    def sequence_alignment(self) -> int:
        """Batches are padded to a multiple of this (sequence parallelism, FP8)."""
        return sequence_alignment(self.fp8, self.parallel.sequence_multiple)

    def transformer_overrides(self) -> dict:
        """TransformerConfig fields the run sets beyond the architecture (recomputation, FP8)."""
        values = {}
        if self.recompute_granularity is not None:
            values.update(recompute_granularity=self.recompute_granularity,
                          recompute_method=self.recompute_method,
                          recompute_num_layers=self.recompute_num_layers)
        if self.fp8 is not None:
            values.update(self.fp8.transformer_overrides())
        return values

    def model_overrides(self, model) -> dict:
        """``transformer_overrides`` and, for a mixture-of-experts ``model``, the router
        settings (refused, naming the flag, for a model without experts)."""
        self.moe.check_model(model)
        values = self.transformer_overrides()
        if model.is_moe:
            values.update(self.moe.transformer_overrides())
        return values
