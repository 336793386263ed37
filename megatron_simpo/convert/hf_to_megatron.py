"""Hugging Face checkpoint -> Megatron distributed checkpoint (one call per rank).

Each rank builds its own shard of the model without initialising it (the weights are allocated
but never written, so never resident) and the ranks save it together; each tensor of the
checkpoint is built from the HF files only when the writer writes it, and freed after
(``save_model_only(produce=...)``). Peak memory per rank is the runtime plus the one Megatron
tensor being built: its HF tensors (memory-mapped), the unsplit tensor and this rank's shard.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from megatron_simpo.checkpoint.checkpointing import save_model_only
from megatron_simpo.convert.hf_io import HFCheckpointReader, copy_metadata
from megatron_simpo.convert.llama import (hf_names_for, is_expert, megatron_names,
                                          megatron_tensor, split_tensor, to_global_name)
from megatron_simpo.model.architecture import ModelConfig
from megatron_simpo.model.builder import build_model
from megatron_simpo.distributed.parallel import ParallelConfig


def check_hf_checkpoint(hf_path: str | Path, config: ModelConfig) -> None:
    """Refuse a missing, unreadable or mis-shaped HF checkpoint before any rank starts."""
    reader = HFCheckpointReader(hf_path, config)
    names = []
    for name in megatron_names(config):
        names += [n for n in hf_names_for(name, config) if n not in names]
    reader.check_shapes(names)


def convert_rank(hf_path: str | Path, save: str | Path, config: ModelConfig,
                 parallel: ParallelConfig, dtype: torch.dtype, *, progress: bool = False,
                 allow_non_finite: bool = False) -> Path:
    """This rank's part of the conversion; ``runtime.initialize`` must have run with ``parallel``.
    An HF tensor holding NaN/inf is refused by name and file unless ``allow_non_finite``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    reader = HFCheckpointReader(hf_path, config, allow_non_finite=allow_non_finite)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size
    ep_rank, etp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    model = build_model(config, parallel, params_dtype=dtype, perform_initialization=False)
    padded = config.padded_vocab_size(tp)
    shapes = {n: t.shape for n, t in model.state_dict().items() if not n.endswith("_extra_state")}

    def produce(local_name: str) -> torch.Tensor:
        """This rank's shard of one tensor, in the model's dtype, in storage of its own (an
        expert's weights split over the expert-tensor-parallel ranks, the rest over TP)."""
        name = to_global_name(local_name, config, pp_rank, pp, ep_rank, ep)
        with torch.no_grad():
            full = megatron_tensor(name, reader.get, config, padded)
            shard = (split_tensor(name, full, etp)[etp_rank] if is_expert(name)
                     else split_tensor(name, full, tp)[tp_rank])
            if shard.shape != shapes[local_name]:
                raise ValueError(f"tensor {name}: converted shard {tuple(shard.shape)} does not "
                                 f"match the model's {tuple(shapes[local_name])}")
            out = torch.empty(shard.shape, dtype=dtype)
            out.copy_(shard)
        return out

    with tempfile.TemporaryDirectory() as staging:
        # The tokenizer and the original config.json are published inside the iteration, with
        # the weights (rank 0 writes them).
        assets = None
        if dist.get_rank() == 0:
            tokenizer_dir, hf_dir = copy_metadata(hf_path, staging)
            assets = {"tokenizer": tokenizer_dir, "hf": hf_dir}
        return save_model_only(save, 0, model, config, assets=assets, produce=produce,
                               progress=progress)
