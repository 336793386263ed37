"""Before a run trains: which model it starts from, every check that can fail early, and
the build of its model, optimizer, schedule and reference from the configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_simpo.checkpoint import checkpointing
from megatron_simpo.distributed import runtime
from megatron_simpo.model import flex
from megatron_simpo.model.architecture import ModelConfig
from megatron_simpo.training.components import TrainingComponents, build_components, build_reference
from megatron_simpo.training.config import TrainConfig
from megatron_simpo.training.logprob_head import LogprobHead
from megatron_simpo.training.metrics import check_tensorboard
from megatron_simpo.checkpoint.metrics_file import METRICS_FILE, read_metrics_file
from megatron_simpo.checkpoint.layout import check_writable_folder
from megatron_simpo.training.resume import check_resume, reference_record
from megatron_simpo.model.builder import (check_packed_attention, check_shared_prompt_attention,
                                          check_transformer_impl)
from megatron_simpo.model.precision import check_fp8_support


@dataclass(frozen=True)
class ModelSource:
    config: ModelConfig
    resume_from: Path | None
    weights_from: Path | None
    tokenizer_path: Path


def first_start_in_save(config: TrainConfig) -> bool:
    """Whether ``--load`` names the ``--save`` folder and that holds no checkpoint yet (no
    tracker, no complete iteration): a job's first start, requeued with the same command line
    (Megatron-LM's ``--load``), which starts from the beginning."""
    if not (config.load and config.save) or \
            Path(config.load).resolve() != Path(config.save).resolve():
        return False
    save = Path(config.save)
    return not (save / checkpointing.TRACKER_FILE).exists() \
        and not checkpointing.saved_iterations(save)


def resumes_in_save(config: TrainConfig, source: ModelSource) -> bool:
    """Whether the run resumes a checkpoint of its --save folder (its metrics, dumps and
    iterations go on there); a resume saved elsewhere starts that folder as a new run does."""
    if source.resume_from is None or not config.save:
        return False
    checkpoint = Path(source.resume_from).resolve()  # a link to an iteration: where it is
    in_root = checkpoint.name.startswith("iter_") and checkpoint.name[5:].isdigit()
    root = checkpoint.parent if in_root else checkpoint
    return root == Path(config.save).resolve()


def resolve_model_source(config: TrainConfig) -> ModelSource:
    """Which architecture, weights and tokenizer the run uses (before anything is built)."""
    first_start = first_start_in_save(config)
    if first_start and not (config.pretrained_checkpoint or config.model_config_path):
        raise ValueError(f"--load {config.load} holds no checkpoint yet (it is --save: a first "
                         "start), and there is nothing to start from: give "
                         "--pretrained-checkpoint or --model-config too")
    resume = (checkpointing.find_checkpoint(config.load, "--load")
              if config.load and not first_start else None)
    pretrained = (checkpointing.find_checkpoint(config.pretrained_checkpoint,
                                                "--pretrained-checkpoint")
                  if config.pretrained_checkpoint else None)
    if resume is not None:
        model_config = checkpointing.read_model_config(resume)
        for flag, given in (("--model-config", config.model_config_path),
                            ("--pretrained-checkpoint", pretrained)):
            if given is None:
                continue
            first = (ModelConfig.from_hf_config(given) if flag == "--model-config"
                     else checkpointing.read_model_config(given))
            differ = [f"{name} {old} -> {new}"
                      for name, (old, new) in model_config.differences(first).items()]
            if differ:
                raise ValueError(f"--load {resume} holds another model than {flag} {given} "
                                 f"({', '.join(differ)}): resume with the {flag} the run "
                                 "started from, or leave it out")
    elif pretrained is not None:
        model_config = checkpointing.read_model_config(pretrained)
    else:
        model_config = ModelConfig.from_hf_config(config.model_config_path)
    tokenizer = config.data.tokenizer_path
    if tokenizer is None:
        source = resume or pretrained
        if source is None:
            raise ValueError("no tokenizer: give --tokenizer (a Hugging Face tokenizer folder)")
        tokenizer = checkpointing.checkpoint_assets(source).get("tokenizer")
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer saved with {source}; give --tokenizer")
    if config.data.seq_length > model_config.max_position_embeddings:
        raise ValueError(f"--seq-length ({config.data.seq_length}) exceeds the model's maximum "
                         f"sequence length ({model_config.max_position_embeddings})")
    return ModelSource(model_config, resume, pretrained, Path(tokenizer))


def prepare(config: TrainConfig) -> tuple[ModelSource, int]:
    """Every check that can fail before training: model source, world layout, batch sizes.

    Returns the model source and the number of micro-batches per step and rank.
    """
    source = resolve_model_source(config)
    world_size = check_model_layout(config, source)
    check_tensorboard(config.tensorboard_dir)
    if config.save:
        check_save_folder(config, source)
    if source.resume_from is not None:
        check_resumed_run(config, source)
    return source, config.check_world(world_size)


def check_model_layout(config: TrainConfig, source: ModelSource) -> int:
    """The checks of the model, the world layout and how rows reach the attention, for every
    command that runs the model on the run's batches (training, and the reference log-probs of
    ``megatron-simpo-reference-logps``, which must refuse what training refuses: a layout
    training refuses would give it other log-probs, e.g. shared-prompt rows on sliding-window
    layers). Returns the world size."""
    _, world_size, _ = runtime.read_world()
    config.parallel.validate(world_size, source.config)
    config.moe.check_model(source.config)
    if config.fp8 is not None:
        config.fp8.check_model(source.config.num_layers,
                               config.parallel.pipeline_model_parallel_size)
    check_transformer_impl(config.transformer_impl)  # then what the machine has
    flex.enabled()  # its switch in the environment is 0 or 1
    if config.batching.pack_sequences and not config.batching.share_prompt:
        check_packed_attention(config.transformer_impl)
    if config.batching.share_prompt:
        check_shared_prompt_attention(config.transformer_impl,
                                      source.config.for_rows(config.data.seq_length))
        config.moe.check_shared_prompt(source.config)
    if config.fp8 is not None:
        check_fp8_support(config.fp8)
    return world_size


def check_resumed_run(config: TrainConfig, source: ModelSource) -> None:
    """A resume's command line against the checkpoint's run (training.resume; the run length
    in iterations is checked again once the data is loaded), and the metrics.jsonl it will
    append to (a damaged line before the last one is refused)."""
    checkpoint = source.resume_from
    check_resume(config, checkpointing.read_train_state(checkpoint), checkpoint,
                 config.train_iters, reference=reference_record(config, source.weights_from))
    if config.save and (Path(config.save) / METRICS_FILE).is_file():
        read_metrics_file(Path(config.save) / METRICS_FILE)


def check_save_folder(config: TrainConfig, source: ModelSource) -> None:
    """Refuse a --save that cannot be written, and to write over another run: a new run needs
    an empty --save (or --overwrite), and a resumed one must not find iterations there beyond
    the one it resumes from."""
    save = Path(config.save)
    check_writable_folder(save, "--save")
    saved = checkpointing.saved_iterations(save)
    resumed = (checkpointing.read_train_iteration(source.resume_from)
               if resumes_in_save(config, source) else None)
    if resumed is None:
        found = [str(save / name) for name in (checkpointing.TRACKER_FILE, METRICS_FILE)
                 if (save / name).exists()]
        found += [str(checkpointing.iteration_dir(save, i)) for i in saved]
        if config.load and source.resume_from is None:
            found = []  # a first start in --save (first_start_in_save): steps, no checkpoint
        if found and not config.overwrite:
            held = f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''}"
            if source.resume_from is not None:
                raise ValueError(f"--save {save} already holds another run ({held}), and this "
                                 f"one resumes from {source.resume_from}: save into that run's "
                                 "folder or an empty one, or give --overwrite to replace it")
            raise ValueError(f"--save {save} already holds a run ({held}): resume it with "
                             f"--load {save}, or give --overwrite to replace it")
        return
    later = [i for i in saved if i > resumed]
    if later and not config.overwrite:
        raise ValueError(f"--save {save} holds iterations after the resumed one ({resumed}): "
                         f"{', '.join(map(str, later))}; resuming would overwrite them. Save "
                         "elsewhere, or give --overwrite")


