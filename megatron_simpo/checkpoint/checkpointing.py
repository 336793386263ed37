"""Checkpoints in Megatron-LM's folder layout and Megatron-Core's distributed format.

    SAVE/
      latest_checkpointed_iteration.txt     the newest complete iteration, e.g. "100"
      iter_0000100/
        model_config.json                   the architecture: later commands need no model flags
        metadata.json, common.pt, *.distcp  dist checkpoint: model, optimizer, scheduler, state
        tokenizer/, hf/                     the tokenizer (and original HF config) of these weights

Distributed checkpoints are resharded on load, so a checkpoint saved at one TP/PP loads at
another. An iteration is written to ``iter_NNNNNNN.partial`` and renamed once every rank has
finished, and the tracker file is replaced atomically afterwards (never to an older iteration):
an interrupted or failed save never leaves a folder that training would take as valid, nor
touches an existing checkpoint. Failures are ``CheckpointError``s naming the folder and the
operating system's reason, or the damaged shard or tensor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_simpo.checkpoint.layout import (MODEL_CONFIG_FILE, OPTIMIZER_SHARDING_TYPE,
                                              TRACKER_FILE, CheckpointError, TrainState,
                                              check_model_config, checkpoint_assets,
                                              find_checkpoint, iteration_dir, optimizer_metadata,
                                              read_common_state, read_model_config,
                                              read_train_iteration, read_train_state,
                                              remove_interrupted_saves, remove_iterations_after,
                                              saved_iterations, shard_reason, train_state_from,
                                              write_failure_reason, write_tracker)
from megatron_simpo.checkpoint import checksums, optimizer_state
from megatron_simpo.checkpoint.streaming import TensorSourceError, streaming_strategy
from megatron_simpo.checkpoint.tokenizer_asset import copy_tokenizer
from megatron_simpo.distributed.runtime import first_over_world, max_over_world
from megatron_simpo.model.architecture import ModelConfig

# The folder layout and its readers live in checkpoint.layout; callers reach them here too.
__all__ = ["CheckpointError", "MODEL_CONFIG_FILE", "TRACKER_FILE", "TrainState",
           "check_model_config", "checkpoint_assets", "find_checkpoint", "iteration_dir",
           "load_checkpoint", "load_model_state", "read_model_config", "read_train_iteration",
           "read_train_state", "remove_interrupted_saves", "remove_iterations_after",
           "save_checkpoint", "save_model_only", "saved_iterations", "saved_params_dtype"]

def _rng_state_object(parallel_ranks: tuple[int, ...], parallel_sizes: tuple[int, ...]):
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random": random.getstate(),
        "np_random": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, parallel_sizes, parallel_ranks, replica_id=0)


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np_random"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's (PP, TP, DP) ranks and sizes, with the CP rank and size after them under
    context parallelism (CP ranks keep their own RNG states; without CP the tuples are those of
    checkpoints written before CP existed, which therefore still restore their RNG)."""
    from megatron.core import parallel_state as ps

    ranks = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_data_parallel_rank())
    sizes = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    if ps.get_context_parallel_world_size() > 1:
        ranks += (ps.get_context_parallel_rank(),)
        sizes += (ps.get_context_parallel_world_size(),)
    return ranks, sizes


def _sharded_state(model, optimizer=None, scheduler=None, *, is_loading: bool,
                   with_rng: bool = True,
                   optimizer_sharding_type: str = OPTIMIZER_SHARDING_TYPE) -> dict:
    model_state = model.sharded_state_dict()
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata=optimizer_metadata(optimizer_sharding_type))
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        ranks, sizes = _layout()
        state["rng_state"] = _rng_state_object(ranks, sizes)
    return state


_HELD_WRITER_LOGS = {
    "megatron.core.dist_checkpointing.strategies.filesystem_async": (
        "encountered an error", "An error is caught while starting worker"),
    # megatron-core >= 0.17, on every process's first save, though no save here is async:
    "megatron.core.dist_checkpointing.strategies.torch": ("async save is deprecated",),
}
"""Logger -> messages of Megatron-Core's checkpoint writer that are held back: a failed write
is raised and reported once (as one line), and the rest is not news to a user."""


class _HeldBack(logging.Filter):
    def __init__(self, messages: tuple[str, ...]):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(message in record.getMessage() for message in self.messages)


@contextlib.contextmanager
def _writer_logs_held():
    """Megatron-Core's checkpoint writer logs a failed write (``Local process 0 encountered an
    error: [Errno 28] ...``) before raising it; the raised error is reported, once. Its other
    logs pass, except those of :data:`_HELD_WRITER_LOGS`."""
    held = [(logging.getLogger(name), _HeldBack(messages))
            for name, messages in _HELD_WRITER_LOGS.items()]
    for logger, held_back in held:
        logger.addFilter(held_back)
    try:
        yield
    finally:
        for logger, held_back in held:
            logger.removeFilter(held_back)


