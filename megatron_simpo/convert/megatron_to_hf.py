"""Megatron checkpoint (any TP/PP, converted or trained) -> Hugging Face folder.

One process: the checkpoint is read part by part (the embedding, each layer, the head),
resharded on load into the unsplit (TP=1, PP=1) layout, mapped to HF names tensor by tensor and
written into safetensors files whose headers are planned up front (sharded with an index above
``max_shard_size``); each part is freed once written, so memory stays near one layer, whatever
the model's size. The folder is assembled under ``<save>.partial`` and renamed when complete.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import torch

from megatron_simpo.checkpoint import checkpointing, checksums, streaming
from megatron_simpo.checkpoint.tokenizer_asset import copy_tokenizer
from megatron_simpo.model.architecture import hf_config_dict
from megatron_simpo.convert.hf_io import write_safetensors
from megatron_simpo.convert.export_marker import EXPORT_MARKER
from megatron_simpo.convert.llama import (expected_hf_shape, hf_names_for, hf_tensors_from,
                                          megatron_names)
from megatron_simpo.model.builder import build_model
from megatron_simpo.distributed.parallel import ParallelConfig


def _part_of(name: str) -> str:
    """Tensors read together: a layer's, else each one alone."""
    match = re.match(r"^decoder\.layers\.(\d+)\.", name)
    return match.group(0) if match else name


def export_rank0(load: str | Path, save: str | Path, *, iteration: int | None,
                 dtype: torch.dtype | None, max_shard_size: str, allow_non_finite: bool) -> Path:
    """Export; ``runtime.initialize(ParallelConfig())`` must have run (a world of one). The
    options are ``conversion.ExportConfig``'s (its defaults are the only ones); ``dtype`` None
    keeps the saved one.

    A tensor holding NaN/inf (a diverged run) is refused, naming it, unless
    ``allow_non_finite``; nothing is published then.
    """
    load = Path(load)
    if iteration is not None:
        checkpoint = checkpointing.iteration_dir(load, iteration)
        if not (checkpoint / "metadata.json").is_file():
            raise FileNotFoundError(f"--iteration {iteration}: {checkpoint} is not a checkpoint")
    else:
        checkpoint = checkpointing.find_checkpoint(load, "--load")
    # The save's checksums first: from megatron-core 0.19 even the common state (the saved
    # dtype) is read from the shards, and a damaged shard is named by its checksum.
    checksums.check(checkpoint)
    config = checkpointing.read_model_config(checkpoint)
    saved_dtype = checkpointing.saved_params_dtype(checkpoint)
    # The model only gives the checkpoint's layout: its weights are never initialised, and each
    # part (a layer, the embedding, the head) is read, exported and freed in turn.
    model = build_model(config, ParallelConfig(), params_dtype=saved_dtype,
                        perform_initialization=False)
    params = dict(model.named_parameters())
    out_dtype = dtype or saved_dtype
    names = megatron_names(config)
    specs = {hf_name: (expected_hf_shape(hf_name, config), out_dtype)
             for name in names for hf_name in hf_names_for(name, config)
             if not (name == "output_layer.weight" and config.tie_word_embeddings)}
    parts = [list(group) for _, group in itertools.groupby(names, key=_part_of)]

    def hf_tensors():
        for part, loaded in zip(parts, streaming.load_model_parts(
                checkpoint, model, parts, model_config=config)):
            for name in part:
                tensor = loaded.pop(name)
                if not allow_non_finite and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{checkpoint}: tensor {name} holds NaN/inf values (a "
                                     "diverged run?); refusing to export it "
                                     "(--allow-non-finite to export anyway)")
                for hf_name, hf_tensor in hf_tensors_from(name, tensor, config).items():
                    yield hf_name, hf_tensor.to(out_dtype)
                del tensor
                params[name].data = torch.empty(0, dtype=saved_dtype)  # its memory goes back

    save = Path(save)
    staging = save.with_name(save.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_safetensors(hf_tensors(), specs, staging, max_shard_size)
    assets = checkpointing.checkpoint_assets(checkpoint)
    base_dir = assets.get("hf")
    base = json.loads((base_dir / "config.json").read_text()) \
        if base_dir and (base_dir / "config.json").is_file() else None
    hf_config = hf_config_dict(config, base, out_dtype)
    if base is None and "tokenizer" in assets:
        hf_config = _with_special_tokens(hf_config, assets["tokenizer"])
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if base_dir and (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", staging / "generation_config.json")
    else:
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if hf_config.get(k) is not None}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if "tokenizer" in assets:  # its own files only: the export's config.json and weights stay
        copy_tokenizer(assets["tokenizer"], staging, model_config=False)
    (staging / EXPORT_MARKER).write_text(json.dumps({"load": str(checkpoint)}) + "\n")
    if save.exists():
        shutil.rmtree(save)
    staging.rename(save)
    return save


def _with_special_tokens(hf_config: dict, tokenizer_dir: Path) -> dict:
    """``hf_config`` with the tokenizer's bos/eos/pad ids where it names none (a run from
    ``--model-config`` has no original config.json): without them transformers' ``generate``
    stops at a default id, not at the tokenizer's end of turn."""
    missing = [k for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if hf_config.get(k) is None]
    if not missing:
        return hf_config
    import sys

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as error:  # any tokenizer's failure: the export stands without the ids
        print(f"warning: {tokenizer_dir} cannot be loaded as a tokenizer "
              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
              f"the export's config.json has no {', '.join(missing)}: set them before "
              "generating", file=sys.stderr, flush=True)
        return hf_config
    found = {k: getattr(tokenizer, k) for k in missing if getattr(tokenizer, k, None) is not None}
    return {**hf_config, **found}
