"""Checkpoint reads and writes that hold a few tensors at a time: what lets the converters run
in about the model's own memory (docs/conversion.md, "Measured cost")."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_simpo.checkpoint.layout import CheckpointError, check_model_config, shard_reason
from megatron_simpo.distributed.runtime import first_over_world
from megatron_simpo.model.architecture import ModelConfig


class TensorSourceError(ValueError):
    """A tensor's producer failed while a streamed save wrote it (a damaged or NaN source tensor):
    the producer's own message, the same on every rank; nothing is published."""


def streaming_strategy(model, produce, *, progress: bool = False):
    """A Megatron-Core ``torch_dist`` save strategy that never holds the whole model: each tensor
    is produced by ``produce(name)`` (``name`` a key of ``model.state_dict()``; it returns a
    tensor of that parameter's shape and dtype) only when the writer writes it, and freed after.

    ``model``'s parameters stand in for the data while the checkpoint is planned: built without
    initialisation, they are allocated but never written, so never resident. The writer is
    PyTorch's ``FileSystemWriter`` with one thread, which resolves the items of its plan one at
    a time (Megatron-Core's ``FileSystemWriterAsync`` resolves, and copies, all of them before
    it writes); planner, keys, chunks and metadata are Megatron-Core's own, so the checkpoint
    loads as any other (one ``.distcp`` file per rank, as Megatron-Core 0.20 writes by default).
    Each write item is the parameter itself or a view into it (the SwiGLU ``linear_fc1`` as gate
    and up): it is cut from the produced tensor with the view's own strides and offset.
    """
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
        def __init__(self):
            super().__init__("torch_dist", 1)
            self.thread_count = 1

        def save(self, sharded_state_dict, checkpoint_dir):
            _streamed_save(sharded_state_dict, checkpoint_dir, model, produce, progress)

    return StreamingSaveStrategy()


