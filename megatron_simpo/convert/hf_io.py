"""Reading and writing Hugging Face checkpoint folders (safetensors, sharded or not)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from megatron_simpo.checkpoint.tokenizer_asset import copy_tokenizer
from megatron_simpo.convert.llama import expected_hf_shape
from megatron_simpo.model.architecture import ModelConfig

HF_METADATA_FILES = ("config.json", "generation_config.json")


class HFCheckpointReader:
    """Tensors of a HF folder, read one at a time from its safetensors files (never all at once).

    Every file is opened up front, so a missing or truncated file fails before anything is
    written; every tensor is checked against the shape the config implies when read, and for
    NaN/inf unless ``allow_non_finite``.
    """

    def __init__(self, path: str | Path, config: ModelConfig, *, allow_non_finite: bool = False):
        from safetensors import safe_open

        self.path, self.config = Path(path), config
        self.allow_non_finite = allow_non_finite
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{index}: not a valid safetensors index ({error})") from None
        elif single.is_file():
            weight_map = None
        elif list(self.path.glob("*.bin")):
            raise ValueError(f"{self.path}: only PyTorch .bin weights found; save the model with "
                             f"safe_serialization=True (safetensors) first")
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors or "
                                    f"model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else [single.name]
        names_in_files = {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise FileNotFoundError(f"{file}: listed in the index but missing")
            try:
                with safe_open(str(file), framework="pt") as handle:
                    names_in_files[name] = list(handle.keys())
            except Exception as error:  # safetensors raises its own error types
                raise ValueError(f"{file}: unreadable safetensors file ({error})") from None
        if weight_map is None:
            weight_map = {key: single.name for key in names_in_files[single.name]}
        # A multimodal Gemma-3's text model: its tensors read under the causal LM's names
        self.stored = {_text_model_name(name): name for name in weight_map
                       if _text_model_name(name) != name}
        if "model.embed_tokens.weight" in weight_map:
            self.stored = {}
        self.weight_map = {**weight_map, **{alias: weight_map[name]
                                            for alias, name in self.stored.items()}}

    def check_shapes(self, names: list[str]) -> None:
        """Every named tensor is present with the shape the config implies, read from the file
        headers only: a bad checkpoint is refused before any work starts."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"{self.path}: tensor {name} is missing from the checkpoint")
            by_file.setdefault(self.weight_map[name], []).append(name)
        for file_name, file_names in by_file.items():
            file = self.path / file_name
            with safe_open(str(file), framework="pt") as handle:
                for name in file_names:
                    stored = handle.get_slice(self.stored.get(name, name))
                    self._check_shape(file, name, tuple(stored.get_shape()))
                    if stored.get_dtype() not in _FLOAT_DTYPES:
                        raise ValueError(_dtype_message(file, name, stored.get_dtype()))

    def _check_shape(self, file: Path, name: str, shape: tuple[int, ...]) -> None:
        expected = expected_hf_shape(name, self.config)
        if expected is not None and shape != expected:
            raise ValueError(f"{file}: tensor {name} has shape {shape}, "
                             f"but config.json implies {expected}")

    def get(self, name: str) -> torch.Tensor:
        """One tensor, checked against the config. The file is mapped only while it is read, so
        pages of tensors already converted do not stay in this process's memory."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {name} is missing from the checkpoint")
        file = self.path / self.weight_map[name]
        try:
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(self.stored.get(name, name))
        except Exception as error:
            raise ValueError(f"{file}: cannot read tensor {name} ({error})") from None
        self._check_shape(file, name, tuple(tensor.shape))
        if tensor.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(_dtype_message(file, name, str(tensor.dtype).removeprefix("torch.")))
        if not self.allow_non_finite and not all_finite(tensor):
            raise ValueError(f"{file}: tensor {name} holds NaN/inf values; refusing to convert it "
                             "(--allow-non-finite to convert anyway)")
        return tensor


# safetensors' names of the dtypes a weight may be stored in (not fp8 or integers: quantized)
_FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")


def _dtype_message(file: Path, name: str, dtype: str) -> str:
    return (f"{file}: tensor {name} is stored as {dtype}, not as floating point of 16 bits or "
            "more (quantized weights are unsupported; convert a bf16/fp16/fp32 checkpoint)")


# Where a Gemma3ForConditionalGeneration file keeps its text model's tensors: transformers'
# saved layout, and the in-memory one of transformers 4.52-4.57 that some uploads carry.
_TEXT_MODEL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                        "language_model.lm_head.": "lm_head."}


def _text_model_name(name: str) -> str:
    """A multimodal checkpoint's text-model tensor name as the causal LM names it."""
    for prefix, replacement in _TEXT_MODEL_PREFIXES.items():
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