def _load_pretrained(source: ModelSource):
    def load(model):
        checkpointing.load_checkpoint(source.weights_from, model, model_config=source.config)
    return load


def _model_settings(config: TrainConfig) -> dict:
    """What the policy and the reference share: precision, layers."""
    return dict(params_dtype=torch.bfloat16 if config.bf16 else torch.float32,
                transformer_impl=config.transformer_impl)


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
        source.config.for_rows(config.data.seq_length), config.parallel, config.optimizer,
        **_model_settings(config),
        logprob_chunk_size=config.logprob_chunk_size,
        transformer_overrides=config.model_overrides(source.config),
        freeze_router=config.moe.freeze_moe_router,
        reference_overrides=_reference_overrides(config),
        load_policy=load_pretrained if source.resume_from is None and source.weights_from else None,
        with_reference=config.needs_reference_model, load_reference=load_pretrained,
        total_iters=total_iters)


def build_reference_from_config(config: TrainConfig, source: ModelSource
                                ) -> tuple[Any, LogprobHead]:
    """The run's frozen reference model alone (megatron-simpo-reference-logps), and the
    log-prob head it was built for."""
    head = LogprobHead.for_model(config.logprob_chunk_size, source.config)
    model = build_reference(source.config.for_rows(config.data.seq_length), config.parallel,
                            head=head,
                            **_model_settings(config), overrides=_reference_overrides(config),
                            load=_load_pretrained(source))
    return model, head