def _main_replicas_by_key(sharded_state_dict) -> dict:
    """Megatron-Core's grouping for PyTorch's checkpoint: the main replicas of each key."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica

    grouped: dict[str, list] = {}
    for value in nested_values(sharded_state_dict):
        key = value.unique_key if isinstance(value, ShardedObject) else value.key
        if is_main_replica(value.replica_id):
            grouped.setdefault(key, []).append(value)
    return grouped


def _streamed_save(sharded_state_dict, checkpoint_dir, model, produce, progress: bool) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner,
                                                                   mcore_to_pyt_state_dict)

    grouped = _main_replicas_by_key(sharded_state_dict)
    sources = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if torch.is_tensor(tensor) and tensor.numel():
            sources.setdefault(tensor.untyped_storage().data_ptr(), (name, tensor))
    items = sum(isinstance(v, ShardedTensor) for values in grouped.values() for v in values)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=items, desc=f"rank {dist.get_rank()} tensors", unit="tensor")
    state: dict = {"error": None, "pointer": None, "tensor": None, "written": []}

    def resolve(placeholder: torch.Tensor) -> torch.Tensor:
        # One writer thread asks for the items in order, each once the one before is written;
        # it keeps a reference to every written tensor until its file is closed (torch 2.13),
        # so the memory of those is released here instead.
        for written in state["written"]:
            if written.untyped_storage().resizable():
                written.untyped_storage().resize_(0)
        state["written"] = []
        pointer = placeholder.untyped_storage().data_ptr()
        if pointer not in sources:
            raise RuntimeError(f"streamed save: a tensor of shape {tuple(placeholder.shape)} is "
                               "not a view of any parameter")
        name, parameter = sources[pointer]
        tensor = state["tensor"]
        if state["pointer"] != pointer or tensor.untyped_storage().nbytes() == 0:
            state["pointer"] = state["tensor"] = tensor = None  # gate and up: one tensor
            try:
                tensor = produce(name)
            except Exception as error:
                state["error"] = error
                raise
            if tensor.shape != parameter.shape or tensor.dtype != parameter.dtype:
                raise RuntimeError(f"streamed save: {name} produced as {tuple(tensor.shape)} "
                                   f"{tensor.dtype}, the model holds {tuple(parameter.shape)} "
                                   f"{parameter.dtype}")
            tensor = tensor.contiguous()
            state["pointer"], state["tensor"] = pointer, tensor
        piece = tensor.as_strided(placeholder.shape, placeholder.stride(),
                                  placeholder.storage_offset() - parameter.storage_offset())
        if piece.nbytes != tensor.nbytes:
            piece = piece.clone()
        state["written"].append(piece)
        if bar:
            bar.update(1)
        return piece

    class StreamingPlanner(MCoreSavePlanner):
        def create_global_plan(self, all_plans):
            plans = list(all_plans)
            global_plan, metadata = super().create_global_plan(all_plans)
            metadata.all_local_plans = plans  # as Megatron-Core's planning records them
            return global_plan, metadata

        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            return resolve(data) if torch.is_tensor(data) else data

    # No copy-ahead (torch resolves items ahead of the writer when a GPU is visible): each item
    # is resolved only after the one before it was written, which ``resolve`` relies on.
    writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1,
                                  per_thread_copy_ahead=0)
    failure = None
    try:
        dcp.save(mcore_to_pyt_state_dict(grouped, False), storage_writer=writer,
                 planner=StreamingPlanner(flatten_state_dict=False))
    except BaseException as error:  # torch's CheckpointException is a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        failure = error
    finally:
        state["tensor"], state["written"] = None, []
        if bar:
            bar.close()
    # Every rank takes the first producer failure any rank had, so the one reported names it.
    own = state["error"]
    first = first_over_world(None if own is None else (
        own.args[0] if isinstance(own, KeyError) and own.args else str(own)))
    if first is not None:
        raise TensorSourceError(first) from own
    if failure is not None:
        raise failure


def _one_fragment(sharded):
    """A layer's slice of a tensor stacked over layers, as a tensor of its own: the layer axis
    becomes a leading axis of size 1 and the fragment grid is dropped.

    Megatron-Core (0.16) describes a stacked tensor to PyTorch's checkpoint as a grid of
    fragments whose other fragments it places on "another rank"; in a world of one that is
    rank 0 again, so reading one layer's slice alone fails. A fragment without a grid is read
    by its global offsets, like any uneven shard: the same bytes of the same files.
    """
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(sharded, ShardedTensorFactory):
        build = sharded.build_fn
        return replace(sharded, build_fn=lambda *args: [_one_fragment(t) for t in build(*args)])
    if not isinstance(sharded, ShardedTensor) or not sharded.prepend_axis_num:
        return sharded
    lead = (1,) * sharded.prepend_axis_num
    return replace(sharded, data=sharded.data.view(*lead, *sharded.data.shape),
                   local_shape=lead + tuple(sharded.local_shape), prepend_axis_num=0,
                   axis_fragmentations=None)


def load_model_parts(checkpoint: Path, model, parts: list[list[str]], *,
                     model_config: ModelConfig):
    """Weights only, a few tensors at a time: yields, for each list of ``model``'s state-dict
    names in ``parts``, a dict name -> loaded tensor of the parameter's shape (resharded as
    :func:`load_checkpoint` does).

    Each part is a separate read of the checkpoint, so only the tensors of the part being
    consumed need to be in memory (an exporter frees them before asking for the next). Not
    checked for NaN/inf: the caller checks each tensor; nor against the save's checksums: the
    caller checks them (:func:`checksums.check`) before it reads anything of the checkpoint's
    shards, its common state included (inside them from megatron-core 0.19).
    """
    from megatron.core import dist_checkpointing

    check_model_config(checkpoint, model_config)
    sharded = model.sharded_state_dict()
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()
              if torch.is_tensor(value)}
    for part in parts:
        subset = {name: _one_fragment(sharded.pop(name)) for name in part}
        try:
            # A part is not every fragment of its tensors, which the access check would refuse.
            loaded = dist_checkpointing.load(subset, str(checkpoint),
                                             validate_access_integrity=False)
        except BaseException as error:  # torch's CheckpointException is a BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"cannot read checkpoint {checkpoint}: "
                                  f"{shard_reason(checkpoint, error)}") from error
        del subset
        yield {name: loaded.pop(name).reshape(shapes[name]) for name in part}