def all_finite(tensor: torch.Tensor, chunk_bytes: int = 1 << 24) -> bool:
    """No NaN/inf in ``tensor``, checked ``chunk_bytes`` of it at a time: ``torch.isfinite`` of
    a whole tensor makes temporaries of twice its size (``(x == x) * (x.abs() != inf)``), which
    for an embedding would be the largest allocation of an import."""
    flat = tensor.reshape(-1)
    step = max(1, chunk_bytes // max(1, flat.element_size()))
    return all(bool(torch.isfinite(flat[start:start + step]).all())
               for start in range(0, flat.numel(), step))


def copy_metadata(hf_path: str | Path, dest: str | Path) -> tuple[Path | None, Path]:
    """Copy the tokenizer to ``dest/tokenizer`` (``tokenizer_asset``) and config files to
    ``dest/hf``."""
    hf_path, dest = Path(hf_path), Path(dest)
    tokenizer_dir = dest / "tokenizer" if copy_tokenizer(hf_path, dest / "tokenizer") else None
    hf_dir = dest / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    for name in HF_METADATA_FILES:
        if (hf_path / name).is_file():
            shutil.copy2(hf_path / name, hf_dir / name)
    return tokenizer_dir, hf_dir


def parse_size(size: str | int) -> int:
    """'5GB', '200MB', '10KB' (decimal units, as transformers uses) or a byte count."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def _safetensors_header(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
                        ) -> tuple[bytes, dict[str, int]]:
    """The header ``safetensors.torch.save_file(..., metadata={"format": "pt"})`` writes for
    tensors of these shapes and dtypes, and each tensor's byte offset after it.

    The order of the data is the library's own (dtype, then name), read from a file of one
    element per tensor; the layout is safetensors' (u64 little-endian header length, compact
    JSON padded with spaces to 8 bytes, data).
    """
    import struct

    from safetensors.torch import save

    probe = save({name: torch.zeros(1, dtype=dtype) for name, (_, dtype) in specs.items()},
                 metadata={"format": "pt"})
    [probe_length] = struct.unpack("<Q", probe[:8])
    probe_header = json.loads(probe[8:8 + probe_length])
    order = sorted((name for name in probe_header if name != "__metadata__"),
                   key=lambda name: probe_header[name]["data_offsets"][0])
    header, offsets, position = {"__metadata__": {"format": "pt"}}, {}, 0
    for name in order:
        shape, dtype = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": probe_header[name]["dtype"], "shape": list(shape),
                        "data_offsets": [position, position + size]}
        offsets[name] = position
        position += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def write_safetensors(tensors, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      out_dir: str | Path, max_shard_size: str | int = "5GB") -> list[Path]:
    """Write tensors as safetensors, sharded with ``model.safetensors.index.json`` when large.

    Args:
        tensors: (name, tensor) pairs, produced lazily in the order of ``specs``; each may be a
            view into shared storage (q/k/v of one packed tensor, a vocabulary slice).
        specs: name -> (shape, dtype), in writing order: plans the shards and their headers
            before any tensor exists.

    Each file's header is written first and every tensor's bytes go to their place as the
    tensor arrives, so no more than one tensor is held here: with a producer that releases its
    sources as it goes, memory stays near one tensor. The files are byte for byte what
    ``safetensors.torch.save_file`` writes for the same tensors.
    """
    out_dir, limit = Path(out_dir), parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    used = 0
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    count = len(shards)
    files = ["model.safetensors"] if count == 1 else \
        [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    stream = iter(tensors)
    weight_map, total = {}, 0
    for file, names in zip(files, shards):
        header, offsets = _safetensors_header({name: specs[name] for name in names})
        with open(out_dir / file, "wb") as handle:
            handle.write(header)
            handle.flush()
            for expected in names:
                name, tensor = next(stream)
                if name != expected:
                    raise ValueError(f"tensor {name} arrived where {expected} was planned")
                shape, dtype = specs[name]
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise ValueError(f"tensor {name} arrived as {tuple(tensor.shape)} "
                                     f"{tensor.dtype}, planned as {tuple(shape)} {dtype}")
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                handle.seek(len(header) + offsets[name])
                handle.write(memoryview(data.numpy()))
                handle.flush()
                total += data.numel()
                del tensor, data
        weight_map.update({name: file for name in names})
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / file for file in files]