def _failure_of(action) -> BaseException | None:
    """What ``action()`` raised (a full disk, a quota, a permission), or None; an interrupt or
    an exit is raised as it is."""
    try:
        action()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:
        return error
    return None


def _write_checkpoint(save_dir: str | Path, iteration: int, state: dict, model,
                      model_config: ModelConfig, assets: dict[str, Path] | None,
                      sharded_strategy=None) -> Path:
    """Save ``state`` into ``iter_NNNNNNN.partial``, then publish it (all ranks call this).

    ``assets`` (name -> folder, e.g. the tokenizer) are copied next to the iterations once.
    ``sharded_strategy``: Megatron-Core's default (``torch_dist``) unless given. A streamed
    tensor's failed source (:class:`TensorSourceError`) is raised as it is, not as a write error.
    """
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    written: dict[str, list[int]] = {}  # this rank's files: name -> [size, CRC-32]

    def make_folder() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()

    def write() -> None:
        dtype = next(model.parameters()).dtype
        state["checkpoint_info"] = {"params_dtype": str(dtype).removeprefix("torch.")}
        with _writer_logs_held():  # its error log would repeat the one line raised below
            dist_checkpointing.save(state, str(partial), sharded_strategy=sharded_strategy)
        if rank == 0:
            model_config.save(partial / MODEL_CONFIG_FILE)
            # The assets (tokenizer, original HF config) travel inside the iteration, so they
            # are published, and replaced, with the weights they belong to.
            for name, source in (assets or {}).items():
                if source is not None and Path(source).is_dir():
                    if name == "tokenizer":  # its files, not a model folder's weights beside them
                        copy_tokenizer(source, partial / name)
                    else:
                        shutil.copytree(source, partial / name)
        written.update(checksums.digests(partial, rank))

    # Every rank takes part in the same collectives whichever fails: rank 0 makes the folder,
    # all agree it is there, all write, all agree the writes succeeded.
    failure = _failure_of(make_folder) if rank == 0 else None
    folder_made = not max_over_world(0 if failure is None else 1)
    if folder_made:
        failure = _failure_of(write)
    reason = (write_failure_reason(failure, partial) if failure is not None
              else "another rank failed to write")
    if not folder_made or max_over_world(0 if failure is None else 1):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(failure, TensorSourceError):
            raise failure
        raise CheckpointError(f"cannot save iteration {iteration} to {root}: {reason}; "
                              f"{_latest_note(root)}") from failure
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, written)
    if rank == 0:
        failure = _failure_of(lambda: checksums.write_manifest(
            partial, {k: v for part in every for k, v in part.items()}))
    if max_over_world(0 if failure is None else 1):  # rank 0's, agreed on by every rank
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        reason = write_failure_reason(failure, partial) if failure else "rank 0 failed to write"
        raise CheckpointError(f"cannot save iteration {iteration} to {root}: {reason}; "
                              f"{_latest_note(root)}") from failure
    def publish() -> None:
        if final.exists():  # re-saving an iteration (--overwrite): the old folder goes only now
            shutil.rmtree(final)
        os.replace(partial, final)
        current = _tracked_iteration(root)
        if current is None or iteration >= current:  # the tracker never moves backwards
            write_tracker(root, iteration)

    failure = _failure_of(publish) if rank == 0 else None
    if max_over_world(0 if failure is None else 1):  # rank 0's, agreed on by every rank
        reason = write_failure_reason(failure, root) if failure else "rank 0 failed to publish"
        raise CheckpointError(f"cannot publish iteration {iteration} in {root}: {reason}; "
                              f"{_latest_note(root)}") from failure
    return final


def _tracked_iteration(root: Path) -> int | None:
    tracker = root / TRACKER_FILE
    text = tracker.read_text().strip() if tracker.is_file() else ""
    return int(text) if text.isdigit() else None


def _latest_note(root: Path) -> str:
    latest = _tracked_iteration(root)
    return ("nothing was published" if latest is None
            else f"iteration {latest} stays the latest checkpoint")


def save_checkpoint(save_dir: str | Path, train_state: TrainState, model, optimizer, scheduler,
                    model_config: ModelConfig, assets: dict[str, Path] | None = None) -> Path:
    """Everything a resume needs: model, optimizer, scheduler, RNG, iteration and data position."""
    _, sizes = _layout()
    state = _sharded_state(model, optimizer, scheduler, is_loading=False)
    state["train_state"] = {"iteration": train_state.iteration,
                            "consumed_samples": train_state.consumed_samples,
                            "data_fingerprint": train_state.data_fingerprint,
                            "run_settings": train_state.settings,
                            "parallel_sizes": list(sizes),
                            "optimizer_sharding_type": OPTIMIZER_SHARDING_TYPE}
    return _write_checkpoint(save_dir, train_state.iteration, state, model, model_config, assets)


def save_model_only(save_dir: str | Path, iteration: int, model, model_config: ModelConfig,
                    assets: dict[str, Path] | None = None, *, produce=None,
                    progress: bool = False) -> Path:
    """Weights only, same layout: what converters write for ``--pretrained-checkpoint``.

    ``produce`` (a converter's model, built without initialisation): the weights are not in
    ``model`` but made by ``produce(state_dict_name)`` one at a time, as the writer writes them
    (:func:`streaming.streaming_strategy`), so the whole model is never in memory; ``progress``
    shows a bar of the tensors written. The files hold what saving the filled model would.
    """
    strategy = None
    if produce is not None:
        strategy = streaming_strategy(model, produce, progress=progress)
    return _write_checkpoint(save_dir, iteration, {"model": model.sharded_state_dict()}, model,
                             model_config, assets, sharded_strategy=strategy)


def saved_params_dtype(checkpoint: Path) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in."""
    info = read_common_state(checkpoint).get("checkpoint_info", {})
    return getattr(torch, info.get("params_dtype", "float32"))


def load_model_state(model, state: dict, checkpoint: Path) -> None:
    """``load_state_dict`` that requires every weight but tolerates absent ``_extra_state``.

    Transformer Engine's attention core keeps an ``_extra_state`` (FP8 metadata) in its
    ``state_dict`` but leaves it out of its sharded state dict, so no dist checkpoint carries it,
    and a checkpoint written with the local spec has none at all; TE starts such state fresh.
    Any other missing or unexpected tensor is an error naming it.
    """
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{checkpoint} does not fit the model: missing {missing}, unexpected "
                         f"{list(result.unexpected_keys)}")


def _global_name(model, name: str) -> str:
    """A parameter's name as the whole model spells it: ``decoder.layers.<i>`` numbered over all
    pipeline stages (Megatron's ``layer_number`` is global and 1-based)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"] and len(parts) > 2 and parts[2].isdigit():
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(getattr(layer, "layer_number", int(parts[2]) + 1) - 1)
    return ".".join(parts)


def check_finite_weights(model, checkpoint: Path, optimizer=None) -> None:
    """Refuse loaded weights holding NaN/inf (a garbled shard of the right size loads without an
    error), and with ``optimizer`` its loaded state too (main weights, which the next step
    writes into the model, and Adam's moments): the first such tensor any rank holds is named,
    the same on every rank (all call it)."""
    names = {id(param): _global_name(model, name) for name, param in model.named_parameters()}
    tensors = [(names[id(param)], param) for param in model.parameters()]
    if optimizer is not None:
        tensors += list(optimizer_state.state_tensors(optimizer, names))
    bad = first_over_world(next((name for name, tensor in tensors
                                 if not bool(torch.isfinite(tensor).all())), None))
    if bad is None:
        return
    raise CheckpointError(f"checkpoint {checkpoint}: tensor {bad} holds NaN/inf values (a damaged "
                          "shard or a diverged run); refusing to load it")


def load_checkpoint(checkpoint: Path, model, optimizer=None, scheduler=None, *,
                    model_config: ModelConfig, allow_non_finite: bool = False) -> TrainState | None:
    """Load weights (and, when given, optimizer, scheduler, RNG and train state) from a checkpoint.

    Loading at another TP/PP than saved works (dist checkpoints reshard); the RNG state is then
    not restored, as it belongs to ranks that no longer exist. Returns the saved train state when
    the optimizer is loaded, None for weights only. Weights holding NaN/inf are refused
    (:func:`check_finite_weights`) unless ``allow_non_finite`` (the exporter checks its own).
    """
    from megatron.core import dist_checkpointing

    checksums.check(checkpoint)
    check_model_config(checkpoint, model_config)
    common = read_common_state(checkpoint)
    saved = common.get("train_state")
    _, sizes = _layout()
    same_layout = saved is not None and tuple(saved["parallel_sizes"]) == sizes
    full = optimizer is not None
    if full and saved is None:
        raise ValueError(f"{checkpoint} holds weights only (no optimizer or train state); "
                         f"start from it with --pretrained-checkpoint, not --load")
    if full:
        optimizer_state.materialize_adam_state(optimizer)
    state = _sharded_state(model, optimizer if full else None, scheduler if full else None,
                           is_loading=True, with_rng=full and same_layout,
                           optimizer_sharding_type=(saved or {}).get("optimizer_sharding_type",
                                                                     OPTIMIZER_SHARDING_TYPE))
    try:
        loaded = dist_checkpointing.load(state, str(checkpoint))
    except BaseException as error:  # torch's CheckpointException is a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: "
                              f"{shard_reason(checkpoint, error)}") from error
    load_model_state(model, loaded["model"], checkpoint)
    if full:
        optimizer_state.load_optimizer_state(optimizer, loaded["optimizer"])
    if not allow_non_finite:  # after the optimizer's state, which may write into the weights
        check_finite_weights(model, checkpoint, optimizer if full else None)
    if not full:
        return None
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return train_state_from(saved)
